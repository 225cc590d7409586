"""Today's behaviour of `Call`, pinned in memory before it is split along its concerns
(issue 10): a fake Twilio socket and a scripted voice session, no sockets, milliseconds a
test. What these say must stay true of the pieces `Call` becomes."""

from __future__ import annotations

import asyncio

from ivr_bridge.audio import TWILIO_AUDIO, AudioFormat, Encoding, Ulaw
from ivr_bridge.call import MAX_EARLY_AUDIO_MS, Outcome
from ivr_bridge.providers.base import (
    AssistantAudio,
    AssistantText,
    Closed,
    Interruption,
    TurnEvent,
    UserTranscript,
)
from ivr_bridge.settings import Settings
from tests.call_harness import CALL_SID, Harness, ScriptedSession, caller_audio, speech, until


async def test_a_turn_caller_audio_up_in_chunks_reply_down_in_whole_frames_with_marks() -> None:
    h = Harness(Settings(provider="echo", upstream_chunk_ms=100, idle_timeout_s=60))
    h.run()
    h.twilio.start()
    session = await h.session()
    h.twilio.media(caller_audio(300))
    await until(lambda: session.messages_in == 3)
    assert len(session.audio_in) == 3 * 100 * 24 * 2  # PCM16 at 24 kHz, one message per 100 ms
    session.emit(
        UserTranscript("hello", final=True),
        AssistantAudio(speech(200), response=1),
        AssistantText("hi there", final=True, response=1),
    )
    # The tail waits in the converter until the reply pauses, then goes out too.
    await until(lambda: len(h.twilio.audio()) >= 8 * 195)
    media, marks = h.twilio.events("media"), h.twilio.events("mark")
    assert all(len(m["media"]["payload"]) % 4 == 0 for m in media)
    assert len(h.twilio.audio()) % 160 == 0  # whole 20 ms frames only
    assert len(marks) == len(media) and all(m["mark"]["name"].startswith("r1.") for m in marks)
    kinds = [m["event"] for m in h.twilio.sent]
    assert all(kinds[i + 1] == "mark" for i, kind in enumerate(kinds) if kind == "media")  # a mark after each
    await until(lambda: "transcript" in h.kinds() and _assistant_line(h) is not None)
    assert _assistant_line(h)["heard_text"] == "hi there"  # every mark played
    h.twilio.stop()
    call = await h.ended()
    assert call.outcome == Outcome.STREAM_STOPPED and session.closed_with == 1000
    assert h.kinds()[0] == "call.started" and h.kinds()[-1] == "call.ended"
    assert call.stats.turns == 1 and len(call.stats.reply_ms) == 1


async def test_barge_in_clears_first_and_drops_the_rest_of_the_cut_reply() -> None:
    h = Harness(instant_playback=False)  # nothing plays until the test says so
    h.run()
    h.twilio.start()
    session = await h.session()
    session.emit(AssistantAudio(speech(200), response=1), AssistantAudio(speech(200), response=1))
    await until(lambda: len(h.twilio.events("mark")) >= 2)
    h.twilio.play(1)  # the caller has heard the first chunk only
    sent_before = len(h.twilio.sent)
    session.emit(Interruption("caller spoke"), AssistantAudio(speech(400), response=1))
    await until(lambda: bool(h.twilio.events("clear")))
    assert h.twilio.sent[sent_before]["event"] == "clear"  # before anything else
    session.emit(AssistantAudio(speech(200), response=2))  # the next reply plays
    await until(lambda: any(m["mark"]["name"].startswith("r2.") for m in h.twilio.events("mark")))
    after_clear = h.twilio.sent[h.twilio.sent.index(h.twilio.events("clear")[0]) :]
    assert not any(m["event"] == "mark" and m["mark"]["name"].startswith("r1.") for m in after_clear)
    h.twilio.play()
    h.twilio.stop()
    call = await h.ended()
    [barge_in] = [e for e in h.events if e.type == "barge_in"]
    assert barge_in.data["reply"] == 1 and barge_in.data["dropped_ms"] > 0
    assert call.stats.barge_ins == 1 and call.playback.responses[0].interrupted


async def test_caller_audio_waits_while_the_session_connects_up_to_the_early_cap() -> None:
    h = Harness()
    slow = ScriptedSession()
    slow.may_connect.clear()
    h.prepared.append(slow)
    h.run()
    h.twilio.start()
    h.twilio.media(caller_audio(MAX_EARLY_AUDIO_MS + 1000))  # a second more than is kept
    frames = (MAX_EARLY_AUDIO_MS + 1000) // 20
    await until(lambda: h.call.stats.frames_in >= frames)  # all taken in
    slow.may_connect.set()
    line = asyncio.create_task(_line(h))  # the next frames carry the backlog up with them
    try:
        await until(lambda: len(slow.audio_in) >= MAX_EARLY_AUDIO_MS * 48)  # PCM16 24 kHz: 48 B/ms
    finally:
        line.cancel()
    h.twilio.stop()
    call = await h.ended()
    assert call.stats.early_audio_dropped_ms == 1000


async def test_a_retryable_drop_reconnects_and_a_non_retryable_one_ends_the_call() -> None:
    h = Harness(Settings(provider="echo", idle_timeout_s=60, reconnect_budget_s=5))
    h.run()
    h.twilio.start()
    first = await h.session(0)
    first.emit(Closed(1006, "gone"))
    second = await h.session(1)  # reconnected within the budget
    second.emit(Closed(4001, "bad key"))  # credentials: no retry, and no REST for a fallback
    call = await h.ended()
    assert call.outcome == Outcome.VOICE_API_FAILED and call.keeper.close_code == 4001
    assert call.stats.reconnects == 1 and len(h.sessions) == 2


async def test_a_caller_who_never_plays_the_audio_is_stalled() -> None:
    h = Harness(
        Settings(provider="echo", idle_timeout_s=60, twilio_send_timeout_s=0.5), instant_playback=False
    )
    h.run()
    h.twilio.start()
    session = await h.session()
    session.emit(AssistantAudio(speech(100), response=1))
    keep_line = asyncio.create_task(_line(h))  # media keeps coming; marks never do
    try:
        call = await h.ended(10)
    finally:
        keep_line.cancel()
    assert call.outcome == Outcome.TWILIO_STALLED


async def test_a_key_is_an_event_with_its_mapped_action() -> None:
    h = Harness(Settings(provider="echo", idle_timeout_s=60, dtmf_map=(("0", "transfer:+15550100"),)))
    h.run()
    h.twilio.start()
    await h.session()
    h.twilio.dtmf("0")
    h.twilio.dtmf("5")
    h.twilio.stop()
    await h.ended()
    keys = [e.data for e in h.events if e.type == "dtmf"]
    assert keys == [{"digit": "0", "action": "transfer:+15550100"}, {"digit": "5", "action": ""}]
    assert all(e.call_sid == CALL_SID for e in h.events)
    assert [e.seq for e in h.events] == list(range(1, len(h.events) + 1))


# -- helpers ---------------------------------------------------------------------------------


def _assistant_line(h: Harness) -> dict | None:
    lines = [e.data for e in h.events if e.type == "transcript" and e.data.get("role") == "assistant"]
    return lines[-1] if lines else None


async def _line(h: Harness) -> None:
    while True:
        h.twilio.media(b"\xff" * 160)
        await asyncio.sleep(0.02)


# -- negotiated formats: mu-law passes through, PCM16 at the API's rate ------------------------


async def test_mulaw_passes_through_byte_for_byte_both_ways() -> None:
    h = Harness(Settings(provider="echo", upstream_chunk_ms=20, idle_timeout_s=60))
    h.prepared.append(ScriptedSession(send_format=TWILIO_AUDIO))
    h.run()
    h.twilio.start()
    session = await h.session()
    said = caller_audio(400)
    h.twilio.media(said)
    await until(lambda: len(session.audio_in) >= len(said))
    assert bytes(session.audio_in) == said  # no decode, no resample, no re-encode
    reply = bytes(range(256)) * 4 + bytes(range(1, 201))  # 1224 bytes: 7 frames and a piece
    session.emit(AssistantAudio(Ulaw(reply[:700]), response=1), AssistantAudio(Ulaw(reply[700:]), response=1))
    await until(lambda: len(h.twilio.audio()) >= len(reply))
    heard = h.twilio.audio()
    assert heard[: len(reply)] == reply and len(heard) % 160 == 0  # re-framed only
    assert set(heard[len(reply) :]) <= {0xFF}  # the last frame padded with mu-law silence
    h.twilio.stop()
    await h.ended()


async def test_pcm16_goes_up_at_the_rate_the_api_acknowledged() -> None:
    h = Harness(Settings(provider="echo", upstream_chunk_ms=100, idle_timeout_s=60))
    h.prepared.append(ScriptedSession(send_format=AudioFormat(Encoding.PCM16, 16000)))
    h.run()
    h.twilio.start()
    session = await h.session()
    h.twilio.media(caller_audio(200))
    await until(lambda: session.messages_in == 2)
    assert len(session.audio_in) == 200 * 16 * 2  # 16 kHz PCM16: 32 bytes a ms
    h.twilio.stop()
    await h.ended()


async def test_a_format_the_bridge_cannot_carry_ends_the_call_with_one_line(caplog) -> None:
    h = Harness()
    h.prepared.append(ScriptedSession(send_format=AudioFormat(Encoding.MULAW, 16000)))
    h.run()
    h.twilio.start()
    call = await h.ended()
    assert call.outcome == Outcome.VOICE_API_FAILED
    [line] = [r.getMessage() for r in caplog.records if "cannot convert" in r.getMessage()]
    assert "scripted" in line and "mulaw 16000 Hz" in line


async def test_words_transcribed_apart_from_the_reply_leave_the_reply_and_the_turn_alone() -> None:
    """OpenAI transcribes the caller apart from its reply, so the words may arrive while the
    reply plays. The turn ended at the API's own turn end: late words neither flush the
    reply's converter mid-sentence (a click in the caller's ear) nor start a reply latency."""

    async def reply(late_words: bool) -> tuple[bytes, int, int]:
        h = Harness()
        h.run()
        h.twilio.start()
        session = await h.session()
        session.emit(TurnEvent("end"), AssistantAudio(speech(200), response=1))
        if late_words:
            session.emit(UserTranscript("hello", final=True, ends_turn=False))
        session.emit(AssistantAudio(speech(200, hz=300), response=1))
        await until(lambda: len(h.twilio.audio()) >= 8 * 390 and not h.call.downlink.tail_pending)
        h.twilio.stop()
        call = await h.ended()
        return h.twilio.audio(), call.stats.turns, len(call.stats.reply_ms)

    heard, turns, latencies = await reply(late_words=True)
    assert (turns, latencies) == (1, 1)  # one turn, timed from its end to the reply's first audio
    assert heard == (await reply(late_words=False))[0]  # the same audio, without a break


async def test_words_the_caller_says_while_the_bot_is_heard_do_not_end_its_reply() -> None:
    """A backchannel ("uh-huh") the API transcribes without cutting the bot off (ElevenLabs'
    ignored terms, an API that chose not to interrupt): the reply plays on unbroken, and no
    reply latency is timed from words said in the middle of it."""

    async def reply(words: bool) -> tuple[bytes, int]:
        h = Harness(instant_playback=False)  # the first chunk is still playing at the handset
        h.run()
        h.twilio.start()
        session = await h.session()
        session.emit(AssistantAudio(speech(200), response=1))
        if words:
            session.emit(UserTranscript("uh-huh", final=True))
        session.emit(AssistantAudio(speech(200, hz=300), response=1))
        await until(lambda: len(h.twilio.audio()) >= 8 * 390 and not h.call.downlink.tail_pending)
        h.twilio.play()
        h.twilio.stop()
        call = await h.ended()
        return h.twilio.audio(), len(call.stats.reply_ms)

    heard, latencies = await reply(words=True)
    assert latencies == 0
    assert heard == (await reply(words=False))[0]
