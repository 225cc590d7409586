"""Many instances as one service, through Redis (`IVR_REDIS_URL`; optional).

What the instances share:
- **leases**: `ivr:lease:<instance>` lives while its instance does (refreshed every third
  of `LEASE_S`), so the others know who is alive;
- **who carries which call**: `ivr:call:<call sid>` names the instance, set when a stream's
  `start` is admitted (only if unset: one live stream per call across the fleet) and
  removed when the call is over;
- **spent stream tokens**: `ivr:token:<mac>`, set once for the token's lifetime, so a token
  opens one stream on one instance, never a second anywhere;
- **requests to an instance**: a list `ivr:inbox:<instance>` it pops, answering on
  `ivr:reply:<id>`, so call control asked of any instance is carried out by the one that
  carries the call (after the bot's sentence, with its `control` event on record), and
  `GET /calls` on any instance lists the calls of all;
- **call events, live**: each instance publishes its calls' events on `ivr:events`, so a
  dashboard or softphone page served by any instance sees every call as it happens.

Lists rather than pub/sub for requests: a request waits in the inbox while its instance
is briefly busy instead of being lost. The live events are pub/sub: a page that misses
one while Redis is away catches up from the call list it reloads. The dead are noticed by
their lease; their calls are marked `interrupted` through the records (`CallStore.sweep`),
which need no Redis.

Redis is never on the audio path. If it fails, each operation falls back to what one
instance knows on its own (a warning once per outage, `ivr_fabric_up` 0, errors counted);
no call is dropped because of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("ivr_bridge.fabric")

LEASE_S = 15.0
CALL_KEY_TTL_S = 6 * 3600  # a safety net only: a call's key is removed when the call is over
INBOX_POLL_S = 5  # BLPOP's wait; the loop re-arms at once
EVENTS_CHANNEL = "ivr:events"
EVENTS_QUEUE = 2000  # call events waiting to be published; beyond, the newest are dropped
RESUBSCRIBE_S = 2.0  # after losing the events subscription
REPLY_TTL_S = 60
OP_TIMEOUT_S = 2.0  # one Redis command; longer means Redis is in trouble: act alone
# Deleted only if still ours: a call re-admitted elsewhere keeps its new owner's key.
_DELETE_IF_MINE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)

T = TypeVar("T")
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class FabricError(Exception):
    """A request to another instance that got no answer (it died, or Redis failed)."""


class Fabric:
    def __init__(self, url: str, instance_id: str, *, lease_s: float = LEASE_S) -> None:
        self.instance_id = instance_id
        self.up = True  # the last Redis operation worked
        self.errors = 0  # failed Redis operations
        self._url = url
        self._lease_s = lease_s
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=OP_TIMEOUT_S, socket_connect_timeout=OP_TIMEOUT_S, decode_responses=True
        )
        # BLPOP blocks: a connection of its own, with no read timeout shorter than its wait.
        self._blocking = aioredis.Redis.from_url(
            url,
            socket_timeout=INBOX_POLL_S + OP_TIMEOUT_S,
            socket_connect_timeout=OP_TIMEOUT_S,
            decode_responses=True,
        )
        # The events subscription waits without end for the next event: no read timeout,
        # and a ping now and then to notice a dead connection.
        self._subscriber = aioredis.Redis.from_url(
            url, socket_connect_timeout=OP_TIMEOUT_S, health_check_interval=30, decode_responses=True
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._outbox: deque[dict[str, Any]] = deque()  # call events to publish
        self._outbox_ready = asyncio.Event()
        self.events_dropped = 0  # call events not shared: the outbox was full
        self._handler: Handler | None = None
        self._handling: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, handler: Handler, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Take a lease, serve requests from other instances with `handler`, share this
        instance's call events and hand those of the others to `on_event`."""
        self._handler = handler
        await self._safe(self._renew_lease(), None)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._keep_lease(), name="fabric-lease"),
            loop.create_task(self._serve_inbox(), name="fabric-inbox"),
            loop.create_task(self._publish_events(), name="fabric-events-out"),
        ]
        if on_event is not None:
            self._tasks.append(loop.create_task(self._receive_events(on_event), name="fabric-events-in"))

    async def close(self) -> None:
        for task in [*self._tasks, *self._handling]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._handling, return_exceptions=True)
        await self._safe(self._redis.delete(self._key("lease", self.instance_id)), None)
        await self._redis.aclose()
        await self._blocking.aclose()
        await self._subscriber.aclose()

    # -- admission --------------------------------------------------------------------------

    async def admit(self, call_sid: str, token_key: str | None, token_ttl_ms: int) -> str | None:
        """Fleet-wide checks of a stream's `start`: its token unspent anywhere, and no live
        stream of the call anywhere. None admits (and records this instance as the call's
        carrier); else why not. With Redis away: None (the instance's own checks stand)."""

        async def check() -> str | None:
            if token_key is not None:
                fresh = await self._redis.set(
                    self._key("token", token_key), self.instance_id, nx=True, px=max(1, token_ttl_ms)
                )
                if not fresh:
                    return "stream token already used (on this or another instance)"
            taken = await self._redis.set(
                self._key("call", call_sid), self.instance_id, nx=True, ex=CALL_KEY_TTL_S
            )
            if not taken:
                holder = await self._redis.get(self._key("call", call_sid))
                if holder and await self._redis.exists(self._key("lease", holder)):
                    return f"this call already has a live stream (on instance {holder})"
                # Its carrier is dead: the key is stale. Take it over.
                await self._redis.set(self._key("call", call_sid), self.instance_id, ex=CALL_KEY_TTL_S)
            return None

        return await self._safe(check(), None)

    async def release(self, call_sid: str) -> None:
        """The call is over here: it is no longer carried by this instance."""
        await self._safe(
            self._redis.eval(_DELETE_IF_MINE, 1, self._key("call", call_sid), self.instance_id), None
        )

    async def owner(self, call_sid: str) -> str | None:
        """The live instance carrying the call, if another one does."""

        async def find() -> str | None:
            holder = await self._redis.get(self._key("call", call_sid))
            if not holder or holder == self.instance_id:
                return None
            return holder if await self._redis.exists(self._key("lease", holder)) else None

        return await self._safe(find(), None)

    async def live_instances(self) -> list[str]:
        async def scan() -> list[str]:
            prefix = self._key("lease", "")
            return sorted([key[len(prefix) :] async for key in self._redis.scan_iter(match=prefix + "*")])

        return await self._safe(scan(), [self.instance_id])

    # -- requests to other instances ----------------------------------------------------------

    async def ask(self, instance: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send `request` to `instance` and wait up to `timeout` for its answer. Raises
        FabricError if none comes (the instance died, or Redis failed)."""
        reply = self._key("reply", secrets.token_hex(12))
        message = json.dumps({**request, "reply": reply, "from": self.instance_id})
        try:
            async with asyncio.timeout(timeout + OP_TIMEOUT_S):
                await self._redis.rpush(self._key("inbox", instance), message)
                await self._redis.expire(self._key("inbox", instance), REPLY_TTL_S)
                answer = await self._blpop(reply, timeout)
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(e)
            raise FabricError(f"no answer from instance {instance}") from None
        self._worked()
        if answer is None:
            raise FabricError(f"no answer from instance {instance} within {timeout:g} s")
        return json.loads(answer)

    async def _blpop(self, key: str, timeout: float) -> str | None:
        # A connection of its own per wait: several requests may wait at once.
        waiter = aioredis.Redis.from_url(
            self._url,
            socket_timeout=timeout + OP_TIMEOUT_S,
            socket_connect_timeout=OP_TIMEOUT_S,
            decode_responses=True,
        )
        try:
            popped = await waiter.blpop([key], timeout=max(0.01, timeout))
        finally:
            await waiter.aclose()
        return popped[1] if popped else None

    async def _serve_inbox(self) -> None:
        inbox = self._key("inbox", self.instance_id)
        while True:
            try:
                popped = await self._blocking.blpop([inbox], timeout=INBOX_POLL_S)
                self._worked()
            except (RedisError, OSError) as e:
                self._failed(e)
                await asyncio.sleep(1.0)
                continue
            if popped:
                task = asyncio.create_task(self._answer(popped[1]), name="fabric-request")
                self._handling.add(task)
                task.add_done_callback(self._handling.discard)

    async def _answer(self, raw: str) -> None:
        try:
            request = json.loads(raw)
            reply = str(request.pop("reply"))
        except (ValueError, KeyError, TypeError):
            log.warning("fabric: a malformed request in this instance's inbox was dropped")
            return
        assert self._handler is not None
        try:
            answer = await self._handler(request)
        except Exception:
            log.exception("fabric: request %s failed", str(request.get("op"))[:20])
            answer = {"error": "the instance failed to handle the request", "status": 500}
        with contextlib.suppress(RedisError, OSError):
            await self._redis.rpush(reply, json.dumps(answer, default=str))
            await self._redis.expire(reply, REPLY_TTL_S)

    # -- leases -------------------------------------------------------------------------------

    async def _renew_lease(self) -> None:
        await self._redis.set(self._key("lease", self.instance_id), "1", px=int(self._lease_s * 1000))

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            await self._safe(self._renew_lease(), None)

    # -- live call events ---------------------------------------------------------------------

    def share(self, event: dict[str, Any]) -> None:
        """Publish a call event of this instance (on the audio path: it only queues)."""
        if len(self._outbox) >= EVENTS_QUEUE:
            self.events_dropped += 1
            return
        self._outbox.append(event)
        self._outbox_ready.set()

    async def _publish_events(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                pipe = self._redis.pipeline(transaction=False)
                while self._outbox:
                    shared = {"instance": self.instance_id, "event": self._outbox.popleft()}
                    pipe.publish(EVENTS_CHANNEL, json.dumps(shared, default=str))
                await self._safe(pipe.execute(), None)

    async def _receive_events(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(EVENTS_CHANNEL)
                self._worked()
                async for message in pubsub.listen():
                    try:
                        shared = json.loads(message["data"])
                        event = shared["event"]
                        if shared["instance"] != self.instance_id and isinstance(event, dict):
                            on_event(event)
                    except (ValueError, KeyError, TypeError):
                        log.warning("fabric: a call event on %s that is not ours: skipped", EVENTS_CHANNEL)
            except (RedisError, OSError, TimeoutError) as e:
                self._failed(e)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_S)

    # -- keeping going without Redis ------------------------------------------------------------

    @staticmethod
    def _key(kind: str, name: str) -> str:
        return f"ivr:{kind}:{name}"

    async def _safe(self, operation: Awaitable[T], fallback: T) -> T:
        try:
            async with asyncio.timeout(OP_TIMEOUT_S * 2):
                result = await operation
        except (RedisError, OSError, TimeoutError) as e:
            self._failed(e)
            return fallback
        self._worked()
        return result

    def _failed(self, error: BaseException) -> None:
        self.errors += 1
        if self.up:
            self.up = False
            log.warning(
                "fabric: Redis unavailable (%s); this instance acts alone until it is back",
                type(error).__name__,
            )

    def _worked(self) -> None:
        if not self.up:
            self.up = True
            log.warning("fabric: Redis is back; acting as one service again")
