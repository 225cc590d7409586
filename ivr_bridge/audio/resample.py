"""Stateful streaming polyphase FIR resampler (sans-I/O, numpy only).

Model: for a rational ratio L/M (out/in, reduced by gcd) the input is conceptually
zero-stuffed to the high rate ``L * in_rate``, low-pass filtered with a linear-phase
Kaiser-windowed sinc ``h`` and every M-th sample is kept.  Output sample ``k`` is taken at
high-rate instant ``t_k = k*M + M - 1``.  With that choice output k needs exactly the inputs
up to ``floor(t_k / L)``, so after N inputs precisely ``floor(N*L/M)`` outputs are
computable: each is emitted as soon as its newest input arrives, whatever the chunking.

Two evaluation kernels compute exactly that sum:

* ``_BlockKernel`` (8 kHz <-> every rate the voice APIs speak): outputs are grouped into
  rows of P samples. Each row depends on one contiguous input window and the windows of
  consecutive rows are a fixed stride apart, so one strided view times a precomputed
  (window x P) coefficient matrix evaluates a whole chunk in a single BLAS call with no
  Python loop.
  Its sums run in C (``_fir.c``, built by setup.py) when that extension is present: a
  20 ms chunk is then one call instead of a dozen numpy operations.
* ``_GatherKernel`` (any other ratio, e.g. 47999 Hz): gathers each output's input
  window and its polyphase coefficients and contracts them row-wise.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

try:  # the C block kernel; optional (setup.py): without it numpy computes the same sums
    from ivr_bridge.audio import _fir
except ImportError:  # pragma: no cover - only where no compiler was found at install
    _fir = None
COMPILED = _fir is not None

__all__ = ["Resampler", "Stream", "compiled_stream", "round_to_int16"]

_LITTLE_ENDIAN = sys.byteorder == "little"
_Out = TypeVar("_Out", np.ndarray, bytes)

_F64 = np.dtype(np.float64)


@dataclass(frozen=True)
class _FilterSpec:
    """A low-pass prototype, expressed relative to the lower of the two sample rates."""

    cutoff: float  # -6 dB point as a fraction of the lower rate (Hz / lower_rate)
    atten_db: float  # stopband target used to choose the Kaiser beta
    span: float  # filter length in sample periods of the lower rate


# Tuned by measurement (tests/test_audio.py, scripts/bench_audio.py) to clear the targets
# with ~3-5 dB to spare over the whole stopband, not just at the scanned tones; every tap
# less is less delay and CPU.
# Downsampling to 8k: flat to 3.4 kHz, >= 70 dB from 4.1 kHz (146 taps at 24 kHz, 3.0 ms).
_DOWN_SPEC = _FilterSpec(cutoff=3710 / 8000, atten_db=74.0, span=146 / 3)
# Upsampling from 8k: flat to 3.4 kHz, >= 80 dB from 4.6 kHz, where the images of 3.4 kHz
# content start (97 taps at 24 kHz, 2.0 ms).
_UP_SPEC = _FilterSpec(cutoff=3920 / 8000, atten_db=86.0, span=97 / 3)

# Outputs per matrix row for the block kernel, keyed by (L, M); picked by benchmarking
# (scripts/bench_audio.py): every rate a voice API speaks, 8 kHz <-> 16, 22.05, 24, 32,
# 44.1 and 48 kHz. A row must hold a whole number of the L output phases.
_BLOCK_ROWS = {
    (3, 1): 48, (1, 3): 16,  # 24 kHz
    (2, 1): 48, (1, 2): 16,  # 16 kHz
    (4, 1): 48, (1, 4): 16,  # 32 kHz
    (6, 1): 48, (1, 6): 16,  # 48 kHz
    (441, 160): 441, (160, 441): 160,  # 22.05 kHz
    (441, 80): 441, (80, 441): 160,  # 44.1 kHz
}  # fmt: skip
# Above this many polyphase branches the general kernel interpolates between this many
# precomputed phases instead of storing all L (odd rates such as 44099 Hz give L = 8000).
_MAX_PHASES = 256
# Outputs per gather step in the general kernel (bounds its temporary matrices to a few MB).
_GATHER_OUTPUTS = 2048


def _kaiser_beta(atten_db: float) -> float:
    # Kaiser's empirical formula mapping stopband attenuation to the window shape.
    if atten_db > 50.0:
        return 0.1102 * (atten_db - 8.7)
    if atten_db >= 21.0:
        return 0.5842 * math.pow(atten_db - 21.0, 0.4) + 0.07886 * (atten_db - 21.0)
    return 0.0


def _kaiser_lowpass(taps: int, cutoff_hz: float, rate_hz: float, atten_db: float) -> np.ndarray:
    """Linear-phase windowed-sinc low-pass with unity DC gain."""
    n = np.arange(taps, dtype=np.float64) - (taps - 1) / 2.0
    h: np.ndarray = np.sinc(2.0 * cutoff_hz / rate_hz * n) * np.kaiser(taps, _kaiser_beta(atten_db))
    h /= h.sum()
    return h


_INT16_MIN, _INT16_MAX = np.float64(-32768.0), np.float64(32767.0)


def round_to_int16(y: np.ndarray) -> np.ndarray:
    """Round a float array to int16 with saturation (modifies ``y`` in place)."""
    np.rint(y, out=y)
    # Two ufuncs rather than np.clip: its Python-level dispatch costs more than the work on
    # a 20 ms frame.
    np.minimum(y, _INT16_MAX, out=y)
    np.maximum(y, _INT16_MIN, out=y)
    return y.astype(np.int16)


class _BlockKernel:
    """Exact polyphase evaluation as one (rows x window) @ (window x P) product per call."""

    def __init__(self, h: np.ndarray, up: int, down: int, row_outputs: int) -> None:
        if row_outputs % up:
            raise ValueError("row_outputs must be a multiple of the interpolation factor")
        self._up = up
        self._down = down
        taps = len(h)
        # Rows start at output indices that are multiples of P (itself a multiple of L), so
        # every row has the same phase pattern and row r's window starts r*stride later.
        self._p = row_outputs
        self._stride = row_outputs * down // up
        t0 = down - 1 + np.arange(row_outputs) * down  # high-rate instants of row 0's outputs
        self._m_lo = -((taps - down) // up)  # ceil((t0[0] - taps + 1) / L): oldest input
        m_hi = int(t0[-1]) // up  # newest input the row reads
        self._width = m_hi - self._m_lo + 1
        m = np.arange(self._m_lo, m_hi + 1)
        n = t0[None, :] - m[:, None] * up  # filter tap linking input m to output j
        valid = (n >= 0) & (n < taps)
        self._coef = np.where(valid, h[np.clip(n, 0, taps - 1)], 0.0)
        self.history = down - self._m_lo + 1
        # For the C kernel, the same sums as polyphase branches: output phase f's taps
        # (those of row column f, without the window's zeros) and where they start. Every
        # `up` outputs the window moves `down` inputs, across rows too (stride = P*M/L).
        reach = self._coef[:, :up] != 0.0
        self._lo = reach.argmax(axis=0).astype(np.int32)
        self._taps = (self._width - reach[::-1].argmax(axis=0) - self._lo).astype(np.int32)
        self._phases = np.zeros((up, int(self._taps.max())))
        for f in range(up):
            self._phases[f, : self._taps[f]] = self._coef[self._lo[f] : self._lo[f] + self._taps[f], f]
        self.compiled = COMPILED  # (tests switch it off to compare the two)

    def _geometry(self, base: int, k_start: int) -> tuple[int, int]:
        """(first output of the first row, offset in src of that row's window)."""
        k0 = k_start - k_start % self._up  # align to the row phase pattern
        return k0, (k0 // self._up) * self._down + self._m_lo - base

    def run(self, src: np.ndarray, base: int, k_start: int, k_end: int) -> np.ndarray:
        p = self._p
        k0, offset = self._geometry(base, k_start)  # (recomputes < L outputs)
        rows = -(-(k_end - k0) // p)
        need = offset + (rows - 1) * self._stride + self._width
        if need > len(src):
            # The last row reads past the newest input; those outputs are discarded below,
            # zeros just keep the view in bounds.
            src = np.concatenate((src, np.zeros(need - len(src))))
        # Overlapping windows: row r is src[offset + r*stride : ... + width] (no copy).
        windows = np.ndarray(
            (rows, self._width),
            dtype=_F64,
            buffer=src,
            offset=offset * 8,
            strides=(self._stride * 8, 8),
        )
        y = (windows @ self._coef).reshape(-1)
        return y[k_start - k0 : k_end - k0]

    def run_int16(self, src: np.ndarray, base: int, k_start: int, k_end: int) -> bytes:
        """`run`, rounded and saturated to native int16, in C (only when `compiled`)."""
        k0, offset = self._geometry(base, k_start)
        return _fir.fir_int16(  # type: ignore[union-attr]
            src,
            self._phases,
            self._lo,
            self._taps,
            self._up,
            self._down,
            offset,
            k_start - k0,
            k_end - k_start,
        )


class _GatherKernel:
    """General polyphase evaluation: gather each output's window and coefficients.

    ``h`` is designed at ``phases * in_rate``.  With ``phases == L`` the table holds every
    polyphase branch exactly; with fewer phases (huge L) the coefficients for an output are
    interpolated linearly between the two neighbouring tabulated phases.
    """

    def __init__(self, h: np.ndarray, phases: int, up: int, down: int) -> None:
        q = phases
        k = -(-len(h) // q)  # taps per branch
        padded = np.zeros((k + 1) * q)
        padded[: len(h)] = h
        # table[j, i] multiplies input (newest - i) for phase j; row q (= phase 0 of the next
        # tap) lets the interpolation read j0 + 1 without wrapping.
        self._table = padded[np.arange(q + 1)[:, None] + q * np.arange(k)[None, :]]
        self._back = np.arange(k)
        self._phases = q
        self._up = up
        self._down = down
        self.history = k

    def run(self, src: np.ndarray, base: int, k_start: int, k_end: int) -> np.ndarray:
        # The gathered matrices are (outputs x taps); slicing bounds their memory when a
        # whole WAV arrives in one chunk.
        if k_end - k_start <= _GATHER_OUTPUTS:
            return self._run(src, base, k_start, k_end)
        stops = range(k_start, k_end, _GATHER_OUTPUTS)
        return np.concatenate([self._run(src, base, k, min(k + _GATHER_OUTPUTS, k_end)) for k in stops])

    def _run(self, src: np.ndarray, base: int, k_start: int, k_end: int) -> np.ndarray:
        up, down, q = self._up, self._down, self._phases
        t = np.arange(k_start, k_end, dtype=np.int64) * down + (down - 1)
        newest = t // up
        phase = t - newest * up
        windows = src[(newest - base)[:, None] - self._back[None, :]]
        if q == up:
            coef = self._table[phase]
        else:
            pos = phase * q
            j0 = pos // up
            frac = ((pos - j0 * up) / up)[:, None]
            lo = self._table[j0]
            coef = lo + frac * (self._table[j0 + 1] - lo)
        y: np.ndarray = np.einsum("ij,ij->i", windows, coef)
        return y


@functools.lru_cache(maxsize=64)
def _design(
    in_rate: int, out_rate: int
) -> tuple[np.ndarray, _BlockKernel | _GatherKernel | None, int, float]:
    """(taps, kernel, filter rate, group delay in input samples) for a rate pair. Cached:
    the kernels are immutable and stateless, so every call's resampler shares one (a block
    kernel's matrix is up to 1.5 MB for 44.1 kHz)."""
    g = math.gcd(in_rate, out_rate)
    up, down = out_rate // g, in_rate // g
    if up == down:
        return np.ones(1), None, in_rate, 0.0
    low = min(in_rate, out_rate)
    spec = _DOWN_SPEC if out_rate < in_rate else _UP_SPEC
    block = _BLOCK_ROWS.get((up, down))
    # Design at L * in_rate (the block kernel needs every phase), or at a capped number of
    # phases when L is huge and the gather kernel interpolates between them.
    phases = up if block is not None else min(up, _MAX_PHASES)
    high_rate = phases * in_rate
    taps = round(spec.span * high_rate / low)
    # Gain = phases: zero-stuffing divides the baseband amplitude by the factor.
    h = _kaiser_lowpass(taps, spec.cutoff * low, high_rate, spec.atten_db) * phases
    h.flags.writeable = False
    kernel = _BlockKernel(h, up, down, block) if block is not None else _GatherKernel(h, phases, up, down)
    return h, kernel, high_rate, (taps - 1) / 2 / phases


def _flush_zeros(delay_in: float, up: int, down: int) -> int:
    # Output k sits at input time (k*M + M - 1)/L; these zeros push the last output past the
    # final input by the full filter span, twice the group delay.
    return math.ceil(2 * delay_in + down / up)


class Stream(Protocol):
    """A resampler that takes and returns bytes (see `compiled_stream`)."""

    def process(self, data: bytes | np.ndarray) -> bytes: ...
    def flush(self) -> bytes: ...
    def reset(self) -> None: ...


def compiled_stream(
    in_rate: int, out_rate: int, *, decode: np.ndarray | None = None, encode: np.ndarray | None = None
) -> Stream | None:
    """A `Resampler` for one call's hot path as one C object (`_fir.Stream`): its samples,
    one call per chunk, with a G.711 table lookup fused in where given (`decode`: float64
    per input byte; `encode`: a byte per int16 sample read as uint16). Its `process` takes
    and returns bytes (native int16 where no table is given); `flush` and `reset` are
    `Resampler`'s. None where the C kernel is not built or the rate pair has no block kernel
    (the caller then uses a `Resampler`)."""
    _, kernel, _, delay_in = _design(in_rate, out_rate)
    if not isinstance(kernel, _BlockKernel) or not kernel.compiled or not _LITTLE_ENDIAN:
        return None
    up, down = kernel._up, kernel._down
    return _fir.Stream(  # type: ignore[union-attr]
        kernel._phases,
        kernel._lo,
        kernel._taps,
        up,
        down,
        kernel._m_lo,
        kernel.history,
        _flush_zeros(delay_in, up, down),
        decode,
        encode,
    )


def _one_dimensional(samples: np.ndarray) -> np.ndarray:
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError("expected a 1-D array of samples")
    return x


class Resampler:
    """Streaming rational-ratio resampler: int16 in, int16 out, any chunk sizes.

    After N input samples in total the total output is exactly ``floor(N * L / M)`` with
    ``L/M = out_rate/in_rate`` in lowest terms, and the streamed output matches a one-shot
    run (up to float rounding, i.e. within 1 LSB) for any chunking.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self._in_rate = int(in_rate)
        self._out_rate = int(out_rate)
        g = math.gcd(self._in_rate, self._out_rate)
        self._up = self._out_rate // g
        self._down = self._in_rate // g
        self._taps, self._kernel, self._filter_rate, self._delay_in = _design(self._in_rate, self._out_rate)
        self.reset()

    @property
    def in_rate(self) -> int:
        return self._in_rate

    @property
    def out_rate(self) -> int:
        return self._out_rate

    @property
    def filter_taps(self) -> np.ndarray:
        """The prototype FIR at the high rate (gain included); a copy, for inspection.

        The high rate is ``L * in_rate``, or ``256 * in_rate`` when L exceeds 256 and the
        phases are interpolated.
        """
        return self._taps.copy()

    @property
    def filter_rate(self) -> int:
        """Sample rate of :attr:`filter_taps`, in Hz."""
        return self._filter_rate

    @property
    def delay_ms(self) -> float:
        """Group delay of the linear-phase filter ((taps - 1) / 2 at the high rate), in ms."""
        return 1000.0 * self._delay_in / self._in_rate

    def reset(self) -> None:
        """Drop all history and phase (e.g. on barge-in)."""
        self._n_in = 0
        self._n_out = 0
        self._history = self._kernel.history if self._kernel is not None else 0
        # The filter history, then each chunk's input: one buffer reused for every chunk
        # (a call's chunks are all about one size), not a concatenation per chunk.
        self._buf = np.zeros(self._history)

    def process_float(self, samples: np.ndarray) -> np.ndarray:
        """Like :meth:`process` but float64 out, unrounded (input may be any real dtype)."""
        if self._kernel is None:
            return _one_dimensional(samples).astype(np.float64)
        y = self._step(samples, self._kernel.run)
        return np.empty(0) if y is None else y

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample a chunk of int16 samples; returns the int16 output due so far (read-only
        when the C kernel made it: a view of its bytes, not a copy)."""
        if self._kernel is None:
            return np.array(samples, dtype=np.int16)
        if isinstance(self._kernel, _BlockKernel) and self._kernel.compiled:
            return np.frombuffer(self._step(samples, self._kernel.run_int16) or b"", dtype=np.int16)
        return round_to_int16(self.process_float(samples))

    def process_pcm16le(self, samples: np.ndarray) -> bytes:
        """:meth:`process` as PCM16 little-endian bytes, what the voice APIs take."""
        kernel = self._kernel
        if isinstance(kernel, _BlockKernel) and kernel.compiled and _LITTLE_ENDIAN:
            return self._step(samples, kernel.run_int16) or b""  # native int16 is the wire format
        return self.process(samples).astype("<i2", copy=False).tobytes()

    def _step(self, samples: np.ndarray, run: Callable[[np.ndarray, int, int, int], _Out]) -> _Out | None:
        """Append a chunk to the history buffer and `run` the kernel over the outputs it
        completes (None if it completes none)."""
        assert self._kernel is not None
        x = _one_dimensional(samples)
        n, history = len(x), self._history
        total = self._n_in + n
        k_end = total * self._up // self._down
        if len(self._buf) < history + n:
            grown = np.empty(history + n)
            grown[:history] = self._buf[:history]
            self._buf = grown
        src = self._buf[: history + n]
        src[history:] = x  # converts to float64 on the way
        y = run(src, total - len(src), self._n_out, k_end) if k_end > self._n_out else None  # new memory
        src[:history] = src[n:]  # the newest inputs are the next chunk's history
        self._n_in = total
        self._n_out = k_end
        return y

    def flush(self) -> np.ndarray:
        """Emit the filter tail by feeding zeros, then reset.

        The zeros cover the whole filter span (twice the group delay): stopping after one
        group delay would cut the output where the final samples are still half-way
        through the filter, i.e. mid-waveform, which clicks.
        """
        if self._kernel is None or self._n_in == 0:
            self.reset()
            return np.zeros(0, dtype=np.int16)
        tail = self.process(np.zeros(_flush_zeros(self._delay_in, self._up, self._down), dtype=np.int16))
        self.reset()
        return tail
