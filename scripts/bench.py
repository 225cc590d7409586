"""Whole-bridge benchmark: a ladder of concurrent calls through three separate processes.

For each concurrency level it starts a NextEVI-protocol stand-in (`ivr-bridge
stub-voice-api`), the bridge (`ivr-bridge serve`, provider nextevi pointed at the stand-in)
and the load generator (`ivr-bridge loadtest`), each its own process on this machine,
and records:

- bridge CPU seconds per call-minute (utime + stime of the bridge process, /proc);
- bridge peak RSS per call (VmHWM minus the idle RSS, over the level's concurrency);
- bridge-added latency, caller -> voice API: the stand-in's arrival time of each upstream
  audio message minus the caller's send time of the last 20 ms frame it contains (so the
  `IVR_UPSTREAM_CHUNK_MS` batching is not counted, only what the bridge adds);
- bridge-added latency, voice API -> caller: the stand-in's send time of each tts_chunk to
  the caller's arrival time of the first media after it;
- tts_interruption -> clear: the stand-in's send time to the caller's arrival time;
- frames lost in each direction; calls completed; the generator's own send lateness, and
  the CPU-s per call-minute of the generator and the stand-in (they share the cores);
- with `--hooks`, hook deliveries to a receiver process (`ivr-bridge hook-receiver`).

The bridge runs as shipped: every call is written to its records (SQLite, in the work
folder).

Timestamps come from `time.monotonic()` in the caller and the stand-in, one clock for all
processes on Linux. Both include their own event-loop delays, so the figures are an upper
bound on what the bridge adds.

    .venv/bin/python scripts/bench.py                          # the default ladder
    .venv/bin/python scripts/bench.py --levels 50,100 --json   # chosen levels, JSON out
    .venv/bin/python scripts/bench.py --provider openai        # the mu-law pass-through path

`--peer pipecat` runs every level three times, one bridge after another on the same callers
and stand-in: ivr-bridge, a Pipecat 1.14 pipeline doing the same job
(`scripts/peers/pipecat_bridge.py`, in a virtual environment of its own under `.bench/`,
made on first use), and the bare relay (`scripts/peers/relay.py`: asyncio, uvloop and
websockets, no filtering), and prints them side by side with the CPU ratios:

    .venv/bin/python scripts/bench.py --peer pipecat --levels 100 --chunk-ms 20

`--provider nextevi` (the default) is the converted path: PCM16 24 kHz up, WAV chunks down.
`--provider openai` is the pass-through path: the caller's mu-law goes up untouched and the
stand-in's `audio/pcmu` deltas come down only re-framed. `--provider both` runs every level
on each path, one after the other, and prints the pass-through path's CPU against the 24 kHz
path's (issue 10's measure, "in the same run"):

    .venv/bin/python scripts/bench.py --provider both --levels 100 --chunk-ms 20 --rounds 3

Those two paths are two voice APIs, each with its own messages. `--provider elevenlabs`
(the agent's format `ulaw_8000`, passed through) and `--provider elevenlabs-pcm24`
(`pcm_24000` both ways, converted) are one protocol at two formats, and
`--provider elevenlabs-both` compares them as `both` does: only the audio path differs.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from processes import ROOT, cpu_seconds, free_port, percentiles, spawn, status_kib, stop

SCENARIO = ROOT / "examples" / "scenarios" / "load.json"
API_KEY = "oak_bench_key"
CONFIG_ID = "cfg_bench"
PCM_BYTES_PER_FRAME = 960  # 20 ms of 24 kHz PCM16 (a stand-in's timeline may say otherwise)
LIMIT_MS = 20.0  # p99 bridge-added latency allowed at the capacity level (--limit-ms)
HOOK_SECRET = "bench-hook-secret"


# Each --provider: the bridge's IVR_PROVIDER, the stand-in's options, and the path it is.
PROVIDERS = {
    "nextevi": ("nextevi", ["--api-key", API_KEY, "--config-id", CONFIG_ID], "24 kHz"),
    "openai": ("openai", ["--api-key", API_KEY], "pass-through"),
    "elevenlabs": ("elevenlabs", ["--agent-format", "ulaw_8000"], "pass-through (ElevenLabs)"),
    "elevenlabs-pcm24": ("elevenlabs", ["--agent-format", "pcm_24000"], "24 kHz (ElevenLabs)"),
}
# The paths compared side by side: (pass-through, 24 kHz), run in this order first.
PAIRS = {"both": ("openai", "nextevi"), "elevenlabs-both": ("elevenlabs", "elevenlabs-pcm24")}
PEERS = ("pipecat", "relay")  # --peer pipecat runs both beside ivr-bridge
BEFORE = "before"  # --against: ivr-bridge from another checkout, the unchanged code
OWN = ("ivr-bridge", BEFORE)
RUNS = itertools.count(1)
PIPECAT = "pipecat-ai[websocket]==1.14.0"  # the version the figures in BENCHMARKS.md were taken with
# Its websocket extra brings FastAPI but no server.
PEER_PACKAGES = (PIPECAT, "uvicorn==0.54.0", "uvloop")
PEER_VENV = ROOT / ".bench" / "pipecat-venv"  # made on first use (about 530 MB)


@dataclass
class Level:
    concurrency: int
    bridge: str = "ivr-bridge"  # or one of PEERS
    provider: str = "nextevi"  # the voice API's stand-in, so the audio path (PROVIDERS)
    limit_ms: float = LIMIT_MS
    calls_ok: int = 0
    calls_failed: int = 0
    call_minutes: float = 0.0
    cpu_seconds: float = 0.0
    cpu_per_call_minute: float = 0.0
    # The other two processes on the same cores: what they take is not the bridge's.
    generator_cpu_per_call_minute: float = 0.0
    standin_cpu_per_call_minute: float = 0.0
    rss_idle_mb: float = 0.0
    rss_peak_mb: float = 0.0
    hooks_delivered: int = 0
    hooks_failed: int = 0
    events_on_record: int = 0
    rss_per_call_mb: float = 0.0
    inbound_ms: dict[str, float] = field(default_factory=dict)
    outbound_ms: dict[str, float] = field(default_factory=dict)
    clear_ms: dict[str, float] = field(default_factory=dict)
    # From the bridge's own histogram: interruption received -> clear sent.
    clear_in_bridge_p99_ms_at_most: float | None = None
    clear_in_bridge_within_5ms: float | None = None
    frames_lost_in: int = 0
    frames_lost_out: int = 0
    reply_audio_pct: float = 0.0  # bot audio the callers received, of what the voice API sent
    violations: int = 0
    generator_lateness_ms: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def within_limits(self) -> bool:
        return (
            self.calls_failed == 0
            and self.calls_ok == self.concurrency
            and self.frames_lost_in == 0
            and self.frames_lost_out == 0
            and self.inbound_ms.get("p99", math.inf) <= self.limit_ms
            and self.outbound_ms.get("p99", math.inf) <= self.limit_ms
        )


# -- processes -------------------------------------------------------------------------


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except (httpx.TransportError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"bench: {what} did not happen within {timeout} s")


# -- joining the two timelines -------------------------------------------------------------


def read_lines(path: Path, event: str | None = None) -> list[dict]:
    """A JSON-lines file's records (only those of `event`, for the stand-in's timeline)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if event is None or r.get("event") == event]


def joined(callers: list[dict], sessions: list[dict]) -> Iterator[tuple[dict, dict]]:
    """Pairs (caller record, stand-in session) by call sid: the bridge leads the voice API
    connection id with the call sid."""
    by_sid = {s["connection_id"].split("-", 1)[0]: s for s in sessions}
    for caller in callers:
        session = by_sid.get(caller["call_sid"])
        if session is not None:
            yield caller, session


def inbound_latencies(caller: dict, session: dict) -> list[float]:
    sent_at = caller_frame_times(caller)
    frame_bytes = session.get("frame_bytes", PCM_BYTES_PER_FRAME)
    out = []
    for arrived, total in zip(session["audio_at"], session["audio_bytes"], strict=True):
        last_frame = total // frame_bytes  # frames are numbered from 1
        if 0 < last_frame <= len(sent_at):
            out.append((arrived - sent_at[last_frame - 1]) * 1000)
    return out


def outbound_latencies(caller: dict, session: dict) -> list[float]:
    arrivals = [at for at, _ in caller_media(caller)]
    out = []
    for sent in session["tts_at"]:
        i = bisect.bisect_left(arrivals, sent)
        if i < len(arrivals):
            out.append((arrivals[i] - sent) * 1000)
    return out


def clear_latencies(caller: dict, session: dict) -> list[float]:
    clears = sorted(caller_clears(caller))
    out = []
    for sent in session["interruptions_at"]:
        i = bisect.bisect_left(clears, sent)
        if i < len(clears):
            out.append((clears[i] - sent) * 1000)
    return out


def frames_lost(caller: dict, session: dict, chunk_frames: int) -> tuple[int, int]:
    """(caller frames that never reached the voice API, bot frames that never reached the
    caller). The bridge holds back at most one upstream chunk when the call ends."""
    sent = len(caller_frame_times(caller))
    frame_bytes = session.get("frame_bytes", PCM_BYTES_PER_FRAME)
    received = (session["audio_bytes"][-1] if session["audio_bytes"] else 0) // frame_bytes
    lost_in = max(0, sent - received - (chunk_frames - 1))
    # Every tts_chunk the stand-in sent reached the caller unless the bridge lost it: the
    # stand-in stops a reply at its tts_interruption, and flushed audio was still received.
    expected_out = int(sum(session["tts_ms"]) // 20)
    got_out = sum(size for _, size in caller_media(caller)) // 160
    lost_out = max(0, expected_out - got_out)
    return lost_in, lost_out


# Accessors for the load generator's timeline format (kept in one place).
def caller_frame_times(caller: dict) -> list[float]:
    # The k-th frame sent is the k-th the bridge received (a frame the generator skipped
    # never left it), which is what the stand-in's byte count gives.
    frames = caller["frames_sent"]
    return [sent for _, sent in sorted(zip(frames["chunk"], frames["sent_at"], strict=True))]


def caller_media(caller: dict) -> list[tuple[float, int]]:
    return [(at, size) for at, size in caller["media_received"]]


def caller_clears(caller: dict) -> list[float]:
    return list(caller["clears"])


def bridge_clear_times(level: Level, metrics_text: str) -> None:
    """p99 (as the histogram bucket it falls in) and share within 5 ms of the bridge's own
    interruption -> clear time."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "ivr_barge_in_stop_seconds":
            buckets = sorted(
                (float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")
            )
    if not buckets or buckets[-1][1] == 0:
        return
    total = buckets[-1][1]
    level.clear_in_bridge_p99_ms_at_most = next(le for le, n in buckets if n >= 0.99 * total) * 1000
    level.clear_in_bridge_within_5ms = round(dict(buckets).get(0.005, 0.0) / total, 4)


def metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def count_events(database: Path) -> int:
    """Call events on record (the bridge has stopped, so its writer has caught up)."""
    import sqlite3

    with sqlite3.connect(database) as db:
        return int(db.execute("SELECT count(*) FROM ivr_call_events").fetchone()[0])


# -- one level ---------------------------------------------------------------------------


def peer_venv() -> Path:
    """The Pipecat peer's own virtual environment (its dependencies are not ours)."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    # Checked each run, not only when the folder is new: an install cut short leaves a venv.
    if subprocess.run([str(python), "-c", "import pipecat, uvicorn, uvloop"], capture_output=True).returncode:
        print(f"bench: installing {PIPECAT} into {PEER_VENV} (once)", file=sys.stderr, flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PEER_PACKAGES],
            check=True,
        )
    return python


def spawn_peer(name: str, provider: str, port: int, standin_port: int, log: Path) -> subprocess.Popen[bytes]:
    python = peer_venv() if name == "pipecat" else Path(sys.executable)
    script = ROOT / "scripts" / "peers" / ("pipecat_bridge.py" if name == "pipecat" else "relay.py")
    path = "/v1/realtime" if provider == "openai" else "/ws/voice"
    command = [
        str(python), str(script),
        "--provider", provider,
        "--port", str(port),
        "--voice-url", f"ws://127.0.0.1:{standin_port}{path}",
        "--api-key", API_KEY,
        "--config-id", CONFIG_ID,
    ]  # fmt: skip
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def run_level(
    concurrency: int, args: argparse.Namespace, workdir: Path, bridge_name: str = "ivr-bridge"
) -> Level:
    level = Level(concurrency, bridge_name, args.provider, args.limit_ms)
    standin_port, bridge_port = free_port(), free_port()
    if bridge_name == "relay":
        while True:  # the relay serves its streams on the next port
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", bridge_port + 1))
                    break
                except OSError:
                    bridge_port = free_port()
    tag = f"{bridge_name}-{concurrency}-{next(RUNS)}"  # each run its own timelines and logs
    standin_timeline = workdir / f"standin-{tag}.jsonl"
    caller_timeline = workdir / f"callers-{tag}.jsonl"
    provider, standin_options, _ = PROVIDERS[args.provider]
    standin = spawn(
        [
            "stub-voice-api",
            "--provider", provider,
            "--port", str(standin_port),
            *standin_options,
            "--reply-ms", str(args.reply_ms),
            "--think-ms", str(args.think_ms),
            "--timeline", str(standin_timeline),
        ],
        log=workdir / f"standin-{tag}.log",
    )  # fmt: skip
    voice_api = {
        "nextevi": {
            "NEXTEVI_URL": f"ws://127.0.0.1:{standin_port}/ws/voice",
            "NEXTEVI_API_KEY": API_KEY,
            "NEXTEVI_CONFIG_ID": CONFIG_ID,
        },
        "openai": {
            "OPENAI_REALTIME_URL": f"ws://127.0.0.1:{standin_port}/v1/realtime",
            "OPENAI_API_KEY": API_KEY,
        },
        "elevenlabs": {
            "ELEVENLABS_URL": f"ws://127.0.0.1:{standin_port}/v1/convai/conversation",
            "ELEVENLABS_AGENT_ID": "agent_test",  # the stand-in's agent
        },
    }[provider]
    hooks: dict[str, str] = {}
    receiver = None
    if args.hooks:
        hook_port = free_port()
        receiver = spawn(
            ["hook-receiver", "--port", str(hook_port), "--secret", HOOK_SECRET],
            log=workdir / f"hooks-{tag}.log",
        )
        hooks = {"IVR_HOOK_URL": f"http://127.0.0.1:{hook_port}/", "IVR_HOOK_SECRET": HOOK_SECRET}
    database = workdir / f"calls-{tag}.db"
    if bridge_name in OWN:
        bridge = spawn(
            ["serve", "--port", str(bridge_port), "--log-level", "WARNING"],
            env={
                **hooks,
                "IVR_DATABASE_PATH": str(database),
                "IVR_PROVIDER": provider,
                **voice_api,
                "IVR_UPSTREAM_CHUNK_MS": str(args.chunk_ms),
                "IVR_MAX_CALLS": str(max(concurrency, 10)),  # the default cap would refuse the rest
            },
            log=workdir / f"bridge-{tag}.log",
            cwd=args.against if bridge_name == BEFORE else ROOT,
        )
    else:
        bridge = spawn_peer(
            bridge_name, args.provider, bridge_port, standin_port, workdir / f"bridge-{tag}.log"
        )
    base = f"http://127.0.0.1:{bridge_port}"
    try:
        if bridge_name in OWN:
            wait_until(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200, 30, "bridge start")
        else:
            wait_until(
                lambda: socket.create_connection(("127.0.0.1", bridge_port), timeout=1), 60, "peer start"
            )
        wait_until(
            lambda: socket.create_connection(("127.0.0.1", standin_port), timeout=1), 30, "stand-in start"
        )
        level.rss_idle_mb = status_kib(bridge.pid, "VmRSS") / 1024
        cpu_before = cpu_seconds(bridge.pid)
        standin_cpu_before = cpu_seconds(standin.pid)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        ramp = args.ramp if args.ramp is not None else min(15.0, concurrency * 0.05)
        result = subprocess.run(
            [
                sys.executable, "-m", "ivr_bridge", "loadtest", f"{base}/twiml",
                "--calls", str(concurrency),
                "--concurrency", str(concurrency),
                "--ramp", str(ramp),
                "--scenario", str(args.scenario),
                "--timeline", str(caller_timeline),
                "--json", "--no-progress",
            ],
            capture_output=True, text=True, cwd=ROOT, timeout=args.timeout,
        )  # fmt: skip
        level.cpu_seconds = cpu_seconds(bridge.pid) - cpu_before
        standin_cpu = cpu_seconds(standin.pid) - standin_cpu_before
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # only the generator has ended
        generator_cpu = (children.ru_utime + children.ru_stime) - (
            children_before.ru_utime + children_before.ru_stime
        )
        level.rss_peak_mb = status_kib(bridge.pid, "VmHWM") / 1024
        if bridge_name in OWN:
            metrics = httpx.get(f"{base}/metrics", timeout=10).text
            bridge_clear_times(level, metrics)
            level.hooks_failed = int(metric(metrics, 'ivr_hook_deliveries_total{result="failed"}'))
        report = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
        if not report:
            raise SystemExit(
                f"bench: loadtest printed no JSON (exit {result.returncode}): {result.stderr[-500:]}"
            )
        # Sessions write their timeline when they close, right after their calls end.
        wait_until(
            lambda: len(read_lines(standin_timeline, "session")) >= concurrency,
            30,
            "stand-in sessions closing",
        )
    finally:
        stop(bridge)  # drains: the records and the hooks get the calls' last events
        stop(standin)
        if receiver is not None:
            stop(receiver)
    level.events_on_record = count_events(database) if database.exists() else 0
    if args.hooks:
        log_lines = (workdir / f"hooks-{tag}.log").read_text().splitlines()
        level.hooks_delivered = sum(line.startswith("{") for line in log_lines)
    summarise(
        level,
        report,
        read_lines(caller_timeline),
        read_lines(standin_timeline, "session"),
        args.chunk_ms // 20 if bridge_name in OWN else 1,  # the peers send every frame
    )
    minutes = max(level.call_minutes, 1e-9)
    level.generator_cpu_per_call_minute = round(generator_cpu / minutes, 4)
    level.standin_cpu_per_call_minute = round(standin_cpu / minutes, 4)
    return level


def summarise(
    level: Level, report: dict, callers: list[dict], sessions: list[dict], chunk_frames: int
) -> None:
    calls = report["calls"]
    level.calls_ok, level.calls_failed = calls["ok"], calls["failed"]
    level.failures = report.get("failures", {})
    level.violations = report["violations"]["total"]
    lateness = report["latency_ms"]["send_lateness"]
    level.generator_lateness_ms = {k: v for k, v in lateness.items() if v is not None}
    # The caller streams a 20 ms frame for every moment of the call, silence included.
    level.call_minutes = sum(len(c["frames_sent"]["chunk"]) for c in callers) * 0.02 / 60
    level.cpu_per_call_minute = round(level.cpu_seconds / max(level.call_minutes, 1e-9), 4)
    level.rss_per_call_mb = round((level.rss_peak_mb - level.rss_idle_mb) / level.concurrency, 3)
    inbound, outbound, clears = [], [], []
    sent_ms = heard_ms = 0.0
    for caller, session in joined(callers, sessions):
        inbound += inbound_latencies(caller, session)
        outbound += outbound_latencies(caller, session)
        clears += clear_latencies(caller, session)
        lost_in, lost_out = frames_lost(caller, session, chunk_frames)
        level.frames_lost_in += lost_in
        level.frames_lost_out += lost_out
        sent_ms += sum(session["tts_ms"])
        heard_ms += sum(size for _, size in caller_media(caller)) / 8
    level.reply_audio_pct = round(100 * heard_ms / sent_ms, 1) if sent_ms else 0.0
    level.inbound_ms = percentiles(inbound)
    level.outbound_ms = percentiles(outbound)
    level.clear_ms = percentiles(clears)


# -- output ------------------------------------------------------------------------------


def p(percentiles: dict[str, float], key: str = "p99") -> str:
    """One percentile in ms for the tables, or "-" when the level measured none."""
    return f"{percentiles[key]:.1f}" if key in percentiles else "-"


def table(levels: list[Level]) -> str:
    def in_bridge(lv: Level) -> str:
        at_most = lv.clear_in_bridge_p99_ms_at_most
        return f"<= {at_most:g} ms" if at_most is not None else "-"

    rows = [
        "calls  ok/fail  CPU s/call-min  RSS MB/call  in p50/p99 ms  out p50/p99 ms  clear p99 ms  "
        "clear in bridge p99  lost in/out  gen late p99 ms  gen/stand-in CPU  recorded  hooks  within limits",
    ]
    for lv in levels:
        rows.append(
            f"{lv.concurrency:5d}  {lv.calls_ok:3d}/{lv.calls_failed:<3d}  {lv.cpu_per_call_minute:14.3f}  "
            f"{lv.rss_per_call_mb:11.3f}  {p(lv.inbound_ms, 'p50'):>6}/{p(lv.inbound_ms):<6}  "
            f"{p(lv.outbound_ms, 'p50'):>7}/{p(lv.outbound_ms):<6}  {p(lv.clear_ms):>12}  "
            f"{in_bridge(lv):>19}  "
            f"{lv.frames_lost_in:5d}/{lv.frames_lost_out:<5d}  {p(lv.generator_lateness_ms):>15}  "
            f"{lv.generator_cpu_per_call_minute:8.3f}/{lv.standin_cpu_per_call_minute:<7.3f}  "
            f"{lv.events_on_record:8d}  {lv.hooks_delivered:5d}  {'yes' if lv.within_limits else 'no'}"
        )
    return "\n".join(rows)


def side_by_side(levels: list[Level]) -> str:
    """One concurrency level, ivr-bridge beside the peers (PEERS)."""
    by_name = {lv.bridge: lv for lv in levels}
    pipecat, floor, before = by_name.get("pipecat"), by_name.get("relay"), by_name.get(BEFORE)

    def ratio(lv: Level, to: Level | None) -> str:
        return (
            f"{lv.cpu_per_call_minute / to.cpu_per_call_minute:.2f}x"
            if to and to.cpu_per_call_minute
            else "-"
        )

    rows = [
        f"{levels[0].concurrency} calls: bridge   ok/fail  CPU s/call-min  vs Pipecat  vs floor  "
        "in p50/p99 ms  out p50/p99 ms  reply audio  peak RSS MB" + ("  vs before" if before else ""),
    ]
    for lv in levels:
        rows.append(
            f"  {lv.bridge:>18}  {lv.calls_ok:3d}/{lv.calls_failed:<3d}  {lv.cpu_per_call_minute:14.3f}  "
            f"{ratio(lv, pipecat):>10}  {ratio(lv, floor):>8}  "
            f"{p(lv.inbound_ms, 'p50'):>6}/{p(lv.inbound_ms, 'p99'):<6}  "
            f"{p(lv.outbound_ms, 'p50'):>7}/{p(lv.outbound_ms, 'p99'):<6}  {lv.reply_audio_pct:10.1f}%  "
            f"{lv.rss_peak_mb:11.1f}" + (f"  {ratio(lv, before):>9}" if before else "")
        )
    return "\n".join(rows)


def paths_side_by_side(levels: list[Level], pair: tuple[str, str]) -> str:
    """One concurrency level on each path of `pair` (PAIRS), and the pass-through path's CPU
    against the 24 kHz path's."""
    rows = [f"{levels[0].concurrency} calls: path  ok/fail  CPU s/call-min  in p50/p99 ms  out p50/p99 ms"]
    for lv in sorted(levels, key=lambda lv: pair.index(lv.provider)):  # pass-through first
        name = PROVIDERS[lv.provider][2]
        rows.append(
            f"  {name:>25}  {lv.calls_ok:3d}/{lv.calls_failed:<3d}  {lv.cpu_per_call_minute:14.3f}  "
            f"{p(lv.inbound_ms, 'p50'):>6}/{p(lv.inbound_ms, 'p99'):<6}  "
            f"{p(lv.outbound_ms, 'p50'):>7}/{p(lv.outbound_ms, 'p99'):<6}"
        )
    ratio = path_ratio(levels, pair)
    if ratio is not None:
        rows.append(f"  pass-through / 24 kHz CPU: {ratio:.2f}x")
    return "\n".join(rows)


def path_ratio(levels: list[Level], pair: tuple[str, str]) -> float | None:
    """The pass-through path's CPU per call-minute against the 24 kHz path's, one level each
    of `pair`."""
    cpu = {lv.provider: lv.cpu_per_call_minute for lv in levels}
    passed_through, converted = pair
    return cpu[passed_through] / cpu[converted] if cpu[converted] else None


def rss_slope(levels: list[Level]) -> float | None:
    """Memory per call: the least-squares slope of peak RSS over concurrency (MB per call),
    free of the fixed cost that `rss_per_call_mb` spreads over each level's calls."""
    xs = [lv.concurrency for lv in levels]
    if len(set(xs)) < 2:
        return None
    ys = [lv.rss_peak_mb for lv in levels]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return round(
        sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs), 4
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="25,50,100,150,200,250,300", help="concurrent calls per level")
    parser.add_argument(
        "--provider",
        choices=[*PROVIDERS, *PAIRS],
        default="nextevi",
        help="nextevi: the 24 kHz converted path; openai: mu-law passed through; both: each, side by "
        "side; elevenlabs, elevenlabs-pcm24, elevenlabs-both: the same, on one protocol",
    )
    parser.add_argument("--scenario", type=Path, default=SCENARIO)
    parser.add_argument("--reply-ms", type=int, default=2000, help="stand-in reply length")
    parser.add_argument("--think-ms", type=int, default=300, help="stand-in think time")
    parser.add_argument("--chunk-ms", type=int, default=100, help="IVR_UPSTREAM_CHUNK_MS for the bridge")
    parser.add_argument(
        "--ramp", type=float, default=None, help="seconds to start all calls (default C*0.05)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="per level")
    parser.add_argument("--keep", type=Path, help="keep logs and timelines in this folder")
    parser.add_argument("--hooks", action="store_true", help="send every call event to a hook receiver")
    parser.add_argument(
        "--peer",
        choices=["pipecat"],
        help="run each level through a Pipecat peer bridge and the bare relay too, side by side "
        "(scripts/peers), on the --provider's path",
    )
    parser.add_argument(
        "--against",
        type=Path,
        help="run each level through ivr-bridge from this other checkout too (e.g. a `git worktree` "
        "of the commit before a change), alternating which goes first, side by side",
    )
    parser.add_argument("--rounds", type=int, default=1, help="run each level this many times")
    parser.add_argument(
        "--limit-ms", type=float, default=LIMIT_MS, help="p99 added latency allowed at the capacity level"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.provider in PAIRS and (args.peer or args.against):
        parser.error(
            f"--provider {args.provider} compares two paths of this bridge: without --peer or --against"
        )
    if args.peer and PROVIDERS[args.provider][0] not in ("nextevi", "openai"):
        parser.error("the peers speak NextEVI and OpenAI Realtime only")

    levels: list[Level] = []
    peers: list[Level] = []
    ratios: list[float] = []  # --provider both (PAIRS): pass-through / 24 kHz, each run
    with tempfile.TemporaryDirectory(prefix="ivr-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        bridges = ["ivr-bridge", *(PEERS if args.peer else ()), *((BEFORE,) if args.against else ())]
        for concurrency, round_ in itertools.product(map(int, args.levels.split(",")), range(args.rounds)):
            if args.provider in PAIRS:
                pair = PAIRS[args.provider]
                paths = pair if round_ % 2 == 0 else pair[::-1]  # which goes first turns
                group = [
                    run_level(concurrency, argparse.Namespace(**{**vars(args), "provider": path}), workdir)
                    for path in paths
                ]
                levels.extend(group)
                if (ratio := path_ratio(group, pair)) is not None:
                    ratios.append(ratio)
                if not args.json:
                    print(paths_side_by_side(group, pair), flush=True)
                continue
            if len(bridges) > 1:
                # The same callers and stand-in, one bridge after another; the order turns
                # each round, so no bridge always runs on a machine warmed by the others.
                order = bridges[round_ % len(bridges) :] + bridges[: round_ % len(bridges)]
                group = sorted(
                    (run_level(concurrency, args, workdir, name) for name in order),
                    key=lambda lv: bridges.index(lv.bridge),
                )
                peers.extend(group[1:])
                levels.append(group[0])
                if not args.json:
                    print(side_by_side(group), flush=True)
                continue
            levels.append(run_level(concurrency, args, workdir))
            if not args.json:
                print(table(levels[-1:]).splitlines()[-1] if len(levels) > 1 else table(levels), flush=True)
    reports = []
    for provider in dict.fromkeys(lv.provider for lv in levels):  # each path run, in order
        mine = [lv for lv in levels if lv.provider == provider]
        capacity = max((lv.concurrency for lv in mine if lv.within_limits), default=0)
        slope = rss_slope(mine)
        reports.append({
            "provider": provider,
            "levels": [asdict(lv) for lv in mine],
            "peers": [asdict(lv) for lv in peers],
            "capacity": capacity,
            "rss_mb_per_call": slope,
        })  # fmt: skip
        if args.json:
            continue
        path = f", {PROVIDERS[provider][2]}" if args.provider in PAIRS else ""
        if slope is not None:
            print(f"\nmemory per call{path} (peak RSS slope, {mine[0].concurrency} -> {mine[-1].concurrency} "
                  f"calls): {slope:.3f} MB")  # fmt: skip
        print(f"\nhighest concurrency within limits{path} (all calls complete, p99 added "
              f"<= {args.limit_ms:g} ms each way, no frame lost): {capacity or 'none'}")  # fmt: skip
    if args.json:
        both = {"paths": reports, "pass_through_to_24khz_cpu": [round(r, 3) for r in ratios]}
        print(json.dumps(both if args.provider in PAIRS else reports[0], indent=2))
    elif ratios:
        print(f"\npass-through / 24 kHz CPU, {len(ratios)} runs: {min(ratios):.2f}-{max(ratios):.2f}x, "
              f"mean {sum(ratios) / len(ratios):.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
