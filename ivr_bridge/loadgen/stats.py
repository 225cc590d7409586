"""Percentile summaries of latency samples."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True, slots=True)
class Summary:
    """Count, p50/p95/p99 and max of some samples (None when there are none)."""

    count: int
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    def as_dict(self, digits: int = 2) -> dict[str, float | int | None]:
        def r(value: float | None) -> float | None:
            return None if value is None else round(value, digits)

        values = {"p50": self.p50, "p95": self.p95, "p99": self.p99, "max": self.max}
        return {"count": self.count, **{key: r(value) for key, value in values.items()}}


def summarize(samples: Iterable[float] | np.ndarray) -> Summary:
    """Percentiles by linear interpolation between closest ranks (numpy's default)."""
    values = np.asarray(samples if isinstance(samples, np.ndarray) else list(samples), dtype=np.float64)
    if values.size == 0:
        return Summary(0)
    p50, p95, p99 = (float(v) for v in np.percentile(values, PERCENTILES))
    return Summary(int(values.size), p50, p95, p99, float(values.max()))
