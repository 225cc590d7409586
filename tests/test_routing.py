"""Call-centre routing over real sockets: hooks out to a real receiver, keys and the control
API in, transfers and hang-ups through a stand-in of Twilio's REST API, and the records."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from ivr_bridge.events import CallEvent
from ivr_bridge.records import CallStore
from ivr_bridge.settings import Settings
from ivr_bridge.standins.hook_receiver import HookReceiver, HookResponse
from ivr_bridge.standins.nextevi import VoiceApiBehaviour
from ivr_bridge.standins.twilio import TwilioCaller
from tests.test_end_to_end import nextevi_settings, tone_ulaw, voice_api
from tests.test_resilience import signed_caller, with_rest

HOOK_SECRET = "hook-secret-for-tests"
API_TOKEN = "api-token-for-tests"
AGENT = "+15550100"


@pytest.fixture
def receiver() -> Iterator[HookReceiver]:
    hooks = HookReceiver(HOOK_SECRET)
    hooks.serve()
    yield hooks
    hooks.stop()


def routed(settings: Settings, receiver: HookReceiver | None = None, **more: object) -> Settings:
    changes: dict[str, object] = {"api_token": API_TOKEN, **more}
    if receiver is not None:
        changes |= {"hook_urls": (f"{receiver.url}/events",), "hook_secret": HOOK_SECRET}
    return Settings(**{**settings.__dict__, **changes})


def api(bridge: Any, token: str | None = API_TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.AsyncClient(base_url=bridge.base_url, headers=headers, timeout=30)


async def first_reply_playing(caller: TwilioCaller) -> None:
    """Speak, then wait until the bot's reply is playing on the caller's line."""
    await caller.say(tone_ulaw(600))
    await caller.wait_for(lambda: caller.received_total >= 8 * 200, 15)


async def record_of(
    settings: Settings, call_sid: str, until: str | Callable[[dict[str, Any]], bool] = ""
) -> dict[str, Any]:
    """The call's stored record, once its outcome is `until` (any outcome if empty), or
    once `until(record)` holds."""
    # Opened as a reader: `async with` would mark the running bridge's calls interrupted.
    store = CallStore(settings.database, settings.instance_id)
    await store.open(mark_interrupted=False)
    try:
        deadline = time.monotonic() + 15
        while True:
            record = await store.get(call_sid)
            if record is not None and (
                until(record) if callable(until) else until in ("", record["outcome"])
            ):
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"record of {call_sid}: {record and record['outcome']}")
            await asyncio.sleep(0.05)  # polled: the bridge's writer gives no signal across threads
    finally:
        await store.close()


async def test_key_0_transfers_after_the_bots_sentence(make_bridge, twilio_rest, receiver) -> None:
    """The README's walk-through: a hook receiver, a scripted call, 0 pressed mid-sentence,
    the transfer reaching Twilio only after the sentence played, the call on record."""
    rest, rest_url = twilio_rest
    async with voice_api(VoiceApiBehaviour(reply_ms=1500)) as standin:
        settings = routed(
            with_rest(nextevi_settings(standin), rest, rest_url),
            receiver,
            dtmf_map=(("0", f"transfer:{AGENT}"),),
        )
        bridge = make_bridge(settings)
        caller = await signed_caller(bridge, rest.auth_token)
        rest.live_calls.add(caller.call_sid)
        async with caller:
            await first_reply_playing(caller)
            await caller.dtmf("0")
            [update] = await asyncio.to_thread(rest.wait_for_updates, 1, 20)
            heard_at_transfer = caller.received_total
            await caller.hang_up()  # Twilio ends the stream once the call is redirected
        [call] = await bridge.wait_for_calls(1)

    # The whole 1.5 s sentence played before Twilio was asked to transfer.
    [reply] = call.playback.responses
    assert not reply.interrupted and reply.heard_ms == reply.sent_ms >= 1500
    assert heard_at_transfer >= 8 * 1500
    assert update.at >= caller.marks_played_at[-1]
    assert update.call_sid == caller.call_sid
    assert f"<Dial>{AGENT}</Dial>" in update.params["Twiml"]
    assert call.outcome == "transferred"

    # Hooks: signed (the receiver verifies), in order, the key and the transfer among them.
    events = await receiver.wait(
        lambda: (got := receiver.delivered(caller.call_sid)) and got[-1]["type"] == "call.ended" and got, 15
    )
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "call.started" and kinds[-1] == "call.ended"
    assert kinds.index("dtmf") < kinds.index("control") and "emotion" in kinds
    dtmf = next(e for e in events if e["type"] == "dtmf")
    assert dtmf["data"] == {"digit": "0", "action": f"transfer:{AGENT}"}
    control = next(e for e in events if e["type"] == "control")
    assert control["data"]["source"] == "dtmf" and control["data"]["played_out"] is True
    bot = next(e for e in events if e["type"] == "transcript" and e["data"]["role"] == "assistant")
    assert bot["data"]["heard_text"] == bot["data"]["text"] and not bot["data"]["interrupted"]
    ended = events[-1]["data"]
    assert ended["outcome"] == "transferred" and ended["transfer_to"] == AGENT and ended["turns"] == 1

    # On record, as `ivr-bridge calls show` reads it.
    record = await record_of(bridge.settings, caller.call_sid, "transferred")
    assert record["transfer_to"] == AGENT
    assert [line["role"] for line in record["transcript"]] == ["user", "assistant"]
    assert "dtmf" in [e["type"] for e in record["events"]]


async def test_barge_in_transcript_says_what_the_caller_heard(make_bridge, receiver) -> None:
    async with voice_api(VoiceApiBehaviour(reply_ms=3000)) as standin:
        bridge = make_bridge(routed(nextevi_settings(standin), receiver))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await first_reply_playing(caller)
            await caller.wait_for(lambda: caller.received_total >= 8 * 800, 15)
            await caller.say(tone_ulaw(600))  # talks over the bot
            await caller.wait_for(lambda: caller.clears >= 1, 15)
        [call] = await bridge.wait_for_calls(1)
    events = await receiver.wait(
        lambda: (got := receiver.delivered(call.call_sid)) and got[-1]["type"] == "call.ended" and got, 15
    )
    barge_in = next(e for e in events if e["type"] == "barge_in")["data"]
    cut = next(e["data"] for e in events if e["type"] == "transcript" and e["data"]["role"] == "assistant")
    assert cut["interrupted"] is True
    assert 0 < cut["heard_ms"] == barge_in["heard_ms"] < cut["sent_ms"]
    assert cut["text"].startswith(cut["heard_text"]) and len(cut["heard_text"]) < len(cut["text"])
    assert events[-1]["data"]["barge_ins"] == 1 and events[-1]["data"]["latency"]["clear_ms"]["count"] == 1


async def test_control_api_needs_its_bearer_token(make_bridge) -> None:
    closed = make_bridge(Settings(provider="echo"))
    async with api(closed) as client:
        response = await client.get("/calls")
        assert response.status_code == 403 and "IVR_API_TOKEN" in response.json()["error"]

    bridge = make_bridge(routed(Settings(provider="echo")))
    for token in (None, "wrong-token", API_TOKEN[:-1]):
        async with api(bridge, token) as client:
            for method, path in (("GET", "/calls"), ("GET", "/calls/CA1"), ("POST", "/calls/CA1/hangup")):
                response = await client.request(method, path)
                assert response.status_code == 401, (token, path)
                assert response.headers["www-authenticate"].startswith("Bearer")
    async with api(bridge) as client:
        assert (await client.get("/calls")).json() == {"calls": []}
        assert (await client.get("/calls/CA-nobody")).status_code == 404
        spec = (await client.get("/openapi.json")).json()
    assert set(spec["paths"]) == {
        "/calls",
        "/calls/{call_sid}",
        "/calls/{call_sid}/transfer",
        "/calls/{call_sid}/hangup",
    }
    assert API_TOKEN not in str(spec)


async def test_control_api_shows_a_live_call_and_then_its_record(make_bridge) -> None:
    bridge = make_bridge(routed(Settings(provider="echo")))
    async with (
        api(bridge) as client,
        TwilioCaller(
            bridge.stream_url,
            continuous=True,
            custom_parameters={"From": "+15550001111", "To": "+15550002222"},
        ) as caller,
    ):
        await caller.say(tone_ulaw(600))
        await caller.wait_for(lambda: caller.received_total >= 8 * 400, 15)
        listed = (await client.get("/calls")).json()["calls"]
        assert [(c["call_sid"], c["from"], c["to"]) for c in listed] == [
            (caller.call_sid, "+15550001111", "+15550002222")
        ]
        assert listed[0]["state"] == "active"
        live = (await client.get(f"/calls/{caller.call_sid}")).json()
        assert live["active"] is True and live["transcript"][0]["role"] == "user"
        await caller.hang_up()
    [call] = await bridge.wait_for_calls(1)
    await record_of(bridge.settings, call.call_sid, "stream_stopped")
    async with api(bridge) as client:
        stored = (await client.get(f"/calls/{call.call_sid}")).json()
    assert stored["active"] is False and stored["outcome"] == "stream_stopped"
    assert stored["from_number"] == "+15550001111"
    assert [line["role"] for line in stored["transcript"]][:2] == ["user", "assistant"]


async def test_transfer_and_hangup_are_idempotent(make_bridge, twilio_rest) -> None:
    rest, rest_url = twilio_rest
    async with voice_api(VoiceApiBehaviour(reply_ms=800)) as standin:
        bridge = make_bridge(routed(with_rest(nextevi_settings(standin), rest, rest_url)))
        caller = await signed_caller(bridge, rest.auth_token)
        rest.live_calls.add(caller.call_sid)
        async with caller, api(bridge) as client:
            await first_reply_playing(caller)
            path = f"/calls/{caller.call_sid}/transfer"
            first, second = await asyncio.gather(
                client.post(path, json={"to": AGENT}), client.post(path, json={"to": AGENT})
            )
            assert first.status_code == second.status_code == 200
            assert first.json() == second.json()
            assert first.json()["result"] == "done" and first.json()["played_out"] is True
            assert (await client.post(path, json={"to": AGENT})).json() == first.json()
            conflict = await client.post(path, json={"to": "+15550199"})
            assert conflict.status_code == 409
            assert (await client.post(path, json={"to": "555"})).status_code in (409, 422)
            await caller.hang_up()
        await bridge.wait_for_calls(1)
        assert len(rest.updates) == 1  # one REST request for three transfer requests

        # A call Twilio no longer knows (20404) is not an error, and a bad body is a 4xx.
        async with api(bridge) as client:
            gone = await client.post("/calls/CA-gone/hangup")
            assert gone.status_code == 200 and gone.json()["result"] == "call_already_ended"
            assert (await client.post("/calls/CA-gone/transfer", content=b"{oops")).status_code == 400
            assert (await client.post("/calls/CA-gone/transfer", json={"to": "me"})).status_code == 422


async def test_a_hook_can_hang_the_call_up(make_bridge, twilio_rest) -> None:
    rest, rest_url = twilio_rest

    def answer(event: dict[str, Any], attempt: int) -> HookResponse | None:
        if event["type"] == "transcript" and event["data"]["role"] == "assistant":
            return HookResponse(body={"action": "hangup"})
        return None

    receiver = HookReceiver(HOOK_SECRET, answer)
    receiver.serve()
    try:
        async with voice_api(VoiceApiBehaviour(reply_ms=600)) as standin:
            settings = routed(with_rest(nextevi_settings(standin), rest, rest_url), receiver)
            bridge = make_bridge(settings)
            caller = await signed_caller(bridge, rest.auth_token)
            rest.live_calls.add(caller.call_sid)
            async with caller:
                await caller.say(tone_ulaw(600))
                [update] = await asyncio.to_thread(rest.wait_for_updates, 1, 20)
                await caller.hang_up()
            [call] = await bridge.wait_for_calls(1)
    finally:
        receiver.stop()
    assert update.params == {"Status": "completed"}
    assert call.outcome == "hung_up" and call.handoff is not None and call.handoff.source == "hook"


async def test_hangup_without_rest_credentials_ends_the_stream(make_bridge) -> None:
    bridge = make_bridge(routed(Settings(provider="echo")))
    async with TwilioCaller(bridge.stream_url, continuous=True) as caller, api(bridge) as client:
        await caller.say(tone_ulaw(300))
        await caller.wait_for(lambda: caller.received_total > 0, 15)
        response = await client.post(f"/calls/{caller.call_sid}/hangup")
        assert response.status_code == 200 and response.json()["result"] == "done"
        await caller.wait_closed(15)
        transfer = await client.post(f"/calls/{caller.call_sid}/transfer", json={"to": AGENT})
        assert transfer.status_code in (409, 503)
    [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "hung_up"


async def test_a_slow_hook_never_delays_the_audio(make_bridge) -> None:
    # The receiver holds every request for 30 s (cut short when it stops).
    receiver = HookReceiver(HOOK_SECRET, lambda event, attempt: HookResponse(delay_s=30))
    receiver.serve()
    try:
        bridge = make_bridge(routed(Settings(provider="echo"), receiver, hook_timeout_s=60.0))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.say(tone_ulaw(600))
            # A whole turn: the caller's speech played back to them ...
            await caller.wait_for(lambda: caller.received_total >= 8 * 600, 15)
            # ... while the first hook (call.started) is still waiting for its answer, and the
            # call's later events wait behind it (in order).
            assert [r.type for r in receiver.requests()] == ["call.started"]
    finally:
        receiver.stop()


async def test_records_survive_a_restart_and_a_crash_is_marked(make_bridge, tmp_path) -> None:
    settings = routed(
        Settings(provider="echo", database_path=str(tmp_path / "calls.db"), instance_id="box-1")
    )
    # A call cut by a crash of this instance: on record, never ended.
    async with CallStore(settings.database, "box-1") as store:
        await store.open()
        store.record(CallEvent("call.started", "CA-crashed", 1, time.time(), 0.0, {"from": "+1555"}))
        await store.flush()
    async with CallStore(settings.database, "box-2") as store:
        await store.open()
        store.record(CallEvent("call.started", "CA-other-box", 1, time.time(), 0.0, {}))
        await store.flush()

    first = make_bridge(settings)
    async with TwilioCaller(first.stream_url, continuous=True) as caller:
        await caller.say(tone_ulaw(600))
        await caller.wait_for(lambda: caller.received_total >= 8 * 600, 15)
        await caller.hang_up()
    await first.wait_for_calls(1)
    assert (await record_of(first.settings, "CA-crashed"))["outcome"] == "interrupted"
    assert (await record_of(first.settings, "CA-other-box"))["outcome"] == "in_progress"
    await record_of(first.settings, caller.call_sid, "stream_stopped")
    first.server.should_exit = True

    second = make_bridge(settings)
    async with api(second) as client:
        stored = (await client.get(f"/calls/{caller.call_sid}")).json()
    assert stored["outcome"] == "stream_stopped" and stored["active"] is False
    assert [line["role"] for line in stored["transcript"]] == ["user", "assistant"]


async def test_a_call_cut_by_a_crash_is_on_record_and_marked_interrupted(tmp_path) -> None:
    """A real crash: the bridge process is SIGKILLed mid-call, then started again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    database = tmp_path / "calls.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IVR_", "NEXTEVI_", "TWILIO_"))}
    env |= {"IVR_DATABASE_PATH": str(database), "IVR_INSTANCE_ID": "crashy", "IVR_PROVIDER": "echo"}
    command = [sys.executable, "-m", "ivr_bridge", "serve", "--port", str(port), "--log-level", "WARNING"]

    async def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        async with httpx.AsyncClient() as client:
            for _ in range(300):  # start-up: the process offers nothing to wait on but its port
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        return process
                await asyncio.sleep(0.1)
        process.kill()
        raise TimeoutError("the bridge did not start")

    bridge = await start()
    try:
        reader = Settings(database_path=str(database), instance_id="crashy")
        async with TwilioCaller(f"ws://127.0.0.1:{port}/media-stream", continuous=True) as caller:
            await caller.say(tone_ulaw(600))
            await caller.wait_for(lambda: caller.received_total >= 8 * 600, 15)
            # The caller's words are on record before the crash.
            record = await record_of(reader, caller.call_sid, lambda record: bool(record["transcript"]))
            assert record["outcome"] == "in_progress"
            bridge.send_signal(signal.SIGKILL)
            bridge.wait(10)
        bridge = await start()
        record = await record_of(reader, caller.call_sid, "interrupted")
        assert record["transcript"][0]["role"] == "user" and record["ended_at"] is not None
    finally:
        bridge.kill()
        bridge.wait(10)
