"""A stand-in for the one Twilio REST endpoint the bridge uses: updating a live call.

`POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`, form-encoded (`Twiml`,
`Url`, `Status`...), HTTP Basic auth with the account sid and auth token. Known calls
answer 200 with a call resource; unknown ones 404 with Twilio's error 20404; bad auth 401
with error 20003. Unlike Twilio it does not end the call's Media Stream after an update
(`stop`, then close): a test does that with `TwilioCaller.hang_up()`. Runs under uvicorn
in a thread, so a test's event loop stays free, or on its own as `ivr-bridge
stub-twilio-api`, which prints each update as a JSON line.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@dataclass
class CallUpdate:
    call_sid: str
    params: dict[str, str]
    at: float = field(default_factory=time.monotonic)


@dataclass
class TwilioRestStandIn:
    account_sid: str = "AC" + "1" * 32
    auth_token: str = "rest_test_token"
    live_calls: set[str] = field(default_factory=set)  # sids that exist; others are 20404
    any_call: bool = False  # every sid exists until it is completed or redirected
    on_update: Callable[[CallUpdate], None] | None = None  # runs on the stand-in's thread
    updates: list[CallUpdate] = field(default_factory=list)
    ended_calls: set[str] = field(default_factory=set)
    _updated: threading.Condition = field(default_factory=threading.Condition)

    def wait_for_updates(self, count: int, timeout: float = 10.0) -> list[CallUpdate]:
        with self._updated:
            if not self._updated.wait_for(lambda: len(self.updates) >= count, timeout):
                raise TimeoutError(f"{len(self.updates)} of {count} call updates within {timeout} s")
            return list(self.updates)

    async def _update(self, request: Request) -> JSONResponse:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {expected}":
            return JSONResponse({"code": 20003, "message": "Authenticate", "status": 401}, 401)
        call_sid = request.path_params["call_sid"]
        live = call_sid in self.live_calls or (self.any_call and call_sid not in self.ended_calls)
        if request.path_params["account_sid"] != self.account_sid or not live:
            body = {"code": 20404, "message": "The requested resource was not found", "status": 404}
            return JSONResponse(body, 404)
        params = dict(parse_qsl((await request.body()).decode()))
        update = CallUpdate(call_sid, params)
        with self._updated:
            self.updates.append(update)
            if self.any_call and params.get("Status") == "completed":
                self.ended_calls.add(call_sid)
            self._updated.notify_all()
        if self.on_update is not None:
            self.on_update(update)
        status = "completed" if params.get("Status") == "completed" else "in-progress"
        return JSONResponse({"sid": call_sid, "account_sid": self.account_sid, "status": status})

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(
                    "/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json",
                    self._update,
                    methods=["POST"],
                )
            ]
        )

    def serve(self) -> tuple[str, uvicorn.Server, threading.Thread]:
        """Start on a free loopback port; returns (base URL, server, thread)."""
        app = self.app()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ivr-bridge stub-twilio-api",
        description="A stand-in for Twilio's call-update REST endpoint. Point the bridge at it "
        "with IVR_TWILIO_API_URL=http://HOST:PORT and the same TWILIO_ACCOUNT_SID / TWILIO_AUTH_TOKEN.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TwilioRestStandIn()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--account-sid", default=defaults.account_sid)
    parser.add_argument("--auth-token", default=defaults.auth_token)


def run(args: argparse.Namespace) -> int:
    def show(update: CallUpdate) -> None:
        print(json.dumps({"call_sid": update.call_sid, **update.params}), flush=True)

    standin = TwilioRestStandIn(args.account_sid, args.auth_token, any_call=True, on_update=show)
    print(f"Twilio REST stand-in on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(standin.app(), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
