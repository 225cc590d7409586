"""Graceful shutdown: the real `ivr-bridge serve` process, sent SIGTERM with calls up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from ivr_bridge.fallback import APOLOGY
from ivr_bridge.server import GOING_AWAY
from ivr_bridge.standins.twilio import TwilioCaller
from tests.support import eventually
from tests.test_end_to_end import tone_ulaw

REPO = Path(__file__).resolve().parent.parent
NORMAL_CLOSE = 1000


@dataclass
class Instance:
    name: str
    proc: asyncio.subprocess.Process
    base_url: str
    log_path: Path

    @property
    def stream_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/media-stream"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    async def exit_code(self, timeout: float) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name} still running after {timeout} s:\n{self.log()}") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def bridges(tmp_path: Path) -> AsyncIterator[Callable[[str, float], Awaitable[Instance]]]:
    """Starts `ivr-bridge serve` processes (echo provider) and kills any still running after."""
    started: list[Instance] = []

    async def start(name: str, drain_timeout_s: float) -> Instance:
        # Only what this test sets: no credentials or settings from the outer environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IVR_", "NEXTEVI_", "TWILIO_"))}
        env |= {
            "IVR_PROVIDER": "echo",
            "IVR_DRAIN_TIMEOUT_S": str(drain_timeout_s),
            "PYTHONPATH": str(REPO),
        }
        port = free_port()
        log_path = tmp_path / f"{name}.log"
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "ivr_bridge", "serve", "--port", str(port)),
                env=env,
                cwd=tmp_path,  # away from any .env file in the project
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        instance = Instance(name, proc, f"http://127.0.0.1:{port}", log_path)
        started.append(instance)
        async with httpx.AsyncClient(timeout=2) as http:

            async def ready() -> bool:
                assert proc.returncode is None, f"{name} exited:\n{instance.log()}"
                with contextlib.suppress(httpx.TransportError):
                    return (await http.get(f"{instance.base_url}/readyz")).status_code == 200
                return False

            await eventually(ready, timeout=20, what=f"{name} serving")
        return instance

    try:
        yield start
    finally:
        for instance in started:
            if instance.proc.returncode is None:
                instance.proc.kill()
                await instance.proc.wait()


async def active_calls(http: httpx.AsyncClient, instance: Instance) -> int:
    return (await http.get(f"{instance.base_url}/healthz")).json()["active_calls"]


async def draining(http: httpx.AsyncClient, instance: Instance) -> bool:
    return (await http.get(f"{instance.base_url}/readyz")).status_code == 503


async def test_sigterm_drains_active_calls_then_exits(tmp_path: Path) -> None:
    drain_timeout = 3.0
    async with bridges(tmp_path) as start, httpx.AsyncClient(timeout=5) as http:
        bridge = await start("a", drain_timeout)
        leaving = TwilioCaller(bridge.stream_url, continuous=True)
        staying = TwilioCaller(bridge.stream_url, continuous=True)
        await leaving.connect()
        await staying.connect()
        await eventually(lambda: _equals(active_calls(http, bridge), 2), what="two active calls")

        loop = asyncio.get_running_loop()
        bridge.terminate()
        signalled = loop.time()
        await eventually(lambda: draining(http, bridge), timeout=2, what="/readyz 503")
        ready = await http.get(f"{bridge.base_url}/readyz")
        assert ready.json()["status"] == "draining"
        health = await http.get(f"{bridge.base_url}/healthz")
        assert health.status_code == 200 and health.json()["active_calls"] == 2

        # New calls are turned away: the webhook sends them to the fallback, not to dead air ...
        twiml = await http.post(f"{bridge.base_url}/twiml", data={"CallSid": "CA" + "1" * 32})
        assert twiml.status_code == 200 and APOLOGY in twiml.text and "<Stream" not in twiml.text
        # ... and a stream that comes anyway is refused before it is accepted.
        with pytest.raises(InvalidStatus):
            await TwilioCaller(bridge.stream_url).connect()

        # A call that ends within the drain window ends the ordinary way.
        await leaving.say(tone_ulaw(300))
        await leaving.hang_up()
        assert leaving.close_code == NORMAL_CLOSE
        await eventually(lambda: _equals(active_calls(http, bridge), 1), what="one call left")
        assert bridge.proc.returncode is None, "exited with a call still up"

        # The call still up at the timeout is ended with "going away", then the process exits.
        await staying.wait_closed(timeout=drain_timeout + 5)
        assert staying.close_code == GOING_AWAY
        assert loop.time() - signalled >= drain_timeout - 0.5
        assert await bridge.exit_code(timeout=5) == 0
        assert loop.time() - signalled < drain_timeout + 5

    log = bridge.log()
    assert "SIGTERM: draining, 2 active call(s)" in log
    assert "ending 1 active call(s) with 1001" in log
    # Both calls went through their own shutdown: voice session closed, summary logged.
    assert log.count("call ended: stream_stopped") == 1
    assert log.count("call ended:") == 2
    assert "1012" not in log


async def test_rolling_restart_under_load_cuts_no_call(tmp_path: Path) -> None:
    drain_timeout = 8.0
    calls = 6
    async with bridges(tmp_path) as start, httpx.AsyncClient(timeout=5) as http:
        old = await start("old", drain_timeout)
        callers = [TwilioCaller(old.stream_url, continuous=True) for _ in range(calls)]
        await asyncio.gather(*(caller.connect() for caller in callers))
        await eventually(lambda: _equals(active_calls(http, old), calls), what=f"{calls} active calls")

        # The replacement starts while the old instance drains.
        new_starting = asyncio.create_task(start("new", drain_timeout))
        loop = asyncio.get_running_loop()
        old.terminate()
        signalled = loop.time()

        async def finish(caller: TwilioCaller, talk_ms: int) -> None:
            await caller.say(tone_ulaw(talk_ms))  # the call carries on while the bridge drains
            assert not caller.closed.is_set(), f"cut with {caller.close_code}"
            await caller.hang_up()
            assert caller.close_code == NORMAL_CLOSE

        # Staggered ends, all well within the drain window.
        ending = asyncio.gather(*(finish(c, 400 + 300 * i) for i, c in enumerate(callers)))

        new = await new_starting
        await eventually(lambda: draining(http, old), timeout=2, what="old /readyz 503")

        async def new_call() -> None:
            # What a load balancer does: send the webhook to an instance that is ready.
            for instance in (old, new):
                if (await http.get(f"{instance.base_url}/readyz")).status_code == 200:
                    break
            else:
                raise AssertionError("no instance ready")
            assert instance is new
            twiml = await http.post(f"{instance.base_url}/twiml", data={"CallSid": "CA" + "2" * 32})
            stream = ET.fromstring(twiml.text).find("./Connect/Stream")
            assert stream is not None, twiml.text
            async with TwilioCaller(stream.get("url", ""), continuous=True) as caller:
                await caller.say(tone_ulaw(300))
                await caller.hang_up()
            assert caller.close_code == NORMAL_CLOSE

        await asyncio.gather(ending, *(new_call() for _ in range(3)))

        # All calls done: the old instance exits without waiting out the drain timeout.
        assert await old.exit_code(timeout=5) == 0
        assert loop.time() - signalled < drain_timeout
        assert old.log().count("call ended: stream_stopped") == calls
        assert "drain timeout: ending" not in old.log() and "1012" not in old.log()

        new.terminate()  # no calls: it exits at once
        assert await new.exit_code(timeout=5) == 0
        assert new.log().count("call ended: stream_stopped") == 3


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    async with bridges(tmp_path) as start, httpx.AsyncClient(timeout=5) as http:
        bridge = await start("a", 60)
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await eventually(lambda: _equals(active_calls(http, bridge), 1), what="an active call")
            bridge.terminate()
            await eventually(lambda: draining(http, bridge), timeout=2, what="/readyz 503")
            bridge.terminate()  # an impatient operator: no waiting out the 60 s drain
            # uvicorn's forced exit re-raises the signal: the status says it was killed.
            assert await bridge.exit_code(timeout=5) == -signal.SIGTERM
            await caller.wait_closed(timeout=5)


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
