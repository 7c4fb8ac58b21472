"""Precision of the rephrasings finsynth keeps, on the packaged model's real output labelled by hand.

    .venv/bin/python benchmarks/bench_rephrase_precision.py [--data tests/data/rephrase_real.jsonl]
        [--out benchmarks/results/rephrase_precision.json]

The data is every distinct candidate the packaged Gemma-3-270M wrote for the questions of one split
(``scripts/collect_rephrasings.py``: the augment stage's requests with the demo profile's settings, round 0
and round 1), each labelled by hand ``faithful`` true/false with the kind of ``drift``. Candidates that the
validators reject on a fact (a lost figure, date, ticker or name; not a question; the answer given away)
carry no label unless they were sampled for labelling: no validator setting keeps them.

The augment loop itself (:func:`datagen.augmentation.rephrase.rephrase_rows`: validators, similarity band,
most-different picks, a second round for empty slots) runs over those candidates as a provider that
replays them, once with every validator and once without the meaning-drift checks. Reported per source
kind and overall: precision of what is kept (faithful / kept, 95% CI from a bootstrap over source
questions), keep rate (kept / slots), seconds of generation per kept rephrasing (the requests' own
times, recorded at collection), and the drift checks' decisions against the labels over every labelled
candidate. Every kept candidate must be labelled; an unlabelled one is an error naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ReplayProvider:
    """An LLM provider that answers each rephrase request with the candidates recorded for its item and
    round (the request key is ``<row id>#<slots>@<round>``). A round with no record answers nothing."""

    name, model, kind = "replay", "recorded", "local"

    def __init__(self, pool: dict[tuple[str, int], list[str]]):
        from datagen.llm.base import Usage

        self.pool, self.usage = pool, Usage()

    def generate_batch(self, requests, *, desc: str = "llm"):
        from datagen.llm.base import LLMResult

        out = []
        for req in requests:
            row_id, attempt = req.key.split("#")[0], int(req.key.rsplit("@", 1)[1])
            texts = self.pool.get((row_id, attempt), [])[: req.n]
            out.append(LLMResult(ok=True, text=texts[0] if texts else "", texts=list(texts) or [""]))
        return out


# How the figures came about, recorded with them (facts of the collection and labelling, not of this run)
CONDITIONS = {
    "collection": "scripts/collect_rephrasings.py on the packaged model through the local provider, 2 processes of "
                  "1 thread each beside other jobs (1-min load 5-7 on 2 cores, AVX2 host): generation seconds are "
                  "inflated against a quiet machine",
    "labelling": "by hand, one engineer, faithful = a reader takes it as asking exactly what the original asks, "
                 "with the same answer; awkward but equivalent wording counts as faithful",
    "settings_fixed_before_test": "demo profile as committed: prompt rephrase_base (chosen on calibration), "
                                  "k=3, 6 candidates, 2 rounds, temperature 0.7 +0.2 per round, content limits 1/1 "
                                  "(chosen on calibration by the rule in calibration.content_limits_rule)",
    "ci": "95% percentile bootstrap, 2000 resamples of source questions (a question's rephrasings together); "
          "the test's 34 distinct questions are 34 distinct templates (names and figures masked), one per "
          "template by construction, so resampling questions resamples templates",
    "seeds": "one collection: each request uses the seed the augment stage derives from the item and round; "
             "no resampling over sampling seeds",
    "disclosures": [
        "the content-word limits (check_content) were added after an interim look at part of the test labels "
        "(candidate-level precision ~0.5 with the other drift checks); their values were then chosen on the "
        "calibration split by the rule in calibration.content_limits_rule",
        "the whole-word fix for key terms ('Report' is not 'repo') was found in the test outputs; it only "
        "un-rejects candidates, each of which is labelled",
    ],
}


def cpu_flags() -> list[str]:
    try:
        words = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return []
    return sorted(w for w in words if w in {"avx", "avx2", "fma", "f16c"} or w.startswith(("avx512", "amx")))


def precision_stats(kept: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """faithful / kept with a bootstrap CI over source questions (the unit a rephrasing generalises from)."""
    from training.aggregate import bootstrap_ci

    vals = [float(k["faithful"]) for k in kept]
    return {"kept": len(vals), "faithful": int(sum(vals)),
            "precision": round(float(np.mean(vals)), 4) if vals else None,
            "ci": [round(x, 4) for x in bootstrap_ci(vals, n_boot, seed, groups=[k["source_id"] for k in kept])]
            if vals else None}


def run_loop(rows: list[dict], pool: dict, labels: dict, embedder, checks, aug) -> list[dict]:
    """The augment loop over the recorded candidates; each kept rephrasing joined with its label."""
    from datagen.augmentation.rephrase import rephrase_rows

    res = rephrase_rows(rows, ReplayProvider(pool), embedder, k=aug.k, max_attempts=aug.max_attempts,
                        temperature=aug.temperature, max_tokens=aug.max_tokens, checks=checks,
                        candidates=aug.candidates, prompt_format="base")
    out = []
    for r in res.kept:
        src = r["metadata"]["rephrase_of"]
        lab = labels.get((src, r["question"]))
        if lab is None or lab.get("faithful") is None:
            raise SystemExit(f"unlabelled kept candidate for {src}: {r['question']!r} (label it in the data file)")
        out.append({**lab, "attempt": r["metadata"]["rephrase_attempt"]})
    return out


def calibration(path: Path, arms: dict) -> dict:
    """What the prompt and the drift checks were chosen on: per prompt, the labelled candidates each validator
    setting passes and how many of them are faithful (candidate level: every passing candidate, no slots)."""
    from datagen.augmentation.validators import validate_rephrasing
    from datagen.io import read_jsonl

    recs = [x for x in read_jsonl(path) if x.get("faithful") is not None]
    out: dict = {"data": str(path.relative_to(ROOT)), "labelled": len(recs),
                 "source_questions": len({x["original"] for x in recs}), "by_prompt": {}}
    for name in sorted({x["prompt"]["name"] for x in recs}):
        mine = [x for x in recs if x["prompt"]["name"] == name]
        out["by_prompt"][name] = {"prompt": mine[0]["prompt"]}
        for arm, checks in arms.items():
            passed = [x for x in mine if validate_rephrasing(
                {"question": x["original"], "answer": x.get("answer"), "labels": x.get("labels"),
                 "metadata": x.get("metadata") or {}}, x["candidate"], cosine=x["cosine"], checks=checks).ok]
            out["by_prompt"][name][arm] = {"passing": len(passed), "faithful": sum(x["faithful"] for x in passed),
                                           "precision": round(sum(x["faithful"] for x in passed) / len(passed), 4)
                                           if passed else None}
    # the content limits: every setting on the calibration split (the prompt the pipeline ships); the rule,
    # fixed before the test run: highest precision, ties to the setting that keeps more
    grid = []
    mine = [x for x in recs if x["prompt"]["name"] == "rephrase_base"]
    for mn in (0, 1, 2, None):
        for md in (0, 1, 2, 3, None):
            checks = dataclasses.replace(arms["validators"], max_new_words=mn, max_dropped_words=md)
            passed = [x for x in mine if validate_rephrasing(
                {"question": x["original"], "answer": x.get("answer"), "labels": x.get("labels"),
                 "metadata": x.get("metadata") or {}}, x["candidate"], cosine=x["cosine"], checks=checks).ok]
            grid.append({"max_new_words": mn, "max_dropped_words": md, "passing": len(passed),
                         "precision": round(sum(x["faithful"] for x in passed) / len(passed), 4) if passed else None})
    best = max(grid, key=lambda g: (g["precision"] or 0, g["passing"]))
    out["content_limits_grid"] = grid
    out["content_limits_chosen"] = {k: best[k] for k in ("max_new_words", "max_dropped_words")}
    out["content_limits_rule"] = "highest calibration precision, ties to the setting that keeps more"
    return out


def main(argv: list[str] | None = None) -> dict:
    from datagen.augmentation.validators import RephraseChecks, validate_rephrasing
    from datagen.config import load_config
    from datagen.embed import load_embedder
    from datagen.io import read_jsonl, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo", help="the profile whose augment provider and settings are used")
    ap.add_argument("--data", type=Path, default=ROOT / "tests/data/rephrase_real.jsonl")
    ap.add_argument("--calibration", type=Path, default=ROOT / "tests/data/rephrase_real_calibration.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/rephrase_precision.json")
    args = ap.parse_args(argv)

    t_start, load_start = time.perf_counter(), os.getloadavg()
    cfg = load_config(profile=args.profile, root=ROOT)
    aug = cfg.augment
    recs = list(read_jsonl(args.data))
    pool: dict[tuple[str, int], list[str]] = defaultdict(list)
    labels: dict[tuple[str, str], dict] = {}
    rows: dict[str, dict] = {}
    seconds: dict[tuple[str, int], float] = {}
    for x in recs:
        pool[(x["source_id"], x["round"])].append(x["candidate"])
        labels[(x["source_id"], x["candidate"])] = x
        seconds[(x["source_id"], x["round"])] = x["request_seconds"]
        rows.setdefault(x["source_id"], {"id": x["source_id"], "group_id": x["source_id"], "question": x["original"],
                                         "answer": x.get("answer"), "labels": x.get("labels"),
                                         "category": x["source_kind"], "metadata": x.get("metadata") or {}})
    embedder = load_embedder(cfg.dedup.embedder)
    full = RephraseChecks.from_config(aug)
    arms = {"validators": full,
            "without_content_limits": dataclasses.replace(full, max_new_words=None, max_dropped_words=None),
            "without_drift_checks": dataclasses.replace(full, drift=False)}
    kinds = sorted({x["source_kind"] for x in recs})
    by_kind_rows = {kd: [r for r in rows.values() if r["category"] == kd] for kd in kinds}

    result: dict = {
        "benchmark": "rephrase_precision", "data": str(args.data.relative_to(ROOT)),
        "model": recs[0]["model"] if recs else None, "prompt": recs[0]["prompt"] if recs else None,
        "settings": {"k": aug.k, "candidates": aug.candidates, "max_attempts": aug.max_attempts,
                     "temperature": aug.temperature, "sim_band": [aug.sim_low, aug.sim_high]},
        "source_questions": {kd: len(v) for kd, v in by_kind_rows.items()},
        "candidates": len(recs), "labelled": sum(1 for x in recs if x.get("faithful") is not None),
        "labelled_faithful": sum(1 for x in recs if x.get("faithful") is True),
        "arms": {}}
    for arm, checks in arms.items():
        a: dict = {"by_source_kind": {}}
        all_kept: list[dict] = []
        for kd in kinds:
            kept = run_loop(by_kind_rows[kd], pool, labels, embedder, checks, aug)
            all_kept += kept
            slots = aug.k * len(by_kind_rows[kd])
            rounds = {(r["id"], t) for r in by_kind_rows[kd] for t in range(aug.max_attempts)}
            gen_s = sum(seconds.get(key, 0.0) for key in rounds)
            a["by_source_kind"][kd] = {**precision_stats(kept), "slots": slots,
                                       "keep_rate": round(len(kept) / slots, 4) if slots else None,
                                       "generation_seconds_per_kept": round(gen_s / len(kept), 1) if kept else None,
                                       "unfaithful_kept_by_drift": dict(Counter(k["drift"] for k in kept
                                                                                if not k["faithful"]))}
        slots = aug.k * len(rows)
        gen_s = sum(seconds.values())
        a["overall"] = {**precision_stats(all_kept), "slots": slots, "keep_rate": round(len(all_kept) / slots, 4),
                        "generation_seconds_per_kept": round(gen_s / len(all_kept), 1) if all_kept else None,
                        "unfaithful_kept_by_drift": dict(Counter(k["drift"] for k in all_kept if not k["faithful"]))}
        a["examples_unfaithful_kept"] = [{"original": k["original"], "candidate": k["candidate"], "drift": k["drift"]}
                                         for k in all_kept if not k["faithful"]][:8]
        result["arms"][arm] = a

    # the drift checks on every labelled candidate that passes the other checks: what they catch and cost
    labelled = [x for x in recs if x.get("faithful") is not None]
    t0 = time.perf_counter()
    conf = Counter()
    for x in labelled:
        row = rows[x["source_id"]]
        base = validate_rephrasing(row, x["candidate"], cosine=x["cosine"], checks=arms["without_drift_checks"])
        if not base.ok:
            continue
        v = validate_rephrasing(row, x["candidate"], cosine=x["cosine"], checks=full)
        conf[("faithful" if x["faithful"] else "unfaithful", "passes" if v.ok else "rejected")] += 1
    us = (time.perf_counter() - t0) / max(1, len(labelled)) * 1e6 / 2
    result["drift_checks_on_labelled"] = {
        "candidates_passing_other_checks": sum(conf.values()),
        "unfaithful_rejected": conf[("unfaithful", "rejected")], "unfaithful_passed": conf[("unfaithful", "passes")],
        "faithful_rejected": conf[("faithful", "rejected")], "faithful_passed": conf[("faithful", "passes")],
        "microseconds_per_candidate": round(us, 1)}
    result["conditions"] = CONDITIONS
    result["calibration"] = calibration(args.calibration, arms)
    result["headline"] = {"precision": result["arms"]["validators"]["overall"]["precision"],
                          "ci": result["arms"]["validators"]["overall"]["ci"],
                          "keep_rate": result["arms"]["validators"]["overall"]["keep_rate"],
                          "kept": result["arms"]["validators"]["overall"]["kept"],
                          "goal": ">= 0.9 precision of kept",
                          "meets_goal": (result["arms"]["validators"]["overall"]["precision"] or 0) >= 0.9,
                          "stronger_teacher": "not measured here (no capable model runs offline on this machine); "
                                              "the drift checks apply to any teacher, the content limits are for "
                                              "the packaged model only (off by default)"}
    import torch

    result["machine"] = {"cpus": os.cpu_count(), "cpu_flags": cpu_flags(), "python": platform.python_version(),
                         "torch": torch.__version__, "loadavg_start": [round(x, 2) for x in load_start],
                         "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps({"headline": result["headline"],
                      "without_drift_checks": result["arms"]["without_drift_checks"]["overall"]}, indent=1))
    return result


if __name__ == "__main__":
    main()
