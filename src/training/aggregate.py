"""Per-category and overall scores with bootstrap confidence intervals, and the paired difference.

Input: graded items, one dict per (item, model) with ``split``, ``id``, ``category``, ``model``
(``"base"`` / ``"tuned"``), ``score`` in [0, 1] and ``passed``. Output, per split:

- ``categories[cat][model]``: ``n``, ``mean``, ``mean_ci``, ``pass_rate``, ``pass_ci``;
- ``categories[cat]["diff"]``: tuned - base paired by item id (``n`` pairs, ``mean``, ``mean_ci``,
  ``pass_rate``, ``pass_ci``);
- ``micro`` (all items pooled) and ``macro`` (the unweighted mean of category means; its CI is a
  stratified bootstrap: items are resampled within each category).

CIs are 95% percentile bootstrap intervals over items. Each group draws its resamples from
``numpy.random.default_rng(group_seed(seed, *keys))``, so a report is reproducible bit for bit, and
a paired difference resamples *pairs* (the same items for both models).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

MODELS = ("base", "tuned")
ALPHA = 0.05


def group_seed(seed: int, *keys: str) -> list[int]:
    """The seed of one group's bootstrap: the run seed plus a CRC of each key (independent streams)."""
    return [int(seed)] + [zlib.crc32(k.encode("utf-8")) for k in keys]


def bootstrap_means(values: np.ndarray, n_boot: int, seed: int | Sequence[int]) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of the rows of ``values``.

    ``values`` is (n,) or (n, k); the result is (n_boot,) or (n_boot, k). Every column is resampled
    with the same row indices: ``idx = default_rng(seed).integers(0, n, size=(n_boot, n))``.
    """
    values = np.asarray(values, dtype=float)
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    return values[idx].mean(axis=1)


def percentile_ci(boot: np.ndarray, alpha: float = ALPHA) -> list[float]:
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)
    return [float(lo), float(hi)]


def bootstrap_ci(values: Sequence[float], n_boot: int, seed: int | Sequence[int],
                 alpha: float = ALPHA) -> list[float] | None:
    """95% (by default) percentile bootstrap CI of the mean of ``values``; None when empty."""
    if len(values) == 0:
        return None
    return percentile_ci(bootstrap_means(np.asarray(values, dtype=float), n_boot, seed), alpha)


def _stats(matrix: np.ndarray, n_boot: int, seed: list[int]) -> tuple[dict[str, Any], np.ndarray | None]:
    """matrix: (n, 2) columns score, passed. Returns the summary and the bootstrap means (n_boot, 2)."""
    n = matrix.shape[0]
    if n == 0:
        return {"n": 0, "mean": None, "mean_ci": None, "pass_rate": None, "pass_ci": None}, None
    boot = bootstrap_means(matrix, n_boot, seed)
    return {
        "n": int(n),
        "mean": float(matrix[:, 0].mean()),
        "mean_ci": [float(x) for x in np.quantile(boot[:, 0], [ALPHA / 2, 1 - ALPHA / 2])],
        "pass_rate": float(matrix[:, 1].mean()),
        "pass_ci": [float(x) for x in np.quantile(boot[:, 1], [ALPHA / 2, 1 - ALPHA / 2])],
    }, boot


def _from_boots(point: np.ndarray, boots: list[np.ndarray], n: int) -> dict[str, Any]:
    """Macro summary: point = mean of category means; CI from the mean of per-category replicates."""
    if not boots:
        return {"n": n, "n_categories": 0, "mean": None, "mean_ci": None, "pass_rate": None, "pass_ci": None}
    macro = np.mean(np.stack(boots), axis=0)  # (n_boot, 2)
    return {
        "n": int(n), "n_categories": len(boots),
        "mean": float(point[0]), "mean_ci": percentile_ci(macro[:, 0]),
        "pass_rate": float(point[1]), "pass_ci": percentile_ci(macro[:, 1]),
    }


def _matrix(items: list[dict[str, Any]]) -> np.ndarray:
    return np.array([[float(it["score"]), float(bool(it["passed"]))] for it in items], dtype=float).reshape(-1, 2)


def _pairs(items: list[dict[str, Any]]) -> np.ndarray:
    """(n_pairs, 2) tuned - base differences of score and passed, paired by item id, sorted by id."""
    by = {m: {it["id"]: it for it in items if it["model"] == m} for m in MODELS}
    ids = sorted(set(by["base"]) & set(by["tuned"]))
    rows = [[float(by["tuned"][i]["score"]) - float(by["base"][i]["score"]),
             float(bool(by["tuned"][i]["passed"])) - float(bool(by["base"][i]["passed"]))] for i in ids]
    return np.array(rows, dtype=float).reshape(-1, 2)


def summarize_split(items: list[dict[str, Any]], *, n_boot: int, seed: int, split: str = "test"
                    ) -> dict[str, Any]:
    """Per-category, micro and macro summaries of one split's graded items."""
    cats = sorted({it["category"] for it in items})
    out: dict[str, Any] = {"categories": {}}
    macro_boots: dict[str, list[np.ndarray]] = {m: [] for m in (*MODELS, "diff")}
    macro_points: dict[str, list[np.ndarray]] = {m: [] for m in (*MODELS, "diff")}
    for cat in cats:
        group = [it for it in items if it["category"] == cat]
        entry: dict[str, Any] = {}
        for m in MODELS:
            mat = _matrix([it for it in group if it["model"] == m])
            entry[m], boot = _stats(mat, n_boot, group_seed(seed, split, cat, m))
            if boot is not None:
                macro_boots[m].append(boot)
                macro_points[m].append(mat.mean(axis=0))
        pairs = _pairs(group)
        entry["diff"], boot = _stats(pairs, n_boot, group_seed(seed, split, cat, "diff"))
        if boot is not None:
            macro_boots["diff"].append(boot)
            macro_points["diff"].append(pairs.mean(axis=0))
        out["categories"][cat] = entry
    out["micro"] = {m: _stats(_matrix([it for it in items if it["model"] == m]), n_boot,
                              group_seed(seed, split, "__micro__", m))[0] for m in MODELS}
    out["micro"]["diff"] = _stats(_pairs(items), n_boot, group_seed(seed, split, "__micro__", "diff"))[0]
    out["macro"] = {}
    for m in (*MODELS, "diff"):
        point = np.mean(np.stack(macro_points[m]), axis=0) if macro_points[m] else np.zeros(2)
        n = out["micro"][m]["n"]
        out["macro"][m] = _from_boots(point, macro_boots[m], n)
    return out


def aggregate(items: list[dict[str, Any]], *, n_boot: int, seed: int) -> dict[str, Any]:
    """``{split: summarize_split(...)}`` for every split present (``test``, ``gold``)."""
    splits = sorted({it.get("split", "test") for it in items})
    return {s: summarize_split([it for it in items if it.get("split", "test") == s],
                               n_boot=n_boot, seed=seed, split=s) for s in splits}


def cohen_kappa(a: Sequence[bool | str], b: Sequence[bool | str]) -> float | None:
    """Cohen's kappa of two raters' labels; None when undefined (fewer than 1 item or p_e = 1)."""
    if len(a) != len(b):
        raise ValueError("raters differ in length")
    n = len(a)
    if n == 0:
        return None
    cats = sorted(set(a) | set(b), key=str)
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    p_e = sum((sum(x == c for x in a) / n) * (sum(y == c for y in b) / n) for c in cats)
    if abs(1 - p_e) < 1e-12:
        return None
    return (p_o - p_e) / (1 - p_e)
