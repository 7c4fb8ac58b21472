"""Dedup: exact and near-duplicate removal by embedding similarity.

Rules (``cfg.dedup``):

- **exact duplicates**: rows whose normalised question + context are identical (any groups);
- **near duplicates across groups**: cosine >= ``threshold`` between rows of *different* groups that
  also share their figures (Jaccard of the numbers >= ``min_number_overlap``);
- **near-copies within a group**: cosine >= ``within_group_threshold`` between rows of one group
  (distinct rephrasings of one item are meant to be similar and are kept below that).

Pairs are merged with union-find (see :func:`dedup_rows`); each cluster keeps one row by the keeper
policy (originals over rephrasings, then richer context, then lowest id). Every drop is
written to ``drops.jsonl`` with the kept id, the dropped row's cosine to the keeper and the reason
(``exact_duplicate`` | ``near_duplicate`` | ``within_group_near_copy``), and counted in the manifest.
After dedup no two rows of different groups are near duplicates.

Pair search: an exact blocked matrix product (torch) up to ``partition_min_rows`` rows; above it a
partitioned search (faiss IVF: k-means cells, then pairs within the ``nprobe`` nearest cells of each
query, as SemDeDup does). ``benchmarks/bench_dedup.py`` measures time and pair recall of both.
"""

from __future__ import annotations

import logging
import math
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from datagen.config import Config
from datagen.embed import Embedder, embed_samples, load_embedder
from datagen.io import manifest_hash, read_jsonl, require_stage, write_jsonl, write_manifest
from datagen.schema import render_context

log = logging.getLogger(__name__)

REASONS = ("exact_duplicate", "near_duplicate", "within_group_near_copy")


# ----------------------------------------------------------------------------- text keys
_PUNCT = re.compile(r"(?<!\d)[^\w\s%$]|[^\w\s%$](?!\d)")


def normalise_text(text: str) -> str:
    """Case-folded, NFKC, punctuation dropped (except inside numbers: ``1.5`` stays), spaces collapsed."""
    t = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCT.sub(" ", t).split())


def exact_key(row: dict[str, Any]) -> str:
    return normalise_text(row["question"]) + "\n" + normalise_text(render_context(row.get("context")))


_NUM = re.compile(r"\d+(?:[.,]\d+)*")


def numbers(row: dict[str, Any]) -> frozenset[str]:
    """The figures in a row's question and context (``3,559,000`` -> ``3559000``; ``1.50`` -> ``1.5``)."""
    out = set()
    for m in _NUM.findall(row["question"] + "\n" + render_context(row.get("context"))):
        t = m.replace(",", "")
        if "." in t:
            t = t.rstrip("0").rstrip(".")
        out.add(t.lstrip("0") or "0")
    return frozenset(out)


def number_overlap(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard of two figure sets (1.0 when neither has any)."""
    return len(a & b) / len(a | b) if a or b else 1.0


# ----------------------------------------------------------------------------- pair search
@dataclass(frozen=True)
class Pairs:
    """Unique pairs ``i < j`` with their cosine, sorted by (i, j)."""

    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray

    def __len__(self) -> int:
        return len(self.i)

    @staticmethod
    def build(i: np.ndarray, j: np.ndarray, sim: np.ndarray) -> Pairs:
        i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
        sim = np.asarray(sim, np.float32)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        keep = lo != hi
        lo, hi, sim = lo[keep], hi[keep], sim[keep]
        if len(lo) == 0:
            return Pairs(lo, hi, sim)
        code = lo * (int(hi.max()) + 1) + hi
        _, first = np.unique(code, return_index=True)  # sorted by (lo, hi), duplicates removed
        return Pairs(lo[first], hi[first], sim[first])


def pairs_exact(x: np.ndarray, threshold: float, block: int = 2048, col_block: int = 16384) -> Pairs:
    """All pairs with cosine >= threshold by a blocked matrix product (upper triangle only)."""
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    n = len(xt)
    out_i, out_j, out_s = [], [], []
    with torch.inference_mode():
        for a in range(0, n, block):
            b = min(a + block, n)
            for c in range(a, n, col_block):
                d = min(c + col_block, n)
                s = xt[a:b] @ xt[c:d].T
                if c == a:  # the diagonal block: keep j > i only
                    s = s.masked_fill(torch.arange(c, d)[None, :] <= torch.arange(a, b)[:, None], -2.0)
                ii, jj = torch.nonzero(s >= threshold, as_tuple=True)
                if len(ii):
                    out_i.append((ii + a).numpy())
                    out_j.append((jj + c).numpy())
                    out_s.append(s[ii, jj].numpy())
    if not out_i:
        z = np.zeros(0, np.int64)
        return Pairs(z, z, np.zeros(0, np.float32))
    return Pairs.build(np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s))


def default_nlist(n: int) -> int:
    """~4 sqrt(n) k-means cells, but at least 39 training points per cell."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def pairs_partitioned(x: np.ndarray, threshold: float, nlist: int | None = None, nprobe: int = 16,
                      seed: int = 0, query_block: int = 65536, progress: bool = True) -> Pairs:
    """Pairs with cosine >= threshold via faiss IVF: k-means into ``nlist`` cells, then a range search
    of each row within its ``nprobe`` nearest cells. Approximate: a pair is missed only when neither row
    probes the other's cell."""
    import faiss
    from tqdm.auto import tqdm

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    nlist = nlist or default_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    n_train = min(n, nlist * 64)
    train = x[np.sort(rng.choice(n, n_train, replace=False))] if n_train < n else x
    index.cp.seed = seed
    index.train(train)
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    out_i, out_j, out_s = [], [], []
    for a in tqdm(range(0, n, query_block), desc="pairs", unit="block", disable=not progress or n < 2 * query_block):
        b = min(a + query_block, n)
        lims, dist, ids = index.range_search(x[a:b], float(threshold) - 1e-6)
        counts = np.diff(lims).astype(np.int64)
        qi = np.repeat(np.arange(a, b, dtype=np.int64), counts)
        keep = ids != qi
        out_i.append(qi[keep])
        out_j.append(ids[keep].astype(np.int64))
        out_s.append(dist[keep])
    return Pairs.build(np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s))


def similar_pairs(x: np.ndarray, threshold: float, method: str = "auto", partition_min_rows: int = 50_000,
                  nlist: int | None = None, nprobe: int = 16) -> tuple[Pairs, str]:
    """Pairs above ``threshold`` with the configured method; returns the pairs and the method used."""
    if method == "auto":
        method = "partitioned" if len(x) >= partition_min_rows else "exact"
    if len(x) < 2:
        z = np.zeros(0, np.int64)
        return Pairs(z, z, np.zeros(0, np.float32)), method
    if method == "partitioned":
        return pairs_partitioned(x, threshold, nlist=nlist, nprobe=nprobe), method
    return pairs_exact(x, threshold), method


# ----------------------------------------------------------------------------- clustering
class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def keeper_rank(row: dict[str, Any]) -> tuple:
    """Lower is better: originals over rephrasings, then richer context (longer rendered), then lowest id."""
    return (bool(row.get("is_rephrase")), -len(render_context(row.get("context"))), row["id"])


@dataclass
class DedupResult:
    kept: list[dict[str, Any]]
    drops: list[dict[str, Any]]
    counts: dict[str, int]
    pairs: int
    method: str


def dedup_rows(rows: list[dict[str, Any]], vecs: np.ndarray, threshold: float, within_group_threshold: float,
               method: str = "auto", partition_min_rows: int = 50_000, nlist: int | None = None,
               nprobe: int = 16, min_number_overlap: float = 0.0) -> DedupResult:
    """Deduplicate ``rows`` (``vecs`` are their L2-normalised embeddings, same order).

    1. Across groups: union-find over exact-duplicate pairs and cross-group pairs with cosine >=
       ``threshold`` whose figures overlap (:func:`number_overlap` >= ``min_number_overlap``: sentence
       embeddings barely see numbers, so one question template over other data would otherwise look
       like a duplicate). Each cluster keeps the best row by :func:`keeper_rank` and, with it, the other
       members of the keeper's group; members of other groups are dropped. So a duplicated item's
       distinct rephrasings survive with it, and no two surviving rows of different groups are
       duplicates (similar and sharing their figures).
    2. Within each group: union-find over the surviving rows' exact copies and pairs with cosine >=
       ``within_group_threshold``; one keeper per cluster by the same policy.
    """
    n = len(rows)
    keys = [exact_key(r) for r in rows]
    groups = np.array([r["group_id"] for r in rows], dtype=object)
    low = min(threshold, within_group_threshold)
    pairs, used = similar_pairs(vecs, low, method, partition_min_rows, nlist, nprobe)
    if len(pairs):
        same = groups[pairs.i] == groups[pairs.j]
        cross = (~same) & (pairs.sim >= threshold)
        within = same & (pairs.sim >= within_group_threshold)
        if min_number_overlap > 0 and cross.any():
            nums: dict[int, frozenset[str]] = {}
            for k in np.flatnonzero(cross).tolist():
                a, b = int(pairs.i[k]), int(pairs.j[k])
                na = nums.setdefault(a, numbers(rows[a]))
                nb = nums.setdefault(b, numbers(rows[b]))
                if number_overlap(na, nb) < min_number_overlap:
                    cross[k] = False
    else:
        cross = within = np.zeros(0, bool)
    by_key: dict[str, list[int]] = {}
    for idx, k in enumerate(keys):
        by_key.setdefault(k, []).append(idx)
    exact = [(m[0], o) for m in by_key.values() for o in m[1:]]

    def drop(d: int, k: int, near_reason: str) -> dict[str, Any]:
        return {"dropped_id": rows[d]["id"], "kept_id": rows[k]["id"],
                "dropped_group": rows[d]["group_id"], "kept_group": rows[k]["group_id"],
                "similarity": round(float(vecs[d] @ vecs[k]), 6),
                "reason": "exact_duplicate" if keys[d] == keys[k] else near_reason}

    # 1. across groups
    uf = UnionFind(n)
    for a, b in exact:
        if groups[a] != groups[b]:
            uf.union(a, b)
    for a, b in zip(pairs.i[cross].tolist(), pairs.j[cross].tolist()):
        uf.union(a, b)
    clusters: dict[int, list[int]] = {}
    for idx in range(n):
        clusters.setdefault(uf.find(idx), []).append(idx)
    alive = np.ones(n, bool)
    drops = []
    for members in clusters.values():
        if len(members) < 2:
            continue
        keeper = min(members, key=lambda k: keeper_rank(rows[k]))
        for d in members:
            if groups[d] != groups[keeper]:
                alive[d] = False
                drops.append(drop(d, keeper, "near_duplicate"))
    # 2. within groups, among the survivors
    uf = UnionFind(n)
    for a, b in exact:
        if groups[a] == groups[b] and alive[a] and alive[b]:
            uf.union(a, b)
    for a, b in zip(pairs.i[within].tolist(), pairs.j[within].tolist()):
        if alive[a] and alive[b]:
            uf.union(a, b)
    clusters = {}
    for idx in np.flatnonzero(alive).tolist():
        clusters.setdefault(uf.find(idx), []).append(idx)
    for members in clusters.values():
        if len(members) < 2:
            continue
        keeper = min(members, key=lambda k: keeper_rank(rows[k]))
        for d in members:
            if d != keeper:
                alive[d] = False
                drops.append(drop(d, keeper, "within_group_near_copy"))
    kept = sorted((rows[k] for k in np.flatnonzero(alive).tolist()), key=lambda r: r["id"])
    drops.sort(key=lambda d: d["dropped_id"])
    counts = {r: 0 for r in REASONS}
    counts.update(Counter(d["reason"] for d in drops))
    return DedupResult(kept, drops, counts, int(cross.sum() + within.sum()) + len(exact), used)


# ----------------------------------------------------------------------------- stage
def run_dedup(cfg: Config, embedder: Embedder | None = None) -> dict[str, Any]:
    src = cfg.paths.stage_dir("augment")
    require_stage(src, "augment")
    rows = sorted(read_jsonl(src / "samples.jsonl"), key=lambda r: r["id"])
    t0 = time.perf_counter()
    embedder = embedder or load_embedder(cfg.dedup.embedder, cfg.paths.cache_dir / "embeddings")
    vecs = embed_samples(cfg, rows, embedder)
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = dedup_rows(rows, vecs, cfg.dedup.threshold, cfg.dedup.within_group_threshold, cfg.dedup.method,
                     cfg.dedup.partition_min_rows, cfg.dedup.nlist, cfg.dedup.nprobe,
                     cfg.dedup.min_number_overlap)
    t_pairs = time.perf_counter() - t0
    out = cfg.paths.stage_dir("dedup")
    write_jsonl(out / "samples.jsonl", res.kept)
    write_jsonl(out / "drops.jsonl", res.drops)
    log.info("dedup: %d rows in, %d kept, drops %s (%s search, %d edges)", len(rows), len(res.kept),
             res.counts, res.method, res.pairs)
    return write_manifest(out, {
        "stage": "dedup",
        "config_hash": cfg.section_hash("dedup"),
        "upstream": {"augment": manifest_hash(src)},
        "embedder": {"name": embedder.name, **getattr(embedder, "stats", {})},
        "threshold": cfg.dedup.threshold,
        "within_group_threshold": cfg.dedup.within_group_threshold,
        "min_number_overlap": cfg.dedup.min_number_overlap,
        "method": res.method,
        "counts": {"in": len(rows), "kept": len(res.kept), "dropped": len(res.drops),
                   "edges": res.pairs,
                   "dropped_by_reason": res.counts,
                   "kept_by_category": dict(sorted(Counter(r["category"] for r in res.kept).items())),
                   "kept_rephrasings": sum(bool(r.get("is_rephrase")) for r in res.kept)},
        "seconds": {"embed": round(t_embed, 3), "pairs": round(t_pairs, 3)},
    })
