"""A phone call joined to a voice session: the orchestrator (`Call`) and the parts it
supervises, each in its own module (state, uplink, downlink, session keeper, report)."""

from .call import POLICY_VIOLATION, Call, TwilioSocket
from .report import CallStats
from .state import SHOWN_STATES, CallState, Handoff, Outcome
from .uplink import MAX_EARLY_AUDIO_MS

__all__ = [
    "MAX_EARLY_AUDIO_MS",
    "POLICY_VIOLATION",
    "SHOWN_STATES",
    "Call",
    "CallState",
    "CallStats",
    "Handoff",
    "Outcome",
    "TwilioSocket",
]
