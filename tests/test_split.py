"""Splitting: groups never cross splits, clusters spread by ratio, test holds originals only, k-means
clusters named by TF-IDF, balanced training sampling, the leakage check, and the stage's files."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from datagen.cluster import assign_clusters, kmeans_clusters
from datagen.embed import sample_text
from datagen.io import read_json, read_jsonl, write_jsonl, write_manifest
from datagen.split import SPLITS, allocate_groups, leakage_check, run_split, split_rows

CATS = ["returns", "volatility", "credit", "liquidity"]


def _row(id_, group, q, category, rephrase=False, scenario=None):
    return {"id": id_, "group_id": group, "source": "test", "task_type": "open_qa", "category": category,
            "scenario": scenario, "question": q, "context": {"text": "", "table": None}, "answer": "x",
            "labels": None, "metadata": {}, "is_rephrase": rephrase, "rephrase_index": 1 if rephrase else None}


def _dataset(groups_per_cat: int = 40):
    rows = []
    for c in CATS:
        for g in range(groups_per_cat):
            gid = f"{c}-{g:03d}"
            rows.append(_row(f"{gid}-o", gid, f"{c} question {g}", c))
            for k in range(g % 4):  # 0..3 rephrasings
                rows.append(_row(f"{gid}-r{k}", gid, f"{c} rephrased {g} {k}", c, rephrase=True))
    return rows


class HashEmbedder:
    """Deterministic pseudo-random unit vectors per text: unrelated texts have cosine ~0 +- 0.1."""

    name = "hash"
    dim = 96

    def encode(self, texts):
        out = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out.append(v / np.linalg.norm(v))
        return np.array(out, dtype=np.float32).reshape(len(texts), self.dim)


def _vecs(rows, cfg):
    return HashEmbedder().encode([sample_text(r, cfg.dedup.context_chars) for r in rows])


def test_groups_never_cross_and_test_is_originals_only(demo_cfg):
    rows = _dataset()
    res = split_rows(rows, _vecs(rows, demo_cfg), demo_cfg)
    groups = {s: {r["group_id"] for r in res["splits"][s]} for s in SPLITS}
    assert not (groups["train"] & groups["validation"] or groups["train"] & groups["test"]
                or groups["validation"] & groups["test"])
    assert not any(r["is_rephrase"] for r in res["splits"]["test"])
    # every row is either in a split or dropped with a reason; drops are exactly test rephrasings
    test_groups = groups["test"]
    expected = sorted(r["id"] for r in rows if r["is_rephrase"] and r["group_id"] in test_groups)
    assert [d["id"] for d in res["drops"]] == expected
    assert {d["reason"] for d in res["drops"]} == {"test_rephrase"}
    assert sum(len(v) for v in res["splits"].values()) + len(res["drops"]) == len(rows)
    # every group of a split keeps all its rows (except test rephrasings)
    for s in ("train", "validation"):
        assert Counter(r["group_id"] for r in res["splits"][s]) == Counter(
            r["group_id"] for r in rows if r["group_id"] in groups[s])
    assert res["leakage"]["groups_in_two_splits"] == 0


def test_cluster_proportions_follow_ratios(demo_cfg):
    rows = _dataset()
    res = split_rows(rows, _vecs(rows, demo_cfg), demo_cfg)
    # 40 groups per category, ratios 0.8/0.1/0.1 -> exactly 32/4/4 groups of each cluster
    for c in res["clusters"]["clusters"]:
        assert c["source"] == "category"
        assert c["groups"] == {"train": 32, "validation": 4, "test": 4}, c
    # each cluster is ~1/4 of each split (test is originals only: exactly 4 of 16 rows)
    for c in res["clusters"]["clusters"]:
        assert c["proportion"]["test"] == 0.25
        assert abs(c["proportion"]["train"] - 0.25) < 0.05
        assert abs(c["proportion"]["validation"] - 0.25) < 0.1


def test_allocate_groups_small_clusters_and_eligibility():
    gc = {f"g{i}": f"c{i % 8}" for i in range(24)}  # 8 clusters of 3 groups
    where = allocate_groups(gc, (0.8, 0.1, 0.1), seed=1, test_eligible={f"g{i}" for i in range(12)})
    n = Counter(where.values())
    assert n["validation"] >= 2 and n["test"] >= 2 and n["train"] >= 17
    assert all(int(g[1:]) < 12 for g, s in where.items() if s == "test")
    assert where == allocate_groups(gc, (0.8, 0.1, 0.1), seed=1, test_eligible={f"g{i}" for i in range(12)})


def test_scenario_wins_over_category_and_group_follows_original():
    rows = [_row("a", "g1", "q", "returns", scenario="fx_crisis"),
            _row("b", "g1", "q2", "volatility", rephrase=True),
            _row("c", "g2", "q3", "credit")]
    cl = assign_clusters(rows, None, ["q", "q2", "q3"])
    assert cl.labels == ["fx_crisis", "fx_crisis", "credit"]
    assert cl.source == {"fx_crisis": "scenario", "volatility": "category", "credit": "category"}


def test_kmeans_picks_k_by_silhouette_and_names_by_tfidf():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 32, dtype=np.float32) * 3
    vocab = [["bond", "coupon", "yield"], ["equity", "dividend", "stock"], ["currency", "fx", "peg"]]
    vecs, texts = [], []
    for c in range(3):
        for k in range(20):
            v = centres[c] + 0.3 * rng.standard_normal(32)
            vecs.append(v / np.linalg.norm(v))
            texts.append(f"{vocab[c][0]} {vocab[c][1]} {vocab[c][2]} question {k}")
    vecs = np.array(vecs, dtype=np.float32)
    labels, report = kmeans_clusters(vecs, texts, (2, 6), seed=0)
    assert report["k"] == 3 and len(report["silhouette"]) == 5
    rows = [_row(f"r{i:02d}", f"g{i:02d}", t, "general") for i, t in enumerate(texts)]
    cl = assign_clusters(rows, vecs, texts, "scenario", (2, 6), seed=0)
    assert sorted(set(cl.labels)) == ["kmeans:bond-coupon-yield", "kmeans:currency-fx-peg",
                                      "kmeans:dividend-equity-stock"]
    assert cl.labels[0] == "kmeans:bond-coupon-yield" and cl.labels[59] == "kmeans:currency-fx-peg"


def test_balance_train_caps_clusters_at_median(demo_cfg):
    rows = _dataset()
    rows += [_row(f"extra-{i:03d}-o", f"extra-{i:03d}", f"returns extra {i}", "returns") for i in range(60)]
    cfg = demo_cfg.model_copy(update={"split": demo_cfg.split.model_copy(update={"balance_train": True})})
    vecs = _vecs(rows, cfg)
    before = Counter(r["metadata"]["cluster"] for r in split_rows(rows, vecs, demo_cfg)["splits"]["train"])
    res = split_rows(rows, vecs, cfg)
    per = Counter(r["metadata"]["cluster"] for r in res["splits"]["train"])
    cap = int(np.ceil(np.median(list(before.values()))))
    assert before["returns"] > cap and per["returns"] == cap  # the big cluster is cut to the median
    assert all(per[c] == before[c] for c in before if before[c] <= cap)  # the others are untouched
    assert sum(d["reason"] == "balance_train" for d in res["drops"]) == before["returns"] - cap
    # originals are kept first
    dropped = {d["id"] for d in res["drops"] if d["reason"] == "balance_train"}
    assert all(r["is_rephrase"] for r in rows if r["id"] in dropped) or not any(
        r["is_rephrase"] for r in res["splits"]["train"] if r["metadata"]["cluster"] == "returns")


def test_leakage_check_exact_values():
    a = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    b = np.array([[0.6, 0.8, 0]], np.float32)
    c = np.array([[0, 0, 1]], np.float32)
    res = leakage_check({"train": a, "validation": b, "test": c}, threshold=0.75)
    assert res["by_split_pair"] == {"train|validation": 0.8, "test|train": 0.0, "test|validation": 0.0}
    assert res["max_cross_split_cosine"] == 0.8
    assert res["cross_split_pairs_above_threshold"] == 1 and res["cross_split_duplicates"] == 1


def test_leakage_check_separates_duplicates_from_same_template_other_figures():
    v = np.array([[1, 0, 0]], np.float32)
    mk = lambda i, ctx: {"id": i, "question": "Expected loss?", "context": {"text": ctx, "table": None}}  # noqa
    rows = {"train": [mk("a", "PD 3%, LGD 35%")], "validation": [mk("b", "PD 1%, LGD 40%")],
            "test": [mk("c", "PD 3%, LGD 35%")]}
    res = leakage_check({"train": v, "validation": v, "test": v}, 0.9, rows=rows, min_number_overlap=0.8)
    assert res["cross_split_pairs_above_threshold"] == 3 and res["cross_split_duplicates"] == 1


def test_run_split_stage_files(demo_cfg):
    rows = _dataset(10)
    d = demo_cfg.paths.stage_dir("dedup")
    write_jsonl(d / "samples.jsonl", rows)
    write_manifest(d, {"stage": "dedup"})
    m = run_split(demo_cfg, embedder=HashEmbedder())
    out = demo_cfg.paths.stage_dir("split")
    n = {s: len(read_jsonl(out / f"{s}.jsonl")) for s in SPLITS}
    assert n == {s: m["counts"][s] for s in SPLITS}
    assert sum(n.values()) + m["counts"]["dropped_by_reason"]["test_rephrase"] == len(rows)
    assert m["leakage"]["cross_split_pairs_above_threshold"] == 0 == m["leakage"]["cross_split_duplicates"]
    assert m["leakage"]["max_cross_split_cosine"] < 0.6
    cl = read_json(out / "clusters.json")
    assert [c["name"] for c in cl["clusters"]] == sorted(CATS)
    assert all(r["metadata"]["cluster"] in CATS for r in read_jsonl(out / "train.jsonl"))


@pytest.mark.parametrize("ratios", [(0.7, 0.15, 0.15), (0.6, 0.2, 0.2)])
def test_other_ratios_within_tolerance(demo_cfg, ratios):
    rows = _dataset()
    cfg = demo_cfg.model_copy(update={"split": demo_cfg.split.model_copy(update={"ratios": ratios})})
    res = split_rows(rows, _vecs(rows, cfg), cfg)
    for c in res["clusters"]["clusters"]:
        for s, r in zip(SPLITS, ratios):
            assert abs(c["groups"][s] / 40 - r) <= 0.05, (c, s)
