"""Bootstrap intervals: they cover the mean, shrink with more samples, and pairing removes shared noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from resadapt.stats import fmt, grouped_ci, mean_ci, paired_ci


def test_mean_ci_brackets_the_mean_and_shrinks_with_samples():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 2, 40).astype(float)
    m, lo, hi = mean_ci(small)
    assert lo <= m <= hi and m == small.mean()
    big = np.tile(small, 16)
    _, blo, bhi = mean_ci(big)
    assert bhi - blo < (hi - lo) / 2  # 16x the samples: about a quarter of the width
    assert mean_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    assert all(np.isnan(mean_ci([])))


def test_pairing_removes_the_noise_both_methods_share():
    rng = np.random.default_rng(1)
    hard = rng.uniform(0, 1, 200)  # per-sample difficulty, shared by both methods
    a = (hard > 0.3).astype(float)
    b = (hard > 0.4).astype(float)  # b is right on a subset of a's samples
    m, lo, hi = paired_ci(a, b)
    assert m == pytest.approx(a.mean() - b.mean()) and lo >= 0  # decided by pairing
    _, alo, _ = mean_ci(a)
    _, _, bhi = mean_ci(b)
    assert alo < bhi  # the two separate intervals overlap: unpaired, it would look undecided
    assert paired_ci(a, a, 0.9)[0] == pytest.approx(0.1 * a.mean())
    with pytest.raises(ValueError, match="length"):
        paired_ci(a, b[:-1])


def test_grouped_ci_and_format():
    df = pd.DataFrame({"m": ["x", "x", "y", "y"], "s": [1.0, 0.0, 1.0, 1.0]})
    t = grouped_ci(df, ["m"], "s", 100.0).set_index("m")
    assert t.loc["x", "mean"] == 50.0 and t.loc["y", "low"] == 100.0 and t.loc["x", "n"] == 2
    assert fmt(50.0, 40.0, 60.0) == "50.0 [40.0, 60.0]" and fmt(float("nan"), 0, 0) == ""
