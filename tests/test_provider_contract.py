"""One contract, every voice API: over real loopback sockets, each provider (with its
stand-in) carries a whole turn - the caller speaks, hears a reply in whole frames with its
marks played, hangs up - and a barge-in that clears the caller and drops the rest of the
cut reply. Provider-specific awkward parts live in each provider's own test module."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from ivr_bridge.settings import Settings
from ivr_bridge.standins.elevenlabs import AgentBehaviour, ElevenLabsStandIn
from ivr_bridge.standins.navtalk import NavTalkBehaviour, NavTalkStandIn
from ivr_bridge.standins.nextevi import VoiceApiBehaviour
from ivr_bridge.standins.openai_realtime import OpenAiRealtimeStandIn, RealtimeBehaviour
from ivr_bridge.standins.twilio import TwilioCaller
from tests.test_end_to_end import nextevi_settings, tone_ulaw, voice_api

PROVIDERS = ["echo", "nextevi", "openai", "elevenlabs", "navtalk"]


@contextlib.asynccontextmanager
async def provider(name: str, reply_ms: int) -> AsyncIterator[Settings]:
    """The provider's settings, its stand-in running behind them."""
    if name == "echo":
        yield Settings(provider="echo")
    elif name == "nextevi":
        async with voice_api(VoiceApiBehaviour(reply_ms=reply_ms)) as standin:
            yield nextevi_settings(standin)
    elif name == "openai":
        async with OpenAiRealtimeStandIn(RealtimeBehaviour(reply_ms=reply_ms)) as standin:
            yield Settings(
                provider="openai", openai_api_key=standin.behaviour.api_key, openai_url=standin.url
            )
    elif name == "elevenlabs":
        async with ElevenLabsStandIn(AgentBehaviour(greeting_ms=0, reply_ms=reply_ms)) as standin:
            yield Settings(
                provider="elevenlabs", elevenlabs_agent_id="agent_test", elevenlabs_url=standin.url
            )
    else:
        async with NavTalkStandIn(NavTalkBehaviour(reply_ms=reply_ms)) as standin:
            yield Settings(
                provider="navtalk", navtalk_license=standin.behaviour.license, navtalk_character="Sophia",
                navtalk_url=standin.url,
            )  # fmt: skip


@pytest.mark.parametrize("name", PROVIDERS)
async def test_a_turn(make_bridge, name: str) -> None:
    async with provider(name, reply_ms=800) as settings:
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


@pytest.mark.parametrize("name", PROVIDERS)
async def test_a_barge_in(make_bridge, name: str) -> None:
    async with provider(name, reply_ms=4000) as settings:
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
