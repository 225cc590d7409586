"""HTTP and WebSocket routes: thin adapters between Starlette and the call orchestrator.

Each call's events go to the call records and the hooks (both queue, and write off the
audio path); a mapped key or a hook's answer becomes a transfer or hang-up (`control`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import asdict
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from twilio.twiml.voice_response import Connect, VoiceResponse

from ivr_bridge.call import POLICY_VIOLATION, Call, Handoff, Outcome
from ivr_bridge.capacity import Capacity
from ivr_bridge.connections import Unproven, bounded_body
from ivr_bridge.control import CallControl, ControlError, ControlResult
from ivr_bridge.control_api import control_routes
from ivr_bridge.events import CallEvent
from ivr_bridge.fabric import Fabric, FabricError
from ivr_bridge.fallback import fallback_twiml
from ivr_bridge.hooks import HookAction, HookDispatcher
from ivr_bridge.live import LiveFeed
from ivr_bridge.media_stream import StreamStarted, is_call_sid
from ivr_bridge.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ivr_bridge.metrics import BridgeMetrics
from ivr_bridge.preflight import preflight
from ivr_bridge.providers import registry
from ivr_bridge.records import CallStore
from ivr_bridge.security import (
    TOKEN_PARAMETER,
    StreamTokens,
    signature_valid,
    signed_url,
    stream_token_secret,
)
from ivr_bridge.settings import Settings
from ivr_bridge.web import Softphone, page_routes
from ivr_bridge.ws_protocol import FRAME_SINK

log = logging.getLogger("ivr_bridge")

# Call details handed on to the stream as <Parameter>s (they arrive in start.customParameters).
FORWARDED_PARAMETERS = ("CallSid", "From", "To")
MAX_PARAMETER_CHARS = 400  # Twilio caps name + value at 500 characters
TRY_AGAIN_LATER = 1013  # WebSocket close code for a stream beyond capacity
HOOK_DRAIN_S = 10.0  # at shutdown, time left for queued hook deliveries (e.g. call.ended)
CAPACITY_WAIT_S = 1.0  # a webhook at capacity waits this long for a call to end before the fallback
HOOK_DRAIN_MIN_S = 1.0  # ... at least, when a drain (SIGTERM) has used up its own timeout
PREFLIGHT_RETRY_S = 10.0
FORWARD_MARGIN_S = 15.0  # a forwarded transfer: the owner's playout wait, its REST request, and some
FLEET_LIST_TIMEOUT_S = 2.0  # GET /calls: how long another instance may take to list its calls
# Twilio's webhook forms are a few KB with a few dozen fields: anything far larger is
# refused before it is read on, let alone parsed or checked (which cost the audio loop).
MAX_WEBHOOK_BYTES = 32 * 1024
MAX_WEBHOOK_FIELDS = 200


class AsgiTwilioSocket:
    """The orchestrator's `TwilioSocket` on the stream's own ASGI `receive` and `send`.

    Starlette's WebSocket re-checks its state machine on every message and its exception
    handlers wrap every send; the handshake goes through it, the 50 frames a second each
    way of an accepted stream do not."""

    def __init__(self, receive: Receive, send: Send, scope: Scope) -> None:
        self._receive = receive
        self._send = send
        self._closed = False
        self.close_code: int | None = None  # the code the socket closed with, once closed
        # ws_protocol.py's read callback takes a sink for frames; another server has none.
        self._set_sink = (scope.get("extensions") or {}).get(FRAME_SINK)

    def set_sink(self, sink: Callable[[str], bool] | None) -> None:
        """Offer each text frame to `sink` in the read callback, before `receive()` sees it
        (None: stop), where the server can (else `receive()` gets every frame)."""
        if self._set_sink is not None:
            self._set_sink(sink)

    async def receive(self) -> str | bytes | None:
        if self._closed:
            return None
        message = await self._receive()
        if message["type"] == "websocket.disconnect":
            self._closed = True
            self.close_code = message.get("code")
            return None
        text = message.get("text")
        return text if text is not None else message.get("bytes", b"")

    async def send(self, text: str) -> None:
        try:
            await self._send({"type": "websocket.send", "text": text})
        except (OSError, RuntimeError) as exc:  # gone, or closed by this side
            # Leave receive() working: frames that arrived before the close (a `stop`) are
            # still queued and say how the call ended.
            raise ConnectionError("Twilio socket closed") from exc

    async def close(self, code: int = 1000) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError, RuntimeError):  # already gone
                await self._send({"type": "websocket.close", "code": code})


class StreamEndpoint:
    """An ASGI app for a Media Stream route: `handle(websocket, receive, send)` gets the
    Starlette WebSocket for the handshake and the raw callables for the stream."""

    def __init__(self, handle: Callable[[WebSocket, Receive, Send], Coroutine[Any, Any, None]]) -> None:
        self._handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handle(WebSocket(scope, receive, send), receive, send)


def twiml_for_call(settings: Settings, params: dict[str, str], token: str | None = None) -> str:
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(
        url=settings.stream_url,
        status_callback=f"{settings.public_url}/stream-status",
        status_callback_method="POST",
    )
    for name in FORWARDED_PARAMETERS:
        value = _printable(params.get(name, ""))[:MAX_PARAMETER_CHARS]
        if value:
            stream.parameter(name=name, value=value)
    if token is not None:
        stream.parameter(name=TOKEN_PARAMETER, value=token)
    response.append(connect)
    return str(response)


def create_app(settings: Settings, on_call_end: Callable[[Call], None] | None = None) -> Starlette:
    """The ASGI app. `on_call_end` sees each finished call (its transcript, playback, stats)."""
    registry()  # the provider modules are imported now, not on the first call's audio path
    active: set[Call] = set()
    by_sid: dict[str, Call] = {}  # active calls that have started, for call control
    metrics = BridgeMetrics(lambda: active)
    feed = LiveFeed()  # call events to the pages watching live
    unproven = Unproven(settings.max_pending_connections)
    capacity = Capacity(settings.max_calls)
    slot_freed = asyncio.Event()  # set (and replaced) whenever a call releases its slot
    store = CallStore(settings.database, settings.instance_id, heartbeat_s=settings.heartbeat_s)
    fabric = Fabric(settings.redis_url, settings.instance_id) if settings.redis_url else None

    async def control_elsewhere(call_sid: str, handoff: Handoff) -> ControlResult | None:
        """A transfer or hang-up of a call another instance carries, carried out there."""
        owner = await fabric.owner(call_sid) if fabric is not None else None
        if fabric is None or owner is None:
            return None
        request = {"op": "control", "call_sid": call_sid, **asdict(handoff)}
        try:
            answer = await fabric.ask(owner, request, settings.playout_wait_s + FORWARD_MARGIN_S)
        except FabricError as exc:
            log.warning("[%s] %s; carrying the %s out here", call_sid, exc, handoff.action)
            return None
        if "error" in answer:
            raise ControlError(int(answer.get("status", 502)), str(answer["error"]))
        return ControlResult(**answer["result"])

    control = CallControl(settings, by_sid, claims=store, metrics=metrics, remote=control_elsewhere)

    async def serve_request(request: dict[str, Any]) -> dict[str, Any]:
        """A request from another instance (fabric.py): control of a call carried here, or
        the calls carried here."""
        op, sid = request.get("op"), str(request.get("call_sid", ""))
        if op == "control":
            action = "hangup" if request.get("action") == "hangup" else f"transfer:{request.get('to', '')}"
            try:
                result = await control.apply(sid, action, str(request.get("source", "api")))
            except ControlError as exc:
                return {"error": str(exc), "status": exc.status}
            return {"result": result.as_dict() if result else None}
        if op == "list":
            return {"calls": [call.snapshot(full=False) for call in list(by_sid.values())]}
        if op == "show":
            call = by_sid.get(sid)
            return {"call": call.snapshot() if call is not None else None}
        return {"error": f"unknown request {str(op)[:20]!r}", "status": 400}

    async def live_calls() -> list[dict[str, Any]]:
        """The live calls of every instance (of this one alone without a fabric)."""
        here = [call.snapshot(full=False) for call in list(by_sid.values())]
        if fabric is None:
            return here
        others = [i for i in await fabric.live_instances() if i != settings.instance_id]
        answers = await asyncio.gather(
            *(fabric.ask(i, {"op": "list"}, FLEET_LIST_TIMEOUT_S) for i in others), return_exceptions=True
        )
        for instance, answer in zip(others, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("calls of instance %s not listed: %s", instance, answer)
            else:
                here.extend(answer.get("calls", []))
        return here

    async def live_call(call_sid: str) -> dict[str, Any] | None:
        call = by_sid.get(call_sid)
        if call is not None:
            return call.snapshot()
        owner = await fabric.owner(call_sid) if fabric is not None else None
        if fabric is None or owner is None:
            return None
        try:
            answer = await fabric.ask(owner, {"op": "show", "call_sid": call_sid}, FLEET_LIST_TIMEOUT_S)
        except FabricError:
            return None
        return answer.get("call")

    background: set[asyncio.Task[Any]] = set()

    def run_in_background(work: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        background.add(task)
        task.add_done_callback(background.discard)

    async def apply(call_sid: str, action: str, source: str) -> None:
        try:
            await control.apply(call_sid, action, source)
        except ControlError as exc:
            log.warning("[%s] %s from %s not carried out: %s", call_sid, action, source, exc)

    async def hook_answered(event: CallEvent, answer: HookAction) -> None:
        if answer.action == "none":
            return
        if event.type == "call.ended":
            log.info("[%s] hook answered %s to call.ended: ignored", event.call_sid, answer.action)
            return
        await apply(
            event.call_sid, "hangup" if answer.action == "hangup" else f"transfer:{answer.to}", "hook"
        )

    hooks = HookDispatcher(settings, on_action=hook_answered)
    metrics.watch_routing(hooks, store)
    metrics.watch_connections(unproven)
    if fabric is not None:
        metrics.watch_fabric(fabric)

    def publish(call: Call, event: CallEvent) -> None:
        """A call's event: on record, to the hooks, and a mapped key carried out."""
        store.record(event)
        hooks.publish(event)
        feed.publish(event)
        if fabric is not None:
            fabric.share(event.as_dict())
        if event.type == "dtmf" and event.data["action"]:
            run_in_background(apply(event.call_sid, event.data["action"], "dtmf"), f"dtmf-{event.call_sid}")
        elif event.type == "agent.action":
            run_in_background(apply(event.call_sid, event.data["action"], "agent"), f"agent-{event.call_sid}")

    auth_token = settings.twilio_auth_token
    tokens: StreamTokens | None = None
    if settings.development_mode:
        log.warning(
            "DEVELOPMENT MODE: TWILIO_AUTH_TOKEN is not set, so webhook and Media Stream "
            "requests are NOT authenticated and anyone can place calls through this bridge. "
            "Set TWILIO_AUTH_TOKEN to your Twilio auth token before exposing it."
        )
    else:
        tokens = StreamTokens(stream_token_secret(auth_token), settings.stream_token_ttl_s)

    async def signed_form(request: Request) -> dict[str, str] | Response:
        """The webhook's parameters, or a refusal: 413/414 for a body or query larger than
        Twilio ever sends (before reading on), 403 if it is not signed by Twilio (when
        checked). The signature is checked as soon as the bounded body is read."""
        query = request.scope.get("query_string", b"").decode("latin-1")
        if len(query) > MAX_WEBHOOK_BYTES:
            return _refusal(414, "URI Too Long")
        body = ""
        if request.method == "POST":
            try:
                raw = await bounded_body(request, MAX_WEBHOOK_BYTES)
            except ClientDisconnect:  # gone, or closed by the request timeout (connections.py)
                return _refusal(400, "Bad Request")  # never sent: nobody is listening
            if raw is None:
                unproven.count("too_large", _client(request))
                return _refusal(413, "Payload Too Large")
            body = raw.decode("utf-8", "replace")
        try:
            # Twilio posts application/x-www-form-urlencoded; parse_qsl reads it without
            # the python-multipart dependency that Request.form() needs.
            fields = parse_qsl(body, keep_blank_values=True, max_num_fields=MAX_WEBHOOK_FIELDS)
            params = dict(parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_WEBHOOK_FIELDS))
        except ValueError:  # more fields than any Twilio request
            return _refusal(413, "Payload Too Large")
        params.update(fields)
        if tokens is not None:
            url = signed_url(settings.public_url, request.url.path, query)
            signature = request.headers.get("x-twilio-signature")
            if not signature_valid(auth_token, url, fields, signature):
                # Neither the signature nor the expected value: both would help a forger.
                log.warning(
                    "webhook refused (HTTP 403): %s X-Twilio-Signature on %s %s %s",
                    "invalid" if signature else "missing",
                    request.method,
                    request.url.path,
                    _client(request),
                )
                return _refusal(403, "Forbidden")
        return params

    async def stream_status(request: Request) -> Response:
        params = await signed_form(request)
        if isinstance(params, Response):
            return params
        event, call_sid = params.get("StreamEvent", "?"), params.get("CallSid", "-")
        if event == "stream-error":
            log.warning("[%s] Twilio stream error: %s", call_sid, params.get("StreamError", "")[:200])
        else:
            log.info("[%s] Twilio stream status: %s", call_sid, event[:40])
        return Response(status_code=204)

    async def twiml(request: Request) -> Response:
        params = await signed_form(request)
        if isinstance(params, Response):
            return params
        call_sid = params.get("CallSid", "")
        if call_sid and not is_call_sid(call_sid):
            return _refusal(400, "Bad Request")
        if request.app.state.draining:  # DRAINING (shutdown): new calls go to the fallback
            return Response(fallback_twiml(settings), media_type="application/xml")
        if call_sid in by_sid or (fabric is not None and call_sid and await fabric.owner(call_sid)):
            # A replayed webhook: the call has its stream, and a second one would be refused.
            log.warning("[%s] webhook for a call that already has a stream: fallback TwiML", call_sid)
            return Response(fallback_twiml(settings), media_type="application/xml")
        if not await slot_for(call_sid):
            log.warning("at capacity (%d calls): answering with the fallback TwiML", len(active))
            return Response(fallback_twiml(settings), media_type="application/xml")
        token = tokens.mint(call_sid) if tokens is not None else None
        return Response(twiml_for_call(settings, params, token), media_type="application/xml")

    async def admit(call: Call, start: StreamStarted, spent: tuple[str | None, int]) -> str | None:
        """Whether a stream's `start` may become a call: its token (when checked), one live
        stream per call sid (across the fleet with a fabric), and capacity. Only an
        admitted call takes a capacity slot, so sockets that never send a valid `start`
        cannot crowd out real callers. A softphone's token came with its URL, for the call
        sid it named, and was checked there (`phone_stream`, which passes its key as
        `spent`): its `start` must be for that call."""
        sid = start.call_sid
        # Popped: the token is spent here and stays out of call records and logs.
        token = start.custom_parameters.pop(TOKEN_PARAMETER, None)
        token_key, token_ttl_ms = None, 0
        if call.softphone:
            if sid != call.softphone:
                return "the start is not for the call the softphone's stream was opened for"
            token_key, token_ttl_ms = spent
        elif tokens is not None:
            refusal = tokens.check(token, sid)
            if refusal is not None:
                return refusal
            assert token is not None
            token_key, token_ttl_ms = tokens.spent_key(token)
        if sid in by_sid:
            return "this call already has a live stream"
        if fabric is not None:
            refusal = await fabric.admit(sid, token_key, token_ttl_ms)
            if refusal is not None:
                return refusal
        # With no await since the checks below: concurrent starts cannot overshoot a bound.
        if sid in by_sid or not capacity.take(sid, len(active)):
            if fabric is not None:
                run_in_background(fabric.release(sid), f"fabric-release-{sid}")
            return (
                "this call already has a live stream"
                if sid in by_sid
                else f"at capacity ({len(active)} calls)"
            )
        unproven.discard(call)
        active.add(call)
        by_sid[sid] = call
        return None

    async def slot_for(call_sid: str) -> bool:
        """Reserve a slot for the call's stream, waiting up to CAPACITY_WAIT_S for one to
        free: a caller who rings just as another hangs up gets in, not the apology."""
        deadline = asyncio.get_running_loop().time() + CAPACITY_WAIT_S
        while not (capacity.reserve(call_sid, len(active)) if call_sid else capacity.free(len(active)) > 0):
            try:
                async with asyncio.timeout_at(deadline):
                    await slot_freed.wait()
            except TimeoutError:
                return False
        return True

    async def softphone_slot(call_sid: str) -> bool:
        return not app.state.draining and await slot_for(call_sid)

    def release(call: Call) -> None:
        """A call's conversation is over: its slot is free for the next caller before its
        sockets are closed and its record written (a load at capacity never sees a call
        that has ended). Together, with no await between: a scrape counts the call once."""
        nonlocal slot_freed
        metrics.call_ended(call)
        active.discard(call)
        if by_sid.get(call.call_sid) is call:
            del by_sid[call.call_sid]
            if fabric is not None:
                run_in_background(fabric.release(call.call_sid), f"fabric-release-{call.call_sid}")
        slot_freed.set()  # wake the webhooks waiting for a slot; the next ones wait anew
        slot_freed = asyncio.Event()

    async def media_stream(websocket: WebSocket, receive: Receive, send: Send) -> None:
        # Refusals happen before accept(): uvicorn then answers the upgrade with HTTP 403,
        # and no voice API session is ever opened.
        if tokens is not None:
            signature = websocket.headers.get("x-twilio-signature")
            if not signature_valid(auth_token, settings.stream_url, (), signature):
                log.warning(
                    "media stream refused: %s x-twilio-signature from %s",
                    "invalid" if signature else "missing",
                    _peer(websocket),
                )
                await websocket.close(code=POLICY_VIOLATION)
                return
        await serve_stream(websocket, AsgiTwilioSocket(receive, send, websocket.scope))

    async def phone_stream(websocket: WebSocket, receive: Receive, send: Send) -> None:
        """The softphone's Media Stream: a browser cannot sign the upgrade as Twilio does,
        so it brings the per-call token `POST /phone/calls` gave it (when protected)."""
        call_sid = websocket.query_params.get("call", "")
        token = websocket.query_params.get("token")
        refusal = None
        if not settings.phone:
            refusal = "the softphone is off (IVR_PHONE=0)"
        elif not is_call_sid(call_sid):
            refusal = "no valid call sid"
        elif tokens is not None:
            refusal = tokens.check(token, call_sid)
        if refusal is not None:
            log.warning("softphone stream refused: %s, from %s", refusal, _peer(websocket))
            await websocket.close(code=POLICY_VIOLATION)
            return
        # Spent here; with a fabric, spent for the fleet too when its `start` is admitted.
        spent = tokens.spent_key(token) if tokens is not None and token else (None, 0)
        await serve_stream(
            websocket, AsgiTwilioSocket(receive, send, websocket.scope), softphone=call_sid, spent=spent
        )

    async def serve_stream(
        websocket: WebSocket,
        twilio: AsgiTwilioSocket,
        softphone: str = "",
        spent: tuple[str | None, int] = (None, 0),
    ) -> None:
        client = _peer(websocket)
        if websocket.app.state.draining:  # DRAINING (shutdown): refuse before accept, no call
            await websocket.close(code=TRY_AGAIN_LATER)
            return
        if len(active) >= settings.max_calls:
            log.warning("media stream from %s refused: at capacity (%d calls)", client, len(active))
            await websocket.close(code=TRY_AGAIN_LATER)
            return
        call = Call(
            settings,
            twilio,
            metrics=metrics,
            admit=lambda start: admit(call, start, spent),
            on_event=lambda event: publish(call, event),
            on_over=release,
        )
        call.softphone = softphone

        evicted = False

        def evict() -> None:  # the oldest unproven connection, making room for a new one
            nonlocal evicted
            evicted = True
            call.outcome = Outcome.NO_START
            run_in_background(call.twilio.close(POLICY_VIOLATION), "evict-stream")

        # Unproven until its `start` is admitted: capped with every other such connection.
        unproven.add(call, evict)
        try:
            try:
                await websocket.accept()
            except (OSError, RuntimeError):  # the caller left during the handshake
                call.outcome = Outcome.CLOSED_BEFORE_START
                return
            await call.run()
        finally:
            unproven.discard(call)
            if call.outcome == Outcome.NO_START and not evicted:
                unproven.count("start_timeout", f"from {client}")
            call.over()  # a call that never started (or a bug) is released here
            if on_call_end is not None:
                on_call_end(call)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "active_calls": len(active)})

    async def readyz(request: Request) -> Response:
        # Readiness, for load balancers: 503 once draining, while /healthz (liveness) stays 200
        # so the instance is not killed before its calls finish; 503 too until the voice API
        # has taken a session (IVR_PREFLIGHT), so no caller meets a wrong key first.
        if request.app.state.draining:
            return JSONResponse({"status": "draining", "active_calls": len(active)}, status_code=503)
        if request.app.state.not_ready is not None:
            body = {"status": "preflight", "reason": request.app.state.not_ready, "active_calls": len(active)}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ready", "active_calls": len(active)})

    async def run_preflight(app: Starlette) -> None:
        """Until the voice API takes a session: /readyz says why not, retried every PREFLIGHT_RETRY_S."""
        while True:
            reason = await preflight(settings)
            if reason is None:
                log.info("preflight: the voice API (%s) took a session; ready", settings.provider)
                app.state.not_ready = None
                return
            if app.state.not_ready != reason:
                log.error("preflight: %s; /readyz stays 503 until it works", reason)
            app.state.not_ready = reason
            await asyncio.sleep(PREFLIGHT_RETRY_S)

    async def metrics_page(request: Request) -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Migrates the records and marks calls a crash of this instance cut as interrupted.
        await store.open()
        if fabric is not None:
            await fabric.start(serve_request, on_event=feed.relay)
        watchers = [asyncio.create_task(metrics.watch_event_loop(), name="event-loop-lag")]
        if settings.preflight:
            watchers.append(asyncio.create_task(run_preflight(app), name="preflight"))
        try:
            yield
        finally:
            for task in watchers:
                task.cancel()
            # After the drain: the calls' last events go out, within what is left of the
            # drain timeout, so a hanging receiver cannot hold the exit past it.
            deadline = app.state.drain_deadline
            left = HOOK_DRAIN_S if deadline is None else deadline - asyncio.get_running_loop().time()
            await hooks.aclose(min(HOOK_DRAIN_S, max(HOOK_DRAIN_MIN_S, left)))
            if fabric is not None:
                await fabric.close()
            await store.close()

    app = Starlette(
        routes=[
            Route("/twiml", twiml, methods=["GET", "POST"]),
            WebSocketRoute("/media-stream", StreamEndpoint(media_stream)),
            WebSocketRoute("/phone/stream", StreamEndpoint(phone_stream)),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/stream-status", stream_status, methods=["POST"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_page, methods=["GET"]),
            *control_routes(settings.api_token, live_calls, live_call, control, store.get),
            *page_routes(
                settings,
                feed,
                metrics,
                store,
                live_calls,
                Softphone(reserve=softphone_slot, mint=tokens.mint if tokens is not None else None),
            ),
        ],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.active_calls = active
    app.state.calls_by_sid = by_sid
    app.state.store = store
    app.state.hooks = hooks
    app.state.control = control
    app.state.metrics = metrics
    app.state.unproven = unproven
    app.state.fabric = fabric
    app.state.draining = False  # set by the server (ivr_bridge.server) on SIGTERM
    app.state.not_ready = "preflight pending" if settings.preflight else None  # why /readyz is 503
    app.state.drain_deadline = None  # loop time the drain must be done by, once it began
    return app


def _printable(value: str) -> str:
    """`value` without control characters: XML 1.0 cannot carry most of them at all."""
    return "".join(ch for ch in value if ch.isprintable())


def _refusal(status: int, text: str) -> Response:
    # Connection: close: the rest of a refused body is not worth reading.
    return Response(f"{text}\n", status_code=status, media_type="text/plain", headers={"connection": "close"})


def _peer(websocket: WebSocket) -> str:
    return websocket.client.host if websocket.client else "?"


def _client(request: Request) -> str:
    return f"from {request.client.host}" if request.client else ""
