"""What one scripted call measured, computed from its caller's timeline.

Definitions (all times ``time.monotonic()``):

* first audio: ``start`` sent -> first bot ``media`` received;
* reply latency of an utterance: its last frame sent -> first bot media received after
  it (None if none came before the next utterance began);
* barge-in stop time: first frame of the barge-in sent -> first ``clear`` received after it;
* send lateness: a caller frame's send time minus its time on the 20 ms clock; a frame
  later than :data:`LOST_AFTER_S`, or skipped by the clock, counts as lost;
* media after clear: after a ``clear``, bot media followed by a mark of a response number
  no higher than the last one marked before the clear belongs to the interrupted reply.
  Marks are read as the bridge names them, ``r<response>.<seq>``; if any mark name does
  not parse, the check is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ivr_bridge.standins.timeline import CallerTimeline
from ivr_bridge.standins.twilio import TwilioCaller

LOST_AFTER_S = 0.1


@dataclass(slots=True)
class Utterance:
    """One `say` or `barge_in` of the caller."""

    step: int
    kind: str  # "say" | "barge_in"
    clip: str
    chunks: range  # media chunk numbers of its frames
    started_at: float | None = None  # first frame sent
    ended_at: float | None = None  # last frame sent: end of speech
    reply_latency_ms: float | None = None
    stop_ms: float | None = None  # barge-ins only: until the bridge's clear

    def as_dict(self) -> dict[str, object]:
        return {
            "step": self.step,
            "kind": self.kind,
            "clip": self.clip,
            "first_chunk": self.chunks.start if self.chunks else None,
            "last_chunk": self.chunks[-1] if self.chunks else None,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "reply_latency_ms": _round(self.reply_latency_ms),
            "stop_ms": _round(self.stop_ms),
        }


@dataclass(slots=True)
class CallReport:
    call_sid: str
    scenario: str
    outcome: str  # "completed" | "failed"
    reason: str | None
    started_at: float
    duration_s: float
    first_audio_ms: float | None = None
    utterances: list[Utterance] = field(default_factory=list)
    frames_sent: int = 0
    frames_lost: int = 0
    media_received: int = 0
    bytes_received: int = 0
    bytes_heard: int = 0  # played at the handset (a clear drops what was still queued)
    marks_played: int = 0
    marks_flushed: int = 0
    clears: int = 0
    send_lateness_ms: np.ndarray = field(default_factory=lambda: np.empty(0))
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome == "completed"

    @property
    def reply_latencies_ms(self) -> list[float]:
        return [u.reply_latency_ms for u in self.utterances if u.reply_latency_ms is not None]

    @property
    def barge_ins(self) -> list[Utterance]:
        return [u for u in self.utterances if u.kind == "barge_in"]

    @property
    def barge_in_stops_ms(self) -> list[float]:
        return [u.stop_ms for u in self.barge_ins if u.stop_ms is not None]


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 2)


def measure(
    caller: TwilioCaller | None,
    *,
    call_sid: str,
    scenario: str,
    reason: str | None,
    started_at: float,
    ended_at: float,
    utterances: list[Utterance],
    errors: list[str],
) -> CallReport:
    report = CallReport(
        call_sid=call_sid,
        scenario=scenario,
        outcome="completed" if reason is None else "failed",
        reason=reason,
        started_at=started_at,
        duration_s=ended_at - started_at,
        utterances=utterances,
        errors=errors,
    )
    if caller is None:
        return report
    timeline = caller.timeline
    if timeline.started_at is not None and timeline.media_at:
        report.first_audio_ms = (timeline.media_at[0] - timeline.started_at) * 1000
    _time_utterances(timeline, utterances)
    lateness = (np.frombuffer(timeline.sent_at) - np.frombuffer(timeline.scheduled_at)) * 1000
    report.send_lateness_ms = lateness
    report.frames_sent = len(lateness)
    report.frames_lost = int(np.count_nonzero(lateness > LOST_AFTER_S * 1000)) + timeline.frames_skipped
    report.media_received = caller.media_messages
    report.bytes_received = caller.received_total
    report.bytes_heard = len(caller.received)
    report.marks_played = len(caller.marks_played)
    report.marks_flushed = len(caller.marks_flushed)
    report.clears = caller.clears
    report.violations = [*caller.violations, *media_after_clear(timeline)]
    return report


def _time_utterances(timeline: CallerTimeline, utterances: list[Utterance]) -> None:
    for index, utterance in enumerate(utterances):
        if not utterance.chunks:
            continue
        utterance.started_at = timeline.sent_time(utterance.chunks.start)
        utterance.ended_at = timeline.sent_time(utterance.chunks[-1])
        following = utterances[index + 1].chunks if index + 1 < len(utterances) else None
        # Whatever the bot does once the caller speaks again answers that, not this.
        until = timeline.sent_time(following.start) if following else None
        if utterance.ended_at is not None:
            reply = timeline.first_media_after(utterance.ended_at)
            if reply is not None and (until is None or timeline.media_at[reply] < until):
                utterance.reply_latency_ms = (timeline.media_at[reply] - utterance.ended_at) * 1000
        if utterance.kind == "barge_in" and utterance.started_at is not None:
            clear = next((at for at in timeline.clear_at if at >= utterance.started_at), None)
            if clear is not None and (until is None or clear < until):
                utterance.stop_ms = (clear - utterance.started_at) * 1000


def response_number(mark: str) -> int | None:
    """The reply number in a bridge mark name ``r<response>.<seq>``, else None."""
    head, dot, _ = mark.partition(".")
    if dot and head[:1] == "r" and head[1:].isdigit():
        return int(head[1:])
    return None


def media_after_clear(timeline: CallerTimeline) -> list[str]:
    """Violations: media of an interrupted reply received after the clear that stopped it."""
    numbers = [response_number(name) for name in timeline.mark_names]
    if any(number is None for number in numbers):
        return []
    clears = len(timeline.clear_at)
    found: list[str] = []
    for k in range(clears):
        marks_before = timeline.clear_after_marks[k]
        if marks_before == 0:
            continue  # nothing had been marked: no reply to tell apart
        interrupted = numbers[marks_before - 1]
        first = timeline.clear_after_media[k]
        last = timeline.clear_after_media[k + 1] if k + 1 < clears else len(timeline.media_at)
        stale = stale_bytes = 0
        mark = marks_before
        for media in range(first, last):
            # The mark that follows this media says which reply it belonged to.
            while mark < len(numbers) and timeline.mark_after_media[mark] <= media:
                mark += 1
            if mark == len(numbers):
                break
            if numbers[mark] <= interrupted:  # type: ignore[operator]
                stale += 1
                stale_bytes += timeline.media_bytes[media]
        if stale:
            found.append(
                f"media after clear: {stale} message(s), {stale_bytes} bytes of interrupted "
                f"response r{interrupted} arrived after clear {k + 1}"
            )
    return found
