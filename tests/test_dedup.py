"""Dedup: exact outcomes on a constructed set (fake embedder with hand-set vectors), pair search
agreement between exact and partitioned search, the stage's files, and one slow test on real MiniLM."""

from __future__ import annotations

import math

import numpy as np
import pytest

from datagen.dedup import (Pairs, dedup_rows, exact_key, normalise_text, number_overlap, numbers, pairs_exact,
                           pairs_partitioned, run_dedup)
from datagen.embed import sample_text
from datagen.io import read_json, read_jsonl, write_jsonl, write_manifest

DIM = 16


def _e(k: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[k] = 1.0
    return v


def _mix(cos: float, base: int, other: int) -> np.ndarray:
    return (cos * _e(base) + math.sqrt(1 - cos * cos) * _e(other)).astype(np.float32)


def _row(id_, group, q, ctx="", rephrase=False, category="returns"):
    return {"id": id_, "group_id": group, "source": "test", "task_type": "open_qa", "category": category,
            "scenario": None, "question": q, "context": {"text": ctx, "table": None}, "answer": "x",
            "labels": None, "metadata": {}, "is_rephrase": rephrase,
            "rephrase_index": 1 if rephrase else None}


# id -> (row, vector). Cosines are set by hand; see the comments for the expected fate of each row.
CASE = {
    # g1: original, a distinct rephrasing (0.95: kept), a near-copy (0.99 >= 0.985: dropped)
    "a1": (_row("a1", "g1", "What is ACME's 10-day return?", "ACME closed at 101."), _e(0)),
    "a1-r1": (_row("a1-r1", "g1", "Over ten days, how much did ACME return?", "ACME closed at 101.", True),
              _mix(0.95, 0, 1)),
    "a1-r2": (_row("a1-r2", "g1", "What's ACME's 10 day return?", "ACME closed at 101.", True),
              _mix(0.99, 0, 2)),
    # g2: the same item as a1 with other case/spacing/punctuation: exact duplicate, a1 keeps (lower id)
    "b1": (_row("b1", "g2", "what is  ACME's 10-day return", "ACME closed at 101"), _e(0)),
    # g7: similar to a1 but below the threshold (0.91 < 0.92): kept
    "h1": (_row("h1", "g7", "What is ACME's 20-day return?", "ACME closed at 99."), _mix(0.91, 0, 3)),
    # g3 vs g4: near duplicates (0.95); d1 has the richer context, so it keeps despite its higher id
    "c1": (_row("c1", "g3", "Is BOLT's volatility high?", "short"), _e(4)),
    "d1": (_row("d1", "g4", "Is the volatility of BOLT high?", "a much longer context paragraph"),
           _mix(0.95, 4, 5)),
    # g5's rephrasing vs g6's original (0.93): the original keeps despite richer context and lower id
    "e1": (_row("e1", "g5", "Rate the credit risk of CRUX.", "ctx"), _e(8)),
    "e1-r1": (_row("e1-r1", "g5", "How risky is CRUX's credit?", "a much longer context paragraph", True),
              _mix(0.93, 6, 7)),
    "f1": (_row("f1", "g6", "How risky is DYNA credit?", "ctx"), _e(6)),
}


class FakeEmbedder:
    name = "fake"

    def __init__(self, by_text: dict[str, np.ndarray]):
        self.by_text = by_text

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.by_text[t] for t in texts]) if texts else np.zeros((0, DIM), np.float32)


def _case():
    rows = [r for r, _ in CASE.values()]
    vecs = np.stack([v for _, v in CASE.values()])
    return rows, vecs


def test_normalise_text_keeps_numbers():
    assert normalise_text("What's  ACME's 10-day return?") == "what s acme s 10 day return"
    assert normalise_text("Up 1.5% to $3,200.") == "up 1.5% to $3,200"
    assert exact_key(CASE["a1"][0]) == exact_key(CASE["b1"][0])
    assert exact_key(CASE["a1"][0]) != exact_key(CASE["h1"][0])


@pytest.mark.parametrize("method", ["exact", "partitioned"])
def test_dedup_constructed_set_exact_outcome(method):
    rows, vecs = _case()
    res = dedup_rows(rows, vecs, threshold=0.92, within_group_threshold=0.985, method=method, nlist=1)
    got = [(d["dropped_id"], d["kept_id"], round(d["similarity"], 4), d["reason"]) for d in res.drops]
    assert got == [
        ("a1-r2", "a1", 0.99, "within_group_near_copy"),
        ("b1", "a1", 1.0, "exact_duplicate"),
        ("c1", "d1", 0.95, "near_duplicate"),
        ("e1-r1", "f1", 0.93, "near_duplicate"),
    ]
    assert [r["id"] for r in res.kept] == ["a1", "a1-r1", "d1", "e1", "f1", "h1"]
    assert res.counts == {"exact_duplicate": 1, "near_duplicate": 2, "within_group_near_copy": 1}
    assert res.method == method


def test_numbers_and_overlap():
    row = _row("n", "g", "Loss on 3,559,000 USD at 1.50%?", "PD 1.50%, LGD 40%, EAD 3,559,000 USD.")
    assert numbers(row) == frozenset({"3559000", "1.5", "40"})
    assert number_overlap(frozenset({"1", "2"}), frozenset({"2", "3"})) == 1 / 3
    assert number_overlap(frozenset(), frozenset()) == 1.0


def test_same_template_other_figures_is_not_a_duplicate():
    """Embeddings barely see numbers: the same question over other data must survive."""
    q = "What is the one-year expected loss on the loan?"
    rows = [_row("p1", "g1", q, "PD 3.00%, LGD 35%, EAD 4,937,000 USD."),
            _row("p2", "g2", q, "PD 1.50%, LGD 40%, EAD 3,559,000 USD."),
            _row("p3", "g3", q + " ", "PD 3.00%, LGD 35%, EAD 4,937,000 USD (term loan).")]
    vecs = np.stack([_e(0), _mix(0.999, 0, 1), _mix(0.995, 0, 2)])
    res = dedup_rows(rows, vecs, 0.92, 0.985, method="exact", min_number_overlap=0.8)
    # p3 keeps: richer context
    assert [(d["dropped_id"], d["kept_id"], d["reason"]) for d in res.drops] == [("p1", "p3", "near_duplicate")]
    res = dedup_rows(rows, vecs, 0.92, 0.985, method="exact", min_number_overlap=0.0)
    assert [d["dropped_id"] for d in res.drops] == ["p1", "p2"]


def test_no_cross_group_pair_above_threshold_survives():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 32))
    x = np.repeat(centres, 8, axis=0) + 0.15 * rng.normal(size=(40, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    rows = [_row(f"r{i:02d}", f"g{i // 2}", f"q{i}") for i in range(40)]
    res = dedup_rows(rows, x, threshold=0.9, within_group_threshold=0.97, method="exact")
    idx = [int(r["id"][1:]) for r in res.kept]
    sims = x[idx] @ x[idx].T
    groups = np.array([r["group_id"] for r in res.kept])
    cross = groups[:, None] != groups[None, :]
    assert len(res.drops) > 0 and (sims[cross] < 0.9).all()
    assert len(res.kept) + len(res.drops) == 40


def test_partitioned_search_matches_exact_when_all_cells_probed():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, 24))
    x = np.repeat(centres, 30, axis=0) + 0.25 * rng.normal(size=(600, 24))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ex = pairs_exact(x, 0.9, block=128, col_block=200)
    pa = pairs_partitioned(x, 0.9, nlist=8, nprobe=8)
    assert len(ex) > 100
    assert np.array_equal(ex.i, pa.i) and np.array_equal(ex.j, pa.j)
    np.testing.assert_allclose(ex.sim, pa.sim, atol=1e-5)
    brute = np.argwhere(np.triu(x @ x.T, 1) >= 0.9)
    assert np.array_equal(brute[:, 0], ex.i) and np.array_equal(brute[:, 1], ex.j)


def test_pairs_build_dedups_and_orders():
    p = Pairs.build(np.array([3, 1, 2, 1]), np.array([1, 3, 2, 0]), np.array([0.9, 0.9, 1.0, 0.95]))
    assert p.i.tolist() == [0, 1] and p.j.tolist() == [1, 3]


def test_run_dedup_writes_files_and_manifest(demo_cfg):
    rows, vecs = _case()
    aug = demo_cfg.paths.stage_dir("augment")
    write_jsonl(aug / "samples.jsonl", rows)
    write_manifest(aug, {"stage": "augment"})
    emb = FakeEmbedder({sample_text(r, demo_cfg.dedup.context_chars): v for r, v in zip(rows, vecs)})
    m = run_dedup(demo_cfg, embedder=emb)
    out = demo_cfg.paths.stage_dir("dedup")
    assert [r["id"] for r in read_jsonl(out / "samples.jsonl")] == ["a1", "a1-r1", "d1", "e1", "f1", "h1"]
    drops = read_jsonl(out / "drops.jsonl")
    assert [(d["dropped_id"], d["kept_id"], d["reason"]) for d in drops][1] == ("b1", "a1", "exact_duplicate")
    assert m["counts"]["dropped_by_reason"] == {"exact_duplicate": 1, "near_duplicate": 2,
                                                "within_group_near_copy": 1}
    assert m["counts"]["in"] == 10 and m["counts"]["kept"] == 6
    assert read_json(out / "manifest.json")["outputs"].keys() == {"samples.jsonl", "drops.jsonl"}


@pytest.mark.slow
def test_real_minilm_paraphrases(tmp_path):
    from datagen.config import EmbedderConfig
    from datagen.embed import load_embedder

    emb = load_embedder(EmbedderConfig(), cache_dir=tmp_path / "emb")
    texts = ["What was ACME's total return over the last 10 trading days?",
             "Over the last 10 trading days, what total return did ACME deliver?",
             "What was ACME's total return over the last 10 trading days?",
             "Which sector has the highest default rate in the portfolio?"]
    rows = [_row(f"r{i}", f"g{i}", t) for i, t in enumerate(texts)]
    vecs = emb.encode(texts)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    res = dedup_rows(rows, vecs, threshold=0.92, within_group_threshold=0.985, method="exact")
    reasons = {d["dropped_id"]: (d["kept_id"], d["reason"]) for d in res.drops}
    assert reasons == {"r1": ("r0", "near_duplicate"), "r2": ("r0", "exact_duplicate")}
    # the disk cache answers a second embedder without re-encoding
    emb2 = load_embedder(EmbedderConfig(), cache_dir=tmp_path / "emb")
    np.testing.assert_allclose(emb2.encode(texts), vecs, atol=1e-6)
    assert emb2.stats["encoded"] == 0 and emb2.stats["cache_hits"] == 4
