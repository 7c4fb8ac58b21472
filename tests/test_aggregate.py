"""Aggregation: bootstrap CIs on samples with known answers, paired differences, micro/macro, kappa."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.aggregate import aggregate, bootstrap_ci, cohen_kappa, group_seed, summarize_split


def _items(cat, base_scores, tuned_scores, split="test", prefix=None):
    out = []
    for i, (b, t) in enumerate(zip(base_scores, tuned_scores, strict=True)):
        iid = f"{prefix or cat}-{i:03d}"
        out.append({"split": split, "id": iid, "category": cat, "model": "base", "score": b, "passed": b >= 1})
        out.append({"split": split, "id": iid, "category": cat, "model": "tuned", "score": t, "passed": t >= 1})
    return out


def test_all_equal_scores_give_zero_width_ci():
    assert bootstrap_ci([0.75] * 13, n_boot=500, seed=1) == [0.75, 0.75]
    s = summarize_split(_items("a", [1.0] * 5, [1.0] * 5), n_boot=200, seed=3)
    cat = s["categories"]["a"]
    assert cat["base"] == {"n": 5, "mean": 1.0, "mean_ci": [1.0, 1.0], "pass_rate": 1.0, "pass_ci": [1.0, 1.0]}
    assert cat["diff"] == {"n": 5, "mean": 0.0, "mean_ci": [0.0, 0.0], "pass_rate": 0.0, "pass_ci": [0.0, 0.0]}


def test_bootstrap_ci_matches_independent_numpy_percentile_bootstrap():
    # a 0/1 sample: 7 successes of 20
    x = np.array([1] * 7 + [0] * 13, dtype=float)
    rng = np.random.default_rng(2024)
    means = np.array([x[rng.integers(0, 20, size=20)].mean() for _ in range(1000)])
    expected = [np.percentile(means, 2.5), np.percentile(means, 97.5)]
    assert bootstrap_ci(x, n_boot=1000, seed=2024) == pytest.approx(expected, abs=1e-12)


def test_bootstrap_ci_large_n_matches_normal_approximation():
    n, p = 4000, 0.3
    x = np.array([1.0] * int(n * p) + [0.0] * int(n * (1 - p)))
    lo, hi = bootstrap_ci(x, n_boot=2000, seed=7)
    se = math.sqrt(p * (1 - p) / n)
    assert lo == pytest.approx(p - 1.96 * se, abs=0.003)
    assert hi == pytest.approx(p + 1.96 * se, abs=0.003)


def test_summary_uses_documented_group_seeds():
    base = [1, 0, 1, 1, 0, 0, 1, 0]
    tuned = [1, 1, 1, 1, 0, 1, 1, 0]
    s = summarize_split(_items("rates", base, tuned), n_boot=300, seed=11)
    c = s["categories"]["rates"]
    assert c["base"]["mean"] == 0.5 and c["tuned"]["mean"] == 0.75
    assert c["base"]["mean_ci"] == pytest.approx(bootstrap_ci(base, 300, group_seed(11, "test", "rates", "base")))
    diff = np.array(tuned, float) - np.array(base, float)
    assert c["diff"]["n"] == 8
    assert c["diff"]["mean"] == 0.25
    assert c["diff"]["mean_ci"] == pytest.approx(bootstrap_ci(diff, 300, group_seed(11, "test", "rates", "diff")))
    # every item improved or stayed: the paired CI cannot go below 0
    assert c["diff"]["mean_ci"][0] >= 0.0


def test_paired_difference_is_paired_by_id():
    # base and tuned identical per item but very spread: the unpaired CIs are wide, the paired one is zero
    scores = [0.0, 1.0, 0.25, 0.75, 0.5, 1.0, 0.0, 0.5]
    items = _items("x", scores, scores)
    items.reverse()  # order must not matter
    s = summarize_split(items, n_boot=400, seed=5)["categories"]["x"]
    assert s["base"]["mean_ci"][1] - s["base"]["mean_ci"][0] > 0.3
    assert s["diff"]["mean_ci"] == [0.0, 0.0]


def test_micro_and_macro():
    items = _items("a", [1, 1, 1, 1], [1, 1, 1, 1]) + _items("b", [0, 0], [1, 0])
    s = summarize_split(items, n_boot=200, seed=0)
    assert s["micro"]["base"]["n"] == 6
    assert s["micro"]["base"]["mean"] == pytest.approx(4 / 6)
    assert s["micro"]["tuned"]["mean"] == pytest.approx(5 / 6)
    assert s["micro"]["diff"]["mean"] == pytest.approx(1 / 6)
    assert s["macro"]["base"]["mean"] == pytest.approx((1.0 + 0.0) / 2)
    assert s["macro"]["tuned"]["mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["macro"]["diff"]["mean"] == pytest.approx(0.25)
    assert s["macro"]["base"]["n_categories"] == 2
    # stratified bootstrap: categories with constant scores contribute no spread
    assert s["macro"]["base"]["mean_ci"] == [0.5, 0.5]
    lo, hi = s["macro"]["tuned"]["mean_ci"]
    assert 0.5 <= lo <= 0.75 <= hi <= 1.0


def test_aggregate_separates_splits():
    items = _items("a", [1, 0], [1, 1]) + _items("a", [0], [0], split="gold", prefix="g")
    out = aggregate(items, n_boot=100, seed=0)
    assert sorted(out) == ["gold", "test"]
    assert out["gold"]["categories"]["a"]["base"]["n"] == 1
    assert out["test"]["categories"]["a"]["tuned"]["mean"] == 1.0


def test_cohen_kappa_exact():
    a = [True, True, False, False, True, False, True, True]
    b = [True, False, False, False, True, True, True, True]
    # p_o = 6/8; p_e = (5/8)(5/8) + (3/8)(3/8) = 34/64; kappa = (48/64 - 34/64) / (30/64) = 14/30
    assert cohen_kappa(a, b) == pytest.approx(14 / 30)
    assert cohen_kappa([True, False], [True, False]) == pytest.approx(1.0)
    assert cohen_kappa([True] * 4, [True, False, True, False]) == pytest.approx(0.0)
    assert cohen_kappa([True] * 3, [True] * 3) is None  # p_e = 1: undefined
    assert cohen_kappa([], []) is None
