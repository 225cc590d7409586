"""The sans-I/O parts of a call, driven directly: its state, the caller's audio going up,
the bot's audio coming down with the playback clock and barge-in. No asyncio, no socket."""

from __future__ import annotations

import json
import logging
from base64 import b64decode

import numpy as np
import pytest

from ivr_bridge.audio import PCM16_24K, TWILIO_AUDIO, AudioFormat, CallerAudio, Encoding, Pcm, Ulaw
from ivr_bridge.call import CallState, CallStats, Handoff, Outcome
from ivr_bridge.call.downlink import TAIL_IDLE_S, Downlink
from ivr_bridge.call.state import SHOWN_STATES, TRANSITIONS, Lifecycle
from ivr_bridge.call.uplink import MAX_EARLY_AUDIO_MS, Uplink
from ivr_bridge.media_stream import MediaStream
from ivr_bridge.transcript import Transcript

LOG = logging.getLogger("test")


# -- state ---------------------------------------------------------------------------------


def test_a_call_moves_only_along_its_transitions() -> None:
    life = Lifecycle(LOG)
    for state in (CallState.CONNECTING, CallState.ACTIVE, CallState.RENEWING, CallState.RECONNECTING):
        life.move(state)
    life.move(CallState.RECONNECTING)  # another failed attempt: staying put is allowed
    life.move(CallState.ACTIVE)
    with pytest.raises(RuntimeError, match="active to starting"):
        life.move(CallState.STARTING)
    life.move(CallState.ENDING)
    assert TRANSITIONS[CallState.ENDING] == frozenset()
    for target in CallState:
        if target != CallState.ENDING:
            with pytest.raises(RuntimeError):
                life.move(target)


def test_the_shown_state_puts_an_ending_before_a_handoff_before_the_session() -> None:
    life = Lifecycle(LOG)
    life.move(CallState.CONNECTING)
    assert life.shown == "connecting"
    life.handoff = Handoff("transfer", "+15550100")
    assert life.shown == "transferring" and life.shown in SHOWN_STATES
    life.stream_over(Outcome.STREAM_STOPPED)  # the `stop` after a transfer is the transfer's
    assert life.outcome == Outcome.TRANSFERRED and life.shown == "ending"
    life.end_unless_ended(Outcome.IDLE)
    assert life.outcome == Outcome.TRANSFERRED


# -- caller -> voice API -------------------------------------------------------------------

FRAME = bytes(range(160))  # 20 ms of mu-law, every byte distinct enough to follow


def test_uplink_holds_early_audio_up_to_the_cap_then_sends_it_in_chunks() -> None:
    stats = CallStats()
    up = Uplink(100, stats)
    frames = MAX_EARLY_AUDIO_MS // 20 + 50  # one second over the cap
    for _ in range(frames):
        assert not up.feed(FRAME)
    assert stats.early_audio_dropped_ms == 1000
    up.open(TWILIO_AUDIO)
    chunks = up.feed(FRAME)
    # Everything held goes at once, in messages of at most 100 ms.
    assert [len(c) for c in chunks] == [800] * 50 + [160]
    assert b"".join(chunks) == FRAME * (MAX_EARLY_AUDIO_MS // 20 + 1)
    assert up.pending_bytes == 0


def test_uplink_passes_mulaw_byte_for_byte_and_converts_pcm_at_the_acknowledged_rate() -> None:
    up = Uplink(20, CallStats())
    up.open(TWILIO_AUDIO)
    assert list(up.feed(FRAME)) == [FRAME]
    up16 = Uplink(20, CallStats())
    up16.open(AudioFormat(Encoding.PCM16, 16000))
    [chunk] = up16.feed(FRAME)
    assert len(chunk) == 160 * 2 * 2  # 20 ms at 16 kHz, 2 bytes a sample


def test_uplink_sends_the_same_audio_whether_frames_come_whole_or_not() -> None:
    # Whole 20 ms frames take a shortcut past the buffer; odd sizes go through it.
    up = Uplink(20, CallStats())
    up.open(PCM16_24K)
    sizes = [160, 160, 80, 160, 240, 160, 160, 1, 159, 160]
    audio = bytes(range(256)) * 8
    sent, start = [], 0
    for size in sizes:
        chunks = up.feed(audio[start : start + size])
        assert all(len(chunk) <= 960 for chunk in chunks)
        sent += chunks
        start += size
    assert up.pending_bytes == 0
    got = np.frombuffer(b"".join(sent), "<i2").astype(np.int32)
    expected = np.frombuffer(CallerAudio(PCM16_24K).process(audio[:start]), "<i2")
    # (Bit-identical with the C kernel; numpy's sums may round a last bit differently.)
    assert len(got) == len(expected) == 3 * start and np.abs(got - expected).max() <= 1


def test_uplink_drops_the_gap_between_sessions_and_starts_clean() -> None:
    stats = CallStats()
    up = Uplink(100, stats)
    up.open(PCM16_24K)
    up.feed(FRAME * 2)  # 40 ms waiting for the rest of its chunk
    up.drop()
    for _ in range(10):
        assert not up.feed(FRAME)
    assert stats.gap_audio_dropped_ms == 200  # whole chunks dropped as they fill
    up.feed(FRAME)
    up.open(PCM16_24K)
    assert up.pending_bytes == 0  # nothing of the gap reaches the new session
    assert [len(c) for c in up.feed(FRAME * 5)] == [800 * 6]


# -- voice API -> caller -------------------------------------------------------------------


def _downlink() -> tuple[Downlink, MediaStream, Transcript]:
    stream = MediaStream(clock=None)
    stream.receive(
        json.dumps(
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": "MZ" + "0" * 32,
                "start": {
                    "streamSid": "MZ" + "0" * 32,
                    "accountSid": "AC" + "0" * 32,
                    "callSid": "CA" + "0" * 32,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": {},
                },
            }
        )
    )
    words = Transcript(lambda: 0.0)
    return Downlink(stream, words, CallStats()), stream, words


def _kinds(messages: list[str]) -> list[str]:
    return [json.loads(m)["event"] for m in messages]


def _marks(messages: list[str]) -> list[str]:
    return [json.loads(m)["mark"]["name"] for m in messages if json.loads(m)["event"] == "mark"]


def test_downlink_sends_mulaw_in_whole_frames_each_chunk_followed_by_its_mark() -> None:
    down, _, _ = _downlink()
    out = down.speak(1, Ulaw(b"\x01" * 250), now=0.0)
    assert _kinds(out) == ["media", "mark"]
    assert b64decode(json.loads(out[0])["media"]["payload"]) == b"\x01" * 160
    assert down.audible and down.tail_deadline == pytest.approx(TAIL_IDLE_S)
    tail = down.finish(now=0.1)
    payload = b64decode(json.loads(tail[0])["media"]["payload"])
    assert payload[:90] == b"\x01" * 90 and len(payload) == 160  # padded to a whole frame
    assert down.finish(now=0.2) == []


def test_downlink_barge_in_drops_the_cut_reply_and_reports_what_was_heard() -> None:
    down, _, words = _downlink()
    tone = Pcm(np.sin(np.arange(4800) / 10) * 8000, 24000)  # 200 ms at 24 kHz
    first = down.speak(1, tone, now=0.0)
    words.reply_text(1, "one two three four", True)
    [mark] = _marks(first)
    down.mark_echoed(mark)  # the caller heard the first chunk
    heard = down.reply.heard_ms
    down.speak(1, tone, now=0.2)
    cut = down.cut()
    assert cut.reply_number == 1 and cut.reply.interrupted and cut.dropped_ms > 0
    assert cut.reply.heard_ms == heard > 0
    assert down.dropped(1) and down.speak(1, tone, now=0.3) == []  # late audio of the cut reply
    assert not down.tail_pending
    [line] = down.take_lines()
    assert line.interrupted and line.heard_ms == heard
    assert _kinds(down.speak(2, tone, now=0.4)) == ["media", "mark"]  # the next reply plays


def test_speech_between_two_chunks_of_a_reply_still_arriving_is_a_barge_in() -> None:
    down, _, _ = _downlink()
    [mark] = _marks(down.speak(1, Ulaw(b"\x01" * 160), now=0.0) + down.finish(now=0.0))
    down.mark_echoed(mark)  # all of it played: nothing queued at Twilio for a moment
    assert not down.audible
    assert down.in_reply(now=0.1)  # but the next chunk of the reply is on its way
    assert not down.in_reply(now=1.0)  # long after: speech is a new turn, not a barge-in


def test_a_new_session_numbers_its_replies_from_one_again() -> None:
    down, _, _ = _downlink()
    down.speak(3, Ulaw(b"\x01" * 160), now=0.0)
    down.cut()
    assert down.dropped(1)
    down.new_session(now=1.0)
    assert not down.dropped(1)
    assert _kinds(down.speak(1, Ulaw(b"\x02" * 160), now=1.0)) == ["media", "mark"]
