"""NextEVI protocol core: both envelope shapes, tts_chunk decoding, replies and barge-in."""

import json
from base64 import b64encode
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from ivr_bridge.audio import wav_bytes
from ivr_bridge.providers.base import (
    AssistantAudio,
    AssistantText,
    Emotions,
    Interruption,
    ProviderError,
    Ready,
    Skipped,
    TurnEvent,
    UserTranscript,
)
from ivr_bridge.providers.nextevi import NextEviProtocol


def message(kind: str, shape: str, **fields: object) -> str:
    base = {"type": kind, "timestamp": 1.0, "message_id": "m"}
    if shape == "data":
        return json.dumps(base | {"data": fields})
    return json.dumps(base | fields)


def tts(audio: bytes) -> str:
    # Per the reference, tts_chunk carries `content` at the top level in both shapes.
    return json.dumps(
        {"type": "tts_chunk", "timestamp": 1.0, "message_id": "t", "content": b64encode(audio).decode()}
    )


def test_url_carries_key_config_and_project() -> None:
    url = NextEviProtocol.url("wss://api.nextevi.com/ws/voice/", "ivr-1", "oak_k", "cfg", "proj")
    parts = urlsplit(url)
    assert parts.path == "/ws/voice/ivr-1"
    assert parse_qs(parts.query) == {"api_key": ["oak_k"], "config_id": ["cfg"], "project_id": ["proj"]}
    assert "project_id" not in NextEviProtocol.url("wss://h/ws/voice", "c", "k", "cfg")


def test_session_settings_ask_for_24k_linear16_with_turns_and_emotions() -> None:
    msg = json.loads(NextEviProtocol.session_settings())
    assert msg["type"] == "session_settings" and msg["message_id"] and msg["timestamp"] > 0
    assert msg["data"]["audio"] == {"sample_rate": 24000, "channels": 1, "encoding": "linear16"}
    assert msg["data"]["turn_detection"]["enabled"] and msg["data"]["emotion_detection"]["enabled"]
    assert json.loads(NextEviProtocol.keep_alive())["type"] == "keep_alive"


@pytest.mark.parametrize("shape", ["data", "flat"])
def test_every_documented_message_in_both_shapes(shape: str) -> None:
    p = NextEviProtocol()
    assert p.receive(message("connection_metadata", shape, connection_id="c", status="connected")) == [
        Ready("connected")
    ]
    assert p.receive(message("status", shape, status="ready", details={})) == [Ready("ready")]
    assert p.receive(message("status", shape, status="processing")) == []
    assert p.receive(message("transcription", shape, transcript="hel", is_final=False)) == [
        UserTranscript("hel", False)
    ]
    assert p.receive(message("transcription", shape, transcript="hello", is_final=True)) == [
        UserTranscript("hello", True)
    ]
    assert p.receive(message("turn_start", shape, turn_id="t1")) == [TurnEvent("start", "t1")]
    assert p.receive(message("turn_end", shape, turn_id="t1", duration=1.0)) == [TurnEvent("end", "t1")]
    top = [{"name": "Joy", "score": 0.8}]
    assert p.receive(message("emotion_update", shape, top_emotions=top)) == [Emotions([("Joy", 0.8)])]
    chunk = message(
        "llm_response_chunk", shape, content="Hi", is_final=False, generation_id="g1", chunk_index=0
    )
    assert p.receive(chunk) == [AssistantText("Hi", False, "g1", response=1)]  # the reply that opens next
    err = message("error", shape, error_code="AUDIO_PROCESSING_FAILED", error_message="bad chunk")
    assert p.receive(err) == [ProviderError("AUDIO_PROCESSING_FAILED", "bad chunk")]
    [audio] = p.receive(tts(wav_bytes(np.zeros(2400, dtype=np.int16), 24000)))
    assert isinstance(audio, AssistantAudio) and audio.response == 1
    assert audio.pcm.sample_rate == 24000 and len(audio.pcm.samples) == 2400
    assert p.receive(
        json.dumps({"type": "tts_interruption", "timestamp": 1, "message_id": "i", "content": ""})
    ) == [Interruption("tts_interruption")]
    assert p.receive(message("user_interruption", shape)) == [Interruption("user_interruption")]


def test_tts_chunk_without_header_is_raw_24k_pcm() -> None:
    p = NextEviProtocol()
    [audio] = p.receive(tts(np.arange(480, dtype="<i2").tobytes()))
    assert isinstance(audio, AssistantAudio)
    assert audio.pcm.sample_rate == 24000
    assert audio.pcm.samples.tolist() == list(range(480))


def test_tts_chunk_wav_at_other_rates_and_stereo() -> None:
    p = NextEviProtocol()
    stereo = np.repeat(np.array([1000, 3000] * 800, dtype=np.int16).reshape(-1, 2), 1, axis=0)
    [audio] = p.receive(tts(wav_bytes(stereo.reshape(-1), 16000, channels=2)))
    assert isinstance(audio, AssistantAudio)
    assert audio.pcm.sample_rate == 16000 and len(audio.pcm.samples) == 800


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not json", "JSON"),
        (b"\x00\x01", "binary"),
        (json.dumps({"type": "tts_chunk", "content": "@@@"}), "base64"),
        (json.dumps({"type": "tts_chunk"}), "content"),
        (
            json.dumps({"type": "tts_chunk", "content": b64encode(b"RIFF\x00\x00\x00\x00WAVEjunk").decode()}),
            "WAV",
        ),
    ],
)
def test_undecodable_messages_are_skipped_with_a_reason(raw: str | bytes, reason: str) -> None:
    p = NextEviProtocol()
    [event] = p.receive(raw)
    assert isinstance(event, Skipped) and reason in event.reason
    # The protocol goes on working.
    assert isinstance(p.receive(tts(b"\x00\x00" * 240))[0], AssistantAudio)


def test_unknown_types_are_reported_once() -> None:
    p = NextEviProtocol()
    assert isinstance(p.receive(json.dumps({"type": "novel"}))[0], Skipped)
    assert p.receive(json.dumps({"type": "novel"})) == []
    assert p.receive(json.dumps({"type": "idle_warning"})) == []
    assert p.skipped == 2


def test_replies_are_numbered_and_interrupted_replies_are_dropped() -> None:
    p = NextEviProtocol()
    pcm = b"\x10\x00" * 480
    first = p.receive(tts(pcm)) + p.receive(tts(pcm))
    assert [e.response for e in first if isinstance(e, AssistantAudio)] == [1, 1]
    p.receive(json.dumps({"type": "tts_interruption", "content": ""}))
    # Chunks of the interrupted reply still in flight are dropped...
    assert p.receive(tts(pcm)) == [] and p.stale_chunks == 1
    # ...until the next turn, whose reply is a new response.
    p.receive(message("transcription", "data", transcript="stop", is_final=True))
    [audio] = p.receive(tts(pcm))
    assert isinstance(audio, AssistantAudio) and audio.response == 2


def test_new_generation_starts_a_new_reply() -> None:
    p = NextEviProtocol()
    pcm = b"\x10\x00" * 480
    p.receive(message("llm_response_chunk", "flat", content="a", generation_id="g1"))
    [a] = p.receive(tts(pcm))
    p.receive(message("llm_response_chunk", "flat", content="b", generation_id="g1"))
    [b] = p.receive(tts(pcm))
    p.receive(message("llm_response_chunk", "flat", content="c", generation_id="g2"))
    [c] = p.receive(tts(pcm))
    assert [x.response for x in (a, b, c)] == [1, 1, 2]  # type: ignore[union-attr]
