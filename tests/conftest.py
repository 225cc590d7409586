"""Shared fixtures: the real app under the production uvicorn configuration
(`ivr_bridge.server`) on a free loopback port, in its own thread."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from ivr_bridge.app import create_app
from ivr_bridge.call import Call
from ivr_bridge.server import BridgeServer, server_config
from ivr_bridge.settings import DEFAULT_DATABASE_PATH, Settings
from ivr_bridge.standins.twilio_rest import TwilioRestStandIn


@dataclass
class RunningBridge:
    base_url: str
    stream_url: str
    settings: Settings
    finished: list[Call] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, once a call has ended
    server: BridgeServer | None = None
    _ended: threading.Condition = field(default_factory=threading.Condition)

    def _call_ended(self, call: Call) -> None:
        with self._ended:
            self.loop = asyncio.get_running_loop()
            self.finished.append(call)
            self._ended.notify_all()

    async def server_tasks(self) -> list[str]:
        """Names of the tasks alive on the server's loop (uvicorn's own included)."""
        assert self.loop is not None

        async def names() -> list[str]:
            current = asyncio.current_task()
            return [t.get_name() for t in asyncio.all_tasks() if t is not current]

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(names(), self.loop))

    async def wait_for_calls(self, count: int = 1, timeout: float = 15.0) -> list[Call]:
        """Wait until `count` calls have ended (their tasks awaited and logged)."""

        def wait() -> bool:
            with self._ended:
                return self._ended.wait_for(lambda: len(self.finished) >= count, timeout)

        if not await asyncio.to_thread(wait):
            raise TimeoutError(f"{len(self.finished)} of {count} calls ended within {timeout} s")
        return self.finished[:count]


def _serve(settings: Settings) -> Iterator[RunningBridge]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    public = f"http://127.0.0.1:{port}"
    changes: dict[str, object] = {"public_url": public}
    if settings.database_path == DEFAULT_DATABASE_PATH and not settings.database_url:
        # Each bridge keeps its call records in a file of its own, not in the checkout.
        changes["database_path"] = f"{tempfile.mkdtemp(prefix='ivr-records-')}/calls.db"
    settings = Settings(**{**settings.__dict__, **changes})
    bridge = RunningBridge(public, settings.stream_url, settings)
    app = create_app(settings, on_call_end=bridge._call_ended)
    # Signals are not captured off the main thread: `server.handle_exit` starts a drain.
    server = BridgeServer(server_config(app, host="127.0.0.1", port=port, log_level="warning"), app)
    bridge.server = server
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = threading.Event()
    for _ in range(200):
        if server.started:
            break
        deadline.wait(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield bridge
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture
def echo_bridge() -> Iterator[RunningBridge]:
    yield from _serve(Settings(provider="echo"))


@pytest.fixture
def make_bridge() -> Iterator:
    """Factory: `make_bridge(settings)` starts a bridge; all are stopped after the test."""
    running: list[Iterator[RunningBridge]] = []

    def start(settings: Settings) -> RunningBridge:
        gen = _serve(settings)
        running.append(gen)
        return next(gen)

    yield start
    for gen in running:
        next(gen, None)


@pytest.fixture
def twilio_rest() -> Iterator[tuple[TwilioRestStandIn, str]]:
    """A stand-in of Twilio's call-update REST endpoint: (stand-in, base URL)."""
    rest = TwilioRestStandIn()
    url, server, thread = rest.serve()
    yield rest, url
    server.should_exit = True
    thread.join(timeout=10)
