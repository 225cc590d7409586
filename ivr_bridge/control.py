"""Call control: transfer or hang up a call, asked by the control API, a hook or a key.

Both go through Twilio's REST API, so any instance can act on any call. On the instance
that carries the call they first wait for the bot's current sentence to finish playing
(its last mark echoed, at most `IVR_PLAYOUT_WAIT_S`), so a goodbye is never cut off, and
they mark the call so that the `stop` which follows ends only the stream. Each is done
once per call: asking again joins or repeats the first answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from twilio.twiml.voice_response import VoiceResponse

from ivr_bridge.call import Call, Handoff, Outcome
from ivr_bridge.metrics import BridgeMetrics
from ivr_bridge.settings import Settings, is_phone_target
from ivr_bridge.twilio_rest import TwilioRest

log = logging.getLogger("ivr_bridge.control")

REMEMBERED_CALLS = 10_000  # answers kept for repeated requests


class ControlError(Exception):
    """A request that cannot be carried out; `status` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ControlResult:
    call_sid: str
    action: str  # "transfer" | "hangup"
    to: str
    source: str
    result: str  # "done" | "call_already_ended"
    waited_ms: int  # spent waiting for the bot's sentence to play out
    played_out: bool  # False: the wait timed out (or the call was not on this instance)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def transfer_twiml(to: str) -> str:
    response = VoiceResponse()
    if to.startswith("sip:"):
        response.dial().sip(to)
    else:
        response.dial(to)
    return str(response)


class CallControl:
    def __init__(
        self,
        settings: Settings,
        calls: Mapping[str, Call],
        previous: Callable[[str], Awaitable[Handoff | None]] | None = None,
        metrics: BridgeMetrics | None = None,
    ) -> None:
        """`calls`: this instance's active calls by sid. `previous` finds a handoff another
        instance (or an earlier run) already made for a call, in the call records."""
        self.settings = settings
        self._calls = calls
        self._rest = TwilioRest(settings)
        self._previous = previous
        self._metrics = metrics
        self._requests: OrderedDict[str, tuple[Handoff, asyncio.Future[ControlResult]]] = OrderedDict()

    async def transfer(self, call_sid: str, to: str, source: str = "api") -> ControlResult:
        if not is_phone_target(to):
            raise ControlError(422, "'to' must be an E.164 number like +15550100 or a sip: URI")
        return await self._request(call_sid, Handoff("transfer", to, source))

    async def hangup(self, call_sid: str, source: str = "api") -> ControlResult:
        return await self._request(call_sid, Handoff("hangup", "", source))

    async def apply(self, call_sid: str, action: str, source: str) -> ControlResult | None:
        """Apply a DTMF map entry or hook answer: "transfer:+1555...", "hangup" or "none"."""
        kind, _, to = action.partition(":")
        if kind == "transfer":
            return await self.transfer(call_sid, to, source)
        if kind == "hangup":
            return await self.hangup(call_sid, source)
        return None

    async def _request(self, call_sid: str, handoff: Handoff) -> ControlResult:
        known = self._requests.get(call_sid)
        if known is None and self._previous is not None and call_sid not in self._calls:
            done = await self._previous(call_sid)
            if done is not None:
                answer = asyncio.get_running_loop().create_future()
                action, to, source = done.action, done.to, done.source
                answer.set_result(ControlResult(call_sid, action, to, source, "done", 0, False))
                known = self._requests[call_sid] = (done, answer)
        if known is not None:
            first, task = known
            if (first.action, first.to) != (handoff.action, handoff.to):
                what = f"transferred to {first.to}" if first.action == "transfer" else "hung up"
                raise ControlError(409, f"call {call_sid} is already being {what}")
            return await asyncio.shield(task)  # the same answer, never a second REST request
        task = asyncio.create_task(self._carry_out(call_sid, handoff), name=f"control-{call_sid}")
        self._requests[call_sid] = (handoff, task)
        while len(self._requests) > REMEMBERED_CALLS:
            self._requests.popitem(last=False)
        try:
            return await asyncio.shield(task)
        except ControlError:
            self._requests.pop(call_sid, None)  # failed: a later request may try again
            raise

    async def _carry_out(self, call_sid: str, handoff: Handoff) -> ControlResult:
        call = self._calls.get(call_sid)
        if not self._rest.available and not (call is not None and handoff.action == "hangup"):
            raise ControlError(503, "transfers need TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (Twilio REST)")
        started = time.monotonic()
        played = False
        if call is not None:
            call.handoff = handoff  # the `stop` that follows ends the stream, not the call
            played = await call.played_out(self.settings.playout_wait_s)
            if not played:
                call.log.warning(
                    "bot still speaking after %.0f s; %s now", self.settings.playout_wait_s, handoff.action
                )
        waited_ms = round((time.monotonic() - started) * 1000)
        try:
            if not self._rest.available:
                # No REST credentials (development): ending the stream ends a <Connect> call.
                assert call is not None
                await call.end(Outcome.HUNG_UP, 1000)
                found = True
            elif handoff.action == "transfer":
                found = await self._rest.redirect(call_sid, transfer_twiml(handoff.to))
            else:
                found = await self._rest.hang_up(call_sid)
        except ConnectionError as exc:
            if call is not None:
                call.handoff = None
            log.error("[%s] %s failed: %s", call_sid, handoff.action, exc)
            raise ControlError(502, f"{handoff.action} failed: {exc}") from None
        result = ControlResult(
            call_sid,
            handoff.action,
            handoff.to,
            handoff.source,
            "done" if found else "call_already_ended",
            waited_ms,
            played,
        )
        log.info(
            "[%s] %s%s by %s: %s (waited %d ms for the bot's sentence)",
            call_sid,
            handoff.action,
            f" to {handoff.to}" if handoff.to else "",
            handoff.source,
            result.result,
            waited_ms,
        )
        if call is not None:
            call.controlled(result.as_dict())
        if self._metrics is not None:
            self._metrics.controlled(handoff.action, handoff.source, result.result)
        return result
