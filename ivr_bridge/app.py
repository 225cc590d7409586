"""HTTP and WebSocket routes: thin adapters between Starlette and the call orchestrator."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from twilio.twiml.voice_response import Connect, VoiceResponse

from ivr_bridge.call import Call
from ivr_bridge.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ivr_bridge.metrics import BridgeMetrics
from ivr_bridge.settings import Settings

log = logging.getLogger("ivr_bridge")

# Call details handed on to the stream as <Parameter>s (they arrive in start.customParameters).
FORWARDED_PARAMETERS = ("CallSid", "From", "To")
MAX_PARAMETER_CHARS = 400  # Twilio caps name + value at 500 characters


class StarletteTwilioSocket:
    """Adapts Starlette's WebSocket to the orchestrator's `TwilioSocket`."""

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket
        self._closed = False

    async def receive(self) -> str | bytes | None:
        if self._closed:
            return None
        try:
            message = await self._ws.receive()
        except RuntimeError:  # receive after the disconnect message
            message = {"type": "websocket.disconnect"}
        if message["type"] == "websocket.disconnect":
            self._closed = True
            return None
        text = message.get("text")
        return text if text is not None else message.get("bytes", b"")

    async def send(self, text: str) -> None:
        try:
            await self._ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError) as exc:
            # Leave receive() working: frames that arrived before the close (a `stop`) are
            # still queued and say how the call ended.
            raise ConnectionError("Twilio socket closed") from exc

    async def close(self, code: int = 1000) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):  # already gone
                await self._ws.close(code)


def twiml_for_call(settings: Settings, params: dict[str, str]) -> str:
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=settings.stream_url)
    for name in FORWARDED_PARAMETERS:
        if params.get(name):
            stream.parameter(name=name, value=params[name][:MAX_PARAMETER_CHARS])
    response.append(connect)
    return str(response)


def create_app(settings: Settings, on_call_end: Callable[[Call], None] | None = None) -> Starlette:
    """The ASGI app. `on_call_end` sees each finished call (its transcript, playback, stats)."""
    active: set[Call] = set()
    metrics = BridgeMetrics(lambda: active)

    async def twiml(request: Request) -> Response:
        params = dict(request.query_params)
        if request.method == "POST":
            # Twilio posts application/x-www-form-urlencoded; parse_qsl reads it without
            # the python-multipart dependency that Request.form() needs.
            body = (await request.body()).decode("utf-8", "replace")
            params.update(parse_qsl(body, keep_blank_values=True))
        return Response(twiml_for_call(settings, params), media_type="application/xml")

    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        call = Call(settings, StarletteTwilioSocket(websocket), metrics=metrics)
        active.add(call)
        try:
            await call.run()
        finally:
            # Together, with no await between: a scrape counts the call once.
            metrics.call_ended(call)
            active.discard(call)
            if on_call_end is not None:
                on_call_end(call)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "active_calls": len(active)})

    async def metrics_page(request: Request) -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    app = Starlette(
        routes=[
            Route("/twiml", twiml, methods=["GET", "POST"]),
            WebSocketRoute("/media-stream", media_stream),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics_page, methods=["GET"]),
        ]
    )
    app.state.settings = settings
    app.state.active_calls = active
    app.state.metrics = metrics
    return app
