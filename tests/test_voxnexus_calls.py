"""VoxNexus calls end to end, over real sockets: the real app under uvicorn with
IVR_PROVIDER=voxnexus pointed at the VoxNexus stand-in (its STT and TTS sockets), a Twilio
caller as the phone. The demo IVR flow (greeting, a spoken choice, a key that transfers),
barge-in over a reply whose audio is still arriving, the key kept out of the logs; then the
`llm` dialogue step (a chat-completions stand-in: the caller's words in, the reply spoken
sentence by sentence as it streams, a tool call that transfers) and the `hook` step (a
signed turn, its answer spoken, its action carried out).

The stand-in cannot recognise speech: what the caller "said" is its script
(`VoxNexusBehaviour.transcripts`, one per utterance). The caller's audio must still be
taken for speech by both voice detectors, the stand-in's energy VAD and the bridge's
WebRTC VAD: a voiced pulse train (`tests.test_cascade.voiced`) is.

Nothing waits a fixed time: every wait is on a condition the stand-ins or the caller
report, with a generous limit (`WAIT`), so a loaded machine is slow, not failing.

The last tests pin bugs found on the way: a turn lost after a sentence finalised before
its flush, the words of a reply cut mid-stream, a reply whose audio pauses, and the share of
a still-arriving reply that the dialogue's history keeps.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from ivr_bridge.audio import ulaw_encode
from ivr_bridge.call import Call
from ivr_bridge.hooks import SIGNATURE_HEADER, verify
from ivr_bridge.settings import Settings
from ivr_bridge.standins.dialogue_hook import DialogueHookStandIn
from ivr_bridge.standins.llm import DEFAULT_KEY, DEFAULT_TRANSFER_TO, LlmStandIn, Reply
from ivr_bridge.standins.twilio import TwilioCaller
from ivr_bridge.standins.voxnexus import TtsSocket, VoxNexusBehaviour, VoxNexusStandIn
from tests.test_cascade import voiced
from tests.test_end_to_end import dominant_hz
from tests.test_resilience import signed_caller, with_rest
from tests.test_routing import record_of

KEY = "vn-live-7c1e94a2b8d05f63e1"  # distinctive: found in a log line only if it leaked
WAIT = 20.0  # generous: a loaded machine is slow, not failing
GREETING_SENTENCES = ["Welcome to Example Company.", "Say sales, support, or press 0 for an agent."]
GREETING = " ".join(GREETING_SENTENCES)
SUPPORT = "Please say or key in your account number, then press pound."
HOOK_SECRET = "hook-secret-for-voxnexus-calls"
# A TTS slow enough that a reply is still arriving when the caller cuts it, yet ahead of
# real time. At exactly real time the caller's queue runs dry between chunks, and a barge-in
# in such a gap clears Twilio but records no cut: `Playback.cleared` marks interrupted only
# the replies with marks pending (a known bug, not what these tests are about).
SLOW_TTS = 1.5


def speech(ms: int = 800) -> bytes:
    """Caller speech as the line carries it, 8 kHz mu-law. Loud enough to stand out of the
    bot's echo floor (its level minus 12 dB) while the bot talks: a barge-in."""
    return ulaw_encode(voiced(ms, level=0.4, rate=8000))


def voxnexus_settings(standin: VoxNexusStandIn, **env: str) -> Settings:
    """The settings a user gives for VoxNexus, as environment variables."""
    values = {
        "IVR_PROVIDER": "voxnexus",
        "VOXNEXUS_API_KEY": KEY,
        "VOXNEXUS_STT_URL": standin.stt_url,
        "VOXNEXUS_TTS_URL": standin.tts_url,
        "IVR_NO_INPUT_S": "60",  # no re-prompt of its own while a test waits
        **env,
    }
    return Settings.from_env(values, dotenv=False)


def standin(**behaviour: object) -> VoxNexusStandIn:
    return VoxNexusStandIn(VoxNexusBehaviour(api_key=KEY, **behaviour))  # type: ignore[arg-type]


def saying(standin: VoxNexusStandIn, text: str) -> TtsSocket | None:
    """The TTS socket that was given `text` (one socket per bot reply), if any."""
    for socket in standin.tts_sockets:
        if text in " ".join(socket.texts):
            return socket
    return None


def spoken_texts(standin: VoxNexusStandIn) -> list[str]:
    """Every text the TTS sockets were given, reply by reply."""
    return [" ".join(t for t in socket.texts if t) for socket in standin.tts_sockets if socket.texts]


def played_out(caller: TwilioCaller) -> bool:
    """All the bot audio received has played and its last mark came back as played."""
    return caller.idle and bool(caller.marks_received) and caller.marks_received[-1] in caller.marks_played


async def reply_played(
    standin: VoxNexusStandIn, caller: TwilioCaller, text: str, since: int = 0
) -> TtsSocket:
    """Wait until the reply saying `text` was synthesised in full, all of its audio reached
    the caller (`since`: the caller's `received_total` before the reply began; 8 kHz PCM16
    from the stand-in is a mu-law byte a sample) and it has played."""

    def done() -> bool:
        socket = saying(standin, text)
        return (
            socket is not None
            and socket.final_sent
            and caller.received_total - since >= len(socket.audio) // 2
            and played_out(caller)
        )

    await caller.wait_for(done, WAIT)
    socket = saying(standin, text)
    assert socket is not None
    return socket


async def greeting_played(standin: VoxNexusStandIn, caller: TwilioCaller) -> TtsSocket:
    return await reply_played(standin, caller, GREETING)


# -- the demo IVR flow -------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_the_demo_ivr_greets_through_voxnexus_hears_support_and_answers(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="ivr_bridge")
    async with standin(transcripts=["I would like support."]) as voxnexus:
        settings = voxnexus_settings(voxnexus)
        bridge = make_bridge(settings)
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            greeting = await greeting_played(voxnexus, caller)
            heard_greeting = len(caller.received)
            await caller.say(speech(800))
            support = await reply_played(voxnexus, caller, SUPPORT, since=heard_greeting)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)

    # The greeting: the flow's text to the TTS socket, its audio to the caller with marks.
    assert greeting is voxnexus.tts_sockets[0]  # the socket `start` checked the key on
    assert greeting.texts[:2] == [
        "Welcome to Example Company.",
        "Say sales, support, or press 0 for an agent.",
    ]
    assert greeting.inits[0]["sample_rate"] == 8000 and greeting.inits[0]["format"] == "wav"
    assert greeting.closed  # a reply's socket is not kept
    assert 0 <= heard_greeting - len(greeting.audio) // 2 < 160  # all of it, in whole 20 ms frames
    assert abs(dominant_hz(caller.received[:heard_greeting]) - 440) < 10  # the stand-in's voice
    assert len(caller.marks_played) >= 10 and caller.marks_flushed == [] and caller.clears == 0
    assert caller.violations == []

    # The caller's words: up the STT socket at 8 kHz, flushed at the turn's end, and heard.
    [stt] = voxnexus.stt_sockets
    assert stt.inits[0]["sample_rate"] == 8000 and stt.audio_bytes >= 2 * 8000 * 0.8
    assert stt.flushes >= 1 and [m["text"] for m in stt.transcripts(final=True)] == ["I would like support."]
    # ... and the flow answered them with the support branch, on a socket of its own.
    assert spoken_texts(voxnexus) == [GREETING, SUPPORT]
    assert support is not greeting and support.final_sent

    lines = [(line.role, line.text, line.interrupted) for line in call.transcript]
    assert lines == [
        ("assistant", GREETING, False),
        ("user", "I would like support.", False),
        ("assistant", SUPPORT, False),
    ]
    assert call.provider == "voxnexus" and call.outcome == "stream_stopped"
    assert 0 < call.stats.turn_ms["total_ms"][0] < 5000

    # The key: a secret the log redactor knows, and in no log line at any level.
    assert KEY in settings.secret_values()
    assert any(r.name.startswith("ivr_bridge") for r in caplog.records)
    assert KEY not in caplog.text


@pytest.mark.timeout(120)
async def test_talking_over_a_reply_still_streaming_clears_it_and_closes_its_socket(make_bridge) -> None:
    # The greeting's 4.3 s of audio take 2.9 s to arrive (SLOW_TTS): still arriving when cut.
    async with standin(transcripts=["I would like support."], speedup=SLOW_TTS) as voxnexus:
        bridge = make_bridge(voxnexus_settings(voxnexus))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.wait_for(lambda: len(caller.marks_played) >= 3, WAIT)  # some of it heard
            greeting = voxnexus.tts_sockets[0]
            assert not greeting.final_sent
            await caller.say(speech(800))  # the caller talks over it
            await caller.wait_for(lambda: caller.clears >= 1, WAIT)
            cleared_at = caller.received_total
            await voxnexus.wait_for(lambda: greeting.closed, WAIT)
            # The caller's words were a turn: the flow answers them.
            support = await reply_played(voxnexus, caller, SUPPORT, since=cleared_at)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)

    assert caller.clears == 1 and call.stats.barge_ins == 1
    # Nothing of the cut reply reached the caller after the clear: what came after it is
    # the answer's audio (8 kHz PCM16 from the stand-in: a mu-law byte a sample, in whole
    # 20 ms frames), no more.
    timeline = caller.timeline
    after_clear = sum(timeline.media_bytes[timeline.clear_after_media[0] :])
    answer = len(support.audio) // 2
    assert answer <= after_clear < answer + 160, (after_clear, answer)
    [cut] = [response for response in call.playback.responses if response.interrupted]
    assert 0 < cut.heard_ms <= cut.sent_ms
    # The stand-in had more to send (it has no cancel): the bridge closed the socket.
    assert not greeting.final_sent and greeting.closed

    # The record: the greeting's line cut where the caller talked, with what they heard.
    [cut_line] = [line for line in call.transcript if line.interrupted]
    assert cut_line.role == "assistant" and cut_line.text == GREETING
    assert 0 < cut_line.heard_ms <= cut_line.sent_ms < 4000
    assert cut_line.heard_text is not None and GREETING.startswith(cut_line.heard_text)
    assert len(cut_line.heard_text) < len(GREETING)
    assert ("user", "I would like support.") in [(line.role, line.text) for line in call.transcript]
    assert spoken_texts(voxnexus) == [GREETING, SUPPORT]
    record = await record_of(bridge.settings, caller.call_sid)
    [stored] = [line for line in record["transcript"] if line.get("interrupted")]
    assert stored["heard_ms"] == cut_line.heard_ms and stored["text"] == GREETING


@pytest.mark.timeout(120)
async def test_a_key_in_the_demo_ivr_transfers_to_sales_after_the_prompt(make_bridge, twilio_rest) -> None:
    rest, rest_url = twilio_rest
    async with standin() as voxnexus:
        bridge = make_bridge(with_rest(voxnexus_settings(voxnexus), rest, rest_url))
        caller = await signed_caller(bridge, rest.auth_token)
        rest.live_calls.add(caller.call_sid)
        async with caller:
            await greeting_played(voxnexus, caller)
            await caller.dtmf("1")  # sales
            [update] = await asyncio.to_thread(rest.wait_for_updates, 1, WAIT)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert "<Dial>+15550101</Dial>" in update.params["Twiml"]
    sales = saying(voxnexus, "Connecting you to sales.")
    assert sales is not None and sales.final_sent  # spoken in full...
    assert update.at >= caller.marks_played_at[-1]  # ... and played before the transfer
    assert call.outcome == "transferred"
    assert ("dtmf", "1") in [(line.role, line.text) for line in call.transcript]


@pytest.mark.timeout(120)
async def test_a_turn_finalised_at_the_flush_after_one_finalised_before_it_is_heard(make_bridge) -> None:
    # The recogniser ends the first utterance by itself (300 ms of silence: before the bridge's
    # 600 ms) and the second only when the bridge flushes: a service does either, turn by turn.
    script = ["I would like support.", "Four two one five."]
    async with standin(transcripts=script, end_of_speech_ms=300) as voxnexus:
        # A lost turn shows as the no-input re-prompt 3 s later, instead of the answer.
        bridge = make_bridge(voxnexus_settings(voxnexus, IVR_NO_INPUT_S="3"))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await greeting_played(voxnexus, caller)
            before = caller.received_total
            await caller.say(speech(800))
            await reply_played(voxnexus, caller, SUPPORT, since=before)
            voxnexus.behaviour.end_of_speech_ms = 60_000  # from now on, finals only at a flush
            await caller.say(speech(800))
            await voxnexus.wait_for(lambda: len(spoken_texts(voxnexus)) >= 3, WAIT)  # the next reply
            await caller.hang_up()
        await bridge.wait_for_calls(1)
    [stt] = voxnexus.stt_sockets
    assert [m["text"] for m in stt.transcripts(final=True)] == script  # both were recognised...
    answers = spoken_texts(voxnexus)
    assert answers[2].startswith("Your account number is 4 2 1 5."), answers  # ... and answered


@pytest.mark.timeout(120)
async def test_a_refused_key_ends_the_call_without_the_key_in_any_log_line(make_bridge, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="ivr_bridge")
    async with standin() as voxnexus:
        settings = voxnexus_settings(voxnexus, VOXNEXUS_API_KEY=KEY[::-1], IVR_RECONNECT_BUDGET_S="0")
        bridge = make_bridge(settings)
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.wait_closed(WAIT)
        [call] = await bridge.wait_for_calls(1, timeout=WAIT)
    assert voxnexus.refused >= 1 and voxnexus.stt_sockets == []
    assert call.outcome in ("voice_api_unreachable", "voice_api_failed")
    assert "HTTP 401" in caplog.text
    assert KEY[::-1] in settings.secret_values()
    assert KEY[::-1] not in caplog.text and KEY not in caplog.text


# -- the llm dialogue step ---------------------------------------------------------------------


def llm_env(llm: LlmStandIn) -> dict[str, str]:
    return {
        "IVR_DIALOGUE": "llm",
        "IVR_LLM_URL": f"{llm.url}/v1",
        "IVR_LLM_MODEL": "test-model",
        "IVR_LLM_API_KEY": DEFAULT_KEY,
    }


@pytest.mark.timeout(120)
async def test_the_model_hears_the_caller_and_its_reply_is_spoken_sentence_by_sentence(
    make_bridge, caplog
) -> None:
    first = "Sure, I can help with that."
    rest = " Let me look at your account now. It will take a moment."
    answer = Reply(first + rest, hold_after=len(first) // 4 + 2)  # held a few words past the first sentence
    async with (
        LlmStandIn([Reply("Hello! How can I help you today?"), answer], chunk_chars=4) as llm,
        standin(transcripts=["I would like support."]) as voxnexus,
    ):
        bridge = make_bridge(voxnexus_settings(voxnexus, **llm_env(llm)))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await reply_played(voxnexus, caller, "Hello! How can I help you today?")
            before = caller.received_total
            await caller.say(speech(800))
            # The first sentence goes to the TTS, and a second of its speech (of 1.6 s) to
            # the caller, while the model is still writing: the stand-in holds its stream.
            await caller.wait_for(lambda: caller.received_total - before >= 8000, WAIT)
            request = llm.requests[-1]
            assert request.holding and not request.completed
            reply = saying(voxnexus, first)
            assert reply is not None and reply.texts == [first]
            llm.release()
            await reply_played(voxnexus, caller, "It will take a moment.", since=before)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)

    # The caller's (heard) words reached the model as a user message, after the greeting.
    assert request.authorized and request.body["stream"] is True and request.body["model"] == "test-model"
    messages = [(m["role"], m["content"]) for m in request.messages[1:]]
    assert messages[-2:] == [
        ("assistant", "Hello! How can I help you today?"),
        ("user", "I would like support."),
    ]
    # Each sentence went to the TTS socket as it was complete: three texts, then the end.
    assert reply.texts == [first, "Let me look at your account now.", "It will take a moment.", ""]
    assert reply.spoken == reply.texts[:3]
    said = [(line.role, line.text) for line in call.transcript]
    assert ("user", "I would like support.") in said
    assert ("assistant", first + rest) in said
    assert DEFAULT_KEY not in caplog.text and KEY not in caplog.text


LONG_SENTENCE = "Sure, I can help with that, it is really no trouble at all for me."


async def cut_while_the_model_writes(make_bridge) -> tuple[LlmStandIn, VoxNexusStandIn, Call]:  # type: ignore[no-untyped-def]
    """A call whose second reply the caller talks over while the model is still writing it
    (the stand-in holds its stream after the first sentence) and its first sentence's 4 s of
    speech are still arriving (SLOW_TTS)."""
    answer = Reply(
        LONG_SENTENCE + " Let me look at your account now.", hold_after=len(LONG_SENTENCE) // 4 + 2
    )
    replies = [Reply("Hello! How can I help you today?"), answer, Reply("Okay.")]
    async with (
        LlmStandIn(replies, chunk_chars=4) as llm,
        standin(transcripts=["I would like support.", "Wait."], speedup=SLOW_TTS) as voxnexus,
    ):
        bridge = make_bridge(voxnexus_settings(voxnexus, **llm_env(llm)))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await reply_played(voxnexus, caller, "Hello! How can I help you today?")
            before = caller.received_total
            await caller.say(speech(800))
            await caller.wait_for(lambda: caller.received_total - before >= 8000, WAIT)  # 1 s of 4
            assert llm.requests[-1].holding
            await caller.say(speech(800))  # over the reply
            await caller.wait_for(lambda: caller.clears >= 1, WAIT)
            await llm.wait_for(lambda: len(llm.requests) == 3 and llm.requests[-1].completed, WAIT)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    return llm, voxnexus, call


@pytest.mark.timeout(120)
async def test_a_reply_cut_while_the_model_writes_keeps_its_words_in_the_record(make_bridge) -> None:
    llm, voxnexus, call = await cut_while_the_model_writes(make_bridge)
    assert llm.requests[1].disconnected  # the model's stream was cancelled
    cuts = [line for line in call.transcript if line.interrupted]
    assert len(cuts) == 1, [(line.role, line.text) for line in call.transcript]
    cut = cuts[0]
    assert cut.heard_ms > 0
    spoken = saying(voxnexus, LONG_SENTENCE)
    assert spoken is not None and spoken.closed and not spoken.final_sent  # cut mid-sentence
    assert cut.text == LONG_SENTENCE  # what went to the TTS
    assert cut.heard_text and LONG_SENTENCE.startswith(cut.heard_text)


@pytest.mark.timeout(120)
async def test_the_model_s_history_keeps_only_what_the_caller_heard_of_a_cut_reply(make_bridge) -> None:
    llm, voxnexus, call = await cut_while_the_model_writes(make_bridge)
    [cut] = [response for response in call.playback.responses if response.interrupted]
    assert 0 < cut.heard_ms < 3000
    history = [m["content"] for m in llm.requests[2].messages if m["role"] == "assistant"]
    kept = history[-1]
    assert LONG_SENTENCE.startswith(kept)
    # The stand-in speaks 60 ms a character: the words in the first `heard_ms` of it, one spare.
    words = LONG_SENTENCE.split()
    heard_share = cut.heard_ms / (len(LONG_SENTENCE) * voxnexus.behaviour.ms_per_char)
    assert len(kept.split()) <= int(len(words) * heard_share) + 1, (kept, cut.heard_ms)


@pytest.mark.timeout(120)
async def test_a_reply_whose_audio_pauses_is_recorded_whole(make_bridge) -> None:
    # 100 ms of speech every 400 ms: a TTS that stalls mid-reply, as between two sentences.
    async with (
        LlmStandIn([Reply("Hi there, welcome.")]) as llm,
        standin(speedup=0.25) as voxnexus,
    ):
        bridge = make_bridge(voxnexus_settings(voxnexus, **llm_env(llm)))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            greeting = await reply_played(voxnexus, caller, "Hi there, welcome.")
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    spoken_ms = len(greeting.audio) // 2 // 8  # 8 kHz PCM16 from the stand-in
    lines = [(line.role, line.text, line.heard_ms, line.sent_ms) for line in call.transcript]
    assert len(lines) == 1 and lines[0][:2] == ("assistant", "Hi there, welcome.")
    assert abs(lines[0][3] - spoken_ms) < 20 and lines[0][2] == lines[0][3], (lines, spoken_ms)


@pytest.mark.timeout(120)
async def test_the_model_s_transfer_call_transfers_after_its_sentence(make_bridge, twilio_rest) -> None:
    rest, rest_url = twilio_rest
    async with (
        LlmStandIn(chunk_chars=4) as llm,  # its own dialogue: "agent" calls transfer_call
        standin(transcripts=["Can I talk to an agent?"]) as voxnexus,
    ):
        settings = with_rest(voxnexus_settings(voxnexus, **llm_env(llm)), rest, rest_url)
        bridge = make_bridge(settings)
        caller = await signed_caller(bridge, rest.auth_token)
        rest.live_calls.add(caller.call_sid)
        async with caller:
            await reply_played(voxnexus, caller, "Hello! How can I help you today?")
            await caller.say(speech(800))
            [update] = await asyncio.to_thread(rest.wait_for_updates, 1, WAIT)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert llm.requests[-1].last_user == "Can I talk to an agent?"
    assert f"<Dial>{DEFAULT_TRANSFER_TO}</Dial>" in update.params["Twiml"]
    sentence = saying(voxnexus, "Transferring you now.")
    assert sentence is not None and sentence.final_sent
    assert update.at >= caller.marks_played_at[-1]  # the sentence played first
    assert call.outcome == "transferred"
    record = await record_of(bridge.settings, caller.call_sid, "transferred")
    [action] = [e for e in record["events"] if e["type"] == "agent.action"]
    assert action["data"]["action"] == f"transfer:{DEFAULT_TRANSFER_TO}"


# -- the hook dialogue step --------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_signed_turn_to_the_hook_is_answered_spoken_and_acted_on(make_bridge, twilio_rest) -> None:
    rest, rest_url = twilio_rest
    hook_env = {"IVR_DIALOGUE": "hook", "IVR_HOOK_SECRET": HOOK_SECRET}
    async with (
        DialogueHookStandIn(HOOK_SECRET) as hook,  # its own dialogue: "agent" transfers
        standin(transcripts=["I need an agent, please."]) as voxnexus,
    ):
        env = hook_env | {"IVR_DIALOGUE_URL": f"{hook.url}/turns"}
        bridge = make_bridge(with_rest(voxnexus_settings(voxnexus, **env), rest, rest_url))
        caller = await signed_caller(bridge, rest.auth_token)
        rest.live_calls.add(caller.call_sid)
        async with caller:
            greeting = "Hello, this is the dialogue stand-in. Say agent for a person, or bye."
            await reply_played(voxnexus, caller, greeting)
            await caller.say(speech(800))
            [update] = await asyncio.to_thread(rest.wait_for_updates, 1, WAIT)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)

    assert hook.rejected == 0
    start, turn = hook.turns
    assert (start.kind, turn.kind, turn.text) == ("start", "speech", "I need an agent, please.")
    assert turn.body["call_sid"] == caller.call_sid
    assert turn.history == [{"role": "bot", "text": greeting, "cut": False}]
    signature = turn.headers[SIGNATURE_HEADER.lower()]
    assert verify(HOOK_SECRET, turn.raw, signature, time.time())
    assert not verify("another-secret", turn.raw, signature, time.time())

    # Its `say` spoken in full and played, then its action carried out.
    said = saying(voxnexus, "Transferring you now.")
    assert said is not None and said.final_sent
    assert f"<Dial>{DEFAULT_TRANSFER_TO}</Dial>" in update.params["Twiml"]
    assert update.at >= caller.marks_played_at[-1]
    assert call.outcome == "transferred"
