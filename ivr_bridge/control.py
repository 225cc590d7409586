"""Call control: transfer or hang up a call, asked by the control API, a hook or a key.

Both go through Twilio's REST API, so any instance can act on any call. On the instance
that carries the call they first wait for the bot's current sentence to finish playing
(its last mark echoed, at most `IVR_PLAYOUT_WAIT_S`), so a goodbye is never cut off, and
they mark the call so that the `stop` which follows ends only the stream.

Each is done once per call, whichever instance is asked: the action is claimed with a
unique row in the call records (`CallStore.claim_control`) before the REST request. The
same request again joins or repeats the first answer; a different one gets 409.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from twilio.twiml.voice_response import VoiceResponse

from ivr_bridge.call import Call, Handoff, Outcome
from ivr_bridge.media_stream import is_call_sid
from ivr_bridge.metrics import BridgeMetrics
from ivr_bridge.settings import Settings, is_phone_target
from ivr_bridge.twilio_rest import TwilioRest

log = logging.getLogger("ivr_bridge.control")

REMEMBERED_CALLS = 10_000  # answers kept for repeated requests
CLAIM_POLL_S = 0.1  # how often a request joined to another instance's claim looks for its answer
CLAIM_WAIT_MARGIN_S = 15.0  # beyond the playout wait: the REST request's own timeout, and some


class Claims(Protocol):
    """Where transfers and hang-ups are claimed, one per call (ivr_bridge.records.CallStore)."""

    async def claim_control(
        self, call_sid: str, action: str, target: str, source: str
    ) -> dict[str, Any] | None: ...

    async def control_claim(self, call_sid: str) -> dict[str, Any] | None: ...

    async def settle_control(self, call_sid: str, result: dict[str, Any] | None) -> None: ...


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
        claims: Claims | None = None,
        metrics: BridgeMetrics | None = None,
        remote: Callable[[str, Handoff], Awaitable[ControlResult | None]] | None = None,
    ) -> None:
        """`calls`: this instance's active calls by sid. `claims`: where each call's one
        action is claimed across instances (None: this instance alone decides). `remote`
        hands a request for a call carried by another instance to that instance, and
        answers None when no other instance carries it."""
        self.settings = settings
        self._calls = calls
        self._rest = TwilioRest(settings)
        self._claims = claims
        self._remote = remote
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
        if not is_call_sid(call_sid):  # it becomes part of a REST URL path
            raise ControlError(404, "no such call: a call sid is letters, digits, - and _")
        known = self._requests.get(call_sid)
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
        local = call is not None and (call.softphone or handoff.action == "hangup")
        if not self._rest.available and not local:
            raise ControlError(503, "transfers need TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (Twilio REST)")
        if call is None and self._remote is not None:
            # Carried elsewhere: that instance waits for the bot's sentence and records the
            # action (before any claim here, which it would then wait on).
            forwarded = await self._remote(call_sid, handoff)
            if forwarded is not None:
                return forwarded
        if self._claims is not None:
            earlier = await self._claim(call_sid, handoff, local=call is not None)
            if earlier is not None:
                return earlier
        try:
            result = await self._act(call_sid, handoff, call)
        except ControlError:
            await self._settle(call_sid, None)
            raise
        await self._settle(call_sid, result.as_dict())
        return result

    async def _claim(self, call_sid: str, handoff: Handoff, *, local: bool) -> ControlResult | None:
        """Claim the call's action: None if this request is to carry it out, else the
        answer of the same action claimed earlier (here, by another instance, or before a
        restart). Raises ControlError 409 for a different one."""
        assert self._claims is not None
        try:
            first = await self._claims.claim_control(call_sid, handoff.action, handoff.to, handoff.source)
        except Exception as exc:
            if local:  # only this instance carries the call: its own bookkeeping is enough
                log.warning("[%s] control claim not recorded (%s); carrying on", call_sid, type(exc).__name__)
                return None
            log.error("[%s] control claim failed: %s", call_sid, type(exc).__name__)
            raise ControlError(503, "the call records are unavailable: cannot claim the call") from None
        if first is None:
            return None
        if (first["action"], first["target"]) != (handoff.action, handoff.to):
            what = f"transferred to {first['target']}" if first["action"] == "transfer" else "hung up"
            raise ControlError(409, f"call {call_sid} is already being {what}")
        # The same action, claimed elsewhere: its answer, once there.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.playout_wait_s + CLAIM_WAIT_MARGIN_S
        while first is not None and first["result"] is None and loop.time() < deadline:
            await asyncio.sleep(CLAIM_POLL_S)
            first = await self._claims.control_claim(call_sid)
        if first is None:  # the other attempt failed and gave its claim up: try ours
            return await self._claim(call_sid, handoff, local=local)
        if first["result"] is None:
            raise ControlError(
                504, f"call {call_sid} is still being handled by instance {first['instance_id']}"
            )
        fields = {name: first["result"].get(name) for name in ControlResult.__dataclass_fields__}
        return ControlResult(**fields)

    async def _settle(self, call_sid: str, result: dict[str, Any] | None) -> None:
        if self._claims is None:
            return
        try:
            await self._claims.settle_control(call_sid, result)
        except Exception as exc:  # the action itself is done (or failed) either way
            log.warning("[%s] control claim not settled: %s", call_sid, type(exc).__name__)

    async def _act(self, call_sid: str, handoff: Handoff, call: Call | None) -> ControlResult:
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
            if call is not None and (call.softphone or not self._rest.available):
                # A softphone's stream is its whole call, and without REST credentials
                # (development) ending the stream ends a <Connect> call. A softphone cannot
                # dial out: its page says where a phone caller would have gone.
                transferred = handoff.action == "transfer"
                await call.end(Outcome.TRANSFERRED if transferred else Outcome.HUNG_UP, 1000)
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
