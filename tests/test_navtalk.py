"""NavTalk: the protocol class in memory (fields that move, barge-in by generation, how a
session ends), and whole calls over loopback against the stand-in."""

from __future__ import annotations

import json
from base64 import b64encode

from ivr_bridge.audio import Pcm
from ivr_bridge.providers.base import AssistantAudio, AssistantText, Interruption
from ivr_bridge.providers.navtalk import NavTalkProtocol, NavTalkSettings
from ivr_bridge.settings import Settings
from ivr_bridge.standins.navtalk import NavTalkBehaviour, NavTalkStandIn
from ivr_bridge.standins.twilio import TwilioCaller
from tests.test_end_to_end import tone_ulaw

PCM = b64encode(b"\x10\x00" * 2400).decode()  # 100 ms at 24 kHz


def test_fields_in_data_or_at_the_top_and_stale_deltas_after_speech() -> None:
    protocol = NavTalkProtocol()
    [first] = protocol.receive(json.dumps({"type": "realtime.response.audio.delta", "data": {"delta": PCM}}))
    [again] = protocol.receive(
        json.dumps({"type": "realtime.response.audio.delta", "delta": PCM})
    )  # top level
    assert isinstance(first, AssistantAudio) and isinstance(first.pcm, Pcm) and first.pcm.sample_rate == 24000
    assert first.response == again.response == 1
    speech = json.dumps({"type": "realtime.input_audio_buffer.speech_started", "data": {}})
    assert protocol.receive(speech) == [Interruption("caller speech (NavTalk)")]
    assert (
        protocol.receive(json.dumps({"type": "realtime.response.audio.delta", "data": {"delta": PCM}})) == []
    )
    assert protocol.stale_deltas == 1
    protocol.receive(json.dumps({"type": "realtime.input_audio_buffer.speech_stopped"}))
    [later] = protocol.receive(json.dumps({"type": "realtime.response.audio.delta", "data": {"delta": PCM}}))
    assert later.response == 2  # a new reply
    done = {"type": "realtime.response.audio_transcript.done", "transcript": "Hi.", "response_id": "r9"}
    [text] = protocol.receive(json.dumps(done))
    assert isinstance(text, AssistantText) and text.text == "Hi."
    assert protocol.receive(b"\x00binary avatar frame") == []
    balance = {"type": "conversation.connected.insufficient_balance", "message": "Insufficient points"}
    protocol.receive(json.dumps(balance))
    assert protocol.classify(1000, "").retryable is False
    busy = NavTalkProtocol()
    busy.receive(json.dumps({"type": "conversation.connected.gpu_full", "data": {}}))
    assert busy.classify(1006, "").retryable is True


def test_a_replys_words_are_kept_as_they_come_for_a_reply_cut_before_its_done() -> None:
    protocol = NavTalkProtocol()
    words = {"type": "realtime.response.audio_transcript.delta", "data": {"content": "Hi", "id": "r1"}}
    [first] = protocol.receive(json.dumps(words))  # ahead of its speech
    [audio] = protocol.receive(json.dumps({"type": "realtime.response.audio.delta", "data": {"delta": PCM}}))
    more = {"type": "realtime.response.audio_transcript.delta", "delta": " there", "response_id": "r1"}
    [second] = protocol.receive(json.dumps(more))
    assert isinstance(first, AssistantText) and isinstance(second, AssistantText)
    assert (first.text, second.text, second.final) == ("Hi", "Hi there", False)
    assert first.response == audio.response == second.response == 1


def navtalk_settings(standin: NavTalkStandIn, **more: str) -> Settings:
    base = {"license": standin.behaviour.license, "character": "Sophia", "url": standin.url}
    return Settings(provider="navtalk", voice=NavTalkSettings(**(base | more)))


async def test_a_turn_and_a_barge_in_through_navtalk(make_bridge) -> None:
    async with NavTalkStandIn(NavTalkBehaviour(reply_ms=3000, stale_deltas=3)) as standin:
        bridge = make_bridge(navtalk_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.say(tone_ulaw(600, hz=500))
            await caller.wait_for(lambda: len(caller.marks_played) >= 2, 20)  # the reply plays
            await caller.say(tone_ulaw(400, hz=700))  # and is talked over
            await caller.wait_for(lambda: caller.clears >= 1, 20)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [peer] = standin.peers
    assert len(peer.appended) >= 600 * 48  # PCM16 24 kHz went up
    assert call.provider == "navtalk" and call.stats.barge_ins == 1
    assert call.playback.responses[0].interrupted
    assert standin.configs and standin.configs[0]["type"] == "realtime.input_config"


async def test_a_refused_license_and_an_exhausted_balance_end_calls_without_retry(make_bridge) -> None:
    async with NavTalkStandIn(NavTalkBehaviour(reply_ms=300, ending="insufficient_balance")) as standin:
        broke = make_bridge(navtalk_settings(standin))
        async with TwilioCaller(broke.stream_url, continuous=True) as caller:
            await caller.say(tone_ulaw(600, hz=500))
            await caller.wait_closed(30)
        wrong = make_bridge(navtalk_settings(standin, license="nt-wrong"))
        async with TwilioCaller(wrong.stream_url, continuous=True) as refused:
            await refused.wait_closed(30)
        [ended] = await broke.wait_for_calls(1)
        [failed] = await wrong.wait_for_calls(1)
    assert ended.outcome == "voice_api_failed" and ended.stats.reconnects == 0  # no balance: no retry
    assert failed.outcome == "voice_api_unreachable"
