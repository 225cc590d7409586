"""Caller audio clips: a WAV file as the 20 ms mu-law frames a phone line carries.

Each file is read, resampled and encoded once per process (a load test says the same
clip from hundreds of calls). Near-silent frames at the end are trimmed, so a clip ends
with its speech and a reply latency measured from its last frame starts at end of speech.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ivr_bridge.audio import FRAME_BYTES, Resampler, WavError, ulaw_encode
from ivr_bridge.audio.wav import parse_wav
from ivr_bridge.standins.twilio import encode_frames

LINE_RATE = 8000
SILENT_PEAK = 100  # about -50 dBFS: below any speech, above dither and G.711 idle noise


class ClipError(ValueError):
    """The file cannot be used as caller audio; the message names it."""


@dataclass(frozen=True, slots=True)
class Clip:
    path: Path
    ulaw: bytes
    payloads: tuple[str, ...]  # base64 frames, ready for TwilioCaller.say_frames

    @property
    def seconds(self) -> float:
        return len(self.payloads) * FRAME_BYTES / LINE_RATE


def to_line_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    """Resample int16 audio to 8 kHz, compensating the filter delay so nothing shifts."""
    if rate == LINE_RATE:
        return samples
    resampler = Resampler(rate, LINE_RATE)
    delay = round(resampler.delay_ms * LINE_RATE / 1000)
    out = np.concatenate((resampler.process(samples), resampler.flush()))
    return out[delay : delay + len(samples) * LINE_RATE // rate]


def trim_trailing_silence(samples: np.ndarray) -> np.ndarray:
    whole = len(samples) // FRAME_BYTES * FRAME_BYTES
    if whole == 0:
        return samples
    peaks = np.abs(samples[:whole].astype(np.int32)).reshape(-1, FRAME_BYTES).max(axis=1)
    loud = np.flatnonzero(peaks > SILENT_PEAK)
    return samples[: (loud[-1] + 1) * FRAME_BYTES] if len(loud) else samples[:0]


@lru_cache(maxsize=64)
def load_clip(path: Path) -> Clip:
    """Read a 16-bit PCM WAV (any rate 8-48 kHz, mono or stereo); cached per resolved path."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ClipError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        pcm = parse_wav(data)
    except WavError as exc:
        raise ClipError(f"{path}: {exc}") from None
    samples = trim_trailing_silence(to_line_rate(pcm.samples, pcm.sample_rate))
    if len(samples) == 0:
        raise ClipError(f"{path}: the audio is silent")
    ulaw = ulaw_encode(samples)
    return Clip(path, ulaw, tuple(encode_frames(ulaw)))
