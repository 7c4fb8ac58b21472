"""Dedup calibration: precision and recall of dedup's pair rule on a labelled set of pairs.

    .venv/bin/python benchmarks/bench_dedup_calibration.py      # -> benchmarks/results/dedup_calibration.json

The labelled set (built below from the realistic test data in ``tests/data/realistic/``) holds:

- **duplicate** pairs: one question over one report context, reworded (stop words, word order,
  "percent" / "percentage", "between ... and" / "from ... to"), or with its answer formatted otherwise,
  or over a context that only adds a sentence; the same credit applicant exported twice;
- **distinct** pairs: every two different questions over one shared report context ("percentage
  change in net income" vs "... in net sales", 2018 vs 2017, "average" vs "total", "revenue" vs
  "revenue growth"); one question over two reports; one question over a report with one figure
  edited; credit applicants (a table row each) that differ in one field;
- **conflict** pairs: the same question and context with another answer (a sign error, another figure).

Each pair goes through :func:`datagen.dataset.dedup.dedup_rows` (two rows, two groups; real MiniLM
question embeddings) at every (``threshold``, ``context_threshold``) of a grid; a pair is predicted
duplicate if one row is dropped as a duplicate, conflict if both are quarantined. Precision and recall
are for the duplicate class; ``conflict_*`` for the conflict class; ``distinct_quarantined`` counts
distinct pairs wrongly quarantined. The old rule (cosine of question + context embeddings >= 0.92 and
figures Jaccard >= 0.8, answers ignored) is measured on the same pairs for comparison.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "realistic"
OUT = ROOT / "benchmarks" / "results" / "dedup_calibration.json"
sys.path.insert(0, str(ROOT / "src"))

# same question, reworded (the answer and context are the original's)
REWORDINGS = {
    "What was the percentage change in net income from 2018 to 2019?": [
        "what was the percentage change in Net Income from 2018 to 2019",
        "What is the percent change in net income between 2018 and 2019?",
        "By what percentage did net income change from 2018 to 2019?",
        "How much did net income change in percent from 2018 to 2019?",
        "From 2018 to 2019, what was the percentage change in net income?"],
    "What was the percentage change in net sales from 2018 to 2019?": [
        "What was the percent change in net sales between 2018 and 2019?",
        "By what percentage did net sales change from 2018 to 2019?"],
    "What was the net income in 2019?": ["How much was the net income in 2019?", "What was net income in 2019?",
                                         "What was the net income for 2019?"],
    "What was the net sales in 2019?": ["What were net sales in 2019?", "What were the net sales for 2019?"],
    "What was the change in gross margin from 2018 to 2019?": [
        "What is the change in the gross margin between 2018 and 2019?"],
    "What was the change in operating income from 2018 to 2019?": [
        "What was the change in operating income between 2018 and 2019?",
        "How much did operating income change from 2018 to 2019?"],
    "What was the average research and development expense from 2017 to 2019?": [
        "What was the average research and development expense between 2017 and 2019?",
        "From 2017 to 2019, what was the average research and development expense?"],
    "What was the cost of sales as a percentage of net sales in 2019?": [
        "In 2019, what was cost of sales as a percentage of net sales?",
        "What was the cost of sales as a percent of net sales in 2019?"],
    "What was the gross margin as a percentage of net sales in 2019?": [
        "What was gross margin as a percent of net sales in 2019?"],
}
# distinct questions over the same report, beyond the ten of the file (near-misses of an embedder)
EXTRA_DISTINCT = [
    ("What was the net sales in 2019?", "What was the net sales growth in 2019?", "-2.04%"),
    ("What was the average research and development expense from 2017 to 2019?",
     "What was the total research and development expense from 2017 to 2019?", "42,034 million"),
    ("What was the net income in 2019?", "What was the net income in 2018?", "59,531 million"),
    ("What was the change in gross margin from 2018 to 2019?", "What was the change in gross margin from 2017 to 2018?",
     "13,653 million"),
]
# the same answer written otherwise
ANSWER_FORMS = {"-7.18%": "-7.18 percent", "55,256 million": "$55,256 million", "-2.04%": "(2.04)%"}


def _mk(row: dict, rid: str, **over) -> dict:
    return {**row, "id": rid, "group_id": rid, "is_rephrase": False, "metadata": dict(row.get("metadata") or {}),
            **over}


def build_pairs() -> list[tuple[str, str, dict, dict]]:
    """(label, kind, row a, row b)."""
    from datagen.io import read_jsonl

    report = [r for r in read_jsonl(DATA / "report_qa.jsonl") if "copy" not in r["id"]]
    acme = [r for r in report if r["metadata"]["doc_id"] == "doc-acme-2019"]
    bolt = {r["question"]: r for r in report if r["metadata"]["doc_id"] == "doc-bolt-2019"}
    by_q = {r["question"]: r for r in acme}
    pairs: list[tuple[str, str, dict, dict]] = []
    n = 0

    def nid() -> str:
        nonlocal n
        n += 1
        return f"p{n:04d}"

    for q, alts in REWORDINGS.items():
        for alt in alts:
            pairs.append(("duplicate", "reworded question, same context and answer",
                          _mk(by_q[q], nid()), _mk(by_q[q], nid(), question=alt)))
    for r in acme:
        if r["answer"] in ANSWER_FORMS:
            pairs.append(("duplicate", "same question, answer formatted otherwise",
                          _mk(r, nid()), _mk(r, nid(), answer=ANSWER_FORMS[r["answer"]])))
        longer = {**r["context"], "text": r["context"]["text"] + " All figures are audited and in US dollars."}
        pairs.append(("duplicate", "same question and answer, context adds a sentence",
                      _mk(r, nid()), _mk(r, nid(), context=longer)))
        edited = {**r["context"], "text": r["context"]["text"].replace("15.9%", "16.9%")}
        pairs.append(("distinct", "same question, one figure of the context edited",
                      _mk(r, nid()), _mk(r, nid(), context=edited)))
        pairs.append(("distinct", "same question over another company's report",
                      _mk(r, nid()), _mk(bolt[r["question"]], nid())))
        pairs.append(("conflict", "same question and context, another answer",
                      _mk(r, nid()), _mk(r, nid(), answer=r["answer"].lstrip("-") if r["answer"].startswith("-")
                                         else "-" + r["answer"])))
    for i, a in enumerate(acme):
        for b in acme[i + 1:]:
            pairs.append(("distinct", "same context, another question", _mk(a, nid()), _mk(b, nid())))
    for qa, qb, ans in EXTRA_DISTINCT:
        pairs.append(("distinct", "same context, another question (one word or year apart)",
                      _mk(by_q[qa], nid()), _mk(by_q[qa], nid(), question=qb, answer=ans)))
    for q, alts in REWORDINGS.items():
        other = next(x for x in acme if x["question"] != q and x["answer"] != by_q[q]["answer"])
        pairs.append(("conflict", "reworded question, same context, another answer",
                      _mk(by_q[q], nid()), _mk(by_q[q], nid(), question=alts[0], answer=other["answer"])))

    # harder cases: a one-word edit of the context text; a synonym; the same words in another order
    r = by_q["What was the net income in 2019?"]
    fixed = {**r["context"], "text": r["context"]["text"].replace("partially offset", "partly offset")}
    pairs.append(("duplicate", "same question and answer, one word of the context text edited",
                  _mk(r, nid()), _mk(r, nid(), context=fixed)))
    pairs.append(("duplicate", "same question with a synonym (profit for net income)",
                  _mk(r, nid()), _mk(r, nid(), question="What was the profit in 2019?")))
    r = by_q["What was the cost of sales as a percentage of net sales in 2019?"]
    pairs.append(("distinct", "same words, other order (net sales as a percentage of cost of sales)",
                  _mk(r, nid()),
                  _mk(r, nid(), question="What was the net sales as a percentage of cost of sales in 2019?",
                      answer="160.82%")))

    credit = read_jsonl(DATA / "credit_table.jsonl")
    # an applicant's record as context text, one categorical field apart
    cols = credit[0]["context"]["table"]["columns"]
    rec = credit[0]["context"]["table"]["rows"][0]
    as_text = ". ".join(f"{c.replace('_', ' ')}: {v}" for c, v in zip(cols, rec)) + "."
    ctx_a = {"text": as_text, "table": None}
    ctx_b = {"text": as_text.replace("housing: own", "housing: rent"), "table": None}
    pairs.append(("distinct", "credit record as context text, one field apart (same label)",
                  _mk(credit[0], nid(), context=ctx_a), _mk(credit[0], nid(), context=ctx_b)))
    base = credit[:4]
    for v in credit[4:11]:
        b = next(x for x in base if sum(p != q for p, q in zip(x["context"]["table"]["rows"][0],
                                                              v["context"]["table"]["rows"][0])) == 1)
        pairs.append(("distinct", "credit applicants differing in one field (same label)" if b["answer"] == v["answer"]
                      else "credit applicants differing in one field (other label)", _mk(b, nid()), _mk(v, nid())))
    pairs.append(("duplicate", "the same credit applicant twice", _mk(credit[2], nid()), _mk(credit[11], nid())))
    # the applicant's record in the question itself (no context), one categorical field apart
    q = ("Applicant: checking <0, duration 6 months, {h} housing, age 67, credit amount 1169. Is the credit risk good "
         "or bad?")
    c0 = {**credit[0], "context": {"text": "", "table": None}}
    pairs.append(("distinct", "credit record in the question, one field apart",
                  _mk(c0, nid(), question=q.format(h="own")), _mk(c0, nid(), question=q.format(h="rented"))))
    pairs.append(("duplicate", "credit record in the question, reformatted",
                  _mk(c0, nid(), question=q.format(h="own")),
                  _mk(c0, nid(), question=q.format(h="own").replace("Applicant:", "Applicant -"))))
    return pairs


def evaluate(pairs, qvec, threshold: float, context_threshold: float) -> dict:
    from datagen.dataset.dedup import dedup_rows

    tp = fp = fn = 0
    c_tp = c_fp = c_fn = 0
    distinct_quarantined = 0
    errors = []
    for label, kind, a, b in pairs:
        vecs = np.stack([qvec[a["question"]], qvec[b["question"]]])
        res = dedup_rows([a, b], vecs, threshold, 0.985, method="exact", context_threshold=context_threshold)
        reasons = {d["reason"] for d in res.drops}
        pred = "conflict" if "conflicting_answers" in reasons else ("duplicate" if reasons else "distinct")
        sim = round(float(vecs[0] @ vecs[1]), 4)
        tp += pred == "duplicate" and label == "duplicate"
        fp += pred == "duplicate" and label != "duplicate"
        fn += pred != "duplicate" and label == "duplicate"
        c_tp += pred == "conflict" and label == "conflict"
        c_fp += pred == "conflict" and label != "conflict"
        c_fn += pred != "conflict" and label == "conflict"
        distinct_quarantined += pred == "conflict" and label == "distinct"
        if pred != label:
            errors.append({"label": label, "predicted": pred, "kind": kind, "question_cosine": sim,
                           "a": a["question"], "b": b["question"]})
    return {"threshold": threshold, "context_threshold": context_threshold,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None, "recall": round(tp / (tp + fn), 4),
            "conflict_precision": round(c_tp / (c_tp + c_fp), 4) if c_tp + c_fp else None,
            "conflict_recall": round(c_tp / (c_tp + c_fn), 4), "distinct_quarantined": distinct_quarantined,
            "false_duplicates": fp, "missed_duplicates": fn, "errors": errors}


def old_rule(pairs, embedder, threshold: float = 0.92, min_number_overlap: float = 0.8) -> dict:
    """The rule before issue 13: question + 200 context chars embedded together, figures guard only."""
    from datagen.dataset.dedup import exact_key, number_overlap, numbers
    from datagen.embed import sample_text

    texts = sorted({sample_text(r, 200) for _, _, a, b in pairs for r in (a, b)})
    vec = dict(zip(texts, embedder.encode(texts)))
    tp = fp = fn = 0
    for label, _, a, b in pairs:
        sim = float(vec[sample_text(a, 200)] @ vec[sample_text(b, 200)])
        dup = exact_key(a) == exact_key(b) or (sim >= threshold
                                                and number_overlap(numbers(a), numbers(b)) >= min_number_overlap)
        tp += dup and label == "duplicate"
        fp += dup and label != "duplicate"
        fn += (not dup) and label == "duplicate"
    return {"threshold": threshold, "min_number_overlap": min_number_overlap,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None, "recall": round(tp / (tp + fn), 4),
            "false_duplicates": fp, "missed_duplicates": fn}


def _cosines(pairs, qvec) -> dict:
    """Question-only cosines per label, over pairs whose questions differ (the embedding's margin)."""
    out = {}
    for label in ("duplicate", "distinct"):
        c = [float(qvec[a["question"]] @ qvec[b["question"]]) for lab, _, a, b in pairs
             if lab == label and a["question"] != b["question"]]
        out[label] = {"n": len(c), "min": round(min(c), 4), "median": round(float(np.median(c)), 4),
                      "max": round(max(c), 4), "at_or_above_0.92": sum(x >= 0.92 for x in c)}
    return out


def main() -> None:
    from collections import Counter

    from datagen.config import DedupConfig, EmbedderConfig
    from datagen.embed import load_embedder

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    pairs = build_pairs()
    emb = load_embedder(EmbedderConfig())
    qs = sorted({r["question"] for _, _, a, b in pairs for r in (a, b)})
    qvec = dict(zip(qs, emb.encode(qs)))
    grid = [evaluate(pairs, qvec, t, c) for t in (0.85, 0.88, 0.90, 0.92, 0.94, 0.96)
            for c in (0.90, 0.95, 0.98, 1.0)]
    dc = DedupConfig()
    default = next(g for g in grid if g["threshold"] == dc.threshold and g["context_threshold"] == dc.context_threshold)
    out = {
        "what": "precision/recall of dedup's pair rule on a labelled set of pairs (see the script's doc)",
        "embedder": emb.name, "pairs": dict(Counter(p[0] for p in pairs)),
        "kinds": dict(Counter(f"{p[0]}: {p[1]}" for p in pairs)),
        "default": {k: v for k, v in default.items()},
        "grid": [{k: v for k, v in g.items() if k != "errors"} for g in grid],
        "question_cosine": _cosines(pairs, qvec),
        "old_rule": old_rule(pairs, emb),
        "seconds": round(time.perf_counter() - t0, 1),
        "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("pairs", "question_cosine", "old_rule", "seconds")}, indent=2))
    print(json.dumps({k: v for k, v in default.items() if k != "errors"}), "errors:", len(default["errors"]))
    for e in default["errors"]:
        print("  ", e)


if __name__ == "__main__":
    main()
