"""Real speech through the whole bridge and back: added delay and fidelity.

Starts `ivr-bridge serve` (embedded echo engine) as its own process, places one call with
the Twilio-side caller saying examples/audio/hello.wav, and compares what comes back with
what was said: the delay both directions add together, and the SNR in 300-3400 Hz.

    .venv/bin/python scripts/bench_echo_roundtrip.py [--wav FILE] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
import numpy as np
from processes import free_port, spawn, stop

from ivr_bridge.audio import Resampler, ulaw_decode, ulaw_encode
from ivr_bridge.audio.measure import aligned_snr_db
from ivr_bridge.standins.twilio import TwilioCaller

ROOT = Path(__file__).resolve().parent.parent


def load_8k(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2:
            raise SystemExit(f"{path}: need 16-bit PCM")
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        if w.getnchannels() == 2:
            samples = samples.reshape(-1, 2).mean(axis=1).astype(np.int16)
        rate = w.getframerate()
    return samples if rate == 8000 else Resampler(rate, 8000).process(samples)


def start_bridge() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = spawn(["serve", "--port", str(port), "--log-level", "WARNING"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc, f"ws://127.0.0.1:{port}/media-stream"
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the bridge did not start within 30 s")


async def call(stream_url: str, sent: bytes) -> bytes:
    async with TwilioCaller(stream_url, continuous=True) as caller:
        await caller.say(sent)

        def reply_played() -> bool:
            # The echo trims leading/trailing silence; the reply has played when its last
            # mark comes back as played.
            marks = caller.marks_received
            long_enough = len(caller.received) >= 0.8 * len(sent)
            return long_enough and bool(marks) and marks[-1] in caller.marks_played

        await caller.wait_for(reply_played, timeout=60)
        await caller.hang_up()
        return bytes(caller.received)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wav", type=Path, default=ROOT / "examples" / "audio" / "hello.wav")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    sent = ulaw_encode(load_8k(args.wav))
    proc, url = start_bridge()
    try:
        received = asyncio.run(call(url, sent))
    finally:
        stop(proc)
    delay, snr = aligned_snr_db(ulaw_decode(sent), ulaw_decode(received))
    # The echo starts its reply on a 20 ms frame boundary: the remainder is the path delay.
    result = {
        "speech_s": round(len(sent) / 8000, 2),
        "reply_s": round(len(received) / 8000, 2),
        "path_delay_ms": round((delay % 160) / 8, 3),
        "snr_db_300_3400": round(snr, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"speech {result['speech_s']} s, echoed {result['reply_s']} s")
        print(f"delay added, caller->voice API->caller: {result['path_delay_ms']} ms")
        print(f"SNR 300-3400 Hz (two G.711 quantisations): {result['snr_db_300_3400']} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
