"""Paired statistics over seeds for `compare`'s verdict: what a handful of seeds can and cannot say.

A comparison of two rows pairs their accuracies seed by seed (the same baseline, data order and draws
up to the rows' own training). With fewer than `MIN_SEEDS` seeds no row "beats" or "loses to" another:
the verdict reports means only. From `MIN_SEEDS` on: the mean difference with a 95% t confidence
interval, a two-sided paired t-test whose p-values are Holm-corrected across the comparisons of one
verdict, and the smallest difference the seeds could have detected (`min_detectable`), so that "no
significant difference" says how small a difference it rules out.
"""
import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["MIN_SEEDS", "ALPHA", "POWER", "paired_difference", "holm", "min_detectable", "seeds_needed",
           "describe"]

MIN_SEEDS = 3     # fewer seeds: means only, no test (df = 1 makes a t-test's verdict meaningless)
ALPHA = 0.05      # family-wise significance level of one verdict (Holm over its comparisons)
POWER = 0.8       # for the smallest detectable difference


def _t():
    from scipy import stats  # scikit-learn's dependency; imported where it is needed
    return stats.t


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Dict[str, Any]:
    """a - b paired over seeds: per-seed diffs, mean, std, 95% CI, t, two-sided p (uncorrected), and the
    smallest difference detectable at `ALPHA` with `POWER` given the observed std.

    ``t``, ``p``, ``ci`` and ``detectable`` are None with fewer than 2 pairs or no spread (identical
    differences); the verdict uses them only from `MIN_SEEDS` seeds on.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = int(len(d))
    out: Dict[str, Any] = {"n": n, "diffs": d.tolist(), "mean": float(d.mean()) if n else None,
                           "std": float(d.std(ddof=1)) if n > 1 else None, "t": None, "p": None, "ci": None,
                           "detectable": None}
    if n >= 2 and out["std"] > 0:
        t = _t()
        se = out["std"] / math.sqrt(n)
        out["t"] = float(d.mean() / se)
        out["p"] = float(2 * t.sf(abs(out["t"]), n - 1))
        half = float(t.ppf(1 - ALPHA / 2, n - 1) * se)
        out["ci"] = [out["mean"] - half, out["mean"] + half]
        out["detectable"] = min_detectable(out["std"], n)
    return out


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm-Bonferroni adjusted p-values (None stays None and does not count as a comparison)."""
    present = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    m = len(present)
    adjusted: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))  # step-down, kept monotone
        adjusted[i] = running
    return adjusted


def min_detectable(std: float, n: int, alpha: float = ALPHA, power: float = POWER) -> Optional[float]:
    """The smallest true mean difference a two-sided paired t-test over `n` seeds detects at `alpha` with
    probability `power`, for differences of standard deviation `std` (normal approximation of the
    noncentral t: ``(t_{1-alpha/2} + t_{power}) * std / sqrt(n)``, df = n - 1)."""
    if n < 2 or not std > 0:
        return None
    t = _t()
    return float((t.ppf(1 - alpha / 2, n - 1) + t.ppf(power, n - 1)) * std / math.sqrt(n))


def seeds_needed(std: float, effect: float, alpha: float = ALPHA, power: float = POWER, most: int = 100) -> Optional[int]:
    """The fewest seeds (>= `MIN_SEEDS`) whose paired test would detect `effect` given per-seed differences of
    standard deviation `std`; None if more than `most` would be needed or nothing can be said."""
    if not std > 0 or effect == 0:
        return None
    for n in range(MIN_SEEDS, most + 1):
        if min_detectable(std, n, alpha, power) <= abs(effect):
            return n
    return None


def describe(d: Dict[str, Any], p_adjusted: Optional[float], other: str, points: float = 100.0,
             seeds_note: bool = True) -> str:
    """One comparison in words, in points: "beats X (+0.52, p=0.012 Holm, 95% CI +0.10..+0.94 uncorrected)",
    "no significant difference from X (...; could detect 0.61)", or, under `MIN_SEEDS` seeds,
    "above X by +0.30 (2 seeds: no test below 3)" (without the bracket when `seeds_note` is False: a verdict
    that says it once for every comparison)."""
    mean = points * d["mean"]
    if d["n"] < MIN_SEEDS or d["p"] is None:
        word = "above" if mean > 0 else "below" if mean < 0 else "level with"
        if d["n"] < MIN_SEEDS and not seeds_note:
            return f"{word} {other} by {mean:+.2f}"
        why = (f"{d['n']} seed{'s' * (d['n'] != 1)}: no test below {MIN_SEEDS}" if d["n"] < MIN_SEEDS
               else "identical differences on every seed: no spread to test")
        return f"{word} {other} by {mean:+.2f} ({why})"
    lo, hi = (points * v for v in d["ci"])
    ci = f"p={p_adjusted:.3f} Holm, 95% CI {lo:+.2f}..{hi:+.2f} uncorrected"
    if p_adjusted < ALPHA:
        return f"{'beats' if mean > 0 else 'loses to'} {other} ({mean:+.2f}, {ci})"
    return (f"no significant difference from {other} ({mean:+.2f}, {ci}; these seeds could detect "
            f"{points * d['detectable']:.2f})")
