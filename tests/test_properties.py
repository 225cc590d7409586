"""Property-based tests: generated garbage mixed with valid input never breaks the sans-I/O
classes, never loses valid caller audio and never makes them build an invalid Twilio frame."""

from __future__ import annotations

import contextlib
import json
import struct
from base64 import b64decode, b64encode

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivr_bridge.audio import BotAudio, CallerAudio, Pcm, WavError, decode_tts_audio
from ivr_bridge.audio.wav import parse_wav
from ivr_bridge.media_stream import BAD_FRAME_KINDS, MediaReceived, MediaStream, MediaStreamError
from ivr_bridge.metrics import BAD_INPUT_KINDS
from ivr_bridge.playback import Playback
from ivr_bridge.providers.base import SKIP_KINDS, AssistantAudio, Skipped
from ivr_bridge.providers.echo import EchoEngine
from ivr_bridge.providers.nextevi import NextEviProtocol

SID = "MZ" + "a" * 32
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def start_frame() -> str:
    start = {
        "streamSid": SID,
        "callSid": "CA1",
        "accountSid": "AC1",
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": SID, "start": start})


def media_frame(payload: bytes) -> str:
    media = {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": b64encode(payload).decode()}
    return json.dumps({"event": "media", "streamSid": SID, "media": media})


# Frames Twilio would never send: each must raise MediaStreamError and change nothing.
garbage_frames = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64),
    json_values.map(json.dumps),
    st.dictionaries(
        st.sampled_from(["event", "streamSid", "media", "mark", "dtmf", "start"]), json_values
    ).map(json.dumps),
    st.builds(
        lambda p: json.dumps({"event": "media", "streamSid": "MZother", "media": {"payload": p}}),
        st.text(max_size=8),
    ),
    st.builds(
        lambda bad: json.dumps({"event": "media", "streamSid": SID, "media": {"payload": "AAAA", **bad}}),
        st.fixed_dictionaries({}, optional={"chunk": st.just("x"), "timestamp": st.just(1e400)}).filter(bool),
    ),
    st.just(json.dumps({"event": "media", "streamSid": SID, "media": {"payload": "A==="}})),
    st.just(json.dumps({"event": "dtmf", "streamSid": SID, "dtmf": {"digit": "x" * 100}})),
    st.just("[" * 100_000),
)


def _is_media_for_us(frame: str | bytes) -> bool:
    # A generated "garbage" frame can by chance be a valid media frame (payload "" or
    # "AAAA"): it is then valid audio and must be delivered like any other.
    try:
        message = json.loads(frame)
    except (ValueError, RecursionError):
        return False
    return isinstance(message, dict) and message.get("event") == "media"


@FAST
@given(st.lists(st.one_of(st.binary(max_size=400).map(lambda b: ("valid", b)), garbage_frames), max_size=40))
def test_media_stream_keeps_every_valid_payload_in_order(items: list) -> None:
    stream = MediaStream(clock=None)
    stream.receive(start_frame())
    expected = bytearray()
    received = bytearray()
    for item in items:
        if isinstance(item, tuple):
            frame = media_frame(item[1])
            expected += item[1]
        else:
            frame = item
        try:
            event = stream.receive(frame)
        except MediaStreamError as exc:
            assert exc.kind in BAD_FRAME_KINDS and not exc.fatal
            assert isinstance(item, (str, bytes))
            continue
        if isinstance(event, MediaReceived):
            if not isinstance(item, tuple):
                assert _is_media_for_us(frame)
                expected += event.payload
            received += event.payload
    assert received == expected


@FAST
@given(st.lists(garbage_frames, max_size=20), st.binary(min_size=1, max_size=2000))
def test_outbound_frames_are_always_valid(garbage: list, ulaw: bytes) -> None:
    stream = MediaStream(clock=None)
    for frame in garbage:  # garbage before the start cannot start the stream
        with contextlib.suppress(MediaStreamError):
            stream.receive(frame)
    stream.receive(start_frame())
    whole = ulaw[: len(ulaw) - len(ulaw) % 160] or bytes(160)
    for text in (stream.media(whole), stream.mark(ulaw.decode("latin-1")), stream.clear()):
        message = json.loads(text)
        assert message["streamSid"] == SID
        if message["event"] == "media":
            assert b64decode(message["media"]["payload"], validate=True) == whole


def test_flood_guard_trips_only_above_real_time() -> None:
    now = [0.0]
    stream = MediaStream(clock=lambda: now[0])
    stream.receive(start_frame())
    # An hour at exactly real time, with a 2 s network stall and the burst after it.
    for i in range(50 * 3600):
        now[0] = i * 0.02 + (2.0 if i >= 1000 else 0.0) * (i >= 1100)
        stream.receive(media_frame(bytes(160)))
    flood = MediaStream(clock=lambda: now[0])
    flood.receive(start_frame())
    tripped = None
    for i in range(1000):
        now[0] += 0.004  # 5x real time
        try:
            flood.receive(media_frame(bytes(160)))
        except MediaStreamError as exc:
            assert exc.fatal and exc.kind == "flood"
            tripped = i
            break
    # On the frame that takes the lead past 2 s, not later: after n frames the lead is
    # n x (20 - 4 x 1.02) ms, past 2,000 ms first at n = 126 (the limits the guard keeps
    # between clock readings must not let a frame through).
    assert tripped == 125
    try:
        flood.receive(media_frame(bytes(160)))
        raise AssertionError("a flooded stream must stay refused")
    except MediaStreamError as exc:
        assert exc.fatal


nextevi_messages = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64),
    json_values.map(json.dumps),
    st.builds(
        lambda t, d: json.dumps({"type": t, "data": d}),
        st.sampled_from(
            [
                "tts_chunk",
                "emotion_update",
                "error",
                "status",
                "transcription",
                "llm_response_chunk",
                "turn_end",
            ]
        )
        | json_values,
        json_values,
    ),
    st.builds(
        lambda t, d: json.dumps({"type": t, **d}),
        st.just("emotion_update"),
        st.just({"top_emotions": [{"score": "x"}]}),
    ),
    st.builds(lambda c: json.dumps({"type": "tts_chunk", "content": c}), json_values),
    st.builds(
        lambda b: json.dumps({"type": "tts_chunk", "content": b64encode(b).decode()}), st.binary(max_size=200)
    ),
    st.just('{"type": "tts_chunk", "data": ' * 3000),
)


@FAST
@given(st.lists(nextevi_messages, max_size=30))
def test_nextevi_protocol_never_raises(messages: list) -> None:
    protocol = NextEviProtocol()
    for message in messages:
        for event in protocol.receive(message):
            if isinstance(event, Skipped):
                assert event.kind in SKIP_KINDS
            if isinstance(event, AssistantAudio):
                assert event.response >= 1 and len(event.pcm.samples)
    assert len(protocol._unknown) <= 32


def _wav_header(channels: int, rate: int, bits: int, data_size: int, tag: int = 1) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    return (
        b"RIFF"
        + struct.pack("<I", (36 + data_size) % 2**32)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_size)
    )


@FAST
@given(
    st.integers(0, 3),
    st.sampled_from([8000, 16000, 22050, 24000, 44100, 48000, 96000, 0]),
    st.sampled_from([8, 16, 24]),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=300),
    st.binary(max_size=40),
)
def test_wav_with_lying_headers_is_rejected_or_clipped(
    channels: int, rate: int, bits: int, size: int, body: bytes, junk: bytes
) -> None:
    for data in (_wav_header(channels, rate, bits, size) + body, b"RIFF" + junk[:4] + b"WAVE" + junk):
        try:
            pcm = parse_wav(data)
        except WavError:
            continue
        assert channels in (1, 2) and bits == 16 and 8000 <= rate <= 48000
        assert pcm.samples.dtype == np.int16 and len(pcm.samples) * 2 * channels <= len(body)
    try:
        decode_tts_audio(body)
    except WavError:
        assert body[:4] == b"RIFF"


@FAST
@given(
    st.lists(st.tuples(st.sampled_from([8000, 16000, 24000, 44100, 48000]), st.integers(0, 3000)), max_size=8)
)
def test_bot_audio_only_emits_whole_frames(chunks: list) -> None:
    bot = BotAudio()
    stream = MediaStream(clock=None)
    stream.receive(start_frame())
    rng = np.random.default_rng(0)
    for rate, n in chunks:
        ulaw = bot.process(Pcm(rng.integers(-32768, 32767, n, dtype=np.int16), rate))
        assert len(ulaw) % 160 == 0
        if ulaw:
            assert len(b64decode(json.loads(stream.media(ulaw))["media"]["payload"])) % 160 == 0
    assert len(bot.flush()) % 160 == 0


@FAST
@given(st.lists(st.binary(max_size=500), max_size=20))
def test_caller_audio_keeps_three_samples_per_byte(chunks: list) -> None:
    caller = CallerAudio()
    total = sum(len(caller.process(c)) for c in chunks)
    assert total == 6 * sum(len(c) for c in chunks)


@FAST
@given(st.lists(st.binary(max_size=3000).map(lambda b: b[: len(b) - len(b) % 2]), max_size=20))
def test_echo_engine_takes_any_even_length_pcm(chunks: list) -> None:
    engine = EchoEngine()
    for chunk in chunks:
        engine.feed(chunk)
    assert engine.clock <= sum(len(c) for c in chunks) // 2


@FAST
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("send"), st.integers(0, 3000)),
            st.tuples(st.just("start"), st.none()),
            st.tuples(st.just("clear"), st.none()),
            st.tuples(st.just("echo"), st.text(max_size=12)),
            st.tuples(st.just("echo_sent"), st.integers(0, 50)),
        ),
        max_size=40,
    )
)
def test_playback_accounting_stays_consistent(actions: list) -> None:
    playback = Playback()
    sent: list[str] = []
    for action, arg in actions:
        if action == "start":
            playback.start_response()
        elif action == "send" and playback.current is not None:
            sent.append(playback.sent(playback.current, arg))
        elif action == "clear":
            assert playback.cleared() >= 0
        elif action == "echo":
            playback.echoed(arg)
        elif action == "echo_sent" and sent:
            playback.echoed(sent[arg % len(sent)])
        for response in playback.responses:
            assert 0 <= response.heard_bytes <= response.sent_bytes
            assert response.marks_pending >= 0
        assert playback.unplayed_ms >= 0


def test_metric_kinds_cover_every_kind_raised() -> None:
    assert {"twilio": frozenset(BAD_FRAME_KINDS), "voice_api": frozenset(SKIP_KINDS)} == BAD_INPUT_KINDS
