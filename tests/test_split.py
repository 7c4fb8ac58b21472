"""Splitting: groups never cross splits, clusters spread by ratio, test holds originals only, k-means
clusters named by TF-IDF, balanced training sampling, the leakage check, and the stage's files."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from flows.stages import invoke

from datagen.dataset.cluster import assign_clusters, kmeans_clusters
from datagen.dataset.split import (
    SPLITS,
    allocate_groups,
    leakage_check,
    leakage_failure,
    overlap_report,
    price_rows,
    split_rows,
)
from datagen.embed import sample_text
from datagen.io import read_json, read_jsonl, write_jsonl, write_manifest
from datagen.manifest import Manifest

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
    assert [d["row_id"] for d in res["drops"]] == expected
    assert {d["reason"] for d in res["drops"]} == {"test_rephrase"}
    assert sum(len(v) for v in res["splits"].values()) + len(res["drops"]) == len(rows)
    # every group of a split keeps all its rows (except test rephrasings)
    for s in ("train", "validation"):
        assert Counter(r["group_id"] for r in res["splits"][s]) == Counter(
            r["group_id"] for r in rows if r["group_id"] in groups[s])
    assert res["leakage"]["groups_in_two_splits"] == 0


def _ratios(cfg, ratios=(0.8, 0.1, 0.1)):
    """``cfg`` with the split ratios a test counts on (not the demo profile's, which may change)."""
    return cfg.model_copy(update={"split": cfg.split.model_copy(update={"ratios": ratios})})


def test_cluster_proportions_follow_ratios(demo_cfg):
    demo_cfg = _ratios(demo_cfg)
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
    dropped = {d["row_id"] for d in res["drops"] if d["reason"] == "balance_train"}
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
    write_manifest(d, Manifest(stage="dedup"))
    m = invoke(demo_cfg, "split", embedder=HashEmbedder())
    out = demo_cfg.paths.stage_dir("split")
    n = {s: len(read_jsonl(out / f"{s}.jsonl")) for s in SPLITS}
    assert n == {s: m.counts[s] for s in SPLITS}
    assert sum(n.values()) + m.counts["dropped_by_reason"]["test_rephrase"] == len(rows)
    assert m.leakage["cross_split_pairs_above_threshold"] == 0 == m.leakage["cross_split_duplicates"]
    assert m.leakage["max_cross_split_cosine"] < 0.6
    cl = read_json(out / "clusters.json")
    assert [c["name"] for c in cl["clusters"]] == sorted(CATS)
    assert all(r["metadata"]["cluster"] in CATS for r in read_jsonl(out / "train.jsonl"))


@pytest.mark.parametrize("ratios", [(0.7, 0.15, 0.15), (0.6, 0.2, 0.2)])
def test_other_ratios_within_tolerance(demo_cfg, ratios):
    rows = _dataset()
    cfg = _ratios(demo_cfg, ratios)
    res = split_rows(rows, _vecs(rows, cfg), cfg)
    for c in res["clusters"]["clusters"]:
        for s, r in zip(SPLITS, ratios):
            assert abs(c["groups"][s] / 40 - r) <= 0.05, (c, s)


# ----------------------------------------------------------------------------- realistic data (issue 13)
REALISTIC = Path(__file__).parent / "data" / "realistic"


def _report_docs(n_docs: int = 30):
    """``n_docs`` financial reports (the realistic report's table with scaled figures), each with its
    ten questions; every row is its own group, as when the source has no group column."""
    base = [r for r in read_jsonl(REALISTIC / "report_qa.jsonl") if r["metadata"]["doc_id"] == "doc-acme-2019"
            and "copy" not in r["id"]]
    rows = []
    for d in range(n_docs):
        table = {**base[0]["context"]["table"],
                 "rows": [[r[0], *(f"{int(c.replace(',', '')) + 7 * d:,}" for c in r[1:])]
                          for r in base[0]["context"]["table"]["rows"]]}
        ctx = {"text": base[0]["context"]["text"], "table": table}
        for r in base:
            rid = f"doc{d:02d}-{r['id'][-3:]}"
            rows.append({**r, "id": rid, "group_id": rid, "context": ctx, "metadata": {"doc_id": f"doc{d:02d}"}})
    return rows


def test_rows_sharing_a_context_share_a_split(demo_cfg):
    """Issue 13.2: questions over one document go to one split although each row is its own group."""
    demo_cfg = _ratios(demo_cfg)
    rows = _report_docs()
    res = split_rows(rows, _vecs(rows, demo_cfg), demo_cfg)
    where = {}
    for s in SPLITS:
        for r in res["splits"][s]:
            where.setdefault(r["metadata"]["doc_id"], set()).add(s)
    assert all(len(v) == 1 for v in where.values()), where
    assert sorted(Counter(next(iter(v)) for v in where.values()).values()) == [3, 3, 24]
    leak = res["leakage"]
    assert leak["groups_in_two_splits"] == leak["context_hashes_in_two_splits"] == 0
    assert leak["price_rows_in_two_splits"] == 0


def test_overlap_report_counts_groups_contexts_and_price_rows():
    def r(id_, group, ctx, ticker=None, dates=()):
        table = {"columns": ["Date", "Close"], "rows": [[d, "1.00"] for d in dates]} if dates else None
        meta = ({"window": {"tickers": [ticker], "start": dates[0], "end": dates[-1], "days": len(dates)}}
                if dates else {})
        return {"id": id_, "group_id": group, "source": "market:csv" if dates else "t", "question": "q",
                "context": {"text": ctx, "table": table}, "metadata": meta}
    splits = {"train": [r("a", "g1", "doc A"), r("b", "g2", "doc B"),
                        r("m1", "m1", "w", "KO", ["2023-01-03", "2023-01-04"])],
              "validation": [r("c", "g1", "doc C"), r("m2", "m2", "w2", "KO", ["2023-01-04", "2023-01-05"])],
              "test": [r("d", "g3", "doc B"), r("e", "g4", "doc B"), r("m3", "m3", "w3", "MSFT", ["2023-01-04"])]}
    rep = overlap_report(splits)
    assert rep["groups_in_two_splits"] == 1  # g1
    assert rep["context_hashes_in_two_splits"] == 1  # doc B
    assert rep["price_rows_in_two_splits"] == 1  # (KO, 2023-01-04); MSFT's row is another ticker's
    assert rep["price_rows_by_split_pair"] == {"train|validation": 1, "test|train": 0, "test|validation": 0}
    assert leakage_failure(rep) == ("leakage across splits: 1 groups, 1 context hashes, 1 price rows (ticker, date) "
                                    "in more than one split; set split.allow_leakage: true to accept it")
    assert leakage_failure({**rep, "groups_in_two_splits": 0, "context_hashes_in_two_splits": 0,
                            "price_rows_in_two_splits": 0}) is None


def _market_rows(window_days=20, per_type=12):
    from datagen.config import MarketConfig
    from datagen.sources.market import load_files
    from datagen.sources.market_qa import build_market_qa

    md = load_files([REALISTIC / "prices_daily.csv"])
    return build_market_qa(md, MarketConfig(provider="csv", window_days=window_days, questions_per_type=per_type)), md


def test_market_splits_walk_forward_with_a_gap(demo_cfg):
    """Issue 13.3: per ticker, train / validation / test price rows come from ordered, disjoint date
    ranges with at least one window of trading days between them; no test price row is in training."""
    rows, md = _market_rows()
    res = split_rows(rows, _vecs(rows, demo_cfg), demo_cfg)
    cal = {t: sorted(g["date"].dt.strftime("%Y-%m-%d")) for t, g in md.prices.groupby("ticker")}
    dates = {s: {} for s in SPLITS}
    for s in SPLITS:
        for r in res["splits"][s]:
            for t, d in price_rows(r):
                dates[s].setdefault(t, set()).add(d)
    assert all(res["splits"][s] for s in SPLITS)
    for t in cal:
        pos = {d: k for k, d in enumerate(cal[t])}
        spans = [(min(pos[d] for d in dates[s][t]), max(pos[d] for d in dates[s][t])) for s in SPLITS if t in dates[s]]
        assert len(spans) == 3, t
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start - end - 1 >= 20, (t, spans)  # a gap of at least one 20-day window
    assert res["leakage"]["price_rows_in_two_splits"] == 0
    wf = res["walk_forward"]
    assert wf["gap_days"] == 20 and wf["units"]["train"] > wf["units"]["validation"] > 0
    assert wf["units"]["test"] > 0
    # windows that fall into a gap are dropped with a reason, never silently
    gap_drops = [d for d in res["drops"] if d["reason"] == "walk_forward_gap"]
    assert sum(len(v) for v in res["splits"].values()) + len(res["drops"]) == len(rows)
    assert all(d["stage"] == "split" for d in gap_drops)


def test_run_split_fails_on_leakage_unless_allowed(demo_cfg):
    """Without walk-forward, a random split of market windows shares price rows: the stage fails with
    the counts, unless split.allow_leakage."""
    rows, _ = _market_rows()
    d = demo_cfg.paths.stage_dir("dedup")
    write_jsonl(d / "samples.jsonl", rows)
    write_manifest(d, Manifest(stage="dedup"))
    cfg = demo_cfg.model_copy(update={"split": demo_cfg.split.model_copy(update={"walk_forward": False})})
    with pytest.raises(ValueError, match=r"^split: leakage across splits: 0 groups, 0 context hashes, \d+ price rows"):
        invoke(cfg, "split", embedder=HashEmbedder())
    assert not (cfg.paths.stage_dir("split") / "manifest.json").exists()
    cfg = cfg.model_copy(update={"split": cfg.split.model_copy(update={"allow_leakage": True})})
    m = invoke(cfg, "split", embedder=HashEmbedder())
    assert m.leakage["price_rows_in_two_splits"] > 0 and m.allow_leakage is True
    m = invoke(demo_cfg, "split", embedder=HashEmbedder())  # walk-forward: no leakage
    assert m.leakage["price_rows_in_two_splits"] == 0 and m.walk_forward["gap_days"] == 20


def test_leakage_check_on_templated_questions_counts_duplicates_without_every_pair():
    """Issue 30.0: one question template over every row puts every cross-split pair above the threshold.
    Beyond ``max_pairs`` the count above it is estimated, but the duplicates (same figures) are still
    counted exactly, the same as the all-pairs path."""
    import random

    rng = random.Random(0)
    mk = lambda i, ctx: {"id": i, "question": "Is the credit risk good or bad?",  # noqa: E731
                         "context": {"text": ctx, "table": None}}
    rows = {s: [mk(f"{s}{k}", f"amount {rng.randint(250, 90000)}, age {rng.randint(19, 75)}, "
                              f"months {rng.randint(4, 60)}") for k in range(n)]
            for s, n in (("train", 400), ("validation", 60), ("test", 80))}
    rows["test"][:5] = [{**r, "id": f"leak{k}"} for k, r in enumerate(rows["train"][:5])]  # 5 applicants leaked
    rows["validation"][0] = {**rows["train"][7], "id": "leak-v"}
    v = {s: np.tile(np.array([[1, 0, 0]], np.float32), (len(r), 1)) for s, r in rows.items()}
    exact = leakage_check(v, 0.9, rows=rows, min_number_overlap=0.8)
    fast = leakage_check(v, 0.9, rows=rows, min_number_overlap=0.8, max_pairs=1000, sample=5000)
    every = 400 * 60 + 400 * 80 + 60 * 80
    assert exact["cross_split_pairs_above_threshold"] == every and exact["pair_counts"] == "exact"
    assert exact["cross_split_duplicates"] == fast["cross_split_duplicates"] == 6
    assert fast["cross_split_pairs_above_threshold"] == every  # all pairs are alike: the estimate is exact
    assert fast["pair_counts"].startswith("above-threshold count estimated")


@pytest.mark.parametrize("min_overlap", [0.3, 0.5, 0.8, 1.0])
def test_figure_duplicates_equals_checking_every_pair(min_overlap):
    """The figure-pair prefix filter finds exactly the pairs that checking every pair finds, on sets of
    every size (1 to 12 figures, a few shared by most rows, as under one question template), near
    copies, and small sets that can only match by one shared figure."""
    import random

    from datagen.dataset.dedup import number_overlap
    from datagen.dataset.split import figure_duplicates

    rng = random.Random(int(min_overlap * 10))
    common = ["1", "2", "2024"]
    sets = []
    for _ in range(300):
        if sets and rng.random() < 0.3:  # a near copy of an earlier row: one figure changed or dropped
            x = set(rng.choice(sets))
            if len(x) > 1:
                x.discard(rng.choice(sorted(x)))
            if rng.random() < 0.5:
                x.add(str(rng.randint(0, 30)))
        else:
            x = {str(rng.randint(0, 60)) for _ in range(rng.randint(1, 9))} | set(rng.sample(common, rng.randint(0, 3)))
        sets.append(frozenset(x))
    sets += [frozenset()] * 3  # rows without figures are never counted
    label = np.array([rng.randrange(3) for _ in sets])
    vecs = np.array([[1.0, 0.0] if rng.random() < 0.8 else [0.0, 1.0] for _ in sets], np.float32)
    every = sum(1 for a in range(len(sets)) for b in range(a + 1, len(sets))
                if sets[a] and sets[b] and label[a] != label[b] and vecs[a] @ vecs[b] >= 0.9
                and number_overlap(sets[a], sets[b]) >= min_overlap - 1e-12)
    assert every > 0
    assert figure_duplicates(sets, label, vecs, 0.9, min_overlap) == every
