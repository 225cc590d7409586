"""What a new user does to try a voice API without an account, as separate processes from
the command line: start the provider's stand-in (`stub-voice-api --provider`), serve the
bridge with that provider's settings, place a scripted call that barges in
(`ivr-bridge call`), and read the call's record (`ivr-bridge calls show`): the transcript
shows the bot's reply cut where the caller talked over it. With VoxNexus the bridge's own
dialogue step answers: the demo IVR flow, or the stand-in of a model (`stub-llm`) or of a
dialogue endpoint (`stub-dialogue-hook`)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_hostile_state import free_port, serve_env, serving

ROOT = Path(__file__).resolve().parent.parent


def provider_env(provider: str, port: int) -> dict[str, str]:
    """The settings the README gives for trying each provider against its stand-in."""
    return {
        "openai": {
            "OPENAI_API_KEY": "sk-test-realtime",
            "OPENAI_REALTIME_URL": f"ws://127.0.0.1:{port}/v1/realtime",
        },
        "elevenlabs": {
            "ELEVENLABS_AGENT_ID": "agent_test",
            "ELEVENLABS_URL": f"ws://127.0.0.1:{port}/v1/convai/conversation",
        },
        "navtalk": {
            "NAVTALK_LICENSE": "nt-test-license",
            "NAVTALK_CHARACTER": "Sophia",
            "NAVTALK_URL": f"ws://127.0.0.1:{port}/wss/v2/realtime-chat",
        },
        "voxnexus": {
            "VOXNEXUS_API_KEY": "vn-test-key",
            "VOXNEXUS_STT_URL": f"ws://127.0.0.1:{port}/v1/stt/realtime",
            "VOXNEXUS_TTS_URL": f"ws://127.0.0.1:{port}/v1/tts/realtime",
        },
    }[provider]


# What the caller "says" to the VoxNexus stand-in, utterance by utterance (it cannot
# recognise speech): the scenario's clips then walk the demo IVR flow.
SAID = ["I would like support.", "One two three four.", "Stop."]
STANDIN_OPTIONS = {"voxnexus": [option for said in SAID for option in ("--transcript", said)]}


async def run(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ivr_bridge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"ivr-bridge {args[0]} failed: {done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.parametrize("provider", ["openai", "elevenlabs", "navtalk", "voxnexus"])
async def test_a_new_user_tries_a_voice_api_from_the_command_line(tmp_path: Path, provider: str) -> None:
    api_port, port = free_port(), free_port()
    env = serve_env(tmp_path, IVR_PROVIDER=provider, **provider_env(provider, api_port))
    standin = subprocess.Popen(
        [sys.executable, "-m", "ivr_bridge", "stub-voice-api", "--provider", provider,
         "--port", str(api_port), "--reply-ms", "4000", *STANDIN_OPTIONS.get(provider, [])],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "ivr_bridge", "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    try:
        base = await serving(port)
        scenario = ROOT / "examples" / "scenarios" / "barge_in.json"
        placed = await run("call", f"{base}/twiml", "--scenario", str(scenario), "--json", env=env)
        report = json.loads(placed)
        assert report["outcome"] == "completed", report
        # (An ElevenLabs agent greets at once, the cascade of VoxNexus at the call's first
        # audio: the caller's first words may cut the greeting too.)
        assert report["clears"] in ((1, 2) if provider in ("elevenlabs", "voxnexus") else (1,))
        assert report["violations"] == []
    finally:
        server.send_signal(signal.SIGTERM)  # drains: the call's record is complete
        await asyncio.to_thread(server.wait, 60)
        standin.send_signal(signal.SIGTERM)
        await asyncio.to_thread(standin.wait, 60)
    record = json.loads(await run("calls", "show", report["call_sid"], "--json", env=env))
    lines = record["transcript"]
    cut = [line for line in lines if line["role"] == "assistant" and line.get("interrupted")]
    assert len(cut) == report["clears"] and 0 < cut[-1]["heard_ms"] < 4000
    assert any(line["role"] == "user" for line in lines)
    assert record["provider"] == provider, sorted(record)
    if provider == "voxnexus":  # the bridge's own dialogue: the demo IVR, on what was "said"
        assert {line["text"] for line in lines if line["role"] == "user"} <= set(SAID)
        assert lines[0]["text"].startswith("Welcome to Example Company.")


async def listening(port: int) -> None:
    """Once a stand-in started as a process accepts connections on `port`."""
    for _ in range(300):  # polled: a process starting gives no other signal
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise TimeoutError(f"nothing listening on port {port}")


def dialogue_step(dialogue: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The stand-in command of a dialogue step, and the settings the README gives for it."""
    if dialogue == "llm":
        settings = {
            "IVR_DIALOGUE": "llm",
            "IVR_LLM_URL": f"http://127.0.0.1:{port}/v1",
            "IVR_LLM_MODEL": "any-model",
            "IVR_LLM_API_KEY": "sk-test-llm",
        }
        return ["stub-llm", "--port", str(port), "--api-key", "sk-test-llm"], settings
    settings = {
        "IVR_DIALOGUE": "hook",
        "IVR_DIALOGUE_URL": f"http://127.0.0.1:{port}/",
        "IVR_HOOK_SECRET": "hook-secret-cli",
    }
    return ["stub-dialogue-hook", "--port", str(port), "--secret", "hook-secret-cli"], settings


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dialogue", ["llm", "hook"])
async def test_a_new_user_tries_a_dialogue_step_from_the_command_line(tmp_path: Path, dialogue: str) -> None:
    """VoxNexus (its stand-in) hears, the dialogue step's stand-in answers: `stub-llm` or
    `stub-dialogue-hook`, each printing what reached it as JSON lines."""
    api_port, step_port, port = free_port(), free_port(), free_port()
    command, step_settings = dialogue_step(dialogue, step_port)
    env = serve_env(tmp_path, IVR_PROVIDER="voxnexus", **provider_env("voxnexus", api_port), **step_settings)
    standin = subprocess.Popen(
        [sys.executable, "-m", "ivr_bridge", "stub-voice-api", "--provider", "voxnexus",
         "--port", str(api_port), "--transcript", "Hello there."],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    step = subprocess.Popen(
        [sys.executable, "-m", "ivr_bridge", *command],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "ivr_bridge", "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    try:
        await listening(api_port)
        await listening(step_port)
        base = await serving(port)
        scenario = ROOT / "examples" / "scenarios" / "one_turn.json"
        placed = await run("call", f"{base}/twiml", "--scenario", str(scenario), "--json", env=env)
        report = json.loads(placed)
        assert report["outcome"] == "completed", report
    finally:
        server.send_signal(signal.SIGTERM)  # drains: the call's record is complete
        await asyncio.to_thread(server.wait, 60)
        for process in (step, standin):
            process.send_signal(signal.SIGTERM)
        printed, _ = await asyncio.to_thread(step.communicate, timeout=60)
        await asyncio.to_thread(standin.wait, 60)
    assert step.returncode == 0
    record = json.loads(await run("calls", "show", report["call_sid"], "--json", env=env))
    lines = [(line["role"], line["text"]) for line in record["transcript"]]
    assert ("user", "Hello there.") in lines
    assert lines[-1] == ("assistant", "You said: Hello there.")  # the stand-in's own dialogue
    # What reached the dialogue step's stand-in (a hook's turns only once their signature held).
    seen = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    if dialogue == "llm":
        assert len(seen) == 2 and (seen[-1]["status"], seen[-1]["user"]) == (200, "Hello there.")
    else:
        assert [s["turn"] for s in seen] == [
            {"kind": "start", "text": ""},
            {"kind": "speech", "text": "Hello there."},
        ]
        assert {s["call_sid"] for s in seen} == {report["call_sid"]}


def test_stub_voice_api_takes_each_stand_in_s_own_options_with_its_defaults(monkeypatch, capsys) -> None:
    """`--provider voxnexus` reaches the VoxNexus stand-in's own options (`--transcript`,
    `--wav-header`), and an option it shares with NextEVI's has its default, not NextEVI's."""
    from ivr_bridge import cli, logs
    from ivr_bridge.standins import nextevi, voxnexus

    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)  # pytest's logging stays
    ran: dict[str, object] = {}

    def run_voxnexus(args: object) -> int:
        ran["voxnexus"] = voxnexus.behaviour_from(args)  # type: ignore[arg-type]
        return 0

    def run_nextevi(args: object) -> int:
        ran["nextevi"] = args
        return 0

    monkeypatch.setattr(voxnexus, "run", run_voxnexus)
    monkeypatch.setattr(nextevi, "run", run_nextevi)
    said = ["--transcript", "Yes.", "--transcript", "No."]
    voxnexus_argv = ["stub-voice-api", "--provider", "voxnexus", "--reply-ms", "4000", *said]
    assert cli.main([*voxnexus_argv, "--wav-header", "first", "--api-key", "vn-k"]) == 0
    assert cli.main(["stub-voice-api", "--reply-ms", "4000", "--no-pace"]) == 0
    heard, defaults = ran["voxnexus"], voxnexus.VoxNexusBehaviour()
    assert isinstance(heard, voxnexus.VoxNexusBehaviour)
    assert (heard.transcripts, heard.wav_header, heard.api_key) == (["Yes.", "No."], "first", "vn-k")
    assert (heard.chunk_ms, heard.end_of_speech_ms) == (defaults.chunk_ms, defaults.end_of_speech_ms)
    shared, theirs = ran["nextevi"], nextevi.VoiceApiBehaviour()
    assert (theirs.tts_chunk_ms, theirs.end_of_turn_ms) != (defaults.chunk_ms, defaults.end_of_speech_ms)
    assert (shared.tts_chunk_ms, shared.end_of_turn_ms) == (theirs.tts_chunk_ms, theirs.end_of_turn_ms)  # type: ignore[attr-defined]
    assert (shared.reply_ms, shared.no_pace, shared.transcript) == (4000, True, None)  # type: ignore[attr-defined]

    for command in (["stub-voice-api"], ["stub-llm"], ["stub-dialogue-hook"]):
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
    shown = capsys.readouterr().out
    assert "--provider voxnexus:" in shown and "--transcript TRANSCRIPT" in shown
    assert "IVR_LLM_URL=http://HOST:PORT/v1" in shown and "IVR_DIALOGUE_URL=http://HOST:PORT/" in shown
