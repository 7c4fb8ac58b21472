"""Aggregation: bootstrap CIs on samples with known answers, clustered (group) resampling, paired
differences (tuned - base, tuned - few-shot), micro/macro, kappa."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.aggregate import (
    ARMS,
    DIFFS,
    aggregate,
    bootstrap_ci,
    bootstrap_means,
    cohen_kappa,
    group_seed,
    summarize_split,
)


def _items(cat, base_scores, tuned_scores, split="test", prefix=None, fewshot_scores=None, groups=None):
    out = []
    arms = {"base": base_scores, "tuned": tuned_scores}
    if fewshot_scores is not None:
        arms["fewshot"] = fewshot_scores
    for i in range(len(base_scores)):
        iid = f"{prefix or cat}-{i:03d}"
        for m, scores in arms.items():
            it = {"split": split, "id": iid, "category": cat, "model": m, "score": scores[i],
                  "passed": scores[i] >= 1}
            if groups is not None:
                it["group_id"] = groups[i]
            out.append(it)
    return out


def test_all_equal_scores_give_zero_width_ci():
    assert bootstrap_ci([0.75] * 13, n_boot=500, seed=1) == [0.75, 0.75]
    s = summarize_split(_items("a", [1.0] * 5, [1.0] * 5), n_boot=200, seed=3)
    cat = s["categories"]["a"]
    assert cat["n"] == 5 and cat["n_groups"] == 5
    assert cat["base"] == {"n": 5, "mean": 1.0, "ci": [1.0, 1.0], "pass_rate": 1.0, "pass_ci": [1.0, 1.0]}
    assert cat["tuned_minus_base"] == {"n": 5, "mean": 0.0, "ci": [0.0, 0.0], "pass_rate": 0.0,
                                       "pass_ci": [0.0, 0.0]}
    # no few-shot arm in the items: its entries are there, empty
    assert cat["fewshot"] == {"n": 0, "mean": None, "ci": None, "pass_rate": None, "pass_ci": None}
    assert cat["tuned_minus_fewshot"]["n"] == 0 and cat["tuned_minus_fewshot"]["ci"] is None


def test_bootstrap_ci_matches_independent_numpy_percentile_bootstrap():
    # a 0/1 sample: 7 successes of 20
    x = np.array([1] * 7 + [0] * 13, dtype=float)
    rng = np.random.default_rng(2024)
    means = np.array([x[rng.integers(0, 20, size=20)].mean() for _ in range(1000)])
    expected = [np.percentile(means, 2.5), np.percentile(means, 97.5)]
    assert bootstrap_ci(x, n_boot=1000, seed=2024) == pytest.approx(expected, abs=1e-12)


def test_clustered_bootstrap_matches_independent_group_resampling():
    # 4 groups of unequal size; each replicate draws 4 groups and takes the mean of all their rows
    x = np.array([1, 1, 1, 0, 0, 1, 0, 0, 0, 1], dtype=float)
    g = ["a", "a", "a", "b", "b", "c", "d", "d", "d", "d"]
    sums, counts = np.array([3.0, 0.0, 1.0, 1.0]), np.array([3.0, 2.0, 1.0, 4.0])  # groups a, b, c, d
    rng = np.random.default_rng(99)
    idx = rng.integers(0, 4, size=(500, 4))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    expected = [np.percentile(means, 2.5), np.percentile(means, 97.5)]
    assert bootstrap_ci(x, n_boot=500, seed=99, groups=g) == pytest.approx(expected, abs=1e-12)
    # one row per group: the clustered bootstrap is the row bootstrap, draw for draw
    assert bootstrap_means(x, 300, 5, groups=list(range(10))) == pytest.approx(bootstrap_means(x, 300, 5))


def test_clustered_ci_is_at_least_as_wide_as_the_row_ci_on_duplicated_groups():
    """Issue 14: 12 groups of 5 rows that share their outcome (a source item and its near-copies)."""
    outcome = [1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1]
    base = [float(o) for o in outcome for _ in range(5)]
    tuned = [1.0] * len(base)
    groups = [f"g{k}" for k in range(12) for _ in range(5)]
    rows = summarize_split(_items("dup", base, tuned), n_boot=1000, seed=4)["categories"]["dup"]
    clustered = summarize_split(_items("dup", base, tuned, groups=groups), n_boot=1000, seed=4)["categories"]["dup"]
    assert clustered["n"] == 60 and clustered["n_groups"] == 12 and rows["n_groups"] == 60
    assert clustered["base"]["mean"] == rows["base"]["mean"] == pytest.approx(0.5)

    def width(e):
        return e["ci"][1] - e["ci"][0]

    for key in ("base", "tuned_minus_base"):
        assert width(clustered[key]) >= width(rows[key])
        # 12 effective observations, not 60: about sqrt(5) times wider
        assert width(clustered[key]) > 1.8 * width(rows[key])
    micro_rows = summarize_split(_items("dup", base, tuned), n_boot=1000, seed=4)["overall"]
    micro_cl = summarize_split(_items("dup", base, tuned, groups=groups), n_boot=1000, seed=4)["overall"]
    assert width(micro_cl["base"]) > width(micro_rows["base"])


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
    assert c["base"]["ci"] == pytest.approx(bootstrap_ci(base, 300, group_seed(11, "test", "rates", "base")))
    diff = np.array(tuned, float) - np.array(base, float)
    d = c["tuned_minus_base"]
    assert d["n"] == 8
    assert d["mean"] == 0.25
    assert d["ci"] == pytest.approx(bootstrap_ci(diff, 300, group_seed(11, "test", "rates", "tuned_minus_base")))
    # every item improved or stayed: the paired CI cannot go below 0
    assert d["ci"][0] >= 0.0


def test_paired_difference_is_paired_by_id():
    # base and tuned identical per item but very spread: the unpaired CIs are wide, the paired one is zero
    scores = [0.0, 1.0, 0.25, 0.75, 0.5, 1.0, 0.0, 0.5]
    items = _items("x", scores, scores)
    items.reverse()  # order must not matter
    s = summarize_split(items, n_boot=400, seed=5)["categories"]["x"]
    assert s["base"]["ci"][1] - s["base"]["ci"][0] > 0.3
    assert s["tuned_minus_base"]["ci"] == [0.0, 0.0]


def test_three_arms_and_both_paired_differences():
    base = [0, 0, 0, 0, 1, 0, 0, 0]
    few = [1, 0, 1, 0, 1, 0, 0, 0]
    tuned = [1, 1, 1, 0, 1, 1, 1, 0]
    groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    s = summarize_split(_items("q", base, tuned, fewshot_scores=few, groups=groups), n_boot=500, seed=2)
    c = s["categories"]["q"]
    assert set(ARMS) == {"base", "fewshot", "tuned"} and set(DIFFS) == {"tuned_minus_base", "tuned_minus_fewshot"}
    assert (c["base"]["mean"], c["fewshot"]["mean"], c["tuned"]["mean"]) == (1 / 8, 3 / 8, 6 / 8)
    assert c["tuned_minus_base"]["mean"] == pytest.approx(5 / 8)
    assert c["tuned_minus_fewshot"]["mean"] == pytest.approx(3 / 8)
    # the paired difference resamples groups of pairs: tuned - few-shot per row = 0 1 | 0 0 | 0 1 | 1 0
    per_group = np.array([[1, 2], [0, 2], [1, 2], [1, 2]], dtype=float)  # (sum of diffs, rows) of a, b, c, d
    rng = np.random.default_rng(group_seed(2, "test", "q", "tuned_minus_fewshot"))
    idx = rng.integers(0, 4, size=(500, 4))
    boot = per_group[idx, 0].sum(axis=1) / per_group[idx, 1].sum(axis=1)
    assert c["tuned_minus_fewshot"]["ci"] == pytest.approx([float(np.quantile(boot, 0.025)),
                                                           float(np.quantile(boot, 0.975))])
    for key in ("overall", "macro"):
        assert s[key]["tuned_minus_fewshot"]["mean"] == pytest.approx(3 / 8)
        assert len(s[key]["fewshot"]["ci"]) == 2


def test_micro_and_macro():
    items = _items("a", [1, 1, 1, 1], [1, 1, 1, 1]) + _items("b", [0, 0], [1, 0])
    s = summarize_split(items, n_boot=200, seed=0)
    assert s["overall"]["n"] == 6
    assert s["overall"]["base"]["n"] == 6
    assert s["overall"]["base"]["mean"] == pytest.approx(4 / 6)
    assert s["overall"]["tuned"]["mean"] == pytest.approx(5 / 6)
    assert s["overall"]["tuned_minus_base"]["mean"] == pytest.approx(1 / 6)
    assert s["macro"]["base"]["mean"] == pytest.approx((1.0 + 0.0) / 2)
    assert s["macro"]["tuned"]["mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["macro"]["tuned_minus_base"]["mean"] == pytest.approx(0.25)
    assert s["macro"]["n_categories"] == 2
    # stratified bootstrap: categories with constant scores contribute no spread
    assert s["macro"]["base"]["ci"] == [0.5, 0.5]
    lo, hi = s["macro"]["tuned"]["ci"]
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
