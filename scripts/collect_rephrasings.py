"""Collect the packaged model's real rephrasing candidates, for labelling by hand.

    .venv/bin/python scripts/collect_rephrasings.py --split test [--profile demo] [--prompt rephrase_base_strict] \
        [--out .cache/rephrase_pool_test.jsonl]

The questions come from the four kinds of source the augment stage rephrases: the demo profile's market
questions, the sample source-QA set, the knowledge facts and the classification instructions. Each distinct
question goes to the ``calibration`` or the ``test`` split by a hash of its text, so the two never share
a question; the split's questions are spread over templates (one question per template first).

Every question gets the requests the augment stage sends it with the demo profile's settings (the base-model
few-shot document, ``k`` x ``candidates`` candidates in round 0 and ``candidates`` more, one slot's worth,
hotter, in round 1, the same seeds), through the configured local provider. Every parsed candidate is
written with the validators' verdict of the time, and the seconds its request took; labels are added by
hand afterwards (``faithful``, ``drift``) and the labelled file is what ``bench_rephrase_precision.py``
reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {  # kind -> (file under data/raw, or None for the market generator)
    "market": None,
    "source_qa": "data/raw/sample_source_qa.jsonl",
    "knowledge": "data/raw/knowledge_facts.jsonl",
    "classification": "data/raw/headline_sentiment.jsonl",
}
PER_KIND = {"calibration": {"market": 4, "source_qa": 4, "knowledge": 2, "classification": 2},
            "test": {"market": 12, "source_qa": 14, "knowledge": 8, "classification": 4}}


def split_of(question: str) -> str:
    """``calibration`` or ``test``, by the question's text alone (stable across runs and files)."""
    return "test" if int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 2 else "calibration"


def template_of(question: str) -> str:
    """The question with names, tickers and figures masked: questions of one template share it."""
    t = re.sub(r"\d[\d,.:%-]*", "#", question)
    t = re.sub(r"\b[A-Z][A-Za-z&.'-]*\b", "N", t)
    return re.sub(r"(?:N\s*)+", "N ", t)


def pick(rows: list[dict], n: int) -> list[dict]:
    """``n`` rows, one per template first (templates in hash order), then a second per template, ..."""
    by_t: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: hashlib.sha256(r["question"].encode()).hexdigest()):
        by_t[template_of(r["question"])].append(r)
    queues = [by_t[t] for t in sorted(by_t, key=lambda t: hashlib.sha256(t.encode()).hexdigest())]
    out: list[dict] = []
    i = 0
    while len(out) < n and any(i < len(q) for q in queues):
        out += [q[i] for q in queues if i < len(q)][: n - len(out)]
        i += 1
    return out


def questions(cfg, split: str) -> list[dict]:
    from datagen.io import read_jsonl
    from datagen.sources.market import load_market
    from datagen.sources.market_qa import build_market_qa

    out = []
    for kind, path in SOURCES.items():
        if path is None:
            mc = cfg.sources.market.model_copy(deep=True)
            mc.questions_per_type = {k: 6 for k in mc.questions_per_type}
            rows = [dict(r) if isinstance(r, dict) else r.model_dump() for r in build_market_qa(load_market(mc), mc)]
        else:
            rows = list(read_jsonl(ROOT / path))
        seen, mine = set(), []
        for r in rows:
            q = " ".join(str(r["question"]).split())
            if q not in seen and split_of(q) == split:
                seen.add(q)
                # a classification instruction is its own kind, whichever file it comes from
                mine.append({**r, "question": q, "source_kind": "classification" if r.get("labels") else kind,
                             "source_file": path or "market simulator (demo profile)"})
        out += pick(mine, PER_KIND[split][kind])
    return out


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from datagen.augmentation import rephrase
    from datagen.augmentation.validators import RephraseChecks, validate_rephrasing
    from datagen.config import REPHRASE_MAX_TEMPERATURE, load_config
    from datagen.embed import load_embedder
    from datagen.llm import get_provider
    from datagen.llm.base import ChatRequest
    from datagen.llm.tasks import resolve_prompt_format, seed_of, temperature_at
    from datagen.prompts import load_prompt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo", help="the profile whose augment provider and settings are used")
    ap.add_argument("--split", choices=["calibration", "test"], required=True)
    ap.add_argument("--prompt", default=None, help="a base-model document under prompts/ to try in place of the "
                    "profile's own prompt (base format: the local provider only)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=2, help="1: round 0 only (prompt comparisons on calibration)")
    ap.add_argument("--shard", default="0/1", help="i/n: every n-th question from the i-th (parallel collection)")
    args = ap.parse_args()

    cfg = load_config(profile=args.profile, root=ROOT)
    aug = cfg.augment
    i, n = map(int, args.shard.split("/"))
    rows = questions(cfg, args.split)[i::n]
    fmt = "base" if args.prompt else resolve_prompt_format(aug.prompt_format, get_provider(cfg, aug.provider),
                                                           "augment.prompt_format")
    prompt = load_prompt(args.prompt) if args.prompt else rephrase.prompt_for(0, fmt)
    provider = get_provider(cfg, aug.provider)
    embedder = load_embedder(cfg.dedup.embedder)
    checks = RephraseChecks.from_config(aug)
    print(f"{len(rows)} questions ({args.split}), prompt {prompt.ref}", flush=True)

    records = []
    for r_i, row in enumerate(rows):
        row = {**row, "id": str(row.get("id") or hashlib.sha256(row["question"].encode()).hexdigest()[:12])}
        seen: set[str] = set()
        for attempt, n in ((0, aug.k * aug.candidates), (1, aug.candidates))[: args.rounds]:
            messages = ([{"role": "text", "content": prompt.render(question=row["question"])}] if args.prompt
                        else rephrase.format_input(row, attempt, fmt))
            req = ChatRequest(messages=tuple(messages),
                              temperature=temperature_at(aug.temperature, attempt, rephrase.HEAT,
                                                         REPHRASE_MAX_TEMPERATURE),
                              max_tokens=rephrase.max_tokens_for(row["question"], aug.max_tokens),
                              seed=seed_of(row["id"], 0, attempt), stop=rephrase.STOP, n=n, key=row["id"])
            t0 = time.perf_counter()
            res = provider.generate_batch([req], desc="collect")[0]
            secs = time.perf_counter() - t0
            cands = [rephrase.format_output(t, row)["question"] for t in res.candidates()]
            parsed = [c for c in cands if c]
            cos = embedder.encode([row["question"]] + parsed) if parsed else None
            for j, c in enumerate(parsed):
                key = " ".join(c.lower().split())
                if key in seen:
                    continue
                seen.add(key)
                cosine = float((cos[0] * cos[j + 1]).sum())
                v = validate_rephrasing(row, c, cosine=cosine, checks=checks)
                v0 = validate_rephrasing(row, c, cosine=cosine, checks=dataclasses.replace(checks, drift=False))
                records.append({
                    "split": args.split, "source_kind": row["source_kind"], "source_file": row["source_file"],
                    "source_id": row["id"], "category": row.get("category"), "original": row["question"],
                    "answer": row.get("answer"), "labels": row.get("labels"),
                    "metadata": {"answer_values": (row.get("metadata") or {}).get("answer_values")},
                    "candidate": c, "round": attempt, "prompt": prompt.ref,
                    "model": cfg.llm.providers[aug.provider].model_path, "cosine": round(cosine, 4),
                    "request_seconds": round(secs, 2), "request_candidates": n, "request_parsed": len(parsed),
                    "verdict_without_drift_checks": "kept" if v0.ok else v0.reason,
                    "verdict_at_collection": "kept" if v.ok else v.reason})
        print(f"[{r_i + 1}/{len(rows)}] {row['source_kind']}: {sum(1 for x in records if x['source_id'] == row['id'])} "
              f"distinct candidates", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in records))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
