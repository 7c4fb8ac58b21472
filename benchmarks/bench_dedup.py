"""Dedup benchmark: pair search time and recall, embedding throughput, threshold calibration.

    .venv/bin/python benchmarks/bench_dedup.py --sections calibrate embed search --sizes 10000 100000
    nohup .venv/bin/python benchmarks/bench_dedup.py --sections search --sizes 1000000 > bench_1m.log &

Sections (each merged into ``benchmarks/results/dedup.json`` as it finishes, so runs can be split):

- ``search``: all pairs with cosine >= 0.9 among n synthetic clustered 384-d vectors (topics plus
  injected near-duplicates, cosines spread across the threshold). Exact blocked matmul (torch) vs
  the partitioned faiss IVF search used above ``dedup.partition_min_rows``; pair recall against exact.
  At 1M exact search is too slow (~70 min here): recall is measured on a random sample of queries
  (every pair involving a sampled row, found by exact search of that row against all n).
- ``embed``: the packaged MiniLM on generated finance questions with short contexts. Plain
  ``SentenceTransformer.encode`` (defaults) vs :class:`datagen.embed.SentenceTransformerEmbedder`,
  in the same process: (a) cold, unique texts; (b) the pipeline's workload, where dedup and then split
  embed the same rows (with some exact duplicates) and the second pass hits the cache. Also the
  search recall on these real embeddings.
- ``calibrate``: cosine of hand-written duplicate and non-duplicate question pairs under MiniLM; the
  threshold that separates them (the ``dedup.threshold`` default).
- ``templated``: n credit applicants under three phrasings of one question (the normal case for
  classification data: every question pair is above the threshold), with planted exact copies, copies
  with one field changed and copies with the other label. Question embeddings precomputed (MiniLM), as
  in ``search``; timed: dedup's candidate search and pair checks (:func:`dedup_rows`) and the split's
  :func:`leakage_check` over a random 80/10/10 split of the kept rows. At the smallest size the
  decisions are also compared with checking every pair. ``templated_100k_s`` is the 100,000-row total.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "benchmarks" / "results" / "dedup.json"
THRESHOLD = 0.9


def _save(section: str, key: str | None, value) -> None:
    """``data[section][key] = value`` in the results file (``data[section] = value`` without a key)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.setdefault("machine", {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "note": "shared by 6 engineers; timings are under load"})
    if key is None:
        data[section] = value
    else:
        data.setdefault(section, {})[key] = value
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)
    print(section, key, json.dumps(value), flush=True)


# ----------------------------------------------------------------------------- search
def synthetic(n: int, d: int = 384, seed: int = 0, dup_frac: float = 0.1) -> np.ndarray:
    """Topics of ~100 rows (pairwise cosine ~0.6) plus ``dup_frac`` near-copies (cosine ~0.89-0.995)."""
    rng = np.random.default_rng(seed)
    n_topics = max(1, n // 100)
    centres = rng.standard_normal((n_topics, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), np.float32)
    step = 100_000
    for a in range(0, n, step):
        b = min(a + step, n)
        t = rng.integers(0, n_topics, b - a)
        x[a:b] = centres[t] + rng.standard_normal((b - a, d), dtype=np.float32) * np.float32(0.8 / np.sqrt(d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n_dup = int(n * dup_frac)
    dst = rng.choice(n, n_dup, replace=False)
    src = rng.integers(0, n, n_dup)
    tau = rng.uniform(0.1, 0.5, n_dup).astype(np.float32)[:, None]
    x[dst] = x[src] + tau * rng.standard_normal((n_dup, d), dtype=np.float32) / np.float32(np.sqrt(d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _pair_set(p) -> set[tuple[int, int]]:
    return set(zip(p.i.tolist(), p.j.tolist()))


def sampled_recall(x: np.ndarray, pairs, n_queries: int = 2000, seed: int = 1) -> dict:
    """Recall over all pairs involving ``n_queries`` random rows (exact: each query against all n)."""
    import torch

    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(len(x), n_queries, replace=False))
    xt = torch.from_numpy(x)
    truth = set()
    for a in range(0, len(q), 256):
        qs = q[a:a + 256]
        s = torch.from_numpy(x[qs]) @ xt.T
        ii, jj = torch.nonzero(s >= THRESHOLD, as_tuple=True)
        for i, j in zip(qs[ii.numpy()].tolist(), jj.tolist()):
            if i != j:
                truth.add((min(i, j), max(i, j)))
    qset = set(q.tolist())
    found = {(i, j) for i, j in zip(pairs.i.tolist(), pairs.j.tolist()) if i in qset or j in qset}
    hit = len(truth & found)
    return {"queries": n_queries, "true_pairs": len(truth), "found": hit,
            "recall": round(hit / max(len(truth), 1), 5)}


def bench_search(n: int, nprobe: int, exact_max: int) -> None:
    from datagen.dataset.dedup import default_nlist, pairs_exact, pairs_partitioned

    t0 = time.perf_counter()
    x = synthetic(n)
    gen_s = time.perf_counter() - t0
    out: dict = {"n": n, "dim": x.shape[1], "threshold": THRESHOLD, "generate_s": round(gen_s, 1)}
    t0 = time.perf_counter()
    part = pairs_partitioned(x, THRESHOLD, nprobe=nprobe)
    out["partitioned"] = {"seconds": round(time.perf_counter() - t0, 2), "pairs": len(part),
                          "nlist": default_nlist(n), "nprobe": nprobe, "library": "faiss IndexIVFFlat"}
    if n <= exact_max:
        t0 = time.perf_counter()
        ex = pairs_exact(x, THRESHOLD)
        out["exact"] = {"seconds": round(time.perf_counter() - t0, 2), "pairs": len(ex),
                        "library": "torch blocked matmul"}
        hit = len(_pair_set(ex) & _pair_set(part))
        out["partitioned"]["recall"] = round(hit / max(len(ex), 1), 5)
        out["speedup_vs_exact"] = round(out["exact"]["seconds"] / out["partitioned"]["seconds"], 2)
    else:
        out["partitioned"]["recall_sampled"] = sampled_recall(x, part)
        out["partitioned"]["recall"] = out["partitioned"]["recall_sampled"]["recall"]
        out["exact"] = {"seconds_extrapolated_from_100k": "see n=100000 x (n/100k)^2"}
    _save("search", str(n), out)


# ----------------------------------------------------------------------------- embed
TICKERS = ["ACME", "BOLT", "CRUX", "DYNA", "EONX", "FJORD", "GLINT", "HALO", "IONIC", "JADE"]
METRICS = ["total return", "annualised volatility", "maximum drawdown", "average daily volume",
           "closing price change", "Sharpe ratio", "credit spread", "default probability"]
PERIODS = ["5", "10", "20", "30", "60"]
FRAMES = ["What was {t}'s {m} over the last {p} trading days?",
          "Over the past {p} trading days, what {m} did {t} show?",
          "Compute the {m} of {t} for the {p}-day window.",
          "Given the table, report {t}'s {m} across {p} sessions.",
          "How large was the {m} for {t} in the most recent {p} days?"]


def corpus(n: int, seed: int = 0, exact_dup_frac: float = 0.05) -> list[str]:
    """Questions + a short table context, as ``datagen.embed.sample_text`` builds them."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        t, m, p = rng.choice(TICKERS), rng.choice(METRICS), rng.choice(PERIODS)
        q = rng.choice(FRAMES).format(t=t, m=m, p=p)
        d0, c0, c1 = rng.randint(1, 28), rng.uniform(20, 400), rng.uniform(20, 400)
        ctx = f"Date | Close | Volume ; 2024-03-{d0:02d} | {c0:.2f} | {rng.randint(1, 99)}00 ; " \
              f"2024-04-{d0:02d} | {c1:.2f} | {rng.randint(1, 99)}00"
        out.append(f"{q}\n{ctx}")
    for k in rng.sample(range(n), int(n * exact_dup_frac)):
        out[k] = out[rng.randrange(n)]
    return out


def bench_embed(n: int) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from datagen.config import EmbedderConfig
    from datagen.dataset.dedup import pairs_exact, pairs_partitioned
    from datagen.embed import SentenceTransformerEmbedder
    from lm.packaged import resolve_model_path

    texts = corpus(n)
    plain = SentenceTransformer(str(resolve_model_path("packaged:all-minilm-l6-v2")), device="cpu")
    ours = SentenceTransformerEmbedder(EmbedderConfig(), cache_dir=None, show_progress=False)
    res: dict = {"n": n, "unique_texts": len(set(texts)), "torch_threads": torch.get_num_threads(),
                 "plain": "SentenceTransformer.encode(texts, normalize_embeddings=True), defaults "
                          "(batch 32, max_seq_length 256)"}
    # warm-up both (first call pays one-off costs)
    plain.encode(texts[:64])
    ours._encode_new(texts[:64])
    # (a) cold: unique texts only, no cache involved; alternate to share the machine's load fairly
    uniq = sorted(set(texts))
    half = len(uniq) // 2
    tp = to = 0.0
    for chunk in (uniq[:half], uniq[half:]):
        t0 = time.perf_counter()
        a = plain.encode(chunk, normalize_embeddings=True)
        tp += time.perf_counter() - t0
        t0 = time.perf_counter()
        b = ours._encode_new(chunk)
        to += time.perf_counter() - t0
    cos = (a * b).sum(1)
    res["cold_unique"] = {"plain_per_s": round(len(uniq) / tp, 1), "ours_per_s": round(len(uniq) / to, 1),
                          "ratio": round(tp / to, 2), "min_cosine_vs_plain": round(float(cos.min()), 5)}
    # (b) pipeline workload: dedup embeds all rows, split embeds them again
    t0 = time.perf_counter()
    plain.encode(texts, normalize_embeddings=True)
    ref = plain.encode(texts, normalize_embeddings=True)
    tp = time.perf_counter() - t0
    fresh = SentenceTransformerEmbedder(EmbedderConfig(), cache_dir=None, show_progress=False)
    t0 = time.perf_counter()
    fresh.encode(texts)
    vecs = fresh.encode(texts)
    to = time.perf_counter() - t0
    res["pipeline_dedup_then_split"] = {
        "texts_requested": 2 * n, "texts_encoded": fresh.stats["encoded"],
        "plain_s": round(tp, 2), "ours_s": round(to, 2), "ratio": round(tp / to, 2),
        "min_cosine_vs_plain": round(float((ref * vecs).sum(1).min()), 5)}
    # search recall on real embeddings
    ex = pairs_exact(vecs, THRESHOLD)
    for nprobe in (4, 16):
        pa = pairs_partitioned(vecs, THRESHOLD, nprobe=nprobe)
        hit = len(_pair_set(ex) & _pair_set(pa))
        res[f"search_real_recall_nprobe{nprobe}"] = {"exact_pairs": len(ex), "found": hit,
                                                     "recall": round(hit / max(len(ex), 1), 5)}
    _save("embed", str(n), res)


# ----------------------------------------------------------------------------- calibrate
DUPES = [  # (a, b): the same question about the same data, reworded or reformatted
    ("What was ACME's total return over the last 10 trading days?",
     "Over the last 10 trading days, what was ACME's total return?"),
    ("What was ACME's total return over the last 10 trading days?",
     "what was ACME's total return over the last ten trading days"),
    ("Classify BOLT's volatility as low, medium or high.",
     "Classify the volatility of BOLT as low, medium, or high."),
    ("What is the maximum drawdown of CRUX in the window?",
     "What is CRUX's maximum drawdown in this window?"),
    ("How much did DYNA's closing price change between the first and last day?",
     "By how much did DYNA's closing price change from the first to the last day?"),
    ("Which bond in the table has the widest credit spread?",
     "Which bond in the table shows the widest credit spread?"),
    ("What is the portfolio's expected loss given the PD and LGD above?",
     "Given the PD and LGD above, what is the portfolio's expected loss?"),
    ("Compute the debt-to-equity ratio of the company.", "Compute the company's debt to equity ratio."),
    ("What was the average daily volume of EONX?", "What was EONX's average daily volume?"),
    ("Is the loan's interest coverage ratio above 3?", "Is the interest coverage ratio of the loan above 3?"),
]
NON_DUPES = [  # similar wording, different question: must not be merged
    ("What was ACME's total return over the last 10 trading days?",
     "What was BOLT's total return over the last 10 trading days?"),
    ("What was ACME's total return over the last 10 trading days?",
     "What was ACME's total return over the last 30 trading days?"),
    ("What was ACME's total return over the last 10 trading days?",
     "What was ACME's annualised volatility over the last 10 trading days?"),
    ("Classify BOLT's volatility as low, medium or high.", "Classify BOLT's credit risk as low, medium or high."),
    ("What is the maximum drawdown of CRUX in the window?", "What is the maximum gain of CRUX in the window?"),
    ("Which bond in the table has the widest credit spread?",
     "Which bond in the table has the narrowest credit spread?"),
    ("What is the portfolio's expected loss given the PD and LGD above?",
     "What is the portfolio's unexpected loss given the PD and LGD above?"),
    ("Compute the debt-to-equity ratio of the company.", "Compute the current ratio of the company."),
    ("What was the average daily volume of EONX?", "What was the average closing price of EONX?"),
    ("Is the loan's interest coverage ratio above 3?", "Is the loan's interest coverage ratio below 1.5?"),
]


def bench_calibrate() -> None:
    from datagen.config import EmbedderConfig
    from datagen.embed import SentenceTransformerEmbedder

    emb = SentenceTransformerEmbedder(EmbedderConfig(), cache_dir=None, show_progress=False)

    def sims(pairs):
        a = emb.encode([p[0] for p in pairs])
        b = emb.encode([p[1] for p in pairs])
        return (a * b).sum(1)

    sd, sn = sims(DUPES), sims(NON_DUPES)
    grid = np.round(np.arange(0.80, 1.0, 0.01), 2)
    table = []
    for t in grid:
        tp, fp = int((sd >= t).sum()), int((sn >= t).sum())
        prec = tp / max(tp + fp, 1)
        rec = tp / len(sd)
        table.append({"threshold": float(t), "dup_recall": round(rec, 3), "precision": round(prec, 3),
                      "f1": round(2 * prec * rec / max(prec + rec, 1e-9), 3)})
    _save("calibration", "minilm_question_pairs", {
        "duplicates": len(DUPES), "non_duplicates": len(NON_DUPES),
        "dup_cosines": sorted(round(float(v), 4) for v in sd),
        "non_dup_cosines": sorted(round(float(v), 4) for v in sn),
        "max_non_dup": round(float(sn.max()), 4), "min_dup": round(float(sd.min()), 4),
        "grid": table})


def bench_calibrate_source_qa() -> None:
    """The shipped source QA file: 165 distinct items, many sharing one question template over other
    figures. Every cross-item pair is a non-duplicate: count how many each threshold would merge, with
    and without dedup's figures guard (``min_number_overlap``)."""
    from datagen.config import DedupConfig, EmbedderConfig
    from datagen.dataset.dedup import number_overlap, numbers
    from datagen.embed import SentenceTransformerEmbedder, sample_text
    from datagen.io import read_jsonl

    rows = read_jsonl(ROOT / "data" / "raw" / "sample_source_qa.jsonl")
    for r in rows:
        r.setdefault("context", {})
    dc = DedupConfig()
    emb = SentenceTransformerEmbedder(EmbedderConfig(), cache_dir=None, show_progress=False)
    v = emb.encode([sample_text(r, dc.context_chars) for r in rows])
    s = v @ v.T
    iu = np.triu_indices(len(rows), 1)
    sims = s[iu]
    nums = [numbers(r) for r in rows]
    ov = np.array([number_overlap(nums[i], nums[j]) for i, j in zip(*iu)])
    # duplicates: each item vs a copy with the question reworded (hand paraphrase prefixes), same context
    para = [{**r, "question": "Please answer: " + r["question"].rstrip("?") + ", based on the data?"} for r in rows]
    vp = emb.encode([sample_text(r, dc.context_chars) for r in para])
    dsim = (v * vp).sum(1)
    grid = []
    for t in (0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98):
        grid.append({"threshold": t, "non_dup_pairs_merged_no_guard": int((sims >= t).sum()),
                     "non_dup_pairs_merged_with_guard": int(((sims >= t) & (ov >= dc.min_number_overlap)).sum()),
                     "reworded_copies_caught": round(float((dsim >= t).mean()), 4)})
    _save("calibration", "source_qa_items", {
        "items": len(rows), "cross_item_pairs": int(len(sims)), "context_chars": dc.context_chars,
        "min_number_overlap": dc.min_number_overlap, "max_cross_item_cosine": round(float(sims.max()), 4),
        "reworded_copy_cosine_min": round(float(dsim.min()), 4), "grid": grid})


# ----------------------------------------------------------------------------- templated questions
def templated_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` applicants (the realistic credit row with its amount, duration and age redrawn) under three
    phrasings of one question, then n/20 copies: exact, one field changed, the other label."""
    import copy

    from datagen.io import read_jsonl

    base = read_jsonl(ROOT / "tests" / "data" / "realistic" / "credit_table.jsonl")[0]
    rng = random.Random(seed)
    qs = ["Based on the applicant's record, is the credit risk good or bad?",
          "Is this applicant a good or a bad credit risk?", "Would you rate this applicant's credit risk good or bad?"]
    rows = []
    for i in range(n + n // 20):
        if i < n:
            r = copy.deepcopy(base)
            cells = r["context"]["table"]["rows"][0]
            cells[1], cells[4] = str(rng.randint(4, 72)), str(rng.randint(250, 20000))
            cells[9] = str(rng.randint(19, 75))
            r["question"], label = rng.choice(qs), rng.choice(["good", "bad"])
        else:
            r = copy.deepcopy(rows[rng.randrange(n)])
            label = r["answer"]
            if i % 3 == 1:
                cells = r["context"]["table"]["rows"][0]
                cells[10] = "rent" if cells[10] != "rent" else "own"
            elif i % 3 == 2:
                label = "bad" if label == "good" else "good"
        r["id"] = r["group_id"] = f"t{i:07d}"
        r["answer"], r["metadata"] = label, {**r["metadata"], "answer_label": label}
        rows.append(r)
    return rows


def bench_templated(sizes: list[int]) -> None:
    from lm.causal_lm import vector_flags
    from datagen.config import EmbedderConfig
    from datagen.dataset import dedup as dd
    from datagen.dataset.split import leakage_check
    from datagen.embed import load_embedder

    emb = load_embedder(EmbedderConfig())
    thr, within, ctx, overlap = 0.92, 0.985, 0.98, 0.8
    for n in sorted(sizes):
        rows = templated_rows(n)
        texts = [dd.question_text(r) for r in rows]
        uniq = sorted(set(texts))
        vu = emb.encode(uniq)
        vecs = vu[[uniq.index(t) for t in texts]]
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        res = dd.dedup_rows(rows, vecs, thr, within, context_threshold=ctx)
        t_dedup = time.perf_counter() - t0
        alive = {r["id"] for r in res.kept}
        keep = [k for k, r in enumerate(rows) if r["id"] in alive]
        rng = np.random.default_rng(0)
        side = rng.choice(3, size=len(keep), p=[0.8, 0.1, 0.1])
        names = ("train", "validation", "test")
        split_rows = {s: [rows[keep[k]] for k in np.flatnonzero(side == i)] for i, s in enumerate(names)}
        split_vecs = {s: vecs[[keep[k] for k in np.flatnonzero(side == i)]] for i, s in enumerate(names)}
        t0 = time.perf_counter()
        leak = leakage_check(split_vecs, thr, rows=split_rows, min_number_overlap=overlap)
        t_leak = time.perf_counter() - t0
        out = {"rows": len(rows), "every_pair": len(rows) * (len(rows) - 1) // 2, "candidate_pairs": res.pairs,
               "drops": res.counts, "dedup_s": round(t_dedup, 2), "leakage_check_s": round(t_leak, 2),
               "total_s": round(t_dedup + t_leak, 2), "leakage": leak,
               "loadavg_start": load0, "loadavg_end": os.getloadavg(), "cpu_flags": vector_flags(),
               "date": time.strftime("%Y-%m-%d")}
        if n == min(sizes) and n <= 2000:  # the same decisions as checking every pair
            every = {(a, b) for a in range(len(rows)) for b in range(a + 1, len(rows))}
            real = dd._candidates
            dd._candidates = lambda *a, every=every, **k: (every, "exact")
            try:
                t0 = time.perf_counter()
                slow = dd.dedup_rows(rows, vecs, thr, within, context_threshold=ctx)
                out["every_pair_dedup_s"] = round(time.perf_counter() - t0, 2)
            finally:
                dd._candidates = real
            out["same_decisions_as_every_pair"] = slow.kept == res.kept and slow.drops == res.drops
        _save("templated", str(n), out)
        if n == 100_000:
            _save("templated_100k_s", None, out["total_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=["calibrate", "embed", "search"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    ap.add_argument("--embed-n", type=int, default=2000)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--exact-max", type=int, default=100_000)
    args = ap.parse_args()
    if "calibrate" in args.sections:
        bench_calibrate()
        bench_calibrate_source_qa()
    if "embed" in args.sections:
        bench_embed(args.embed_n)
    if "search" in args.sections:
        for n in args.sizes:
            bench_search(n, args.nprobe, args.exact_max)
    if "templated" in args.sections:
        bench_templated(args.sizes)


if __name__ == "__main__":
    main()
