"""WAV parsing for TTS audio chunks (RIFF/WAVE, 16-bit PCM, mono or stereo)."""

from __future__ import annotations

import io
import struct
import wave
from dataclasses import dataclass

import numpy as np

__all__ = ["Pcm", "WavError", "decode_tts_audio", "is_wav", "parse_wav", "wav_bytes"]

MIN_RATE = 8000
MAX_RATE = 48000
# Rate assumed for headerless chunks (what realtime voice APIs stream by default).
RAW_PCM_RATE = 24000

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# KSDATAFORMAT_SUBTYPE_PCM {00000001-0000-0010-8000-00AA00389B71} as stored on disk.
_SUBTYPE_PCM = b"\x01\x00\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
# Streaming writers put these in the data size field before the length is known.
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


class WavError(ValueError):
    """The bytes are not a WAV file this bridge can play."""


# eq=False: a generated __eq__ would compare ndarrays element-wise and raise on bool().
@dataclass(frozen=True, eq=False)
class Pcm:
    """Mono 16-bit audio: ``samples`` is a 1-D int16 array at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int


@dataclass(frozen=True)
class _Format:
    channels: int
    sample_rate: int


def is_wav(data: bytes) -> bool:
    """True if ``data`` starts with a RIFF/WAVE header."""
    return data[:4] == b"RIFF" and data[8:12] == b"WAVE"


def _parse_fmt(body: bytes) -> _Format:
    if len(body) < 16:
        raise WavError("fmt chunk too short")
    tag, channels, rate, _byte_rate, _block_align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _WAVE_FORMAT_EXTENSIBLE:
        # cbSize(2) validBits(2) channelMask(4) then the 16-byte subformat GUID.
        if len(body) < 40 or body[24:40] != _SUBTYPE_PCM:
            raise WavError("WAVE_FORMAT_EXTENSIBLE without a PCM subformat")
    elif tag != _WAVE_FORMAT_PCM:
        raise WavError(f"unsupported WAV format tag 0x{tag:04x} (need PCM)")
    if bits != 16:
        raise WavError(f"unsupported sample width: {bits} bits (need 16)")
    if channels not in (1, 2):
        raise WavError(f"unsupported channel count: {channels} (need 1 or 2)")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise WavError(f"unsupported sample rate: {rate} Hz (need {MIN_RATE}..{MAX_RATE})")
    # byte_rate and block_align are derivable and often wrong in the wild, so not trusted.
    return _Format(channels, rate)


def _decode_frames(payload: bytes, fmt: _Format) -> np.ndarray:
    frame = 2 * fmt.channels
    usable = len(payload) - len(payload) % frame
    samples = np.frombuffer(payload, dtype="<i2", count=usable // 2).astype(np.int16)
    if fmt.channels == 2:
        pairs = samples.reshape(-1, 2).astype(np.int32)
        # Floor of the mean always fits in int16, unlike the plain sum.
        samples = ((pairs[:, 0] + pairs[:, 1]) >> 1).astype(np.int16)
    return samples


def parse_wav(data: bytes) -> Pcm:
    """Parse a 16-bit PCM WAV (mono, or stereo downmixed to mono).

    A ``data`` chunk whose declared size is a streaming placeholder (0 or 0xFFFFFFFF) or
    runs past the end of ``data`` is clipped to the whole sample frames present.
    Raises :class:`WavError` (and nothing else) for anything it cannot use.
    """
    data = bytes(data)
    if len(data) < 12 or not is_wav(data):
        raise WavError("not a RIFF/WAVE file")
    fmt: _Format | None = None
    pos = 12  # after "RIFF", the RIFF size (ignored: often a placeholder) and "WAVE"
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if chunk_id == b"fmt ":
            if body + size > len(data):
                raise WavError("truncated fmt chunk")
            fmt = _parse_fmt(data[body : body + size])
        elif chunk_id == b"data":
            if fmt is None:
                raise WavError("data chunk before fmt chunk")
            end = len(data) if size in _UNKNOWN_SIZES else min(body + size, len(data))
            return Pcm(_decode_frames(data[body:end], fmt), fmt.sample_rate)
        # Chunks are word aligned: an odd-sized chunk is followed by one pad byte.
        pos = body + size + (size & 1)
    if fmt is None:
        raise WavError("missing fmt chunk")
    raise WavError("missing data chunk")


def decode_tts_audio(data: bytes) -> Pcm:
    """A TTS chunk as PCM: a WAV file, or else raw 16-bit LE mono at 24 kHz.

    An odd trailing byte of raw PCM is dropped.
    """
    data = bytes(data)
    if is_wav(data):
        return parse_wav(data)
    usable = len(data) - len(data) % 2
    samples = np.frombuffer(data, dtype="<i2", count=usable // 2).astype(np.int16)
    return Pcm(samples, RAW_PCM_RATE)


def wav_bytes(samples: np.ndarray, sample_rate: int, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV file of `samples` (interleaved when `channels` > 1)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes(np.asarray(samples).astype("<i2").tobytes())
    return buffer.getvalue()
