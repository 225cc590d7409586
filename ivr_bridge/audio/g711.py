"""G.711 mu-law codec, bit-exact with the ITU-T G.191 reference implementation.

Both directions are table lookups; the tables are computed once at import from the
segment/mantissa formula rather than hard-coded, so they can be audited against the spec.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "FRAME_BYTES",
    "PCM_TO_ULAW",
    "ULAW_SILENCE",
    "ULAW_TO_PCM",
    "ulaw_decode",
    "ulaw_encode",
]

#: One 20 ms Twilio media frame: 160 mu-law bytes at 8 kHz.
FRAME_BYTES = 160
#: Mu-law code for digital silence (decodes to 0).
ULAW_SILENCE = 0xFF

_BIAS = 0x84  # 132: shifts every segment boundary onto a power of two
_CLIP = 32635  # largest magnitude that still fits in segment 7 once biased (32635 + 132 = 32767)
# Biased magnitudes at which the segment (exponent) increases: 256, 512, ..., 16384.
_SEGMENT_STARTS = np.array([0x100 << s for s in range(7)], dtype=np.int32)


def _build_ulaw_to_pcm() -> np.ndarray:
    # Code bits are transmitted inverted; after inversion: sign | exponent(3) | mantissa(4).
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    table = np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)
    table.flags.writeable = False
    return table


def _build_pcm_to_ulaw() -> np.ndarray:
    # Row i holds the code for the int16 whose bit pattern, read as uint16, is i.
    x = np.arange(65536, dtype=np.int32)
    x = np.where(x >= 0x8000, x - 0x10000, x)
    negative = x < 0
    # G.191 uses the one's complement (~x == -x - 1) for negative samples, not -x; this is
    # exactly where audioop.lin2ulaw departs from the reference at decision boundaries.
    magnitude = np.minimum(np.where(negative, ~x, x), _CLIP) + _BIAS
    exponent = np.searchsorted(_SEGMENT_STARTS, magnitude, side="right").astype(np.int32)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    code = ~((negative.astype(np.int32) << 7) | (exponent << 4) | mantissa) & 0xFF
    table = code.astype(np.uint8)
    table.flags.writeable = False
    return table


#: Mu-law code (0..255) -> int16 sample.
ULAW_TO_PCM: np.ndarray = _build_ulaw_to_pcm()
#: int16 sample viewed as uint16 (0..65535) -> mu-law code.
PCM_TO_ULAW: np.ndarray = _build_pcm_to_ulaw()


def ulaw_decode(data: bytes) -> np.ndarray:
    """Decode mu-law bytes to an int16 array (one sample per byte)."""
    return ULAW_TO_PCM[np.frombuffer(data, dtype=np.uint8)]


def ulaw_encode(samples: np.ndarray) -> bytes:
    """Encode int16 samples to mu-law bytes (one byte per sample)."""
    pcm = np.asarray(samples)
    if pcm.dtype != np.int16:
        raise TypeError(f"ulaw_encode expects int16 samples, got {pcm.dtype}")
    # Reinterpreting the bits as uint16 turns the sample into a direct table index.
    return PCM_TO_ULAW[pcm.view(np.uint16)].tobytes()
