"""Cost and quality report for the ivr_bridge.audio path.

Usage:  python scripts/bench_audio.py [--json] [--reps N]

Timings are medians of many ``time.perf_counter_ns`` samples after a warm-up; the quality
figures come from ivr_bridge.audio.measure, the same code the tests assert with.  Exits
non-zero if any target is missed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ivr_bridge.audio import BotAudio, CallerAudio, Pcm, Resampler, resample, ulaw_encode
from ivr_bridge.audio import measure as m
from ivr_bridge.audio.convert import ulaw_to_float

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Check:
    name: str
    value: float
    unit: str
    target: str
    passed: bool
    note: str = ""


def median_us(fn: Callable[[], object], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    samples = np.empty(reps)
    for i in range(reps):
        start = time.perf_counter_ns()
        fn()
        samples[i] = time.perf_counter_ns() - start
    return float(np.median(samples)) / 1000.0


def measure_cost(reps: int) -> dict[str, float]:
    """Each figure with the C kernel (as shipped, where it was built) and, with `_numpy`,
    with the numpy kernel it falls back to."""
    cost: dict[str, float] = {}
    for suffix, compiled in (("", resample.COMPILED), ("_numpy", False)):
        cost |= {k + suffix: v for k, v in _measure_cost(reps, compiled).items()}
    return cost


def _measure_cost(reps: int, compiled: bool) -> dict[str, float]:
    rng = np.random.default_rng(0)
    warmup = max(reps // 10, 50)
    # Inbound: one 20 ms Twilio frame, timed whole and by stage.
    frame = ulaw_encode(m.tone(440, 8000, 160, 8000) + rng.integers(-500, 500, 160, np.int16))
    up = Resampler(8000, 24000)
    x = ulaw_to_float(frame)
    # Outbound: one 100 ms chunk from the voice API.
    chunk = (m.tone(300, 24000, 2400, 8000) + rng.integers(-500, 500, 2400, np.int16)).astype(np.int16)
    down = Resampler(24000, 8000)
    z = down.process(chunk)
    pcm = Pcm(chunk, 24000)
    kernels = [up._kernel, down._kernel]  # shared by every resampler of their rate pair
    for kernel in kernels:
        kernel.compiled = compiled
    try:
        # A call's converters, made as a call makes them: one C object each where built.
        caller, bot = CallerAudio(), BotAudio()
        return {
            "inbound_total": median_us(lambda: caller.process(frame), reps, warmup),
            "inbound_decode": median_us(lambda: ulaw_to_float(frame), reps, warmup),
            "inbound_upsample": median_us(lambda: up.process_pcm16le(x), reps, warmup),
            "outbound_total": median_us(lambda: ulaw_encode(down.process(chunk)), reps, warmup),
            "outbound_downsample": median_us(lambda: down.process(chunk), reps, warmup),
            "outbound_encode": median_us(lambda: ulaw_encode(z), reps, warmup),
            "outbound_botaudio": median_us(lambda: bot.process(pcm), reps, warmup),
        }
    finally:
        for kernel in kernels:
            kernel.compiled = resample.COMPILED


def audioop_mismatches() -> int | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop  # removed in Python 3.13
        except ImportError:
            return None
    pcm = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    theirs = np.frombuffer(audioop.lin2ulaw(pcm.astype("<i2").tobytes(), 2), dtype=np.uint8)
    ours = np.frombuffer(ulaw_encode(pcm), dtype=np.uint8)
    return int(np.count_nonzero(theirs != ours))


def measure_quality() -> dict[str, Any]:
    passband = np.arange(300, 3401, 50)
    alias, alias_f = m.worst_alias_rejection(24000, 8000, np.arange(4100, 12000, 50))
    image, image_f = m.worst_image_rejection(8000, 24000, passband, image_edge_hz=4600)
    paths = [(8000, 24000), (24000, 8000), (16000, 8000), (44100, 8000), (48000, 8000)]
    stream = {f"{a}->{b}": m.stream_error_lsb(a, b) for a, b in paths}
    up = Resampler(8000, 24000)
    frames_ok = all(len(up.process(np.zeros(160, np.int16))) == 480 for _ in range(100))
    reference = m.g191_ulaw_encode
    # Between the scanned tones: the prototype filter's own response over the whole band.
    down_stop = m.filter_gain_db(Resampler(24000, 8000), np.arange(4100, 12000.5, 1.0))
    up_stop = m.filter_gain_db(Resampler(8000, 24000), np.arange(4600, 12000.5, 1.0))
    return {
        "alias_filter_min_db": float(-down_stop.max()),
        "image_filter_min_db": float(-up_stop.max()),
        "alias_rejection_db": alias,
        "alias_worst_hz": alias_f,
        "image_rejection_db": image,
        "image_worst_tone_hz": image_f,
        "ripple_up_db": m.passband_ripple_db(8000, 24000, passband),
        "ripple_down_db": m.passband_ripple_db(24000, 8000, passband),
        "delay_up_ms": Resampler(8000, 24000).delay_ms,
        "delay_down_ms": Resampler(24000, 8000).delay_ms,
        "delay_up_measured_ms": m.impulse_delay_ms(8000, 24000),
        "delay_down_measured_ms": m.impulse_delay_ms(24000, 8000),
        "stream_error_lsb": stream,
        "frames_160_to_480": frames_ok,
        "g711_mismatches_vs_g191": m.g711_mismatches(reference),
        "audioop_mismatches_vs_ours": audioop_mismatches(),
    }


def evaluate(cost: dict[str, float], q: dict[str, Any]) -> list[Check]:
    stream_max = max(q["stream_error_lsb"].values())
    g711 = q["g711_mismatches_vs_g191"]
    return [
        Check("inbound 20 ms frame", cost["inbound_total"], "us", "<= 20", cost["inbound_total"] <= 20),
        Check("outbound 100 ms chunk", cost["outbound_total"], "us", "<= 50", cost["outbound_total"] <= 50),
        Check(
            "alias rejection 24k->8k, 4.1-12 kHz (min)",
            q["alias_rejection_db"],
            "dB",
            ">= 70",
            q["alias_rejection_db"] >= 70,
            f"worst tone {q['alias_worst_hz']:.0f} Hz; filter min {q['alias_filter_min_db']:.1f}",
        ),
        Check(
            "image rejection 8k->24k, >= 4.6 kHz (min)",
            q["image_rejection_db"],
            "dB",
            ">= 80",
            q["image_rejection_db"] >= 80,
            f"worst tone {q['image_worst_tone_hz']:.0f} Hz; filter min {q['image_filter_min_db']:.1f}",
        ),
        Check(
            "passband ripple 8k->24k, 0.3-3.4 kHz",
            q["ripple_up_db"],
            "dB",
            "<= 0.1",
            q["ripple_up_db"] <= 0.1,
        ),
        Check(
            "passband ripple 24k->8k, 0.3-3.4 kHz",
            q["ripple_down_db"],
            "dB",
            "<= 0.1",
            q["ripple_down_db"] <= 0.1,
        ),
        Check(
            "group delay 8k->24k",
            q["delay_up_ms"],
            "ms",
            "<= 4",
            q["delay_up_ms"] <= 4,
            f"measured {q['delay_up_measured_ms']:.3f} ms",
        ),
        Check(
            "group delay 24k->8k",
            q["delay_down_ms"],
            "ms",
            "<= 4",
            q["delay_down_ms"] <= 4,
            f"measured {q['delay_down_measured_ms']:.3f} ms (timeline, = delay - 2 samples @24k)",
        ),
        Check("streamed vs one-shot (max, all paths)", stream_max, "LSB", "<= 1", stream_max <= 1),
        Check(
            "160 B in -> 480 samples, every frame",
            float(q["frames_160_to_480"]),
            "",
            "= 1",
            bool(q["frames_160_to_480"]),
        ),
        Check(
            "G.711 mismatches vs G.191 reference",
            float("nan") if g711 is None else g711,
            "",
            "= 0",
            g711 == 0,
            ""
            if q["audioop_mismatches_vs_ours"] is None
            else f"audioop.lin2ulaw differs on {q['audioop_mismatches_vs_ours']}",
        ),
    ]


# The PCM rates the voice APIs speak (ElevenLabs pcm_16000 ... pcm_48000, NextEVI/OpenAI/NavTalk
# 24 kHz): each is carried by the same streaming FIR path, to the same targets.
API_RATES = (16000, 22050, 24000, 44100, 48000)


def measure_rates(reps: int) -> list[dict[str, float]]:
    """Per API rate: the caller's 20 ms frame up to it, a 100 ms reply chunk down from it."""
    passband = np.arange(300, 3401, 100)
    rows = []
    for rate in API_RATES:
        alias, _ = m.worst_alias_rejection(rate, 8000, np.arange(4100, rate / 2, 100))
        image, _ = m.worst_image_rejection(8000, rate, passband[::3], image_edge_hz=4600)
        up, down = Resampler(8000, rate), Resampler(rate, 8000)
        frame = np.zeros(160, np.int16)
        chunk = np.zeros(rate // 10, np.int16)
        rows.append(
            {
                "rate": rate,
                "alias_rejection_db": alias,
                "image_rejection_db": image,
                "ripple_down_db": m.passband_ripple_db(rate, 8000, passband),
                "ripple_up_db": m.passband_ripple_db(8000, rate, passband),
                "delay_down_ms": down.delay_ms,
                "delay_up_ms": up.delay_ms,
                "frame_up_us": median_us(lambda up=up, frame=frame: up.process(frame), reps // 5, 50),
                "chunk_down_us": median_us(lambda down=down, chunk=chunk: down.process(chunk), reps // 5, 50),
            }
        )
    return rows


def print_rates(rows: list[dict[str, float]]) -> None:
    print()
    print("  API rates (same FIR path): alias / image rejection dB, ripple down / up dB, delay down / up ms,")
    print("  cost of a 20 ms caller frame up / a 100 ms reply chunk down (us)")
    for r in rows:
        print(
            f"  {r['rate']:>6} Hz  {r['alias_rejection_db']:6.1f} / {r['image_rejection_db']:5.1f}  "
            f"{r['ripple_down_db']:.3f} / {r['ripple_up_db']:.3f}  "
            f"{r['delay_down_ms']:.2f} / {r['delay_up_ms']:.2f}  "
            f"{r['frame_up_us']:6.1f} / {r['chunk_down_us']:6.1f}"
        )


def print_report(cost: dict[str, float], q: dict[str, Any], checks: list[Check], reps: int) -> None:
    print(f"ivr_bridge.audio  (Python {platform.python_version()}, numpy {np.__version__})")
    print()
    kernel = "C kernel" if resample.COMPILED else "(C kernel not built)"
    print(f"Cost, median of {reps} runs, us{'':24}{kernel:>12}{'numpy':>9}")
    rows = [
        ("inbound 20 ms frame: 160 B mu-law -> 24k PCM16", "inbound_total"),
        ("  mu-law decode", "inbound_decode"),
        ("  resample 8k -> 24k, to PCM16 bytes", "inbound_upsample"),
        ("outbound 100 ms chunk: 2400 @ 24k -> 8k mu-law", "outbound_total"),
        ("  resample 24k -> 8k", "outbound_downsample"),
        ("  mu-law encode", "outbound_encode"),
        ("  (BotAudio.process incl. framing)", "outbound_botaudio"),
    ]
    for label, key in rows:
        print(f"  {label:<52}{cost[key]:7.1f}{cost[key + '_numpy']:9.1f}")
    print()
    print(f"  {'check':<44}{'value':>10}  {'target':<10}{'':6}note")
    for c in checks:
        value = {"us": f"{c.value:.1f}", "dB": f"{c.value:.3f}", "ms": f"{c.value:.3f}"}.get(
            c.unit, f"{c.value:g}"
        )
        verdict = "PASS" if c.passed else "FAIL"
        print(f"  {c.name:<44}{value:>10}  {c.unit + ' ' + c.target:<10}{verdict:6}{c.note}")
    streams = ", ".join(f"{k}: {v}" for k, v in q["stream_error_lsb"].items())
    print()
    print(f"  streamed vs one-shot per path (LSB): {streams}")
    print(f"  overall: {'PASS' if all(c.passed for c in checks) else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--reps", type=int, default=5000, help="timed repetitions per figure")
    args = parser.parse_args(argv)
    cost = measure_cost(args.reps)
    quality = measure_quality()
    rates = measure_rates(args.reps)
    checks = evaluate(cost, quality)
    if args.json:
        report = {
            "cost_us": cost,
            "quality": quality,
            "api_rates": rates,
            "checks": [asdict(c) for c in checks],
            "all_pass": all(c.passed for c in checks),
        }
        print(json.dumps(report, indent=2, allow_nan=True))
    else:
        print_report(cost, quality, checks, args.reps)
        print_rates(rates)
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
