"""The call-control HTTP API: list and inspect calls, transfer or hang them up.

Every route but the OpenAPI description needs `Authorization: Bearer <IVR_API_TOKEN>`;
without a configured token the API is off. Thin adapters over `ivr_bridge.control`.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ivr_bridge.call import SHOWN_STATES
from ivr_bridge.connections import bounded_body
from ivr_bridge.control import CallControl, ControlError
from ivr_bridge.media_stream import is_call_sid
from ivr_bridge.records import record_json

log = logging.getLogger("ivr_bridge.control_api")

MAX_BODY_BYTES = 4096


def control_routes(
    token: str,
    live_calls: Callable[[], Awaitable[list[dict[str, Any]]]],
    live_call: Callable[[str], Awaitable[dict[str, Any] | None]],
    control: CallControl,
    record: Callable[[str], Awaitable[dict[str, Any] | None]],
) -> list[Route]:
    """`live_calls` lists the live calls (short snapshots) of every instance, `live_call`
    finds one (full snapshot) wherever it is carried; `record` reads a call's stored record."""

    async def list_calls(request: Request) -> Response:
        if (denied := bearer_refusal(token, request)) is not None:
            return denied
        return JSONResponse({"calls": await live_calls()})

    async def show_call(request: Request) -> Response:
        if (denied := bearer_refusal(token, request)) is not None:
            return denied
        call_sid = request.path_params["call_sid"]
        if not is_call_sid(call_sid):
            return _error(404, "no such call: a call sid is letters, digits, - and _")
        live = await live_call(call_sid)
        if live is not None:
            return JSONResponse({"active": True, **live})
        stored = await record(call_sid)
        if stored is None:
            return _error(404, f"no call {call_sid} on record")
        return Response(record_json({"active": False, **stored}), media_type="application/json")

    async def transfer(request: Request) -> Response:
        if (denied := bearer_refusal(token, request)) is not None:
            return denied
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        to = body.get("to")
        if not isinstance(to, str):
            return _error(422, 'the body must be {"to": "+15550100"}')
        return await _carry_out(control.transfer(request.path_params["call_sid"], to.strip(), "api"))

    async def hangup(request: Request) -> Response:
        if (denied := bearer_refusal(token, request)) is not None:
            return denied
        return await _carry_out(control.hangup(request.path_params["call_sid"], "api"))

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    return [
        Route("/calls", list_calls, methods=["GET"]),
        Route("/calls/{call_sid}", show_call, methods=["GET"]),
        Route("/calls/{call_sid}/transfer", transfer, methods=["POST"]),
        Route("/calls/{call_sid}/hangup", hangup, methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]


def bearer_refusal(token: str, request: Request) -> Response | None:
    """Why `request` may not use the API (403 when it is off, 401 without the right
    `Authorization: Bearer` token), or None. Compared in constant time; never logged."""
    if not token:
        return _error(403, "the control API is off: set IVR_API_TOKEN to use it")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        client = request.client.host if request.client else "?"
        path = request.url.path
        log.warning("API: %s bearer token on %s from %s", "wrong" if given else "no", path, client)
        response = _error(401, "a valid bearer token is required")
        response.headers["WWW-Authenticate"] = 'Bearer realm="ivr-bridge"'
        return response
    return None


async def _carry_out(action: Awaitable[Any]) -> Response:
    try:
        result = await action
    except ControlError as exc:
        return _error(exc.status, str(exc))
    return JSONResponse(result.as_dict())


async def _json_body(request: Request) -> dict[str, Any] | Response:
    raw = await bounded_body(request, MAX_BODY_BYTES)
    if raw is None:
        return _error(413, "body too large")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        return _error(400, "the body is not JSON")
    return body if isinstance(body, dict) else _error(422, "the body must be a JSON object")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = {"$ref": "#/components/schemas/Error"}
_SUMMARY = {"$ref": "#/components/schemas/CallSummary"}
_SID = {"name": "call_sid", "in": "path", "required": True, "schema": {"type": "string"}}
_DENIED = {
    "401": _json(_ERROR, "Missing or wrong bearer token"),
    "403": _json(_ERROR, "The control API is off (no IVR_API_TOKEN)"),
}
_ACTION = {
    "200": _json({"$ref": "#/components/schemas/ControlResult"}, "Done, or the call had already ended"),
    **_DENIED,
    "409": _json(_ERROR, "The call is already being transferred elsewhere or hung up"),
    "502": _json(_ERROR, "Twilio's REST API failed; the request may be retried"),
    "503": _json(_ERROR, "No Twilio REST credentials on this instance"),
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "ivr-bridge call control",
        "version": "1",
        "description": "Active calls, call records, transfer and hang-up. Transfer and hang-up "
        "wait for the bot's current sentence to finish playing (at most IVR_PLAYOUT_WAIT_S), then "
        "go through Twilio's REST API, so any instance can act on any call. Both are idempotent.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "CallSummary": {
                "type": "object",
                "required": ["call_sid", "state", "started_at"],
                "properties": {
                    "call_sid": {"type": "string"},
                    "stream_sid": {"type": "string"},
                    "from": {"type": "string"},
                    "to": {"type": "string"},
                    "state": {
                        "type": "string",
                        "enum": list(SHOWN_STATES),
                    },
                    "outcome": {"type": "string"},
                    "provider": {"type": "string"},
                    "instance": {"type": "string"},
                    "started_at": {"type": "number", "description": "Unix time"},
                    "duration_s": {"type": "number"},
                    "bot_speaking": {"type": "boolean"},
                    "turns": {"type": "integer"},
                    "barge_ins": {"type": "integer"},
                    "latency": {"type": "object"},
                },
            },
            "Call": {
                "type": "object",
                "description": "An active call's live state (active: true) or a stored call record "
                "(active: false) with its events in order.",
                "required": ["active", "call_sid"],
                "properties": {
                    "active": {"type": "boolean"},
                    "call_sid": {"type": "string"},
                    "transcript": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "at": {"type": "number", "description": "seconds since the call started"},
                                "role": {"type": "string", "enum": ["user", "assistant"]},
                                "text": {"type": "string"},
                                "heard_text": {"type": ["string", "null"]},
                                "heard_ms": {"type": "integer"},
                                "sent_ms": {"type": "integer"},
                                "interrupted": {"type": "boolean"},
                            },
                        },
                    },
                    "emotions": {"type": "array"},
                    "dtmf": {"type": "array"},
                    "events": {"type": "array"},
                },
                "additionalProperties": True,
            },
            "ControlResult": {
                "type": "object",
                "required": ["call_sid", "action", "result"],
                "properties": {
                    "call_sid": {"type": "string"},
                    "action": {"type": "string", "enum": ["transfer", "hangup"]},
                    "to": {"type": "string"},
                    "source": {"type": "string", "enum": ["api", "hook", "dtmf"]},
                    "result": {"type": "string", "enum": ["done", "call_already_ended"]},
                    "waited_ms": {"type": "integer"},
                    "played_out": {"type": "boolean"},
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/calls": {
            "get": {
                "summary": "Active calls on this instance",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "calls": {"type": "array", "items": _SUMMARY},
                            },
                        },
                        "Active calls with their state",
                    ),
                    **_DENIED,
                },
            }
        },
        "/calls/{call_sid}": {
            "get": {
                "summary": "A call's state, live transcript, emotions and timings",
                "parameters": [_SID],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Call"}, "The call"),
                    **_DENIED,
                    "404": _json(_ERROR, "No such call on this instance or on record"),
                },
            }
        },
        "/calls/{call_sid}/transfer": {
            "post": {
                "summary": "Transfer the call (<Dial>) once the bot's sentence has played",
                "parameters": [_SID],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["to"],
                                "properties": {
                                    "to": {"type": "string", "description": "E.164 number or sip: URI"}
                                },
                            }
                        }
                    },
                },
                "responses": {
                    **_ACTION,
                    "400": _json(_ERROR, "The body is not JSON"),
                    "422": _json(_ERROR, "No valid 'to'"),
                },
            }
        },
        "/calls/{call_sid}/hangup": {
            "post": {
                "summary": "Hang the call up once the bot's sentence has played",
                "parameters": [_SID],
                "responses": _ACTION,
            }
        },
    },
}
