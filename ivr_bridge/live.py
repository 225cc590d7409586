"""Call events as they happen, for the pages that watch calls live (dashboard, softphone).

`LiveFeed.publish` runs on the audio path (with every call event), so it only appends to
each watcher's bounded queue. A watcher that falls `limit` messages behind is cut off
with a `lagged` message rather than buffering without bound or slowing any call; its
page reconnects and starts again from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Iterator
from typing import Any

from ivr_bridge.events import CallEvent

WATCHER_QUEUE = 500  # messages a watcher may fall behind before it is cut off
MAX_WATCHERS = 64  # pages watching at once, per instance


class Watcher:
    """One page's view: the events of every call, or of one call (`call_sid`)."""

    def __init__(self, call_sid: str | None, limit: int) -> None:
        self.call_sid = call_sid
        self.lagged = False
        self._limit = limit
        self._queue: deque[tuple[str, Any]] = deque()
        self._ready = asyncio.Event()

    def put(self, kind: str, data: Any) -> None:
        if self.lagged:
            return
        if len(self._queue) >= self._limit:
            self.lagged = True
            self._queue.clear()
        else:
            self._queue.append((kind, data))
        self._ready.set()

    async def next(self, timeout: float) -> list[tuple[str, Any]]:
        """What arrived since the last call: waits up to `timeout` for something (then [])."""
        if not self._queue and not self.lagged:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
        self._ready.clear()
        items = list(self._queue)
        self._queue.clear()
        return items


class LiveFeed:
    def __init__(self, limit: int = WATCHER_QUEUE, max_watchers: int = MAX_WATCHERS) -> None:
        self._watchers: set[Watcher] = set()
        self._limit = limit
        self._max = max_watchers

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def publish(self, event: CallEvent) -> None:
        if self._watchers:
            self.relay(event.as_dict())

    def relay(self, event: dict[str, Any]) -> None:
        """An event as a dict: one of this instance's, or one another instance shared."""
        call_sid = event.get("call_sid")
        for watcher in self._watchers:
            if watcher.call_sid is None or watcher.call_sid == call_sid:
                watcher.put("event", event)

    @contextlib.contextmanager
    def watch(self, call_sid: str | None = None) -> Iterator[Watcher | None]:
        """A new watcher for the block's duration; None when MAX_WATCHERS are watching."""
        if len(self._watchers) >= self._max:
            yield None
            return
        watcher = Watcher(call_sid, self._limit)
        self._watchers.add(watcher)
        try:
            yield watcher
        finally:
            self._watchers.discard(watcher)


def sse(kind: str, data: Any) -> bytes:
    """One server-sent event (text/event-stream); JSON is one line, so one `data:` field."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n".encode()
