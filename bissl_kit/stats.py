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


def replicate_test(per_replicate, confidence: float = 0.95) -> dict:
    """The test over whole-run replicates: a two-sided one-sample t-test of the per-replicate mean paired
    differences against 0 (t over R, df R − 1) with the t-interval of their mean. The replicate, not the
    fine-tuning seed, is the unit: R runs of the stage are R draws of what the method gives."""
    d = [float(x) for x in per_replicate]
    res = paired_ttest(d, [0.0] * len(d), confidence)
    return {**res, "test": f"two-sided one-sample t-test of the per-run mean differences, R = {len(d)}"}


def variance_split(groups) -> dict:
    """One-way random-effects ANOVA of paired differences grouped by replicate (``groups``: one list of
    per-fine-tuning-seed differences per replicate): d_rs = μ + a_r + e_rs, Var a = σ²_between (the run),
    Var e = σ²_within (the fine-tuning seed). Method-of-moments estimates: σ²_within = MSW,
    σ²_between = max(0, (MSB − MSW)/n₀) with n₀ = (N − Σn_r²/N)/(R − 1) (n₀ = n when balanced); F = MSB/MSW
    on (R − 1, N − R) degrees of freedom tests σ²_between = 0. NaN where a part is undefined."""
    gs = [np.asarray(list(g), dtype=float) for g in groups]
    gs = [g for g in gs if len(g)]
    r, sizes = len(gs), np.array([len(g) for g in gs], dtype=float)
    n_all = float(sizes.sum())
    nan = math.nan
    if r < 2 or n_all <= r:
        return {"replicates": r, "n": int(n_all), "ms_between": nan, "ms_within": nan, "var_between": nan,
                "var_within": nan, "share_between": nan, "f": nan, "p": nan, "df_between": r - 1,
                "df_within": int(n_all - r)}
    grand = float(np.concatenate(gs).mean())
    ssb = float(sum(len(g) * (g.mean() - grand) ** 2 for g in gs))
    ssw = float(sum(((g - g.mean()) ** 2).sum() for g in gs))
    msb, msw = ssb / (r - 1), ssw / (n_all - r)
    n0 = (n_all - float((sizes ** 2).sum()) / n_all) / (r - 1)
    var_b, var_w = max(0.0, (msb - msw) / n0), msw
    total = var_b + var_w
    f = msb / msw if msw > 0 else nan
    p = float(stats.f.sf(f, r - 1, n_all - r)) if msw > 0 else nan
    return {"replicates": r, "n": int(n_all), "ms_between": msb, "ms_within": msw, "var_between": var_b,
            "var_within": var_w, "share_between": var_b / total if total > 0 else nan, "f": f, "p": p,
            "df_between": r - 1, "df_within": int(n_all - r)}


def crossed_test(table, confidence: float = 0.95) -> dict:
    """The grand mean of paired differences d_rs from R BiSSL runs × S fine-tuning seeds, every run
    fine-tuned with the *same* seeds, with both the run and the seed treated as random draws.

    The seeds are crossed with the runs, not nested in them (seed s of every run shares its head
    initialisation and batch order), so a seed's effect is common to all runs, and the t over the R run
    means (:func:`replicate_test`) conditions on the S seeds drawn: it cannot see that another draw of
    seeds would shift every run alike. Two-way random-effects model without replication,
    d_rs = μ + a_r + b_s + e_rs, with mean squares MS_R (df R − 1), MS_S (df S − 1), MS_E (df (R−1)(S−1)):
    Var(d̄) = σ²_a/R + σ²_b/S + σ²_e/(RS), estimated from the method-of-moments components
    (σ²_a = (MS_R − MS_E)/S, σ²_b = (MS_S − MS_E)/R, σ²_e = MS_E, a negative one set to 0), with
    Satterthwaite's degrees of freedom for the t-interval. When the runs agree better than the residual
    allows, this is the t over the S seed means (df S − 1); when the seeds do, the t over the R run means.
    NaN where undefined (R or S < 2, or no spread at all)."""
    d = np.asarray(table, dtype=float)
    if d.ndim != 2:
        raise ValueError(f"crossed_test needs an R × S table of differences, got shape {d.shape}")
    r, s = d.shape
    nan = math.nan
    out = {"replicates": r, "seeds": s, "n": int(d.size), "mean_diff": float(d.mean()) if d.size else nan,
           "confidence": confidence, "test": f"two-way random effects (BiSSL run × fine-tuning seed), {r} × {s}"}
    if r < 2 or s < 2:
        return {**out, "lo": nan, "hi": nan, "t": nan, "df": nan, "p": nan, "var_run": nan, "var_seed": nan,
                "var_residual": nan, "se": nan}
    m = d.mean()
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    ms_r = s * float(((rows - m) ** 2).sum()) / (r - 1)
    ms_s = r * float(((cols - m) ** 2).sum()) / (s - 1)
    resid = d - rows[:, None] - cols[None, :] + m
    ms_e = float((resid ** 2).sum()) / ((r - 1) * (s - 1))
    comps = {"var_run": max(0.0, (ms_r - ms_e) / s), "var_seed": max(0.0, (ms_s - ms_e) / r), "var_residual": ms_e}
    # Var(d̄) from the components, a negative estimate set to 0 (the usual truncation): as a combination
    # Σ c·MS of the mean squares, c_R = [MS_R > MS_E], c_S = [MS_S > MS_E], c_E = 1 − c_R − c_S. Without
    # the truncation a run mean square below the residual one can make the estimate ≤ 0 and
    # Satterthwaite's df < 1; with it, a factor whose effect is not seen drops out of the variance.
    c = [float(ms_r > ms_e), float(ms_s > ms_e)]
    c.append(1.0 - c[0] - c[1])
    ms, dfs = [ms_r, ms_s, ms_e], [r - 1, s - 1, (r - 1) * (s - 1)]
    var_mean = sum(ci * m_ for ci, m_ in zip(c, ms)) / (r * s)
    if var_mean <= 0:
        return {**out, **comps, "lo": nan, "hi": nan, "t": nan, "df": nan, "p": nan, "se": nan}
    # Satterthwaite: the df of a linear combination of independent mean squares
    df = (r * s * var_mean) ** 2 / sum((ci * m_) ** 2 / k for ci, m_, k in zip(c, ms, dfs) if ci)
    se = math.sqrt(var_mean)
    t = float(m) / se
    q = float(stats.t.ppf((1 + confidence) / 2, df))
    return {**out, **comps, "se": se, "t": t, "df": df, "p": float(2 * stats.t.sf(abs(t), df)),
            "lo": float(m) - q * se, "hi": float(m) + q * se}
