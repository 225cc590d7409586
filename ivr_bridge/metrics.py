"""Prometheus metrics for `GET /metrics`.

Per-frame counts are not incremented on the audio path: each call already counts its
frames, so a collector sums the live calls (plus the totals of ended ones) at scrape time.
Histograms are observed at events that happen a few times a call. Labels are bounded:
call outcomes are a fixed set and close codes outside the documented ones become "other";
no call ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ivr_bridge.media_stream import BAD_FRAME_KINDS
from ivr_bridge.providers.base import SKIP_KINDS

if TYPE_CHECKING:
    from ivr_bridge.call import Call
    from ivr_bridge.connections import Unproven
    from ivr_bridge.fabric import Fabric
    from ivr_bridge.hooks import HookDispatcher
    from ivr_bridge.records import CallStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Close codes NextEVI and RFC 6455 document; anything else is counted as "other".
# 1009: a message over the bridge's size limit (a giant TTS chunk).
KNOWN_CLOSE_CODES = frozenset({1001, 1002, 1003, 1006, 1008, 1009, 1011, 4001, 4002, 4003, 4004})
# Bad input by where it came from and what was wrong with it; kinds outside these sets
# (a new one added without updating this) are counted as "other", so labels stay bounded.
BAD_INPUT_KINDS: dict[str, frozenset[str]] = {
    "twilio": frozenset(BAD_FRAME_KINDS),
    "voice_api": frozenset(SKIP_KINDS),
}
# Bad input is logged one line each up to this many per call and source, then only
# counted: a peer sending garbage must not flood the log.
BAD_INPUT_LOG_LIMIT = 20
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
FAST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
LOOP_LAG_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
LOOP_PROBE_S = 0.02  # one timer per 20 ms frame: 50 wake-ups a second, a few µs each


@dataclass
class _Totals:
    frames_in: int = 0
    frames_out: int = 0
    sequence_gaps: int = 0
    chunk_gaps: int = 0
    barge_ins: int = 0
    bad_frames: int = 0
    skipped_upstream: int = 0
    reconnects: int = 0
    renewals: int = 0
    gap_audio_dropped_ms: int = 0
    provider_errors: int = 0

    def add(self, call: Call) -> None:
        for name, value in _call_counts(call):
            setattr(self, name, getattr(self, name) + value)


def _call_counts(call: Call) -> Iterator[tuple[str, int]]:
    s = call.stats
    yield "frames_in", s.frames_in
    yield "frames_out", s.frames_out
    yield "sequence_gaps", call.stream.sequence_gaps
    yield "chunk_gaps", call.stream.chunk_gaps
    yield "barge_ins", s.barge_ins
    yield "bad_frames", s.bad_frames
    yield "skipped_upstream", s.skipped_upstream
    yield "reconnects", s.reconnects
    yield "renewals", s.renewals
    yield "gap_audio_dropped_ms", s.gap_audio_dropped_ms
    yield "provider_errors", s.provider_errors


_COUNTER_HELP = {
    "frames_in": "Media messages received from Twilio",
    "frames_out": "20 ms mu-law frames sent to Twilio",
    "sequence_gaps": "Twilio messages missing by sequenceNumber",
    "chunk_gaps": "Twilio media messages missing by chunk number",
    "barge_ins": "Bot replies cleared because the caller talked over them",
    "bad_frames": "Twilio frames skipped as malformed",
    "skipped_upstream": "Voice API messages skipped as malformed or undecodable",
    "reconnects": "Voice API sessions reopened after a retryable drop",
    "renewals": "Voice API sessions replaced before the provider's session cap",
    "gap_audio_dropped_ms": "Caller audio dropped while the voice API reconnected, in ms",
    "provider_errors": "Error messages the voice API sent (the session went on)",
}


class _LiveCalls(Collector):
    def __init__(self, active: Callable[[], Collection[Call]], ended: _Totals) -> None:
        self._active = active
        self._ended = ended

    def collect(self) -> Iterator[Metric]:
        calls = list(self._active())
        totals = _Totals(**vars(self._ended))
        for call in calls:
            totals.add(call)
        for name, text in _COUNTER_HELP.items():
            yield CounterMetricFamily(f"ivr_{name}", text, value=getattr(totals, name))
        yield GaugeMetricFamily("ivr_active_calls", "Calls in progress", value=len(calls))
        queued_ms = sum(call.playback.unplayed_ms for call in calls)
        yield GaugeMetricFamily(
            "ivr_outbound_audio_queued_seconds",
            "Bot audio sent to Twilio and not yet played (by marks), over all calls",
            value=queued_ms / 1000,
        )


class _Routing(Collector):
    """Hook deliveries and call-record writes, read from their own counters at scrape time."""

    def __init__(self, hooks: HookDispatcher, store: CallStore) -> None:
        self._hooks = hooks
        self._store = store

    def collect(self) -> Iterator[Metric]:
        deliveries = CounterMetricFamily(
            "ivr_hook_deliveries",
            "Hook deliveries by result: delivered, retried (attempts that failed and were "
            "retried), failed (given up) and dropped (queue full)",
            labels=["result"],
        )
        for result, value in vars(self._hooks.stats).items():
            deliveries.add_metric([result], value)
        yield deliveries
        yield GaugeMetricFamily("ivr_hook_queued", "Hook deliveries waiting", value=self._hooks.pending)
        yield GaugeMetricFamily(
            "ivr_records_queued",
            "Call events waiting to be written to the records",
            value=self._store.pending,
        )
        yield CounterMetricFamily(
            "ivr_records_dropped",
            "Call events not recorded (queue full, or refused by the database)",
            value=self._store.dropped,
        )
        yield CounterMetricFamily(
            "ivr_records_write_failures",
            "Failed attempts to write call events (the database down); the events stay queued",
            value=self._store.write_failures,
        )
        yield CounterMetricFamily(
            "ivr_records_file_recoveries",
            "SQLite records files found deleted, emptied or damaged under the running bridge, "
            "moved aside and started anew",
            value=self._store.file_recoveries,
        )


class _Connections(Collector):
    """Connections not yet proven to come from Twilio, and those the guard closed."""

    def __init__(self, unproven: Unproven) -> None:
        self._unproven = unproven

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ivr_unproven_connections",
            "Connections not yet proven to come from Twilio (HTTP requests not yet read, "
            "Media Streams before an admitted start)",
            value=len(self._unproven),
        )
        closed = CounterMetricFamily(
            "ivr_connections_closed",
            "Connections closed or refused by the guard, by reason: evicted (to make room), "
            "request_timeout, start_timeout, too_large",
            labels=["reason"],
        )
        for reason, value in self._unproven.closed.items():
            closed.add_metric([reason], value)
        yield closed


class _Fabric(Collector):
    def __init__(self, fabric: Fabric) -> None:
        self._fabric = fabric

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ivr_fabric_up",
            "1 while Redis (IVR_REDIS_URL) answers; 0: acting alone",
            value=int(self._fabric.up),
        )
        yield CounterMetricFamily(
            "ivr_fabric_errors",
            "Redis operations that failed (the instance acted alone)",
            value=self._fabric.errors,
        )
        yield CounterMetricFamily(
            "ivr_fabric_events_dropped",
            "Call events not shared with the other instances' live pages: the outbox was full "
            "(Redis slow or away). Hooks and records are not affected.",
            value=self._fabric.events_dropped,
        )


class BridgeMetrics:
    """The metrics of one bridge instance, in a registry of their own."""

    def __init__(self, active_calls: Callable[[], Collection[Call]]) -> None:
        self.registry = CollectorRegistry()
        self._ended = _Totals()
        self.registry.register(_LiveCalls(active_calls, self._ended))
        self._calls = Counter("ivr_calls", "Calls ended, by outcome", ["outcome"], registry=self.registry)
        self._upstream_errors = Counter(
            "ivr_upstream_errors",
            "Voice API sessions that failed, by WebSocket close code ('connect': never opened)",
            ["code"],
            registry=self.registry,
        )
        self._bad_input = Counter(
            "ivr_bad_input",
            "Malformed input skipped or refused, by source (twilio, voice_api) and kind",
            ["source", "kind"],
            registry=self.registry,
        )
        # Every series exists from the start, so a rate() sees the first one.
        for source, kinds in BAD_INPUT_KINDS.items():
            for kind in (*sorted(kinds), "other"):
                self._bad_input.labels(source, kind)
        self._connect = Histogram(
            "ivr_upstream_connect_seconds",
            "Time to open a voice API session",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._reply = Histogram(
            "ivr_reply_latency_seconds",
            "End of the caller's turn (voice API's final transcript or turn end) to the first "
            "reply audio sent to Twilio",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._turn = Histogram(
            "ivr_turn_stage_seconds",
            "A cascade's turn, by stage: caller stopped -> final transcript (recognised), -> "
            "first text of the dialogue step (answered), -> first bot audio (spoken); total",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._barge_in = Histogram(
            "ivr_barge_in_stop_seconds",
            "Voice API interruption received to Twilio clear sent",
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )

        self._loop_lag = Histogram(
            "ivr_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 20 ms: how long every call's "
            "audio waited behind other work",
            buckets=LOOP_LAG_BUCKETS,
            registry=self.registry,
        )
        self._control = Counter(
            "ivr_control_actions",
            "Transfers and hang-ups carried out, by action, source (api, hook, dtmf) and result",
            ["action", "source", "result"],
            registry=self.registry,
        )

    def watch_routing(self, hooks: HookDispatcher, store: CallStore) -> None:
        self.registry.register(_Routing(hooks, store))

    def watch_fabric(self, fabric: Fabric) -> None:
        self.registry.register(_Fabric(fabric))

    def watch_connections(self, unproven: Unproven) -> None:
        self.registry.register(_Connections(unproven))

    async def watch_event_loop(self, every: float = LOOP_PROBE_S) -> None:
        """Observe the loop's lag until cancelled (the app runs it for its lifetime)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + every
            await asyncio.sleep(every)
            self._loop_lag.observe(max(0.0, loop.time() - due))

    def controlled(self, action: str, source: str, result: str) -> None:
        self._control.labels(action, source, result).inc()

    def bad_input(self, source: str, kind: str) -> None:
        """Count one skipped Twilio frame ("twilio") or voice API message ("voice_api")."""
        kinds = BAD_INPUT_KINDS.get(source)
        if kinds is None:
            return
        self._bad_input.labels(source, kind if kind in kinds else "other").inc()

    def upstream_connected(self, seconds: float) -> None:
        self._connect.observe(seconds)

    def upstream_failed(self, code: int | None) -> None:
        label = "connect" if code is None else str(code) if code in KNOWN_CLOSE_CODES else "other"
        self._upstream_errors.labels(label).inc()

    def reply_started(self, latency: float) -> None:
        self._reply.observe(latency)

    def reply_buckets(self) -> list[tuple[float, float]]:
        """The reply-latency histogram as (upper bound, cumulative count) pairs, for the
        dashboard's chart: the same data a scrape of /metrics gives."""
        samples = self._reply.collect()[0].samples
        return [(float(s.labels["le"]), s.value) for s in samples if s.name.endswith("_bucket")]

    def turn_timed(self, stages: dict[str, float]) -> None:
        """A cascade turn's stages, in ms (`TurnTiming`)."""
        for stage, ms in stages.items():
            self._turn.labels(stage).observe(ms / 1000)

    def barged_in(self, stop_seconds: float) -> None:
        self._barge_in.observe(stop_seconds)

    def call_ended(self, call: Call) -> None:
        self._ended.add(call)
        self._calls.labels(str(call.outcome)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def histogram_quantile(
    q: float, now: list[tuple[float, float]], before: list[tuple[float, float]] | None = None
) -> float | None:
    """The q-quantile of what a cumulative histogram observed between two readings (or in
    all), interpolated within its bucket as Prometheus' histogram_quantile() does; None
    when nothing was observed."""
    counts = [(le, n - (before[i][1] if before else 0.0)) for i, (le, n) in enumerate(now)]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, cumulative in counts:
        if cumulative >= rank:
            if le == float("inf"):
                return lower  # beyond the last finite bucket: its bound is all that is known
            inside = cumulative - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, cumulative
    return lower
