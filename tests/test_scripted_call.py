"""Scripted calls against the real bridge, a fake bridge, and from the command line."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from ivr_bridge.audio import ulaw_decode
from ivr_bridge.loadgen.call_report import media_after_clear, response_number
from ivr_bridge.loadgen.scenario import parse_scenario
from ivr_bridge.loadgen.scripted_call import ScriptedCall, heard_wav, place_call
from ivr_bridge.loadgen.webhook import CallDetails, StreamTarget
from ivr_bridge.providers.nextevi import NextEviSettings
from ivr_bridge.settings import Settings
from ivr_bridge.standins.nextevi import NextEviStandIn, VoiceApiBehaviour
from ivr_bridge.standins.timeline import CallerTimeline
from tests.loadgen_support import write_tone

API_KEY = "oak_scripted_call_key"
CONFIG_ID = "cfg_scripted"
ROOT = Path(__file__).resolve().parent.parent
SILENCE_FRAME = base64.b64encode(b"\xff" * 160).decode()
TIMEOUT = 20.0  # generous: the CI box is a loaded 2-core machine


def dominant_hz(ulaw: bytes | bytearray) -> float:
    samples = ulaw_decode(bytes(ulaw)).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * 8000 / len(samples))


async def test_scenario_with_barge_in_and_dtmf_against_the_bridge(make_bridge, tmp_path: Path) -> None:
    write_tone(tmp_path / "speech.wav", 600, hz=1000)
    write_tone(tmp_path / "stop.wav", 500, hz=1200)
    steps: list[dict[str, Any]] = [
        {"say": "speech.wav"},
        {"wait_for": "bot_audio", "timeout": TIMEOUT},
        {"wait_for": "bot_done", "timeout": TIMEOUT},
        {"say": "speech.wav"},
        {"wait_for": "bot_audio", "timeout": TIMEOUT},
        {"wait": 0.3},
        {"barge_in": "stop.wav", "timeout": TIMEOUT},
        {"wait_for": "clear", "timeout": TIMEOUT},
        {"dtmf": "1"},
        {"wait_for": "bot_done", "timeout": TIMEOUT},
        {"hang_up": True},
    ]
    scenario = parse_scenario({"name": "barge", "steps": steps}, tmp_path, "test")
    behaviour = VoiceApiBehaviour(
        api_key=API_KEY, config_id=CONFIG_ID, reply_ms=1500, tts_chunk_ms=200, pace=True, record_audio=False
    )
    async with NextEviStandIn(behaviour) as standin:
        bridge = make_bridge(
            Settings(
                provider="nextevi",
                voice=NextEviSettings(url=standin.url, api_key=API_KEY, config_id=CONFIG_ID),
            )
        )
        details = CallDetails(from_number="+15550001111", to_number="+15550002222")
        report, caller = await place_call(f"{bridge.base_url}/twiml", scenario, details)
        [call] = await bridge.wait_for_calls(1)

    assert report.ok, report.reason
    assert report.call_sid == details.call_sid == call.call_sid
    assert call.caller == "+15550001111"  # the TwiML's <Parameter>s reached start
    assert ("dtmf", "1") in [(line.role, line.text) for line in call.transcript]
    assert report.violations == [] and report.errors == []

    # A reply to each utterance: two says and the barge-in, each after its speech ended.
    assert [u.kind for u in report.utterances] == ["say", "say", "barge_in"]
    for utterance in report.utterances:
        assert utterance.reply_latency_ms is not None and 0 < utterance.reply_latency_ms < TIMEOUT * 1000
        assert utterance.ended_at is not None and utterance.started_at is not None
        assert utterance.ended_at - utterance.started_at >= 0.4
    [barge_in] = report.barge_ins
    assert barge_in.stop_ms is not None and 0 < barge_in.stop_ms < 5000
    assert report.clears == 1 and report.marks_flushed > 0
    assert report.first_audio_ms is not None and report.first_audio_ms > 600  # the reply follows speech

    # Lost frames (> 100 ms late) would mean a stalled test machine, not a bridge fault.
    assert report.frames_sent > 100 and report.frames_lost < report.frames_sent // 10
    assert report.send_lateness_ms.size == report.frames_sent
    assert report.media_received > 0 and report.bytes_received >= report.bytes_heard > 0

    # The WAV holds exactly what was heard: the stand-in's 440 Hz replies.
    assert caller is not None
    with wave.open(io.BytesIO(heard_wav(caller))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        assert w.getnframes() == report.bytes_heard == len(caller.received)
    assert abs(dominant_hz(caller.received) - 440) < 10


async def test_call_command_end_to_end(echo_bridge, tmp_path: Path) -> None:
    out = tmp_path / "reply.wav"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ivr_bridge",
        "call",
        f"{echo_bridge.base_url}/twiml",
        "--audio",
        str(ROOT / "examples" / "audio" / "hello.wav"),
        "--json",
        "--out",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    report = json.loads(stdout)
    [call] = await echo_bridge.wait_for_calls(1)

    assert report["call_sid"] == call.call_sid and report["call_sid"].startswith("CA")
    assert report["outcome"] == "completed" and report["reason"] is None
    [latency] = report["reply_latency_ms"]
    assert 500 < latency < 10_000  # the echo answers after 600 ms of silence
    assert report["first_audio_ms"] > 3000  # start -> the reply to 3.7 s of speech
    assert report["frames_sent"] > 180 and report["frames_lost"] < report["frames_sent"] // 10
    assert report["violations"] == [] and report["errors"] == []
    assert set(report["send_lateness_ms"]) == {"p50", "p99", "max"}
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        assert w.getnframes() == report["bytes_heard"] > 0.8 * 3.7 * 8000  # the whole echo


class FakeBridge:
    """Sends a reply, clears it, then (wrongly) more of it, then a new reply."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def handler(self, ws: ServerConnection) -> None:
        sid = ""
        try:
            async for raw in ws:
                message = json.loads(raw)
                self.events.append(message["event"])
                if message["event"] == "start":
                    sid = message["streamSid"]
                    clear = {"event": "clear", "streamSid": sid}
                    sequence = [*reply(sid, "r1.1"), *reply(sid, "r1.2"), clear, *reply(sid, "r1.3")]
                    for item in [*sequence, *reply(sid, "r2.4")]:
                        await ws.send(json.dumps(item))
        except ConnectionClosed:
            pass


def reply(sid: str, mark: str) -> list[dict[str, Any]]:
    media = {"event": "media", "streamSid": sid, "media": {"payload": SILENCE_FRAME}}
    return [media, {"event": "mark", "streamSid": sid, "mark": {"name": mark}}]


@pytest.fixture
async def fake_bridge() -> AsyncIterator[tuple[FakeBridge, str]]:
    fake = FakeBridge()
    async with serve(fake.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield fake, f"ws://127.0.0.1:{port}/media-stream"


async def test_media_of_a_cleared_reply_is_a_violation(fake_bridge: tuple[FakeBridge, str], tmp_path) -> None:
    fake, url = fake_bridge
    steps = [{"wait_for": "clear", "timeout": TIMEOUT}, {"wait_for": "bot_done", "timeout": TIMEOUT}]
    scenario = parse_scenario({"steps": steps}, tmp_path, "test")
    report = await ScriptedCall(StreamTarget(url, {}), scenario, CallDetails(), None).run()
    assert report.ok, report.reason
    assert report.violations == [
        "media after clear: 1 message(s), 160 bytes of interrupted response r1 arrived after clear 1"
    ]
    assert report.clears == 1 and report.media_received == 4
    assert fake.events[-1] == "stop"  # a scenario without hang_up hangs up at its end


def test_media_after_clear_rules() -> None:
    timeline = CallerTimeline()
    for at, item in enumerate(["m", "r1.1", "m", "r1.2", "clear", "m", "r2.3", "m", "clear", "m", "r2.4"]):
        if item == "m":
            timeline.media(at, 160)
        elif item == "clear":
            timeline.clear(at)
        else:
            timeline.mark(at, item)
    # After the first clear the new reply r2 is fine; after the second, more r2 is stale.
    assert media_after_clear(timeline) == [
        "media after clear: 1 message(s), 160 bytes of interrupted response r2 arrived after clear 2"
    ]
    timeline.mark(99, "custom-mark")  # names the bridge did not make: no way to tell, no verdict
    assert media_after_clear(timeline) == []
    assert [response_number(n) for n in ("r12.3", "r.3", "x1.2", "r1")] == [12, None, None, None]


async def test_unreachable_stream_fails_the_call_with_a_reason(tmp_path: Path) -> None:
    scenario = parse_scenario({"steps": [{"wait": 0.1}]}, tmp_path, "test")
    report = await ScriptedCall(StreamTarget("ws://127.0.0.1:9/x", {}), scenario, CallDetails(), None).run()
    assert report.outcome == "failed"
    assert report.reason is not None and report.reason.startswith(
        "cannot connect to the stream ws://127.0.0.1:9/x"
    )
    assert report.frames_sent == 0 and report.first_audio_ms is None


async def test_a_step_timeout_fails_the_call(echo_bridge, tmp_path: Path) -> None:
    steps = [{"wait_for": "bot_audio", "timeout": 0.3}, {"hang_up": True}]
    scenario = parse_scenario({"steps": steps}, tmp_path, "test")
    report, _ = await place_call(f"{echo_bridge.base_url}/twiml", scenario)
    assert report.outcome == "failed"
    assert report.reason == "step 1 (wait_for bot_audio): no bot audio within 0.3 s"
    await echo_bridge.wait_for_calls(1)  # the failed call was still hung up
    assert report.frames_sent > 0 and report.violations == []
