"""The pages people use: a browser softphone (`/phone`) and the operator dashboard
(`/dashboard`), with the JSON and event-stream routes behind them.

The pages are static files (plain HTML, CSS and JavaScript modules, no build step) and
hold no secret: the dashboard's data, and the softphone when the bridge is protected,
need the API bearer token, which the page asks for and sends in a header (never in a
URL, where access logs would keep it). Live views are server-sent events fed by the call
events (`ivr_bridge.live`); nothing here polls a call.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ivr_bridge.call import Outcome
from ivr_bridge.connections import bounded_body
from ivr_bridge.control_api import bearer_refusal
from ivr_bridge.live import LiveFeed, Watcher, sse
from ivr_bridge.media_stream import is_call_sid
from ivr_bridge.metrics import BridgeMetrics, histogram_quantile
from ivr_bridge.records import CallStore, record_json
from ivr_bridge.settings import Settings

STATIC = Path(__file__).parent / "static"
STATS_EVERY_S = 2.0  # the dashboard's chart and call list refresh
LATENCY_WINDOW = 30  # ticks: reply latency is shown over the last minute
KEEPALIVE_S = 15.0  # a comment line keeps proxies from closing a quiet event stream
MAX_CALLER_ID = 40
MAX_RECORDS = 500  # one history page
OUTCOMES = frozenset(str(o) for o in Outcome)
# The pages load only their own scripts and styles; media and sockets go to this origin.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


@dataclass(frozen=True, slots=True)
class Softphone:
    """What the app gives the softphone routes: a slot for a new call (False at capacity
    or while draining), and the per-call stream token when streams are authenticated."""

    reserve: Callable[[str], Awaitable[bool]]
    mint: Callable[[str], str] | None


def page_routes(
    settings: Settings,
    feed: LiveFeed,
    metrics: BridgeMetrics,
    store: CallStore,
    live_calls: Callable[[], Awaitable[list[dict[str, Any]]]],
    softphone: Softphone,
) -> list[BaseRoute]:
    token = settings.api_token

    def phone_refusal(request: Request) -> Response | None:
        """The softphone is open in development mode (as the media stream is), and needs
        the API token once the bridge proves its callers come from Twilio."""
        if not settings.phone:
            return _error(404, "the softphone is off (IVR_PHONE=0)")
        if settings.development_mode:
            return None
        if not token:
            return _error(403, "the softphone needs IVR_API_TOKEN when TWILIO_AUTH_TOKEN is set")
        return bearer_refusal(token, request)

    phone_html = _page("phone.html", protected=not settings.development_mode)
    dashboard_html = _page("dashboard.html", protected=True)

    async def phone_page(request: Request) -> Response:
        if not settings.phone:
            return _error(404, "the softphone is off (IVR_PHONE=0)")
        return Response(phone_html, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def dashboard_page(request: Request) -> Response:
        return Response(dashboard_html, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def place_call(request: Request) -> Response:
        """A new softphone call: its sid, the stream URL to open and its parameters."""
        if (denied := phone_refusal(request)) is not None:
            return denied
        raw = await bounded_body(request, 1024)
        if raw is None:
            return _error(413, "the body is over 1 KB")
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            return _error(400, 'the body must be a JSON object like {"from": "Alice"}')
        caller = "".join(ch for ch in str(body.get("from") or "softphone") if ch.isprintable())
        call_sid = "CA" + secrets.token_hex(16)  # Twilio's shape, so records and hooks take it
        if not await softphone.reserve(call_sid):
            return _error(503, "the bridge is at capacity or shutting down; try again shortly")
        query = f"call={call_sid}"
        if softphone.mint is not None:
            query += f"&token={softphone.mint(call_sid)}"
        return JSONResponse(
            {
                "call_sid": call_sid,
                "stream_path": f"/phone/stream?{query}",
                "parameters": {"From": caller[:MAX_CALLER_ID], "To": "ivr-bridge"},
            },
            headers={"cache-control": "no-store"},
        )

    async def call_events(request: Request) -> Response:
        """One call's events, for the softphone's live transcript."""
        if (denied := phone_refusal(request)) is not None:
            return denied
        call_sid = request.path_params["call_sid"]
        if not is_call_sid(call_sid):
            return _error(404, "no such call")
        return _event_stream(feed, call_sid, hello=None, tick=None)

    async def dashboard_feed(request: Request) -> Response:
        """Every call's events as they happen, and every STATS_EVERY_S the live calls (of
        every instance) with the chart's figures."""
        if (denied := bearer_refusal(token, request)) is not None:
            return denied
        readings = deque([metrics.reply_buckets()], maxlen=LATENCY_WINDOW)

        async def tick() -> dict[str, Any]:
            now = metrics.reply_buckets()
            p50, p95 = (histogram_quantile(q, now, readings[0]) for q in (0.5, 0.95))
            readings.append(now)
            calls = await live_calls()
            return {
                "at": datetime.now(UTC).timestamp(),
                "active": len(calls),
                "reply_ms": {"p50": _ms(p50), "p95": _ms(p95)},
                "calls": calls,
            }

        return _event_stream(feed, None, hello=tick, tick=tick)

    async def search_records(request: Request) -> Response:
        if (denied := bearer_refusal(token, request)) is not None:
            return denied
        query = _record_query(request)
        if isinstance(query, Response):
            return query
        limit = _integer(request.query_params.get("limit"), 100, 1, MAX_RECORDS)
        rows = await store.list_calls(limit=limit, **query)
        return Response(record_json({"calls": rows}), media_type="application/json")

    async def export_records(request: Request) -> Response:
        """Full records as JSON lines, oldest first, streamed (as `ivr-bridge calls export`)."""
        if (denied := bearer_refusal(token, request)) is not None:
            return denied
        query = _record_query(request)
        if isinstance(query, Response):
            return query

        async def lines() -> AsyncIterator[bytes]:
            async for record in store.export(**query):
                yield (record_json(record) + "\n").encode()

        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        disposition = f'attachment; filename="ivr-calls-{stamp}.jsonl"'
        return StreamingResponse(
            lines(), media_type="application/x-ndjson", headers={"content-disposition": disposition}
        )

    return [
        Route("/phone", phone_page, methods=["GET"]),
        Route("/phone/calls", place_call, methods=["POST"]),
        Route("/phone/calls/{call_sid}/events", call_events, methods=["GET"]),
        Route("/dashboard", dashboard_page, methods=["GET"]),
        Route("/dashboard/feed", dashboard_feed, methods=["GET"]),
        Route("/records", search_records, methods=["GET"]),
        Route("/records/export", export_records, methods=["GET"]),
        Mount("/ui", StaticFiles(directory=STATIC), name="ui"),
    ]


def _page(name: str, *, protected: bool) -> bytes:
    """A page as served: rendered once, when the routes are made (no file I/O per request).
    It learns what it needs from data attributes: no inline script to allow."""
    html = (STATIC / name).read_text(encoding="utf-8")
    html = html.replace('data-protected=""', f'data-protected="{"yes" if protected else "no"}"', 1)
    html = html.replace('data-outcomes=""', f'data-outcomes="{",".join(sorted(OUTCOMES))}"', 1)
    return html.encode()


def _event_stream(
    feed: LiveFeed,
    call_sid: str | None,
    hello: Callable[[], Awaitable[dict[str, Any]]] | None,
    tick: Callable[[], Awaitable[dict[str, Any]]] | None,
) -> Response:
    async def messages(watcher: Watcher) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        if hello is not None:
            yield sse("stats", await hello())
        else:
            yield b": watching\n\n"  # the page knows at once that the stream is open
        next_tick = loop.time() + STATS_EVERY_S
        quiet_since = loop.time()
        while True:
            wait = (next_tick if tick is not None else quiet_since + KEEPALIVE_S) - loop.time()
            for kind, data in await watcher.next(max(0.0, wait)):
                yield sse(kind, data)
                quiet_since = loop.time()
            if watcher.lagged:
                yield sse("lagged", {"reason": "this page fell behind; reload the live view"})
                return
            now = loop.time()
            if tick is not None and now >= next_tick:
                yield sse("stats", await tick())
                next_tick = now + STATS_EVERY_S
                quiet_since = now
            elif now - quiet_since >= KEEPALIVE_S:
                yield b": keep-alive\n\n"
                quiet_since = now

    async def stream() -> AsyncIterator[bytes]:
        with feed.watch(call_sid) as watcher:
            if watcher is None:
                yield sse("lagged", {"reason": "too many pages are watching; try again later"})
                return
            async for chunk in messages(watcher):
                yield chunk

    headers = {"cache-control": "no-store", "x-accel-buffering": "no"}  # nginx: pass each event on
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _record_query(request: Request) -> dict[str, Any] | Response:
    params = request.query_params
    query: dict[str, Any] = {"number": params.get("number", "").strip()[:MAX_CALLER_ID] or None}
    outcome = params.get("outcome", "")
    if outcome and outcome not in OUTCOMES:
        return _error(422, f"outcome must be one of {', '.join(sorted(OUTCOMES))}")
    query["outcome"] = outcome or None
    for name in ("since", "until"):
        value = params.get(name, "")
        try:
            when = datetime.fromisoformat(value) if value else None
        except ValueError:
            return _error(422, f"{name} must be an ISO 8601 time like 2026-11-28T09:00:00Z")
        query[name] = when.replace(tzinfo=UTC) if when and when.tzinfo is None else when
    return query


def _integer(raw: str | None, default: int, low: int, high: int) -> int:
    try:
        return min(high, max(low, int(raw))) if raw else default
    except ValueError:
        return default


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
