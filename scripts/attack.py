"""Attack a production-mode bridge as an outsider would, and measure what it costs a live call.

Starts `python -m ivr_bridge serve` with TWILIO_AUTH_TOKEN set (production mode) on
127.0.0.1, places one healthy signed call that talks to the embedded echo engine, then
runs each attack in turn. During every attack the bridge's own event-loop lag histogram
(`ivr_event_loop_lag_seconds`, a timer due every 20 ms) says how long the loop that
carries every call's audio was held up, and a probe fetches /healthz every 20 ms as an
outsider sees it. After every attack the healthy call speaks and must hear its echo.

    .venv/bin/python scripts/attack.py              # every attack, about a minute
    .venv/bin/python scripts/attack.py --json       # the figures as JSON too

Only loopback is ever attacked; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import sys
import time
from base64 import b64encode
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ivr_bridge.audio.g711 import ulaw_encode
from ivr_bridge.loadgen.webhook import CallDetails, StreamTarget, fetch_stream, sign, stream_headers
from ivr_bridge.standins.twilio import TwilioCaller
from scripts.processes import free_port, spawn, status_kib, stop

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
MAX_CALLS = 5
REQUEST_TIMEOUT_S = 3.0
START_TIMEOUT_S = 2.0
MAX_PENDING = 256
PROBE_EVERY_S = 0.02


@dataclass
class Result:
    attack: str
    outcome: str  # what the bridge did with it
    healthz_ms_p50: float
    healthz_ms_max: float
    probes_failed: int
    loop_lag_ms: str  # the worst event-loop lag during it, as the bucket it fell in
    call_heard_echo: bool  # the healthy call spoke during the attack and after it: heard both echoes
    echo_ms: float  # the slower of the two, from the end of its words to the echo


def tone(ms: int, hz: float = 500.0) -> bytes:
    t = np.arange(8 * ms) / 8000
    return ulaw_encode((8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16))


class Bridge:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.webhook = self.base + "/twiml"
        env = {
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "IVR_PUBLIC_URL": self.base,
            "IVR_MAX_CALLS": str(MAX_CALLS),
            "IVR_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
            "IVR_START_TIMEOUT_S": str(START_TIMEOUT_S),
            "IVR_MAX_PENDING_CONNECTIONS": str(MAX_PENDING),
            "IVR_DATABASE_PATH": str(workdir / "calls.db"),
            "IVR_INSTANCE_ID": "attack",
        }
        self.proc = spawn(["serve", "--port", str(self.port)], env, workdir / "bridge.log")

    async def ready(self) -> None:
        async with httpx.AsyncClient(timeout=2) as client:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(self.base + "/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError("the bridge did not start; see bridge.log")

    async def caller(self, call_sid: str | None = None, **kwargs: Any) -> TwilioCaller:
        call = CallDetails(call_sid=call_sid) if call_sid else CallDetails()
        target = await fetch_stream(self.webhook, call, AUTH_TOKEN)
        return TwilioCaller(
            target.url,
            call_sid=call.call_sid,
            custom_parameters=target.parameters,
            headers=stream_headers(target, AUTH_TOKEN),
            continuous=True,
            **kwargs,
        )


def probe(base: str, stop_at: Any, results: Any) -> None:
    """/healthz every 20 ms until `stop_at` is set, as an outsider sees it: in a process of
    its own, so the attacker's work does not delay the probe's own clock."""
    import http.client

    host, port = base.removeprefix("http://").split(":")
    times, failed = [], 0
    while not stop_at.is_set():
        started = time.perf_counter()
        try:
            connection = http.client.HTTPConnection(host, int(port), timeout=5)
            connection.request("GET", "/healthz")
            ok = connection.getresponse().status == 200
            connection.close()
        except OSError:
            ok = False
        if ok:
            times.append((time.perf_counter() - started) * 1000)
        else:
            failed += 1
        time.sleep(PROBE_EVERY_S)
    results.put((times, failed))


async def echo_heard(caller: TwilioCaller) -> tuple[bool, float]:
    before = caller.received_total
    await caller.say(tone(300))
    said = time.monotonic()
    heard = await caller.wait_until(lambda: caller.received_total >= before + 8 * 200, 10)
    return heard, round((time.monotonic() - said) * 1000, 1)


async def loop_lag_buckets(base: str) -> dict[float, float]:
    """The bridge's `ivr_event_loop_lag_seconds` histogram: cumulative count per bucket."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(base + "/metrics")).text
    buckets = {}
    for line in text.splitlines():
        if line.startswith("ivr_event_loop_lag_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def worst_lag(before: dict[float, float], after: dict[float, float]) -> str:
    """The smallest bucket holding every lag observed between the two readings, and how many
    of the samples were over 5 ms (the target)."""
    total = after[float("inf")] - before[float("inf")]
    over = total - (after[0.005] - before.get(0.005, 0))
    for bound in sorted(after):
        if after[bound] - before.get(bound, 0) >= total:
            worst = f"< {bound * 1000:g}" if bound != float("inf") else "> 5000"
            return f"{worst} ({over:.0f} of {total:.0f} over 5)"
    return "?"


async def run_attack(
    bridge: Bridge, healthy: TwilioCaller, name: str, attack: Callable[[], Awaitable[str]]
) -> Result:
    lag_before = await loop_lag_buckets(bridge.base)
    context = multiprocessing.get_context("spawn")
    done, results = context.Event(), context.Queue()
    prober = context.Process(target=probe, args=(bridge.base, done, results), daemon=True)
    prober.start()
    talk = asyncio.create_task(echo_heard(healthy))  # the healthy call talks during the attack
    try:
        outcome = await asyncio.wait_for(attack(), 60)
    except Exception as exc:  # an attack that errors is reported, not fatal to the run
        outcome = f"attack failed: {type(exc).__name__}: {exc}"[:120]
    during, during_ms = await talk
    done.set()
    times, failed = await asyncio.to_thread(results.get, True, 30)
    prober.join(10)
    lag = worst_lag(lag_before, await loop_lag_buckets(bridge.base))
    heard, echo_ms = await echo_heard(healthy)
    times.sort()
    return Result(
        name,
        outcome,
        round(times[len(times) // 2], 2) if times else -1,
        round(times[-1], 2) if times else -1,
        failed,
        lag,
        during and heard,
        max(during_ms, echo_ms),
    )


# -- the attacks ---------------------------------------------------------------------------


async def raw(port: int, head: bytes, body: bytes = b"", timeout: float = 30) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    answer += chunk
        return answer
    finally:
        writer.close()


def status(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode("latin-1")[9:12] or "closed"


async def huge_form(bridge: Bridge) -> str:
    body = b"&".join(b"f%d=1" % i for i in range(1_000_000))
    head = b"POST /twiml HTTP/1.1\r\nHost: x\r\nX-Twilio-Signature: x\r\nContent-Length: %d\r\n\r\n" % len(
        body
    )
    # The head and the first 64 KB: the answer comes before the rest would be read.
    answers = await asyncio.gather(*(raw(bridge.port, head, body[:65536]) for _ in range(5)))
    return f"5 x {len(body) / 1e6:.1f} MB / 1,000,000 fields: HTTP {', '.join(status(a) for a in answers)}"


async def giant_body(bridge: Bridge) -> str:
    rss = status_kib(bridge.proc.pid, "VmRSS")
    head = b"POST /twiml HTTP/1.1\r\nHost: x\r\nX-Twilio-Signature: x\r\nContent-Length: 268435456\r\n\r\n"
    chunk = b"a=1&" * 16384
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    answer = asyncio.create_task(reader.read(1024))
    writer.write(head)
    sent = 0
    with contextlib.suppress(ConnectionError):
        for _ in range(4096):  # at most 256 MB, until the bridge closes
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
    with contextlib.suppress(TimeoutError, ConnectionError):
        await asyncio.wait_for(asyncio.shield(answer), 5)
    writer.close()
    first = answer.result() if answer.done() and not answer.exception() else b""
    grown = status_kib(bridge.proc.pid, "VmRSS") - rss
    return (
        f"256 MB declared: HTTP {status(first)} after the headers; {sent / 1e6:.1f} MB went into "
        f"socket buffers before the close; bridge RSS +{grown} KiB"
    )


async def chunked_body(bridge: Bridge) -> str:
    head = b"POST /twiml HTTP/1.1\r\nHost: x\r\nX-Twilio-Signature: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b"a=" + b"1" * 16382
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(64))  # 1 MB
    answer = await raw(bridge.port, head, body)
    return f"1 MB chunked, no length: HTTP {status(answer)}"


async def many_fields(bridge: Bridge) -> str:
    body = b"&".join([b"a=1"] * 5000)
    head = b"POST /twiml HTTP/1.1\r\nHost: x\r\nX-Twilio-Signature: x\r\nContent-Length: %d\r\n\r\n" % len(
        body
    )
    return f"5,000 fields in {len(body)} bytes: HTTP {status(await raw(bridge.port, head, body))}"


async def idle_connections(bridge: Bridge, count: int, trickle: bool) -> str:
    opened = time.monotonic()
    streams = [await asyncio.open_connection("127.0.0.1", bridge.port) for _ in range(count)]

    async def until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
        with contextlib.suppress(ConnectionError):
            if trickle:
                writer.write(b"GET /healthz HTTP/1.1\r\n")
            while True:
                try:
                    async with asyncio.timeout(0.5):
                        if not await reader.read(1024):
                            break
                except TimeoutError:
                    if trickle:
                        writer.write(b"X")  # a byte every half second, never a whole request
                    continue
        writer.close()
        return time.monotonic() - opened

    try:
        closed_after = await asyncio.wait_for(
            asyncio.gather(*(until_closed(r, w) for r, w in streams)), REQUEST_TIMEOUT_S + 20
        )
    except TimeoutError:
        return f"{count} {'trickling' if trickle else 'silent'} connections: NOT all closed"
    return (
        f"{count} {'trickling' if trickle else 'silent'} connections: all closed after "
        f"{min(closed_after):.1f}-{max(closed_after):.1f} s (timeout {REQUEST_TIMEOUT_S:g} s)"
    )


async def connection_flood(bridge: Bridge) -> str:
    streams = []
    with contextlib.suppress(OSError):
        for _ in range(1100):
            streams.append(await asyncio.open_connection("127.0.0.1", bridge.port))
    try:
        started = time.monotonic()
        target = await fetch_stream(bridge.webhook, CallDetails(), AUTH_TOKEN)
        took = (time.monotonic() - started) * 1000
        answered = "token" in target.parameters
    finally:
        for _, writer in streams:
            writer.close()
    verdict = "answered" if answered else "FAILED"
    return f"{len(streams)} idle connections held: Twilio's webhook {verdict} in {took:.0f} ms"


async def idle_upgrades(bridge: Bridge) -> str:
    upgrade = stream_headers(
        StreamTarget(bridge.base.replace("http", "ws") + "/media-stream", {}), AUTH_TOKEN
    )
    idle = [
        await connect(bridge.base.replace("http", "ws") + "/media-stream", additional_headers=upgrade)
        for _ in range(10)
    ]
    admitted = 0
    try:
        for _ in range(MAX_CALLS - 1):  # the healthy call holds one slot
            caller = await bridge.caller()
            async with caller:
                admitted += await caller.wait_until(
                    lambda c=caller: c.received_total > 0 or c.closed.is_set(), 2
                ) or (not caller.closed.is_set())
                await caller.hang_up()
        closed = 0
        for ws in idle:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.wait_closed(), START_TIMEOUT_S + 10)
                closed += ws.close_code == 1008
    finally:
        for ws in idle:
            await ws.close()
    return (
        f"10 idle upgrades with one captured header: {admitted} of {MAX_CALLS - 1} real calls "
        f"admitted; {closed} of 10 closed (1008) after {START_TIMEOUT_S:g} s"
    )


async def replayed_webhook(bridge: Bridge, healthy: TwilioCaller) -> str:
    form = CallDetails(call_sid=healthy.call_sid).form()
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(
            bridge.webhook, data=form, headers={"X-Twilio-Signature": sign(AUTH_TOKEN, bridge.webhook, form)}
        )
    streamed = "<Stream" in answer.text
    return f"the live call's signed webhook replayed: {'a STREAM' if streamed else 'the fallback TwiML'}"


async def frame_flood(bridge: Bridge, before_start: bool) -> str:
    url = bridge.base.replace("http", "ws") + "/media-stream"
    headers = stream_headers(StreamTarget(url, {}), AUTH_TOKEN)
    big = "x" * 64_000
    sent = 0
    started = time.monotonic()
    async with connect(url, additional_headers=headers, max_size=None, compression=None) as ws:
        if not before_start:
            caller_call = CallDetails()
            target = await fetch_stream(bridge.webhook, caller_call, AUTH_TOKEN)
            start = {
                "streamSid": "MZ1",
                "callSid": caller_call.call_sid,
                "accountSid": "AC1",
                "customParameters": target.parameters,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            }
            await ws.send(json.dumps({"event": "start", "streamSid": "MZ1", "start": start}))
            frame = json.dumps({"event": "mark", "streamSid": "MZ1", "mark": {"name": big}})
        else:
            frame = json.dumps({"event": "connected", "protocol": big})
        with contextlib.suppress(Exception):
            for _ in range(2000):  # 128 MB at most
                await ws.send(frame)
                sent += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ws.wait_closed(), 10)
    what = "pre-start frames" if before_start else "mark echoes"
    took = time.monotonic() - started
    return f"64 KB {what} at full speed: closed {ws.close_code} after {sent} frames, {took:.2f} s"


async def huge_sequence(bridge: Bridge) -> str:
    caller = await bridge.caller()
    async with caller:
        await caller._send_event(
            "media", {"media": {"payload": b64encode(b"\xff" * 160).decode()}, "sequenceNumber": 1e308}
        )
        await caller.hang_up()
    async with httpx.AsyncClient(timeout=10) as client:
        codes = [(await client.get(bridge.base + "/metrics")).status_code for _ in range(3)]
    return f"sequenceNumber 1e308: /metrics answers {codes}"


# -- the run --------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> list[Result]:
    workdir = Path(args.keep) if args.keep else Path(__import__("tempfile").mkdtemp(prefix="ivr-attack-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bridge = Bridge(workdir)
    results: list[Result] = []
    try:
        await bridge.ready()
        healthy = await bridge.caller()
        async with healthy:
            await echo_heard(healthy)  # warm-up: the first reply's one-time costs are no attack's
            for _ in range(args.baselines):
                idle = await run_attack(bridge, healthy, "none (baseline)", lambda: asyncio.sleep(3, "-"))
                results.append(idle)
            attacks: list[tuple[str, Callable[[], Awaitable[str]]]] = [
                ("9 MB form, a million fields", lambda: huge_form(bridge)),
                ("256 MB body", lambda: giant_body(bridge)),
                ("chunked body, no length", lambda: chunked_body(bridge)),
                ("too many fields", lambda: many_fields(bridge)),
                ("300 silent connections", lambda: idle_connections(bridge, 300, trickle=False)),
                ("300 trickling connections", lambda: idle_connections(bridge, 300, trickle=True)),
                ("1100 idle connections", lambda: connection_flood(bridge)),
                ("idle upgrades, one captured header", lambda: idle_upgrades(bridge)),
                ("replayed webhook", lambda: replayed_webhook(bridge, healthy)),
                ("flood before start", lambda: frame_flood(bridge, before_start=True)),
                ("mark-echo flood", lambda: frame_flood(bridge, before_start=False)),
                ("huge sequence number", lambda: huge_sequence(bridge)),
            ]
            for name, attack in attacks:
                results.append(await run_attack(bridge, healthy, name, attack))
                print(f"  {name}: {results[-1].outcome}", file=sys.stderr)
            await healthy.hang_up()
    finally:
        stop(bridge.proc)
    return results


def table(results: list[Result]) -> str:
    lines = [
        "| attack | what the bridge did | event-loop lag, worst (samples over 5 ms) "
        "| /healthz p50 / max (ms) "
        "| probes failed | healthy call's echo, during and after it |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        echo = f"heard, {r.echo_ms:.0f} ms" if r.call_heard_echo else "NOT heard"
        lines.append(
            f"| {r.attack} | {r.outcome} | {r.loop_lag_ms} | {r.healthz_ms_p50} / {r.healthz_ms_max} "
            f"| {r.probes_failed} | {echo} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--keep", metavar="DIR", help="keep the bridge's log and records here")
    parser.add_argument("--baselines", type=int, default=3, help="rounds with no attack (default 3)")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    print(table(results))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    held = all(r.call_heard_echo and r.probes_failed == 0 for r in results)
    print("PASS: every attack refused, the healthy call heard its echo after each" if held else "FAIL")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
