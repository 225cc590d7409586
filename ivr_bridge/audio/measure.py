"""Quality measurements shared by tests/test_audio.py and scripts/bench_audio.py.

Kept in the package (numpy only, no test framework) so the tests and the benchmark measure
exactly the same way.  Nothing on the call path imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .g711 import ulaw_encode
from .resample import Resampler

__all__ = [
    "FULL_SCALE",
    "HEADROOM_AMPLITUDE",
    "alias_rejection_db",
    "aligned_snr_db",
    "chunked",
    "filter_gain_db",
    "g191_ulaw_decode",
    "g191_ulaw_encode",
    "g711_mismatches",
    "image_rejection_db",
    "impulse_delay_ms",
    "passband_gain_db",
    "passband_ripple_db",
    "random_chunk_sizes",
    "stream_error_lsb",
    "tone",
    "tone_amplitude",
    "worst_alias_rejection",
    "worst_image_rejection",
]

FULL_SCALE = 32767.0
# Tones that pass through at unity gain are measured ~1 dB below full scale so passband
# ripple cannot clip them (clipping would add harmonics and corrupt the measurement).
HEADROOM_AMPLITUDE = 0.9 * FULL_SCALE
# Arbitrary non-zero start phase: a sine at exactly Nyquist with phase 0 samples as zeros.
_PHASE = 0.3


def tone(freq: float, rate: int, n: int, amplitude: float = FULL_SCALE) -> np.ndarray:
    """An int16 sine of ``n`` samples."""
    t = np.arange(n) / rate
    return np.rint(amplitude * np.sin(2 * np.pi * freq * t + _PHASE)).astype(np.int16)


def tone_amplitude(x: np.ndarray, freq: float, rate: int) -> float:
    """Amplitude of the component of ``x`` at ``freq`` by least squares (sin, cos, DC).

    Unlike an RMS over a fractional number of periods this is unbiased for any length.
    """
    t = np.arange(len(x)) / rate
    w = 2 * np.pi * freq * t
    basis = np.column_stack((np.sin(w), np.cos(w), np.ones_like(w)))
    coef, *_ = np.linalg.lstsq(basis, np.asarray(x, dtype=np.float64), rcond=None)
    return float(math.hypot(coef[0], coef[1]))


def filter_gain_db(rs: Resampler, freqs: np.ndarray) -> np.ndarray:
    """Gain of the resampler's prototype filter at ``freqs`` relative to DC, in dB.

    Evaluated directly from the taps (a DTFT), so it covers the continuous frequency axis
    rather than just the tones a scan happens to hit.
    """
    h = rs.filter_taps
    n = np.arange(len(h))
    f = np.asarray(freqs, dtype=np.float64)
    response = np.abs(np.exp(-2j * np.pi * np.outer(f, n) / rs.filter_rate) @ h)
    gain_db: np.ndarray = 20 * np.log10(np.maximum(response, 1e-300) / abs(h.sum()))
    return gain_db


def _settle(rs: Resampler) -> int:
    # Output samples to skip: the whole impulse response (2x group delay) plus margin.
    return math.ceil(2.5 * rs.delay_ms * rs.out_rate / 1000) + 8


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def alias_rejection_db(in_rate: int, out_rate: int, freq: float, seconds: float = 0.1) -> float:
    """Full-scale tone at ``freq`` (a stopband frequency) in; input RMS / output RMS in dB."""
    rs = Resampler(in_rate, out_rate)
    x = tone(freq, in_rate, round(seconds * in_rate))
    y = rs.process(x)[_settle(rs) :]
    out = max(_rms(y), 1e-9)
    return 20 * math.log10(_rms(x) / out)


def worst_alias_rejection(in_rate: int, out_rate: int, freqs: np.ndarray) -> tuple[float, float]:
    """(lowest rejection in dB, frequency where it occurs) over ``freqs``."""
    results = [(alias_rejection_db(in_rate, out_rate, float(f)), float(f)) for f in freqs]
    return min(results)


def image_rejection_db(
    in_rate: int, out_rate: int, freq: float, image_edge_hz: float, n_fft: int = 4096
) -> float:
    """Tone at ``freq`` in; energy below ``image_edge_hz`` over energy above it, in dB.

    A Hann-windowed FFT over a steady-state segment; the window's sidelobes are far below
    the target at the >= 1.2 kHz separation between a 3.4 kHz tone and its first image.
    """
    rs = Resampler(in_rate, out_rate)
    skip = _settle(rs)
    n_in = math.ceil((skip + n_fft) * in_rate / out_rate) + 1
    y = rs.process(tone(freq, in_rate, n_in, HEADROOM_AMPLITUDE))[skip : skip + n_fft]
    power = np.abs(np.fft.rfft(y * np.hanning(n_fft))) ** 2
    f = np.fft.rfftfreq(n_fft, 1.0 / out_rate)
    images = max(float(power[f >= image_edge_hz].sum()), 1e-30)
    return 10 * math.log10(float(power[f < image_edge_hz].sum()) / images)


def worst_image_rejection(
    in_rate: int, out_rate: int, freqs: np.ndarray, image_edge_hz: float
) -> tuple[float, float]:
    """(lowest image rejection in dB, tone frequency where it occurs)."""
    results = [(image_rejection_db(in_rate, out_rate, float(f), image_edge_hz), float(f)) for f in freqs]
    return min(results)


def passband_gain_db(in_rate: int, out_rate: int, freq: float, seconds: float = 0.1) -> float:
    """Steady-state gain of a passband tone through a fresh resampler, in dB."""
    rs = Resampler(in_rate, out_rate)
    x = tone(freq, in_rate, round(seconds * in_rate), HEADROOM_AMPLITUDE)
    y = rs.process(x)
    skip = _settle(rs)
    # Fit both on their own time axes; only the amplitudes are compared.
    return 20 * math.log10(tone_amplitude(y[skip:], freq, out_rate) / tone_amplitude(x, freq, in_rate))


def passband_ripple_db(in_rate: int, out_rate: int, freqs: np.ndarray) -> float:
    """Peak-to-peak gain variation over ``freqs``, in dB."""
    gains = [passband_gain_db(in_rate, out_rate, float(f)) for f in freqs]
    return max(gains) - min(gains)


def impulse_delay_ms(in_rate: int, out_rate: int) -> float:
    """Delay between the input and output timelines, from the impulse response centroid.

    The output is the (symmetric) filter response sampled at the output rate, so its first
    moment sits on the centre of symmetry to within the filter's stopband leakage.
    """
    rs = Resampler(in_rate, out_rate)
    n0 = in_rate // 100  # impulse 10 ms in, clear of the start
    x = np.zeros(n0 + in_rate // 20)
    x[n0] = 1.0
    y = rs.process_float(x)
    k = np.arange(len(y))
    centroid = float((k * y).sum() / y.sum())
    return 1000.0 * (centroid / out_rate - n0 / in_rate)


def random_chunk_sizes(total: int, rng: np.random.Generator, max_size: int = 500) -> list[int]:
    """Chunk sizes 0..max_size summing to ``total``; always includes 0, 1, 2 and an odd size."""
    sizes = [1, 0, 2, 7, 1]
    while sum(sizes) < total:
        sizes.append(int(rng.integers(0, max_size + 1)))
    excess = sum(sizes) - total
    sizes[-1] -= excess
    return sizes


def chunked(rs: Resampler, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Feed ``x`` through ``rs`` in chunks of ``sizes`` and join the outputs."""
    out = []
    pos = 0
    for size in sizes:
        out.append(rs.process(x[pos : pos + size]))
        pos += size
    return np.concatenate(out)


def stream_error_lsb(in_rate: int, out_rate: int, seconds: float = 0.5, seed: int = 1) -> int:
    """Max |streamed - one-shot| in LSB over a random chunking of full-scale noise.

    Raises AssertionError if the streamed and one-shot outputs differ in length.
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(-32768, 32768, round(seconds * in_rate)).astype(np.int16)
    one_shot = Resampler(in_rate, out_rate).process(x)
    streamed = chunked(Resampler(in_rate, out_rate), x, random_chunk_sizes(len(x), rng))
    if len(streamed) != len(one_shot):
        raise AssertionError(f"streamed {len(streamed)} samples vs one-shot {len(one_shot)}")
    return int(np.abs(streamed.astype(np.int32) - one_shot).max(initial=0))


def g711_mismatches(reference: Callable[[int], int]) -> int:
    """How many of the 65,536 int16 inputs ``ulaw_encode`` codes differently from
    ``reference`` (a scalar encoder: int sample -> mu-law code)."""
    pcm = np.arange(-32768, 32768, dtype=np.int32)
    ours = np.frombuffer(ulaw_encode(pcm.astype(np.int16)), dtype=np.uint8)
    expected = np.array([reference(int(v)) for v in pcm], dtype=np.uint8)
    return int(np.count_nonzero(ours != expected))


def aligned_snr_db(
    reference: np.ndarray, received: np.ndarray, rate: int = 8000, band: tuple[float, float] = (300.0, 3400.0)
) -> tuple[float, float]:
    """How faithfully `received` carries `reference`: (delay in samples, SNR in dB).

    The delay is found to 1/50 sample (whole-sample alignment of a path whose delay is
    fractional would count the misalignment as noise), the level is matched, and only the
    telephone band is compared.
    """
    ref = reference.astype(np.float64)
    out = received.astype(np.float64)
    n = len(ref) + len(out)
    spectrum_ref = np.fft.rfft(ref, n)
    spectrum_out = np.fft.rfft(out, n)
    xc = np.fft.irfft(spectrum_out * np.conj(spectrum_ref), n)
    coarse = int(np.argmax(xc))
    coarse = coarse if coarse < len(out) else coarse - n
    freqs = np.fft.rfftfreq(n, 1 / rate)
    in_band = (freqs >= band[0]) & (freqs <= band[1])
    o = spectrum_out[in_band]
    r = spectrum_ref[in_band]
    cycles = freqs[in_band] / rate
    best = (float(coarse), -math.inf)
    for delay in np.arange(coarse - 1.0, coarse + 1.0, 0.02):
        shifted = r * np.exp(-2j * np.pi * cycles * delay)
        gain = np.vdot(shifted, o).real / np.vdot(shifted, shifted).real
        noise = np.sum(np.abs(o - gain * shifted) ** 2)
        snr = 10 * math.log10(np.sum(np.abs(gain * shifted) ** 2) / max(noise, 1e-12))
        if snr > best[1]:
            best = (float(delay), snr)
    return best


# Scalar references written straight from the ITU-T G.191 algorithm, independent of the
# lookup tables in g711.py that they check.
def g191_ulaw_encode(sample: int) -> int:
    """Scalar mu-law encoder following the ITU-T G.191 reference algorithm.

    Works on the 14-bit magnitude: the 16-bit sample is shifted right by 2 first, negative
    samples use the one's complement (~x), and 33 (= 132 / 4) is the bias.
    """
    magnitude = ((~sample) >> 2) + 33 if sample < 0 else (sample >> 2) + 33
    magnitude = min(magnitude, 0x1FFF)
    # Segment number 1..8: one more than the bit length of magnitude >> 6.
    segment = 1
    rest = magnitude >> 6
    while rest:
        segment += 1
        rest >>= 1
    high_nibble = 0x8 - segment
    low_nibble = 0xF - ((magnitude >> segment) & 0xF)
    code = (high_nibble << 4) | low_nibble
    return code | 0x80 if sample >= 0 else code


def g191_ulaw_decode(code: int) -> int:
    """Scalar mu-law decoder following the ITU-T G.191 reference algorithm."""
    sign = -1 if code < 0x80 else 1
    inverted = ~code
    exponent = (inverted >> 4) & 0x7
    mantissa = inverted & 0xF
    step = 4 << (exponent + 1)
    return sign * ((0x80 << exponent) + step * mantissa + step // 2 - 4 * 33)
