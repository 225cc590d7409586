"""Many scripted calls from one asyncio process, and what they measured together.

Schedule: `calls` calls, at most `concurrency` at once; the first `concurrency` start
evenly spread over `ramp_s` seconds, then each new call starts as soon as one finishes.
Every call posts the webhook (its own CallSid) and streams like Twilio. The first
call's webhook is fetched before anything else starts, so an unreachable or misconfigured
webhook is one clear error instead of N failed calls.

The generator measures itself: each caller frame's send lateness (actual send time minus
its slot on the 20 ms clock) is summarised next to the bridge's latencies, so a slow
generator is never mistaken for a slow bridge.

JSON summary (``ivr-bridge loadtest --json``); stable keys, times in ms unless named ``_s``;
SUMMARY is ``{"count", "p50", "p95", "p99", "max"}`` with nulls when count is 0::

    {"webhook": str, "scenario": str,
     "settings": {"calls": int, "concurrency": int, "ramp_s": float},
     "calls": {"total": int, "ok": int, "failed": int, "without_bot_audio": int},
     "failures": {reason: count},              # failed calls grouped by reason
     "latency_ms": {"first_audio": SUMMARY,     # start sent -> first bot media
                    "reply": SUMMARY,           # end of each utterance -> first bot media after it
                    "barge_in_stop": SUMMARY,   # first barge-in frame sent -> clear received
                    "send_lateness": SUMMARY},  # the generator's own frames, all calls
     "frames": {"sent": int, "lost": int, "calls_with_lost": int},
     "media": {"received": int, "bytes": int, "marks_played": int, "marks_flushed": int, "clears": int},
     "violations": {"total": int, "kinds": {text: count}},  # digits in texts replaced by N
     "generator": {"wall_s": float, "cpu_s": float, "cpu_percent": float, "slow": bool}}

``slow`` is true when the send lateness p99 exceeds :data:`SLOW_GENERATOR_MS`; a frame later
than 100 ms (or skipped) is *lost*.

Timeline file (``--timeline FILE``): one JSON object per line and call, in completion
order, written after the run (so writing never delays a live call). All times are
``time.monotonic()`` seconds, the same clock across processes on Linux, to be joined
with other processes' stamps::

    {"call_sid": str, "scenario": str, "outcome": "completed" | "failed", "reason": str | null,
     "placed_at": float,                 # before the webhook was posted
     "started_at": float | null,         # the Media Stream `start` message sent
     "frames_sent": {"chunk": [int], "sent_at": [float], "scheduled_at": [float]},  # parallel
     "frames_skipped": int,              # never sent: the clock fell > 100 ms behind
     "media_received": [[at, bytes]], "marks": [[at, name]], "clears": [at], "dtmf": [[at, digit]],
     "utterances": [UTTERANCE],          # every say and barge_in, in order
     "barge_ins": [UTTERANCE]}           # the barge_ins again

    UTTERANCE = {"step": int (1-based), "kind": "say" | "barge_in", "clip": file name,
                 "first_chunk": int, "last_chunk": int, "started_at": float, "ended_at": float,
                 "reply_latency_ms": float | null, "stop_ms": float | null}

``ended_at`` is the send time of the utterance's last frame (end of speech; clips are
trimmed of trailing silence); a frame's chunk number matches ``media.chunk`` on the wire.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ivr_bridge.loadgen.call_report import CallReport
from ivr_bridge.loadgen.scenario import Scenario
from ivr_bridge.loadgen.scripted_call import place_call
from ivr_bridge.loadgen.stats import summarize
from ivr_bridge.loadgen.webhook import CallDetails, fetch_stream
from ivr_bridge.standins.timeline import CallerTimeline

SLOW_GENERATOR_MS = 5.0


@dataclass(frozen=True, slots=True)
class LoadPlan:
    webhook_url: str
    scenario: Scenario
    calls: int
    concurrency: int
    ramp_s: float = 0.0
    from_number: str = "+15550100001"
    to_number: str = "+15550100002"
    auth_token: str | None = None


@dataclass(slots=True)
class Progress:
    done: int = 0
    ok: int = 0
    failed: int = 0
    active: int = 0


@dataclass(slots=True)
class LoadResult:
    plan: LoadPlan
    reports: list[CallReport] = field(default_factory=list)
    timelines: list[CallerTimeline | None] = field(default_factory=list)  # when kept, per report
    wall_s: float = 0.0
    cpu_s: float = 0.0


async def run_load(
    plan: LoadPlan,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    keep_timelines: bool = False,
) -> LoadResult:
    """Run the plan. Raises WebhookError if the first call's webhook fails."""
    result = LoadResult(plan)
    progress = Progress()
    details = [_details(plan) for _ in range(plan.calls)]
    first_target = await fetch_stream(plan.webhook_url, details[0], plan.auth_token) if plan.calls else None
    wall, cpu = time.monotonic(), time.process_time()
    pending = iter(range(plan.calls))  # shared by the workers: a call starts when one ends
    workers = min(plan.concurrency, plan.calls)

    def changed() -> None:
        if on_progress is not None:
            on_progress(progress)

    async def worker(slot: int) -> None:
        await asyncio.sleep(slot * plan.ramp_s / workers)
        for index in pending:
            progress.active += 1
            changed()
            report, caller = await place_call(
                plan.webhook_url,
                plan.scenario,
                details[index],
                plan.auth_token,
                target=first_target if index == 0 else None,
            )
            progress.active -= 1
            progress.done += 1
            if report.ok:
                progress.ok += 1
            else:
                progress.failed += 1
            result.reports.append(report)
            if keep_timelines:
                result.timelines.append(caller.timeline if caller is not None else None)
            changed()

    await asyncio.gather(*(worker(slot) for slot in range(workers)))
    result.wall_s = time.monotonic() - wall
    result.cpu_s = time.process_time() - cpu
    return result


def _details(plan: LoadPlan) -> CallDetails:
    return CallDetails(from_number=plan.from_number, to_number=plan.to_number)


def violation_kind(text: str) -> str:
    """A violation's text without its numbers, so the same fault groups across calls."""
    return re.sub(r"\d+", "N", text)


def latency_samples(result: LoadResult) -> dict[str, np.ndarray]:
    """Every latency sample of the run in ms, keyed as in the summary's ``latency_ms``."""
    reports = result.reports

    def samples(values: list[float]) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    return {
        "first_audio": samples([r.first_audio_ms for r in reports if r.first_audio_ms is not None]),
        "reply": samples([v for r in reports for v in r.reply_latencies_ms]),
        "barge_in_stop": samples([v for r in reports for v in r.barge_in_stops_ms]),
        "send_lateness": np.concatenate([r.send_lateness_ms for r in reports]) if reports else np.empty(0),
    }


def summarize_load(result: LoadResult) -> dict[str, Any]:
    """The JSON summary documented in this module's docstring."""
    reports = result.reports
    plan = result.plan
    latency = {name: summarize(values) for name, values in latency_samples(result).items()}
    violations = Counter(violation_kind(v) for r in reports for v in r.violations)
    return {
        "webhook": plan.webhook_url,
        "scenario": plan.scenario.name,
        "settings": {"calls": plan.calls, "concurrency": plan.concurrency, "ramp_s": plan.ramp_s},
        "calls": {
            "total": len(reports),
            "ok": sum(r.ok for r in reports),
            "failed": sum(not r.ok for r in reports),
            "without_bot_audio": sum(r.first_audio_ms is None for r in reports),
        },
        "failures": dict(Counter(r.reason for r in reports if r.reason is not None).most_common()),
        "latency_ms": {
            name: summary.as_dict(3 if name == "send_lateness" else 2) for name, summary in latency.items()
        },
        "frames": {
            "sent": sum(r.frames_sent for r in reports),
            "lost": sum(r.frames_lost for r in reports),
            "calls_with_lost": sum(r.frames_lost > 0 for r in reports),
        },
        "media": {
            "received": sum(r.media_received for r in reports),
            "bytes": sum(r.bytes_received for r in reports),
            "marks_played": sum(r.marks_played for r in reports),
            "marks_flushed": sum(r.marks_flushed for r in reports),
            "clears": sum(r.clears for r in reports),
        },
        "violations": {"total": sum(violations.values()), "kinds": dict(violations.most_common())},
        "generator": {
            "wall_s": round(result.wall_s, 3),
            "cpu_s": round(result.cpu_s, 3),
            "cpu_percent": round(100 * result.cpu_s / result.wall_s, 1) if result.wall_s > 0 else 0.0,
            "slow": (latency["send_lateness"].p99 or 0.0) > SLOW_GENERATOR_MS,
        },
    }
