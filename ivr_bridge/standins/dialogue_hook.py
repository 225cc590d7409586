"""A stand-in for the call centre's dialogue endpoint (IVR_DIALOGUE_URL), for the `hook`
dialogue step.

It accepts a POST on any path, checks its `X-IVR-Signature` with `ivr_bridge.hooks.verify`
(a bad or missing one gets 401 and is only counted), records each turn and answers
`{"say", "action", "to"}` (see `ivr_bridge.cascade.hook_dialogue`): from a script of
`HookAnswer`s, one per turn, or a function of the request; past the script, `default_answer`
(a greeting, "You said ...", "agent" transfers, "bye" hangs up). A `HookAnswer` can be any
status, raw bytes (a broken answer) or held until `release()` (a slow endpoint).

It runs on the test's own event loop (aiohttp.web), or alone:

    python -m ivr_bridge.standins.dialogue_hook --secret S --port 8093 --transfer-to +15550100

which prints each verified turn as a JSON line. Point the bridge at it with
IVR_DIALOGUE=hook, IVR_DIALOGUE_URL=http://127.0.0.1:8093/ and IVR_HOOK_SECRET=S.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ivr_bridge.hooks import SIGNATURE_HEADER, SIGNATURE_TOLERANCE_S, verify
from ivr_bridge.standins.llm import DEFAULT_TRANSFER_TO, HttpStandIn, serve_until_signalled


@dataclass(frozen=True)
class HookAnswer:
    """What the stand-in answers to one turn."""

    body: Any = None  # JSON-able, e.g. {"say": "Hello"}; None: `default_answer`
    status: int = 200
    raw: bytes | None = None  # sent as it is instead of `body`
    hold: bool = False  # answer only once `release()` is called (or the client gives up)


@dataclass
class HookTurn:
    """One verified request."""

    body: dict[str, Any]
    headers: dict[str, str]  # lower-case names
    raw: bytes = b""  # the body as signed
    status: int = 0
    disconnected: bool = False  # the client went away before the answer
    at: float = field(default_factory=time.monotonic)

    @property
    def kind(self) -> str:
        turn = self.body.get("turn")
        return str(turn.get("kind", "")) if isinstance(turn, dict) else ""

    @property
    def text(self) -> str:
        turn = self.body.get("turn")
        return str(turn.get("text", "")) if isinstance(turn, dict) else ""

    @property
    def history(self) -> list[dict[str, Any]]:
        history = self.body.get("history")
        return history if isinstance(history, list) else []


Responder = Callable[[dict[str, Any]], HookAnswer | None]


def default_answer(request: dict[str, Any], transfer_to: str = DEFAULT_TRANSFER_TO) -> dict[str, Any]:
    """The stand-in's own dialogue, from the turn."""
    turn = request.get("turn")
    kind = str(turn.get("kind", "")) if isinstance(turn, dict) else ""
    text = str(turn.get("text", "")) if isinstance(turn, dict) else ""
    words = set(re.findall(r"[a-z]+", text.lower()))
    if kind == "start":
        return {"say": "Hello, this is the dialogue stand-in. Say agent for a person, or bye."}
    if kind == "digits":
        return {"say": f"You pressed {' '.join(text)}."}
    if kind == "no_input":
        return {"say": "Are you still there?"}
    if words & {"agent", "transfer", "person", "human"}:
        return {"say": "Transferring you now.", "action": "transfer", "to": transfer_to}
    if words & {"bye", "goodbye"}:
        return {"say": "Goodbye!", "action": "hangup"}
    return {"say": f"You said: {text}"}


class DialogueHookStandIn(HttpStandIn):
    def __init__(
        self,
        secret: str,
        script: Iterable[HookAnswer] | Responder = (),
        *,
        transfer_to: str = DEFAULT_TRANSFER_TO,
        tolerance_s: float = SIGNATURE_TOLERANCE_S,
        on_turn: Callable[[HookTurn], None] | None = None,
    ) -> None:
        super().__init__()
        self.secret = secret
        self.transfer_to = transfer_to
        self.tolerance_s = tolerance_s
        self._responder: Responder | None = script if callable(script) else None
        self._script: deque[HookAnswer] = deque() if callable(script) else deque(script)
        self._gate = asyncio.Event()
        self._on_turn = on_turn
        self.turns: list[HookTurn] = []  # verified requests, in arrival order
        self.rejected = 0  # answered 401: a bad or missing signature

    def script(self, *answers: HookAnswer) -> None:
        """Queue answers, one per coming turn."""
        self._script.extend(answers)

    def release(self) -> None:
        """Let held answers go."""
        self._gate.set()

    def _stopped(self) -> None:
        self._gate.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._turn)
        return app

    async def _turn(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(
            self.secret, body, request.headers.get(SIGNATURE_HEADER), time.time(), self.tolerance_s
        ):
            self.rejected += 1
            self._notify()
            return web.json_response({"error": "bad signature"}, status=401)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return web.json_response({"error": "the body is not a JSON object"}, status=400)
        record = HookTurn(data, {name.lower(): value for name, value in request.headers.items()}, body)
        self.turns.append(record)
        answer = self._responder(data) if self._responder else None
        if answer is None:
            answer = self._script.popleft() if self._script else HookAnswer()
        record.status = answer.status
        self._notify()
        if self._on_turn is not None:
            self._on_turn(record)
        if answer.hold:
            try:
                await self._gate.wait()
            except asyncio.CancelledError:
                if not self.stopping:
                    record.disconnected = True
                self._notify()
                raise
        if answer.raw is not None:
            return web.Response(body=answer.raw, status=answer.status, content_type="application/json")
        content = default_answer(data, self.transfer_to) if answer.body is None else answer.body
        return web.json_response(content, status=answer.status)


# -- Command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument(
        "--secret",
        default=os.environ.get("IVR_HOOK_SECRET", ""),
        help="the bridge's IVR_HOOK_SECRET (default: that environment variable)",
    )
    parser.add_argument("--transfer-to", default=DEFAULT_TRANSFER_TO, help="where 'agent' transfers")


def run(args: argparse.Namespace) -> int:
    if not args.secret:
        print("dialogue hook stand-in: --secret (or IVR_HOOK_SECRET) is required", file=sys.stderr)
        return 2

    def show(turn: HookTurn) -> None:
        with contextlib.suppress(ValueError):  # stdout closed
            print(
                json.dumps({"call_sid": turn.body.get("call_sid"), "turn": turn.body.get("turn")}), flush=True
            )

    standin = DialogueHookStandIn(args.secret, transfer_to=args.transfer_to, on_turn=show)
    url = f"http://{args.host}:{args.port}/"
    banner = f"dialogue hook stand-in: IVR_DIALOGUE_URL={url} (checking {SIGNATURE_HEADER})"
    return serve_until_signalled(standin, args.host, args.port, banner)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ivr_bridge.standins.dialogue_hook",
        description="A stand-in for the dialogue endpoint of IVR_DIALOGUE=hook: checks signatures, "
        "prints each turn as a JSON line, answers what to say and do.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
