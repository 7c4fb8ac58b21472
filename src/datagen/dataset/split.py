"""Group-aware, cluster-stratified train / validation / test split with a leakage check.

- Unit of allocation: a **unit**, the union (union-find) of rows that share a ``group_id`` (a source
  item with its rephrasings, or a source's own group column) or a context (the same table and
  paragraphs, by :func:`datagen.dataset.dedup.context_key`). So no item, none of its rephrasings and no
  other question over the same document appear in two splits, whether or not the source has a
  group column.
- Stratification (rows other than market rows): units are assigned one at a time, cluster by
  cluster, each to the split with the largest deficit against ``split.ratios`` (deficit within its
  cluster plus deficit overall), so every cluster is spread over the splits in about the configured
  ratios (counted in units). A unit's cluster is its rows' most common cluster.
- Market rows (source ``market:*``, ``split.walk_forward``, default): by time, not by cluster
  (:func:`walk_forward`). Train, validation and test units come from ordered date ranges on one
  trading calendar shared by all tickers, with a gap of at least one window (the longest window's
  trading days) between consecutive ranges; a window that reaches into a gap is dropped
  (``walk_forward_gap``). So no test price row was seen in training, nor any day within a window of it.
- ``test_originals_only`` (default): rephrasings of test units are dropped (reason
  ``test_rephrase``); units without an original never go to test.
- ``balance_train``: each cluster's training rows are capped at the median cluster size (originals
  kept first; reason ``balance_train``).
- Leakage check (:func:`overlap_report`): groups, context hashes and price rows (ticker, date) found
  in two splits; :func:`run_split` fails with the counts when any is non-zero, unless
  ``split.allow_leakage``. Also reported: the largest cosine between rows of different splits, the
  number of cross-split pairs with cosine >= ``dedup.threshold``, and how many of those share their
  figures (one question template over other data is legitimate and reported, not removed).

Every drop is one :func:`datagen.io.drop_record` in ``drops.jsonl``, counted by
:func:`datagen.io.drop_counts` in the manifest. Outputs in its folder: ``train.jsonl``,
``validation.jsonl``, ``test.jsonl`` (each row carries ``metadata["cluster"]``), ``clusters.json``,
``drops.jsonl``, ``manifest.json``.
"""

from __future__ import annotations

import logging
import random
import statistics
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from datagen.config import Config
from datagen.dataset.cluster import assign_clusters
from datagen.dataset.knowledge import knowledge_leakage, knowledge_leakage_failure, knowledge_split
from datagen.dataset.dedup import UnionFind, context_key, number_overlap, numbers, similar_pairs
from datagen.embed import Embedder, embed_samples, load_embedder, sample_text
from datagen.io import (
    drop_counts,
    drop_record,
    manifest_hash,
    read_jsonl,
    write_json,
    write_jsonl,
    write_manifest,
)
from datagen.manifest import SplitManifest
from datagen.schema import SPLITS
from datagen.stage import Inputs, StageSpec

log = logging.getLogger(__name__)



def allocate_groups(group_cluster: dict[str, str], ratios: tuple[float, float, float], seed: int,
                    test_eligible: set[str] | None = None) -> dict[str, str]:
    """Assign each group to a split (see module doc). Deterministic for a given seed."""
    by_cluster: dict[str, list[str]] = {}
    for g, c in group_cluster.items():
        by_cluster.setdefault(c, []).append(g)
    total = Counter()
    n_total = 0
    out: dict[str, str] = {}
    for c in sorted(by_cluster):
        groups = sorted(by_cluster[c])
        random.Random(f"{seed}:{c}").shuffle(groups)
        local = Counter()
        for k, g in enumerate(groups):
            best, best_score = None, -float("inf")
            for s, r in zip(SPLITS, ratios):
                if r <= 0 or (s == "test" and test_eligible is not None and g not in test_eligible):
                    continue
                score = (r * (k + 1) - local[s]) + (r * (n_total + 1) - total[s])
                if score > best_score + 1e-12:
                    best, best_score = s, score
            best = best or "train"
            out[g] = best
            local[best] += 1
            total[best] += 1
            n_total += 1
    return out


def _balance(rows: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Cap each cluster at the median cluster size; keep originals first, then a seeded sample."""
    by_c: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_c.setdefault(r["metadata"]["cluster"], []).append(r)
    cap = int(np.ceil(statistics.median(len(v) for v in by_c.values()))) if by_c else 0
    kept, dropped = [], []
    for c in sorted(by_c):
        rs = sorted(by_c[c], key=lambda r: r["id"])
        rng = random.Random(f"{seed}:balance:{c}")
        order = sorted(rs, key=lambda r: (bool(r.get("is_rephrase")), rng.random()))
        kept += order[:cap]
        dropped += order[cap:]
    return kept, dropped


def _max_cross_cosine(va: np.ndarray, vb: np.ndarray, exact_max: int, nprobe: int) -> tuple[float, str]:
    """Largest cosine of a row of ``va`` to a row of ``vb``: exact (faiss flat) while ``len(va) * len(vb)``
    is at most ``exact_max``, else a faiss IVF search of ``nprobe`` cells (approximate: a lower bound)."""
    import faiss

    from datagen.dataset.dedup import default_nlist

    va = np.ascontiguousarray(va, dtype=np.float32)
    vb = np.ascontiguousarray(vb, dtype=np.float32)
    d = vb.shape[1]
    if len(va) * len(vb) <= exact_max or len(vb) < 2 * 39:  # faiss wants >= 39 training points a cell
        index = faiss.IndexFlatIP(d)
        index.add(vb)
        found, _ = index.search(va, 1)
        return float(found.max()), "exact"
    nlist = default_nlist(len(vb))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 0
    index.train(vb[:: max(1, len(vb) // (nlist * 64))])
    index.add(vb)
    index.nprobe = min(nprobe, nlist)
    found, _ = index.search(va, 1)
    return float(found.max()), "partitioned"


def figure_duplicates(sets: list[frozenset[str]], label: np.ndarray, vecs: np.ndarray, threshold: float,
                      min_overlap: float) -> int:
    """Pairs of rows with other ``label`` (split), figure-set Jaccard >= ``min_overlap`` (> 0) and cosine >=
    ``threshold``; rows with no figures are not counted. Exact, by a prefix filter over pairs of figures:
    two sets with Jaccard >= t share at least ``a = ceil(t * max(|x|, |y|))`` figures, and then the first
    two of those (in a global order, rarest first) lie in the first ``|x| - ceil(t |x|) + 2`` figures of
    each. So each row is posted under every pair from that prefix, and rows sharing a posting are the
    candidates: selective even when one question template shares most figures across all rows. Pairs
    with ``a < 2`` (both sets of at most ``1 / t`` figures) come from single-figure prefixes instead.
    Candidates are checked in vectorised batches (a sparse row-by-figure matrix)."""
    from scipy import sparse

    vocab: dict[str, int] = {}
    cols = [np.fromiter((vocab.setdefault(f, len(vocab)) for f in x), np.int64, len(x)) for x in sets]
    n = len(sets)
    size = np.array([len(c) for c in cols], np.int64)
    m = sparse.csr_matrix((np.ones(int(size.sum()), np.float32), np.concatenate(cols) if n else np.zeros(0, np.int64),
                           np.concatenate([[0], np.cumsum(size)])), shape=(n, len(vocab)))
    df = np.asarray((m > 0).sum(0)).ravel()
    v = max(1, len(vocab))
    keys, owners = [], []
    for k, c in enumerate(cols):
        if not len(c):
            continue
        order = c[np.lexsort((c, df[c]))]  # rarest first, ties by id
        need = int(np.ceil(min_overlap * len(order) - 1e-9))
        if len(order) >= 2:
            pre = order[:len(order) - need + 2]
            a, b = np.triu_indices(len(pre), 1)
            keys.append(pre[a] * v + pre[b])  # the pair (pre[a], pre[b]) as one int; pre is in global order
            owners.append(np.full(len(a), k, np.int64))
        if len(order) * min_overlap <= 1 + 1e-9:  # may match a set that shares a single figure
            pre = order[:len(order) - need + 1]
            keys.append(-1 - pre)  # single figures, apart from the pair keys
            owners.append(np.full(len(pre), k, np.int64))
    if not keys:
        return 0
    found = []
    for i, j in _pairs_sharing_a_key(np.concatenate(keys), np.concatenate(owners)):
        keep = label[i] != label[j]
        i, j = i[keep], j[keep]
        inter = np.asarray(m[i].multiply(m[j]).sum(1)).ravel()
        ok = inter / (size[i] + size[j] - inter) >= min_overlap - 1e-12
        i, j = i[ok], j[ok]
        ok = np.einsum("ij,ij->i", vecs[i], vecs[j]) >= threshold
        found.append(np.minimum(i[ok], j[ok]) * n + np.maximum(i[ok], j[ok]))
    return len(np.unique(np.concatenate(found))) if found else 0


def _pairs_sharing_a_key(keys: np.ndarray, owners: np.ndarray,
                         batch: int = 2_000_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair of owners posted under one key, as ``(i, j)`` batches of about ``batch`` pairs (a pair
    sharing several keys comes once per key)."""
    order = np.lexsort((owners, keys))
    keys, owners = keys[order], owners[order]
    start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    count = np.diff(np.r_[start, len(keys)])
    start, count = start[count > 1], count[count > 1]
    cum = np.cumsum(count * (count - 1) // 2)
    lo = 0
    while lo < len(start):
        hi = max(lo + 1, int(np.searchsorted(cum, (cum[lo - 1] if lo else 0) + batch, side="right")))
        st, ct = start[lo:hi], count[lo:hi]
        idx = np.repeat(st, ct) + np.arange(int(ct.sum())) - np.repeat(np.cumsum(ct) - ct, ct)  # members
        pos = idx - np.repeat(st, ct)  # position inside its key's run
        later = np.repeat(ct, ct) - pos - 1  # members after this one under the same key
        left = np.repeat(idx, later)
        step = np.arange(len(left)) - np.repeat(np.cumsum(later) - later, later) + 1
        yield owners[left], owners[left + step]
        lo = hi


def leakage_check(vecs: dict[str, np.ndarray], threshold: float, method: str = "auto",
                  partition_min_rows: int = 50_000, rows: dict[str, list[dict[str, Any]]] | None = None,
                  min_number_overlap: float = 0.0, max_pairs: int = 2_000_000, sample: int = 200_000,
                  exact_max: int = 200_000_000, nprobe: int = 16, seed: int = 0) -> dict[str, Any]:
    """Largest cross-split cosine, cross-split pairs with cosine >= threshold, and of those the duplicates
    by figures (Jaccard of :func:`datagen.dataset.dedup.numbers` >= ``min_number_overlap``; needs ``rows``).
    After dedup the duplicates count is 0; similar pairs that differ in their figures may remain.

    Near-linear when one question template covers many rows (their embeddings are all alike, so nearly
    every pair is above the threshold): a probe of 20,000 random pairs estimates how many pairs are above
    it. Up to ``max_pairs`` they are all found (``similar_pairs``) and counted exactly, as before. Beyond,
    the count above the threshold is estimated from ``sample`` random cross-split pairs (``pair_counts``
    says which), while the duplicates are still counted exactly: candidate pairs come from the figures
    (:func:`figure_duplicates`), then their cosine and splits are checked; only rows without figures (which
    all share the empty figure set) fall back to the sampled estimate. The largest cosine is exact (faiss
    flat) while the split pair's product of sizes is at most ``exact_max``, else from an IVF search."""
    names = [s for s in SPLITS if len(vecs.get(s, ())) > 0]
    max_cos: dict[str, float] = {}
    searches = set()
    for a in names:
        for b in names:
            if a >= b:
                continue
            m, how = _max_cross_cosine(vecs[a], vecs[b], exact_max, nprobe)
            max_cos[f"{a}|{b}"] = round(m, 6)
            searches.add(how)
    above = dups = 0
    how_counted = "exact"
    if names:
        allv = np.ascontiguousarray(np.concatenate([vecs[s] for s in names]), dtype=np.float32)
        label = np.concatenate([np.full(len(vecs[s]), i) for i, s in enumerate(names)])
        flat = [r for s in names for r in rows[s]] if rows is not None else None
        n = len(allv)
        rng = np.random.default_rng(seed)
        probe_i, probe_j = rng.integers(0, n, 20_000), rng.integers(0, n, 20_000)
        ok = probe_i != probe_j
        share = float(((allv[probe_i[ok]] * allv[probe_j[ok]]).sum(1) >= threshold).mean()) if ok.any() else 0.0
        if share * n * (n - 1) / 2 <= max_pairs:
            pairs, _ = similar_pairs(allv, threshold, method, partition_min_rows)
            if len(pairs):
                cross = np.flatnonzero(label[pairs.i] != label[pairs.j])
                above = len(cross)
                if flat is not None:
                    nums: dict[int, frozenset[str]] = {}

                    def num(k: int) -> frozenset[str]:
                        if k not in nums:
                            nums[k] = numbers(flat[k])
                        return nums[k]
                    dups = sum(number_overlap(num(int(pairs.i[k])), num(int(pairs.j[k]))) >= min_number_overlap
                               for k in cross.tolist())
                else:
                    dups = above
        else:
            def estimate(idx: np.ndarray) -> int:
                """Cross-split pairs among ``idx`` with cosine >= threshold, from ``sample`` random pairs."""
                lab = label[idx]
                m = len(idx)
                total = (m * m - int((np.bincount(lab, minlength=len(names)) ** 2).sum())) // 2
                if total == 0:
                    return 0
                i, j = idx[rng.integers(0, m, 4 * sample)], idx[rng.integers(0, m, 4 * sample)]
                keep = np.flatnonzero(label[i] != label[j])[:sample]
                i, j = i[keep], j[keep]
                hit = (np.einsum("ij,ij->i", allv[i], allv[j]) >= threshold).mean() if len(i) else 0.0
                return int(round(float(hit) * total))

            above = estimate(np.arange(n))
            how_counted = f"above-threshold count estimated from {sample} random cross-split pairs"
            if flat is None or min_number_overlap <= 0:
                dups = above
                how_counted += "; duplicates = that estimate"
            else:
                sets = [numbers(r) for r in flat]
                empty = np.array([k for k, s in enumerate(sets) if not s], dtype=np.int64)
                dups = figure_duplicates(sets, label, allv, threshold, min_number_overlap)
                if len(empty) > 1:
                    dups += estimate(empty)
                    how_counted += "; duplicates among rows without figures estimated the same way"
    return {"max_cross_split_cosine": max(max_cos.values(), default=None), "by_split_pair": max_cos,
            "max_cosine_search": "partitioned" if "partitioned" in searches else "exact",
            "threshold": threshold, "cross_split_pairs_above_threshold": above,
            "min_number_overlap": min_number_overlap, "cross_split_duplicates": dups, "pair_counts": how_counted}


def split_units(rows: list[dict[str, Any]]) -> list[str]:
    """One unit id per row: rows sharing a ``group_id`` or a non-empty context (content hash) share a
    unit (union-find); the id is the smallest ``group_id`` in it."""
    uf = UnionFind(len(rows))
    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        for key in ("g:" + str(r["group_id"]), "c:" + context_key(r)):
            if key == "c:":
                continue
            if key in first:
                uf.union(first[key], i)
            else:
                first[key] = i
    name: dict[int, str] = {}
    for i, r in enumerate(rows):
        root = uf.find(i)
        name[root] = min(name.get(root, r["group_id"]), r["group_id"])
    return [name[uf.find(i)] for i in range(len(rows))]


def is_market(row: dict[str, Any]) -> bool:
    return str(row.get("source", "")).startswith("market:") and bool((row.get("metadata") or {}).get("window"))


def price_rows(row: dict[str, Any]) -> set[tuple[str, str]]:
    """The (ticker, date) price rows a market row shows: its table's Date column, with the Ticker column
    where there is one (comparisons), else the window's ticker. Empty for other rows."""
    window = (row.get("metadata") or {}).get("window")
    table = (row.get("context") or {}).get("table") or {}
    cols = table.get("columns") or []
    if not window or "Date" not in cols:
        return set()
    d = cols.index("Date")
    t = cols.index("Ticker") if "Ticker" in cols else None
    ticker = (window.get("tickers") or [""])[0]
    return {(r[t] if t is not None else ticker, r[d]) for r in table.get("rows") or []}


def _targets(n: int, ratios: tuple[float, float, float]) -> tuple[int, int]:
    """(validation, test) unit counts: ratio x n, at least one where the ratio is positive and n >= 3."""
    out = []
    for r in ratios[1:]:
        k = int(round(r * n))
        out.append(max(k, 1) if r > 0 and n >= 3 else k)
    return out[0], out[1]


def _cut(starts: np.ndarray, ends: np.ndarray, target: int, days: int) -> int:
    """The cut (a calendar position) that leaves about ``target`` units starting at or after it (within
    a quarter of ``target``, at least one) and some units before the gap where possible, and loses the
    fewest units to the gap before it (those that start before the cut and end less than ``days``
    trading days before it); ties: nearest to ``target``, then the latest cut."""
    tol = max(1, int(round(0.25 * target)))
    best: tuple[bool, int, int, int] | None = None
    for c in np.unique(starts).tolist():
        n_after = int((starts >= c).sum())
        if abs(n_after - target) > tol:
            continue
        lost = int(((starts < c) & (ends > c - days - 1)).sum())
        before = int((ends <= c - days - 1).sum())
        key = (before == 0, lost, abs(n_after - target), -c)
        if best is None or key < best:
            best = key
    if best is None:  # no cut within the tolerance: the start of the target-th latest unit
        return int(np.sort(starts)[-min(target, len(starts))])
    return -best[3]


def walk_forward(units: dict[str, set[tuple[str, str]]], days: int, ratios: tuple[float, float, float],
                 ) -> tuple[dict[str, str | None], dict[str, Any]]:
    """Assign market units (unit -> its price rows) to splits by time.

    The calendar is the sorted union of the units' dates (all tickers; trading days no window shows
    only make true gaps longer). A unit spans its first to last date. Test takes the units that start
    at or after the test cut (about the latest-starting ``ratios[2]`` share, :func:`_cut` picks the
    cut that loses the fewest windows); validation those of the units ending at least ``days``
    trading days before the test cut that start at or after the validation cut (chosen the same
    way); train those that end at least ``days`` trading days before the validation cut. Others reach
    into a gap: ``None``. A history too short for three ranges and two gaps gets no validation range
    (train and test first).
    Returns (unit -> split or None, a report: cut dates, date range per split, gap, unit counts)."""
    cal = sorted({d for rows in units.values() for _, d in rows})
    pos = {d: k for k, d in enumerate(cal)}
    span = {u: (min(pos[d] for _, d in rows), max(pos[d] for _, d in rows)) for u, rows in units.items() if rows}
    order = sorted(span, key=lambda u: (span[u][0], span[u][1], u))
    n_val, n_test = _targets(len(order), ratios)
    end_cal = len(cal)
    starts = np.array([span[u][0] for u in order], dtype=np.int64)
    ends = np.array([span[u][1] for u in order], dtype=np.int64)
    test_cut = _cut(starts, ends, n_test, days) if n_test else end_cal + days + 1
    pool = ends <= test_cut - days - 1
    val_cut = _cut(starts[pool], ends[pool], n_val, days) if n_val and pool.any() else test_cut
    if not (ends[pool] <= val_cut - days - 1).any():  # too short a history for three ranges: train first
        val_cut = test_cut
    out: dict[str, str | None] = {}
    for u in order:
        s, e = span[u]
        if s >= test_cut:
            out[u] = "test"
        elif n_val and s >= val_cut and e <= test_cut - days - 1:
            out[u] = "validation"
        elif e <= min(val_cut, test_cut) - days - 1:
            out[u] = "train"
        else:
            out[u] = None
    ranges = {}
    for split in SPLITS:
        members = [u for u in order if out[u] == split]
        if members:
            ranges[split] = [cal[min(span[u][0] for u in members)], cal[max(span[u][1] for u in members)]]
    report = {"gap_days": days, "calendar": [cal[0], cal[-1]] if cal else None,
              "cuts": {"validation": cal[val_cut] if val_cut < end_cal else None,
                       "test": cal[test_cut] if test_cut < end_cal else None},
              "ranges": ranges, "units": {s: sum(v == s for v in out.values()) for s in SPLITS},
              "units_in_gaps": sum(v is None for v in out.values())}
    return out, report


def overlap_report(splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Groups, context hashes and price rows (ticker, date) found in more than one split, with the
    price rows per split pair. All three are 0 for a split that cannot leak documents or time."""
    def count(key) -> tuple[int, dict[str, int]]:
        seen = {s: set().union(*(key(r) for r in splits.get(s, []))) for s in SPLITS}
        pairs = {f"{a}|{b}" if a < b else f"{b}|{a}": len(seen[a] & seen[b])
                 for a, b in (("train", "validation"), ("train", "test"), ("validation", "test"))}
        multi = Counter(x for s in SPLITS for x in seen[s])
        return sum(v > 1 for v in multi.values()), pairs
    groups, _ = count(lambda r: {r["group_id"]})
    contexts, _ = count(lambda r: {context_key(r)} - {""})
    prices, by_pair = count(price_rows)
    return {"groups_in_two_splits": groups, "context_hashes_in_two_splits": contexts,
            "price_rows_in_two_splits": prices, "price_rows_by_split_pair": by_pair}


def leakage_failure(leak: dict[str, Any]) -> str | None:
    """The one-line reason the split stage fails on ``leak`` (see :func:`overlap_report`), or None."""
    g, c, p = (leak.get(k, 0) for k in ("groups_in_two_splits", "context_hashes_in_two_splits",
                                        "price_rows_in_two_splits"))
    if not (g or c or p):
        return None
    return (f"leakage across splits: {g} groups, {c} context hashes, {p} price rows (ticker, date) in more than "
            f"one split; set split.allow_leakage: true to accept it")


def split_rows(rows: list[dict[str, Any]], vecs: np.ndarray, cfg: Config) -> dict[str, Any]:
    """The split in memory: ``{"splits": {name: rows}, "drops": [...], "clusters": {...}, "leakage": {...},
    "where": {unit: split}, "walk_forward": {...} | None}``."""
    sc = cfg.split
    texts = [sample_text(r, cfg.dedup.context_chars) for r in rows]
    clus = assign_clusters(rows, vecs, texts, sc.cluster_by, sc.k_range, sc.seed)
    rows = [{**r, "metadata": {**(r.get("metadata") or {}), "cluster": lab}} for r, lab in zip(rows, clus.labels)]
    if sc.strategy == "knowledge":
        return _knowledge(rows, vecs, cfg, clus)
    unit = split_units(rows)
    market = {u for u, r in zip(unit, rows) if sc.walk_forward and is_market(r)}
    by_unit: dict[str, list[int]] = {}
    for i, u in enumerate(unit):
        by_unit.setdefault(u, []).append(i)
    unit_cluster = {u: sorted(Counter(rows[i]["metadata"]["cluster"] for i in m).items(),
                              key=lambda kv: (-kv[1], kv[0]))[0][0]
                    for u, m in by_unit.items() if u not in market}
    eligible = ({u for u, m in by_unit.items() if any(not rows[i].get("is_rephrase") for i in m)}
                if sc.test_originals_only else None)
    where: dict[str, str | None] = dict(allocate_groups(unit_cluster, sc.ratios, sc.seed, eligible))
    wf = None
    if market:
        prices = {u: set().union(*(price_rows(rows[i]) for i in by_unit[u])) for u in market}
        days = max(int(rows[i]["metadata"]["window"].get("days") or 0) for u in market for i in by_unit[u])
        wf_where, wf = walk_forward(prices, days, sc.ratios)
        where.update(wf_where)
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    index: dict[str, list[int]] = {s: [] for s in SPLITS}
    drops = []
    for i, r in enumerate(rows):
        s = where.get(unit[i])
        if s is None:
            drops.append(drop_record("split", r["id"], "walk_forward_gap",
                                     "its price window reaches into the gap between two walk-forward date ranges",
                                     group_id=r["group_id"], unit=unit[i]))
            continue
        if s == "test" and sc.test_originals_only and r.get("is_rephrase"):
            drops.append(drop_record("split", r["id"], "test_rephrase", "a rephrasing of a test item",
                                     group_id=r["group_id"], split=s))
            continue
        splits[s].append(r)
        index[s].append(i)
    if sc.balance_train:
        kept, dropped = _balance(splits["train"], sc.seed)
        keep_ids = {r["id"] for r in kept}
        index["train"] = [i for i, r in zip(index["train"], splits["train"]) if r["id"] in keep_ids]
        splits["train"] = [r for r in splits["train"] if r["id"] in keep_ids]
        drops += [drop_record("split", r["id"], "balance_train", "its cluster is over the median size in train",
                              group_id=r["group_id"], split="train") for r in dropped]
    for s in SPLITS:
        order = sorted(range(len(splits[s])), key=lambda k: splits[s][k]["id"])
        splits[s] = [splits[s][k] for k in order]
        index[s] = [index[s][k] for k in order]
    leak = leakage_check({s: vecs[index[s]] for s in SPLITS}, cfg.dedup.threshold, cfg.dedup.method,
                         cfg.dedup.partition_min_rows, splits, cfg.dedup.min_number_overlap)
    leak.update(overlap_report(splits))
    drops.sort(key=lambda d: d["row_id"])
    return {"splits": splits, "drops": drops, "clusters": cluster_table(rows, splits, cfg, clus), "leakage": leak,
            "where": where, "walk_forward": wf, "units": len(by_unit)}


def _knowledge(rows: list[dict[str, Any]], vecs: np.ndarray, cfg: Config, clus: Any) -> dict[str, Any]:
    """``split.strategy: knowledge`` (:func:`datagen.dataset.knowledge.knowledge_split`): a held-out
    phrasing shares its fact's group with train by design, so the leak check is the knowledge one."""
    sc = cfg.split
    ks = knowledge_split(rows, controls=sc.knowledge_controls, validation=sc.knowledge_validation, seed=sc.seed)
    splits = {s: sorted(ks[s], key=lambda r: r["id"]) for s in SPLITS}
    leak = knowledge_leakage(splits)
    return {"splits": splits, "drops": [], "clusters": cluster_table(rows, splits, cfg, clus), "leakage": leak,
            "where": {}, "walk_forward": None, "units": len({r["group_id"] for r in rows})}


def cluster_table(rows: list[dict[str, Any]], splits: dict[str, list[dict[str, Any]]], cfg: Config,
                  clus: Any) -> dict[str, Any]:
    """Rows, groups and proportion of each scenario cluster in each split."""
    sc = cfg.split
    names = sorted({r["metadata"]["cluster"] for r in rows})
    clusters = {"cluster_by": sc.cluster_by, "kmeans": clus.kmeans, "clusters": []}
    for c in names:
        entry: dict[str, Any] = {"name": c, "source": clus.source.get(c, "kmeans"), "rows": {}, "groups": {},
                                 "proportion": {}}
        for s in SPLITS:
            n = sum(r["metadata"]["cluster"] == c for r in splits[s])
            entry["rows"][s] = n
            entry["groups"][s] = len({r["group_id"] for r in splits[s] if r["metadata"]["cluster"] == c})
            entry["proportion"][s] = round(n / len(splits[s]), 4) if splits[s] else 0.0
        clusters["clusters"].append(entry)
    return clusters


def run_split(cfg: Config, inputs: Inputs, out: Path, embedder: Embedder | None = None) -> SplitManifest:
    src = inputs["dedup"]
    rows = sorted(read_jsonl(src / "samples.jsonl"), key=lambda r: r["id"])
    embedder = embedder or load_embedder(cfg.dedup.embedder, cfg.paths.cache_dir / "embeddings")
    vecs = embed_samples(cfg, rows, embedder)
    res = split_rows(rows, vecs, cfg)
    failure = (knowledge_leakage_failure if cfg.split.strategy == "knowledge" else leakage_failure)(res["leakage"])
    if failure and not cfg.split.allow_leakage:
        raise ValueError(f"split: {failure}")
    for s in SPLITS:
        write_jsonl(out / f"{s}.jsonl", res["splits"][s])
    write_jsonl(out / "drops.jsonl", res["drops"])
    write_json(out / "clusters.json", res["clusters"])
    counts = {s: len(res["splits"][s]) for s in SPLITS}
    dropped = drop_counts(res["drops"])
    log.info("split: %s; %s; leakage %s", counts, dropped, res["leakage"])
    if failure:
        log.warning("split: %s (allowed by split.allow_leakage)", failure)
    return write_manifest(out, SplitManifest(
        config_hash=STAGE.config_hash(cfg),
        upstream={"dedup": manifest_hash(src)},
        embedder=embedder.name,
        counts={"in": len(rows), **counts, **dropped, "units": res["units"],
                "groups": {s: len({r["group_id"] for r in res["splits"][s]}) for s in SPLITS},
                "dropped_by_reason": {r: dropped.get(f"dropped_{r}", 0)
                                      for r in ("test_rephrase", "balance_train", "walk_forward_gap")},
                "by_category": {s: dict(sorted(Counter(r["category"] for r in res["splits"][s]).items()))
                                for s in SPLITS}},
        clusters={c["name"]: c["rows"] for c in res["clusters"]["clusters"]},
        kmeans=res["clusters"]["kmeans"],
        leakage=res["leakage"],
        walk_forward=res["walk_forward"],
        allow_leakage=cfg.split.allow_leakage,
        test_originals_only=cfg.split.test_originals_only,
        balance_train=cfg.split.balance_train,
    ))


STAGE = StageSpec("split", run_split, __name__, ("split", "dedup"),
                  upstream=("dedup",),
                  manifest=SplitManifest)
