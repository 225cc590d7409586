"""What a call tells the world: the events sent to hooks and written to the call record.

A call emits each event once, in order; `seq` counts them per call from 1, so a receiver
can order them and drop a redelivery. The JSON form is what hook receivers get.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

EventType = Literal[
    "call.started",  # call_sid, stream_sid, from, to, custom_parameters, provider, instance
    "transcript",  # role "user" | "assistant", text; an assistant line adds heard_text, heard_ms,
    #   sent_ms, interrupted (what the caller really heard, from Twilio's marks)
    "emotion",  # top: [{name, score}]
    "dtmf",  # digit, action ("transfer:+1555..." | "hangup" | "" when the key is not mapped)
    "barge_in",  # reply, heard_ms, dropped_ms, reason
    "upstream.error",  # code, message, retrying
    "control",  # action "transfer" | "hangup", to, source ("api" | "hook" | "dtmf" | "agent"), result
    "agent.action",  # action ("transfer:+1555..." | "hangup"): the agent's end_call / transfer_call
    "call.ended",  # outcome, duration_s, turns, barge_ins, emotions {name: count},
    #   latency {reply_ms, clear_ms: {count, p50, p95, max}}, transfer_to, fallback, ...
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class CallEvent:
    type: EventType
    call_sid: str
    seq: int  # per call, from 1
    at: float  # Unix time, seconds
    elapsed: float  # seconds since the call's stream started
    data: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)  # unique per event, kept on retries

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "call_sid": self.call_sid,
            "seq": self.seq,
            "at": self.at,
            "elapsed": self.elapsed,
            "data": self.data,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.as_dict(), separators=(",", ":"), ensure_ascii=False).encode()
