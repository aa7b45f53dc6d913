"""The statistics of a comparison: t-intervals of a mean and the paired t-test, through scipy.

Both are scipy's own (``ttest_1samp`` and ``ttest_rel`` with their ``confidence_interval``); the kit
only adds the degenerate cases a handful of seeds can produce, where scipy returns NaN with a
warning or an infinite t: one value (no interval) and differences that are all equal (no spread, so
no test). Those come back as NaN here, silently, because the tables print them as "n/a".
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean and two-sided t-interval: mean ± t_{(1+c)/2, n−1} · s/√n (s with n − 1 in the denominator).
    With n < 2 the interval is undefined (NaN)."""
    x = np.asarray(list(values), dtype=float)
    n = len(x)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    if n > 1 and sd > 0:
        ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
        lo, hi = float(ci.low), float(ci.high)
    else:  # one value, or all equal: the interval is the point itself, or undefined
        lo = hi = mean if n > 1 else math.nan
    half = (hi - lo) / 2 if n > 1 else math.nan
    return {"mean": mean, "lo": lo, "hi": hi, "half_width": half, "sd": sd, "n": n, "confidence": confidence}


def paired_ttest(a, b, confidence: float = 0.95) -> dict:
    """Two-sided paired t-test of a − b: t = mean(d)/(s_d/√n) with n − 1 degrees of freedom, and the
    t-interval of the mean difference. NaN when n < 2 or every difference is equal."""
    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length ({len(a)} vs {len(b)})")
    d = a - b
    n = len(d)
    ci = mean_ci(d, confidence) if n else None
    t = p = math.nan
    if n > 1 and ci["sd"] > 0:
        res = stats.ttest_rel(a, b)
        t, p = float(res.statistic), float(res.pvalue)
    return {"n": n, "mean_diff": ci["mean"] if ci else math.nan, "lo": ci["lo"] if ci else math.nan,
            "hi": ci["hi"] if ci else math.nan, "t": t, "df": n - 1, "p": p, "confidence": confidence,
            "test": f"two-sided paired t-test over seeds, n = {n}"}
