"""The embedded echo engine: energy turn detection, playback, barge-in."""

import numpy as np

from ivr_bridge.providers.base import AssistantAudio, Interruption, UserTranscript
from ivr_bridge.providers.echo import EchoEngine

RATE = 24000


def tone(ms: int, amplitude: float = 6000) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()


def silence(ms: int) -> bytes:
    return b"\x00\x00" * (RATE * ms // 1000)


def feed(engine: EchoEngine, audio: bytes, chunk_ms: int = 100) -> list:
    step = RATE * 2 * chunk_ms // 1000
    events = []
    for i in range(0, len(audio), step):
        events += engine.feed(audio[i : i + step])
    return events


def test_utterance_is_played_back_after_its_end() -> None:
    engine = EchoEngine()
    events = feed(engine, silence(300) + tone(800) + silence(1000))
    assert isinstance(events[0], UserTranscript) and events[0].final
    audio = [e for e in events if isinstance(e, AssistantAudio)]
    total = sum(len(e.pcm.samples) for e in audio)
    # The reply is the utterance: 800 ms of tone plus a little pre-roll and tail.
    assert 800 * 24 <= total <= 1000 * 24
    assert {e.response for e in audio} == {1}
    played = np.concatenate([e.pcm.samples for e in audio])
    assert np.abs(played).max() > 5000


def test_short_blips_are_not_utterances() -> None:
    engine = EchoEngine()
    assert feed(engine, tone(60) + silence(1000)) == []


def test_odd_chunk_sizes_give_the_same_result() -> None:
    audio = silence(200) + tone(500) + silence(900)
    a = feed(EchoEngine(), audio, chunk_ms=100)
    b = []
    engine = EchoEngine()
    for i in range(0, len(audio), 2 * 7):  # 7-sample chunks
        b += engine.feed(audio[i : i + 14])
    assert len(a) == len(b)
    assert [len(e.pcm.samples) for e in a if isinstance(e, AssistantAudio)] == [
        len(e.pcm.samples) for e in b if isinstance(e, AssistantAudio)
    ]


def test_speaking_during_the_reply_interrupts_it() -> None:
    engine = EchoEngine()
    feed(engine, tone(1000) + silence(600))  # reply of ~1 s starts now
    events = feed(engine, silence(200) + tone(400) + silence(700))
    assert isinstance(events[0], Interruption)
    # The barge-in utterance is itself echoed as reply 2.
    assert next(e.response for e in events if isinstance(e, AssistantAudio)) == 2


def test_speaking_after_the_reply_is_not_an_interruption() -> None:
    engine = EchoEngine()
    feed(engine, tone(500) + silence(600))
    events = feed(engine, silence(1500) + tone(400) + silence(700))
    assert not any(isinstance(e, Interruption) for e in events)
