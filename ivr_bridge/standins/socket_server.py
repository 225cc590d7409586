"""What the WebSocket stand-ins share: their server's lifecycle, and serving from the CLI."""

from __future__ import annotations

import asyncio
import signal
from typing import Self

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from ivr_bridge import event_loop


class StandInServer:
    """A stand-in served on a port of its own: `async with`, or `start()` and `stop()`.
    Subclasses handle connections (`_handle`) and may answer a request before its
    handshake (`_route`: auth, paths, a REST route)."""

    path = "/"

    def __init__(self) -> None:
        self._server: Server | None = None
        self.opened = 0  # sessions (connections) served so far

    async def _serve_one(self, ws: ServerConnection) -> None:
        self.opened += 1
        await self._handle(ws)

    async def close_sessions(self, code: int, reason: str = "") -> None:
        assert self._server is not None, "stand-in not started"
        await close_sessions(self._server, code, reason)

    async def _handle(self, ws: ServerConnection) -> None:
        raise NotImplementedError

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        return None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await serve(self._serve_one, host, port, process_request=self._route, compression=None)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base(self) -> str:
        assert self._server is not None, "stand-in not started"
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    @property
    def url(self) -> str:
        return f"ws://{self.base}{self.path}"


async def close_sessions(server: Server, code: int, reason: str = "") -> None:
    """End every open session the way the API would: a close frame with `code`."""
    for ws in list(server.connections):
        await ws.close(code, reason)


def serve_until_signalled(standin: StandInServer, host: str, port: int, banner: str) -> int:
    """`ivr-bridge stub-voice-api --provider ...`: serve until SIGINT or SIGTERM."""

    async def serve_forever() -> None:
        await standin.start(host, port)
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        print(banner, flush=True)
        await stop.wait()
        await standin.stop()

    event_loop.run(serve_forever())
    return 0
