"""One call's raw timeline as a JSON object (a line of ``loadtest --timeline``).

The layout is documented in :mod:`ivr_bridge.loadgen.loadtest`.
"""

from __future__ import annotations

from typing import Any

from ivr_bridge.loadgen.call_report import CallReport
from ivr_bridge.standins.timeline import CallerTimeline


def timeline_record(report: CallReport, timeline: CallerTimeline | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "call_sid": report.call_sid,
        "scenario": report.scenario,
        "outcome": report.outcome,
        "reason": report.reason,
        "placed_at": report.started_at,
        "started_at": None,
        "frames_sent": {"chunk": [], "sent_at": [], "scheduled_at": []},
        "frames_skipped": 0,
        "media_received": [],
        "marks": [],
        "clears": [],
        "dtmf": [],
        "utterances": [u.as_dict() for u in report.utterances],
        "barge_ins": [u.as_dict() for u in report.barge_ins],
    }
    if timeline is None:
        return record
    record["started_at"] = timeline.started_at
    record["frames_sent"] = {
        "chunk": timeline.sent_chunk.tolist(),
        "sent_at": timeline.sent_at.tolist(),
        "scheduled_at": timeline.scheduled_at.tolist(),
    }
    record["frames_skipped"] = timeline.frames_skipped
    media = zip(timeline.media_at, timeline.media_bytes, strict=True)
    record["media_received"] = [list(pair) for pair in media]
    record["marks"] = [list(pair) for pair in zip(timeline.mark_at, timeline.mark_names, strict=True)]
    record["clears"] = timeline.clear_at.tolist()
    record["dtmf"] = [list(pair) for pair in timeline.dtmf]
    return record
