"""A stand-in for an OpenAI-compatible chat-completions API, for the `llm` dialogue step.

`POST /v1/chat/completions` (any path ending in `/chat/completions`), with
`Authorization: Bearer <key>` checked when the stand-in has a key: a wrong or missing one
gets OpenAI's 401 error body (`invalid_api_key`), except that its message quotes the key
given in full, where OpenAI masks most of it, so a client that logs error messages is
caught out. With `"stream": true` the reply comes as server-sent events like OpenAI's:
`chat.completion.chunk` objects, the first delta carrying the role, the content in small
pieces `chunk_delay_s` apart, tool calls with their arguments split across chunks, a
last chunk with `finish_reason`, then `data: [DONE]`. Without `stream`, one
`chat.completion`.

What it answers: a script (`Reply`s consumed one per request) or a function of the
messages; past the script, `default_reply`: "transfer"/"agent" in the caller's last
message streams a `transfer_call` tool call, "bye" an `end_call`, anything else is echoed.
`fail(status)` makes the next requests fail (500, 429...). A `Reply` can hold its stream
after some chunks until `release()` (to see a client speak before the stream ends, or
cancel it mid-stream), put malformed lines in it, or linger after `[DONE]`.

Every request is recorded (`ChatRequest`: its body and messages, what was sent, whether
it completed or the client went away mid-stream); `wait_for` waits on them. It runs on
the test's own event loop (aiohttp.web), or alone:

    python -m ivr_bridge.standins.llm --port 8092 --api-key sk-test-llm --chunk-delay-ms 40

which prints each request's last user message and the reply as a JSON line. Point the
bridge at it with IVR_LLM_URL=http://127.0.0.1:8092/v1 and the same IVR_LLM_API_KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web

from ivr_bridge.providers.base import END_CALL_TOOL, TRANSFER_CALL_TOOL

PATH = "/v1/chat/completions"
DEFAULT_KEY = "sk-test-llm"
DEFAULT_MODEL = "standin-chat"
DEFAULT_TRANSFER_TO = "+15550100"
GREETING = "Hello! How can I help you today?"


# -- What the aiohttp stand-ins share ----------------------------------------------------------


class HttpStandIn:
    """An HTTP stand-in on the running event loop: `async with`, or `start()` and `stop()`.
    A handler the client disconnects from is cancelled (`handler_cancellation`), so a
    stand-in sees a client go away even while it is holding its answer."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.stopping = False
        self.host = "127.0.0.1"
        self.port = 0
        self._changed = asyncio.Event()

    def app(self) -> web.Application:
        raise NotImplementedError

    def _stopped(self) -> None:
        """Stopping: let held answers go."""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.host, self.port = host, self._runner.addresses[0][1]

    async def stop(self) -> None:
        self.stopping = True
        self._stopped()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The base URL."""
        return f"http://{self.host}:{self.port}"

    def _notify(self) -> None:
        # A fresh event per change: waiters wake, check their predicate, wait on the next.
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until `predicate()` (checked on every change) is true; returns its value.
        Raises TimeoutError."""
        async with asyncio.timeout(timeout):
            while True:
                changed = self._changed
                if result := predicate():
                    return result
                await changed.wait()


def serve_until_signalled(standin: HttpStandIn, host: str, port: int, banner: str) -> int:
    """Serve from the command line until SIGINT or SIGTERM."""

    async def serve() -> None:
        await standin.start(host, port)
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        print(banner, file=sys.stderr, flush=True)
        await stop.wait()
        await standin.stop()

    asyncio.run(serve())
    return 0


# -- The chat-completions stand-in -------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str = "{}"  # JSON text, streamed in pieces


@dataclass(frozen=True)
class Reply:
    """What the stand-in answers to one request."""

    text: str = ""
    tool: ToolCall | None = None
    status: int = 200  # another: OpenAI's error body for it instead of a reply
    hold_after: int | None = None  # content chunks sent before holding the rest until `release()`
    garbage: bool = False  # a malformed line, a non-JSON event and a comment among the chunks
    linger: bool = False  # after [DONE], keep the response open until `release()`
    whole: bool = False  # one JSON completion even when asked to stream (as some servers do)


@dataclass
class ChatRequest:
    """One request, as the stand-in saw it."""

    body: dict[str, Any]
    authorized: bool
    reply: Reply | None = None
    status: int = 0
    chunks: int = 0  # data events sent, [DONE] included
    argument_chunks: int = 0  # of them, pieces of a tool call's arguments
    holding: bool = False  # stopped mid-stream, waiting for `release()`
    completed: bool = False  # the answer was sent whole
    disconnected: bool = False  # the client went away before it was
    at: float = field(default_factory=time.monotonic)

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages = self.body.get("messages")
        return messages if isinstance(messages, list) else []

    @property
    def last_user(self) -> str:
        for message in reversed(self.messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return str(message.get("content", ""))
        return ""


Responder = Callable[[list[dict[str, Any]]], Reply | None]


def default_reply(messages: list[dict[str, Any]], transfer_to: str = DEFAULT_TRANSFER_TO) -> Reply:
    """The stand-in's own dialogue, from the caller's last message."""
    last = ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            last = str(message.get("content", ""))
            break
    words = set(re.findall(r"[a-z]+", last.lower()))
    if words & {"transfer", "agent", "person", "human"}:
        return Reply("Transferring you now.", ToolCall(TRANSFER_CALL_TOOL, json.dumps({"to": transfer_to})))
    if words & {"bye", "goodbye"}:
        return Reply("Goodbye!", ToolCall(END_CALL_TOOL))
    if not last or "greet" in words:
        return Reply(GREETING)
    return Reply(f"You said: {last}")


class LlmStandIn(HttpStandIn):
    def __init__(
        self,
        script: Iterable[Reply] | Responder = (),
        *,
        api_key: str = DEFAULT_KEY,  # "": no key asked for (like a local Ollama)
        chunk_chars: int = 4,
        chunk_delay_s: float = 0.0,
        transfer_to: str = DEFAULT_TRANSFER_TO,
        on_request: Callable[[ChatRequest], None] | None = None,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.chunk_chars = max(1, chunk_chars)
        self.chunk_delay_s = chunk_delay_s
        self.transfer_to = transfer_to
        self._responder: Responder | None = script if callable(script) else None
        self._script: deque[Reply] = deque() if callable(script) else deque(script)
        self._failures: deque[int] = deque()
        self._gate = asyncio.Event()
        self._on_request = on_request
        self.requests: list[ChatRequest] = []
        self.rejected = 0  # requests answered 401

    def script(self, *replies: Reply) -> None:
        """Queue replies, one per coming request."""
        self._script.extend(replies)

    def fail(self, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` requests with `status` and OpenAI's error body."""
        self._failures.extend([status] * times)

    def release(self) -> None:
        """Let held streams go on (and any later hold pass)."""
        self._gate.set()

    def _stopped(self) -> None:
        self._gate.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(PATH, self._chat)
        app.router.add_post("/{prefix:.*}/chat/completions", self._chat)
        app.router.add_post("/chat/completions", self._chat)
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        authorized = not self.api_key or given == f"Bearer {self.api_key}"
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        record = ChatRequest(body if isinstance(body, dict) else {}, authorized)
        self.requests.append(record)
        try:
            return await self._answer(request, record, given.removeprefix("Bearer "))
        except (asyncio.CancelledError, ConnectionError):
            # The client closed the connection (aiohttp cancels the handler, or the write fails).
            if not self.stopping:
                record.disconnected = True
            raise
        finally:
            self._notify()
            if self._on_request is not None:
                self._on_request(record)

    async def _answer(self, request: web.Request, record: ChatRequest, given: str) -> web.StreamResponse:
        if not record.authorized:
            self.rejected += 1
            record.status = 401
            # OpenAI masks all but a few characters of the key; this quotes it whole.
            message = f"Incorrect API key provided: {given}." if given else "You didn't provide an API key."
            return _error(401, message, "invalid_request_error", "invalid_api_key")
        if not record.body or not record.messages:
            record.status = 400
            return _error(400, "'messages' is a required property", "invalid_request_error", None)
        if self._failures:
            record.status = self._failures.popleft()
            return _failure(record.status)
        reply = self._responder(record.messages) if self._responder else None
        if reply is None:
            reply = (
                self._script.popleft() if self._script else default_reply(record.messages, self.transfer_to)
            )
        record.reply = reply
        if reply.status != 200:
            record.status = reply.status
            return _failure(reply.status)
        model = str(record.body.get("model") or DEFAULT_MODEL)
        record.status = 200
        if not record.body.get("stream") or reply.whole:
            record.completed = True
            return web.json_response(_completion(reply, model))
        return await self._stream(request, record, reply, model)

    async def _stream(
        self, request: web.Request, record: ChatRequest, reply: Reply, model: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())

        async def send(delta: dict[str, Any], finish: str | None = None) -> None:
            chunk = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            await write(f"data: {json.dumps(chunk)}\n\n")

        async def write(text: str) -> None:
            await response.write(text.encode())
            record.chunks += 1
            self._notify()

        async def pause() -> None:
            if self.chunk_delay_s > 0:
                await asyncio.sleep(self.chunk_delay_s)  # pacing, as a model writes

        async def hold() -> None:
            record.holding = True
            self._notify()
            await self._gate.wait()
            record.holding = False
            self._notify()

        await send({"role": "assistant", "content": ""})
        pieces = [reply.text[i : i + self.chunk_chars] for i in range(0, len(reply.text), self.chunk_chars)]
        for number, piece in enumerate(pieces):
            if reply.hold_after is not None and number == reply.hold_after:
                await hold()
            await pause()
            await send({"content": piece})
            if reply.garbage and number == 0:
                await write(": keep-alive\n\n")
                await write("data: {not json\n\n")
                await write("nonsense without a field name\n\n")
        if reply.hold_after is not None and reply.hold_after >= len(pieces):
            await hold()
        if reply.tool is not None:
            call = {"index": 0, "id": f"call_{secrets.token_hex(8)}", "type": "function"}
            await send({"tool_calls": [{**call, "function": {"name": reply.tool.name, "arguments": ""}}]})
            arguments = reply.tool.arguments
            for i in range(0, len(arguments), 3):  # a few characters a chunk, as OpenAI streams them
                await pause()
                await send({"tool_calls": [{"index": 0, "function": {"arguments": arguments[i : i + 3]}}]})
                record.argument_chunks += 1
        await send({}, "tool_calls" if reply.tool is not None else "stop")
        await write("data: [DONE]\n\n")
        if reply.linger:
            await hold()
        await response.write_eof()
        record.completed = True
        return response


def _completion(reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None, "refusal": None}
    if reply.tool is not None:
        message["tool_calls"] = [
            {
                "id": f"call_{secrets.token_hex(8)}",
                "type": "function",
                "function": {"name": reply.tool.name, "arguments": reply.tool.arguments},
            }
        ]
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if reply.tool is not None else "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def _error(status: int, message: str, kind: str, code: str | None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status)


def _failure(status: int) -> web.Response:
    if status == 429:
        response = _error(429, "Rate limit reached for requests.", "requests", "rate_limit_exceeded")
        response.headers["Retry-After"] = "1"
        return response
    return _error(status, "The server had an error while processing your request.", "server_error", None)


# -- Command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8092)
    parser.add_argument("--api-key", default=DEFAULT_KEY, help="the bearer key asked for ('' for none)")
    parser.add_argument("--chunk-chars", type=int, default=4, help="characters of content per chunk")
    parser.add_argument("--chunk-delay-ms", type=float, default=40.0, help="between chunks")
    parser.add_argument("--transfer-to", default=DEFAULT_TRANSFER_TO, help="where 'agent' transfers")
    parser.add_argument(
        "--reply",
        action="append",
        default=[],
        metavar="TEXT",
        help="reply TEXT to the next request (repeatable, in order); then the built-in replies",
    )


def run(args: argparse.Namespace) -> int:
    def show(request: ChatRequest) -> None:
        reply = request.reply
        line = {
            "status": request.status,
            "user": request.last_user,
            "reply": reply.text if reply else "",
            "tool": reply.tool.name if reply and reply.tool else None,
            "disconnected": request.disconnected,
        }
        with contextlib.suppress(ValueError):  # stdout closed
            print(json.dumps(line, ensure_ascii=False), flush=True)

    standin = LlmStandIn(
        [Reply(text) for text in args.reply],
        api_key=args.api_key,
        chunk_chars=args.chunk_chars,
        chunk_delay_s=args.chunk_delay_ms / 1000,
        transfer_to=args.transfer_to,
        on_request=show,
    )
    key = f"key {args.api_key}" if args.api_key else "no key"
    banner = f"chat-completions stand-in: IVR_LLM_URL=http://{args.host}:{args.port}/v1 ({key})"
    return serve_until_signalled(standin, args.host, args.port, banner)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ivr_bridge.standins.llm",
        description="A stand-in for an OpenAI-compatible chat-completions API (streamed).",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
