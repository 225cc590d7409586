"""The two per-call audio directions between Twilio (mu-law 8 kHz) and the voice API."""

from __future__ import annotations

import numpy as np

from .format import PCM16_24K, TWILIO_AUDIO, AudioFormat
from .g711 import FRAME_BYTES, PCM_TO_ULAW, ULAW_SILENCE, ULAW_TO_PCM, ulaw_encode
from .resample import Resampler, Stream, compiled_stream
from .wav import Pcm

__all__ = ["BotAudio", "CallerAudio", "Ulaw", "ulaw_to_float"]

TWILIO_RATE = TWILIO_AUDIO.rate

# Decoding straight to float64 skips an int16 -> float conversion on the hot path.
_ULAW_TO_FLOAT = ULAW_TO_PCM.astype(np.float64)
_ULAW_TO_FLOAT.flags.writeable = False


def ulaw_to_float(ulaw: bytes) -> np.ndarray:
    """Decode mu-law bytes to float64 samples on the int16 scale."""
    # `take`, not fancy indexing: the same lookup, 1 us less per 20 ms frame.
    return _ULAW_TO_FLOAT.take(np.frombuffer(ulaw, dtype=np.uint8))


class _UlawToPcm16:
    """mu-law 8 kHz -> PCM16LE at `rate`, where `compiled_stream` has no C object."""

    def __init__(self, rate: int) -> None:
        self._resampler = Resampler(TWILIO_RATE, rate)

    def process(self, data: bytes | np.ndarray) -> bytes:
        return self._resampler.process_pcm16le(ulaw_to_float(data))  # type: ignore[arg-type]

    def flush(self) -> bytes:
        return self._resampler.flush().astype("<i2").tobytes()

    def reset(self) -> None:
        self._resampler.reset()


class _Pcm16ToUlaw:
    """int16 at `rate` -> mu-law 8 kHz, where `compiled_stream` has no C object."""

    def __init__(self, rate: int) -> None:
        self._resampler = Resampler(rate, TWILIO_RATE)

    def process(self, data: bytes | np.ndarray) -> bytes:
        return ulaw_encode(self._resampler.process(data))  # type: ignore[arg-type]

    def flush(self) -> bytes:
        return ulaw_encode(self._resampler.flush())

    def reset(self) -> None:
        self._resampler.reset()


def ulaw_to_pcm16(rate: int) -> Stream:
    """A call's caller-side converter: mu-law bytes in, PCM16LE at `rate` out. In C where it
    is built: a 20 ms frame is then one call, decode and resampling together."""
    return compiled_stream(TWILIO_RATE, rate, decode=_ULAW_TO_FLOAT) or _UlawToPcm16(rate)


def pcm16_to_ulaw(rate: int) -> Stream:
    """A call's bot-side converter: native int16 samples at `rate` in, mu-law bytes out."""
    return compiled_stream(rate, TWILIO_RATE, encode=PCM_TO_ULAW) or _Pcm16ToUlaw(rate)


class CallerAudio:
    """Caller -> voice API: Twilio mu-law 8 kHz in, the API's format out (`to`).

    mu-law 8 kHz goes through byte for byte; PCM16 is decoded and resampled to its rate."""

    def __init__(self, to: AudioFormat = PCM16_24K) -> None:
        self.format = to
        passthrough = to == TWILIO_AUDIO
        self._convert = None if passthrough else ulaw_to_pcm16(to.rate)
        # Bytes out per mu-law byte in: what one upstream message of N ms holds.
        self.bytes_per_ulaw_byte = 1.0 if passthrough else 2 * to.rate / TWILIO_RATE

    def process(self, ulaw: bytes) -> bytes:
        """Convert any number of mu-law bytes (none to convert when passing through)."""
        if self._convert is None or not ulaw:
            return ulaw
        return self._convert.process(ulaw)

    def reset(self) -> None:
        """Forget the filter history (e.g. when the stream restarts)."""
        if self._convert is not None:
            self._convert.reset()


class Ulaw(bytes):
    """Speech already in the phone's format (mu-law 8 kHz): re-framed, never converted."""

    __slots__ = ()


class BotAudio:
    """Voice API speech -> Twilio: mu-law 8 kHz, emitted only in whole 20 ms frames."""

    def __init__(self) -> None:
        self._convert: Stream | None = None  # for PCM at `self._rate`
        self._rate = 0
        self._pending = bytearray()  # encoded audio short of a whole frame

    @property
    def pending_bytes(self) -> int:
        """Mu-law bytes held back until they make up a whole frame."""
        return len(self._pending)

    def _converter_for(self, rate: int) -> Stream:
        current = self._convert
        if current is not None and self._rate == rate:
            return current
        if current is not None:
            # The old rate's filter tail belongs before the new audio, not dropped.
            self._pending += current.flush()
        self._convert, self._rate = pcm16_to_ulaw(rate), rate
        return self._convert

    def _take_frames(self) -> bytes:
        whole = len(self._pending) - len(self._pending) % FRAME_BYTES
        out = bytes(self._pending[:whole])
        del self._pending[:whole]
        return out

    def process(self, audio: Pcm | Ulaw) -> bytes:
        """Resample and encode a chunk (mu-law only re-framed); returns a multiple of 160
        bytes (possibly b"")."""
        if isinstance(audio, Ulaw):
            if self._convert is not None:  # PCM before it: its filter tail goes first
                self._pending += self._convert.flush()
                self._convert = None
            self._pending += audio
            return self._take_frames()
        convert = self._converter_for(audio.sample_rate)
        self._pending += convert.process(np.ascontiguousarray(audio.samples, dtype=np.int16))
        return self._take_frames()

    def flush(self) -> bytes:
        """End of a response: filter tail + remainder, padded with silence to whole frames."""
        if self._convert is not None:
            self._pending += self._convert.flush()
        if not self._pending:
            return b""
        short = -len(self._pending) % FRAME_BYTES
        self._pending += bytes([ULAW_SILENCE]) * short
        return self._take_frames()

    def reset(self) -> None:
        """Barge-in: drop everything pending and the filter history."""
        self._pending.clear()
        if self._convert is not None:
            self._convert.reset()
