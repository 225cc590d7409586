"""A stand-in for the one Twilio REST endpoint the bridge uses: updating a live call.

`POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`, form-encoded (`Twiml`,
`Url`, `Status`...), HTTP Basic auth with the account sid and auth token. Known calls
answer 200 with a call resource; unknown ones 404 with Twilio's error 20404; bad auth 401
with error 20003. Runs under uvicorn in a thread, so a test's event loop stays free.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
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


@dataclass
class TwilioRestStandIn:
    account_sid: str = "AC" + "1" * 32
    auth_token: str = "rest_test_token"
    live_calls: set[str] = field(default_factory=set)  # sids that exist; others are 20404
    updates: list[CallUpdate] = field(default_factory=list)
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
        if request.path_params["account_sid"] != self.account_sid or call_sid not in self.live_calls:
            body = {"code": 20404, "message": "The requested resource was not found", "status": 404}
            return JSONResponse(body, 404)
        params = dict(parse_qsl((await request.body()).decode()))
        with self._updated:
            self.updates.append(CallUpdate(call_sid, params))
            self._updated.notify_all()
        status = "completed" if params.get("Status") == "completed" else "in-progress"
        return JSONResponse({"sid": call_sid, "account_sid": self.account_sid, "status": status})

    def serve(self) -> tuple[str, uvicorn.Server, threading.Thread]:
        """Start on a free loopback port; returns (base URL, server, thread)."""
        app = Starlette(
            routes=[
                Route(
                    "/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json",
                    self._update,
                    methods=["POST"],
                )
            ]
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread
