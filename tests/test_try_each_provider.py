"""What a new user does to try a voice API without an account, as separate processes from
the command line: start the provider's stand-in (`stub-voice-api --provider`), serve the
bridge with that provider's settings, place a scripted call that barges in
(`ivr-bridge call`), and read the call's record (`ivr-bridge calls show`): the transcript
shows the bot's reply cut where the caller talked over it."""

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
    }[provider]


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


@pytest.mark.parametrize("provider", ["openai", "elevenlabs", "navtalk"])
async def test_a_new_user_tries_a_voice_api_from_the_command_line(tmp_path: Path, provider: str) -> None:
    api_port, port = free_port(), free_port()
    env = serve_env(tmp_path, IVR_PROVIDER=provider, **provider_env(provider, api_port))
    standin = subprocess.Popen(
        [sys.executable, "-m", "ivr_bridge", "stub-voice-api", "--provider", provider,
         "--port", str(api_port), "--reply-ms", "4000"],
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
        # (An ElevenLabs agent greets at once: the caller's first words may cut the greeting too.)
        assert report["clears"] in ((1, 2) if provider == "elevenlabs" else (1,))
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
