"""What a call tells the world: its counters, its events (numbered, queued by the
subscriber), its live snapshot, the `call.ended` summary and its closing log lines."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ivr_bridge.events import CallEvent, EventType
from ivr_bridge.media_stream import MediaStreamError
from ivr_bridge.metrics import BAD_INPUT_LOG_LIMIT
from ivr_bridge.transcript import TranscriptLine

if TYPE_CHECKING:
    from ivr_bridge.metrics import BridgeMetrics

    from .call import Call

log = logging.getLogger("ivr_bridge.call")


class CallLog(logging.LoggerAdapter):
    """Prefixes the call sid to a line, and carries it as `call_sid` (JSON logs)."""

    def process(self, msg: object, kwargs: Any) -> tuple[str, Any]:  # type: ignore[override]
        call = self.extra["call"]  # type: ignore[index]
        kwargs["extra"] = {"call_sid": call if call != "-" else ""}
        return f"[{call}] {msg}", kwargs


@dataclass(slots=True)
class CallStats:
    frames_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    barge_ins: int = 0
    bad_frames: int = 0
    skipped_upstream: int = 0
    provider_errors: int = 0
    early_audio_dropped_ms: int = 0  # caller audio over the cap while the API connected
    gap_audio_dropped_ms: int = 0  # caller audio dropped while the voice API reconnected
    reconnects: int = 0
    renewals: int = 0
    turns: int = 0  # final user utterances
    emotions: list[tuple[float, list[tuple[str, float]]]] = field(default_factory=list)
    reply_ms: list[float] = field(default_factory=list)  # end of the caller's turn -> bot speech
    clear_ms: list[float] = field(default_factory=list)  # interruption reached us -> `clear` sent
    # A cascade's turns by stage (providers.base.TurnTiming), ms: stage -> samples.
    turn_ms: dict[str, list[float]] = field(default_factory=dict)

    def emotion_counts(self) -> Counter[str]:
        """The strongest emotion of each update, counted over the call."""
        return Counter(top[0][0] for _, top in self.emotions if top)


def summary(values: list[float]) -> dict[str, float | int]:
    """Count, median, p95 and maximum of a call's latency samples (ms)."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    n = len(ordered)
    return {
        "count": n,
        "p50": ordered[n // 2],
        "p95": ordered[min(n - 1, round(0.95 * (n - 1)))],
        "max": ordered[-1],
    }


class CallReport:
    def __init__(
        self,
        metrics: BridgeMetrics | None,
        on_event: Callable[[CallEvent], None] | None,
    ) -> None:
        self.stats = CallStats()
        self.metrics = metrics
        self.call_sid = ""  # events go out once the call is known
        # One adapter for the whole call, named once its sid is known (every part logs with it).
        self._log_names = {"call": "-"}
        self.log: logging.LoggerAdapter = CallLog(log, self._log_names)
        self.started_at = time.time()
        self._started = time.monotonic()
        self._on_event = on_event
        self._seq = 0
        self._turn_ended_at: float | None = None  # for the reply latency of the next reply

    def known_as(self, call_sid: str) -> None:
        self.call_sid = call_sid
        self._log_names["call"] = call_sid

    def elapsed(self) -> float:
        return round(time.monotonic() - self._started, 2)

    # -- events --------------------------------------------------------------------------

    def emit(self, kind: EventType, data: dict[str, Any]) -> None:
        if self._on_event is None or not self.call_sid:
            return
        self._seq += 1
        event = CallEvent(kind, self.call_sid, self._seq, time.time(), self.elapsed(), data)
        try:
            self._on_event(event)
        except Exception:  # a subscriber's bug must not end the call
            self.log.exception("call event %s not delivered", kind)

    def line(self, line: TranscriptLine) -> None:
        if line.role == "assistant" and line.interrupted:
            self.log.info("assistant (cut after %d ms): %s", line.heard_ms, line.heard_text)
        else:
            self.log.info("%s: %s", line.role, line.text)
        self.emit("transcript", {"at": line.at, **line.as_dict()})

    # -- latency -------------------------------------------------------------------------

    def turn_ended(self, now: float) -> None:
        self._turn_ended_at = now

    def reply_heard(self, now: float) -> None:
        """The first audio of a reply went out: the reply latency of the last turn."""
        if self._turn_ended_at is None:
            return
        latency = now - self._turn_ended_at
        self.stats.reply_ms.append(round(latency * 1000, 1))
        if self.metrics:
            self.metrics.reply_started(latency)
        self._turn_ended_at = None

    def cleared(self, clear_s: float) -> None:
        self.stats.barge_ins += 1
        self.stats.clear_ms.append(round(clear_s * 1000, 2))
        if self.metrics:
            self.metrics.barged_in(clear_s)

    def turn_timed(self, stages: dict[str, float]) -> None:
        for stage, ms in stages.items():
            self.stats.turn_ms.setdefault(stage, []).append(ms)
        if self.metrics:
            self.metrics.turn_timed(stages)

    def latency(self) -> dict[str, dict[str, float | int]]:
        latency = {"reply_ms": summary(self.stats.reply_ms), "clear_ms": summary(self.stats.clear_ms)}
        for stage, samples in self.stats.turn_ms.items():  # cascades only
            latency[f"turn_{stage}"] = summary(samples)
        return latency

    # -- bad input -----------------------------------------------------------------------

    def bad_frame(self, exc: MediaStreamError) -> None:
        self.stats.bad_frames += 1
        action = "ending the call on a Twilio frame" if exc.fatal else "skipped a Twilio frame"
        self.bad_input("twilio", exc.kind, self.stats.bad_frames, action, str(exc), always=exc.fatal)

    def bad_input(
        self, source: str, kind: str, count: int, action: str, detail: str, *, always: bool = False
    ) -> None:
        """Count bad input; log it once each up to a cap (then only count: garbage must not
        flood the log). What ends the call is always logged."""
        if self.metrics:
            self.metrics.bad_input(source, kind)
        if always or count <= BAD_INPUT_LOG_LIMIT:
            more = "; more are only counted" if count == BAD_INPUT_LOG_LIMIT else ""
            self.log.warning("%s (%s): %s%s", action, kind, detail, more)

    # -- views of the call ---------------------------------------------------------------

    def snapshot(self, call: Call, *, full: bool) -> dict[str, Any]:
        s = self.stats
        state = {
            "call_sid": self.call_sid,
            "stream_sid": call.stream_sid,
            "from": call.caller,
            "to": call.called,
            "state": call.lifecycle.shown,
            "outcome": str(call.outcome),
            "provider": call.provider,
            "line": call.line,
            "instance": call.settings.instance_id,
            "started_at": self.started_at,
            "duration_s": self.elapsed(),
            "bot_speaking": call.downlink.audible,
            "turns": s.turns,
            "barge_ins": s.barge_ins,
            "latency": self.latency(),
            "handoff": asdict(call.handoff) if call.handoff else None,
            "custom_parameters": call.custom_parameters,
        }
        if full:
            lines = call.transcript
            state["transcript"] = [{"at": ln.at, **ln.as_dict()} for ln in lines if ln.role != "dtmf"]
            state["emotions"] = [{"at": at, "top": dict(top)} for at, top in s.emotions]
            state["dtmf"] = [{"at": ln.at, "digit": ln.text} for ln in lines if ln.role == "dtmf"]
        return state

    def ending(self, call: Call) -> dict[str, Any]:
        """The `call.ended` event's data."""
        s = self.stats
        handoff = call.handoff
        return {
            "outcome": str(call.outcome),
            "duration_s": self.elapsed(),
            "turns": s.turns,
            "replies": len(call.playback.responses),
            "barge_ins": s.barge_ins,
            "emotions": dict(s.emotion_counts().most_common()),
            "latency": self.latency(),
            "transfer_to": handoff.to if handoff else "",
            "ended_by": handoff.source if handoff else "",
            "fallback": call.keeper.fallback,
            "upstream_close_code": call.keeper.close_code,
            "reconnects": s.reconnects,
            "frames_in": s.frames_in,
            "frames_out": s.frames_out,
            "bad_frames": s.bad_frames,
            "sequence_gaps": call.stream.sequence_gaps,
        }

    def log_summary(self, call: Call) -> None:
        s = self.stats
        replies = ", ".join(
            f"#{r.number} heard {r.heard_ms}/{r.sent_ms} ms{' (interrupted)' if r.interrupted else ''}"
            for r in call.playback.responses
        )
        outcome = call.outcome
        self.log.info(
            "call ended: %s after %.1f s; frames in %d out %d, sequence gaps %d, chunk gaps %d, "
            "barge-ins %d, bad frames %d; replies: %s",
            f"{outcome} ({call.keeper.close_code})" if outcome == "voice_api_failed" else outcome,
            time.monotonic() - self._started,
            s.frames_in,
            s.frames_out,
            call.stream.sequence_gaps,
            call.stream.chunk_gaps,
            s.barge_ins,
            s.bad_frames,
            replies or "none",
        )
        for line in call.transcript:
            text = f"{line.heard_text} [cut]" if line.interrupted else line.text
            self.log.info("transcript %6.2fs %s: %s", line.at, line.role, text)
        counts = s.emotion_counts()
        if counts:
            self.log.info("emotions: %s", ", ".join(f"{name} x{n}" for name, n in counts.most_common()))
