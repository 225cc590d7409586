"""The webhook, health check and command line, against the real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET

import httpx
import pytest


async def test_twiml_connects_the_call_to_the_media_stream(echo_bridge) -> None:
    form = {"CallSid": "CA" + "1" * 32, "From": "+15550001111", "To": "+15550002222", "AccountSid": "AC1"}
    async with httpx.AsyncClient(base_url=echo_bridge.base_url) as client:
        response = await client.post("/twiml", data=form)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(response.text)
    stream = root.find("./Connect/Stream")
    assert root.tag == "Response" and stream is not None
    assert stream.get("url") == echo_bridge.stream_url
    assert "?" not in stream.get("url", "")
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"CallSid": form["CallSid"], "From": form["From"], "To": form["To"]}


async def test_twiml_by_get_escapes_values(echo_bridge) -> None:
    async with httpx.AsyncClient(base_url=echo_bridge.base_url) as client:
        response = await client.get("/twiml", params={"From": 'x"<y>&', "CallSid": "CA1"})
    stream = ET.fromstring(response.text).find("./Connect/Stream")
    assert stream is not None
    assert {p.get("name"): p.get("value") for p in stream.findall("Parameter")} == {
        "CallSid": "CA1",
        "From": 'x"<y>&',
    }


async def test_healthz(echo_bridge) -> None:
    async with httpx.AsyncClient(base_url=echo_bridge.base_url) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def run_cli(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ivr_bridge", *args],
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(__file__),  # no .env file here
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"IVR_PROVIDER": "nextevi"}, "NEXTEVI_API_KEY"),
        ({"IVR_PUBLIC_URL": "example.com"}, "IVR_PUBLIC_URL"),
        ({"IVR_UPSTREAM_CHUNK_MS": "fast"}, "IVR_UPSTREAM_CHUNK_MS"),
    ],
)
def test_wrong_setting_stops_start_up_with_one_line(env: dict[str, str], variable: str) -> None:
    result = run_cli(env, "serve", "--port", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and "Traceback" not in result.stderr


def test_serve_starts_with_the_built_in_ivr_by_default_and_answers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ivr_bridge", "serve", "--port", str(port)],
        env={"PATH": os.environ.get("PATH", "")},
        cwd=os.path.dirname(__file__),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # bounded: uvicorn prints its start-up lines promptly
            seen.append(line)
            if "Uvicorn running" in line or "Application startup complete" in line:
                break
        assert any("voice provider: local (the built-in IVR" in line for line in seen), seen
        # Without IVR_PUBLIC_URL the stream URL points at this server.
        assert any(f"stream: ws://127.0.0.1:{port}/media-stream" in line for line in seen), seen
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert response.status_code == 200
        # The softphone and the dashboard, the latter with a token made for this run: it
        # works, and it is printed once, in the link's fragment, and logged nowhere.
        [pages] = [line for line in seen if "/phone" in line]
        assert f"http://127.0.0.1:{port}/phone" in pages
        token = pages.split("/dashboard#token=")[1].split()[0]
        assert len(token) >= 24 and sum(token in line for line in seen) == 1
        calls = f"http://127.0.0.1:{port}/calls"
        assert httpx.get(calls, headers={"authorization": f"Bearer {token}"}, timeout=10).status_code == 200
        assert httpx.get(calls, timeout=10).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=15)
