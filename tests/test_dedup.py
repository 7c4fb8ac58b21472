"""Dedup: exact outcomes on a constructed set (fake embedder with hand-set vectors), pair search
agreement between exact and partitioned search, the stage's files, and one slow test on real MiniLM."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from flows.stages import invoke

from datagen.dataset.dedup import (
    Pairs,
    answers_agree,
    context_similarity,
    dedup_rows,
    exact_key,
    normalise_text,
    number_overlap,
    numbers,
    pairs_exact,
    pairs_partitioned,
    question_near_copy,
    question_text,
    signed_numbers,
    swapped_terms,
    term_difference,
)
from datagen.io import read_json, read_jsonl, write_jsonl, write_manifest
from datagen.manifest import Manifest
from datagen.schema import Sample

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
    # g3 vs g4: near duplicates (0.95, d1's context adds a sentence to c1's); d1 has the richer
    # context, so it keeps despite its higher id
    "c1": (_row("c1", "g3", "Is BOLT's volatility high?", "BOLT vol 30%."), _e(4)),
    "d1": (_row("d1", "g4", "Is the volatility of BOLT high?", "BOLT vol 30%. Rated by the desk."),
           _mix(0.95, 4, 5)),
    # g5's rephrasing vs g6's original (0.93): the original keeps despite its higher id
    "e1": (_row("e1", "g5", "Rate the credit risk of CRUX.", "CRUX: PD 2%, LGD 45%."), _e(8)),
    "e1-r1": (_row("e1-r1", "g5", "How risky is CRUX's credit?", "CRUX: PD 2%, LGD 45%.", True),
              _mix(0.93, 6, 7)),
    "f1": (_row("f1", "g6", "How risky is CRUX credit?", "CRUX: PD 2%, LGD 45%."), _e(6)),
    # g8: another entity in the same template (cosine 0.99 to f1): another question, kept
    "f2": (_row("f2", "g8", "How risky is DYNA credit?", "CRUX: PD 2%, LGD 45%."), _mix(0.99, 6, 9)),
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
    got = [(d["row_id"], d["kept_id"], round(d["similarity"], 4), d["reason"]) for d in res.drops]
    assert got == [
        ("a1-r2", "a1", 0.99, "within_group_near_copy"),
        ("b1", "a1", 1.0, "exact_duplicate"),
        ("c1", "d1", 0.95, "near_duplicate"),
        ("e1-r1", "f1", 0.93, "near_duplicate"),
    ]
    assert [r["id"] for r in res.kept] == ["a1", "a1-r1", "d1", "e1", "f1", "f2", "h1"]
    assert res.counts == {"dropped_exact_duplicate": 1, "dropped_near_duplicate": 2,
                          "dropped_within_group_near_copy": 1}
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
    res = dedup_rows(rows, vecs, 0.92, 0.985, method="exact")
    # p3's context holds all of p1's (and adds a note): p3 keeps, the richer context; p2 is other data
    assert [(d["row_id"], d["kept_id"], d["reason"]) for d in res.drops] == [("p1", "p3", "near_duplicate")]


def test_no_duplicate_pair_of_different_groups_survives():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 32))
    x = np.repeat(centres, 8, axis=0) + 0.15 * rng.normal(size=(40, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    metrics = ["return", "volatility", "drawdown", "volume", "spread"]
    # 8 rows per centre: one question in two spellings, or (odd rows of centre 4) about another ticker
    rows = [_row(f"r{i:02d}", f"g{i // 2}", f"What is the {metrics[i // 8]} of "
                 f"{'BOLT' if i // 8 == 4 and i % 2 else 'ACME'}{'?' if i % 3 else ''}") for i in range(40)]
    res = dedup_rows(rows, x, threshold=0.9, within_group_threshold=0.97, method="exact")
    assert len(res.kept) + len(res.drops) == 40 and len(res.drops) > 0
    for a in res.kept:
        for b in res.kept:
            if a["id"] < b["id"] and a["group_id"] != b["group_id"]:
                sim = float(x[int(a["id"][1:])] @ x[int(b["id"][1:])])
                assert not (question_near_copy(a["question"], b["question"], sim, 0.9)
                            and context_similarity(a, b) >= 0.98 and answers_agree(a, b)), (a["id"], b["id"])
    assert len(res.kept) == 6  # one per centre, two for centre 4 (two tickers)


def test_signals():
    assert signed_numbers("-2.04% vs (3.4) and $1,200.50 in 2017-2018") == (-3.4, -2.04, 1200.5, 2017.0, 2018.0)
    # datagen.numbers reads them: scale words apply, a spaced minus between figures is not a sign
    assert signed_numbers("$1.2bn or 1,200 million, from 2017 - 2018") == (2017.0, 2018.0, 1.2e9, 1.2e9)
    assert signed_numbers("on 2024-01-02") == (1.0, 2.0, 2024.0)  # dates' parts tell dates apart
    assert numbers({"question": "Is the CET1 ratio of 4.50% above 0.5 on 2024-01-02?", "context": None}) == {
        "4.5", "0.5", "2024", "1", "2"}  # "CET1" holds no figure
    assert term_difference("What was the percentage change in net income?",
                           "What was the percentage change in net sales?") == (["income"], ["sales"])
    assert term_difference("What was ACME's total return over the last 10 trading days?",
                           "Over the last 10 trading days, what total return did ACME deliver?") == ([], [])
    assert term_difference("What is the percentage change?", "What's the percent change?") == ([], [])
    assert term_difference("What was the revenue in 2019?", "What was the revenue growth in 2019?") == ([], ["growth"])
    r = lambda a, lab=None: {"answer": a, "metadata": {"answer_label": lab} if lab else {}}  # noqa: E731
    assert answers_agree(r("5.20%"), r("5.20%: (105.2 / 100 - 1) x 100"))
    assert answers_agree(r("14.16 percent"), r("14.16%")) and answers_agree(r("Good."), r("good"))
    assert not answers_agree(r("-2.04%"), r("2.04%")) and not answers_agree(r("yes"), r("no"))
    assert not answers_agree(r("x", "above"), r("x", "below"))


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
    write_manifest(aug, Manifest(stage="augment"))
    emb = FakeEmbedder({question_text(r): v for r, v in zip(rows, vecs)})  # dedup embeds questions alone
    m = invoke(demo_cfg, "dedup", embedder=emb)
    out = demo_cfg.paths.stage_dir("dedup")
    assert [r["id"] for r in read_jsonl(out / "samples.jsonl")] == ["a1", "a1-r1", "d1", "e1", "f1", "f2", "h1"]
    drops = read_jsonl(out / "drops.jsonl")
    assert [(d["stage"], d["row_id"], d["kept_id"], d["reason"]) for d in drops][1] == (
        "dedup", "b1", "a1", "exact_duplicate")
    assert m.counts["dropped_by_reason"] == {"exact_duplicate": 1, "near_duplicate": 2,
                                                "within_group_near_copy": 1, "conflicting_answers": 0}
    assert {k: v for k, v in m.counts.items() if k.startswith("dropped_") and k != "dropped_by_reason"} == {
        "dropped_exact_duplicate": 1, "dropped_near_duplicate": 2, "dropped_within_group_near_copy": 1}
    assert m.counts["in"] == 11 and m.counts["kept"] == 7 and m.counts["quarantined"] == 0
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
    reasons = {d["row_id"]: (d["kept_id"], d["reason"]) for d in res.drops}
    assert reasons == {"r1": ("r0", "near_duplicate"), "r2": ("r0", "exact_duplicate")}
    # the disk cache answers a second embedder without re-encoding
    emb2 = load_embedder(EmbedderConfig(), cache_dir=tmp_path / "emb")
    np.testing.assert_allclose(emb2.encode(texts), vecs, atol=1e-6)
    assert emb2.stats["encoded"] == 0 and emb2.stats["cache_hits"] == 4


# ----------------------------------------------------------------------------- realistic data (issue 13)
REALISTIC = Path(__file__).parent / "data" / "realistic"


def _load(name):
    rows = [Sample.model_validate(r).to_row() for r in read_jsonl(REALISTIC / name)]
    assert rows
    return rows


def _fooled_vecs(rows, near_copies=None, cos=0.96):
    """Question vectors of an embedder the shared context has fooled: every two distinct questions
    have cosine ``cos`` (above the threshold); the same question text gives the same vector;
    ``near_copies`` maps a question to the question it copies (cosine 0.99 to it)."""
    near_copies = near_copies or {}
    distinct = sorted({r["question"] for r in rows} - set(near_copies))
    dim = len(distinct) + len(near_copies) + 1
    by_q = {}
    for k, q in enumerate(distinct):
        v = np.zeros(dim, np.float32)
        v[0], v[k + 1] = math.sqrt(cos), math.sqrt(1 - cos)
        by_q[q] = v
    for k, (q, of) in enumerate(sorted(near_copies.items())):
        v = by_q[of] * 0.99
        v[len(distinct) + 1 + k] = math.sqrt(1 - 0.99 ** 2)
        by_q[q] = v.astype(np.float32)
    return np.stack([by_q[r["question"]] for r in rows])


def test_same_context_distinct_questions_are_kept_and_conflicts_quarantined():
    """Issue 13.1: questions over one shared report context are distinct items even when the embedder
    calls them near-identical; a true copy goes, an exact copy with another answer is quarantined."""
    rows = _load("report_qa.jsonl")
    copy_q = "What was the percentage change in the net income from 2018 to 2019?"
    rows.append({**rows[0], "id": "doc-acme-2019-q00-near", "group_id": "doc-acme-2019-q00-near", "question": copy_q})
    vecs = _fooled_vecs(rows, {copy_q: rows[0]["question"]})
    res = dedup_rows(rows, vecs, threshold=0.92, within_group_threshold=0.985, method="exact")
    got = sorted((d["row_id"], d["reason"], d.get("kept_id")) for d in res.drops)
    assert got == [("doc-acme-2019-q00-copy", "exact_duplicate", "doc-acme-2019-q00"),
                   ("doc-acme-2019-q00-near", "near_duplicate", "doc-acme-2019-q00"),
                   ("doc-acme-2019-q01", "conflicting_answers", None),
                   ("doc-acme-2019-q01-copy", "conflicting_answers", None)]
    conflict = {d["row_id"]: d for d in res.drops if d["reason"] == "conflicting_answers"}
    assert conflict["doc-acme-2019-q01"]["conflicts_with"] == ["doc-acme-2019-q01-copy"]
    assert "-2.04%" in conflict["doc-acme-2019-q01"]["detail"]
    assert "2.04%" in conflict["doc-acme-2019-q01-copy"]["detail"]
    assert all(d["stage"] == "dedup" for d in res.drops)
    # all 20 distinct questions of the two reports survive, except the one whose answer is disputed
    assert len(res.kept) == 19 and "doc-acme-2019-q01" not in {r["id"] for r in res.kept}
    assert res.counts == {"dropped_conflicting_answers": 2, "dropped_exact_duplicate": 1,
                          "dropped_near_duplicate": 1}


def test_tabular_rows_differing_in_one_field_are_not_duplicates():
    """Issue 13.1: credit applicants (one table row each, one shared question) that differ in one
    field are distinct, whatever their labels; the same applicant exported twice is a duplicate."""
    rows = _load("credit_table.jsonl")
    vecs = _fooled_vecs(rows)  # one question text: every pair has cosine 1.0
    res = dedup_rows(rows, vecs, threshold=0.92, within_group_threshold=0.985, method="exact")
    assert [(d["row_id"], d["reason"], d["kept_id"]) for d in res.drops] == [
        ("credit-011", "exact_duplicate", "credit-002")]
    assert len(res.kept) == 11


def test_same_question_other_answer_in_a_near_shared_context_is_a_conflict():
    """A context that only adds a paragraph nearly shares the other; conflicting answers there are a
    quarantine, agreeing ones a duplicate (the richer context keeps)."""
    base = _load("report_qa.jsonl")[5]  # "What was the net income in 2019?" -> 55,256 million
    longer = {**base["context"], "text": base["context"]["text"] + " All figures are audited."}
    agree = {**base, "id": "z-agree", "group_id": "z-agree", "context": longer}
    res = dedup_rows([base, agree], _fooled_vecs([base, agree]), 0.92, 0.985, method="exact")
    assert [(d["row_id"], d["reason"], d["kept_id"]) for d in res.drops] == [(base["id"], "near_duplicate", "z-agree")]
    other = {**agree, "answer": "59,531 million"}
    res = dedup_rows([base, other], _fooled_vecs([base, other]), 0.92, 0.985, method="exact")
    assert sorted(d["reason"] for d in res.drops) == ["conflicting_answers"] * 2 and res.kept == []
    # a different figure in the context is other data, not a near-shared context
    edited = {**base, "id": "z-edit", "group_id": "z-edit",
              "context": {**base["context"], "text": base["context"]["text"].replace("15.9%", "16.9%")}}
    res = dedup_rows([base, edited], _fooled_vecs([base, edited]), 0.92, 0.985, method="exact")
    assert res.drops == []


def test_conflict_quarantines_the_rephrasings_of_its_original_and_swapped_terms_differ():
    a = _row("a", "g1", "What was net income in 2019?", "Net income 55,256 in 2019.")
    a["answer"] = "55,256"
    r = {**_row("a-r1", "g1", "In 2019, how much was the net income?", "Net income 55,256 in 2019.", True),
         "answer": "55,256", "metadata": {"rephrase_of": "a"}}
    b = {**a, "id": "b", "group_id": "g2", "answer": "59,531"}
    res = dedup_rows([a, r, b], np.stack([_e(0), _mix(0.9, 0, 1), _e(0)]), 0.92, 0.985, method="exact")
    assert [(d["row_id"], d["reason"], d["conflicts_with"]) for d in res.drops] == [
        ("a", "conflicting_answers", ["b"]), ("a-r1", "conflicting_answers", ["a"]),
        ("b", "conflicting_answers", ["a"])]
    assert res.kept == []
    assert swapped_terms("What was the cost of sales as a percentage of net sales?",
                         "What was the net sales as a percentage of cost of sales?")
    assert not swapped_terms("What was the percentage change in net income?",
                             "How much did net income change in percent?")


def _templated_credit(n: int, seed: int = 0) -> list[dict]:
    """``n`` credit applicants under three phrasings of one question (a public credit table as users bring
    it), then exact copies, copies with one field changed, and copies with the other label."""
    import copy
    import random

    base = _load("credit_table.jsonl")[0]
    rng = random.Random(seed)
    qs = ["Based on the applicant's record, is the credit risk good or bad?",
          "Is this applicant a good or a bad credit risk?", "Would you rate this applicant's credit risk good or bad?"]

    def relabel(r, label):
        r["answer"] = label
        r["metadata"] = {**r["metadata"], "answer_label": label}

    rows = []
    for i in range(n):
        r = copy.deepcopy(base)
        r["id"] = r["group_id"] = f"c{i:05d}"
        cells = r["context"]["table"]["rows"][0]
        cells[1], cells[4], cells[9] = str(rng.randint(4, 60)), str(rng.randint(250, 15000)), str(rng.randint(19, 75))
        r["question"] = rng.choice(qs)
        relabel(r, rng.choice(["good", "bad"]))
        rows.append(r)
    for i in range(n // 10):
        r = copy.deepcopy(rows[rng.randrange(n)])
        r["id"] = r["group_id"] = f"d{i:05d}"
        if i % 3 == 1:
            r["context"]["table"]["rows"][0][10] = "rent" if r["context"]["table"]["rows"][0][10] != "rent" else "own"
        elif i % 3 == 2:
            relabel(r, "bad" if r["answer"] == "good" else "good")
        rows.append(r)
    return rows


def test_templated_questions_make_few_candidates_and_the_same_decisions_as_every_pair(monkeypatch):
    """Issue 30.0: one question template over 1,000 applicants made every pair a candidate (499,500). The
    blocked candidates give the decisions of checking every pair, from a small share of the pairs."""
    from datagen.dataset import dedup as dd

    rows = _templated_credit(300)
    vecs = _fooled_vecs(rows, cos=0.97)  # the three phrasings: cosine 0.97, above both thresholds
    fast = dedup_rows(rows, vecs, threshold=0.92, within_group_threshold=0.985, method="exact")
    n = len(rows)
    every = {(a, b) for a in range(n) for b in range(a + 1, n)}
    monkeypatch.setattr(dd, "_candidates", lambda *a, **k: (every, "exact"))
    slow = dedup_rows(rows, vecs, threshold=0.92, within_group_threshold=0.985, method="exact")
    assert fast.pairs < len(every) / 100, fast.pairs
    assert slow.pairs == len(every)
    assert [r["id"] for r in fast.kept] == [r["id"] for r in slow.kept]
    assert fast.drops == slow.drops
    reasons = Counter(d["reason"] for d in fast.drops)  # the planted copies are found
    assert reasons["exact_duplicate"] >= 8 and reasons["conflicting_answers"] >= 16, reasons
