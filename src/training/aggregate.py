"""Per-category and overall scores with clustered bootstrap confidence intervals, and paired differences.

Input: graded items, one dict per (item, arm) with ``split``, ``id``, ``group_id`` (optional; the item's
own id when missing), ``category``, ``model`` (an arm: ``"base"`` zero-shot, ``"fewshot"`` base with
training exemplars, ``"tuned"``), ``score`` in [0, 1] and ``passed``. Output, per split:

- ``categories[cat]``: ``n`` (items), ``n_groups``; per arm (``base``, ``fewshot``, ``tuned``) ``n``,
  ``mean``, ``ci``, ``pass_rate``, ``pass_ci``; and the paired differences ``tuned_minus_base`` and
  ``tuned_minus_fewshot`` (the same keys; ``n`` is the number of pairs). An arm absent from the items
  has ``n = 0`` and ``None`` for the rest;
- ``overall``: the same over all items pooled (micro);
- ``macro``: the unweighted mean of category means (``n_categories``); its CI is a stratified
  bootstrap (each category resampled on its own, the replicates averaged).

CIs are 95% percentile bootstrap intervals that resample **groups** (``group_id``), not rows: a
replicate draws as many groups as there are, with replacement, and takes the mean over all rows of
the drawn groups (a clustered bootstrap; with one row per group it is the plain row bootstrap, draw
for draw). A paired difference is formed per item id and resamples groups of *pairs*, so both arms
see the same items. Each statistic draws from ``numpy.random.default_rng(group_seed(seed, *keys))``,
so a report is reproducible bit for bit.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

ARMS = ("base", "fewshot", "tuned")
DIFFS: dict[str, tuple[str, str]] = {"tuned_minus_base": ("tuned", "base"),
                                     "tuned_minus_fewshot": ("tuned", "fewshot")}
KEYS = (*ARMS, *DIFFS)
MAJORITY = "majority"  # classification's baseline arm: the train split's most frequent label of the category
F1_ARMS = (*ARMS, MAJORITY)  # the arms of the macro-F1 summary (classification items)
F1_DIFFS: dict[str, tuple[str, str]] = {**DIFFS, "tuned_minus_majority": ("tuned", MAJORITY)}
ALPHA = 0.05
EMPTY = {"n": 0, "mean": None, "ci": None, "pass_rate": None, "pass_ci": None}


def group_seed(seed: int, *keys: str) -> list[int]:
    """The seed of one statistic's bootstrap: the run seed plus a CRC of each key (independent streams)."""
    return [int(seed)] + [zlib.crc32(k.encode("utf-8")) for k in keys]


def cluster_sums(values: np.ndarray, groups: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums of the rows of ``values`` and row counts, groups in sorted order of ``str(key)``."""
    keys = [str(g) for g in groups]
    if len(keys) != values.shape[0]:
        raise ValueError("values and groups differ in length")
    pos = {k: i for i, k in enumerate(sorted(set(keys)))}
    inv = np.array([pos[k] for k in keys], dtype=int)
    sums = np.zeros((len(pos),) + values.shape[1:], dtype=float)
    np.add.at(sums, inv, values)
    return sums, np.bincount(inv, minlength=len(pos)).astype(float)


def bootstrap_means(values: np.ndarray, n_boot: int, seed: int | Sequence[int],
                    groups: Sequence[Hashable] | None = None) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``values``, by row or by group.

    ``values`` is (n,) or (n, k); the result is (n_boot,) or (n_boot, k), every column resampled with
    the same draws. Without ``groups``: ``idx = default_rng(seed).integers(0, n, size=(n_boot, n))``
    over rows. With ``groups`` (one key per row): the same draw over the G groups (sorted by key), and
    each replicate is sum(rows of drawn groups) / count(rows of drawn groups).
    """
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    if groups is None:
        n = values.shape[0]
        return values[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    sums, counts = cluster_sums(values, groups)
    idx = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    total = counts[idx].sum(axis=1)
    return sums[idx].sum(axis=1) / (total if values.ndim == 1 else total[:, None])


def percentile_ci(boot: np.ndarray, alpha: float = ALPHA) -> list[float]:
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)
    return [float(lo), float(hi)]


def bootstrap_ci(values: Sequence[float], n_boot: int, seed: int | Sequence[int], alpha: float = ALPHA,
                 groups: Sequence[Hashable] | None = None) -> list[float] | None:
    """95% (by default) percentile bootstrap CI of the mean of ``values`` (clustered with ``groups``);
    None when empty."""
    if len(values) == 0:
        return None
    return percentile_ci(bootstrap_means(np.asarray(values, dtype=float), n_boot, seed, groups), alpha)


def _stats(matrix: np.ndarray, groups: list[str], n_boot: int, seed: list[int]
           ) -> tuple[dict[str, Any], np.ndarray | None]:
    """matrix: (n, 2) columns score, passed. Returns the summary and the bootstrap means (n_boot, 2)."""
    if matrix.shape[0] == 0:
        return dict(EMPTY), None
    boot = bootstrap_means(matrix, n_boot, seed, groups)
    return {"n": int(matrix.shape[0]),
            "mean": float(matrix[:, 0].mean()), "ci": percentile_ci(boot[:, 0]),
            "pass_rate": float(matrix[:, 1].mean()), "pass_ci": percentile_ci(boot[:, 1])}, boot


def _group(it: dict[str, Any]) -> str:
    return str(it.get("group_id") or it["id"])


def _values(it: dict[str, Any]) -> list[float]:
    return [float(it["score"]), float(bool(it["passed"]))]


def _arm(items: list[dict[str, Any]], arm: str) -> tuple[np.ndarray, list[str]]:
    rs = sorted((it for it in items if it["model"] == arm), key=lambda it: it["id"])
    return np.array([_values(it) for it in rs], dtype=float).reshape(-1, 2), [_group(it) for it in rs]


def _pairs(items: list[dict[str, Any]], a: str, b: str) -> tuple[np.ndarray, list[str]]:
    """(n_pairs, 2) differences ``a - b`` of score and passed, paired by item id, sorted by id."""
    by = {m: {it["id"]: it for it in items if it["model"] == m} for m in (a, b)}
    ids = sorted(set(by[a]) & set(by[b]))
    rows = [np.subtract(_values(by[a][i]), _values(by[b][i])) for i in ids]
    return np.array(rows, dtype=float).reshape(-1, 2), [_group(by[a][i]) for i in ids]


def _entry(items: list[dict[str, Any]], n_boot: int, seed: int, *keys: str
           ) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The summary of one set of items, and per arm / difference its (point, bootstrap replicates)."""
    out: dict[str, Any] = {"n": len({it["id"] for it in items}), "n_groups": len({_group(it) for it in items})}
    boots: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in KEYS:
        mat, groups = _arm(items, key) if key in ARMS else _pairs(items, *DIFFS[key])
        out[key], boot = _stats(mat, groups, n_boot, group_seed(seed, *keys, key))
        if boot is not None:
            boots[key] = (mat.mean(axis=0), boot)
    return out, boots


def _macro(per_cat: list[dict[str, tuple[np.ndarray, np.ndarray]]], n: dict[str, int]) -> dict[str, Any]:
    """Mean of category means; CI from the mean of the per-category replicates (stratified)."""
    out: dict[str, Any] = {"n_categories": len(per_cat)}
    for key in KEYS:
        got = [c[key] for c in per_cat if key in c]
        if not got:
            out[key] = dict(EMPTY)
            continue
        point = np.mean([p for p, _ in got], axis=0)
        macro = np.mean(np.stack([b for _, b in got]), axis=0)  # (n_boot, 2)
        out[key] = {"n": n[key], "mean": float(point[0]), "ci": percentile_ci(macro[:, 0]),
                    "pass_rate": float(point[1]), "pass_ci": percentile_ci(macro[:, 1])}
    return out


def summarize_split(items: list[dict[str, Any]], *, n_boot: int, seed: int, split: str = "test"
                    ) -> dict[str, Any]:
    """Per-category, overall (micro) and macro summaries of one split's graded items."""
    out: dict[str, Any] = {"categories": {}}
    per_cat = []
    for cat in sorted({it["category"] for it in items}):
        out["categories"][cat], boots = _entry([it for it in items if it["category"] == cat], n_boot, seed,
                                               split, cat)
        per_cat.append(boots)
    out["overall"], _ = _entry(items, n_boot, seed, split, "__micro__")
    out["macro"] = _macro(per_cat, {k: out["overall"][k]["n"] for k in KEYS})
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


# ----------------------------------------------------------------------------- macro-F1, clustered
NONE_LABEL = "<none>"  # an unrecognised prediction (as training.graders writes it): a miss, never a class


def _macro_f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """Macro-F1 from confusion counts ``(..., L, L + 1)`` (gold x pred, the last pred column ``<none>``),
    averaged over the classes present (in gold or predicted) in each replicate; 0 where none is."""
    n_lab = counts.shape[-2]
    tp = np.diagonal(counts[..., :n_lab], axis1=-2, axis2=-1)
    fn = counts.sum(axis=-1) - tp
    fp = counts[..., :n_lab].sum(axis=-2) - tp
    present = (tp + fn + fp) > 0
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp, dtype=float), where=denom > 0)
    k = present.sum(axis=-1)
    return np.divide((f1 * present).sum(axis=-1), k, out=np.zeros(k.shape, dtype=float), where=k > 0)


def macro_f1_cis(gold: Sequence[str], preds: dict[str, Sequence[str | None]], groups: Sequence[Hashable], *,
                 n_boot: int, seed: int | Sequence[int], diffs: dict[str, tuple[str, str]] | None = None,
                 alpha: float = ALPHA) -> dict[str, dict[str, Any]]:
    """Macro-F1 of each arm's predictions ``preds[arm]`` against ``gold`` with a clustered bootstrap CI,
    and the paired differences ``diffs`` (``{name: (a, b)}``: a - b) with theirs.

    Every arm and difference uses the same draws of groups (``groups``: one key per item), so a
    difference is paired: a replicate recomputes each arm's confusion counts over the rows of the drawn
    groups. Macro-F1 averages per-class F1 over the classes present in gold or predicted (as
    :func:`training.graders.classification_metrics`); ``<none>``/None is a miss, not a class.
    Two arms with the same predictions have the difference 0 in every replicate, CI ``[0, 0]``.
    """
    arms = list(preds)
    n = len(gold)
    if any(len(p) != n for p in preds.values()) or len(groups) != n:
        raise ValueError("gold, predictions and groups differ in length")
    if n == 0:
        return {k: {"mean": None, "ci": None} for k in [*arms, *(diffs or {})]}
    norm = {a: [NONE_LABEL if p is None else str(p) for p in preds[a]] for a in arms}
    labels = sorted((set(gold) | {p for a in arms for p in norm[a]}) - {NONE_LABEL})
    pos = {lab: i for i, lab in enumerate(labels)}
    n_lab = len(labels)
    width = n_lab * (n_lab + 1)
    onehot = np.zeros((n, len(arms) * width))
    for j, a in enumerate(arms):
        for i, (g, p) in enumerate(zip(gold, norm[a], strict=True)):
            onehot[i, j * width + pos[g] * (n_lab + 1) + pos.get(p, n_lab)] = 1.0
    point = _macro_f1_from_counts(onehot.sum(axis=0).reshape(len(arms), n_lab, n_lab + 1))
    sums, _ = cluster_sums(onehot, groups)
    idx = np.random.default_rng(seed).integers(0, sums.shape[0], size=(n_boot, sums.shape[0]))
    boot = _macro_f1_from_counts(sums[idx].sum(axis=1).reshape(n_boot, len(arms), n_lab, n_lab + 1))
    out: dict[str, dict[str, Any]] = {a: {"mean": float(point[j]), "ci": percentile_ci(boot[:, j], alpha)}
                                      for j, a in enumerate(arms)}
    for name, (a, b) in (diffs or {}).items():
        if a in arms and b in arms:
            ja, jb = arms.index(a), arms.index(b)
            out[name] = {"mean": float(point[ja] - point[jb]), "ci": percentile_ci(boot[:, ja] - boot[:, jb], alpha)}
        else:
            out[name] = {"mean": None, "ci": None}
    return out
