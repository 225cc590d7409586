"""Benchmark of the built-in offline IVR (`IVR_PROVIDER=local`): turn latency and barge-in.

What it measures, on this machine:

- **Turn latency** at the caller, on a ladder of concurrent calls (`--levels`, default
  1,5,10,20,40): the send time of the frame holding the caller's last audible speech sample
  -> the arrival of the first media frame of the bot's reply. Each call hears the demo
  flow's greeting to the end, then says "problem" (the support branch: the account prompt
  comes back), says its account number aloud (whatever comes back counts), keys it in
  (4217#: a key turn, timed from the last key and reported apart), and says "goodbye" (the
  bot says goodbye and ends the call): three timed speech turns a call. Calls start at
  random moments within `--ramp` seconds and each slot repeats its call until the level has
  at least `--min-turns` speech turns. A turn with no reply within 10 s is a miss: "late"
  when the bridge recognised it (or its recogniser timed out), "heard nothing" when the
  recogniser returned no words (the bridge then keeps listening, by design; a recognition
  miss, not a delay). Late misses count as infinitely late in p95. The ladder stops
  climbing once p95 passes 1.5 s (`--limit-ms`). The figure includes the bridge's
  end-of-turn silence (IVR_END_SILENCE_MS, 600 ms by default): no reply can come sooner.
- **The bridge's own view** of the same turns, from its `/metrics`
  (`ivr_turn_stage_seconds`: caller stopped -> final transcript (recognised), -> the
  flow's first text (answered), -> the first bot audio sent (spoken); total): the mean
  of each stage and the histogram bucket its p95 falls in; what was recognised and what the
  bot answered, from the call records (`ivr-bridge calls export`); the bridge's event-loop
  lag p99 (bucket); warnings in its log.
- **CPU**: seconds of the bridge process and of its children (the PocketSphinx recogniser
  workers, niced), summed over the process tree from /proc, per call-minute.
- **What the other calls' audio suffers meanwhile** (`--alongside`, on by default): a
  second bridge process (`IVR_PROVIDER=openai`, the mu-law pass-through path) pointed at
  `ivr-bridge stub-voice-api --provider openai` carries one call at a time from
  `ivr-bridge loadtest` (a separate process, a short two-turn scenario, repeated) through
  each level. Its bridge-added latency each way is measured as scripts/bench.py does (the
  stand-in's and the caller's timestamp logs, joined by call sid), counting only the
  samples taken while the level's IVR calls were running; the same figures with no IVR
  call running come first (the baseline). The pass-through bridge is a separate process:
  the figures show the CPU contention of the IVR calls (the bridge, its niced recogniser
  workers, and this driver) on the shared cores, not interference inside one event loop.
- **Barge-in** (`--barge-in`, after the ladder, at `--barge-levels`, default 1 and 5
  concurrent calls), each probe in a call of its own during the greeting:
  (a) a 100 ms cough-like burst (white noise with a 15 ms decay, at the speech clips'
  level) -> no `clear` may arrive within 1.5 s;
  (b) line echo: the first 1.5 s of greeting the caller heard, replayed 20 dB down while
  the greeting goes on -> no `clear` from its first frame to 0.5 s after its last;
  (c) the caller talks over the bot (eSpeak speech) -> time from the first speech frame
  sent to the `clear` received (target <= 300 ms; the bridge's confirmation alone,
  IVR_BARGE_IN_MS, is 200 ms). A frame leaves the caller at the end of the 20 ms it
  carries, so the speech began 20 ms before its first frame was sent.

How: the IVR bridge (`ivr-bridge serve`, IVR_PROVIDER=local, IVR_PREFLIGHT=1 so the
recognisers are warm before /readyz answers, IVR_NO_INPUT_S=60 so no re-prompt interferes,
records in a temporary folder, IVR_LOG_FORMAT=json to a log file) is a process of its own,
started afresh for each level; the calls are driven from this process with
`ivr_bridge.standins.twilio.TwilioCaller` (continuous=True: the line carries silence
whenever the caller is quiet, as a real one does). The caller's speech is eSpeak NG
(150 wpm) resampled to 8 kHz mu-law, trimmed to its audible part. Times are
`time.monotonic()`, one clock for every process on Linux; the driver's own event-loop
delays are included (its send lateness p99 is printed, to show when it is itself the
bottleneck), so figures are an upper bound. The commit and the package files changed in the
working tree are printed (each bridge loads the source as it is when it starts).

Before measuring it waits (up to `--quiet-wait` seconds, checking every 30 s) until no
pytest runs on the machine, and prints the load average with each level.

    .venv/bin/python scripts/bench_ivr.py                        # the default ladder
    .venv/bin/python scripts/bench_ivr.py --levels 1,2 --min-turns 6 --no-alongside
    .venv/bin/python scripts/bench_ivr.py --barge-in --json      # with barge-in, JSON out
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import os
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
from processes import CLOCK_TICKS, ROOT, free_port, percentiles, spawn, stop

from ivr_bridge.standins.twilio import TwilioCaller, encode_frames

RATE = 8000
AUDIBLE = 300  # |sample| above this (about -40 dBFS) is audible speech: the clip is trimmed to it
SPEECH_WPM = 150  # the caller's eSpeak speed (tests/test_cascade.py speaks at 150 too)
# The demo flow: menu -> "problem" takes the support branch (at commit 2a1e541 eSpeak's
# "support" is heard as "one", the spoken key that picks sales) -> account prompt; the number
# said aloud (any reply counts: at 2a1e541 the collect node's grammar is one digit word, so it
# is a re-prompt) -> the number keyed in (a key turn, timed apart) -> "goodbye" -> the bot says
# goodbye and ends the call.
SCRIPT = (("say", "problem"), ("say", "four two one seven"), ("keys", "4217#"), ("say", "goodbye"))
KEY_GAP_S = 0.15  # between key presses
BARGE_TEXT = "I would like to talk to a person"
REPLY_TIMEOUT_S = 10.0  # a turn with no reply by then is a miss (the bridge's own limit is 5 s)
GREETING_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 120.0
LIMIT_MS = 1500.0  # p95 allowed while climbing (--limit-ms)
TARGET_P50_MS, TARGET_P95_MS, TARGET_CALLS = 700.0, 1000.0, 5  # the targets
CLEAR_TARGET_MS = 300.0
COUGH_MS, COUGH_DECAY_S = 100, 0.015
COUGH_WATCH_S = 1.5
ECHO_S, ECHO_DB, ECHO_WATCH_AFTER_S = 1.5, -20.0, 0.5
BARGE_AFTER_S = 1.0  # talk over the greeting once this much of it has played
CLEAR_TIMEOUT_S = 3.0
QUIET_POLL_S = 30.0
RECOGNISER_TIMEOUT = "gave no transcript"  # the bridge's warning when a recogniser took over 5 s
# What every development bridge says at start-up (no public URL, no Twilio token): not counted.
STARTUP_WARNINGS = ("IVR_PUBLIC_URL is", "DEVELOPMENT MODE")
ALONG_SCENARIO = {
    "name": "alongside: two turns",
    "steps": [
        {"say": str(ROOT / "examples" / "audio" / "hello.wav")},
        {"wait_for": "bot_audio", "timeout": 15},
        {"wait_for": "bot_done", "timeout": 30},
        {"wait": 0.5},
        {"say": str(ROOT / "examples" / "audio" / "number.wav")},
        {"wait_for": "bot_audio", "timeout": 15},
        {"wait_for": "bot_done", "timeout": 30},
        {"hang_up": True},
    ],
}


def note(text: str) -> None:
    print(f"bench_ivr: {text}", file=sys.stderr, flush=True)


# -- the caller's audio ------------------------------------------------------------------------


@dataclass
class Clip:
    text: str
    ulaw: bytes
    frames: list[str]  # base64 20 ms payloads; the first and the last hold audible speech
    seconds: float
    level_dbfs: float  # RMS over the clip


def dbfs(samples: np.ndarray) -> float:
    rms = math.sqrt(float(np.mean(np.square(samples.astype(np.float64))))) if len(samples) else 0.0
    return 20 * math.log10(max(rms, 1.0) / 32768)


def synthesise(text: str) -> np.ndarray:
    """`text` spoken by eSpeak NG, 8 kHz PCM16, trimmed to its audible part."""
    from ivr_bridge.audio import Resampler
    from ivr_bridge.cascade.local import Espeak

    espeak = Espeak.get()
    samples = espeak.executor.submit(espeak.speak, text, "en-us", SPEECH_WPM, threading.Event()).result()
    resampler = Resampler(espeak.rate, RATE)
    pcm = np.concatenate([resampler.process(samples), resampler.flush()])
    audible = np.flatnonzero(np.abs(pcm.astype(np.int32)) > AUDIBLE)
    if not len(audible):
        raise SystemExit(f"bench_ivr: eSpeak gave no audible speech for {text!r}")
    return pcm[audible[0] : audible[-1] + 1]


def clip_of(text: str, pcm: np.ndarray) -> Clip:
    from ivr_bridge.audio import ulaw_encode

    ulaw = ulaw_encode(pcm)
    return Clip(text, ulaw, encode_frames(ulaw), len(pcm) / RATE, round(dbfs(pcm), 1))


def cough(level_dbfs: float, seed: int = 7) -> Clip:
    """100 ms of broadband noise with a fast decay, as loud (RMS) as the speech clips."""
    rng = np.random.default_rng(seed)
    t = np.arange(RATE * COUGH_MS // 1000) / RATE
    burst = rng.standard_normal(len(t)) * np.exp(-t / COUGH_DECAY_S)
    burst *= 32768 * 10 ** (level_dbfs / 20) / math.sqrt(float(np.mean(burst**2)))
    pcm = np.clip(burst, -32767, 32767).astype(np.int16)
    return clip_of("(cough)", pcm)


def attenuated(ulaw: bytes, db: float) -> bytes:
    from ivr_bridge.audio import ulaw_decode, ulaw_encode

    pcm = ulaw_decode(ulaw).astype(np.float64) * 10 ** (db / 20)
    return ulaw_encode(np.round(pcm).astype(np.int16))


# -- processes ---------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_ivr: {what}: the process exited (code {proc.returncode})")
        try:
            if predicate():
                return
        except (httpx.TransportError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"bench_ivr: {what} did not happen within {timeout:g} s")


def proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds: its own and its reaped children's) from /proc, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / CLOCK_TICKS


def tree_cpu(root: int) -> tuple[float, float]:
    """CPU seconds of `root` and of all its descendants (utime + stime, reaped children too)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    own = stats.get(root, (0, 0.0))[1]
    descendants, todo = 0.0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        descendants += stats[pid][1]
        todo += children.get(pid, [])
    return own, descendants


class Bridge:
    """One `ivr-bridge serve` process."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stream_url = f"ws://127.0.0.1:{self.port}/media-stream"
        self.database = workdir / f"{name}.db"
        self.log = workdir / f"{name}.log"
        self.env = {"IVR_DATABASE_PATH": str(self.database), "IVR_LOG_FORMAT": "json", **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> None:
        self.proc = spawn(
            ["serve", "--port", str(self.port), "--log-level", "INFO"], env=self.env, log=self.log
        )
        wait_until(
            lambda: httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200,
            timeout,
            f"{self.name} ready (/readyz 200; its log: {self.log})",
            self.proc,
        )

    def cpu(self) -> tuple[float, float]:
        assert self.proc is not None
        return tree_cpu(self.proc.pid)

    def metrics(self) -> str:
        try:
            return httpx.get(f"{self.base}/metrics", timeout=10).text
        except httpx.HTTPError as exc:
            note(f"{self.name}: /metrics failed: {exc}")
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def records(self) -> list[dict[str, Any]]:
        """The calls on record (after `stop`: the writer has caught up)."""
        from ivr_bridge.settings import OWN_PREFIX, Settings

        own = Settings.variable_names()
        env = {k: v for k, v in os.environ.items() if not (k.startswith(OWN_PREFIX) or k in own)}
        try:
            result = subprocess.run(
                [sys.executable, "-m", "ivr_bridge", "calls", "export"],
                env={**env, "IVR_DATABASE_PATH": str(self.database)},
                capture_output=True, text=True, cwd=ROOT, timeout=60,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            note(f"{self.name}: `calls export` timed out")
            return []
        if result.returncode != 0:
            note(f"{self.name}: `calls export` failed ({result.returncode}): {result.stderr[-300:]}")
            return []
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def warnings(self) -> Counter[str]:
        """WARNING and worse lines of its log, by message (call sids and numbers masked)."""
        import re

        found: Counter[str] = Counter()
        if not self.log.exists():
            return found
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or str(entry.get("message", "")).startswith(STARTUP_WARNINGS):
                continue
            if entry.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                message = re.sub(r"CA[0-9a-f]{32}", "CA…", str(entry.get("message", "")))
                message = re.sub(r"[0-9]+(\.[0-9]+)?", "#", message)[:140]
                found[f"{entry['level']} {message}"] += 1
        return found


# -- metrics -------------------------------------------------------------------------------------


def histograms(text: str, name: str) -> dict[str, dict[str, Any]]:
    """A histogram family of /metrics by its first label's value ("" if none): buckets, sum, count."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            key = next(iter(labels.values()), "")
            h = out.setdefault(key, {"buckets": [], "sum": 0.0, "count": 0.0})
            if sample.name.endswith("_bucket"):
                h["buckets"].append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_sum"):
                h["sum"] = sample.value
            elif sample.name.endswith("_count"):
                h["count"] = sample.value
    return out


def bucket_of(h: dict[str, Any], q: float) -> float | None:
    """The upper bound (ms) of the bucket the q-quantile falls in; inf past the last."""
    buckets = sorted(h["buckets"])
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    return next(le for le, n in buckets if n >= q * total) * 1000


def stage_figures(text: str) -> dict[str, dict[str, float | None]]:
    stages = {}
    for stage, h in histograms(text, "ivr_turn_stage_seconds").items():
        count = int(h["count"])
        stages[stage.removesuffix("_ms")] = {
            "count": count,
            "mean_ms": round(h["sum"] / count * 1000, 1) if count else None,
            "p50_ms_at_most": bucket_of(h, 0.5),
            "p95_ms_at_most": bucket_of(h, 0.95),
        }
    return stages


# -- the pass-through call alongside -----------------------------------------------------------


class Alongside:
    """A pass-through bridge and its voice API stand-in, for the whole run; `ivr-bridge
    loadtest` carries one call at a time through it, over and over, between `begin` and `end`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.standin_port = free_port()
        self.standin_timeline = workdir / "standin.jsonl"
        self.scenario = workdir / "alongside.json"
        self.scenario.write_text(json.dumps(ALONG_SCENARIO))
        self.standin: subprocess.Popen[bytes] | None = None
        self.bridge = Bridge(
            "passthrough",
            {
                "IVR_PROVIDER": "openai",
                "OPENAI_REALTIME_URL": f"ws://127.0.0.1:{self.standin_port}/v1/realtime",
                "OPENAI_API_KEY": bench.API_KEY,
                "IVR_MAX_CALLS": "10",
            },
            workdir,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._runs: list[tuple[Path, dict[str, Any]]] = []
        self.errors: list[str] = []

    def start(self) -> None:
        self.standin = spawn(
            [
                "stub-voice-api", "--provider", "openai", "--port", str(self.standin_port),
                "--api-key", bench.API_KEY, "--config-id", bench.CONFIG_ID,
                "--reply-ms", "2000", "--think-ms", "300", "--timeline", str(self.standin_timeline),
            ],
            log=self.workdir / "standin.log",
        )  # fmt: skip
        import socket

        wait_until(
            lambda: socket.create_connection(("127.0.0.1", self.standin_port), timeout=1).close() or True,
            30,
            "voice API stand-in start",
            self.standin,
        )
        self.bridge.start()

    def stop(self) -> None:
        self.end()
        self.bridge.stop()
        if self.standin is not None:
            stop(self.standin)

    def begin(self, tag: str) -> None:
        self._stop.clear()
        self._runs = []
        self._thread = threading.Thread(target=self._loop, args=(tag,), daemon=True)
        self._thread.start()

    def end(self) -> list[tuple[Path, dict[str, Any]]]:
        """Stop after the call under way (it finishes: its timeline is written at its end)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
            self._thread = None
        return self._runs

    def _loop(self, tag: str) -> None:
        run = 0
        while not self._stop.is_set():
            run += 1
            timeline = self.workdir / f"along-{tag}-{run}.jsonl"
            try:
                result = subprocess.run(
                    [
                        sys.executable, "-m", "ivr_bridge", "loadtest", f"{self.bridge.base}/twiml",
                        "--calls", "1", "--concurrency", "1", "--scenario", str(self.scenario),
                        "--timeline", str(timeline), "--json", "--no-progress",
                    ],
                    capture_output=True, text=True, cwd=ROOT, timeout=120,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                self.errors.append(f"{tag}: loadtest run {run} timed out")
                continue
            text = result.stdout.strip()
            if not text.startswith("{"):
                self.errors.append(
                    f"{tag}: loadtest printed no JSON (exit {result.returncode}): {result.stderr[-200:]}"
                )
                time.sleep(1)
                continue
            self._runs.append((timeline, json.loads(text)))

    def figures(
        self, runs: list[tuple[Path, dict[str, Any]]], window: tuple[float, float] | None
    ) -> dict[str, Any]:
        """Bridge-added latency each way (ms) of `runs`' calls, of the samples within `window`."""
        callers = [c for path, _ in runs for c in bench.read_lines(path)]
        sids = {c["call_sid"] for c in callers}
        deadline = time.monotonic() + 15  # the stand-in writes a session when it closes
        while time.monotonic() < deadline:
            sessions = bench.read_lines(self.standin_timeline, "session")
            if sids <= {s["connection_id"].split("-", 1)[0] for s in sessions}:
                break
            time.sleep(0.2)
        inbound: list[float] = []
        outbound: list[float] = []
        for caller, session in bench.joined(callers, sessions):
            for at, ms in inbound_samples(caller, session):
                if window is None or window[0] <= at <= window[1]:
                    inbound.append(ms)
            for at, ms in outbound_samples(caller, session):
                if window is None or window[0] <= at <= window[1]:
                    outbound.append(ms)
        ok = sum(r["calls"]["ok"] for _, r in runs)
        failed = sum(r["calls"]["failed"] for _, r in runs)
        return {
            "calls_ok": ok,
            "calls_failed": failed,
            "inbound_ms": percentiles(inbound),
            "outbound_ms": percentiles(outbound),
        }


def inbound_samples(caller: dict, session: dict) -> Iterator[tuple[float, float]]:
    """(arrival at the voice API, bridge-added ms) of each upstream audio message: as
    bench.inbound_latencies, with the time of each sample."""
    sent_at = bench.caller_frame_times(caller)
    frame_bytes = session.get("frame_bytes", bench.PCM_BYTES_PER_FRAME)
    for arrived, total in zip(session["audio_at"], session["audio_bytes"], strict=True):
        last_frame = total // frame_bytes
        if 0 < last_frame <= len(sent_at):
            yield arrived, (arrived - sent_at[last_frame - 1]) * 1000


def outbound_samples(caller: dict, session: dict) -> Iterator[tuple[float, float]]:
    """(send time by the voice API, ms to the caller's first media after it): as
    bench.outbound_latencies, with the time of each sample."""
    arrivals = [at for at, _ in bench.caller_media(caller)]
    for sent in session["tts_at"]:
        i = bisect.bisect_left(arrivals, sent)
        if i < len(arrivals):
            yield sent, (arrivals[i] - sent) * 1000


# -- the IVR calls ---------------------------------------------------------------------------------


@dataclass
class Step:
    """What the caller does in one turn: say `clip` (its text is `text`), or press the keys `text`."""

    text: str
    clip: Clip | None


@dataclass
class TurnResult:
    index: int
    said: str
    latency_ms: float | None  # None: no reply within REPLY_TIMEOUT_S
    keys: bool = False  # timed from the last key sent, not from the end of speech


@dataclass
class CallResult:
    call_sid: str = ""
    started: float = 0.0
    ended: float = 0.0
    answer_ms: float | None = None  # `start` sent -> the greeting's first audio
    turns: list[TurnResult] = field(default_factory=list)
    error: str = ""
    send_late_ms: list[float] = field(default_factory=list)  # this driver's lateness per frame
    frames_skipped: int = 0


def media_after(caller: TwilioCaller, at: float) -> float | None:
    media = caller.timeline.media_at
    i = bisect.bisect_right(media, at)
    return media[i] if i < len(media) else None


async def played_out(caller: TwilioCaller, timeout: float) -> bool:
    """All bot audio received has played, every mark echoed, and none came for 0.3 s; True
    at once if the call is over."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not caller.closed.is_set():
        if not await caller.wait_until(lambda: caller.idle, max(0.0, deadline - loop.time())):
            return caller.closed.is_set()
        count = caller.media_messages
        await asyncio.sleep(0.3)
        if caller.media_messages == count and caller.idle:
            return True
    return True


def finish(caller: TwilioCaller, result: CallResult) -> None:
    t = caller.timeline
    result.ended = time.monotonic()
    result.send_late_ms = [(s - d) * 1000 for s, d in zip(t.sent_at, t.scheduled_at, strict=True)]
    result.frames_skipped = t.frames_skipped


async def hang_up(caller: TwilioCaller) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await caller.hang_up()


async def ivr_call(url: str, script: list[Step], pause_s: float) -> CallResult:
    """The greeting, then each step of `script` as a turn, timing each reply."""
    result = CallResult(started=time.monotonic())
    caller = TwilioCaller(url, continuous=True)
    result.call_sid = caller.call_sid
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await caller.connect()
            await caller.wait_for(lambda: caller.media_messages > 0, GREETING_TIMEOUT_S)
            assert caller.timeline.started_at is not None
            result.answer_ms = round((caller.timeline.media_at[0] - caller.timeline.started_at) * 1000, 1)
            if not await played_out(caller, GREETING_TIMEOUT_S):
                raise TimeoutError("the greeting did not finish playing")
            for index, step in enumerate(script):
                if caller.closed.is_set():
                    raise ConnectionError(
                        f"the bridge ended the call before step {index + 1} ({step.text!r})"
                    )
                await asyncio.sleep(pause_s)  # the line carries silence meanwhile
                if step.clip is not None:
                    chunks = await caller.say_frames(step.clip.frames)
                    if len(chunks) < len(step.clip.frames):
                        raise ConnectionError(f"the call closed while saying {step.text!r}")
                    end = caller.timeline.sent_time(chunks[-1])
                else:
                    for key in step.text:
                        await caller.dtmf(key)
                        await asyncio.sleep(KEY_GAP_S)
                    end = caller.timeline.dtmf[-1][0]
                assert end is not None
                replied = await caller.wait_until(
                    lambda e=end: media_after(caller, e) is not None, REPLY_TIMEOUT_S
                )
                first = media_after(caller, end)
                if not replied or first is None:
                    result.turns.append(TurnResult(index, step.text, None, step.clip is None))
                    break  # the bridge still waits for the caller: this script cannot go on
                latency = round((first - end) * 1000, 1)
                result.turns.append(TurnResult(index, step.text, latency, step.clip is None))
                if not await played_out(caller, 30):
                    raise TimeoutError(f"the reply to {step.text!r} did not finish playing")
            with contextlib.suppress(TimeoutError):  # "goodbye" ends the call (after its audio)
                await caller.wait_closed(5)
    except Exception as exc:  # a refused or broken call is a result, not the end of the run
        result.error = f"{type(exc).__name__}: {str(exc)[:160]}"
    finally:
        await hang_up(caller)
        finish(caller, result)
    return result


async def ivr_level(url: str, calls: int, script: list[Step], args: argparse.Namespace) -> list[CallResult]:
    spoken = sum(step.clip is not None for step in script)
    rounds = max(args.min_rounds, math.ceil(args.min_turns / (calls * spoken)))
    rng = random.Random(calls)
    results: list[CallResult] = []

    async def slot() -> None:
        await asyncio.sleep(rng.uniform(0, args.ramp))
        for _ in range(rounds):
            results.append(await ivr_call(url, script, args.pause_ms / 1000))

    await asyncio.gather(*(slot() for _ in range(calls)))
    return results


# -- barge-in probes ----------------------------------------------------------------------------


@dataclass
class Probe:
    case: str  # cough | echo | speech
    call_sid: str = ""
    clear_ms: float | None = None  # first clear after the probe began (within its watch window)
    # The greeting was playing throughout: still at the watch's end (cough, echo), or when
    # the caller began talking over it (speech).
    bot_playing: bool = False
    error: str = ""
    send_late_ms: list[float] = field(default_factory=list)


def clear_after(caller: TwilioCaller, at: float) -> float | None:
    clears = caller.timeline.clear_at
    i = bisect.bisect_left(clears, at)
    return clears[i] if i < len(clears) else None


async def probe_call(url: str, case: str, cough_clip: Clip, barge_clip: Clip) -> Probe:
    probe = Probe(case)
    caller = TwilioCaller(url, continuous=True)
    probe.call_sid = caller.call_sid
    try:
        async with asyncio.timeout(60):
            await caller.connect()
            await caller.wait_for(lambda: caller.media_messages > 0, GREETING_TIMEOUT_S)
            if case == "cough":
                await caller.wait_for(lambda: len(caller.received) >= RATE // 2, 10)
                chunks = await caller.say_frames(cough_clip.frames)
                start = caller.timeline.sent_time(chunks[0])
                assert start is not None
                await asyncio.sleep(max(0.0, start + COUGH_WATCH_S - time.monotonic()))
                watch_end = start + COUGH_WATCH_S
            elif case == "echo":
                size = int(RATE * ECHO_S)
                await caller.wait_for(lambda: len(caller.received) >= size, 10)
                echo = attenuated(bytes(caller.received[:size]), ECHO_DB)
                chunks = await caller.say(echo)
                start, last = caller.timeline.sent_time(chunks[0]), caller.timeline.sent_time(chunks[-1])
                assert start is not None and last is not None
                await asyncio.sleep(ECHO_WATCH_AFTER_S)
                watch_end = last + ECHO_WATCH_AFTER_S
            else:
                await caller.wait_for(lambda: len(caller.received) >= int(RATE * BARGE_AFTER_S), 10)
                probe.bot_playing = caller.playing
                chunks = await caller.say_frames(barge_clip.frames)  # its first frame is speech
                start = caller.timeline.sent_time(chunks[0])
                assert start is not None
                await caller.wait_until(lambda: clear_after(caller, start) is not None, CLEAR_TIMEOUT_S)
                watch_end = start + CLEAR_TIMEOUT_S
            if case != "speech":
                probe.bot_playing = caller.playing
            cleared = clear_after(caller, start)
            if cleared is not None and cleared <= watch_end:
                probe.clear_ms = round((cleared - start) * 1000, 1)
    except Exception as exc:  # a refused or broken call is a result, not the end of the run
        probe.error = f"{type(exc).__name__}: {str(exc)[:160]}"
    finally:
        await hang_up(caller)
        t = caller.timeline
        probe.send_late_ms = [(s - d) * 1000 for s, d in zip(t.sent_at, t.scheduled_at, strict=True)]
    return probe


async def probe_level(url: str, calls: int, rounds: int, cough_clip: Clip, barge_clip: Clip) -> list[Probe]:
    """`calls` callers at once, each running the three probes `rounds` times, a call each."""
    rng = random.Random(1000 + calls)
    probes: list[Probe] = []

    async def slot() -> None:
        await asyncio.sleep(rng.uniform(0, 2.0))
        for _ in range(rounds):
            for case in ("cough", "echo", "speech"):
                probes.append(await probe_call(url, case, cough_clip, barge_clip))

    await asyncio.gather(*(slot() for _ in range(calls)))
    return probes


# -- one level -------------------------------------------------------------------------------------


@dataclass
class Level:
    calls: int
    limit_ms: float = LIMIT_MS
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pytest_running: bool = False
    source: str = ""  # fingerprint of ivr_bridge/ when the level's bridge started
    calls_run: int = 0
    call_errors: dict[str, int] = field(default_factory=dict)
    turns: int = 0
    missed: int = 0  # speech turns without a reply: heard nothing + late
    missed_heard_nothing: int = 0
    missed_late: int = 0
    recogniser_timeouts: int = 0  # the bridge's "gave no transcript within 5 s" warnings
    turn_ms: dict[str, float] = field(default_factory=dict)  # answered turns
    turn_ms_by_step: dict[str, dict[str, float]] = field(default_factory=dict)
    key_turns: int = 0  # key turns (timed from the last key, apart from the speech turns)
    key_missed: int = 0
    misses: list[str] = field(default_factory=list)  # each missed turn, with what the record shows
    p95_with_misses_ms: float | None = None  # None: a miss is the p95 (more than 5 % missed)
    answer_ms: dict[str, float] = field(default_factory=dict)
    bridge_stages: dict[str, dict[str, float | None]] = field(default_factory=dict)
    loop_lag_p99_ms_at_most: float | None = None
    heard: dict[str, dict[str, int]] = field(default_factory=dict)  # said -> recognised -> count
    replies: dict[str, int] = field(default_factory=dict)  # the bot's replies to the caller's turns
    warnings: dict[str, int] = field(default_factory=dict)
    call_minutes: float = 0.0
    cpu_bridge_s: float = 0.0
    cpu_recognisers_s: float = 0.0
    cpu_per_call_minute: float = 0.0
    cpu_driver_s: float = 0.0  # this process (the callers), for the contention it adds
    driver_late_ms: dict[str, float] = field(default_factory=dict)
    driver_frames_skipped: int = 0
    alongside: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def within_limit(self) -> bool:
        return self.p95_with_misses_ms is not None and self.p95_with_misses_ms <= self.limit_ms


def p95_with_misses(latencies: list[float], missed: int) -> float | None:
    """Nearest-rank p95 with each miss as infinitely late (None when a miss is the p95)."""
    ordered = sorted(latencies) + [math.inf] * missed
    if not ordered:
        return None
    value = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return None if math.isinf(value) else round(value, 1)


def transcripts(records: list[dict[str, Any]]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """What the bridge recognised for each thing the callers said, and what it answered."""
    heard: dict[str, Counter[str]] = {}
    replies: Counter[str] = Counter()
    for record in records:
        lines = [(line.get("role"), str(line.get("text", ""))) for line in record.get("transcript") or []]
        said = iter(text for kind, text in SCRIPT if kind == "say")
        for i, (role, text) in enumerate(lines):
            if role != "user":
                continue
            expected = next(said, "?")
            heard.setdefault(expected, Counter())[text] += 1
            answer = next((t for r, t in lines[i + 1 :] if r == "assistant"), "(none)")
            replies[" ".join(answer.split()[:6])] += 1
    return {k: dict(v.most_common()) for k, v in heard.items()}, dict(replies.most_common())


def classify_misses(level: Level, results: list[CallResult], records: list[dict[str, Any]]) -> None:
    """Sort the speech turns that got no reply: "heard nothing" when the call's record has no
    caller line for the turn (the recogniser returned no words: the bridge keeps listening, by
    design) and the bridge never gave up waiting for a recogniser; "late" otherwise (recognised
    but not answered within REPLY_TIMEOUT_S, or the recogniser timed out). Late misses count
    as infinitely late in p95+miss; both end the call's script."""
    by_sid = {r.get("call_sid"): r for r in records}
    level.missed_heard_nothing = level.missed_late = 0
    for result in results:
        record = by_sid.get(result.call_sid) or {}
        lines = record.get("transcript") or []
        users = sum(line.get("role") == "user" for line in lines)
        spoken = sum(not t.keys for t in result.turns)
        for turn in result.turns:
            if turn.latency_ms is not None or turn.keys:
                continue
            heard_nothing = users < spoken and not level.recogniser_timeouts
            if heard_nothing:
                level.missed_heard_nothing += 1
            else:
                level.missed_late += 1
            tail = [f"{line.get('role')}: {line.get('text')}" for line in lines[-2:]]
            why = "heard nothing" if heard_nothing else "late"
            level.misses.append(f"{result.call_sid} {turn.said!r}: no reply ({why}); transcript ends {tail}")
    latencies = [t.latency_ms for r in results for t in r.turns if not t.keys and t.latency_ms is not None]
    level.p95_with_misses_ms = p95_with_misses(latencies, level.missed_late)


def run_ivr_level(
    calls: int, script: list[Step], args: argparse.Namespace, workdir: Path, alongside: Alongside | None
) -> Level:
    level = Level(calls, args.limit_ms, load_average(), pytest_running(), code_state()["source"])
    bridge = ivr_bridge(f"ivr-{calls}", max(calls, 10) * 2, workdir)
    started = time.monotonic()
    try:
        bridge.start()
        cpu_before = bridge.cpu()
        if alongside is not None:
            alongside.begin(f"level-{calls}")
        window_start, driver_before = time.monotonic(), driver_cpu()
        results = run_async(ivr_level(bridge.stream_url, calls, script, args), args.timeout)
        window_end, level.cpu_driver_s = time.monotonic(), round(driver_cpu() - driver_before, 2)
        cpu_after = bridge.cpu()
        metrics = bridge.metrics()
        if alongside is not None:
            level.alongside = alongside.figures(alongside.end(), (window_start, window_end))
    finally:
        if alongside is not None:
            alongside.end()
        bridge.stop()
    level.seconds = round(time.monotonic() - started, 1)
    level.cpu_bridge_s = round(cpu_after[0] - cpu_before[0], 2)
    level.cpu_recognisers_s = round(cpu_after[1] - cpu_before[1], 2)
    summarise_calls(level, results)
    level.cpu_per_call_minute = round(
        (level.cpu_bridge_s + level.cpu_recognisers_s) / max(level.call_minutes, 1e-9), 3
    )
    level.bridge_stages = stage_figures(metrics)
    lag = histograms(metrics, "ivr_event_loop_lag_seconds").get("")
    level.loop_lag_p99_ms_at_most = bucket_of(lag, 0.99) if lag else None
    records = bridge.records()
    level.heard, level.replies = transcripts(records)
    warnings = bridge.warnings()
    level.warnings = dict(warnings.most_common(8))
    level.recogniser_timeouts = sum(n for message, n in warnings.items() if RECOGNISER_TIMEOUT in message)
    classify_misses(level, results, records)
    return level


def summarise_calls(level: Level, results: list[CallResult]) -> None:
    level.calls_run = len(results)
    level.call_errors = dict(Counter(r.error for r in results if r.error))
    speech = [t for r in results for t in r.turns if not t.keys]
    latencies = [t.latency_ms for t in speech if t.latency_ms is not None]
    level.turns = len(speech)
    level.missed = sum(t.latency_ms is None for t in speech)
    level.turn_ms = percentiles(latencies, 1)
    for kind, text in SCRIPT:
        values = [
            t.latency_ms for r in results for t in r.turns if t.said == text and t.latency_ms is not None
        ]
        level.turn_ms_by_step[f"keys {text}" if kind == "keys" else text] = percentiles(values, 1)
    keys = [t for r in results for t in r.turns if t.keys]
    level.key_turns, level.key_missed = len(keys), sum(t.latency_ms is None for t in keys)
    level.answer_ms = percentiles([r.answer_ms for r in results if r.answer_ms is not None], 1)
    level.call_minutes = round(sum(r.ended - r.started for r in results) / 60, 3)
    level.driver_late_ms = percentiles([x for r in results for x in r.send_late_ms], 1)
    level.driver_frames_skipped = sum(r.frames_skipped for r in results)


def ivr_bridge(name: str, max_calls: int, workdir: Path) -> Bridge:
    return Bridge(
        name,
        {
            "IVR_PROVIDER": "local",
            "IVR_MAX_CALLS": str(max_calls),
            "IVR_NO_INPUT_S": "60",
            "IVR_PREFLIGHT": "1",  # the recogniser workers are up before /readyz says ready
        },
        workdir,
    )


@dataclass
class BargeLevel:
    calls: int
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    source: str = ""  # fingerprint of ivr_bridge/ when the bridge started
    cough_probes: int = 0
    cough_false_clears: int = 0
    echo_probes: int = 0
    echo_false_clears: int = 0
    speech_probes: int = 0
    speech_cleared: int = 0
    speech_within_target: int = 0
    clear_ms: dict[str, float] = field(default_factory=dict)
    not_during_greeting: int = 0  # probes the greeting did not cover (not counted as valid)
    errors: dict[str, int] = field(default_factory=dict)
    false_clear_ms: list[float] = field(default_factory=list)
    driver_late_ms: dict[str, float] = field(default_factory=dict)


def run_barge_level(
    calls: int, cough_clip: Clip, barge_clip: Clip, args: argparse.Namespace, workdir: Path
) -> BargeLevel:
    level = BargeLevel(calls, load_average(), code_state()["source"])
    bridge = ivr_bridge(f"barge-{calls}", max(calls, 10) * 2, workdir)
    try:
        bridge.start()
        probes = run_async(
            probe_level(bridge.stream_url, calls, args.barge_rounds, cough_clip, barge_clip), args.timeout
        )
    finally:
        bridge.stop()
    level.errors = dict(Counter(p.error for p in probes if p.error))
    valid = [p for p in probes if not p.error and p.bot_playing]
    level.not_during_greeting = sum(1 for p in probes if not p.error and not p.bot_playing)
    for case in ("cough", "echo"):
        mine = [p for p in valid if p.case == case]
        setattr(level, f"{case}_probes", len(mine))
        setattr(level, f"{case}_false_clears", sum(p.clear_ms is not None for p in mine))
        level.false_clear_ms += [p.clear_ms for p in mine if p.clear_ms is not None]
    speech = [p for p in valid if p.case == "speech"]
    level.speech_probes = len(speech)
    cleared = [p.clear_ms for p in speech if p.clear_ms is not None]
    level.speech_cleared = len(cleared)
    level.speech_within_target = sum(ms <= CLEAR_TARGET_MS for ms in cleared)
    level.clear_ms = percentiles(cleared, 1)
    level.driver_late_ms = percentiles([x for p in probes for x in p.send_late_ms], 1)
    return level


# -- helpers ---------------------------------------------------------------------------------------


def run_async(coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            return runner.run(bounded())
        except TimeoutError:
            raise SystemExit(f"bench_ivr: a level took longer than --timeout {timeout:g} s") from None


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def driver_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pytest_running() -> bool:
    found = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True)
    return bool(found.stdout.strip())


def wait_for_quiet(limit: float) -> float:
    """Wait until no pytest runs (checking every 30 s, up to `limit` s); the seconds waited."""
    started = time.monotonic()
    while pytest_running() and time.monotonic() - started < limit:
        note(f"pytest is running; waiting ({time.monotonic() - started:.0f}/{limit:g} s)")
        time.sleep(QUIET_POLL_S)
    if pytest_running():
        note(f"pytest still running after {limit:g} s: measuring anyway (the figures will show it)")
    return round(time.monotonic() - started, 1)


def code_state() -> dict[str, Any]:
    """The commit, the package's files changed from it (others may be editing the tree), and a
    fingerprint of the package's source as it is now (each level's bridge loads it afresh)."""
    import hashlib

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=10
            ).stdout.rstrip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    digest = hashlib.sha1()
    for path in sorted((ROOT / "ivr_bridge").rglob("*.py")):
        digest.update(path.as_posix().encode() + b"\0" + path.read_bytes())
    changed = [line[3:] for line in git("status", "--porcelain", "--", "ivr_bridge").splitlines()]
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "changed": changed,
        "source": digest.hexdigest()[:12],
    }


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model or "unknown",
        "cores": os.cpu_count(),
        "load_average": list(load_average()),
        "python": sys.version.split()[0],
    }


# -- output --------------------------------------------------------------------------------------


def finite(value: Any) -> Any:
    """`value` with infinities as the string "inf" (JSON has none)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def fmt(d: dict[str, Any] | None, key: str, digits: int = 0) -> str:
    if not d or d.get(key) is None:
        return "-"
    return f"{d[key]:.{digits}f}"


def print_report(report: dict[str, Any], levels: list[Level], barge: list[BargeLevel]) -> None:
    m = report["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}")
    print(f"command: {report['command']}")
    code = report["code"]
    changed = f", changed in the working tree: {', '.join(code['changed'])}" if code["changed"] else ""
    print(f"code: commit {code['commit']}{changed} (source {code['source']})")
    if any(lv.source != code["source"] for lv in [*levels, *barge]):
        sources = [f"{lv.calls} calls: {lv.source}" for lv in levels]
        sources += [f"barge-in at {b.calls}: {b.source}" for b in barge]
        print("  NOTE: ivr_bridge/ changed during the run; source per level: " + ", ".join(sources))
    print(f"load average at start: {' '.join(str(x) for x in m['load_average'])} "
          f"(waited {report['waited_for_quiet_s']:g} s for other pytest runs to end)")  # fmt: skip
    clips = ", ".join(f'"{c["text"]}" {c["seconds"]:.2f} s' for c in report["clips"])
    print(f"caller speech (eSpeak {SPEECH_WPM} wpm, trimmed to the audible part): {clips}; "
          f"level {report['clips'][0]['level_dbfs']:.1f} dBFS")  # fmt: skip
    base = report.get("baseline")
    if base:
        print(
            f"\npass-through call alone (baseline, no IVR call running): {base['calls_ok']} calls, added"
            f" in p50/p99 {fmt(base['inbound_ms'], 'p50', 1)}/{fmt(base['inbound_ms'], 'p99', 1)} ms, "
            f"out p50/p99 {fmt(base['outbound_ms'], 'p50', 1)}/{fmt(base['outbound_ms'], 'p99', 1)} ms"
        )
    print(
        "\nturn latency, local IVR: the caller's last speech sample sent -> the reply's first audio received"
    )
    print("(ms; miss: speech turns without a reply within 10 s, late (recognised, or the recogniser timed")
    print(" out) + none (the recogniser returned no words: the bridge keeps listening); p95+miss counts the")
    print(" late ones as infinitely late; keys: the last key of 4217# -> reply; bridge stages: /metrics")
    print(" means, the total's p95 as its histogram bucket; recognised includes the end-of-turn silence)")
    print(
        "calls  turns  miss late+none   p50   p95   max  p95+miss  keys p50  greeting p50 | "
        "recognised answered spoken  total  total p95 <="
    )
    for lv in levels:
        st = lv.bridge_stages
        stage = [fmt(st.get(k), "mean_ms") for k in ("recognised", "answered", "spoken", "total")]
        stages = f"{stage[0]:>10} {stage[1]:>8} {stage[2]:>6} {stage[3]:>6}"
        total_p95 = st.get("total", {}).get("p95_ms_at_most")
        with_misses = lv.p95_with_misses_ms if lv.p95_with_misses_ms is not None else "miss"
        keys = next((d for step, d in lv.turn_ms_by_step.items() if step.startswith("keys ")), None)
        print(
            f"{lv.calls:5d}  {lv.turns:5d}  {f'{lv.missed_late}+{lv.missed_heard_nothing}':>14} "
            f"{fmt(lv.turn_ms, 'p50'):>5} "
            f"{fmt(lv.turn_ms, 'p95'):>5} {fmt(lv.turn_ms, 'max'):>5}  {with_misses:>8}"
            f"  {fmt(keys, 'p50'):>8}  {fmt(lv.answer_ms, 'p50'):>12} | "
            f"{stages}  {total_p95 if total_p95 is not None else '-':>12}"
        )
    print("\nwhat it costs, and what the other calls' audio suffers meanwhile")
    print("(CPU: the IVR bridge process + its recogniser workers, per minute of call; loop lag: the IVR")
    print(" bridge's event loop, histogram bucket; pass-through: bridge-added latency of the call through")
    print(" the second bridge during the level; driver: this process's frame send lateness)")
    print(
        "calls  CPU s/call-min  bridge s  recognisers s  call-min  loop lag p99 <= ms  "
        "pass-through in p99  out p99 ms  driver CPU s  late p99 ms  load avg before"
    )
    if base:
        print(
            f"{'none':>5}  {'-':>14}  {'-':>8}  {'-':>13}  {'-':>8}  {'-':>18}  "
            f"{fmt(base['inbound_ms'], 'p99', 1):>19}  {fmt(base['outbound_ms'], 'p99', 1):>10}"
            f"  {'-':>12}  {'-':>11}"
        )
    for lv in levels:
        along = lv.alongside or {}
        lag = f"{lv.loop_lag_p99_ms_at_most:g}" if lv.loop_lag_p99_ms_at_most is not None else "-"
        load = " ".join(f"{x:.2f}" for x in lv.load_before) + (
            " (pytest running)" if lv.pytest_running else ""
        )
        print(
            f"{lv.calls:5d}  {lv.cpu_per_call_minute:14.2f}  {lv.cpu_bridge_s:8.1f}"
            f"  {lv.cpu_recognisers_s:13.1f}  {lv.call_minutes:8.1f}  {lag:>18}"
            f"  {fmt(along.get('inbound_ms'), 'p99', 1):>19}  {fmt(along.get('outbound_ms'), 'p99', 1):>10}"
            f"  {lv.cpu_driver_s:12.1f}  {fmt(lv.driver_late_ms, 'p99', 1):>11}  {load}"
        )
    for lv in levels:
        print(f"\n{lv.calls} calls ({lv.calls_run} calls in {lv.seconds:g} s):")
        steps = "; ".join(
            f'"{s}" p50/p95/max {fmt(d, "p50")}/{fmt(d, "p95")}/{fmt(d, "max")} (n={d.get("n", 0)})'
            for s, d in lv.turn_ms_by_step.items()
        )
        print(f"  by turn (ms): {steps}")
        if lv.key_missed:
            print(f"  key turns without a reply: {lv.key_missed} of {lv.key_turns}")
        for miss in lv.misses[:10]:
            print(f"  missed: {miss}")
        for said, heard in lv.heard.items():
            print(f'  "{said}" recognised as: ' + ", ".join(f"{h!r} x{n}" for h, n in heard.items()))
        if lv.replies:
            print("  replies: " + ", ".join(f"{r!r} x{n}" for r, n in lv.replies.items()))
        if lv.alongside:
            a = lv.alongside
            print(f"  pass-through alongside: {a['calls_ok']} calls ok, {a['calls_failed']} failed; added in "
                  f"p50/p99/max {fmt(a['inbound_ms'], 'p50', 1)}/{fmt(a['inbound_ms'], 'p99', 1)}/"
                  f"{fmt(a['inbound_ms'], 'max', 1)} ms (n={a['inbound_ms'].get('n', 0)}), out "
                  f"{fmt(a['outbound_ms'], 'p50', 1)}/{fmt(a['outbound_ms'], 'p99', 1)}/"
                  f"{fmt(a['outbound_ms'], 'max', 1)} ms (n={a['outbound_ms'].get('n', 0)})")  # fmt: skip
        if lv.call_errors:
            for error, n in lv.call_errors.items():
                print(f"  call error x{n}: {error}")
        if lv.driver_frames_skipped:
            print(f"  driver frames skipped (its clock fell > 100 ms behind): {lv.driver_frames_skipped}")
        for message, n in lv.warnings.items():
            print(f"  bridge log x{n}: {message}")
    print(
        f"\nlargest level with p95 <= {report['limit_ms']:g} ms (a miss counts as late): "
        f"{report['capacity'] or 'none'}"
    )
    target = next((lv for lv in levels if lv.calls == TARGET_CALLS), None)
    if target is not None:
        ok50 = target.turn_ms.get("p50", math.inf) <= TARGET_P50_MS
        ok95 = (target.p95_with_misses_ms or math.inf) <= TARGET_P95_MS
        print(f"targets at {TARGET_CALLS} calls: p50 {fmt(target.turn_ms, 'p50')} ms <= {TARGET_P50_MS:g}: "
              f"{'yes' if ok50 else 'no'}; p95 {target.p95_with_misses_ms} ms <= {TARGET_P95_MS:g}: "
              f"{'yes' if ok95 else 'no'}")  # fmt: skip
    if barge:
        print("\nbarge-in during the greeting (each probe a call of its own)")
        print(
            "calls | cough 100 ms: probes false clears | echo -20 dB 1.5 s: probes false clears | "
            f"talk over: probes cleared <= {CLEAR_TARGET_MS:g} ms  p50   max | invalid errors | load avg"
        )
        for b in barge:
            print(
                f"{b.calls:5d} | {b.cough_probes:19d} {b.cough_false_clears:12d} | {b.echo_probes:24d} "
                f"{b.echo_false_clears:12d} | {b.speech_probes:16d} {b.speech_cleared:7d} "
                f"{b.speech_within_target:9d} {fmt(b.clear_ms, 'p50'):>5} {fmt(b.clear_ms, 'max'):>5} | "
                f"{b.not_during_greeting:7d} {sum(b.errors.values()):6d} | "
                f"{' '.join(f'{x:.2f}' for x in b.load_before)}"
            )
            if b.false_clear_ms:
                print(f"  false clears after (ms): {sorted(b.false_clear_ms)}")
            for error, n in b.errors.items():
                print(f"  error x{n}: {error}")
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in report['load_average_end'])}")
    if report.get("alongside_errors"):
        print("pass-through loadtest problems: " + "; ".join(report["alongside_errors"][:5]))


# -- main ------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="1,5,10,20,40", help="concurrent calls per level (climbing)")
    parser.add_argument(
        "--alongside", action=argparse.BooleanOptionalAction, default=True,
        help="a pass-through call through a second bridge during each level, and a baseline (default on)",
    )  # fmt: skip
    parser.add_argument("--baseline-s", type=float, default=20, help="pass-through baseline length (s)")
    parser.add_argument("--barge-in", action="store_true", help="run the barge-in probes after the ladder")
    parser.add_argument("--barge-levels", default="1,5", help="concurrent calls for the barge-in probes")
    parser.add_argument("--barge-rounds", type=int, default=3, help="rounds of the three probes per caller")
    parser.add_argument(
        "--min-turns", type=int, default=24, help="turns per level at least (slots repeat calls)"
    )
    parser.add_argument("--min-rounds", type=int, default=2, help="calls per slot at least")
    parser.add_argument("--ramp", type=float, default=4.0, help="calls start at random within this many s")
    parser.add_argument("--pause-ms", type=int, default=400, help="the caller's pause before answering")
    parser.add_argument("--limit-ms", type=float, default=LIMIT_MS, help="p95 above which the ladder stops")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per level at most")
    parser.add_argument(
        "--quiet-wait", type=float, default=1200, help="wait up to this long for pytest to end"
    )
    parser.add_argument(
        "--keep", type=Path, help="keep the logs, records, timelines and report.json in this folder"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    try:
        ladder = [int(x) for x in args.levels.split(",") if x.strip()]
        barge_levels = [int(x) for x in args.barge_levels.split(",") if x.strip()] if args.barge_in else []
    except ValueError:
        parser.error("--levels and --barge-levels are comma-separated numbers of calls")
    if any(n < 1 for n in ladder + barge_levels):
        parser.error("a level is at least 1 call")

    script = [Step(text, clip_of(text, synthesise(text)) if kind == "say" else None) for kind, text in SCRIPT]
    clips = [step.clip for step in script if step.clip is not None]
    barge_clip = clip_of(BARGE_TEXT, synthesise(BARGE_TEXT))
    cough_clip = cough(float(np.mean([c.level_dbfs for c in clips])))
    waited = wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
    report: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "code": code_state(),
        "waited_for_quiet_s": waited,
        "limit_ms": args.limit_ms,
        "clips": [
            {"text": c.text, "seconds": round(c.seconds, 3), "level_dbfs": c.level_dbfs}
            for c in [*clips, barge_clip, cough_clip]
        ],
    }
    levels: list[Level] = []
    barge: list[BargeLevel] = []
    with tempfile.TemporaryDirectory(prefix="ivr-bench-ivr-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        alongside = Alongside(workdir) if args.alongside else None
        try:
            if alongside is not None:
                alongside.start()
                note(f"pass-through baseline ({args.baseline_s:g} s, no IVR call)")
                alongside.begin("baseline")
                time.sleep(args.baseline_s)
                report["baseline"] = alongside.figures(alongside.end(), None)
            for calls in ladder:
                note(f"level: {calls} concurrent local IVR calls")
                level = run_ivr_level(calls, script, args, workdir, alongside)
                levels.append(level)
                p50, p95 = fmt(level.turn_ms, "p50"), fmt(level.turn_ms, "p95")
                note(
                    f"  {calls} calls: turn p50/p95 {p50}/{p95} ms; of {level.turns} turns "
                    f"{level.missed_late} late, {level.missed_heard_nothing} heard nothing"
                )
                if not level.within_limit:
                    note(f"  p95 (late misses included) above {args.limit_ms:g} ms: the ladder stops here")
                    break
        finally:
            if alongside is not None:
                report["alongside_errors"] = alongside.errors
                alongside.stop()
        for calls in barge_levels:
            note(f"barge-in probes: {calls} concurrent calls")
            barge.append(run_barge_level(calls, cough_clip, barge_clip, args, workdir))
    report["capacity"] = max((lv.calls for lv in levels if lv.within_limit), default=0)
    report["load_average_end"] = list(load_average())
    report["levels"] = [asdict(lv) for lv in levels]
    report["barge_in"] = [asdict(b) for b in barge]
    if args.keep:
        (args.keep / "report.json").write_text(json.dumps(finite(report), indent=2))
    if args.json:
        print(json.dumps(finite(report), indent=2))
    else:
        print_report(report, levels, barge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
