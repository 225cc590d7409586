"""Keeps a voice session up for the whole call: connect (timed), reconnect a dropped
session within `IVR_RECONNECT_BUDGET_S`, renew it before the provider's cap, and hand
the call to the fallback when the voice API cannot serve it.

The provider classifies its own closes (`Closed.normal`, `Closed.retryable`); the keeper
only acts on the verdict.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from enum import Enum, auto

from ivr_bridge.audio import PCM16_24K, carried
from ivr_bridge.fallback import fallback_twiml
from ivr_bridge.hooks import backoff_delay
from ivr_bridge.providers import session_cap
from ivr_bridge.providers.base import NORMAL_CLOSE, CallInfo, Closed, VoiceSession
from ivr_bridge.settings import Settings
from ivr_bridge.twilio_rest import TwilioRest

from .report import CallReport
from .state import CallState, Lifecycle, Outcome
from .uplink import Uplink

RECONNECT_BASE_S = 0.25
RENEW_MARGIN_S = 60.0  # renew this long before the session cap, at a quiet moment
RENEW_FORCED_S = 5.0  # ... and mid-reply if it is this close

# Relays one connected session's events to the caller: returns how it closed, or None
# when the call is over. Its flag is True when the session replaces an earlier one.
Relay = Callable[[VoiceSession, bool], Awaitable[Closed | None]]


class SessionEnd(Enum):
    OVER = auto()  # the call is over (either side), or cannot go on
    CONNECT_FAILED = auto()  # the session never opened: retried, like a drop
    DROPPED = auto()  # closed with a retryable error
    FAILED = auto()  # closed with an error not worth retrying
    RENEW = auto()  # closed by us to renew it


class SessionKeeper:
    def __init__(
        self,
        settings: Settings,
        factory: Callable[[Settings, CallInfo], VoiceSession],
        lifecycle: Lifecycle,
        report: CallReport,
        uplink: Uplink,
    ) -> None:
        self.settings = settings
        self.session: VoiceSession | None = None
        self.fallback = ""  # what was done when the voice API could not serve the call
        self.close_code: int | None = None  # the last error close of the voice API
        self.opened_at = 0.0  # loop time the current session opened
        self.cap_s = session_cap(settings)  # renewed before this age; None: never
        self._factory = factory
        self._lifecycle = lifecycle
        self._report = report
        self._uplink = uplink
        self._info = CallInfo()

    def open(self, info: CallInfo) -> VoiceSession:
        """The call's first session (not yet connected)."""
        self._info = info
        self.session = self._factory(self.settings, info)
        self._lifecycle.move(CallState.CONNECTING)
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close(NORMAL_CLOSE)

    def renewal_due(self, now: float, *, quiet: bool) -> bool:
        """Renew between sentences, in the last minute before the cap (the last quarter of
        a short cap); forced mid-reply only in its last seconds."""
        cap = self.cap_s
        if cap is None or self._lifecycle.state != CallState.ACTIVE:
            return False
        margin = min(RENEW_MARGIN_S, cap / 4)
        age = now - self.opened_at
        return age > cap - margin and (quiet or age > cap - min(RENEW_FORCED_S, margin / 4))

    async def renew(self, now: float) -> None:
        self._lifecycle.move(CallState.RENEWING)
        self._report.log.info(
            "voice session %.0f s old: renewing it before the provider's cap", now - self.opened_at
        )
        assert self.session is not None
        await self.session.close(NORMAL_CLOSE)  # the relay sees it closed and returns

    async def keep(self, relay: Relay) -> None:
        """Serve sessions one after another until the call is over."""
        retry_until: float | None = None
        attempt = 0
        replacing = False
        while True:
            session = self.session
            assert session is not None
            end = await self._serve(session, relay, replacing)
            if end is SessionEnd.OVER:
                return
            await session.close(NORMAL_CLOSE)
            replacing = True
            if end is SessionEnd.RENEW:
                self._lifecycle.move(CallState.RENEWING)  # (already, when the bridge asked)
                self._report.stats.renewals += 1
                self._uplink.drop()
                self.session = self._factory(self.settings, self._info)
                continue
            if end is SessionEnd.FAILED:
                self._lifecycle.end(Outcome.VOICE_API_FAILED)
                await self._fall_back()
                return
            now = time.monotonic()
            if end is SessionEnd.DROPPED:  # that session was up: a fresh budget for this drop
                retry_until, attempt = None, 0
            retry_until = retry_until or now + self.settings.reconnect_budget_s
            if now >= retry_until:
                self._report.log.error("voice API not back within %.0f s", self.settings.reconnect_budget_s)
                self._lifecycle.end_unless_ended(
                    Outcome.VOICE_API_UNREACHABLE
                    if end is SessionEnd.CONNECT_FAILED
                    else Outcome.VOICE_API_FAILED
                )
                await self._fall_back()
                return
            self._lifecycle.move(CallState.RECONNECTING)
            self._uplink.drop()
            await asyncio.sleep(backoff_delay(attempt, RECONNECT_BASE_S, retry_until - now))
            attempt += 1
            self.session = self._factory(self.settings, self._info)

    async def _serve(self, session: VoiceSession, relay: Relay, replacing: bool) -> SessionEnd:
        report, metrics, log = self._report, self._report.metrics, self._report.log
        connect_started = time.monotonic()
        try:
            takes = await session.connect() or PCM16_24K
        except ConnectionError as exc:
            log.error("%s", exc)
            if metrics:
                metrics.upstream_failed(None)
            report.emit("upstream.error", {"code": "connect_failed", "message": str(exc), "retrying": True})
            return SessionEnd.CONNECT_FAILED
        if metrics:
            metrics.upstream_connected(time.monotonic() - connect_started)
        if not carried(takes):
            self._lifecycle.end(Outcome.VOICE_API_FAILED)
            log.error(
                "voice API %s takes caller audio as %s, which the bridge cannot convert; ending the call",
                session.name,
                takes,
            )
            await self._fall_back()
            return SessionEnd.OVER
        self.opened_at = asyncio.get_running_loop().time()
        if self._lifecycle.state == CallState.RECONNECTING:
            report.stats.reconnects += 1
            log.info("voice API session restored (reconnect %d)", report.stats.reconnects)
        elif self._lifecycle.state == CallState.RENEWING:
            log.info("voice API session renewed")
        self._uplink.open(takes)
        self._lifecycle.move(CallState.ACTIVE)
        closed = await relay(session, replacing)
        if closed is None:
            return SessionEnd.OVER
        if closed.renew or (closed.normal and self._lifecycle.state == CallState.RENEWING):
            if closed.renew:
                log.info("voice API ended the session at its cap (%s); renewing it", closed.reason[:80])
            return SessionEnd.RENEW
        if closed.normal:
            self._lifecycle.end(Outcome.VOICE_API_ENDED)
            log.info("voice API closed the session normally")
            return SessionEnd.OVER
        self.close_code = closed.code
        if metrics:
            metrics.upstream_failed(closed.code)
        retry = "; reconnecting" if closed.retryable else ""
        log.error("voice API closed the session with code %d %s%s", closed.code, closed.reason, retry)
        report.emit(
            "upstream.error",
            {"code": str(closed.code), "message": closed.reason[:200], "retrying": closed.retryable},
        )
        return SessionEnd.DROPPED if closed.retryable else SessionEnd.FAILED

    async def _fall_back(self) -> None:
        """The voice API cannot serve this call: hand it to the fallback through Twilio's
        REST API (the stream then stops), so the caller is never left in dead air."""
        log = self._report.log
        rest = TwilioRest(self.settings)
        if not rest.available:
            log.error("no TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN for a fallback: ending the call")
            return
        try:
            found = await rest.redirect(self._report.call_sid, fallback_twiml(self.settings))
        except ConnectionError as exc:
            log.error("fallback redirect failed: %s; ending the call", exc)
            return
        self.fallback = "redirected" if found else "call already gone"
        log.info("call handed to the fallback (%s)", self.fallback)
