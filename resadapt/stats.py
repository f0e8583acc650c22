"""Bootstrap confidence intervals for the tables and bar checks.

A table cell is a mean over test samples (60-150 of them here), so a difference of a few points can be
noise. Every reported mean gets a percentile bootstrap interval, and every comparison between two methods
is a *paired* bootstrap over the samples both saw (the same videos, resampled together), which is much
tighter than comparing two separate intervals. Seeded, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

LEVEL = 0.95
RESAMPLES = 1000


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def mean_ci(
    values: Sequence[float] | np.ndarray, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap interval; NaN for no values."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    means = x[_indices(len(x), resamples, seed)].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def paired_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    weight_b: float = 1.0,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high) of mean(a) - weight_b * mean(b) for paired samples (a[i], b[i] on one sample)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {len(x)} vs {len(y)}")
    return mean_ci(x - weight_b * y, level, resamples, seed)


def grouped_ci(
    df: pd.DataFrame, keys: list[str], value: str, scale: float = 1.0, seed: int = 0
) -> pd.DataFrame:
    """Per group of `keys`: mean, low, high of `value` (times `scale`) and the number of samples."""
    rows = []
    for key, part in df.groupby(keys, sort=False):
        m, lo, hi = mean_ci(part[value].to_numpy(), seed=seed)
        rows.append(
            (*(key if isinstance(key, tuple) else (key,)), m * scale, lo * scale, hi * scale, len(part))
        )
    return pd.DataFrame(rows, columns=[*keys, "mean", "low", "high", "n"])


def fmt(mean: float, low: float, high: float, digits: int = 1) -> str:
    """'85.3 [80.0, 90.7]' (the report's cell format)."""
    if np.isnan(mean):
        return ""
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
