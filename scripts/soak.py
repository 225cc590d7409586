"""Soak and fault tests of the whole bridge, measured from outside its process.

Three parts, each against a fresh `python -m ivr_bridge serve` subprocess on 127.0.0.1:

- leak: many short calls to the echo engine, a few at a time; the bridge's RSS
  (/proc/PID/status VmRSS) after every 100 calls, once the calls of that block have
  ended. Memory per call must be flat after warm-up.
- upstream: a NextEVI-protocol stand-in in its own process, killed with SIGKILL and
  restarted on the same port several times while calls stream. Reports reconnects (the
  bridge's /metrics), time from the restart (and from the kill) to the first caller audio
  the new session received, caller audio dropped per reconnect, and whether every call
  heard a reply after every restart.
- bad: hundreds of connections sending malformed input while one healthy call runs.

The stand-in writes its per-session timeline only when a session ends, and a SIGKILLed
process ends nothing, so this script runs the stand-in itself (`--standin-child`, a
subclass that also appends each session's first audio arrival to a file at once).

    .venv/bin/python scripts/soak.py                  # all parts, about 4 minutes
    .venv/bin/python scripts/soak.py --quick --json   # under a minute, JSON out
    .venv/bin/python scripts/soak.py --parts bad,upstream
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: the package is the checkout next to it

from processes import free_port, percentiles, spawn, status_kib, stop  # noqa: E402

from ivr_bridge.audio import ulaw_encode  # noqa: E402
from ivr_bridge.standins.twilio import TwilioCaller  # noqa: E402

HOST = "127.0.0.1"
API_KEY = "oak_test_key"
CONFIG_ID = "cfg_test"
# A retained call (its Call object, converters, playback records, frame buffers) costs
# tens of KiB; 64 KiB per 100 calls is well under one such object per call, and above the
# page- and arena-sized steps the allocator shows with no leak.
LEAK_LIMIT_KIB_PER_100 = 64.0
WARMUP_CALLS = 200
BLOCK_CALLS = 100


# -- small process and measurement helpers ----------------------------------------------


def spawn_bridge(
    port: int, env: dict[str, str], log: Path, level: str = "WARNING"
) -> subprocess.Popen[bytes]:
    return spawn(["serve", "--port", str(port), "--log-level", level], env, log)


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError, OSError):
            if await check():
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not happen within {timeout} s")


async def bridge_ready(client: httpx.AsyncClient, base: str, proc: subprocess.Popen[bytes]) -> None:
    async def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"bridge exited with status {proc.returncode} during start-up")
        return (await client.get(f"{base}/healthz", timeout=1)).status_code == 200

    await wait_for(up, 30, "bridge start")


async def port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def active_calls(client: httpx.AsyncClient, base: str) -> int:
    return int((await client.get(f"{base}/healthz", timeout=5)).json()["active_calls"])


async def scrape(client: httpx.AsyncClient, base: str) -> dict[str, float]:
    """Every sample of /metrics as {'name{label="v",...}': value}."""
    text = (await client.get(f"{base}/metrics", timeout=10)).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def labelled(metrics: dict[str, float], name: str) -> dict[str, float]:
    """Non-zero samples of one labelled counter, keyed by their label text."""
    prefix = name + "{"
    return {k[len(prefix) : -1]: v for k, v in metrics.items() if k.startswith(prefix) and v}


def tone(ms: int, hz: float = 440.0, amplitude: float = 8000.0) -> bytes:
    t = np.arange(ms * 8) / 8000
    return ulaw_encode((amplitude * np.sin(2 * np.pi * hz * t)).astype(np.int16))


def slope_per_100(points: list[tuple[int, int]]) -> float:
    """Least-squares growth of RSS (KiB) per 100 calls."""
    if len(points) < 2:
        return 0.0
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    return float(np.polyfit(x, y, 1)[0] * 100)


async def end_caller(caller: TwilioCaller) -> None:
    """Hang up if still connected; never raises (the call may have gone already)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(caller.hang_up(), 5)
    if not caller.closed.is_set():
        with contextlib.suppress(Exception):
            await caller.drop()


# -- part 1: leak -------------------------------------------------------------------------


@dataclass
class LeakResult:
    calls: int
    concurrency: int
    calls_completed: int = 0
    calls_failed: int = 0
    echo_heard: int = 0
    rss_idle_kib: int = 0
    rss_kib: list[tuple[int, int]] = field(default_factory=list)  # (calls done, VmRSS)
    growth_kib_per_100: float = 0.0  # least-squares slope after warm-up
    growth_endpoints_kib_per_100: float = 0.0
    limit_kib_per_100: float = LEAK_LIMIT_KIB_PER_100
    memory_judged: bool = False  # enough calls after warm-up for a slope
    failures: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    passed: bool = False


async def short_call(url: str, clip: bytes) -> tuple[str, bool]:
    """One call: 0.3 s silence, a tone, up to 4 s for its echo, hang up. (result, echo heard)."""
    caller = TwilioCaller(url, continuous=True)
    try:
        await asyncio.wait_for(caller.connect(), 5)
        await caller.silence(300)
        await caller.say(clip)
        heard = await caller.wait_until(lambda: caller.received_total > 0, 4.0)
        if caller.closed.is_set():
            return f"ended by bridge ({caller.close_code})", heard
        await asyncio.wait_for(caller.hang_up(), 5)
        return "ok", heard
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        return type(exc).__name__, False
    finally:
        await end_caller(caller)


async def run_leak(args: argparse.Namespace, workdir: Path) -> LeakResult:
    result = LeakResult(calls=args.calls, concurrency=args.leak_concurrency)
    port = free_port()
    base = f"http://{HOST}:{port}"
    bridge = spawn_bridge(
        port,
        # Room above the concurrency: a call still closing in the bridge must not make
        # the next one hit the cap.
        {"IVR_PROVIDER": "echo", "IVR_MAX_CALLS": str(args.leak_concurrency * 4)},
        workdir / "leak-bridge.log",
    )
    clip = tone(300)
    url = f"ws://{HOST}:{port}/media-stream"
    failures: Counter[str] = Counter()
    started = time.monotonic()
    try:
        async with httpx.AsyncClient() as client:
            await bridge_ready(client, base, bridge)
            result.rss_idle_kib = status_kib(bridge.pid, "VmRSS")
            done = 0
            while done < args.calls:
                block = min(BLOCK_CALLS, args.calls - done)
                queue = iter(range(block))

                async def worker(queue: Iterator[int] = queue) -> None:
                    for _ in queue:  # shared iterator: each call taken once
                        outcome, heard = await asyncio.wait_for(short_call(url, clip), 20)
                        result.echo_heard += heard
                        if outcome == "ok":
                            result.calls_completed += 1
                        else:
                            result.calls_failed += 1
                            failures[outcome] += 1

                await asyncio.gather(*(worker() for _ in range(args.leak_concurrency)))
                done += block
                # Sampled once the block's calls are gone from the bridge, so the series
                # compares like with like (no call state in flight).
                await wait_for(lambda: _none_active(client, base), 15, "calls ending")
                await asyncio.sleep(0.3)
                result.rss_kib.append((done, status_kib(bridge.pid, "VmRSS")))
                if not args.json:
                    print(f"  leak: {done} calls, VmRSS {result.rss_kib[-1][1]} KiB", flush=True)
            result.outcomes = labelled(await scrape(client, base), "ivr_calls_total")
    finally:
        stop(bridge)
    result.seconds = round(time.monotonic() - started, 1)
    result.failures = dict(failures)
    after = [p for p in result.rss_kib if p[0] >= WARMUP_CALLS]
    result.growth_kib_per_100 = round(slope_per_100(after), 1)
    if len(after) >= 2:
        span = (after[-1][0] - after[0][0]) / 100
        result.growth_endpoints_kib_per_100 = round((after[-1][1] - after[0][1]) / span, 1)
    # Fewer than three samples after warm-up (e.g. --quick) is still warm-up: reported,
    # not judged.
    result.memory_judged = len(after) >= 3
    flat = result.growth_kib_per_100 < LEAK_LIMIT_KIB_PER_100 or not result.memory_judged
    result.passed = result.calls_failed == 0 and flat
    return result


async def _none_active(client: httpx.AsyncClient, base: str) -> bool:
    return await active_calls(client, base) == 0


# -- part 2: upstream drops -----------------------------------------------------------


@dataclass
class UpstreamResult:
    calls: int
    restarts: int
    restart_every_s: float
    down_s: float
    calls_completed: int = 0
    calls_failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    reconnects: float = 0.0
    reconnects_expected: int = 0
    gap_audio_dropped_ms: float = 0.0
    dropped_ms_per_reconnect: float = 0.0
    standin_down_ms: dict[str, float] = field(default_factory=dict)  # kill -> listening again
    sessions_per_epoch: list[int] = field(default_factory=list)
    first_audio_after_restart_ms: dict[str, float] = field(default_factory=dict)
    first_audio_after_kill_ms: dict[str, float] = field(default_factory=dict)
    replies_heard: list[int] = field(default_factory=list)  # per epoch (0 = before any kill)
    every_call_replied_after_every_restart: bool = False
    upstream_errors: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    passed: bool = False


def spawn_standin(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    # Its --timeline is written as events happen, so a stand-in killed with SIGKILL has
    # already recorded when it listened and each session's first audio.
    args = ["stub-voice-api", "--port", str(port), "--timeline", str(workdir / "standin-timeline.jsonl")]
    return spawn(args, {}, workdir / "standin.log")


async def run_upstream(args: argparse.Namespace, workdir: Path) -> UpstreamResult:
    n, k, every, down = args.upstream_calls, args.restarts, args.restart_every, args.down
    result = UpstreamResult(
        calls=n, restarts=k, restart_every_s=every, down_s=down, reconnects_expected=n * k
    )
    standin_port, port = free_port(), free_port()
    base = f"http://{HOST}:{port}"
    standin = spawn_standin(standin_port, workdir)
    bridge = spawn_bridge(
        port,
        {
            "IVR_PROVIDER": "nextevi",
            "NEXTEVI_URL": f"ws://{HOST}:{standin_port}/ws/voice",
            "NEXTEVI_API_KEY": API_KEY,
            "NEXTEVI_CONFIG_ID": CONFIG_ID,
            "IVR_RECONNECT_BUDGET_S": "10",
            "IVR_MAX_CALLS": str(n + 10),
        },
        workdir / "upstream-bridge.log",
        level="INFO",
    )
    clip = tone(400)
    url = f"ws://{HOST}:{port}/media-stream"
    kills: list[float] = []
    restarts: list[float] = []  # the new stand-in accepts connections (refined from its own record)
    heard = [[False] * (k + 1) for _ in range(n)]
    failures: Counter[str] = Counter()
    started = time.monotonic()
    procs = [standin]
    try:
        async with httpx.AsyncClient() as client:
            await bridge_ready(client, base, bridge)
            await wait_for(lambda: port_open(standin_port), 30, "stand-in start")
            callers = [TwilioCaller(url, continuous=True) for _ in range(n)]
            for caller in callers:
                await asyncio.wait_for(caller.connect(), 5)
                await asyncio.sleep(0.05)  # a short ramp, as calls arrive in life
            t0 = time.monotonic()
            end_at = t0 + (k + 1) * every
            # Epoch e starts at t0 (e = 0) or at restart e; it ends just before the next kill.
            epoch_started = [asyncio.Event() for _ in range(k + 1)]
            epoch_started[0].set()

            async def chaos() -> None:
                for e in range(1, k + 1):
                    await asyncio.sleep(max(0.0, t0 + e * every - time.monotonic()))
                    victim = procs[-1]
                    kills.append(time.monotonic())
                    victim.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(victim.wait)
                    await asyncio.sleep(down)
                    procs.append(spawn_standin(standin_port, workdir))
                    await wait_for(lambda: port_open(standin_port), 30, "stand-in restart")
                    restarts.append(time.monotonic())
                    epoch_started[e].set()

            async def talk(i: int, caller: TwilioCaller) -> None:
                for e in range(k + 1):
                    await epoch_started[e].wait()
                    until = t0 + (e + 1) * every - 0.2 if e < k else end_at
                    while time.monotonic() < until and not caller.closed.is_set():
                        before = caller.received_total
                        await caller.say(clip)
                        wait = max(0.1, min(3.0, until - time.monotonic()))
                        if await caller.wait_until(lambda b=before: caller.received_total > b, wait):
                            heard[i][e] = True
                            break
                    # Let the reply and its tail play before the next kill.
                    await asyncio.sleep(max(0.0, until - time.monotonic()) if e < k else 0)
                await asyncio.sleep(max(0.0, end_at - time.monotonic()))

            await asyncio.gather(chaos(), *(talk(i, c) for i, c in enumerate(callers)))
            for caller in callers:
                if caller.closed.is_set():
                    result.calls_failed += 1
                    failures[f"ended by bridge ({caller.close_code})"] += 1
                else:
                    result.calls_completed += 1
            await asyncio.gather(*(end_caller(c) for c in callers))
            await wait_for(lambda: _none_active(client, base), 15, "calls ending")
            metrics = await scrape(client, base)
    finally:
        stop(bridge)
        for proc in procs:
            stop(proc)
    result.seconds = round(time.monotonic() - started, 1)
    result.failures = dict(failures)
    result.reconnects = metrics.get("ivr_reconnects_total", 0.0)
    result.gap_audio_dropped_ms = metrics.get("ivr_gap_audio_dropped_ms_total", 0.0)
    result.dropped_ms_per_reconnect = round(result.gap_audio_dropped_ms / max(result.reconnects, 1), 1)
    result.upstream_errors = labelled(metrics, "ivr_upstream_errors_total")
    result.outcomes = labelled(metrics, "ivr_calls_total")
    result.standin_down_ms = percentiles(
        [(r - kl) * 1000 for kl, r in zip(kills, restarts, strict=False)], digits=1
    )
    result.replies_heard = [sum(h[e] for h in heard) for e in range(k + 1)]
    result.every_call_replied_after_every_restart = all(all(h) for h in heard)
    records = read_jsonl(workdir / "standin-timeline.jsonl")
    listening = [r["at"] for r in records if r["event"] == "listening"]
    restarts = listening[1:] if len(listening) == len(kills) + 1 else restarts
    sessions = [r for r in records if r["event"] == "first_audio"]
    per_epoch = [0] * (k + 1)
    from_restart: list[float] = []
    from_kill: list[float] = []
    for s in sessions:
        e = sum(1 for r in restarts if r <= s["opened_at"])
        per_epoch[e] += 1
        if e:
            from_restart.append((s["at"] - restarts[e - 1]) * 1000)
            from_kill.append((s["at"] - kills[e - 1]) * 1000)
    result.sessions_per_epoch = per_epoch
    result.first_audio_after_restart_ms = percentiles(from_restart, digits=1)
    result.first_audio_after_kill_ms = percentiles(from_kill, digits=1)
    result.passed = (
        result.calls_failed == 0
        and result.reconnects == result.reconnects_expected
        and result.every_call_replied_after_every_restart
    )
    return result


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- part 3: bad input ----------------------------------------------------------------


@dataclass
class BadResult:
    tries: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> how it ended
    bridge_alive: bool = False
    healthz_status: int = 0
    healthy_call_completed: bool = False
    healthy_rounds: int = 0
    healthy_echoes: int = 0
    bad_frames_total: float = 0.0
    bad_input: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    passed: bool = False


class RawStream:
    """A hand-driven Media Stream: frames exactly as given, good or bad."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.sid = "MZ" + os.urandom(16).hex()
        self.seq = 0

    def msg(self, event: str, **body: Any) -> str:
        self.seq += 1
        return json.dumps({"event": event, "sequenceNumber": str(self.seq), "streamSid": self.sid, **body})

    def start(self, media_format: dict[str, Any] | None = None) -> str:
        fmt = media_format or {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        body = {"streamSid": self.sid, "callSid": "CA" + os.urandom(16).hex(), "accountSid": "AC" + "0" * 32,
                "tracks": ["inbound"], "customParameters": {}, "mediaFormat": fmt}  # fmt: skip
        return self.msg("start", start=body)

    def media(self, payload: bytes | str, chunk: Any = None) -> str:
        text = payload if isinstance(payload, str) else base64.b64encode(payload).decode()
        chunk = self.seq if chunk is None else chunk
        return self.msg(
            "media", media={"track": "inbound", "chunk": str(chunk), "timestamp": "0", "payload": text}
        )

    def stop(self) -> str:
        return self.msg("stop", stop={"accountSid": "AC" + "0" * 32, "callSid": "CA0"})


SILENT_FRAME = b"\xff" * 160

# Each kind: the frames a try sends after `connected`; `stop` and a wait for the close follow.
BAD_KINDS: dict[str, Callable[[RawStream], list[str | bytes]]] = {
    "malformed_json": lambda s: [
        s.start(),
        '{"event": "media", "streamSid": ',
        "{{{{",
        s.media(SILENT_FRAME),
    ],
    "not_an_object": lambda s: [s.start(), "[1, 2, 3]", '"start"', "null"],
    "deep_nesting": lambda s: [s.start(), "[" * 100_000],
    "binary_frame": lambda s: [s.start(), os.urandom(320), b""],
    "unknown_event": lambda s: [s.start(), s.msg("hello"), s.msg("media_v2"), s.msg("")],
    "media_before_start": lambda s: [s.media(SILENT_FRAME), s.msg("mark", mark={"name": "x"}), s.start()],
    "second_start": lambda s: [s.start(), s.media(SILENT_FRAME), s.start(), s.start()],
    "wrong_stream_sid": lambda s: [s.start(), s.media(SILENT_FRAME).replace(s.sid, "MZ" + "f" * 32)],
    "bad_base64": lambda s: [s.start(), s.media("!!not base64!!"), s.media("YWJ"), s.media("=" * 9)],
    "odd_length_payload": lambda s: [
        s.start(),
        s.media(b"\x7f" * 7),
        s.media(b"\x01" * 161),
        s.media(b"\x02"),
    ],
    "bad_numbers": lambda s: [
        s.start(),
        s.media(SILENT_FRAME, chunk="1e400"),
        s.media(SILENT_FRAME, chunk="x"),
    ],
    "mark_nobody_sent": lambda s: [
        s.start(),
        s.msg("mark", mark={"name": "r999.999"}),
        s.msg("mark", mark={}),
    ],
    "huge_frame_5mb": lambda s: [s.start(), s.media(b"\xff" * (5 * 1024 * 1024 * 3 // 4))],
    "unusable_start": lambda s: [s.start({"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1})],
    # Ten seconds of audio at once: far ahead of real time (the bridge's flood guard).
    "flood": lambda s: [s.start(), *(s.media(SILENT_FRAME) for _ in range(500))],
}


async def bad_try(url: str, kind: str) -> str:
    """One connection sending one kind of bad input; how it ended, e.g. 'closed 1000'."""
    try:
        async with asyncio.timeout(15):
            async with connect(url, compression=None, max_size=2**20, close_timeout=2) as ws:
                s = RawStream(ws)
                try:
                    await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
                    for frame in BAD_KINDS[kind](s):
                        await ws.send(frame)
                    await ws.send(s.stop())
                    # The bridge ends the call on `stop` (or earlier, for a fatal frame).
                    async with asyncio.timeout(5):
                        async for _ in ws:
                            pass
                except ConnectionClosed:
                    pass
                except TimeoutError:
                    return "still open 5 s after stop"
                code = ws.close_code
                return f"closed {code}"
    except TimeoutError:
        return "timeout"
    except (OSError, InvalidHandshake) as exc:
        return type(exc).__name__


async def abort_try(url: str) -> str:
    """A stream whose TCP connection vanishes mid-call, with no close frame."""
    try:
        async with asyncio.timeout(10):
            ws = await connect(url, compression=None)
            s = RawStream(ws)
            await ws.send(s.start())
            await ws.send(s.media(SILENT_FRAME))
            ws.transport.abort()
            return "aborted"
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        return type(exc).__name__


async def run_bad(args: argparse.Namespace, workdir: Path) -> BadResult:
    result = BadResult()
    port = free_port()
    base = f"http://{HOST}:{port}"
    bridge = spawn_bridge(port, {"IVR_PROVIDER": "echo", "IVR_MAX_CALLS": "50"}, workdir / "bad-bridge.log")
    url = f"ws://{HOST}:{port}/media-stream"
    clip = tone(400)
    outcomes: dict[str, Counter[str]] = {kind: Counter() for kind in [*BAD_KINDS, "tcp_abort"]}
    started = time.monotonic()
    try:
        async with httpx.AsyncClient() as client:
            await bridge_ready(client, base, bridge)
            healthy = TwilioCaller(url, continuous=True)
            await asyncio.wait_for(healthy.connect(), 5)
            done = asyncio.Event()

            async def keep_talking() -> None:
                # A turn every ~2 s until the abuse is over; each must be echoed.
                while not done.is_set() and not healthy.closed.is_set():
                    before = healthy.received_total
                    await healthy.say(clip)
                    result.healthy_rounds += 1
                    if await healthy.wait_until(lambda b=before: healthy.received_total > b, 4.0):
                        result.healthy_echoes += 1
                    await healthy.silence(600)

            async def abuse() -> None:
                jobs = [kind for _ in range(args.bad_rounds) for kind in [*BAD_KINDS, "tcp_abort"]]
                queue = iter(jobs)
                gate = asyncio.Semaphore(args.bad_concurrency)

                async def worker() -> None:
                    for kind in queue:
                        async with gate:
                            how = await (abort_try(url) if kind == "tcp_abort" else bad_try(url, kind))
                        outcomes[kind][how] += 1
                        result.tries += 1

                await asyncio.gather(*(worker() for _ in range(args.bad_concurrency)))
                # Even a quick run gives the healthy call a few turns alongside.
                await asyncio.sleep(max(0.0, started + 8 - time.monotonic()))
                done.set()

            await asyncio.gather(abuse(), keep_talking())
            result.healthy_call_completed = not healthy.closed.is_set()
            await end_caller(healthy)
            await wait_for(lambda: _none_active(client, base), 15, "calls ending")
            result.bridge_alive = bridge.poll() is None
            result.healthz_status = (await client.get(f"{base}/healthz", timeout=5)).status_code
            metrics = await scrape(client, base)
    finally:
        result.bridge_alive = result.bridge_alive and bridge.poll() is None
        stop(bridge)
    result.seconds = round(time.monotonic() - started, 1)
    result.by_kind = {kind: dict(c) for kind, c in outcomes.items()}
    result.bad_frames_total = metrics.get("ivr_bad_frames_total", 0.0)
    result.bad_input = labelled(metrics, "ivr_bad_input_total")
    result.outcomes = labelled(metrics, "ivr_calls_total")
    result.passed = (
        result.bridge_alive
        and result.healthz_status == 200
        and result.healthy_call_completed
        and result.healthy_rounds > 0
        and result.healthy_echoes == result.healthy_rounds
    )
    return result


# -- the stand-in child -----------------------------------------------------------------


# -- report -------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if "leak" in results:
        r: LeakResult = results["leak"]
        lines += [
            f"leak: {verdict(r.passed)}  ({r.seconds} s)",
            f"  calls {r.calls} ({r.concurrency} at once): completed {r.calls_completed}, "
            f"failed {r.calls_failed}"
            f"{' ' + str(r.failures) if r.failures else ''}; echo heard in {r.echo_heard}",
            f"  VmRSS idle {r.rss_idle_kib} KiB; after each {BLOCK_CALLS} calls (KiB): "
            + ", ".join(str(v) for _, v in r.rss_kib),
            f"  growth after {WARMUP_CALLS} calls: {r.growth_kib_per_100} KiB/100 calls (least squares), "
            f"{r.growth_endpoints_kib_per_100} (end points); limit < {r.limit_kib_per_100:g}"
            f"{'' if r.memory_judged else ' (not judged: too few calls after warm-up)'}",
            f"  bridge call outcomes: {r.outcomes}",
        ]
    if "upstream" in results:
        u: UpstreamResult = results["upstream"]
        lines += [
            f"upstream: {verdict(u.passed)}  ({u.seconds} s)",
            f"  {u.calls} calls streaming; stand-in SIGKILLed {u.restarts} times, "
            f"every {u.restart_every_s:g} s, "
            f"restarted {u.down_s:g} s later (kill -> listening ms: {u.standin_down_ms})",
            f"  calls completed {u.calls_completed}, failed {u.calls_failed}"
            f"{' ' + str(u.failures) if u.failures else ''}",
            f"  reconnects {u.reconnects:g} (expected {u.reconnects_expected}); "
            f"stand-in sessions per epoch {u.sessions_per_epoch}",
            f"  first caller audio at the new session, ms after restart: {u.first_audio_after_restart_ms}",
            f"  ... ms after the kill: {u.first_audio_after_kill_ms}",
            f"  caller audio dropped: {u.gap_audio_dropped_ms:g} ms, "
            f"{u.dropped_ms_per_reconnect:g} ms per reconnect",
            f"  callers hearing a reply per epoch (0 = before the first kill): {u.replies_heard}; "
            f"every call after every restart: {u.every_call_replied_after_every_restart}",
            f"  upstream errors {u.upstream_errors}; call outcomes {u.outcomes}",
        ]
    if "bad" in results:
        b: BadResult = results["bad"]
        lines += [
            f"bad: {verdict(b.passed)}  ({b.seconds} s)",
            f"  {b.tries} bad connections; bridge alive {b.bridge_alive}, /healthz {b.healthz_status}; "
            f"healthy call completed {b.healthy_call_completed}, "
            f"echoes {b.healthy_echoes}/{b.healthy_rounds}",
        ]
        lines += [f"    {kind:20s} {how}" for kind, how in b.by_kind.items()]
        lines += [
            f"  ivr_bad_frames_total {b.bad_frames_total:g}; by kind {b.bad_input}",
            f"  call outcomes {b.outcomes}",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts: under a minute")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--parts", default="leak,upstream,bad", help="comma-separated: leak,upstream,bad")
    parser.add_argument("--calls", type=int, help="leak: calls (default 1000, quick 200)")
    parser.add_argument("--leak-concurrency", type=int, default=10)
    parser.add_argument(
        "--upstream-calls", type=int, help="upstream: concurrent calls (default 20, quick 10)"
    )
    parser.add_argument("--restarts", type=int, help="upstream: stand-in kills (default 3, quick 2)")
    parser.add_argument("--restart-every", type=float, default=6.0, help="upstream: seconds between kills")
    parser.add_argument("--down", type=float, default=0.5, help="upstream: seconds the stand-in stays dead")
    parser.add_argument("--bad-rounds", type=int, help="bad: rounds of every kind (default 30, quick 6)")
    parser.add_argument("--bad-concurrency", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="keep logs and timelines in this folder")
    args = parser.parse_args(argv)
    args.calls = args.calls or (200 if args.quick else 1000)
    args.upstream_calls = args.upstream_calls or (10 if args.quick else 20)
    args.restarts = args.restarts or (2 if args.quick else 3)
    args.bad_rounds = args.bad_rounds or (6 if args.quick else 30)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    runners = {"leak": run_leak, "upstream": run_upstream, "bad": run_bad}
    if unknown := [p for p in parts if p not in runners]:
        parser.error(f"unknown part(s): {', '.join(unknown)}")

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ivr-soak-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for part in parts:
            if not args.json:
                print(f"running {part} ...", flush=True)
            results[part] = asyncio.run(runners[part](args, workdir))
            if not args.json:
                print(report({part: results[part]}), flush=True)
    passed = all(r.passed for r in results.values())
    if args.json:
        print(json.dumps({name: asdict(r) for name, r in results.items()} | {"passed": passed}, indent=2))
    else:
        print(f"\noverall: {verdict(passed)}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
