"""OpenAI Realtime (GA): the protocol class in memory, and whole calls over loopback
against the stand-in: mu-law through untouched both ways, barge-in with late deltas of the
cut response dropped and a truncate at what the caller heard, a server that answers
another format than asked."""

from __future__ import annotations

import json
from base64 import b64encode

import pytest

from ivr_bridge.audio import TWILIO_AUDIO, Pcm, Ulaw
from ivr_bridge.providers.base import AssistantAudio, Interruption, ProviderError, TurnEvent, UserTranscript
from ivr_bridge.providers.openai_realtime import OpenAiRealtimeProtocol, OpenAiSettings
from ivr_bridge.settings import Settings
from ivr_bridge.standins.openai_realtime import OpenAiRealtimeStandIn, RealtimeBehaviour
from ivr_bridge.standins.twilio import TwilioCaller
from tests.call_harness import until
from tests.test_end_to_end import tone_ulaw

KEY = "sk-test-realtime"


def delta(response: str, item: str, audio: bytes) -> str:
    return json.dumps(
        {
            "type": "response.output_audio.delta",
            "response_id": response,
            "item_id": item,
            "delta": b64encode(audio).decode(),
        }
    )


def updated(output: dict) -> str:
    audio = {"input": {"format": {"type": "audio/pcmu"}}, "output": {"format": output}}
    return json.dumps({"type": "session.updated", "session": {"type": "realtime", "audio": audio}})


def test_the_session_asks_for_mulaw_both_ways_in_the_ga_shape() -> None:
    update = json.loads(OpenAiRealtimeProtocol(voice="marin").session_update())
    session = update["session"]
    assert update["type"] == "session.update" and session["type"] == "realtime"
    assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert session["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "marin"}
    assert session["audio"]["input"]["turn_detection"]["interrupt_response"] is True
    text = json.dumps(update)
    assert "g711_ulaw" not in text and "input_audio_format" not in text  # beta shapes: refused


def test_deltas_are_numbered_per_response_and_truncation_is_clamped() -> None:
    protocol = OpenAiRealtimeProtocol()
    protocol.receive(updated({"type": "audio/pcmu"}))
    assert protocol.send_format == protocol.receive_format == TWILIO_AUDIO
    [first] = protocol.receive(delta("resp_a", "item_a", b"\x01" * 800))  # 100 ms of mu-law
    [again] = protocol.receive(delta("resp_a", "item_a", b"\x02" * 800))
    [second] = protocol.receive(delta("resp_b", "item_b", b"\x03" * 160))
    assert (
        isinstance(first, AssistantAudio)
        and isinstance(first.pcm, Ulaw)
        and bytes(first.pcm) == b"\x01" * 800
    )
    assert (first.response, again.response, second.response) == (1, 1, 2)
    assert protocol.receive(json.dumps({"type": "input_audio_buffer.speech_started"})) == [
        Interruption("caller speech (server VAD)")
    ]
    [cut] = [json.loads(m) for m in protocol.heard(1, heard_ms=150)]
    assert cut == {
        "type": "conversation.item.truncate",
        "item_id": "item_a",
        "content_index": 0,
        "audio_end_ms": 150,
    }
    [cut] = [json.loads(m) for m in protocol.heard(1, heard_ms=5000)]
    assert cut["audio_end_ms"] == 200  # never past what came
    assert protocol.heard(1, heard_ms=0) == []  # nothing heard: the API refuses a truncate at 0
    benign = {"type": "error", "error": {"code": "response_cancel_not_active", "message": "x"}}
    assert protocol.receive(json.dumps(benign)) == []
    real = {"type": "error", "error": {"code": "invalid_value", "message": "bad"}}
    assert protocol.receive(json.dumps(real)) == [ProviderError("invalid_value", "bad")]


def test_a_replys_words_are_kept_as_they_come_for_a_reply_cut_before_its_done() -> None:
    protocol = OpenAiRealtimeProtocol()
    protocol.receive(updated({"type": "audio/pcmu"}))
    pieces = [
        {"type": "response.output_audio_transcript.delta", "response_id": "resp_a", "delta": d}
        for d in ("Hi", " there")
    ]
    texts = [event for piece in pieces for event in protocol.receive(json.dumps(piece))]
    assert [(t.text, t.final, t.response) for t in texts] == [("Hi", False, 1), ("Hi there", False, 1)]
    [audio] = protocol.receive(delta("resp_a", "item_a", b"\x01" * 160))
    assert audio.response == 1


def test_a_reply_of_several_items_is_cut_where_the_caller_was_in_it() -> None:
    protocol = OpenAiRealtimeProtocol()
    protocol.receive(updated({"type": "audio/pcmu"}))
    protocol.receive(delta("resp_a", "preamble", b"\x01" * 4800))  # 600 ms
    protocol.receive(delta("resp_a", "answer", b"\x02" * 8000))  # 1000 ms
    in_answer = [json.loads(m) for m in protocol.heard(1, heard_ms=1000)]
    assert in_answer == [
        {"type": "conversation.item.truncate", "item_id": "answer", "content_index": 0, "audio_end_ms": 400}
    ]
    in_preamble = [json.loads(m) for m in protocol.heard(1, heard_ms=250)]
    assert [(m["type"], m["item_id"]) for m in in_preamble] == [
        ("conversation.item.truncate", "preamble"),
        ("conversation.item.delete", "answer"),  # none of it was heard
    ]
    assert in_preamble[0]["audio_end_ms"] == 250


def test_pcm_from_a_server_that_ignored_the_request_is_converted_not_played_as_mulaw() -> None:
    protocol = OpenAiRealtimeProtocol()
    protocol.receive(updated({"type": "audio/pcm", "rate": 24000}))
    [audio] = protocol.receive(delta("r", "i", b"\x10\x00" * 240))
    assert isinstance(audio, AssistantAudio) and isinstance(audio.pcm, Pcm) and audio.pcm.sample_rate == 24000


def openai_settings(standin: OpenAiRealtimeStandIn, **more: object) -> Settings:
    return Settings(
        provider="openai",
        voice=OpenAiSettings(api_key=KEY, url=standin.url),
        upstream_chunk_ms=20,
        **more,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("transcript_first", [False, True])  # the service sends it either side
async def test_a_turn_passes_mulaw_through_untouched_both_ways(make_bridge, transcript_first: bool) -> None:
    async with OpenAiRealtimeStandIn(RealtimeBehaviour(transcript_first=transcript_first)) as standin:
        bridge = make_bridge(openai_settings(standin))
        said = tone_ulaw(600, hz=500)
        details = {"From": "+15550001111"}
        async with TwilioCaller(bridge.stream_url, continuous=True, custom_parameters=details) as caller:
            await caller.say(said)
            await caller.wait_for(lambda: len(caller.received) >= 8 * 900, 20)  # played, in order
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [peer] = standin.peers
    assert said in bytes(peer.appended)  # the caller's payload went up byte for byte
    sent, heard = b"".join(peer.deltas), bytes(caller.received)
    assert len(heard) >= 8 * 900 and heard == sent[: len(heard)]  # byte for byte, re-framed only
    assert call.outcome == "stream_stopped" and call.provider == "openai"
    assert standin.session_updates[0]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert "caller number: +15550001111" in standin.session_updates[0]["instructions"]  # the call's details
    # Wherever the transcript came, one turn, timed from speech_stopped to the reply's first audio.
    assert call.stats.turns == 1 and len(call.stats.reply_ms) == 1


def test_the_callers_words_arrive_apart_from_the_end_of_the_turn() -> None:
    protocol = OpenAiRealtimeProtocol()
    stopped = json.dumps({"type": "input_audio_buffer.speech_stopped", "item_id": "item_1"})
    words = {"type": "conversation.item.input_audio_transcription.completed", "transcript": "hi"}
    assert protocol.receive(stopped) == [TurnEvent("end", "item_1")]
    assert protocol.receive(json.dumps(words)) == [UserTranscript("hi", final=True, ends_turn=False)]


def test_the_sixty_minute_close_is_a_renewal_and_other_closes_are_not() -> None:
    cap = OpenAiRealtimeProtocol.classify(1001, "Your session hit the maximum duration of 60 minutes.")
    assert cap.renew and not cap.normal
    assert not OpenAiRealtimeProtocol.classify(1001, "going away").renew
    assert not OpenAiRealtimeProtocol.classify(4000, "beta_api_shape_disabled").retryable


async def test_a_session_closed_at_the_service_cap_is_renewed_not_reported(make_bridge) -> None:
    async with OpenAiRealtimeStandIn() as standin:
        bridge = make_bridge(openai_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.say(tone_ulaw(600, hz=500))
            await caller.wait_for(lambda: len(caller.received) >= 8 * 900 and not caller.playing, 20)
            await standin.close_sessions(1001, "Your session hit the maximum duration of 60 minutes.")
            await until(lambda: standin.opened >= 2, 30)
            before = len(caller.received)
            await caller.say(tone_ulaw(600, hz=500))  # the new session answers
            await caller.wait_for(lambda: len(caller.received) - before >= 8 * 900, 20)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "stream_stopped"
    assert (call.stats.renewals, call.stats.reconnects, call.keeper.close_code) == (1, 0, None)


async def test_barge_in_drops_late_deltas_and_truncates_at_what_was_heard(make_bridge) -> None:
    async with OpenAiRealtimeStandIn(RealtimeBehaviour(reply_ms=3000, late_deltas=3)) as standin:
        bridge = make_bridge(openai_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.say(tone_ulaw(600, hz=500))
            await caller.wait_for(lambda: len(caller.marks_played) >= 2, 20)  # some of the reply was heard
            await caller.say(tone_ulaw(400, hz=700))  # the caller talks over it
            await caller.wait_for(lambda: caller.clears >= 1, 20)
            await caller.wait_for(lambda: len(standin.truncations) == 1 or bool(standin.errors_sent), 20)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [cut] = standin.truncations
    assert 0 < cut["audio_end_ms"] <= cut["item_ms"]  # what was heard, never past what was sent
    assert standin.errors_sent == []
    [reply] = call.playback.responses[:1]
    assert reply.interrupted and abs(cut["audio_end_ms"] - reply.heard_ms) <= 1
    # The late deltas of the cut response were not played: nothing of reply 1 after the clear.
    assert call.stats.barge_ins == 1


@pytest.mark.parametrize("in_preamble", [False, True])
async def test_a_reply_in_two_items_is_cut_in_the_item_being_heard(make_bridge, in_preamble: bool) -> None:
    # A spoken preamble, then the answer, in one response (sent faster than real time, so
    # both have arrived when the caller talks over the preamble).
    preamble_ms = 2000 if in_preamble else 600
    behaviour = RealtimeBehaviour(preamble_ms=preamble_ms, reply_ms=3000, late_deltas=3)
    async with OpenAiRealtimeStandIn(behaviour) as standin:
        bridge = make_bridge(openai_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.say(tone_ulaw(600, hz=500))
            await caller.wait_for(lambda: len(caller.marks_played) >= 10, 20)  # a second heard
            await until(lambda: len(standin.peers[0].items) == 2, 20)  # the answer is under way
            await caller.say(tone_ulaw(400, hz=700))
            await caller.wait_for(lambda: len(standin.truncations) == 1 or bool(standin.errors_sent), 20)
            await until(lambda: len(standin.deleted) == in_preamble, 20)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [peer] = standin.peers
    preamble, answer = list(peer.items)[:2]
    [cut] = standin.truncations
    [reply] = call.playback.responses[:1]
    assert reply.interrupted and standin.errors_sent == []
    if in_preamble:  # the answer went unheard: out of the model's context
        assert reply.heard_ms < preamble_ms and standin.deleted == [answer]
        assert cut["item_id"] == preamble and abs(cut["audio_end_ms"] - reply.heard_ms) <= 1
    else:  # the offset is the answer's own
        assert reply.heard_ms > preamble_ms and standin.deleted == []
        assert cut["item_id"] == answer and abs(cut["audio_end_ms"] - (reply.heard_ms - preamble_ms)) <= 1


@pytest.mark.parametrize("lie", [True])
async def test_a_server_answering_pcm_is_converted(make_bridge, lie: bool) -> None:
    async with OpenAiRealtimeStandIn(RealtimeBehaviour(lie_about_format=lie)) as standin:
        bridge = make_bridge(openai_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.say(tone_ulaw(600, hz=500))
            await caller.wait_for(lambda: caller.received_total >= 8 * 900, 20)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [peer] = standin.peers
    assert peer.session["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert call.outcome == "stream_stopped" and call.stats.frames_out >= 45  # about a second of speech


async def test_the_agent_transfers_the_call_after_its_sentence(make_bridge, twilio_rest) -> None:
    from tests.test_resilience import signed_caller, with_rest
    from tests.test_routing import record_of

    rest, rest_url = twilio_rest
    behaviour = RealtimeBehaviour(reply_ms=1200, tool_after_reply=("transfer_call", {"to": "+15550100"}))
    async with OpenAiRealtimeStandIn(behaviour) as standin:
        bridge = make_bridge(with_rest(openai_settings(standin), rest, rest_url))
        caller = await signed_caller(bridge, rest.auth_token)
        rest.live_calls.add(caller.call_sid)
        async with caller:
            await caller.say(tone_ulaw(600, hz=500))
            [update] = await __import__("asyncio").to_thread(rest.wait_for_updates, 1, 20)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert "<Dial>+15550100</Dial>" in update.params["Twiml"]
    assert update.at >= caller.marks_played_at[-1]  # the agent's sentence played first
    assert call.outcome == "transferred"
    [output] = [i for i in standin.items_created if i.get("type") == "function_call_output"]
    assert "+15550100" in output["output"]
    record = await record_of(bridge.settings, caller.call_sid, "transferred")
    [control] = [e for e in record["events"] if e["type"] == "control"]
    assert control["data"]["source"] == "agent" and control["data"]["played_out"] is True
