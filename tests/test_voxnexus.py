"""VoxNexus: the STT and TTS protocol classes in memory (messages built, every server
message parsed, malformed input survived), and the clients over loopback sockets against
the stand-in (rate negotiation, partials and finals, flush, refused keys, TTS by sentence,
WAV header modes, a cut reply's socket)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from base64 import b64decode, b64encode
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from ivr_bridge.audio import Pcm, wav_bytes
from ivr_bridge.cascade import voxnexus
from ivr_bridge.cascade.engines import Heard
from ivr_bridge.cascade.voxnexus import (
    Accepted,
    FlushDone,
    ServerError,
    SpeechChunk,
    SttProtocol,
    TtsProtocol,
    VoxNexusSettings,
    VoxNexusSpeechToText,
    VoxNexusTextToSpeech,
    _with_token,
)
from ivr_bridge.standins import nextevi
from ivr_bridge.standins.voxnexus import (
    VoxNexusBehaviour,
    VoxNexusStandIn,
    add_arguments,
    behaviour_from,
)

KEY = "vn-test-key"
WAIT = 15.0  # generous: a loaded machine is not a failure


def tone(ms: int, rate: int = 8000, hz: float = 500.0, amplitude: int = 8000) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def silence(ms: int, rate: int = 8000) -> bytes:
    return bytes(2 * (rate * ms // 1000))


def pieces(pcm: bytes, rate: int = 8000, ms: int = 20) -> list[bytes]:
    size = 2 * rate * ms // 1000
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


def message(**fields: Any) -> str:
    return json.dumps(fields)


def settings_for(standin: VoxNexusStandIn, **more: str) -> VoxNexusSettings:
    base = {"api_key": KEY, "stt_url": standin.stt_url, "tts_url": standin.tts_url}
    return VoxNexusSettings(**(base | more))


@pytest.fixture
async def make_standin() -> AsyncIterator[Callable[..., Any]]:
    started: list[VoxNexusStandIn] = []

    async def make(**behaviour: Any) -> VoxNexusStandIn:
        standin = VoxNexusStandIn(VoxNexusBehaviour(**behaviour))
        await standin.start()
        started.append(standin)
        return standin

    yield make
    for standin in started:
        await standin.stop()


async def speak(stt: VoxNexusSpeechToText, pcm: bytes) -> None:
    for piece in pieces(pcm, stt.rate):
        await stt.send(piece)


async def heard_until(stt: VoxNexusSpeechToText, done: Callable[[list[Heard]], bool]) -> list[Heard]:
    heard: list[Heard] = []
    async with asyncio.timeout(WAIT):
        while not done(heard):
            heard.append(await stt.receive())
    return heard


async def all_audio(synthesis: Any) -> list[Pcm]:
    chunks: list[Pcm] = []
    async with asyncio.timeout(WAIT):
        while (chunk := await synthesis.audio()) is not None:
            chunks.append(chunk)
    return chunks


def joined(chunks: list[Pcm]) -> np.ndarray:
    return np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.int16)


# -- the protocol classes, in memory -------------------------------------------------------


def test_stt_messages_built() -> None:
    protocol = SttProtocol("en-GB", 8000)
    init = json.loads(protocol.init_message())
    assert init == {
        "type": "init",
        "language": "en-GB",
        "format": "pcm",
        "sample_rate": 8000,
        "enable_timestamps": False,
        "enable_language_detection": False,
    }
    assert json.loads(protocol.init_message(16000))["sample_rate"] == 16000 == protocol.sample_rate
    audio = json.loads(SttProtocol.audio_message(b"\x01\x02\x03\x04"))
    assert audio["type"] == "audio" and b64decode(audio["data"]) == b"\x01\x02\x03\x04"
    assert json.loads(protocol.flush_message()) == {"type": "command", "command": "flush"}
    assert protocol.flushing == 1
    assert json.loads(SttProtocol.ping_message()) == {"type": "ping"}


def test_stt_server_messages_parsed() -> None:
    protocol = SttProtocol("en-US", 8000)
    ready = message(type="ready", request_id="req_1", language="en-US", format="pcm", sample_rate=16000)
    assert protocol.receive(ready) == [Accepted("pcm", 16000, "req_1", "en-US")]
    assert protocol.rate == 16000  # the acknowledged rate, not the one asked
    partial = message(type="transcript", text="I would ", is_final=False, confidence=0.1)
    assert protocol.receive(partial) == [Heard("I would", False)]  # confidence only on finals
    assert protocol.receive(message(type="transcript", text="  ", is_final=False)) == []
    final = message(
        type="transcript",
        request_id="req_1",
        text="I would like support.",
        is_final=True,
        confidence=0.95,
        words=[{"word": "i", "offset": 0, "duration": 100, "confidence": 0.9}],
    )
    assert protocol.receive(final) == [Heard("I would like support.", True, 0.95, last=False)]
    # A flush answered after a final: the turn is whole at flush_done, which says so with an
    # empty last final (the cascade gathers every final before it).
    protocol.flush_message()
    assert protocol.flushing == 1
    assert protocol.receive(final) == [Heard("I would like support.", True, 0.95, last=False)]
    assert protocol.receive(message(type="flush_done", request_id="req_1")) == [
        Heard("", True, last=True),
        FlushDone("req_1"),
    ]
    # A flush with nothing pending: the same, so the cascade is never left waiting.
    protocol.flush_message()
    assert protocol.receive(message(type="flush_done")) == [Heard("", True), FlushDone("")]
    assert protocol.flushing == 0
    no_confidence = message(type="transcript", text="Yes.", is_final=True, confidence="high")
    assert protocol.receive(no_confidence) == [Heard("Yes.", True, None, last=False)]
    error = message(type="error", error="Invalid audio format", code="UNSUPPORTED_FORMAT", request_id="r")
    assert protocol.receive(error) == [ServerError("UNSUPPORTED_FORMAT", "Invalid audio format", "r")]


def test_stt_malformed_and_unknown_messages_are_counted_never_raised() -> None:
    protocol = SttProtocol()
    for raw in (
        b"\x00binary",
        "not json {",
        "[1, 2]",
        '"text"',
        message(type="transcript", is_final=True),  # no text
        message(type="transcript", text=["a"], is_final=True),
        message(type="llm", text="post-processed"),  # a type seen in a third-party client
        message(type="pong"),
        "[" * 100_000,  # deep nesting
    ):
        assert protocol.receive(raw) == []
    assert protocol.skipped == {
        "binary": 1,
        "not_json": 2,
        "not_object": 2,
        "missing_field": 2,
        "unknown_type": 2,
    }
    bad_rate = message(type="ready", format="pcm", sample_rate="fast")
    assert protocol.receive(bad_rate) == [Accepted("pcm", 8000)]  # the rate asked


def test_tts_messages_built() -> None:
    protocol = TtsProtocol("vl-aria", "en-US", 8000)
    assert json.loads(protocol.init_message()) == {
        "type": "init",
        "voice_id": "vl-aria",
        "language": "en-US",
        "format": "wav",
        "sample_rate": 8000,
    }
    assert "voice_id" not in json.loads(TtsProtocol("", "en-US").init_message())  # the default voice
    assert json.loads(TtsProtocol.text_message("Hello there.")) == {
        "type": "text",
        "text": "Hello there.",
        "is_final": False,
    }
    assert json.loads(TtsProtocol.text_message("", True)) == {"type": "text", "text": "", "is_final": True}


def test_tts_audio_chunks_with_and_without_headers() -> None:
    protocol = TtsProtocol(sample_rate=8000)
    protocol.receive(message(type="ready", request_id="r", format="wav", sample_rate=16000))
    samples = np.arange(-40, 40, dtype=np.int16) * 100
    wav = b64encode(wav_bytes(samples, 22050)).decode()
    [chunk] = protocol.receive(message(type="audio", data=wav, is_final=False))
    assert isinstance(chunk, SpeechChunk) and chunk.pcm is not None and not chunk.final
    assert chunk.pcm.sample_rate == 22050 and np.array_equal(chunk.pcm.samples, samples)  # its own header
    raw = samples.astype("<i2").tobytes()
    # Raw PCM at ready's rate; an odd byte is carried into the next chunk.
    [first] = protocol.receive(message(type="audio", data=b64encode(raw[:41]).decode(), is_final=False))
    [second] = protocol.receive(message(type="audio", data=b64encode(raw[41:]).decode(), is_final=True))
    assert isinstance(first, SpeechChunk) and isinstance(second, SpeechChunk) and second.final
    assert first.pcm is not None and second.pcm is not None and first.pcm.sample_rate == 16000
    assert np.array_equal(np.concatenate([first.pcm.samples, second.pcm.samples]), samples)
    # A final without audio still ends the reply; one without anything usable too.
    assert protocol.receive(message(type="audio", data="", is_final=True)) == [SpeechChunk(None, True)]
    [bad_final] = protocol.receive(message(type="audio", data="%%%", is_final=True))
    assert isinstance(bad_final, SpeechChunk) and bad_final.pcm is None and bad_final.final
    error = message(type="error", error="Invalid voice_id", code="VOICE_NOT_FOUND", request_id="r")
    assert protocol.receive(error) == [ServerError("VOICE_NOT_FOUND", "Invalid voice_id", "r")]


def test_tts_malformed_messages_are_counted_never_raised() -> None:
    protocol = TtsProtocol()
    broken_wav = b64encode(b"RIFF\x00\x00\x00\x00WAVEfmt \x02\x00\x00\x00").decode()
    for raw in (
        b"\x00\x01",
        "{",
        "null",
        message(type="audio", data="%%%", is_final=False),
        message(type="audio", data=broken_wav, is_final=False),
        message(type="audio", data=42, is_final=False),
        message(type="audio", is_final=False),  # nothing at all: quietly nothing
        message(type="cancelled"),
    ):
        assert protocol.receive(raw) == []
    assert protocol.skipped == {
        "binary": 1,
        "not_json": 1,
        "not_object": 1,
        "bad_base64": 1,
        "bad_wav": 1,
        "missing_field": 1,
        "unknown_type": 1,
    }


def test_the_key_goes_in_the_query_and_replaces_any_there() -> None:
    url = _with_token("wss://api.voxnexus.ai/v1/stt/realtime?region=eu&token=old", "k/ey+1")
    assert url == "wss://api.voxnexus.ai/v1/stt/realtime?region=eu&token=k%2Fey%2B1"


def test_settings_defaults_and_secrecy() -> None:
    s = VoxNexusSettings(api_key="vn-secret")
    assert s.stt_url == "wss://api.voxnexus.ai/v1/stt/realtime"
    assert s.tts_url == "wss://api.voxnexus.ai/v1/tts/realtime"
    assert s.language == "en-US" and s.voice_id == ""
    assert "vn-secret" not in repr(s)


# -- speech-to-text over loopback ------------------------------------------------------------


async def test_stt_asks_the_phone_rate_and_takes_it(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin()
    stt = VoxNexusSpeechToText(settings_for(standin))
    await stt.start()
    try:
        assert stt.rate == 8000
        [socket] = standin.stt_sockets
        [init] = socket.inits
        assert init["format"] == "pcm" and init["sample_rate"] == 8000 and init["language"] == "en-US"
    finally:
        await stt.close()
    await standin.wait_for(lambda: standin.stt_sockets[0].closed, WAIT)


async def test_stt_falls_back_to_16k_when_8k_is_refused(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin(stt_rates=(16000,))
    stt = VoxNexusSpeechToText(settings_for(standin))
    await stt.start()
    try:
        assert stt.rate == 16000
        refused, accepted = standin.stt_sockets
        assert [i["sample_rate"] for i in refused.inits] == [8000]
        assert [i["sample_rate"] for i in accepted.inits] == [16000]
        assert refused.sent[0]["code"] == "UNSUPPORTED_FORMAT"
        await stt.start()  # a reconnect asks what worked
        assert [i["sample_rate"] for i in standin.stt_sockets[2].inits] == [16000]
    finally:
        await stt.close()


async def test_stt_takes_the_rate_ready_announces(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin(stt_ready_rate=16000)
    stt = VoxNexusSpeechToText(settings_for(standin))
    await stt.start()
    try:
        assert stt.rate == 16000 and len(standin.stt_sockets) == 1
    finally:
        await stt.close()


async def test_stt_partials_then_finals_per_utterance(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin(transcripts=["I would like support.", "Yes. Thank you."])
    stt = VoxNexusSpeechToText(settings_for(standin))
    await stt.start()
    try:
        await speak(stt, tone(1000) + silence(700))
        heard = await heard_until(stt, lambda h: bool(h) and h[-1].final)
        *partials, final = heard
        assert final == Heard("I would like support.", True, 0.93, last=False)  # no flush yet
        assert len(partials) >= 2 and all(not p.final for p in partials)
        assert [p.text for p in partials][:3] == ["I", "I would", "I would like"]  # growing
        # The next utterance: one final per sentence.
        await speak(stt, tone(600) + silence(700))
        heard = await heard_until(stt, lambda h: [x.text for x in h if x.final] == ["Yes.", "Thank you."])
        [socket] = standin.stt_sockets
        [first, *_] = socket.transcripts(final=True)
        assert first["offset"] == 0 and first["duration"] > 0 and first["words"][0]["word"] == "i"
        # Caller audio went up in ~100 ms messages, not 20 ms ones.
        assert socket.audio_messages <= socket.audio_bytes // 1600 + 1
    finally:
        await stt.close()


async def test_stt_flush_gives_a_final_and_flush_done(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin(transcripts=["Agent please."])
    stt = VoxNexusSpeechToText(settings_for(standin))
    await stt.start()
    try:
        await speak(stt, tone(250))  # still speaking, partly in the batch, when the turn ends
        await stt.flush()
        heard = await heard_until(stt, lambda h: bool(h) and h[-1].last)
        # The flush's final, then flush_done's empty last one: the turn is whole.
        assert [h for h in heard if h.final] == [
            Heard("Agent please.", True, 0.93, last=False),
            Heard("", True),
        ]
        [socket] = standin.stt_sockets
        assert socket.sent[-1]["type"] == "flush_done"
        assert socket.audio_bytes == len(tone(250))  # the batch went before the flush
        # Nothing pending: flush_done alone, and with it the empty last final.
        await stt.flush()
        assert await asyncio.wait_for(stt.receive(), WAIT) == Heard("", True)
        assert socket.flushes == 2
    finally:
        await stt.close()


async def test_stt_keepalive_pings(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin()
    stt = VoxNexusSpeechToText(settings_for(standin), ping_interval=0.05)
    await stt.start()
    try:
        await standin.wait_for(lambda: standin.stt_sockets[0].pings >= 2, WAIT)
    finally:
        await stt.close()


async def test_stt_drop_raises_from_receive_and_start_reconnects(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin()
    stt = VoxNexusSpeechToText(settings_for(standin))
    await stt.start()
    try:
        await standin.close_sessions(1011, "internal error")
        with pytest.raises(ConnectionError, match="1011"):
            await asyncio.wait_for(stt.receive(), WAIT)
        await stt.send(tone(100))  # quietly dropped, not raised
        await stt.start()
        assert len(standin.stt_sockets) == 2
        await speak(stt, tone(600) + silence(700))
        heard = await heard_until(stt, lambda h: bool(h) and h[-1].final)
        assert heard[-1].text == "I would like support."
    finally:
        await stt.close()


@pytest.mark.parametrize("failure", ["http", "error"])
async def test_a_bad_key_is_refused_without_showing_it(
    make_standin: Callable[..., Any], failure: str
) -> None:
    standin: VoxNexusStandIn = await make_standin(auth_failure=failure)
    secret = "vn-wrong-key-0123456789"
    settings = settings_for(standin, api_key=secret)
    with pytest.raises(ConnectionError) as stt_error:
        await VoxNexusSpeechToText(settings).start()
    tts = VoxNexusTextToSpeech(settings)
    with pytest.raises(ConnectionError) as tts_error:
        await tts.start()
    for error in (stt_error.value, tts_error.value):
        assert secret not in str(error) and "token" not in str(error)
        assert ("401" if failure == "http" else "UNAUTHORIZED") in str(error)
    assert standin.refused == 2


async def test_the_standin_takes_each_documented_credential(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin()
    init = json.dumps({"type": "init", "format": "pcm", "sample_rate": 8000})
    for url, headers in (
        (f"{standin.stt_url}?token={KEY}", None),
        (standin.stt_url, {"X-Api-Key": KEY}),
        (standin.stt_url, {"Authorization": f"Bearer {KEY}"}),
    ):
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send(init)
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["type"] == "ready"
    # Anything before init: an error, then the socket is closed.
    async with websockets.connect(f"{standin.tts_url}?token={KEY}") as ws:
        await ws.send(json.dumps({"type": "text", "text": "Hi.", "is_final": True}))
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["code"] == "NOT_INITIALIZED"
        await asyncio.wait_for(ws.wait_closed(), WAIT)


# -- text-to-speech over loopback ------------------------------------------------------------


async def test_tts_reply_streams_by_sentence(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin()
    tts = VoxNexusTextToSpeech(settings_for(standin, voice_id="vl-aria"))
    await tts.start()  # checks the key and voice; its socket speaks the first reply
    try:
        synthesis = await tts.open()
        await synthesis.add("Hello there.")
        first = await asyncio.wait_for(synthesis.audio(), WAIT)  # before end(): streamed
        assert first is not None and first.sample_rate == 8000 == tts.rate
        await synthesis.add("How can I help?")
        await synthesis.end()
        rest = await all_audio(synthesis)
        assert await synthesis.audio() is None  # and stays done
        [socket] = standin.tts_sockets
        assert socket.texts == ["Hello there.", "How can I help?", ""] and socket.finals == 1
        assert socket.spoken == ["Hello there.", "How can I help?"]
        assert socket.inits[0]["voice_id"] == "vl-aria" and socket.inits[0]["sample_rate"] == 8000
        samples = joined([first, *rest])
        assert samples.size == 8 * 60 * (len("Hello there.") + len("How can I help?"))
        assert np.array_equal(samples, np.frombuffer(bytes(socket.audio), "<i2"))
        await standin.wait_for(lambda: socket.closed, WAIT)  # one socket per reply, closed after
        second = await tts.open()
        await second.add("Bye.")
        await second.end()
        assert joined(await all_audio(second)).size == 8 * 60 * 4
        assert len(standin.tts_sockets) == 2
    finally:
        await tts.close()


async def test_tts_wav_header_modes_decode_to_the_same_samples(make_standin: Callable[..., Any]) -> None:
    decoded: dict[str, np.ndarray] = {}
    for mode in ("every", "first", "none"):
        standin: VoxNexusStandIn = await make_standin(wav_header=mode, speedup=0.0)
        tts = VoxNexusTextToSpeech(settings_for(standin))
        try:
            synthesis = await tts.open()
            await synthesis.add("One sentence.")
            await synthesis.add("And another one!")
            await synthesis.end()
            chunks = await all_audio(synthesis)
        finally:
            await tts.close()
        assert {c.sample_rate for c in chunks} == {8000}
        decoded[mode] = joined(chunks)
        assert np.array_equal(decoded[mode], np.frombuffer(bytes(standin.tts_sockets[0].audio), "<i2"))
    assert decoded["every"].size > 0
    assert np.array_equal(decoded["every"], decoded["first"])
    assert np.array_equal(decoded["every"], decoded["none"])


async def test_a_cancelled_synthesis_closes_its_socket_and_a_new_one_gets_only_its_audio(
    make_standin: Callable[..., Any],
) -> None:
    # Slow enough that the stand-in is still sending when the reply is cut.
    standin: VoxNexusStandIn = await make_standin(speedup=1.0, tone_hz=440.0)
    tts = VoxNexusTextToSpeech(settings_for(standin))
    try:
        cut = await tts.open()
        await cut.add("This is a long reply that the caller will talk over before it ends.")
        await cut.end()
        assert await asyncio.wait_for(cut.audio(), WAIT) is not None
        [cut_socket] = standin.tts_sockets
        await standin.wait_for(lambda: cut_socket.chunks >= 3, WAIT)  # more is on its way
        await cut.cancel()
        assert await asyncio.wait_for(cut.audio(), WAIT) is None
        await standin.wait_for(lambda: cut_socket.closed, WAIT)
        assert not cut_socket.final_sent  # it was cut, not finished
        assert cut_socket.unknown == []  # no cancel message: VoxNexus has none
        assert await cut.audio() is None
        await cut.add("More text is ignored.")
        assert cut_socket.texts[-1] == ""
        fresh = await tts.open()
        await fresh.add("Yes.")
        await fresh.end()
        chunks = await all_audio(fresh)
        fresh_socket = standin.tts_sockets[1]
        assert np.array_equal(joined(chunks), np.frombuffer(bytes(fresh_socket.audio), "<i2"))
        assert joined(chunks).size == 8 * 60 * len("Yes.")
    finally:
        await tts.close()


async def test_tts_falls_back_to_16k_and_remembers(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin(tts_rates=(16000,), speedup=0.0)
    tts = VoxNexusTextToSpeech(settings_for(standin))
    try:
        for _ in range(2):
            synthesis = await tts.open()
            await synthesis.add("Hi.")
            await synthesis.end()
            chunks = await all_audio(synthesis)
            assert {c.sample_rate for c in chunks} == {16000}
        assert tts.rate == 16000
        assert [s.inits[0]["sample_rate"] for s in standin.tts_sockets] == [8000, 16000, 16000]
    finally:
        await tts.close()


async def test_tts_start_refuses_an_unknown_voice(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin(voices=("vl-aria",))
    tts = VoxNexusTextToSpeech(settings_for(standin, voice_id="vl-nobody"))
    with pytest.raises(ConnectionError, match="VOICE_NOT_FOUND"):
        await tts.start()
    await tts.close()
    failing = VoxNexusTextToSpeech(settings_for(standin, voice_id="vl-nobody"))
    synthesis = await failing.open()  # open() does not wait: audio() reports the failure
    await synthesis.add("Hello.")
    with pytest.raises(ConnectionError, match="VOICE_NOT_FOUND"):
        await asyncio.wait_for(synthesis.audio(), WAIT)
    await failing.close()


async def test_a_reply_without_text_ends_at_once(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin()
    tts = VoxNexusTextToSpeech(settings_for(standin))
    try:
        synthesis = await tts.open()
        await synthesis.add("   ")
        await synthesis.end()
        assert await asyncio.wait_for(synthesis.audio(), WAIT) is None
        await standin.wait_for(lambda: all(s.closed for s in standin.tts_sockets), WAIT)
        assert all(s.texts == [] for s in standin.tts_sockets)
    finally:
        await tts.close()


async def test_the_final_text_after_everything_was_spoken(make_standin: Callable[..., Any]) -> None:
    standin: VoxNexusStandIn = await make_standin(speedup=0.0)
    tts = VoxNexusTextToSpeech(settings_for(standin))
    try:
        synthesis = await tts.open()
        await synthesis.add("Done.")
        [socket] = standin.tts_sockets
        await standin.wait_for(lambda: socket.spoken == ["Done."] and socket.chunks >= 3, WAIT)
        await synthesis.end()  # the stand-in answers with an empty final audio
        assert joined(await all_audio(synthesis)).size == 8 * 60 * len("Done.")
        assert socket.final_sent
    finally:
        await tts.close()


@contextlib.asynccontextmanager
async def scripted_tts(
    on_text: Callable[[ServerConnection, dict[str, Any]], Awaitable[None]],
) -> AsyncIterator[VoxNexusSettings]:
    """A TTS socket whose answers to `text` a test writes (`ready` to any init)."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in ws:
                got = json.loads(raw)
                if got["type"] == "init":
                    await ws.send(message(type="ready", request_id="r", format="wav", sample_rate=8000))
                elif got["type"] == "text":
                    await on_text(ws, got)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield VoxNexusSettings(api_key=KEY, tts_url=f"ws://127.0.0.1:{port}/v1/tts/realtime")


async def test_tts_failures_mid_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    chunk = b64encode(tone(100)).decode()

    async def stall(ws: ServerConnection, text: dict[str, Any]) -> None:
        if text["text"]:
            await ws.send(message(type="audio", data=chunk, is_final=False))  # then nothing

    async def crash(ws: ServerConnection, text: dict[str, Any]) -> None:
        await ws.send(message(type="audio", data=chunk, is_final=False))
        await ws.close(1011, "internal error")

    async def refuse_the_empty_closing_text(ws: ServerConnection, text: dict[str, Any]) -> None:
        if text["text"]:
            await ws.send(message(type="audio", data=chunk, is_final=False))
        else:
            await ws.send(message(type="error", error="text is required", code="INVALID_TEXT"))

    monkeypatch.setattr(voxnexus, "AUDIO_IDLE_S", 0.2)
    for on_text, expected in (
        (stall, "no audio"),
        (crash, "1011"),
        (refuse_the_empty_closing_text, None),  # the reply just ends (logged)
    ):
        async with scripted_tts(on_text) as settings:
            tts = VoxNexusTextToSpeech(settings)
            synthesis = await tts.open()
            await synthesis.add("Hello.")
            assert await asyncio.wait_for(synthesis.audio(), WAIT) is not None
            await synthesis.end()
            if expected is None:
                assert await asyncio.wait_for(synthesis.audio(), WAIT) is None
            else:
                with pytest.raises(ConnectionError, match=expected):
                    await asyncio.wait_for(synthesis.audio(), WAIT)
            await tts.close()


# -- command line ------------------------------------------------------------------------------


def test_run_takes_the_stub_voice_api_options_and_its_own() -> None:
    shared = argparse.ArgumentParser()
    nextevi.add_arguments(shared)  # what `ivr-bridge stub-voice-api` defines
    behaviour = behaviour_from(shared.parse_args(["--api-key", "vn-k", "--raw-pcm", "--no-pace"]))
    assert behaviour.api_key == "vn-k" and behaviour.wav_header == "none" and behaviour.speedup == 0
    own = argparse.ArgumentParser()
    add_arguments(own)
    args = own.parse_args(["--wav-header", "first", "--transcript", "Yes.", "--transcript", "No."])
    behaviour = behaviour_from(args)
    assert behaviour.wav_header == "first" and behaviour.transcripts == ["Yes.", "No."]
    assert behaviour.api_key == VoxNexusBehaviour().api_key
