"""Bad input over real sockets against the real bridge: each case is logged once with the
call sid, counted by kind in /metrics, and either skipped (a turn completes afterwards) or
ends only its own call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
from base64 import b64encode

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ivr_bridge.audio import wav_bytes
from ivr_bridge.media_stream import AUDIO_CLOCK_SLACK
from ivr_bridge.standins.nextevi import VoiceApiBehaviour
from ivr_bridge.standins.twilio import TwilioCaller
from tests.call_harness import until
from tests.test_end_to_end import nextevi_settings, sine, tone_ulaw, voice_api
from tests.test_metrics import scrape, value

BEHAVIOUR = dict(reply_ms=400, tts_chunk_ms=200, pace=False, end_of_turn_ms=200, interrupt_on_speech=False)


async def complete_turn(caller: TwilioCaller) -> None:
    """The caller speaks and hears the start of a reply: the call still works."""
    before = len(caller.received)
    await caller.say(tone_ulaw(300))
    await caller.silence(400)  # the stand-in ends the turn on silence
    await caller.wait_for(lambda: len(caller.received) >= before + 1600, 15)


def bad_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def media(sid: str, payload: str) -> str:
    return json.dumps({"event": "media", "streamSid": sid, "media": {"payload": payload}})


def start(sid: str, call_sid: str) -> str:
    body = {
        "streamSid": sid,
        "callSid": call_sid,
        "accountSid": "AC1",
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    return json.dumps({"event": "start", "streamSid": sid, "start": body})


TWILIO_CASES = {
    "not_json": lambda c: "{not json",
    "binary": lambda c: b"\x00\x01\x02",
    "unknown_event": lambda c: json.dumps({"event": "bogus", "streamSid": c.stream_sid}),
    "second_start": lambda c: start(c.stream_sid, c.call_sid),
    "wrong_stream": lambda c: media("MZ" + "f" * 32, "AAAA"),
    "bad_base64": lambda c: media(c.stream_sid, "!!not base64!!"),
}


@pytest.mark.parametrize("kind", list(TWILIO_CASES))
async def test_bad_twilio_frame_is_skipped(make_bridge, caplog, kind: str) -> None:
    caplog.set_level(logging.INFO)
    async with voice_api(VoiceApiBehaviour(**BEHAVIOUR)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url) as caller:
            await standin.wait_for_session()
            assert caller._ws is not None
            await caller._ws.send(TWILIO_CASES[kind](caller))
            await complete_turn(caller)
            _, samples = await scrape(bridge.base_url)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [line] = bad_lines(caplog, "a Twilio frame")
    assert f"({kind})" in line and call.call_sid in line
    assert value(samples, "ivr_bad_input_total", source="twilio", kind=kind) == 1
    assert call.stats.bad_frames == 1 and call.outcome == "stream_stopped"


async def test_media_before_start_is_skipped(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with voice_api(VoiceApiBehaviour(**BEHAVIOUR)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with connect(bridge.stream_url) as ws:
            await ws.send(media("MZ1", "AAAA"))
            await ws.send(start("MZ1", "CAbefore"))
            session = await standin.wait_for_session()
            for _ in range(100):  # audio flows once the session is open
                await ws.send(media("MZ1", b64encode(bytes(160)).decode()))
                await asyncio.sleep(0.02)
                if len(session.audio) >= 4800:
                    break
            assert len(session.audio) >= 4800
            await ws.send(json.dumps({"event": "stop", "streamSid": "MZ1", "stop": {"callSid": "CAbefore"}}))
        [call] = await bridge.wait_for_calls(1)
    # Before `start` the call sid is not known yet: the line carries "-" in its place.
    [line] = bad_lines(caplog, "a Twilio frame")
    assert "(before_start)" in line
    assert call.outcome == "stream_stopped" and call.stats.frames_in >= 5


async def test_odd_length_media_reaches_the_voice_api(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with voice_api(VoiceApiBehaviour(**BEHAVIOUR)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url) as caller:
            session = await standin.wait_for_session()
            assert caller._ws is not None
            raw = 0
            for _ in range(500):  # audio flows once the session is open; paced like a line
                if session.audio:
                    break
                await caller._ws.send(media(caller.stream_sid, b64encode(bytes(161)).decode()))
                raw += 161
                await asyncio.sleep(0.02)
            assert session.audio
            for size in (161, 77, 1, 561, 3, 5):
                await caller._ws.send(media(caller.stream_sid, b64encode(bytes([0x7F]) * size).decode()))
                raw += size
            await complete_turn(caller)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
        await asyncio.wait_for(session.closed.wait(), 10)
    # Every byte reached the voice API (three 24 kHz samples per mu-law byte), except what
    # still waited for a whole upstream chunk when the call ended.
    sent = raw + caller._chunk * 160
    assert len(session.audio) == 6 * (sent - call.uplink.pending_bytes)
    assert call.stats.bad_frames == 0 and not bad_lines(caplog, "a Twilio frame")


async def test_mark_nobody_sent_is_ignored(make_bridge, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="ivr_bridge.call")
    async with voice_api(VoiceApiBehaviour(**BEHAVIOUR)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url) as caller:
            await standin.wait_for_session()
            assert caller._ws is not None
            mark = {"event": "mark", "streamSid": caller.stream_sid, "mark": {"name": "r99.1"}}
            await caller._ws.send(json.dumps(mark))
            await complete_turn(caller)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [line] = bad_lines(caplog, "never sent")
    assert call.call_sid in line
    assert call.stats.bad_frames == 0 and not bad_lines(caplog, "a Twilio frame")


async def _healthy_call(url: str) -> TwilioCaller:
    async with TwilioCaller(url) as caller:
        await complete_turn(caller)
        await caller.hang_up()
    return caller


async def test_flood_ends_only_that_call(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with voice_api(VoiceApiBehaviour(**BEHAVIOUR)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        healthy = asyncio.create_task(_healthy_call(bridge.stream_url))
        flooder = TwilioCaller(bridge.stream_url)
        opened = time.monotonic()
        await flooder.connect()
        assert flooder._ws is not None
        frame = media(flooder.stream_sid, b64encode(bytes(160)).decode())
        sent = 0
        with contextlib.suppress(ConnectionClosed):  # the bridge closes the socket on us
            while sent < 20_000:  # 400 s of audio, as fast as the socket takes it
                await flooder._ws.send(frame)
                sent += 1
        await flooder.wait_closed(10)
        flooded_for_ms = (time.monotonic() - opened) * 1000
        good = await asyncio.wait_for(healthy, 30)
        calls = await bridge.wait_for_calls(2)
        _, samples = await scrape(bridge.base_url)
    flooded = next(c for c in calls if c.call_sid == flooder.call_sid)
    ok = next(c for c in calls if c.call_sid == good.call_sid)
    assert flooder.close_code == 1008
    # Refused after ~2 s of audio (100 frames) ahead of the time the stream has been open,
    # not 400 s of it. (On a loaded machine that time is more than the few ms of a fast one.)
    assert flooded.outcome == "flooded"
    assert flooded.stats.frames_in <= 101 + flooded_for_ms * AUDIO_CLOCK_SLACK / 20
    assert ok.outcome == "stream_stopped" and len(good.received) >= 1600 and good.violations == []
    [line] = bad_lines(caplog, "(flood)")
    assert flooder.call_sid in line
    assert value(samples, "ivr_bad_input_total", source="twilio", kind="flood") == 1


async def test_five_megabyte_frame_ends_only_that_call(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with voice_api(VoiceApiBehaviour(**BEHAVIOUR)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        healthy = asyncio.create_task(_healthy_call(bridge.stream_url))
        big = TwilioCaller(bridge.stream_url)
        await big.connect()
        assert big._ws is not None
        # Its `start` taken (its voice session opening), then the frame too big for any call.
        await until(lambda: any(s.connection_id.startswith(big.call_sid) for s in standin.sessions), 10)
        with contextlib.suppress(ConnectionClosed):  # closed while sending
            await big._ws.send(media(big.stream_sid, b64encode(bytes(5 * 2**20 * 3 // 4)).decode()))
        await big.wait_closed(10)
        good = await asyncio.wait_for(healthy, 30)
        calls = await bridge.wait_for_calls(2)
        _, samples = await scrape(bridge.base_url)
    assert big.close_code == 1009  # uvicorn's ws_max_size (256 KiB)
    [line] = bad_lines(caplog, "a Twilio frame")
    assert big.call_sid in line and "too_large" in line
    assert value(samples, "ivr_bad_input_total", source="twilio", kind="too_large") == 1
    ok = next(c for c in calls if c.call_sid == good.call_sid)
    assert ok.outcome == "stream_stopped" and len(good.received) >= 1600
    assert next(c for c in calls if c.call_sid == big.call_sid).outcome == "caller_hung_up"


def _wav_header(channels: int, rate: int, bits: int, data_size: int) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * max(channels, 1) * bits // 8, 2, bits)
    return (
        b"RIFF"
        + struct.pack("<I", 36)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_size)
    )


def tts(audio: bytes) -> str:
    return json.dumps({"type": "tts_chunk", "content": b64encode(audio).decode()})


VOICE_API_CASES = {
    "not_json": ("not_json", "this is not json"),
    "unknown_type": ("unknown_type", json.dumps({"type": "novel_thing"})),
    "bad_base64": ("bad_base64", json.dumps({"type": "tts_chunk", "content": "not base64!"})),
    "zero_channels": ("bad_wav", tts(_wav_header(0, 24000, 16, 100) + bytes(100))),
    "eight_bit": ("bad_wav", tts(_wav_header(1, 24000, 8, 100) + bytes(100))),
    "96_khz": ("bad_wav", tts(_wav_header(1, 96000, 16, 100) + bytes(100))),
    "binary": ("binary", b"\x00\x01"),
}


@pytest.mark.parametrize("case", list(VOICE_API_CASES))
async def test_bad_voice_api_message_is_skipped(make_bridge, caplog, case: str) -> None:
    caplog.set_level(logging.INFO)
    kind, message = VOICE_API_CASES[case]
    async with voice_api(VoiceApiBehaviour(**BEHAVIOUR)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url) as caller:
            session = await standin.wait_for_session()
            await standin.send_raw(session, message)
            await complete_turn(caller)
            _, samples = await scrape(bridge.base_url)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [line] = bad_lines(caplog, "skipped a voice API message")
    assert f"({kind})" in line and call.call_sid in line
    assert value(samples, "ivr_bad_input_total", source="voice_api", kind=kind) == 1
    assert call.outcome == "stream_stopped"


async def test_wav_whose_data_size_runs_past_the_end_still_plays(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with voice_api(VoiceApiBehaviour(**BEHAVIOUR)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url) as caller:
            session = await standin.wait_for_session()
            wav = wav_bytes(sine(200, 700), 24000)
            lying = wav[:40] + struct.pack("<I", 10**9) + wav[44:]
            await standin.send_raw(session, tts(lying))
            await caller.wait_for(lambda: len(caller.received) >= 1600, 10)
            await caller.hang_up()
        await bridge.wait_for_calls(1)
    assert not bad_lines(caplog, "skipped a voice API message")


async def test_voice_api_error_message_is_logged_once(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with voice_api(VoiceApiBehaviour(**BEHAVIOUR)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url) as caller:
            session = await standin.wait_for_session()
            error = {"type": "error", "data": {"error_code": "E42", "error_message": "rate limited"}}
            await standin.send_raw(session, json.dumps(error))
            await complete_turn(caller)
            _, samples = await scrape(bridge.base_url)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [line] = bad_lines(caplog, "E42")
    assert call.call_sid in line and "rate limited" in line
    assert value(samples, "ivr_provider_errors_total") == 1


async def test_giant_voice_api_chunk_harms_only_that_call(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with voice_api(VoiceApiBehaviour(**BEHAVIOUR)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        victim = TwilioCaller(bridge.stream_url, continuous=True)
        other = TwilioCaller(bridge.stream_url, continuous=True)
        async with victim, other:
            sessions = [await standin.wait_for_session(0), await standin.wait_for_session(1)]
            prefix = "".join(ch for ch in victim.call_sid if ch.isalnum())
            [victim_session] = [s for s in sessions if s.connection_id.startswith(prefix)]
            giant = np.zeros(5 * 2**20 // 2, dtype=np.int16)  # over the bridge's 4 MiB limit
            # The bridge refuses it from its header and may close while it is still written.
            with contextlib.suppress(ConnectionClosed):
                await standin.send_raw(victim_session, tts(giant.tobytes()))
            await asyncio.wait_for(victim_session.closed.wait(), 10)
            await complete_turn(other)
            await other.hang_up()
            await victim.hang_up()
        calls = await bridge.wait_for_calls(2)
    by_sid = {c.call_sid: c for c in calls}
    assert victim_session.close_code == 1009
    assert by_sid[other.call_sid].outcome == "stream_stopped" and other.violations == []
    assert not victim.violations and victim.close_code in (None, 1000)
    assert len([m for m in bad_lines(caplog, "voice API closed the session") if victim.call_sid in m]) == 1
    assert by_sid[victim.call_sid].outcome in ("stream_stopped", "voice_api_failed")


async def test_giant_voice_api_chunk_is_reported_as_1009(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with voice_api(VoiceApiBehaviour(**BEHAVIOUR)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            session = await standin.wait_for_session()
            with contextlib.suppress(ConnectionClosed):  # closed while sending, as above
                await standin.send_raw(session, tts(np.zeros(5 * 2**20 // 2, dtype=np.int16).tobytes()))
            await asyncio.wait_for(session.closed.wait(), 10)
            # 1009 is not retried: the bridge ends the call (no fallback configured here).
            await caller.wait_closed(10)
        [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "voice_api_failed" and call.keeper.close_code == 1009
    assert len(standin.sessions) == 1
