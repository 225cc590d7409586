"""The uvicorn server the bridge runs under, shared by `ivr-bridge serve` and the tests.

`BridgeServer` replaces uvicorn's shutdown on SIGTERM/SIGINT, which closes every WebSocket
at once with 1012 (cutting live phone calls), by a drain: the app stops taking new calls
(`/readyz` 503, `/twiml` the fallback, new streams refused), active calls may finish for up
to `drain_timeout_s`, the rest are ended with 1001 "going away", and only then does uvicorn
shut down. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from ivr_bridge.call import Outcome
from ivr_bridge.connections import guarded_protocol
from ivr_bridge.ws_protocol import StreamWebSocketProtocol

log = logging.getLogger("ivr_bridge.server")

GOING_AWAY = 1001  # WebSocket close code: the server is going down
WS_MAX_SIZE = 256 * 1024  # Media Streams frames are a few hundred bytes; a large one is abuse
DRAIN_POLL_S = 0.05
# After the calls still active are told to go, how long their own shutdown (closing the
# voice session, logging the summary) may take before uvicorn takes over.
CALL_END_GRACE_S = 5.0


def server_config(
    app: Starlette,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    log_level: str = "info",
) -> uvicorn.Config:
    """The uvicorn configuration of a production bridge (the tests run the same one)."""
    settings = app.state.settings
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        # Requests time out and unproven connections are capped (ivr_bridge.connections).
        http=guarded_protocol(app.state.unproven, settings.request_timeout_s),
        log_level=log_level.lower(),
        log_config=None,  # uvicorn's records go through the process's one safe formatter (logs.py)
        ws=StreamWebSocketProtocol,  # reading paused only when frames pile up (ws_protocol.py)
        ws_max_size=WS_MAX_SIZE,
        # Compressing audio costs CPU on every frame and saves almost nothing.
        ws_per_message_deflate=False,
        proxy_headers=True,
        # The drain has ended every call by the time uvicorn shuts down; this only bounds
        # a connection that still hangs on (a slow HTTP client).
        timeout_graceful_shutdown=CALL_END_GRACE_S,
    )


class BridgeServer(uvicorn.Server):
    """A uvicorn server that drains calls on the first SIGTERM/SIGINT."""

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.app = app  # the bridge app itself: config.app may be wrapped in middleware
        self.drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_task is not None or self._loop is None or self.should_exit:
            # A second signal (or one before start-up): uvicorn's force exit. Recording it
            # lets uvicorn re-raise it after shutdown, so the exit status shows the kill.
            self._captured_signals.append(sig)
            self.should_exit = True
            self.force_exit = True
            return
        # Not recorded: a completed drain is a clean exit (status 0), not a kill.
        self.app.state.draining = True  # a plain attribute store: safe from any thread
        # Signal handlers run between bytecodes, possibly in the middle of the loop's own
        # code, and `handle_exit` may be called from another thread: schedule, don't run.
        self._loop.call_soon_threadsafe(self._start_drain, signal.Signals(sig).name)

    def _start_drain(self, reason: str) -> None:
        if self.drain_task is None:
            self.drain_task = asyncio.create_task(self.drain(reason), name="drain")

    async def drain(self, reason: str = "shutdown") -> None:
        """Stop taking calls, let active ones finish, end the rest, then let uvicorn exit."""
        self.app.state.draining = True
        active = self.app.state.active_calls
        timeout = self.app.state.settings.drain_timeout_s
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.app.state.drain_deadline = started + timeout
        log.info("%s: draining, %d active call(s) may finish within %g s", reason, len(active), timeout)
        try:
            # Polled: a call leaves the set from its own route handler, with no event to await.
            while active and loop.time() - started < timeout:
                await asyncio.sleep(DRAIN_POLL_S)
            if active:
                log.warning("drain timeout: ending %d active call(s) with %d", len(active), GOING_AWAY)
                # Closing its Twilio socket ends a call through its own shutdown path: the
                # reader sees the close, the voice session is closed, the summary logged.
                await asyncio.gather(
                    *(call.end(Outcome.SHUTDOWN, GOING_AWAY) for call in list(active)), return_exceptions=True
                )
                ending_started = loop.time()
                while active and loop.time() - ending_started < CALL_END_GRACE_S:
                    await asyncio.sleep(DRAIN_POLL_S)
            log.info("drained in %.1f s; shutting down", loop.time() - started)
        finally:
            self.should_exit = True
