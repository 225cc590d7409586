"""Call events out to the call centre: signed, ordered, retried webhook deliveries ("hooks").

Every event of a call is POSTed as JSON (`CallEvent.to_json()`) to each IVR_HOOK_URL,
signed with IVR_HOOK_SECRET:

    X-IVR-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, b"<t>." + body)>

The timestamp is part of the signed text, so a receiver can refuse a replayed request
(`verify` allows 5 minutes of clock skew). `X-IVR-Delivery` is the event id, the same on
every retry, so a receiver can drop a redelivery; `seq` in the body orders a call's events.

A hook may answer an action to steer the call: `{"action": "transfer", "to": "+15550100"}`,
`{"action": "hangup"}` or `{"action": "none"}`; an empty or non-JSON answer is no action.

`sign`, `verify`, `parse_action` and `backoff_delay` are pure functions. `HookDispatcher`
is the I/O: one queue and one worker per (call, URL), so a call's events reach each URL
in order and a slow or dead receiver only holds up its own queue.

The HTTP client is aiohttp, not httpx, for its CPU cost per request: deliveries run on the
event loop that carries the calls' audio. Measured on loopback with keep-alive (500
sequential POSTs), httpx took 0.82 ms of CPU per POST and aiohttp 0.23 ms. At 100
concurrent calls with every event hooked, the bridge used 0.454 CPU-s per call-minute with
httpx and 0.305 with aiohttp, against 0.290 without hooks (BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import random
import ssl
import time
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, get_args
from urllib.parse import unquote, urlsplit

import aiohttp
from yarl import URL

from ivr_bridge.events import CallEvent
from ivr_bridge.settings import Settings, is_phone_target

log = logging.getLogger("ivr_bridge.hooks")

SIGNATURE_HEADER = "X-IVR-Signature"
EVENT_HEADER = "X-IVR-Event"
DELIVERY_HEADER = "X-IVR-Delivery"
USER_AGENT = "ivr-bridge"
SIGNATURE_TOLERANCE_S = 300.0
QUEUE_SIZE = 1000  # per (call, URL): far more than a call emits while a receiver is briefly down
IDLE_S = 30.0  # a worker whose queue stays empty this long ends (the call has gone quiet)
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 10.0
MAX_ANSWER_BYTES = 64 * 1024  # an action is a few dozen bytes: do not buffer a whole web page
RETRY_STATUSES = frozenset({408, 429})  # besides 5xx: the receiver may take it later

ActionName = Literal["transfer", "hangup", "none"]
ACTIONS: tuple[str, ...] = get_args(ActionName)


# -- Sans-I/O --------------------------------------------------------------------------------


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-IVR-Signature` value of `body` sent at `timestamp` (Unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(
    secret: str, body: bytes, header: str | None, now: float, tolerance_s: float = SIGNATURE_TOLERANCE_S
) -> bool:
    """Whether `header` signs `body` with `secret` at a time within `tolerance_s` of `now`."""
    if not secret or not header or len(header) > 1024:
        return False
    fields: dict[str, str] = {}
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        fields.setdefault(key, value)
    stamp, given = fields.get("t", ""), fields.get("v1", "")
    # ASCII digits only (int() takes other scripts' digits too), and few enough that the
    # subtraction below stays a float.
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12) or not given.isascii():
        return False
    timestamp = int(stamp)
    if abs(now - timestamp) > tolerance_s:
        return False  # stale or from the future: a replay, or a clock far off
    expected = sign(secret, body, timestamp).partition(",v1=")[2]
    return hmac.compare_digest(expected.encode(), given.encode())


@dataclass(frozen=True, slots=True)
class HookAction:
    """What a hook asked the call to do, in answer to an event."""

    action: ActionName
    to: str = ""  # the transfer target: an E.164 number or a sip: URI


def parse_action(body: bytes) -> HookAction | None:
    """The action a hook answered; None for no action (an empty, non-JSON or action-less
    answer). Raises ValueError, with a short reason, for an action that cannot be done."""
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; deep nesting
        return None
    if not isinstance(data, dict) or "action" not in data:
        return None
    action = data["action"]
    if not isinstance(action, str) or action not in ACTIONS:
        raise ValueError(f"unknown action {_short(action)}")
    if action == "transfer":
        target = data.get("to")
        if not isinstance(target, str) or not is_phone_target(target):
            raise ValueError(f"transfer needs 'to': an E.164 number or sip: URI, got {_short(target)}")
        return HookAction("transfer", target)
    return HookAction(action)  # type: ignore[arg-type]  # checked against ACTIONS above


def _short(value: object) -> str:
    # The receiver chose this value: keep it short in a log line, and never repr a nested
    # container (that can recurse as deep as the JSON did).
    if isinstance(value, str):
        return repr(value[:40])
    if value is None or isinstance(value, bool | int | float):
        return repr(value)[:40]
    return f"a JSON {type(value).__name__}"


def backoff_delay(
    attempt: int,
    base_s: float = BACKOFF_BASE_S,
    cap_s: float = BACKOFF_CAP_S,
    retry_after: str | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after failed attempt number `attempt` (0 = the first): the receiver's
    numeric Retry-After if it gave one, else full jitter, both at most `cap_s`."""
    if retry_after is not None:
        try:
            seconds = float(retry_after.strip())
        except ValueError:
            seconds = math.nan  # an HTTP date: not worth a clock comparison, use the backoff
        if seconds >= 0:  # NaN fails too
            return min(seconds, cap_s)
    # Full jitter: many calls failing at once against one receiver do not retry in step.
    return (rng or random).uniform(0.0, min(cap_s, base_s * 2 ** min(attempt, 32)))


def safe_url(url: str) -> str:
    """The URL without credentials, query or fragment: what log lines may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path}"


def scrub(text: str, url: str) -> str:
    """An error message with the URL's credentials and query taken out."""
    text = text.replace(url, safe_url(url))
    parts = urlsplit(url)
    secrets = {parts.password, parts.username, parts.query}
    # aiohttp's messages show the URL as yarl normalised it: a query re-encoded ("a b" ->
    # "a+b"), credentials decoded or encoded. Take out every spelling.
    secrets |= {unquote(secret) for secret in secrets if secret}
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        pass
    else:
        secrets |= {parsed.raw_user, parsed.raw_password, parsed.raw_query_string}
        secrets |= {parsed.user, parsed.password, parsed.query_string}
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text[:200]


# -- The dispatcher --------------------------------------------------------------------------

OnAction = Callable[[CallEvent, HookAction], Awaitable[None]]


@dataclass
class HookStats:
    delivered: int = 0  # event deliveries a hook accepted (2xx)
    retried: int = 0  # further attempts made after a failed one
    failed: int = 0  # deliveries given up on: refused, out of retries, or unsent at shutdown
    dropped: int = 0  # deliveries never queued: the queue was full, or the dispatcher closed


@dataclass(frozen=True, slots=True)
class Target:
    """A hook URL made ready once for aiohttp."""

    url: URL  # without its credentials
    authorization: str | None  # Basic, from the URL's credentials
    proxy: URL | None  # from HTTP(S)_PROXY / NO_PROXY, like httpx's trust_env
    proxy_auth: aiohttp.BasicAuth | None


def target_of(url: str) -> Target:
    """Raises ValueError for a URL aiohttp cannot use."""
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise aiohttp.InvalidURL(url)
    authorization = None
    if parsed.user or parsed.password:
        # As httpx did: UTF-8, and whatever the credentials hold (aiohttp's own BasicAuth
        # defaults to Latin-1 and refuses a ':' in the user name).
        credentials = f"{parsed.user or ''}:{parsed.password or ''}".encode()
        authorization = f"Basic {base64.b64encode(credentials).decode('ascii')}"
    proxy, proxy_auth = _env_proxy(parsed)
    return Target(parsed.with_user(None), authorization, proxy, proxy_auth)


def _env_proxy(url: URL) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    # Once per URL: aiohttp's trust_env would look the environment (and ~/.netrc) up in a
    # thread on every request, which nearly triples its CPU per POST.
    if url.host is None or urllib.request.proxy_bypass_environment(url.host):
        return None, None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy:
        return None, None
    parsed = URL(proxy if "://" in proxy else f"http://{proxy}")
    auth = None
    if parsed.user or parsed.password:
        auth = aiohttp.BasicAuth(parsed.user or "", parsed.password or "", encoding="utf-8")
    return parsed.with_user(None), auth


def ssl_context() -> ssl.SSLContext:
    """The CA certificates httpx verified with: SSL_CERT_FILE or SSL_CERT_DIR if set, else
    certifi's bundle (the system's if certifi is missing)."""
    cafile = os.environ.get("SSL_CERT_FILE")
    capath = os.environ.get("SSL_CERT_DIR")
    if cafile:
        return ssl.create_default_context(cafile=cafile)
    if capath:
        return ssl.create_default_context(capath=capath)
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


@dataclass(eq=False)
class _Channel:
    """One call's events on their way to one URL."""

    call_sid: str
    url: str
    shown_url: str  # safe for logs
    # The head is the event being delivered: it leaves the queue once delivered or given up,
    # so `pending` counts it.
    queue: deque[CallEvent] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    warned_full: bool = False


class HookDispatcher:
    """Delivers call events to every hook URL: signed, in order per call and URL, retried.

    `publish` is called from the calls' audio paths: it never blocks and never raises. It
    must be called on the event loop the dispatcher's workers run on.
    """

    def __init__(
        self,
        settings: Settings,
        on_action: OnAction | None = None,
        *,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_cap_s: float = BACKOFF_CAP_S,
        queue_size: int = QUEUE_SIZE,
        idle_s: float = IDLE_S,
    ) -> None:
        if settings.hook_urls and not settings.hook_secret:
            raise ValueError("hook_secret is required with hook_urls: hooks are signed")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._urls = settings.hook_urls
        self._secret = settings.hook_secret
        self._timeout_s = settings.hook_timeout_s
        self._retries = max(0, settings.hook_retries)
        self._on_action = on_action
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._queue_size = queue_size
        self._idle_s = idle_s
        self.stats = HookStats()
        self._channels: dict[tuple[str, str], _Channel] = {}
        self._action_tasks: set[asyncio.Task[None]] = set()
        self._progress = asyncio.Event()  # set whenever an event leaves a queue or a worker ends
        self._session: aiohttp.ClientSession | None = None  # made on the running loop
        self._targets: dict[str, Target] = {}
        # Built now, at startup, not on the event loop at the first delivery (~25 ms).
        self._ssl: ssl.SSLContext | bool = (
            ssl_context() if any(url.lower().startswith("https:") for url in self._urls) else True
        )
        self._closed = False
        self._warned_no_loop = False
        self._rng = random.Random()

    @property
    def pending(self) -> int:
        """Deliveries queued or under way (an event counts once per URL)."""
        return sum(len(channel.queue) for channel in self._channels.values())

    @property
    def channels(self) -> int:
        """Live (call, URL) workers."""
        return len(self._channels)

    def publish(self, event: CallEvent) -> None:
        """Queue `event` for every hook URL. Never blocks, never raises."""
        if not self._urls:
            return
        try:
            self._enqueue(event)
        except Exception:  # a hook problem must never end the phone call that published
            log.exception("[%s] hook: could not queue an event", getattr(event, "call_sid", "?"))

    def _enqueue(self, event: CallEvent) -> None:
        if self._closed:
            self.stats.dropped += len(self._urls)
            log.debug("[%s] hooks closed: %s event not sent", event.call_sid, event.type)
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.stats.dropped += len(self._urls)
            if not self._warned_no_loop:
                self._warned_no_loop = True
                log.warning("[%s] hook events published outside the event loop are dropped", event.call_sid)
            return
        for url in self._urls:
            key = (event.call_sid, url)
            channel = self._channels.get(key)
            if channel is None:
                channel = self._channels[key] = _Channel(event.call_sid, url, safe_url(url))
                channel.task = asyncio.create_task(
                    self._work(channel), name=f"hook {event.call_sid} {channel.shown_url}"
                )
            if len(channel.queue) >= self._queue_size:
                self.stats.dropped += 1
                if not channel.warned_full:  # once per call and URL: no log flood from the audio path
                    channel.warned_full = True
                    log.warning(
                        "[%s] hook %s is %d events behind: dropping this call's new events for it",
                        event.call_sid,
                        channel.shown_url,
                        len(channel.queue),
                    )
                continue
            channel.queue.append(event)
            channel.wake.set()

    async def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every queued event to be delivered or given up;
        True if none is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._progress.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._progress.wait()
            except TimeoutError:
                return not self.pending
        return True

    async def aclose(self, timeout: float) -> None:
        """Let queued events be delivered for up to `timeout` seconds, then stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        # Still open while draining: calls ending during shutdown publish their call.ended.
        await self.flush(max(0.0, timeout))
        self._closed = True
        left = self.pending
        workers = [channel.task for channel in self._channels.values() if channel.task is not None]
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._channels.clear()
        if left:
            self.stats.failed += left
            log.warning("hooks: %d event deliveries not made within the %.0f s shutdown", left, timeout)
        if self._action_tasks:
            actions = set(self._action_tasks)
            remaining = deadline - loop.time()
            if remaining > 0:
                _, unfinished = await asyncio.wait(actions, timeout=remaining)
            else:
                unfinished = actions
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- Workers -----------------------------------------------------------------------------

    async def _work(self, channel: _Channel) -> None:
        key = (channel.call_sid, channel.url)
        try:
            while True:
                if not channel.queue:
                    channel.wake.clear()
                    try:
                        async with asyncio.timeout(self._idle_s):
                            await channel.wake.wait()
                    except TimeoutError:
                        if not channel.queue:
                            return  # gone quiet; a later event starts a new worker
                        continue
                event = channel.queue[0]
                try:
                    await self._deliver(channel, event)
                except Exception:  # a bug here must not strand the rest of the call's events
                    self.stats.failed += 1
                    log.exception(
                        "[%s] hook %s: %s event not delivered",
                        channel.call_sid,
                        channel.shown_url,
                        event.type,
                    )
                channel.queue.popleft()
                self._progress.set()
                if event.type == "call.ended" and not channel.queue:
                    return
        finally:
            # No await between the last queue check and here: publish cannot slip an event
            # into a channel that is about to vanish.
            if self._channels.get(key) is channel:
                del self._channels[key]
            self._progress.set()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    # No pool cap, in all or per host: the workers already bound the
                    # concurrency, and a cap would let one slow receiver hold up deliveries
                    # to the others.
                    limit=0,
                    limit_per_host=0,
                    keepalive_timeout=5.0,  # idle connections kept 5 s, as httpx did
                    ssl=self._ssl,
                ),
                # The whole attempt, answer included, so a receiver trickling bytes cannot
                # hold the queue for longer. The threshold keeps it exact: by default aiohttp
                # rounds deadlines of 5 s or more up to a whole second.
                timeout=aiohttp.ClientTimeout(total=self._timeout_s, ceil_threshold=math.inf),
                # Cookies kept and sent back as httpx did (a load balancer's sticky session),
                # IP-address hosts included.
                cookie_jar=aiohttp.CookieJar(unsafe=True),
            )
        return self._session

    def _target(self, url: str) -> Target:
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = target_of(url)
        return target

    async def _deliver(self, channel: _Channel, event: CallEvent) -> None:
        """Deliver one event to one URL, retrying; gives up with one warning."""
        body = event.to_json()
        attempts = 1 + self._retries
        reason = ""
        for attempt in range(attempts):
            headers = {
                "Content-Type": "application/json",
                # A fresh timestamp per attempt: a retry late in the backoff is not "stale".
                SIGNATURE_HEADER: sign(self._secret, body, int(time.time())),
                EVENT_HEADER: event.type,
                DELIVERY_HEADER: event.id,
                "User-Agent": USER_AGENT,
                "Accept-Encoding": "identity",  # the answer is read with a size cap
            }
            retry_after: str | None = None
            try:
                status, answer, retry_after = await self._post(channel.url, body, headers)
            except TimeoutError:  # aiohttp's connect and read timeouts are TimeoutErrors too
                reason = f"no answer within {self._timeout_s:g} s"
            except aiohttp.InvalidURL as exc:  # a ClientError, but retrying will not help
                reason = scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), channel.url)
                break
            except (aiohttp.ClientError, OSError) as exc:  # refused, reset, DNS, TLS...
                reason = scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), channel.url)
            except Exception as exc:  # e.g. an unusable URL: retrying will not help
                reason = scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), channel.url)
                break
            else:
                if 200 <= status < 300:
                    self.stats.delivered += 1
                    self._answered(channel, event, answer)
                    return
                reason = f"HTTP {status}"
                if status < 500 and status not in RETRY_STATUSES:
                    reason += " (refused by the receiver)"
                    break
            if attempt + 1 < attempts:
                self.stats.retried += 1
                delay = backoff_delay(
                    attempt, self._backoff_base_s, self._backoff_cap_s, retry_after, self._rng
                )
                log.debug(
                    "[%s] hook %s: %s event (seq %d) failed (%s); retry in %.2f s",
                    event.call_sid,
                    channel.shown_url,
                    event.type,
                    event.seq,
                    reason,
                    delay,
                )
                await asyncio.sleep(delay)
        self.stats.failed += 1
        log.warning(
            "[%s] hook %s: gave up on %s event (seq %d) after %d attempt(s): %s",
            event.call_sid,
            channel.shown_url,
            event.type,
            event.seq,
            attempt + 1,
            reason,
        )

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes | None, str | None]:
        """One attempt: (status, the 2xx answer or None if unreadable, Retry-After)."""
        target = self._target(url)
        if target.authorization is not None:
            headers = {**headers, "Authorization": target.authorization}
        # The session's timeout bounds the whole attempt, reading the answer included.
        async with self._http().post(
            target.url,
            data=body,
            headers=headers,
            allow_redirects=False,  # a 3xx is the receiver's final answer
            proxy=target.proxy,
            proxy_auth=target.proxy_auth,
        ) as response:
            if not 200 <= response.status < 300:
                return response.status, None, response.headers.get("Retry-After")
            # Delivered: a failure while reading the answer must not cause a retry.
            answer: bytes | None = None
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                answer = await read_capped(response, MAX_ANSWER_BYTES)
            return response.status, answer, None

    def _answered(self, channel: _Channel, event: CallEvent, answer: bytes | None) -> None:
        if not answer:
            return
        try:
            action = parse_action(answer)
        except ValueError as exc:
            log.warning(
                "[%s] hook %s answered an invalid action to the %s event (seq %d), ignored: %s",
                event.call_sid,
                channel.shown_url,
                event.type,
                event.seq,
                exc,
            )
            return
        if action is None or action.action == "none":
            return
        if self._on_action is None:
            log.info(
                "[%s] hook %s asked for %s: nothing handles actions",
                event.call_sid,
                channel.shown_url,
                action.action,
            )
            return
        log.info(
            "[%s] hook %s asks for %s%s after the %s event (seq %d)",
            event.call_sid,
            channel.shown_url,
            action.action,
            f" to {action.to}" if action.to else "",
            event.type,
            event.seq,
        )
        # Its own task: a transfer takes a while, and the next event must not wait for it.
        task = asyncio.create_task(self._run_action(event, action), name=f"hook action {event.call_sid}")
        self._action_tasks.add(task)
        task.add_done_callback(self._action_tasks.discard)

    async def _run_action(self, event: CallEvent, action: HookAction) -> None:
        assert self._on_action is not None
        try:
            await self._on_action(event, action)
        except Exception:
            log.exception("[%s] hook action %s failed", event.call_sid, action.action)


async def post_signed(
    session: aiohttp.ClientSession, target: Target, body: bytes, secret: str
) -> tuple[int, bytes | None]:
    """POST a JSON `body` to `target` as the hooks do: signed with `secret` when set, no
    redirects followed, the answer read up to MAX_ANSWER_BYTES (None past it). The status
    and the answer; raises what aiohttp raises (and TimeoutError)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Accept-Encoding": "identity",  # the answer is read with a size cap
    }
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, body, int(time.time()))
    if target.authorization is not None:
        headers["Authorization"] = target.authorization
    async with session.post(
        target.url,
        data=body,
        headers=headers,
        allow_redirects=False,  # a 3xx is the endpoint's final answer
        proxy=target.proxy,
        proxy_auth=target.proxy_auth,
    ) as response:
        if not 200 <= response.status < 300:
            return response.status, b""
        return response.status, await read_capped(response, MAX_ANSWER_BYTES)


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
