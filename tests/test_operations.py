"""Operating the bridge: one log format (JSON on request), the settings in effect at
start-up, misspelt variables named, `--version` and `serve --help`."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ivr_bridge.settings import Settings, SettingsError
from tests.test_hostile_state import free_port, serve_env, serving


def test_a_misspelt_variable_is_named_with_the_closest_setting() -> None:
    unknown: list[str] = []
    Settings.from_env(
        {
            "IVR_MAX_CALL": "5",
            "NEXTEVI_APIKEY": "x",
            "IVR_MAX_CALLS": "7",
            "TWILIO_REGION": "ie1",
            "OPENAI_REALTIME_VOICES": "alloy",
            "OPENAI_ORG_ID": "org",
        },
        dotenv=False,
        unknown=unknown,
    )
    assert unknown == [
        "IVR_MAX_CALL is not a setting of ivr-bridge and is ignored; did you mean IVR_MAX_CALLS?",
        "NEXTEVI_APIKEY is not a setting of ivr-bridge and is ignored; did you mean NEXTEVI_API_KEY?",
        "OPENAI_REALTIME_VOICES is not a setting of ivr-bridge and is ignored; "
        "did you mean OPENAI_REALTIME_VOICE?",
    ]  # TWILIO_ and OPENAI_ are shared with the vendors' other tools: not ours to judge


def test_the_settings_summary_shows_no_secret() -> None:
    settings = Settings.from_env(
        {
            "NEXTEVI_API_KEY": "oak_summary_secret",
            "NEXTEVI_CONFIG_ID": "cfg",
            "TWILIO_AUTH_TOKEN": "a" * 32,
            "IVR_API_TOKEN": "api-summary-secret",
            "IVR_DATABASE_URL": "postgresql://ivr:dbpass-secret@db/calls",
            "IVR_HOOK_URL": "https://u:hookpass-secret@hooks.example/in",
            "IVR_HOOK_SECRET": "hook-summary-secret",
        },
        dotenv=False,
    )
    line = settings.summary()
    assert "provider=nextevi" in line and "nextevi_api_key=set" in line and "control_api=on" in line
    for secret in settings.secret_values():
        assert secret not in line
    with pytest.raises(SettingsError, match="IVR_LOG_FORMAT"):
        Settings.from_env({"IVR_LOG_FORMAT": "xml"}, dotenv=False)


def test_version_and_serve_help() -> None:
    version = subprocess.run(
        [sys.executable, "-m", "ivr_bridge", "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and version.stdout.startswith("ivr-bridge ")
    helped = subprocess.run(
        [sys.executable, "-m", "ivr_bridge", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    text = " ".join(helped.stdout.split())  # argparse wraps lines
    for described in (
        "address to listen on",
        "port to listen on",
        "least severe level logged",
        "IVR_LOG_FORMAT",
    ):
        assert described in text


async def test_json_logs_one_object_a_line_with_the_call_sid(tmp_path: Path) -> None:
    from ivr_bridge.loadgen.webhook import CallDetails, fetch_stream
    from ivr_bridge.standins.twilio import TwilioCaller
    from tests.test_end_to_end import tone_ulaw

    port = free_port()
    log_file = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "ivr_bridge", "serve", "--port", str(port)],
        env=serve_env(tmp_path, IVR_LOG_FORMAT="json", IVR_MAX_CALL="3", IVR_API_TOKEN="api-token-json"),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        base = await serving(port)
        call = CallDetails()
        target = await fetch_stream(base + "/twiml", call)
        async with TwilioCaller(
            target.url, call_sid=call.call_sid, custom_parameters=target.parameters
        ) as caller:
            await caller.say(tone_ulaw(300))
            await caller.hang_up()
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.to_thread(server.wait, 60)
        log_file.close()
    entries = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    loggers = {e["logger"] for e in entries}
    assert "uvicorn.error" in loggers and "ivr_bridge.call" in loggers  # one format for all
    assert not any(name.startswith(("alembic", "twilio")) for name in loggers)  # quiet at INFO
    about_the_call = [e for e in entries if e.get("call_sid") == call.call_sid]
    assert any("call started" in e["message"] for e in about_the_call)
    assert any("settings: provider=local" in e["message"] for e in entries)
    assert any(
        "IVR_MAX_CALL is not a setting" in e["message"] and "IVR_MAX_CALLS" in e["message"] for e in entries
    )
    assert "api-token-json" not in (tmp_path / "serve.log").read_text()


# -- preflight: a wrong key is found before the first caller ---------------------------------


@pytest.mark.parametrize("key_ok", [True, False])
async def test_check_opens_a_session_with_the_configured_credentials(tmp_path: Path, key_ok: bool) -> None:
    from tests.test_end_to_end import API_KEY, CONFIG_ID, voice_api

    async with voice_api() as standin:
        env = serve_env(
            tmp_path,
            NEXTEVI_URL=standin.url,
            NEXTEVI_API_KEY=API_KEY if key_ok else "oak_wrong_key",
            NEXTEVI_CONFIG_ID=CONFIG_ID,
        )
        done = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ivr_bridge",
            "check",
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(done.communicate(), 60)
    if key_ok:
        assert (
            done.returncode == 0
            and out.decode().startswith("ok: ")
            and "nextevi took a session" in out.decode()
        )
    else:
        [line] = err.decode().splitlines()
        assert done.returncode == 1 and line.startswith("ivr-bridge: check failed: nextevi: ")
        assert "oak_wrong_key" not in line


async def test_preflight_keeps_readyz_at_503_until_the_voice_api_takes_a_session(make_bridge) -> None:
    import httpx

    from tests.test_end_to_end import nextevi_settings, voice_api

    async with voice_api() as standin:
        right = nextevi_settings(standin, preflight=True)
        wrong = replace(right, voice=replace(right.voice, api_key="oak_wrong_key"))
        bridge = make_bridge(wrong)
        async with httpx.AsyncClient(base_url=bridge.base_url, timeout=15) as client:
            for _ in range(300):  # polled: the preflight runs in the background
                answer = await client.get("/readyz")
                if answer.json()["reason"] != "preflight pending":
                    break
                await asyncio.sleep(0.05)
            assert answer.status_code == 503 and answer.json()["status"] == "preflight"
            assert "oak_wrong_key" not in answer.text
        good = make_bridge(right)
        async with httpx.AsyncClient(base_url=good.base_url, timeout=15) as client:
            for _ in range(300):
                answer = await client.get("/readyz")
                if answer.status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert answer.status_code == 200 and answer.json()["status"] == "ready"
