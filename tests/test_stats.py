"""stats: paired differences over seeds, Holm's correction, the smallest detectable difference, the wording."""
import numpy as np
import pytest
from scipy import stats

from encodenet_timm.stats import MIN_SEEDS, describe, holm, min_detectable, paired_difference, seeds_needed


def test_paired_difference_is_scipys_paired_t_test_with_its_interval():
    a, b = [0.71, 0.69, 0.74, 0.70], [0.70, 0.70, 0.71, 0.66]
    d = paired_difference(a, b)
    ref = stats.ttest_rel(a, b)
    assert d["mean"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert d["t"] == pytest.approx(ref.statistic) and d["p"] == pytest.approx(ref.pvalue)
    low, high = ref.confidence_interval(0.95)
    assert d["ci"] == pytest.approx([low, high])
    assert paired_difference([0.5], [0.4])["p"] is None  # one seed: nothing to test
    assert paired_difference([0.5, 0.6], [0.4, 0.5])["p"] is None  # identical differences: no variance


def test_two_seeds_never_beat_or_lose_however_small_p():
    """The audit's case: per-seed differences -0.25 and -0.27 give p = 0.02 at df = 1; two seeds say nothing."""
    d = paired_difference([0.6700, 0.6711], [0.6725, 0.6738])
    assert d["n"] == 2 and d["p"] < 0.05
    text = describe(d, d["p"], "baseline")
    assert "beats" not in text and "loses" not in text
    assert text.startswith("below baseline by -0.26") and f"no test below {MIN_SEEDS}" in text
    assert describe(d, d["p"], "baseline", seeds_note=False) == "below baseline by -0.26"  # a verdict says it once


def test_three_seeds_with_a_clear_effect_beat_with_an_interval_and_a_corrected_p():
    d = paired_difference([0.72, 0.73, 0.715], [0.70, 0.705, 0.69])
    p = holm([d["p"], 0.5, 0.3])[0]
    assert p == pytest.approx(3 * d["p"]) and p < 0.05
    text = describe(d, p, "continued")
    assert text.startswith(f"beats continued (+2.33, p={p:.3f} Holm, 95% CI +") and "uncorrected" in text
    lost = paired_difference([0.70, 0.705, 0.69], [0.72, 0.73, 0.715])
    assert describe(lost, p, "continued").startswith("loses to continued (-2.33")


def test_no_significant_difference_says_what_the_seeds_could_have_detected():
    d = paired_difference([0.70, 0.71, 0.69, 0.70], [0.70, 0.70, 0.70, 0.705])
    text = describe(d, d["p"], "ema")
    assert text.startswith("no significant difference from ema") and "95% CI" in text
    assert f"could detect {100 * d['detectable']:.2f}" in text and "ties" not in text
    # the detectable difference: (t_{.975} + t_{.8}) * sd / sqrt(n), and more seeds detect less
    n, sd = 4, d["std"]
    assert d["detectable"] == pytest.approx((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / np.sqrt(n))
    assert min_detectable(sd, 10) < min_detectable(sd, 4)
    needed = seeds_needed(sd, 0.5 * d["detectable"])
    assert needed > n and min_detectable(sd, needed) <= 0.5 * d["detectable"] < min_detectable(sd, needed - 1)


def test_holm_is_the_step_down_correction():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.01, None, 0.2])  # None is no comparison: two are corrected for, not three
    assert adjusted[1] is None and adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.2)
    assert holm([0.2, 0.9]) == pytest.approx([0.4, 0.9]) and holm([0.6, 0.7]) == [1.0, 1.0]  # monotone, capped at 1
    assert holm([]) == []
