"""Audio formats a voice API may speak, and which of them the bridge can carry."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Encoding(StrEnum):
    MULAW = "mulaw"  # G.711 mu-law, one byte a sample
    PCM16 = "pcm16"  # signed 16-bit little-endian


@dataclass(frozen=True, slots=True)
class AudioFormat:
    encoding: Encoding
    rate: int  # samples a second, mono

    def __str__(self) -> str:
        return f"{self.encoding} {self.rate} Hz"


TWILIO_AUDIO = AudioFormat(Encoding.MULAW, 8000)  # what a phone call carries: passed through untouched
PCM16_24K = AudioFormat(Encoding.PCM16, 24000)
# PCM16 rates the streaming FIR path serves with the quality measured in BENCHMARKS.md.
PCM16_RATES = frozenset({8000, 16000, 22050, 24000, 44100, 48000})


def carried(audio: AudioFormat) -> bool:
    """Whether the bridge converts to and from `audio` (mu-law only at the phone's 8 kHz)."""
    return audio == TWILIO_AUDIO or (audio.encoding == Encoding.PCM16 and audio.rate in PCM16_RATES)
