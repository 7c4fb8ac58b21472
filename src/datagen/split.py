"""Group-aware, cluster-stratified train / validation / test split with a leakage check.

- Unit of allocation: a **group** (a source item with its rephrasings), so no item and none of its
  rephrasings appear in two splits.
- Stratification: groups are assigned one at a time, cluster by cluster, each to the split with the
  largest deficit against ``split.ratios`` (deficit within its cluster plus deficit overall), so every
  cluster is spread over the splits in about the configured ratios (counted in groups).
- ``test_originals_only`` (default): rephrasings of test groups are dropped (reason
  ``test_rephrase``); groups without an original never go to test.
- ``balance_train``: each cluster's training rows are capped at the median cluster size (originals
  kept first; reason ``balance_train``).
- Leakage check: the largest cosine between rows of different splits, the number of cross-split
  pairs with cosine >= ``dedup.threshold``, and how many of those are duplicates by dedup's rule
  (figures shared too): 0 after dedup. Similar pairs with other figures (one question template over
  other data) are legitimate and reported, not removed.

Outputs in ``stage_dir("split")``: ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (each row
carries ``metadata["cluster"]``), ``clusters.json``, ``drops.jsonl``, ``manifest.json``.
"""

from __future__ import annotations

import logging
import random
import statistics
from collections import Counter
from typing import Any

import numpy as np

from datagen.cluster import assign_clusters
from datagen.config import Config
from datagen.dedup import number_overlap, numbers, similar_pairs
from datagen.embed import Embedder, embed_samples, load_embedder, sample_text
from datagen.io import manifest_hash, read_jsonl, require_stage, write_json, write_jsonl, write_manifest

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


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


def leakage_check(vecs: dict[str, np.ndarray], threshold: float, method: str = "auto",
                  partition_min_rows: int = 50_000, rows: dict[str, list[dict[str, Any]]] | None = None,
                  min_number_overlap: float = 0.0) -> dict[str, Any]:
    """Largest cross-split cosine (exact, faiss flat search), cross-split pairs with cosine >= threshold,
    and of those the duplicates by dedup's rule (figures overlap >= ``min_number_overlap``; needs ``rows``).
    After dedup the duplicates count is 0; similar pairs that differ in their figures may remain."""
    import faiss

    names = [s for s in SPLITS if len(vecs.get(s, ())) > 0]
    max_cos: dict[str, float] = {}
    for a in names:
        for b in names:
            if a >= b:
                continue
            index = faiss.IndexFlatIP(vecs[b].shape[1])
            index.add(np.ascontiguousarray(vecs[b], dtype=np.float32))
            d, _ = index.search(np.ascontiguousarray(vecs[a], dtype=np.float32), 1)
            max_cos[f"{a}|{b}"] = round(float(d.max()), 6)
    above = dups = 0
    if names:
        allv = np.concatenate([vecs[s] for s in names])
        label = np.concatenate([np.full(len(vecs[s]), i) for i, s in enumerate(names)])
        pairs, _ = similar_pairs(allv, threshold, method, partition_min_rows)
        if len(pairs):
            cross = np.flatnonzero(label[pairs.i] != label[pairs.j])
            above = len(cross)
            if rows is not None:
                flat = [r for s in names for r in rows[s]]
                dups = sum(number_overlap(numbers(flat[pairs.i[k]]), numbers(flat[pairs.j[k]]))
                           >= min_number_overlap for k in cross.tolist())
            else:
                dups = above
    return {"max_cross_split_cosine": max(max_cos.values(), default=None), "by_split_pair": max_cos,
            "threshold": threshold, "cross_split_pairs_above_threshold": above,
            "min_number_overlap": min_number_overlap, "cross_split_duplicates": dups}


def split_rows(rows: list[dict[str, Any]], vecs: np.ndarray, cfg: Config) -> dict[str, Any]:
    """The split in memory: ``{"splits": {name: rows}, "drops": [...], "clusters": {...}, ...}``."""
    sc = cfg.split
    texts = [sample_text(r, cfg.dedup.context_chars) for r in rows]
    clus = assign_clusters(rows, vecs, texts, sc.cluster_by, sc.k_range, sc.seed)
    rows = [{**r, "metadata": {**(r.get("metadata") or {}), "cluster": lab}} for r, lab in zip(rows, clus.labels)]
    group_cluster = {r["group_id"]: r["metadata"]["cluster"] for r in rows}
    eligible = {r["group_id"] for r in rows if not r.get("is_rephrase")} if sc.test_originals_only else None
    where = allocate_groups(group_cluster, sc.ratios, sc.seed, eligible)
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    index: dict[str, list[int]] = {s: [] for s in SPLITS}
    drops = []
    for i, r in enumerate(rows):
        s = where[r["group_id"]]
        if s == "test" and sc.test_originals_only and r.get("is_rephrase"):
            drops.append({"id": r["id"], "group_id": r["group_id"], "split": s, "reason": "test_rephrase"})
            continue
        splits[s].append(r)
        index[s].append(i)
    if sc.balance_train:
        kept, dropped = _balance(splits["train"], sc.seed)
        keep_ids = {r["id"] for r in kept}
        index["train"] = [i for i, r in zip(index["train"], splits["train"]) if r["id"] in keep_ids]
        splits["train"] = [r for r in splits["train"] if r["id"] in keep_ids]
        drops += [{"id": r["id"], "group_id": r["group_id"], "split": "train", "reason": "balance_train"}
                  for r in dropped]
    for s in SPLITS:
        order = sorted(range(len(splits[s])), key=lambda k: splits[s][k]["id"])
        splits[s] = [splits[s][k] for k in order]
        index[s] = [index[s][k] for k in order]
    leak = leakage_check({s: vecs[index[s]] for s in SPLITS}, cfg.dedup.threshold, cfg.dedup.method,
                         cfg.dedup.partition_min_rows, splits, cfg.dedup.min_number_overlap)
    groups_in = {s: {r["group_id"] for r in splits[s]} for s in SPLITS}
    leak["groups_in_two_splits"] = sum(len(groups_in[a] & groups_in[b]) for a in SPLITS for b in SPLITS if a < b)
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
    drops.sort(key=lambda d: d["id"])
    return {"splits": splits, "drops": drops, "clusters": clusters, "leakage": leak, "where": where}


def run_split(cfg: Config, embedder: Embedder | None = None) -> dict[str, Any]:
    src = cfg.paths.stage_dir("dedup")
    require_stage(src, "dedup")
    rows = sorted(read_jsonl(src / "samples.jsonl"), key=lambda r: r["id"])
    embedder = embedder or load_embedder(cfg.dedup.embedder, cfg.paths.cache_dir / "embeddings")
    vecs = embed_samples(cfg, rows, embedder)
    res = split_rows(rows, vecs, cfg)
    out = cfg.paths.stage_dir("split")
    for s in SPLITS:
        write_jsonl(out / f"{s}.jsonl", res["splits"][s])
    write_jsonl(out / "drops.jsonl", res["drops"])
    write_json(out / "clusters.json", res["clusters"])
    counts = {s: len(res["splits"][s]) for s in SPLITS}
    reasons = Counter(d["reason"] for d in res["drops"])
    log.info("split: %s; dropped %s; leakage %s", counts, dict(reasons), res["leakage"])
    return write_manifest(out, {
        "stage": "split",
        "config_hash": cfg.section_hash("split", "dedup"),
        "upstream": {"dedup": manifest_hash(src)},
        "embedder": embedder.name,
        "counts": {"in": len(rows), **counts,
                   "groups": {s: len({r["group_id"] for r in res["splits"][s]}) for s in SPLITS},
                   "dropped_by_reason": {"test_rephrase": reasons.get("test_rephrase", 0),
                                         "balance_train": reasons.get("balance_train", 0)},
                   "by_category": {s: dict(sorted(Counter(r["category"] for r in res["splits"][s]).items()))
                                   for s in SPLITS}},
        "clusters": {c["name"]: c["rows"] for c in res["clusters"]["clusters"]},
        "kmeans": res["clusters"]["kmeans"],
        "leakage": res["leakage"],
        "test_originals_only": cfg.split.test_originals_only,
        "balance_train": cfg.split.balance_train,
    })
