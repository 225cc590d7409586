"""Faults survived: the voice API drops and comes back, or never does and the call is
handed to the fallback through Twilio's REST API (a local stand-in of it)."""

from __future__ import annotations

import asyncio
import logging

from ivr_bridge.loadgen.webhook import CallDetails, fetch_stream, stream_headers
from ivr_bridge.providers.nextevi import NextEviSettings
from ivr_bridge.settings import Settings
from ivr_bridge.standins.nextevi import VoiceApiBehaviour
from ivr_bridge.standins.twilio import TwilioCaller
from ivr_bridge.standins.twilio_rest import TwilioRestStandIn
from tests.test_end_to_end import API_KEY, nextevi_settings, tone_ulaw, voice_api


async def signed_caller(bridge, token: str) -> TwilioCaller:  # type: ignore[no-untyped-def]
    """A call placed as Twilio places it once TWILIO_AUTH_TOKEN is set: a signed webhook,
    then a signed stream upgrade carrying the per-call token from the TwiML."""
    details = CallDetails()
    target = await fetch_stream(f"{bridge.base_url}/twiml", details, token)
    return TwilioCaller(
        target.url,
        call_sid=details.call_sid,
        custom_parameters=target.parameters,
        headers=stream_headers(target, token),
        continuous=True,
    )


def with_rest(settings: Settings, rest: TwilioRestStandIn, url: str, **more: object) -> Settings:
    return Settings(
        **{
            **settings.__dict__,
            "twilio_account_sid": rest.account_sid,
            "twilio_auth_token": rest.auth_token,
            "twilio_api_url": url,
            **more,
        }
    )


async def test_retryable_drop_reconnects_and_the_call_goes_on(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO)
    async with voice_api(VoiceApiBehaviour(reply_ms=600)) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            first = await standin.wait_for_session(0)
            await standin.close_session(first, code=1011, reason="internal error")
            second = await standin.wait_for_session(1, timeout=15)
            # The new session serves the caller: a turn gets its reply.
            await caller.say(tone_ulaw(500))
            await caller.wait_for(lambda: len(caller.received) >= 8 * 600, 15)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert call.stats.reconnects == 1 and call.outcome == "stream_stopped"
    assert second.settings is not None and second.connection_id != first.connection_id
    assert second.connection_id.startswith(call.call_sid)
    assert "reconnecting" in caplog.text and "restored" in caplog.text


async def test_non_retryable_close_goes_to_the_fallback_number(make_bridge, twilio_rest) -> None:
    rest, url = twilio_rest
    async with voice_api() as standin:
        bridge = make_bridge(with_rest(nextevi_settings(standin), rest, url, fallback_number="+15550100"))
        async with await signed_caller(bridge, rest.auth_token) as caller:
            rest.live_calls.add(caller.call_sid)
            session = await standin.wait_for_session(0)
            await standin.close_session(session, code=4003, reason="access denied")
            [update] = await asyncio.to_thread(rest.wait_for_updates, 1)
            await caller.wait_closed(10)
        [call] = await bridge.wait_for_calls(1)
    assert update.call_sid == caller.call_sid
    assert "<Dial>+15550100</Dial>" in update.params["Twiml"]
    assert call.outcome == "voice_api_failed" and call.keeper.fallback == "redirected"
    assert len(standin.sessions) == 1  # 4003 is not retried


async def test_unreachable_voice_api_apologises_via_rest_after_the_budget(make_bridge, twilio_rest) -> None:
    rest, url = twilio_rest
    settings = Settings(
        provider="nextevi",
        voice=NextEviSettings(url="ws://127.0.0.1:9/ws/voice", api_key=API_KEY, config_id="c"),
        reconnect_budget_s=1.0,
    )
    bridge = make_bridge(with_rest(settings, rest, url))
    async with await signed_caller(bridge, rest.auth_token) as caller:
        rest.live_calls.add(caller.call_sid)
        [update] = await asyncio.to_thread(rest.wait_for_updates, 1, 15)
        await caller.wait_closed(10)
    [call] = await bridge.wait_for_calls(1)
    assert "<Say>" in update.params["Twiml"] and "<Hangup" in update.params["Twiml"]
    assert call.outcome == "voice_api_unreachable" and call.stats.reconnects == 0


async def test_fallback_for_a_call_already_gone_is_not_an_error(make_bridge, twilio_rest) -> None:
    rest, url = twilio_rest  # the call sid is not live: the REST stand-in answers 20404
    async with voice_api() as standin:
        bridge = make_bridge(with_rest(nextevi_settings(standin), rest, url))
        async with await signed_caller(bridge, rest.auth_token) as caller:
            session = await standin.wait_for_session(0)
            await standin.close_session(session, code=4002)
            await caller.wait_closed(10)
        [call] = await bridge.wait_for_calls(1)
    assert call.keeper.fallback == "call already gone"


async def test_caller_audio_from_the_gap_is_not_forwarded(make_bridge) -> None:
    async with voice_api() as standin:
        settings = nextevi_settings(standin)
        bridge = make_bridge(Settings(**{**settings.__dict__, "reconnect_budget_s": 5.0}))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            first = await standin.wait_for_session(0)
            await standin.close_session(first, code=1001)  # "going away": a server restart
            second = await standin.wait_for_session(1, timeout=15)
            await caller.wait_for(lambda: len(second.audio) >= 4800, 10)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    # Everything the caller streamed reached a session, except what fell in the gap.
    forwarded_ms = (len(first.audio) + len(second.audio)) // 48
    assert forwarded_ms + call.stats.gap_audio_dropped_ms + 100 >= call.stats.frames_in * 20
    assert len(second.audio) // 48 <= call.stats.frames_in * 20 - len(first.audio) // 48


async def test_no_media_from_twilio_ends_the_call_as_idle(make_bridge) -> None:
    bridge = make_bridge(Settings(provider="echo", idle_timeout_s=1.0))
    async with TwilioCaller(bridge.stream_url) as caller:  # connects, then sends nothing
        await caller.wait_closed(15)
    [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "idle"


async def test_session_is_renewed_before_the_provider_cap(make_bridge) -> None:
    async with voice_api(VoiceApiBehaviour(reply_ms=400)) as standin:
        settings = nextevi_settings(standin)
        bridge = make_bridge(Settings(**{**settings.__dict__, "max_session_s": 2.0}))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            first = await standin.wait_for_session(0)
            second = await standin.wait_for_session(1, timeout=15)
            await caller.say(tone_ulaw(500))
            await caller.wait_for(lambda: len(caller.received) >= 8 * 400, 15)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert first.close_code == 1000  # renewed, not dropped
    assert second.replies_started >= 1 and call.stats.renewals >= 1
    assert call.outcome == "stream_stopped" and call.stats.reconnects == 0


class StalledTwilio:
    """A Twilio socket whose reader has stopped: frames go in, sends never complete.

    On loopback the kernel's socket buffers absorb megabytes before a real stall shows,
    so this drives the orchestrator directly."""

    def __init__(self, frames: list[str]) -> None:
        self.frames = frames
        self.closed_with: int | None = None
        self._gone = asyncio.Event()

    async def receive(self) -> str | bytes | None:
        await asyncio.sleep(0)  # a real socket yields to the loop between frames
        if self.frames:
            return self.frames.pop(0)
        await self._gone.wait()
        return None

    async def send(self, text: str) -> None:
        await asyncio.Event().wait()  # never accepted

    async def close(self, code: int = 1000) -> None:
        self.closed_with = code
        self._gone.set()


async def test_stalled_twilio_reader_ends_the_call() -> None:
    import json
    from base64 import b64encode

    from ivr_bridge.call import Call

    sid = "MZ" + "2" * 32
    start = {
        "streamSid": sid,
        "callSid": "CA" + "3" * 32,
        "accountSid": "AC",
        "tracks": ["inbound"],
        "customParameters": {},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    speech = tone_ulaw(600, hz=500) + b"\xff" * 8 * 900  # an utterance, then silence: echo replies
    frames = [json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": sid, "start": start})]
    for i in range(0, len(speech), 160):
        payload = b64encode(speech[i : i + 160]).decode()
        frames.append(json.dumps({"event": "media", "streamSid": sid, "media": {"payload": payload}}))
    twilio = StalledTwilio(frames)
    call = Call(Settings(provider="echo", twilio_send_timeout_s=0.5, idle_timeout_s=60), twilio)
    await asyncio.wait_for(call.run(), 15)
    assert call.outcome == "twilio_stalled"
    assert twilio.closed_with == 1000


async def test_each_drop_gets_a_fresh_reconnect_budget(make_bridge) -> None:
    async with voice_api(VoiceApiBehaviour(reply_ms=400)) as standin:
        settings = nextevi_settings(standin)
        bridge = make_bridge(Settings(**{**settings.__dict__, "reconnect_budget_s": 1.0}))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            for index in range(3):
                session = await standin.wait_for_session(index, timeout=15)
                # Each session lives longer than the whole budget before it drops.
                await caller.wait_for(lambda s=session: len(s.audio) >= 48 * 1200, 10)
                await standin.close_session(session, code=1001)
            # The budget would be long spent if it ran from the first drop.
            last = await standin.wait_for_session(3, timeout=15)
            await caller.say(tone_ulaw(500))
            await caller.wait_for(lambda: len(caller.received) >= 8 * 400, 15)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert call.stats.reconnects == 3 and call.outcome == "stream_stopped"
    assert last.replies_started >= 1
