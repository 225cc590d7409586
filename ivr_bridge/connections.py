"""Connection hygiene: what a peer that has not proven it is Twilio may hold, and how long.

uvicorn times out idle keep-alive connections, but not a request whose headers or body
never finish, and it caps nothing but concurrency as a whole (a cap that would refuse
Twilio along with the attacker). Here:

- every HTTP request must arrive whole (headers and body) within `IVR_REQUEST_TIMEOUT_S`
  of the connection or of its first byte, or the connection is closed (408);
- connections not yet proven to come from Twilio (an HTTP connection waiting for or
  reading a request, a Media Stream before its `start` is admitted) are at most
  `IVR_MAX_PENDING_CONNECTIONS`. A new one makes room by closing the oldest, so a flood
  of idle sockets cannot keep Twilio's next request out: it only churns itself.

`Unproven` is the bookkeeping (sans-I/O); `GuardedHttpToolsProtocol` applies it to
uvicorn's httptools protocol (uvicorn has no hook for this; its protocol class is a
documented setting, `Config(http=...)`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

from starlette.requests import Request
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("ivr_bridge.connections")

LOG_EVERY_S = 10.0  # refusals are logged at most this often per reason, with a count
# Why a connection was closed by the guard: a fixed set, so it can label a metric.
CLOSE_REASONS = ("evicted", "request_timeout", "start_timeout", "too_large")
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 16\r\n"
    b"connection: close\r\n\r\nRequest Timeout\n"
)


class Unproven:
    """Connections not yet proven to come from Twilio, oldest first, at most `limit`.

    `add` registers one with the function that closes it; at the limit the oldest is
    closed to make room (an attacker's idle socket, almost always: Twilio's requests
    prove themselves within milliseconds). Counts every closing by reason."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.closed: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        self._items: OrderedDict[Hashable, Callable[[], None]] = OrderedDict()
        self._clock = clock
        self._unlogged: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        self._logged_at: dict[str, float] = dict.fromkeys(CLOSE_REASONS, -LOG_EVERY_S)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def add(self, key: Hashable, close: Callable[[], None]) -> None:
        self._items.pop(key, None)
        while len(self._items) >= self.limit:
            _, oldest = self._items.popitem(last=False)
            self.count("evicted")
            oldest()
        self._items[key] = close

    def discard(self, key: Hashable) -> None:
        self._items.pop(key, None)

    def count(self, reason: str, detail: str = "") -> None:
        """Count a connection closed for `reason`; log it, at most once per `LOG_EVERY_S`."""
        self.closed[reason] += 1
        self._unlogged[reason] += 1
        now = self._clock()
        if now - self._logged_at[reason] >= LOG_EVERY_S:
            what = {
                "evicted": f"closed to make room (over {self.limit} connections not yet proven to be Twilio)",
                "request_timeout": "closed: request incomplete after the request timeout",
                "start_timeout": "closed: Media Stream sent no valid start in time",
                "too_large": "refused: request body over the limit",
            }[reason]
            last = f"; last {detail}" if detail else ""
            log.warning("%d connection(s) %s%s", self._unlogged[reason], what, last)
            self._logged_at[reason] = now
            self._unlogged[reason] = 0


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request and the unproven cap.

    `unproven` and `timeout_s` are set on a subclass made per server (`guarded_protocol`)."""

    unproven: ClassVar[Unproven]
    timeout_s: ClassVar[float]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._proven()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # the next request on a kept-alive connection
            self._await_request()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.parser.should_upgrade() and self._should_upgrade():
            self._proven()  # a WebSocket: the app holds it to its `start` (IVR_START_TIMEOUT_S)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._proven()  # read whole: the app checks its signature at once

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            # Kept alive and idle: uvicorn's keep-alive timeout closes it; evictable meanwhile.
            self.unproven.add(self, self._evict)

    def _await_request(self) -> None:
        self.unproven.add(self, self._evict)
        self._deadline = self.loop.call_later(self.timeout_s, self._timed_out)

    def _proven(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.unproven.discard(self)

    def _timed_out(self) -> None:
        self._deadline = None
        self.unproven.discard(self)
        self.unproven.count("request_timeout", _peer(self.client))
        self._close(_REQUEST_TIMEOUT)

    def _evict(self) -> None:
        self._proven()
        self._close(b"")

    def _close(self, answer: bytes) -> None:
        if self.transport.is_closing():
            return
        if answer and (self.cycle is None or not self.cycle.response_started):
            self.transport.write(answer)
        self.transport.close()


def guarded_protocol(unproven: Unproven, timeout_s: float) -> type[GuardedHttpToolsProtocol]:
    attributes = {"unproven": unproven, "timeout_s": timeout_s}
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), attributes)


def _peer(client: tuple[str, int] | None) -> str:
    return f"from {client[0]}" if client else ""


def descriptors_needed(max_calls: int, max_pending: int) -> int:
    """File descriptors a full instance uses: each call's Twilio and voice API sockets,
    the unproven connections, and a margin (listening socket, database, hooks, logs)."""
    return 2 * max_calls + max_pending + 64


def check_descriptor_limit(max_calls: int, max_pending: int) -> str | None:
    """Raise the soft RLIMIT_NOFILE towards what the settings need (up to the hard limit);
    a warning if it stays short, else None."""
    needed = descriptors_needed(max_calls, max_pending)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft >= needed:
        return None
    return (
        f"open-file limit {soft} is below the {needed} that IVR_MAX_CALLS={max_calls} and "
        f"IVR_MAX_PENDING_CONNECTIONS={max_pending} need; raise it (ulimit -n {needed}, "
        f"LimitNOFILE= in systemd, --ulimit nofile= in Docker) or lower IVR_MAX_CALLS"
    )


async def bounded_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed `limit` bytes (by its
    Content-Length, or while reading it): never buffering more than that."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
