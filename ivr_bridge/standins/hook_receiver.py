"""A hook receiver: a real HTTP endpoint that checks the bridge's hook signatures.

For tests, `HookReceiver(secret, responses)` serves on a free loopback port in a thread
(so a test's event loop stays free for the bridge). It accepts a POST on any path, checks
its `X-IVR-Signature` with `ivr_bridge.hooks.verify`, records every verified request
(retries included) and answers from a script: a list of `HookResponse` consumed one per
request, or a function of (event, attempt) choosing one. A bad signature gets 401 and is
only counted; verified requests past the script get an empty 200.

For people trying the hooks out:

    python -m ivr_bridge.standins.hook_receiver --secret S --port 8090 --on dtmf=transfer:+15550100

prints each verified event as one JSON line on stdout and answers the `--on` actions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ivr_bridge.events import EVENT_TYPES
from ivr_bridge.hooks import DELIVERY_HEADER, SIGNATURE_HEADER, SIGNATURE_TOLERANCE_S, verify
from ivr_bridge.settings import is_phone_target

log = logging.getLogger("ivr_bridge.standins.hook_receiver")  # also when run as __main__


@dataclass(frozen=True)
class HookResponse:
    """What the receiver answers to one request."""

    status: int = 200
    body: Any = None  # JSON-able, e.g. {"action": "hangup"}; None answers an empty body
    delay_s: float = 0.0  # wait this long before answering: a slow receiver
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. {"Retry-After": "1"}


@dataclass(frozen=True)
class ReceivedHook:
    """One verified request."""

    event: dict[str, Any]  # the parsed body
    headers: dict[str, str]  # lower-case names
    at: float  # time.monotonic() on arrival
    status: int  # what the receiver answered
    path: str
    peer: str = ""  # the client's "host:port": one per connection it used

    @property
    def type(self) -> str:
        return str(self.event.get("type", ""))

    @property
    def call_sid(self) -> str:
        return str(self.event.get("call_sid", ""))

    @property
    def seq(self) -> int:
        return int(self.event.get("seq", 0))

    @property
    def delivery_id(self) -> str:
        return self.headers.get(DELIVERY_HEADER.lower(), "")


# (event, attempt) -> a response, or None for the script/default; attempt counts the
# requests carrying this delivery id, from 1.
Responder = Callable[[dict[str, Any], int], HookResponse | None]


class HookReceiver:
    def __init__(
        self,
        secret: str,
        responses: Iterable[HookResponse] | Responder = (),
        *,
        tolerance_s: float = SIGNATURE_TOLERANCE_S,
        on_receive: Callable[[ReceivedHook], None] | None = None,
    ) -> None:
        self.secret = secret
        self.tolerance_s = tolerance_s
        self._responder: Responder | None = responses if callable(responses) else None
        self._script: deque[HookResponse] = deque() if callable(responses) else deque(responses)
        self._on_receive = on_receive
        self.received: list[ReceivedHook] = []  # verified requests in arrival order, retries included
        self.rejected = 0  # requests answered 401 (bad or missing signature)
        self.url = ""  # the base URL, once serving
        self._attempts: dict[str, int] = {}
        self._changed = threading.Condition()  # an RLock: predicates may call the helpers below
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, once a request paused
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # -- Scripting and reading, from any thread --------------------------------------------------

    def script(self, *responses: HookResponse) -> None:
        """Queue more canned responses, one per coming request."""
        with self._changed:
            self._script.extend(responses)

    def requests(self, call_sid: str | None = None) -> list[ReceivedHook]:
        """The verified requests so far (of one call), retries included."""
        with self._changed:
            return [r for r in self.received if call_sid is None or r.call_sid == call_sid]

    def delivered(self, call_sid: str | None = None) -> list[dict[str, Any]]:
        """The events answered 2xx (of one call), once each, in arrival order."""
        seen: set[str] = set()
        events = []
        for request in self.requests(call_sid):
            if 200 <= request.status < 300 and request.delivery_id not in seen:
                seen.add(request.delivery_id)
                events.append(request.event)
        return events

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Block until `predicate()` (evaluated under the receiver's lock, whenever a request
        arrives) is true; returns its value. Raises TimeoutError after `timeout` seconds."""
        with self._changed:
            result = self._changed.wait_for(predicate, timeout)
            if not result:
                raise TimeoutError(
                    f"hook receiver: condition not met within {timeout} s "
                    f"({len(self.received)} verified requests, {self.rejected} rejected)"
                )
            return result

    async def wait(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """`wait_for` from a coroutine, without blocking its event loop."""
        return await asyncio.to_thread(self.wait_for, predicate, timeout)

    # -- HTTP ------------------------------------------------------------------------------------

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        if not verify(
            self.secret, body, request.headers.get(SIGNATURE_HEADER), time.time(), self.tolerance_s
        ):
            with self._changed:
                self.rejected += 1
                self._changed.notify_all()
            log.warning("rejected a %s request with a bad or missing signature", request.url.path)
            return JSONResponse({"error": "bad signature"}, 401)
        try:
            event = json.loads(body)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            return JSONResponse({"error": "the body is not a JSON object"}, 400)
        arrived = time.monotonic()
        headers = {name.lower(): value for name, value in request.headers.items()}
        delivery = headers.get(DELIVERY_HEADER.lower(), "")
        with self._changed:
            attempt = self._attempts[delivery] = self._attempts.get(delivery, 0) + 1
            answer = self._responder(event, attempt) if self._responder else None
            if answer is None:
                answer = self._script.popleft() if self._script else HookResponse()
            peer = f"{request.client.host}:{request.client.port}" if request.client else ""
            record = ReceivedHook(event, headers, arrived, answer.status, request.url.path, peer)
            self.received.append(record)
            self._changed.notify_all()
        if self._on_receive is not None:
            self._on_receive(record)
        if answer.delay_s > 0:
            await self._pause(answer.delay_s)
        content = b"" if answer.body is None else json.dumps(answer.body).encode()
        return Response(
            content,
            answer.status,
            headers=dict(answer.headers),
            media_type="application/json" if content else None,
        )

    async def _pause(self, seconds: float) -> None:
        # Cut short by stop(): a scripted slow answer must not hold up a test's teardown.
        self._loop = asyncio.get_running_loop()
        if self._stopping is None:
            self._stopping = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/", self._hook, methods=["POST"]),
                Route("/{path:path}", self._hook, methods=["POST"]),
            ]
        )

    def _config(self, **options: Any) -> uvicorn.Config:
        return uvicorn.Config(
            self.app(), log_level="warning", lifespan="off", timeout_graceful_shutdown=1, **options
        )

    def serve(self) -> str:
        """Start on a free loopback port, in a thread; returns the base URL."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self._server = uvicorn.Server(self._config())
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="hook-receiver", daemon=True
        )
        self._thread.start()
        started = threading.Event()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            started.wait(0.02)  # startup only: uvicorn offers no event to wait on
        if not self._server.started:
            raise RuntimeError("the hook receiver did not start within 10 s")
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def run(self, host: str, port: int) -> None:
        """Serve in this thread until interrupted (Ctrl-C, SIGTERM)."""
        uvicorn.Server(self._config(host=host, port=port)).run()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# -- Command line ----------------------------------------------------------------------------


def parse_on(value: str) -> tuple[str, dict[str, str]]:
    """`dtmf=transfer:+15550100` -> ("dtmf", {"action": "transfer", "to": "+15550100"})."""
    kind, sep, action = (part.strip() for part in value.partition("="))
    if not sep or kind not in EVENT_TYPES:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected TYPE=ACTION with TYPE one of {', '.join(EVENT_TYPES)}"
        )
    name, _, target = action.partition(":")
    if action in ("hangup", "none"):
        return kind, {"action": action}
    if name == "transfer" and is_phone_target(target):
        return kind, {"action": "transfer", "to": target}
    raise argparse.ArgumentTypeError(
        f"{value!r}: ACTION must be transfer:+E164NUMBER, transfer:sip:..., hangup or none"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The receiver's options, shared by `python -m` and a future `ivr-bridge hook-receiver`."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument(
        "--secret",
        default=os.environ.get("IVR_HOOK_SECRET", ""),
        help="the bridge's IVR_HOOK_SECRET (default: that environment variable)",
    )
    parser.add_argument(
        "--on",
        action="append",
        type=parse_on,
        default=[],
        metavar="TYPE=ACTION",
        help="answer ACTION to events of TYPE, e.g. dtmf=transfer:+15550100 or dtmf=hangup (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    if not args.secret:
        print("hook-receiver: --secret (or IVR_HOOK_SECRET) is required", file=sys.stderr)
        return 2
    actions: dict[str, dict[str, str]] = dict(args.on)

    def respond(event: dict[str, Any], attempt: int) -> HookResponse | None:
        body = actions.get(str(event.get("type")))
        return HookResponse(body=body) if body else None

    def show(request: ReceivedHook) -> None:
        # stdout carries only the events, one JSON object a line, for piping into jq & co.
        print(json.dumps(request.event, ensure_ascii=False), flush=True)

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    answering = "; ".join(f"{kind} -> {json.dumps(body)}" for kind, body in actions.items())
    log.info(
        "hook receiver on http://%s:%d/ (any path), checking %s%s",
        args.host,
        args.port,
        SIGNATURE_HEADER,
        f"; answering {answering}" if answering else "",
    )
    HookReceiver(args.secret, respond, on_receive=show).run(args.host, args.port)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ivr_bridge.standins.hook_receiver",
        description="Receive the bridge's call events: check their signatures, print them as JSON lines.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
