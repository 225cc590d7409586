"""Caller -> voice API: Twilio's mu-law frames, cut into upstream chunks in the format the
voice session acknowledged. Sans-I/O: `feed` takes a frame's payload and returns the
messages to send (usually none or one)."""

from __future__ import annotations

from collections.abc import Sequence

from ivr_bridge.audio import PCM16_24K, AudioFormat, CallerAudio

from .report import CallStats

ULAW_BYTES_PER_MS = 8  # Twilio's 8 kHz mu-law
_NOTHING: tuple[bytes, ...] = ()  # what most frames produce: no list made for them
MAX_EARLY_AUDIO_MS = 5000  # caller audio kept while the first voice session connects


class Uplink:
    def __init__(self, chunk_ms: int, stats: CallStats) -> None:
        self._stats = stats
        self._chunk_bytes = chunk_ms * ULAW_BYTES_PER_MS
        self._audio = CallerAudio(PCM16_24K)
        # Kept as mu-law and converted once per chunk: it leaves no sooner either way, and
        # one conversion of 5 frames costs far less than five.
        self._ulaw = bytearray()
        self._mode = "hold"  # "hold" (connecting), "open", or "drop" (between sessions)

    @property
    def pending_bytes(self) -> int:
        """Mu-law bytes not yet sent upstream."""
        return len(self._ulaw)

    def open(self, to: AudioFormat) -> None:
        """A session is up and takes `to`: send from now on. After a gap, nothing of the
        old session's audio or filter history carries over."""
        if to != self._audio.format:  # mu-law passes through; PCM16 at its own rate
            self._audio = CallerAudio(to)
        elif self._mode == "drop":
            self._audio.reset()
        if self._mode == "drop":
            self._ulaw.clear()
        self._mode = "open"

    def drop(self) -> None:
        """The session is being replaced: the caller's speech from the gap would reach the
        new one late and out of context, so it is dropped rather than held."""
        self._mode = "drop"

    def feed(self, ulaw: bytes) -> Sequence[bytes]:
        if len(ulaw) == self._chunk_bytes and not self._ulaw and self._mode == "open":
            return (self._audio.process(ulaw),)  # a frame per message (the usual 20 ms chunks)
        self._ulaw += ulaw
        if len(self._ulaw) < self._chunk_bytes:
            return _NOTHING
        if self._mode == "open":
            converted = self._audio.process(bytes(self._ulaw))
            self._ulaw.clear()
            # Usually one chunk; after a connect or a large frame several, each within the
            # voice API's message size limit. A mu-law byte becomes 1 byte (passed
            # through) to 12 (PCM16 at 48 kHz).
            step = int(self._chunk_bytes * self._audio.bytes_per_ulaw_byte)
            if len(converted) <= step:
                return (converted,)
            return [converted[start : start + step] for start in range(0, len(converted), step)]
        if self._mode == "drop":
            self._stats.gap_audio_dropped_ms += len(self._ulaw) // ULAW_BYTES_PER_MS
            self._ulaw.clear()
        elif len(self._ulaw) > MAX_EARLY_AUDIO_MS * ULAW_BYTES_PER_MS:
            excess = len(self._ulaw) - MAX_EARLY_AUDIO_MS * ULAW_BYTES_PER_MS
            del self._ulaw[:excess]
            self._stats.early_audio_dropped_ms += excess // ULAW_BYTES_PER_MS
        return _NOTHING
