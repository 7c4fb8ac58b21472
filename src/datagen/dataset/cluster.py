"""Scenario clusters: what the split is stratified by and what the card reports proportions of.

A row's cluster is its ``scenario`` where given, else its ``category`` (``cluster_by="scenario"``).
Rows with neither (an empty or generic category), or every row with ``cluster_by="kmeans"``, are
clustered by k-means on their embeddings, ``k`` chosen by silhouette (cosine) in ``k_range``, and each
k-means cluster is named by its top TF-IDF terms. A group (a source item and its rephrasings) takes
the cluster of its original, so it is never split across clusters.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

GENERIC = {"", "general", "other", "unknown", "misc", "none"}


@dataclass
class Clustering:
    labels: list[str]  # one per row
    source: dict[str, str]  # cluster name -> "scenario" | "category" | "kmeans"
    kmeans: dict[str, Any] = field(default_factory=dict)  # k, silhouette per k, top terms


def name_clusters(texts: list[str], assign: np.ndarray, n_terms: int = 3) -> dict[int, list[str]]:
    """Top TF-IDF terms of each cluster (its rows' texts concatenated into one document)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    ids = sorted(set(assign.tolist()))
    docs = [" ".join(t for t, a in zip(texts, assign) if a == c) for c in ids]
    vec = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b", sublinear_tf=True)
    try:
        m = vec.fit_transform(docs).toarray()
    except ValueError:  # no usable terms at all
        return {c: [] for c in ids}
    vocab = np.array(vec.get_feature_names_out())
    out = {}
    for row, c in zip(m, ids):
        order = np.lexsort((vocab, -row))  # by weight, then alphabetically: deterministic
        out[c] = [str(vocab[i]) for i in order[:n_terms] if row[i] > 0]
    return out


def kmeans_clusters(vecs: np.ndarray, texts: list[str], k_range: tuple[int, int],
                    seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """k-means with k in ``k_range`` chosen by cosine silhouette; returns labels and a report."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(vecs)
    lo, hi = k_range
    hi = min(hi, n - 1)
    if n < 3 or hi < max(lo, 2):
        return np.zeros(n, dtype=int), {"k": 1, "silhouette": {}}
    scores: dict[int, float] = {}
    best: tuple[float, int, np.ndarray] | None = None
    for k in range(max(lo, 2), hi + 1):
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(vecs)
        if len(set(labels.tolist())) < 2:
            continue
        s = float(silhouette_score(vecs, labels, metric="cosine", sample_size=min(n, 4000), random_state=seed))
        scores[k] = round(s, 4)
        if best is None or s > best[0] + 1e-9:
            best = (s, k, labels)
    if best is None:
        return np.zeros(n, dtype=int), {"k": 1, "silhouette": scores}
    return best[2], {"k": best[1], "silhouette": scores}


def assign_clusters(rows: list[dict[str, Any]], vecs: np.ndarray | None, texts: list[str],
                    cluster_by: str = "scenario", k_range: tuple[int, int] = (2, 8),
                    seed: int = 0) -> Clustering:
    """One cluster name per row (groups follow their original; see module doc)."""
    labels: list[str | None] = [None] * len(rows)
    source: dict[str, str] = {}
    if cluster_by == "scenario":
        for i, r in enumerate(rows):
            if r.get("scenario"):
                labels[i] = str(r["scenario"])
                source.setdefault(labels[i], "scenario")
            elif str(r.get("category") or "").strip().lower() not in GENERIC:
                labels[i] = str(r["category"])
                source.setdefault(labels[i], "category")
    todo = [i for i, lab in enumerate(labels) if lab is None]
    report: dict[str, Any] = {}
    if todo:
        if vecs is None:
            raise ValueError("k-means clustering needs embeddings")
        assign, report = kmeans_clusters(vecs[todo], [texts[i] for i in todo], k_range, seed)
        names = name_clusters([texts[i] for i in todo], assign)
        report["names"] = {}
        for c, terms in names.items():
            report["names"][int(c)] = "kmeans:" + ("-".join(terms) if terms else f"c{c}")
        for i, a in zip(todo, assign.tolist()):
            labels[i] = report["names"][a]
            source.setdefault(labels[i], "kmeans")
    # a group takes its original's cluster (else its most common one)
    by_group: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_group.setdefault(r["group_id"], []).append(i)
    final = list(labels)
    for members in by_group.values():
        originals = [i for i in members if not rows[i].get("is_rephrase")]
        if originals:
            lab = labels[min(originals, key=lambda i: rows[i]["id"])]
        else:
            lab = sorted(Counter(labels[i] for i in members).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        for i in members:
            final[i] = lab
    return Clustering([str(x) for x in final], source, report)
