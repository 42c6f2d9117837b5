"""Summaries of repeated measurements: medians with their range, percentiles (bench and soak)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements and their range."""

    median: float
    low: float
    high: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        """Summarise measurements (at least one)."""
        data = tuple(float(v) for v in values)
        return cls(float(np.median(data)), min(data), max(data), data)

    def to_json(self) -> dict[str, Any]:
        """Rounded for the report."""
        return {
            "median": round(self.median, 2),
            "min": round(self.low, 2),
            "max": round(self.high, 2),
            "values": [round(v, 2) for v in self.values],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Spread:
        """Back from ``to_json`` (as a report reads bench.json)."""
        return cls(data["median"], data["min"], data["max"], tuple(data["values"]))

    def __str__(self) -> str:
        return f"{self.median:.0f} [{self.low:.0f}-{self.high:.0f}]"


def percentiles(
    values: Sequence[float], points: Sequence[int] = (10, 50, 90, 99), *, mean: bool = False
) -> dict[str, float]:
    """``{"p10": ..., ..., "max": ...}`` (and ``"mean"`` when asked) rounded to 0.1; empty input: ``{}``."""
    if not values:
        return {}
    data = np.asarray(values, dtype=np.float64)
    found = np.percentile(data, points)
    summary = {f"p{p}": round(float(v), 1) for p, v in zip(points, found, strict=True)}
    summary["max"] = round(float(data.max()), 1)
    if mean:
        summary["mean"] = round(float(data.mean()), 1)
    return summary


def median_of(runs: Sequence[Mapping[str, Any]], *path: str) -> Spread:
    """The spread of one figure (found by ``path``) over several runs' summaries."""
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        values.append(float(value))
    return Spread.of(values)
