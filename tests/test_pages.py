"""The routes behind the softphone and the dashboard, without a browser: the live event
feed, the softphone's call set-up and stream admission, the records search, and the
chart's latency figures. (tests/test_browser.py drives the pages themselves.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets

from ivr_bridge.call import Outcome
from ivr_bridge.events import CallEvent
from ivr_bridge.live import LiveFeed
from ivr_bridge.metrics import LATENCY_BUCKETS, histogram_quantile
from ivr_bridge.settings import Settings
from ivr_bridge.standins.twilio import TwilioCaller
from ivr_bridge.web import STATIC
from tests.conftest import RunningBridge
from tests.support import eventually

TOKEN = "pages-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
WAIT = 15.0
SPEECH = bytes(np.where(np.arange(8000) % 16 < 8, 0x10, 0x90).astype(np.uint8))  # 1 s, loud


def event(kind: str, call_sid: str, seq: int, **data: Any) -> CallEvent:
    return CallEvent(kind, call_sid, seq, 0.0, 0.0, data)  # type: ignore[arg-type]


# -- the live feed (sans I/O) -------------------------------------------------------------


async def test_watchers_get_the_events_they_asked_for_and_a_slow_one_is_cut_off() -> None:
    feed = LiveFeed(limit=3, max_watchers=2)
    feed.publish(event("dtmf", "CA1", 1))  # nobody watching: dropped, at no cost
    with feed.watch() as everything, feed.watch("CA2") as one_call:
        assert everything is not None and one_call is not None
        with feed.watch() as third:
            assert third is None  # over max_watchers
        feed.publish(event("call.started", "CA1", 1))
        feed.publish(event("call.started", "CA2", 1))
        got = await everything.next(1.0)
        assert [(kind, data["call_sid"]) for kind, data in got] == [("event", "CA1"), ("event", "CA2")]
        assert [data["call_sid"] for _, data in await one_call.next(1.0)] == ["CA2"]
        assert await one_call.next(0.01) == []  # nothing more: waits, then empty

        for seq in range(2, 6):  # one past the limit while nobody reads
            feed.publish(event("dtmf", "CA2", seq))
        assert everything.lagged and await everything.next(1.0) == []
        assert one_call.lagged
        feed.publish(event("dtmf", "CA2", 9))
        assert await one_call.next(0.01) == []  # a lagged watcher takes nothing more
    assert feed.watchers == 0


def test_latency_quantiles_come_from_the_histogram_between_two_readings() -> None:
    def cumulative(observations: list[float]) -> list[tuple[float, float]]:
        bounds = [*LATENCY_BUCKETS, float("inf")]
        return [(le, float(sum(1 for o in observations if o <= le))) for le in bounds]

    assert histogram_quantile(0.5, cumulative([])) is None
    before = cumulative([0.08] * 10)
    now = cumulative([0.08] * 10 + [0.4] * 4)
    # Between the readings only the four 0.4 s replies: inside the (0.3, 0.5] bucket.
    assert 0.3 < histogram_quantile(0.5, now, before) <= 0.5  # type: ignore[operator]
    assert histogram_quantile(0.5, now, now) is None
    # All of them: most were 0.08 s, in (0.05, 0.1].
    assert 0.05 < histogram_quantile(0.5, now) <= 0.1  # type: ignore[operator]
    assert histogram_quantile(0.99, cumulative([30.0])) == LATENCY_BUCKETS[-1]  # beyond the last bound


def test_the_pages_ship_in_the_package(tmp_path: Path) -> None:
    """A wheel built from a clean copy (as the Docker image's is) carries every page file."""
    repo = Path(__file__).resolve().parent.parent
    # No build leftovers: an egg-info from an editable install would list the files itself.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns(".*", "*.egg-info", "build", "__pycache__", "tests", "docs")
    shutil.copytree(repo, source, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("ivr_bridge-*.whl")
    shipped = {
        name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("ivr_bridge/web/static/")
    }
    expected = {f"ivr_bridge/web/static/{f.name}" for f in STATIC.iterdir() if f.is_file()}
    assert expected and shipped == expected


# -- over the wire --------------------------------------------------------------------------


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[RunningBridge], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(bridge: RunningBridge) -> httpx.AsyncClient:
        clients.append(httpx.AsyncClient(base_url=bridge.base_url, timeout=30))
        return clients[-1]

    yield make
    for client in clients:
        await client.aclose()


def stream_url(bridge: RunningBridge, path: str) -> str:
    return bridge.base_url.replace("http", "ws", 1) + path


async def test_pages_are_served_with_a_strict_policy_and_no_secret(
    make_bridge: Callable[[Settings], RunningBridge], client_for: Callable[[RunningBridge], httpx.AsyncClient]
) -> None:
    secret = "twilio-auth-token-never-in-a-page"
    bridge = make_bridge(Settings(api_token=TOKEN, twilio_auth_token=secret))
    client = client_for(bridge)
    for path, protected in [("/phone", "yes"), ("/dashboard", "yes")]:
        page = await client.get(path)
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert f'data-protected="{protected}"' in page.text
        assert secret not in page.text and TOKEN not in page.text
    assert (
        'data-outcomes="' + ",".join(sorted(str(o) for o in Outcome)) + '"'
        in (await client.get("/dashboard")).text
    )
    script = await client.get("/ui/capture-worklet.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    dev = client_for(make_bridge(Settings(api_token=TOKEN)))
    assert 'data-protected="no"' in (await dev.get("/phone")).text  # open in development mode


async def test_the_softphone_off_means_no_page_no_call_and_no_stream(
    make_bridge: Callable[[Settings], RunningBridge], client_for: Callable[[RunningBridge], httpx.AsyncClient]
) -> None:
    bridge = make_bridge(Settings(phone=False))
    client = client_for(bridge)
    assert (await client.get("/phone")).status_code == 404
    assert (await client.post("/phone/calls", json={})).status_code == 404
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(stream_url(bridge, "/phone/stream?call=CA" + "1" * 32))
    assert (await client.get("/dashboard")).status_code == 200  # the dashboard stays


async def place(client: httpx.AsyncClient, caller: str = "Bob") -> dict[str, Any]:
    answer = await client.post("/phone/calls", json={"from": caller}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    return answer.json()


def softphone_caller(bridge: RunningBridge, placed: dict[str, Any]) -> TwilioCaller:
    """A caller on the stream `POST /phone/calls` set up, as the page opens it."""
    return TwilioCaller(
        stream_url(bridge, placed["stream_path"]),
        call_sid=placed["call_sid"],
        custom_parameters=placed["parameters"],
        continuous=True,
    )


async def test_a_softphone_call_is_a_call_like_any_other_and_its_start_must_match_its_token(
    make_bridge: Callable[[Settings], RunningBridge], client_for: Callable[[RunningBridge], httpx.AsyncClient]
) -> None:
    bridge = make_bridge(Settings(api_token=TOKEN, twilio_auth_token="twilio-auth-token-for-tests"))
    client = client_for(bridge)
    placed = await place(client, "Bob\x1b[31m")
    assert placed["parameters"] == {"From": "Bob[31m", "To": "ivr-bridge"}  # control characters dropped
    # A token minted for one call admits that call's start only.
    intruder = TwilioCaller(stream_url(bridge, placed["stream_path"]), custom_parameters=placed["parameters"])
    await intruder.connect()
    await intruder.wait_closed(WAIT)
    assert intruder.close_code == 1008
    assert (await bridge.wait_for_calls(1))[0].outcome == Outcome.REFUSED
    # ... and is spent by that attempt.
    again = softphone_caller(bridge, placed)
    with pytest.raises(websockets.InvalidStatus):
        await again.connect()

    placed = await place(client)
    caller = softphone_caller(bridge, placed)
    async with caller:
        await caller.say(SPEECH)
        await caller.wait_for(lambda: caller.received_total > 0, WAIT)  # the echo answered
        live = (await client.get("/calls", headers=AUTH)).json()["calls"]
        assert [(c["call_sid"], c["line"], c["from"]) for c in live] == [
            (placed["call_sid"], "softphone", "Bob")
        ]
        await caller.hang_up()
    call = (await bridge.wait_for_calls(2))[1]
    assert (call.outcome, call.line) == (Outcome.STREAM_STOPPED, "softphone")


async def test_softphone_calls_respect_capacity(
    make_bridge: Callable[[Settings], RunningBridge], client_for: Callable[[RunningBridge], httpx.AsyncClient]
) -> None:
    bridge = make_bridge(Settings(api_token=TOKEN, max_calls=1))
    client = client_for(bridge)
    placed = await place(client)
    async with softphone_caller(bridge, placed) as caller:
        await caller.say(SPEECH[:1600])
        refused = await client.post("/phone/calls", json={}, headers=AUTH)
        assert refused.status_code == 503 and "capacity" in refused.json()["error"]
        await caller.hang_up()


async def read_events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    kind = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, json.loads(line[6:])


async def test_the_dashboard_feed_brings_live_calls_then_their_events(
    make_bridge: Callable[[Settings], RunningBridge], client_for: Callable[[RunningBridge], httpx.AsyncClient]
) -> None:
    bridge = make_bridge(Settings(api_token=TOKEN))
    client = client_for(bridge)
    async with client.stream("GET", "/dashboard/feed", headers=AUTH) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        messages = read_events(response)
        kind, hello = await anext(messages)
        assert kind == "stats" and hello["active"] == 0 and hello["calls"] == []

        placed = await place(client, "+15550142")
        async with softphone_caller(bridge, placed) as caller:
            await caller.say(SPEECH)
            seen: list[str] = []
            stats: list[dict[str, Any]] = []
            async for kind, data in messages:
                if kind == "event":
                    assert data["call_sid"] == placed["call_sid"]
                    seen.append(data["type"])
                elif kind == "stats" and data["active"]:
                    stats.append(data)
                if "transcript" in seen and stats:
                    break
            assert seen[0] == "call.started"
            assert stats[0]["calls"][0]["from"] == "+15550142"
            await caller.hang_up()
        async for kind, data in messages:
            if kind == "event" and data["type"] == "call.ended":
                break

    # One call's events for the softphone's transcript (open in development mode).
    placed = await place(client)
    async with client.stream("GET", f"/phone/calls/{placed['call_sid']}/events") as response:
        messages = read_events(response)
        async with softphone_caller(bridge, placed) as caller:
            kind, data = await anext(messages)
            assert (kind, data["type"], data["call_sid"]) == ("event", "call.started", placed["call_sid"])
            await caller.hang_up()


async def test_records_search_and_export_over_http(
    make_bridge: Callable[[Settings], RunningBridge], client_for: Callable[[RunningBridge], httpx.AsyncClient]
) -> None:
    bridge = make_bridge(Settings(api_token=TOKEN))
    client = client_for(bridge)
    for caller_id in ("+15557770001", "+15558880002"):
        placed = await place(client, caller_id)
        async with softphone_caller(bridge, placed) as caller:
            await caller.say(SPEECH[:1600])
            await caller.hang_up()
    await bridge.wait_for_calls(2)

    async def found(query: str) -> list[str]:
        answer = await client.get(f"/records?{query}", headers=AUTH)
        assert answer.status_code == 200, answer.text
        return [c["from_number"] for c in answer.json()["calls"]]

    async def both_on_record() -> bool:
        return len(await found("outcome=stream_stopped")) == 2

    await eventually(both_on_record, what="both calls on record")
    assert await found("number=7770") == ["+15557770001"]
    assert await found("number=5555") == []
    assert sorted(await found("")) == ["+15557770001", "+15558880002"]
    assert await found("since=2999-01-01T00:00:00Z") == []
    assert len(await found("until=2999-01-01T00:00:00&limit=1")) == 1
    bad = await client.get("/records?outcome=bogus", headers=AUTH)
    assert bad.status_code == 422 and "stream_stopped" in bad.json()["error"]
    assert (await client.get("/records?since=yesterday", headers=AUTH)).status_code == 422

    export = await client.get("/records/export?number=8880", headers=AUTH)
    assert export.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in export.headers["content-disposition"]
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert [r["from_number"] for r in lines] == ["+15558880002"]
    assert lines[0]["events"][0]["type"] == "call.started"
