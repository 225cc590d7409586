"""Helpers for the load generator's tests: tone WAVs and scenario files on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ivr_bridge.audio import wav_bytes


def tone(ms: int, hz: float, rate: int = 8000, amplitude: float = 8000.0) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return np.round(amplitude * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int = 8000, channels: int = 1) -> Path:
    path.write_bytes(wav_bytes(samples, rate, channels))
    return path


def write_tone(path: Path, ms: int, hz: float = 1000.0, rate: int = 8000) -> Path:
    return write_wav(path, tone(ms, hz, rate), rate)


def write_scenario(path: Path, steps: list[dict[str, Any]], name: str = "test") -> Path:
    path.write_text(json.dumps({"name": name, "steps": steps}), encoding="utf-8")
    return path
