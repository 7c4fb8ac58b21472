"""Calibrate the rephrasing similarity band [sim_low, sim_high] on a small labelled set.

    .venv/bin/python scripts/calibrate_rephrase.py [--data tests/data/rephrase_calibration.jsonl]
        [--out benchmarks/results/rephrase_calibration.json]

Each line of the data is ``{"original", "candidate", "label": good|bad, "kind"}`` where ``kind`` is
``good``, ``off_topic`` (drifted: the band's lower bound is for these), ``trivial`` (a near-copy with no
paraphrase value: the upper bound), or ``meaning`` (a changed figure or entity: invisible to an
embedding band, caught by the fact checks; reported, not used to fit the band).

Embeds every pair with the configured embedder (default: the packaged all-MiniLM-L6-v2), then picks
the band that maximises balanced accuracy on good vs off_topic+trivial; ties go to the widest band.
Also reports what the full validator (facts, intent, near-copy, band) does on every pair.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def best_band(cos: np.ndarray, good: np.ndarray) -> tuple[float, float, float]:
    """(low, high, balanced accuracy): good pairs inside [low, high], bad ones outside.

    Exhaustive over the observed cosines; among the best bands each bound is then moved to the middle
    of the gap it sits in (max margin), so it does not hug the nearest labelled pair.
    """
    pts = np.unique(cos)
    edges = np.concatenate([[pts[0] - 1e-3], (pts[:-1] + pts[1:]) / 2, [pts[-1] + 1e-3]])
    best = (0.0, 1.0, -1.0)
    for i, lo in enumerate(edges):
        for hi in edges[i + 1:]:
            inside = (cos >= lo) & (cos <= hi)
            tpr = inside[good].mean() if good.any() else 1.0
            tnr = (~inside[~good]).mean() if (~good).any() else 1.0
            bal = (tpr + tnr) / 2
            if bal > best[2] + 1e-12:
                best = (float(lo), float(hi), float(bal))
    return best


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from datagen.augmentation.validators import RephraseChecks, validate_rephrasing
    from datagen.config import load_config
    from datagen.embed import load_embedder
    from datagen.io import read_jsonl, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "tests/data/rephrase_calibration.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/rephrase_calibration.json")
    ap.add_argument("--profile", default="demo")
    args = ap.parse_args()

    cfg = load_config(profile=args.profile)
    rows = read_jsonl(args.data)
    emb = load_embedder(cfg.dedup.embedder)
    a = emb.encode([r["original"] for r in rows])
    b = emb.encode([r["candidate"] for r in rows])
    cos = np.sum(a * b, axis=1)
    kinds = np.array([r["kind"] for r in rows])
    fit = kinds != "meaning"
    low, high, bal = best_band(cos[fit], kinds[fit] == "good")
    # round to 2 decimals, outward unless that crosses a labelled pair
    low_r, high_r = float(np.floor(low * 100) / 100), float(np.ceil(high * 100) / 100)
    bad_fit = cos[fit][kinds[fit] != "good"]
    if (bad_fit >= low_r).sum() != (bad_fit >= low).sum():
        low_r = float(np.ceil(low * 100) / 100)
    if (bad_fit <= high_r).sum() != (bad_fit <= high).sum():
        high_r = float(np.floor(high * 100) / 100)

    per_kind = {k: {"n": int((kinds == k).sum()), "min": round(float(cos[kinds == k].min()), 4),
                    "median": round(float(np.median(cos[kinds == k])), 4),
                    "max": round(float(cos[kinds == k].max()), 4)} for k in sorted(set(kinds))}
    verdicts = {}
    for name, checks in (("config", RephraseChecks.from_config(cfg.augment)),
                         ("calibrated", RephraseChecks(low_r, high_r, cfg.augment.near_copy_char_ratio,
                                                       tuple(cfg.augment.length_ratio)))):
        v = [validate_rephrasing({"question": r["original"], "answer": "n/a"}, r["candidate"], cosine=float(c),
                                 checks=checks) for r, c in zip(rows, cos)]
        correct = [(x.ok == (r["label"] == "good")) for x, r in zip(v, rows)]
        verdicts[name] = {
            "band": [checks.sim_low, checks.sim_high],
            "accuracy": round(float(np.mean(correct)), 4),
            "by_kind": {k: dict(Counter(x.reason for x, r in zip(v, rows) if r["kind"] == k)) for k in per_kind},
        }
    result = {"data": str(args.data.relative_to(ROOT)) if args.data.is_relative_to(ROOT) else str(args.data),
              "embedder": cfg.dedup.embedder.model, "pairs": len(rows),
              "fitted_on": "good vs off_topic+trivial (meaning-changed pairs excluded)",
              "best_band_raw": [round(low, 4), round(high, 4)], "balanced_accuracy": round(bal, 4),
              "recommended": {"sim_low": low_r, "sim_high": high_r},
              "cosine_by_kind": per_kind, "full_validator": verdicts}
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
