"""One contract, every voice API: over real loopback sockets, each provider (with its
stand-in) carries a whole turn - the caller speaks, hears a reply in whole frames with its
marks played, hangs up - and a barge-in that clears the caller and drops the rest of the
cut reply. Each networked provider also survives its API closing: normally (the call ends
as the API's doing), with a retryable error (a new session, and the call goes on), with an
error not worth retrying (the call ends, no retry), and a planned renewal before the
session cap. Provider-specific awkward parts live in each provider's own test module."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from ivr_bridge.call import Call
from ivr_bridge.providers.elevenlabs import ElevenLabsSettings
from ivr_bridge.providers.navtalk import NavTalkSettings
from ivr_bridge.providers.openai_realtime import OpenAiSettings
from ivr_bridge.settings import Settings
from ivr_bridge.standins.elevenlabs import AgentBehaviour, ElevenLabsStandIn
from ivr_bridge.standins.navtalk import NavTalkBehaviour, NavTalkStandIn
from ivr_bridge.standins.nextevi import VoiceApiBehaviour
from ivr_bridge.standins.openai_realtime import OpenAiRealtimeStandIn, RealtimeBehaviour
from ivr_bridge.standins.twilio import TwilioCaller
from tests.call_harness import until
from tests.test_end_to_end import nextevi_settings, tone_ulaw, voice_api

PROVIDERS = ["echo", "nextevi", "openai", "elevenlabs", "navtalk"]


NETWORKED = PROVIDERS[1:]  # echo has no API to close


@contextlib.asynccontextmanager
async def upstream(name: str, reply_ms: int) -> AsyncIterator[tuple[Settings, Any]]:
    """The provider's settings, and its stand-in running behind them (None for echo)."""
    if name == "echo":
        yield Settings(provider="echo"), None
    elif name == "nextevi":
        async with voice_api(VoiceApiBehaviour(reply_ms=reply_ms)) as standin:
            yield nextevi_settings(standin), standin
    elif name == "openai":
        async with OpenAiRealtimeStandIn(RealtimeBehaviour(reply_ms=reply_ms)) as standin:
            voice = OpenAiSettings(api_key=standin.behaviour.api_key, url=standin.url)
            yield Settings(provider="openai", voice=voice), standin
    elif name == "elevenlabs":
        async with ElevenLabsStandIn(AgentBehaviour(greeting_ms=0, reply_ms=reply_ms)) as standin:
            voice = ElevenLabsSettings(agent_id="agent_test", url=standin.url)
            yield Settings(provider="elevenlabs", voice=voice), standin
    else:
        async with NavTalkStandIn(NavTalkBehaviour(reply_ms=reply_ms)) as standin:
            voice = NavTalkSettings(license=standin.behaviour.license, character="Sophia", url=standin.url)
            yield Settings(provider="navtalk", voice=voice), standin


async def a_reply_heard(caller: TwilioCaller, whole_ms: int = 780) -> None:
    """The caller speaks and hears the whole reply played."""
    before = len(caller.received)
    await caller.say(tone_ulaw(700, hz=500))
    await caller.wait_for(lambda: len(caller.received) - before >= 8 * whole_ms and not caller.playing, 30)


def count_taken_at_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the caller frames a call sent on from the socket's read callback."""
    taken = [0]
    take_now = Call._take_now

    def counted(call: Call, frame: str) -> bool:
        took = take_now(call, frame)
        taken[0] += took
        return took

    monkeypatch.setattr(Call, "_take_now", counted)
    return taken


@pytest.mark.parametrize("name", PROVIDERS)
async def test_a_turn(make_bridge, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    taken = count_taken_at_once(monkeypatch)
    async with upstream(name, reply_ms=800) as (settings, _):
        bridge = make_bridge(settings)
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.say(tone_ulaw(700, hz=500))
            # The whole reply heard (the echo engine's is the utterance, the stand-ins' 800 ms),
            # not just a pause between two of its chunks.
            whole_ms = 600 if name == "echo" else 780
            await caller.wait_for(lambda: len(caller.received) >= 8 * whole_ms and not caller.playing, 30)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "stream_stopped" and call.provider == name
    assert call.stats.frames_out > 0 and caller.violations == []
    assert len(caller.received) % 160 == 0 or caller.received_total % 160 == 0  # whole frames
    [reply] = call.playback.responses[:1]
    assert not reply.interrupted and reply.heard_ms == reply.sent_ms > 0  # every mark played
    # A session with a socket of its own takes the caller's frames from the read callback,
    # once it is up (the first few, and any behind a queued mark, go through the reader).
    assert taken[0] > call.stats.frames_in // 2 if name != "echo" else taken[0] == 0


@pytest.mark.parametrize("name", PROVIDERS)
async def test_a_barge_in(make_bridge, name: str) -> None:
    async with upstream(name, reply_ms=4000) as (settings, _):
        bridge = make_bridge(settings)
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.say(tone_ulaw(700, hz=500))
            await caller.wait_for(lambda: len(caller.marks_played) >= 2, 30)  # the reply is heard
            await caller.say(tone_ulaw(600, hz=700))  # and talked over
            await caller.wait_for(lambda: caller.clears >= 1, 30)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [cut] = call.playback.responses[:1]
    assert cut.interrupted and 0 < cut.heard_ms < 4000
    assert call.stats.barge_ins >= 1 and call.outcome == "stream_stopped"
    if name != "echo":  # what the caller heard of the cut reply's words (echo's replies have none)
        line = next(line for line in call.transcript if line.role == "assistant")
        assert line.interrupted and line.heard_ms == cut.heard_ms
        assert line.text and line.heard_text is not None and line.text.startswith(line.heard_text)


@pytest.mark.parametrize("name", NETWORKED)
async def test_the_api_ending_the_session_normally_ends_the_call(make_bridge, name: str) -> None:
    async with upstream(name, reply_ms=800) as (settings, standin):
        bridge = make_bridge(settings)
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await a_reply_heard(caller)
            await standin.close_sessions(1000, "conversation over")
            await caller.wait_closed(30)
        [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "voice_api_ended" and call.stats.reconnects == 0
    assert call.keeper.close_code is None


@pytest.mark.parametrize("name", NETWORKED)
async def test_a_retryable_close_reconnects_and_the_call_goes_on(make_bridge, name: str) -> None:
    async with upstream(name, reply_ms=800) as (settings, standin):
        bridge = make_bridge(settings)
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await a_reply_heard(caller)
            await standin.close_sessions(1011, "internal error")
            await until(lambda: standin.opened >= 2, 30)
            await a_reply_heard(caller)  # the new session answers
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "stream_stopped" and call.keeper.close_code == 1011
    assert call.stats.reconnects == 1
    assert [r.interrupted for r in call.playback.responses] == [False, False]


@pytest.mark.parametrize("name", NETWORKED)
async def test_a_close_not_worth_retrying_ends_the_call_without_a_retry(make_bridge, name: str) -> None:
    # 1008 (policy) for the APIs that classify by close code; NavTalk says why before it closes.
    async with upstream(name, reply_ms=800) as (settings, standin):
        bridge = make_bridge(settings)
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await a_reply_heard(caller)
            if name == "navtalk":
                await standin.end_sessions("insufficient_balance")
            else:
                await standin.close_sessions(4001 if name == "nextevi" else 1008, "not allowed")
            await caller.wait_closed(30)
        [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "voice_api_failed" and call.stats.reconnects == 0


@pytest.mark.parametrize("name", NETWORKED)
async def test_the_session_is_renewed_before_its_cap_at_a_quiet_moment(make_bridge, name: str) -> None:
    async with upstream(name, reply_ms=800) as (settings, standin):
        bridge = make_bridge(replace(settings, max_session_s=10.0))  # renewed after 7.5 s, when quiet
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await a_reply_heard(caller)
            await until(lambda: standin.opened >= 2, 30)  # the bridge replaced it
            await a_reply_heard(caller)  # the new session answers
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "stream_stopped" and call.keeper.close_code is None
    assert call.stats.renewals >= 1 and call.stats.reconnects == 0
