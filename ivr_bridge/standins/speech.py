"""The voice API stand-ins' voice activity: is this audio the caller speaking?

A stand-in hears 50 small messages a second per call, so the test is an energy sum against
a threshold (RMS above the limit, without the square root or the mean), and mu-law is read
through a table of each code's energy instead of being decoded first.
"""

from __future__ import annotations

import numpy as np

from ivr_bridge.audio.g711 import ULAW_TO_PCM

SPEECH_RMS = 500.0  # on the int16 scale: above is speech
_ENERGY_LIMIT = SPEECH_RMS**2  # per sample
_ULAW_ENERGY = ULAW_TO_PCM.astype(np.float64) ** 2


def is_speech_ulaw(audio: bytes) -> bool:
    if not audio:
        return False
    energy = np.add.reduce(_ULAW_ENERGY.take(np.frombuffer(audio, np.uint8)))
    return float(energy) > _ENERGY_LIMIT * len(audio)


def is_speech_pcm16(audio: bytes) -> bool:
    """Little-endian 16-bit samples; a trailing odd byte is ignored."""
    samples = np.frombuffer(audio[: len(audio) // 2 * 2], "<i2").astype(np.float64)
    return samples.size > 0 and float(np.dot(samples, samples)) > _ENERGY_LIMIT * samples.size


def speech_blocks_pcm16(audio: bytes, block_samples: int, rms: float) -> list[bool]:
    """For each whole block of 16-bit samples in `audio`: is its RMS above `rms`?"""
    samples = np.frombuffer(audio, "<i2", count=len(audio) // 2 // block_samples * block_samples)
    blocks = samples.astype(np.float64).reshape(-1, block_samples)
    return (np.einsum("ij,ij->i", blocks, blocks) > rms * rms * block_samples).tolist()
