"""End to end over real loopback sockets: a Twilio-side caller -> the bridge under uvicorn ->
a NextEVI-protocol stand-in, and back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import wave
from base64 import b64encode
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ivr_bridge.audio import ulaw_decode, ulaw_encode, wav_bytes
from ivr_bridge.audio.measure import aligned_snr_db
from ivr_bridge.providers.nextevi import NextEviSettings
from ivr_bridge.settings import Settings
from ivr_bridge.standins.nextevi import NextEviStandIn, Session, VoiceApiBehaviour
from ivr_bridge.standins.twilio import TwilioCaller
from tests.support import eventually

API_KEY = "oak_e2e_secret_key"
CONFIG_ID = "cfg_e2e"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "audio"


def tone_ulaw(ms: int, hz: float = 1000.0, amplitude: float = 8000.0) -> bytes:
    t = np.arange(8 * ms) / 8000
    return ulaw_encode((amplitude * np.sin(2 * np.pi * hz * t)).astype(np.int16))


def dominant_hz(ulaw: bytes | bytearray, rate: int = 8000) -> float:
    samples = ulaw_decode(bytes(ulaw)).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def level_at(ulaw: bytes | bytearray, hz: float, rate: int = 8000) -> float:
    """Fraction of the signal's energy within 50 Hz of `hz`."""
    samples = ulaw_decode(bytes(ulaw)).astype(np.float64)
    power = np.abs(np.fft.rfft(samples * np.hanning(len(samples)))) ** 2
    freqs = np.fft.rfftfreq(len(samples), 1 / rate)
    return float(power[np.abs(freqs - hz) < 50].sum() / max(power.sum(), 1e-9))


def tts_message(samples: np.ndarray, rate: int = 24000, wav: bool = True) -> str:
    audio = wav_bytes(samples, rate) if wav else samples.astype("<i2").tobytes()
    return json.dumps(
        {"type": "tts_chunk", "timestamp": 0.0, "message_id": "x", "content": b64encode(audio).decode()}
    )


def sine(ms: int, hz: float, rate: int = 24000, amplitude: float = 8000.0) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.int16)


@contextlib.asynccontextmanager
async def voice_api(behaviour: VoiceApiBehaviour | None = None) -> AsyncIterator[NextEviStandIn]:
    behaviour = behaviour or VoiceApiBehaviour()
    behaviour.api_key, behaviour.config_id = API_KEY, CONFIG_ID
    async with NextEviStandIn(behaviour) as standin:
        yield standin


def nextevi_settings(standin: NextEviStandIn, **overrides: object) -> Settings:
    return Settings(
        provider="nextevi",
        voice=NextEviSettings(url=standin.url, api_key=API_KEY, config_id=CONFIG_ID),
        **overrides,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("envelope", "wav_header", "tts_rate"),
    [("data", True, 24000), ("flat", False, 24000), ("flat", True, 16000)],
)
async def test_full_turn(make_bridge, caplog, envelope: str, wav_header: bool, tts_rate: int) -> None:
    caplog.set_level(logging.INFO)
    behaviour = VoiceApiBehaviour(
        envelope=envelope, wav_header=wav_header, tts_sample_rate=tts_rate, reply_ms=1000, tts_chunk_ms=200
    )
    async with voice_api(behaviour) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        params = {"From": "+15550001111", "To": "+15550002222"}
        async with TwilioCaller(bridge.stream_url, custom_parameters=params, continuous=True) as caller:
            session = await standin.wait_for_session()
            await caller.say(tone_ulaw(600))
            # The reply has fully played once its last mark comes back as played.
            await caller.wait_for(lambda: caller.received_total >= 8000 and not caller_pending(caller), 15)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
        await asyncio.wait_for(session.closed.wait(), 10)

    # Upstream: session settings first, then 24 kHz PCM in 100 ms binary chunks, lasting
    # as long as what the caller sent (silence frames included).
    assert session.query["api_key"] == API_KEY and session.query["config_id"] == CONFIG_ID
    assert session.settings is not None
    assert session.audio_before_settings == 0
    assert set(session.audio_frames[:-1]) == {4800}
    sent_ms = call.stats.frames_in * 20
    assert abs(len(session.audio) / 48 - sent_ms) <= 100
    assert session.close_code == 1000

    # Downstream: 1000 ms of the 440 Hz reply as whole mu-law frames, each chunk marked.
    assert caller.violations == []
    assert 8000 <= caller.received_total <= 8000 + 2 * 160
    assert abs(dominant_hz(caller.received) - 440) < 10
    assert len(caller.marks_played) >= 5 and caller.marks_flushed == []
    [reply] = call.playback.responses
    assert reply.heard_ms == reply.sent_ms >= 1000 and not reply.interrupted
    assert (call.caller, call.called, call.custom_parameters) == ("+15550001111", "+15550002222", {})
    assert call.outcome == "stream_stopped"
    assert any(line.role == "user" for line in call.transcript)
    assert any(line.role == "assistant" for line in call.transcript)
    assert API_KEY not in caplog.text


def caller_pending(caller: TwilioCaller) -> bool:
    return caller.received_total > len(caller.received)


def all_played(caller: TwilioCaller) -> bool:
    """The last mark the bridge sent has come back as played."""
    return bool(caller.marks_received) and caller.marks_received[-1] in caller.marks_played


async def started_reply(standin: NextEviStandIn, caller: TwilioCaller) -> Session:
    session = await standin.wait_for_session()
    await caller.say(tone_ulaw(500))
    await caller.wait_for(lambda: len(caller.received) >= 1600, 15)  # 200 ms of the reply heard
    return session


async def test_barge_in_clears_and_drops_the_rest_of_the_reply(make_bridge) -> None:
    behaviour = VoiceApiBehaviour(reply_ms=4000, tts_chunk_ms=200, pace=False, interrupt_on_speech=False)
    async with voice_api(behaviour) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            session = await started_reply(standin, caller)
            await standin.interrupt(session)
            # A chunk of the interrupted reply still in flight: the caller must never hear it.
            await standin.send_raw(session, tts_message(sine(200, 1500)))
            await caller.wait_for(lambda: caller.clears == 1, 10)
            heard_before_clear = len(caller.received)
            # The next turn's reply plays normally.
            await standin.send_raw(
                session, json.dumps({"type": "transcription", "data": {"transcript": "hi", "is_final": True}})
            )
            await standin.send_raw(session, tts_message(sine(400, 700)))
            await caller.wait_for(
                lambda: len(caller.received) >= heard_before_clear + 3200 and all_played(caller), 10
            )
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)

    after_clear = caller.received[heard_before_clear:]
    assert caller.violations == []
    assert level_at(after_clear, 1500) < 0.001  # no stale audio
    assert abs(dominant_hz(after_clear) - 700) < 10
    assert caller.marks_flushed  # the 4 s reply was queued at Twilio when the clear came
    first, second = call.playback.responses
    assert first.interrupted and first.heard_ms < first.sent_ms
    assert not second.interrupted and second.heard_ms == second.sent_ms
    assert call.stats.barge_ins == 1


async def test_stand_in_interrupts_when_the_caller_talks_over_the_reply(make_bridge) -> None:
    behaviour = VoiceApiBehaviour(reply_ms=3000, tts_chunk_ms=200, pace=True)
    async with voice_api(behaviour) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            session = await started_reply(standin, caller)
            await caller.say(tone_ulaw(400))
            await caller.wait_for(lambda: caller.clears >= 1, 10)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert session.replies_interrupted >= 1
    assert call.playback.responses[0].interrupted
    assert caller.violations == []


async def test_caller_hangs_up_mid_response(make_bridge) -> None:
    behaviour = VoiceApiBehaviour(reply_ms=5000, tts_chunk_ms=200, pace=True)
    async with voice_api(behaviour) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            session = await started_reply(standin, caller)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
        await asyncio.wait_for(session.closed.wait(), 10)
    assert session.close_code == 1000
    assert call.outcome == "stream_stopped"


async def test_caller_socket_drops_without_stop(make_bridge) -> None:
    async with voice_api() as standin:
        bridge = make_bridge(nextevi_settings(standin))
        caller = TwilioCaller(bridge.stream_url)
        await caller.connect()
        session = await standin.wait_for_session()
        await caller.silence(200)
        await caller.close()
        [call] = await bridge.wait_for_calls(1)
        await asyncio.wait_for(session.closed.wait(), 10)
    assert session.close_code == 1000
    assert call.outcome == "caller_hung_up"


@pytest.mark.parametrize(("code", "outcome"), [(1000, "voice_api_ended"), (4003, "voice_api_failed")])
async def test_upstream_closing_mid_call_ends_the_call(make_bridge, caplog, code: int, outcome: str) -> None:
    caplog.set_level(logging.INFO)
    async with voice_api() as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            session = await standin.wait_for_session()
            await standin.close_session(session, code=code, reason="test")
            await caller.wait_closed(10)
        [call] = await bridge.wait_for_calls(1)
    assert call.outcome == outcome
    assert caller.close_code == 1000
    if code != 1000:
        assert f"code {code}" in caplog.text and call.call_sid in caplog.text


async def test_unreachable_voice_api_ends_the_call_cleanly(make_bridge, caplog) -> None:
    settings = Settings(
        provider="nextevi",
        voice=NextEviSettings(url="ws://127.0.0.1:9/ws/voice", api_key=API_KEY, config_id="c"),
        reconnect_budget_s=0.5,
    )
    bridge = make_bridge(settings)
    async with TwilioCaller(bridge.stream_url) as caller:
        await caller.wait_closed(15)
    [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "voice_api_unreachable"
    assert API_KEY not in caplog.text


async def test_wrong_api_key_is_logged_with_its_close_code(make_bridge, caplog) -> None:
    async with voice_api() as standin:
        settings = nextevi_settings(standin)
        bridge = make_bridge(replace(settings, voice=replace(settings.voice, api_key="oak_wrong")))
        async with TwilioCaller(bridge.stream_url) as caller:
            await caller.wait_closed(10)
        [call] = await bridge.wait_for_calls(1)
    assert (call.outcome, call.keeper.close_code) == ("voice_api_failed", 4001)
    assert "oak_wrong" not in caplog.text


async def test_bad_tts_chunk_is_skipped_and_the_call_goes_on(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with voice_api(VoiceApiBehaviour(interrupt_on_speech=False)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            session = await standin.wait_for_session()
            await standin.send_raw(session, json.dumps({"type": "tts_chunk", "content": "not base64!"}))
            await standin.send_raw(session, "this is not json")
            await standin.send_raw(session, tts_message(sine(200, 700)))
            await caller.wait_for(lambda: len(caller.received) >= 1600, 10)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert call.stats.skipped_upstream == 2
    assert caplog.text.count("skipped a voice API message") == 2
    assert call.call_sid in caplog.text


async def test_echo_provider_plays_the_utterance_back(echo_bridge) -> None:
    async with TwilioCaller(echo_bridge.stream_url, continuous=True) as caller:
        await caller.say(tone_ulaw(700, hz=600))
        await caller.wait_for(lambda: len(caller.received) >= 8 * 700, 15)
        await caller.dtmf("5")
        await caller.hang_up()
    [call] = await echo_bridge.wait_for_calls(1)
    assert caller.violations == []
    assert abs(dominant_hz(caller.received) - 600) < 10
    assert [(line.role, line.text) for line in call.transcript if line.role == "dtmf"] == [("dtmf", "5")]


async def test_echo_provider_barge_in(echo_bridge) -> None:
    async with TwilioCaller(echo_bridge.stream_url, continuous=True) as caller:
        await caller.say(tone_ulaw(3000, hz=600))
        await caller.wait_for(lambda: len(caller.received) >= 1600, 15)
        await caller.say(tone_ulaw(400, hz=900))
        await caller.wait_for(lambda: caller.clears == 1, 10)
        await caller.hang_up()
    [call] = await echo_bridge.wait_for_calls(1)
    assert call.playback.responses[0].interrupted
    assert caller.violations == []


async def test_no_task_outlives_its_call(make_bridge) -> None:
    async with voice_api(VoiceApiBehaviour(reply_ms=3000, pace=True)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        for _ in range(3):
            async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
                await caller.say(tone_ulaw(400))
                await caller.wait_for(lambda: len(caller.received) >= 800, 15)
                await caller.hang_up()
        await bridge.wait_for_calls(3)

        # The handler that reported the last call may still be unwinding; wait for it.
        async def leftovers() -> list[str]:
            names = await bridge.server_tasks()
            return [n for n in names if n in ("from-twilio", "from-voice-api", "nextevi-keep-alive")]

        async def none_left() -> bool:
            return not await leftovers()

        await eventually(none_left, 10, "call tasks finished")
        await eventually(lambda: all(s.closed.is_set() for s in standin.sessions), 10, "sessions closed")
        assert [s.close_code for s in standin.sessions] == [1000, 1000, 1000]


async def test_idle_session_sends_keep_alive() -> None:
    from ivr_bridge.providers.nextevi import NextEviSession

    async with voice_api() as standin:
        settings = nextevi_settings(standin)
        session = NextEviSession(settings, keep_alive_after=0.1)
        await session.connect()
        try:
            remote = await standin.wait_for_session()
            await eventually(lambda: any(m.get("type") == "keep_alive" for m in remote.text_messages))
            kinds = [m.get("type") for m in remote.text_messages]
            assert kinds[0] == "session_settings" and "keep_alive" in kinds
            # Audio resets the idle clock: none is due right after sending some.
            await session.send_audio(b"\x00\x00" * 2400)
        finally:
            await session.close()
        await asyncio.wait_for(remote.closed.wait(), 10)
        assert remote.close_code == 1000


def load_wav(name: str) -> np.ndarray:
    with wave.open(str(EXAMPLES / name)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


async def test_echo_round_trip_keeps_speech_intact(echo_bridge) -> None:
    """Real speech through both directions of the bridge: little delay, no damage."""
    sent = ulaw_encode(load_wav("hello.wav"))
    async with TwilioCaller(echo_bridge.stream_url, continuous=True) as caller:
        await caller.say(sent)
        # The echo trims the recording's leading and trailing silence.
        await caller.wait_for(lambda: len(caller.received) >= 0.8 * len(sent) and all_played(caller), 30)
        await caller.hang_up()
    delay, snr = aligned_snr_db(ulaw_decode(sent), ulaw_decode(bytes(caller.received)))
    # The echo starts its reply on a 20 ms frame boundary, so the path's own delay is the
    # remainder. Two G.711 quantisations bound the SNR near 38 dB; the filters add ~0.
    path_delay_ms = (delay % 160) / 8
    assert path_delay_ms <= 8.0
    assert snr >= 33.0  # measured 37.8; clicks at chunk boundaries measured 9.9


async def test_unsupported_media_format_ends_the_stream_with_one_line(echo_bridge, caplog) -> None:
    from websockets.asyncio.client import connect

    async with connect(echo_bridge.stream_url) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        start = {
            "accountSid": "AC1",
            "streamSid": "MZ1",
            "callSid": "CA1",
            "tracks": ["inbound"],
            "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1},
        }
        await ws.send(
            json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1", "start": start})
        )
        await asyncio.wait_for(ws.wait_closed(), 10)
    [call] = await echo_bridge.wait_for_calls(1)
    assert call.outcome == "unusable_start"
    assert len([r for r in caplog.records if "mediaFormat" in r.getMessage()]) == 1


async def test_reply_resumes_after_a_pause_that_flushed_its_tail(make_bridge) -> None:
    """A reply whose next chunk comes late (a slow TTS, a loaded network) keeps playing."""
    async with voice_api(VoiceApiBehaviour(interrupt_on_speech=False)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            session = await standin.wait_for_session()
            await standin.send_raw(session, tts_message(sine(200, 700)))
            # The pause outlasts the tail deadline: the bridge flushes the converter's tail.
            await caller.wait_for(lambda: caller.received_total > 1600, 10)
            flushed = caller.received_total
            await standin.send_raw(session, tts_message(sine(200, 700)))  # same reply, no new turn
            await caller.wait_for(lambda: caller.received_total >= flushed + 1600, 10)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert caller.violations == []
    [reply] = call.playback.responses
    assert reply.sent_ms >= 400
