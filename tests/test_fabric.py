"""Many instances as one service, through the local Redis: tokens spent once across the
fleet, one live stream per call, call control carried out by the instance that carries the
call, `GET /calls` on any instance, and a Redis outage that drops no call."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import httpx
import pytest

from ivr_bridge.fabric import EVENTS_QUEUE, Fabric
from ivr_bridge.loadgen.webhook import CallDetails, StreamTarget, fetch_stream, stream_headers
from ivr_bridge.metrics import BridgeMetrics
from ivr_bridge.settings import Settings
from ivr_bridge.standins.nextevi import VoiceApiBehaviour
from ivr_bridge.standins.twilio import TwilioCaller
from tests.support import eventually, stream_caller
from tests.test_end_to_end import nextevi_settings, tone_ulaw, voice_api
from tests.test_hostile_state import free_port
from tests.test_pages import TOKEN, read_events, softphone_caller
from tests.test_resilience import with_rest
from tests.test_routing import AGENT, api, first_reply_playing, record_of, routed

REDIS_URL = os.environ.get("IVR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(autouse=True)
async def redis_reachable() -> None:
    fabric = Fabric(REDIS_URL, "probe")
    try:
        await fabric._redis.ping()
    except Exception as exc:
        pytest.fail(f"Redis at {REDIS_URL} is not reachable ({type(exc).__name__}); start it", pytrace=False)
    finally:
        await fabric.close()


def fleet(settings: Settings, shared_db: Path, n: int) -> list[Settings]:
    return [
        Settings(
            **{
                **settings.__dict__,
                "redis_url": REDIS_URL,
                "database_path": str(shared_db),
                "instance_id": f"i{n}-{secrets.token_hex(3)}",
            }
        )
        for n in range(n)
    ]


async def signed_target(bridge, call: CallDetails, token: str):  # type: ignore[no-untyped-def]
    return await fetch_stream(bridge.base_url + "/twiml", call, token)


async def test_a_call_has_one_stream_and_a_token_one_use_across_the_fleet(
    make_bridge, tmp_path: Path
) -> None:
    token = "f" * 32
    a, b = (
        make_bridge(s)
        for s in fleet(Settings(provider="echo", twilio_auth_token=token), tmp_path / "r.db", 2)
    )
    call = CallDetails()
    target = await signed_target(a, call, token)
    headers = stream_headers(target, token)
    async with TwilioCaller(
        target.url,
        call_sid=call.call_sid,
        custom_parameters=target.parameters,
        headers=headers,
        continuous=True,
    ) as caller:
        await eventually(lambda: call.call_sid in a.server.app.state.calls_by_sid, 10)
        # The webhook replayed to the other instance: the call has its stream (on A).
        async with httpx.AsyncClient(timeout=15) as client:
            form = call.form()
            from ivr_bridge.loadgen.webhook import sign

            url = b.base_url + "/twiml"
            replay = await client.post(url, data=form, headers={"X-Twilio-Signature": sign(token, url, form)})
        assert "<Stream" not in replay.text
        # A's token, replayed to B's stream endpoint while the call is live: refused.
        # The same token and call on B (whose public URL the upgrade is signed over).
        on_b = StreamTarget(b.stream_url, target.parameters)
        async with stream_caller(on_b, call.call_sid, token, continuous=False) as twin:
            await twin.wait_closed(15)
        assert twin.close_code == 1008
        await caller.say(tone_ulaw(300))
        await caller.wait_for(lambda: caller.received_total > 0, 15)
        await caller.hang_up()
    # After the call: the spent token still opens nothing on B.
    async with stream_caller(on_b, call.call_sid, token, continuous=False) as late:
        await late.wait_closed(15)
    assert late.close_code == 1008
    [b_calls, a_calls] = [await b.wait_for_calls(2), await a.wait_for_calls(1)]
    assert [str(c.outcome) for c in a_calls] == ["stream_stopped"]
    assert [str(c.outcome) for c in b_calls] == ["refused", "refused"]


async def test_control_through_another_instance_is_carried_out_by_the_owner(
    make_bridge, twilio_rest, tmp_path: Path
) -> None:
    rest, rest_url = twilio_rest
    async with voice_api(VoiceApiBehaviour(reply_ms=1500)) as standin:
        base = routed(with_rest(nextevi_settings(standin), rest, rest_url))
        a, b = (make_bridge(s) for s in fleet(base, tmp_path / "r.db", 2))
        call = CallDetails()
        target = await signed_target(a, call, rest.auth_token)
        rest.live_calls.add(call.call_sid)
        caller = stream_caller(target, call.call_sid, rest.auth_token)
        async with caller, api(b) as through_b:
            await first_reply_playing(caller)
            listed = (await through_b.get("/calls")).json()["calls"]
            assert [c["call_sid"] for c in listed] == [call.call_sid]  # B lists A's call
            assert listed[0]["instance"] == a.settings.instance_id
            shown = (await through_b.get(f"/calls/{call.call_sid}")).json()
            assert shown["active"] is True and shown["bot_speaking"] is True
            answer = await through_b.post(f"/calls/{call.call_sid}/transfer", json={"to": AGENT})
            [update] = await asyncio.to_thread(rest.wait_for_updates, 1, 20)
            await caller.hang_up()
        [on_a] = await a.wait_for_calls(1)
    assert answer.status_code == 200, answer.text
    assert answer.json()["played_out"] is True and answer.json()["result"] == "done"
    # A waited for the bot's sentence before Twilio was asked, and recorded the action.
    assert update.at >= caller.marks_played_at[-1]
    assert on_a.outcome == "transferred"
    record = await record_of(a.settings, call.call_sid, "transferred")
    [control] = [e for e in record["events"] if e["type"] == "control"]
    assert control["data"]["to"] == AGENT and control["data"]["played_out"] is True
    assert len(rest.updates) == 1


async def test_every_instance_sees_every_calls_events_live(make_bridge, tmp_path: Path) -> None:
    """A dashboard on B, and a softphone page whose event stream landed on B, follow a
    call carried by A as it happens."""
    base = Settings(provider="echo", api_token=TOKEN)
    a, b = (make_bridge(s) for s in fleet(base, tmp_path / "r.db", 2))
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with (
        httpx.AsyncClient(base_url=a.base_url, headers=headers, timeout=30) as on_a,
        httpx.AsyncClient(base_url=b.base_url, headers=headers, timeout=30) as on_b,
        on_b.stream("GET", "/dashboard/feed") as dashboard,
    ):
        feed = read_events(dashboard)
        assert (await anext(feed))[0] == "stats"
        placed = (await on_a.post("/phone/calls", json={"from": "+15550177"})).json()
        async with (
            on_b.stream("GET", f"/phone/calls/{placed['call_sid']}/events") as one_call,
            softphone_caller(a, placed) as caller,
        ):
            kind, first = await anext(read_events(one_call))
            assert (kind, first["type"], first["data"]["from"]) == ("event", "call.started", "+15550177")
            await caller.hang_up()
        seen: list[tuple[int, str]] = []
        async for kind, data in feed:
            if kind == "event":
                assert data["call_sid"] == placed["call_sid"]
                seen.append((data["seq"], data["type"]))
                if data["type"] == "call.ended":
                    break
        assert seen[0] == (1, "call.started")
        assert [seq for seq, _ in seen] == list(range(1, len(seen) + 1))  # all of them, in order


async def test_a_softphone_stream_token_opens_one_stream_across_the_fleet(
    make_bridge, tmp_path: Path
) -> None:
    base = Settings(provider="echo", api_token=TOKEN, twilio_auth_token="twilio-auth-token-for-tests")
    a, b = (make_bridge(s) for s in fleet(base, tmp_path / "r.db", 2))
    async with httpx.AsyncClient(base_url=a.base_url, headers={"authorization": f"Bearer {TOKEN}"}) as on_a:
        placed = (await on_a.post("/phone/calls", json={})).json()
    async with softphone_caller(a, placed) as first:
        await first.say(tone_ulaw(200))
        await first.hang_up()
    [ended] = await a.wait_for_calls(1)
    assert ended.outcome == "stream_stopped"
    # The same URL again, on another instance, once the call is over: its token is spent
    # for the whole fleet (B never saw it itself).
    replay = softphone_caller(b, placed)
    await replay.connect()
    await replay.wait_closed(15)
    assert replay.close_code == 1008
    [refused] = await b.wait_for_calls(1)
    assert refused.outcome == "refused"


def test_sharing_call_events_never_blocks_and_is_bounded() -> None:
    fabric = Fabric(REDIS_URL, "unstarted")  # nothing publishes: the outbox only fills
    for seq in range(EVENTS_QUEUE + 5):
        fabric.share({"type": "dtmf", "call_sid": "CA1", "seq": seq})
    assert fabric.events_dropped == 5
    metrics = BridgeMetrics(lambda: ())
    metrics.watch_fabric(fabric)
    assert "ivr_fabric_events_dropped_total 5.0" in metrics.render().decode()


async def test_a_redis_outage_drops_no_call(make_bridge, caplog: pytest.LogCaptureFixture) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    bridge = make_bridge(Settings(provider="echo", redis_url=dead_redis))
    async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
        await caller.say(tone_ulaw(300))
        await caller.wait_for(lambda: caller.received_total > 0, 15)
        await caller.hang_up()
    [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "stream_stopped"
    async with httpx.AsyncClient(base_url=bridge.base_url, timeout=15) as client:
        metrics = (await client.get("/metrics")).text
    assert "ivr_fabric_up 0.0" in metrics
    assert "acts alone" in caplog.text


async def test_a_dead_instances_call_can_be_taken_over() -> None:
    sid = "CA" + secrets.token_hex(16)
    dead = Fabric(REDIS_URL, "dead-" + secrets.token_hex(3), lease_s=0.3)
    alive = Fabric(REDIS_URL, "alive-" + secrets.token_hex(3))
    try:
        await dead.start(lambda request: asyncio.sleep(0, {}))
        assert await dead.admit(sid, None, 0) is None
        assert await alive.owner(sid) == dead.instance_id
        assert await alive.admit(sid, None, 0) is not None  # a live stream elsewhere
        for task in dead._tasks:
            task.cancel()

        async def lease_lapsed() -> bool:
            return await alive.owner(sid) is None

        await eventually(lease_lapsed, 5, "the dead instance's lease lapsed")
        assert await alive.admit(sid, None, 0) is None  # its stale key is taken over
    finally:
        await alive.close()
        await dead.close()
