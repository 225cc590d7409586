"""Reports for people and programs: one call's report, and a load test's summary table."""

from __future__ import annotations

from typing import Any

from ivr_bridge.loadgen.call_report import CallReport
from ivr_bridge.loadgen.loadtest import SLOW_GENERATOR_MS
from ivr_bridge.loadgen.stats import summarize

_LATENCY_ROWS = (
    ("first_audio", "time to first bot audio"),
    ("reply", "reply latency"),
    ("barge_in_stop", "barge-in stop time"),
    ("send_lateness", "generator send lateness"),
)


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} ms"


def call_json(report: CallReport) -> dict[str, Any]:
    """One call as a JSON object (``ivr-bridge call --json``)."""
    lateness = summarize(report.send_lateness_ms)
    return {
        "call_sid": report.call_sid,
        "scenario": report.scenario,
        "outcome": report.outcome,
        "reason": report.reason,
        "duration_s": round(report.duration_s, 3),
        "first_audio_ms": None if report.first_audio_ms is None else round(report.first_audio_ms, 2),
        "reply_latency_ms": [round(v, 2) for v in report.reply_latencies_ms],
        "barge_in_stop_ms": [None if u.stop_ms is None else round(u.stop_ms, 2) for u in report.barge_ins],
        "utterances": [u.as_dict() for u in report.utterances],
        "frames_sent": report.frames_sent,
        "frames_lost": report.frames_lost,
        "media_received": report.media_received,
        "bytes_received": report.bytes_received,
        "bytes_heard": report.bytes_heard,
        "marks_played": report.marks_played,
        "marks_flushed": report.marks_flushed,
        "clears": report.clears,
        "send_lateness_ms": {
            "p50": _round(lateness.p50),
            "p99": _round(lateness.p99),
            "max": _round(lateness.max),
        },
        "violations": list(report.violations),
        "errors": list(report.errors),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def call_text(report: CallReport) -> str:
    outcome = report.outcome if report.reason is None else f"{report.outcome}: {report.reason}"
    lateness = summarize(report.send_lateness_ms)
    lines = [
        f"call {report.call_sid} ({report.scenario}): {outcome}",
        f"  duration                {report.duration_s:.2f} s",
        f"  time to first bot audio {_ms(report.first_audio_ms)}",
    ]
    for u in report.utterances:
        lines.append(f"  step {u.step:<2} {u.kind:<8} {u.clip}: reply latency {_ms(u.reply_latency_ms)}")
        if u.kind == "barge_in":
            stop = _ms(u.stop_ms) if u.stop_ms is not None else "no clear received"
            lines.append(f"           barge-in stop time {stop}")
    lines += [
        f"  frames sent {report.frames_sent} (lost {report.frames_lost}); media received "
        f"{report.media_received} ({report.bytes_received} bytes, {report.bytes_heard} heard); marks played "
        f"{report.marks_played}, flushed {report.marks_flushed}; clears {report.clears}",
        f"  send lateness           p50 {_ms(lateness.p50, 2)}, p99 {_ms(lateness.p99, 2)}, "
        f"max {_ms(lateness.max, 2)}",
        f"  violations              {len(report.violations) or 'none'}",
        *(f"    {v}" for v in report.violations),
    ]
    lines += [f"  error: {e}" for e in report.errors]
    return "\n".join(lines)


def load_text(summary: dict[str, Any]) -> str:
    """The load test's summary (as :func:`~ivr_bridge.loadgen.loadtest.summarize_load`) as a table."""
    calls, frames, media, gen = summary["calls"], summary["frames"], summary["media"], summary["generator"]
    lines = [
        f"{summary['scenario']}: {calls['total']} calls, {calls['ok']} ok, {calls['failed']} failed "
        f"in {gen['wall_s']:.1f} s; generator CPU {gen['cpu_s']:.1f} s "
        f"({gen['cpu_percent']:.0f} % of one core)",
        "",
        f"{'':<26}{'count':>8}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}  (ms)",
    ]
    for key, title in _LATENCY_ROWS:
        row = summary["latency_ms"][key]
        digits = 2 if key == "send_lateness" else 1
        cells = "".join(
            f"{'-' if row[p] is None else f'{row[p]:.{digits}f}':>10}" for p in ("p50", "p95", "p99", "max")
        )
        lines.append(f"{title:<26}{row['count']:>8}{cells}")
    lines += [
        "",
        f"frames sent {frames['sent']}, lost {frames['lost']} (in {frames['calls_with_lost']} calls); "
        f"media received {media['received']} ({media['bytes']} bytes); marks played "
        f"{media['marks_played']}, flushed {media['marks_flushed']}; clears {media['clears']}",
        f"calls without any bot audio: {calls['without_bot_audio']}",
    ]
    lines.append("failures: " + ("none" if not summary["failures"] else ""))
    lines += [f"  {count:>5} x {reason}" for reason, count in summary["failures"].items()]
    lines.append("violations: " + ("none" if not summary["violations"]["kinds"] else ""))
    lines += [f"  {count:>5} x {kind}" for kind, count in summary["violations"]["kinds"].items()]
    if gen["slow"]:
        p99 = summary["latency_ms"]["send_lateness"]["p99"]
        lines.append(
            f"WARNING: the generator itself sent frames late (p99 {p99:.2f} ms > {SLOW_GENERATOR_MS:g} ms): "
            "it is overloaded, and latencies above include its delay; use fewer calls or another machine"
        )
    return "\n".join(lines)
