"""A call's state: where it is in its life (one enum, with the moves it may make), how it
ended, and a transfer or hang-up under way. Sans-I/O."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum


class CallState(StrEnum):
    STARTING = "starting"  # waiting for Twilio's `start`
    CONNECTING = "connecting"  # the first voice session is opening; caller audio is held
    ACTIVE = "active"
    RECONNECTING = "reconnecting"  # the voice session dropped; a new one is on its way
    RENEWING = "renewing"  # the session is being replaced before the provider's cap
    ENDING = "ending"


# The moves a call may make, h11-style: anything else is a bug in the orchestrator.
TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    CallState.STARTING: frozenset({CallState.CONNECTING, CallState.ENDING}),
    CallState.CONNECTING: frozenset({CallState.ACTIVE, CallState.RECONNECTING, CallState.ENDING}),
    CallState.ACTIVE: frozenset({CallState.RECONNECTING, CallState.RENEWING, CallState.ENDING}),
    CallState.RECONNECTING: frozenset({CallState.ACTIVE, CallState.ENDING}),
    CallState.RENEWING: frozenset({CallState.ACTIVE, CallState.RECONNECTING, CallState.ENDING}),
    CallState.ENDING: frozenset(),
}
# The caller's audio is dropped rather than held in these: it would reach the new session
# late and out of context.
GAP_STATES = frozenset({CallState.RECONNECTING, CallState.RENEWING})
# What the control API shows: a transfer or hang-up under way stands in for the state.
SHOWN_STATES = (*CallState, "transferring", "hanging_up")


class Outcome(StrEnum):
    """How a call ended: a fixed set, so it can label metrics and call records."""

    IN_PROGRESS = "in_progress"
    STREAM_STOPPED = "stream_stopped"  # Twilio sent `stop`: hang-up or redirect
    CALLER_HUNG_UP = "caller_hung_up"  # the Twilio socket closed without `stop`
    VOICE_API_ENDED = "voice_api_ended"  # the voice API closed the session normally
    VOICE_API_FAILED = "voice_api_failed"  # ... with an error close code
    VOICE_API_UNREACHABLE = "voice_api_unreachable"
    CLOSED_BEFORE_START = "closed_before_start"
    UNUSABLE_START = "unusable_start"
    REFUSED = "refused"  # the start failed the admission check (per-call token)
    IDLE = "idle"  # no media from Twilio for IVR_IDLE_TIMEOUT_S
    NO_START = "no_start"  # no valid `start` in IVR_START_TIMEOUT_S (or closed to make room)
    FLOODED = "flooded"  # Twilio-side input far faster than real time: no phone line
    SHUTDOWN = "shutdown"  # still active when the instance's drain timeout ran out
    TWILIO_STALLED = "twilio_stalled"  # the Twilio socket stopped accepting frames
    TRANSFERRED = "transferred"  # handed to another number (control API, hook or key)
    HUNG_UP = "hung_up"  # ended by the control API, a hook or a key
    ERROR = "error"  # a bug: logged with its traceback


@dataclass(frozen=True, slots=True)
class Handoff:
    """A transfer or hang-up requested for this call: its stream's `stop` is expected."""

    action: str  # "transfer" | "hangup"
    to: str = ""
    source: str = "api"  # "api" | "hook" | "dtmf"

    @property
    def outcome(self) -> Outcome:
        return Outcome.TRANSFERRED if self.action == "transfer" else Outcome.HUNG_UP


class Lifecycle:
    """The call's state, its outcome once known, and the handoff it awaits."""

    def __init__(self, log: logging.LoggerAdapter | logging.Logger) -> None:
        self.state = CallState.STARTING
        self.outcome = Outcome.IN_PROGRESS
        self.handoff: Handoff | None = None
        self.log = log

    def move(self, to: CallState) -> None:
        """Go to `to` (staying put is allowed: e.g. a failed reconnect stays reconnecting)."""
        if to == self.state:
            return
        if to not in TRANSITIONS[self.state]:
            raise RuntimeError(f"a call cannot go from {self.state} to {to}")
        self.log.debug("call %s -> %s", self.state, to)
        self.state = to

    def end(self, outcome: Outcome) -> None:
        """Record how the call ended (the latest word wins, as each side finds out)."""
        self.outcome = outcome

    def end_unless_ended(self, outcome: Outcome) -> None:
        if self.outcome == Outcome.IN_PROGRESS:
            self.outcome = outcome

    def stream_over(self, outcome: Outcome) -> None:
        """The Twilio stream ended: after a handoff that is the handoff's doing."""
        self.outcome = self.handoff.outcome if self.handoff is not None else outcome

    @property
    def shown(self) -> str:
        """The state as the control API shows it (one of SHOWN_STATES)."""
        if self.outcome != Outcome.IN_PROGRESS:
            return CallState.ENDING
        if self.handoff is not None:
            return "transferring" if self.handoff.action == "transfer" else "hanging_up"
        return self.state
