"""Augment benchmark: rephrasing yield and throughput on the demo workload with the packaged Gemma.

    .venv/bin/python benchmarks/bench_augment.py [--limit 24] [--variants baseline new]

The demo workload: the demo profile's fetched originals, the first ``augment.limit`` (24) of them in the
stage's category round-robin order, ``k`` (3) slots each, ``max_attempts`` (2) rounds, the demo's local
provider (``packaged:gemma3-270m``, transformers on CPU) and embedder. No response cache: every variant
generates for real, in this one process, one after the other.

Variants (``augment`` settings; everything else is the demo's):

- ``baseline``: today's path before issue 15: one request per slot, one candidate, the chat-turn prompt,
  no stop strings sent (the model generates to ``max_tokens``; the answer is cut afterwards);
- ``early_stop``: the baseline with stop strings ending each row during generation (bullet 1 alone);
- ``new``: the demo's settings (best-of-n ``candidates``, ``prompt_format``, ``early_stop``).

Writes ``benchmarks/results/augment.json``: per variant slots, kept, time, accepted per minute, tokens
generated per accepted rephrasing, rejections by reason; ``kept_slot_fraction`` (new) and
``accepted_per_min_ratio`` (new / baseline); ``os.getloadavg()`` before and after each variant (the
machine is shared: a load above the core count slows every variant, and the ratio less than the times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BASELINE = {"candidates": 1, "prompt_format": "chat", "early_stop": False}


def variant_settings(name: str, aug) -> dict:
    if name == "baseline":
        return dict(BASELINE)
    if name == "early_stop":
        return {**BASELINE, "early_stop": True}
    return {"candidates": aug.candidates, "prompt_format": aug.prompt_format, "early_stop": aug.early_stop}


def main() -> None:
    from datagen.augmentation.augment import select_for_rephrasing
    from datagen.augmentation.rephrase import rephrase_rows
    from datagen.augmentation.validators import RephraseChecks
    from datagen.config import load_config
    from datagen.embed import load_embedder
    from datagen.io import read_jsonl, write_json
    from datagen.llm import make_provider
    from flows.stages import get_stage, invoke

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="items (default: the demo's augment.limit)")
    ap.add_argument("--variants", nargs="+", default=["baseline", "early_stop", "new"])
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. augment.candidates=3")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/augment.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-augment-"))
    (tmp / "data/raw").mkdir(parents=True)
    shutil.copy(ROOT / "data/raw/sample_source_qa.jsonl", tmp / "data/raw/")
    cfg = load_config(profile="demo", root=tmp, overrides=args.set)
    aug = cfg.augment
    invoke(cfg, "fetch")
    originals = read_jsonl(get_stage("fetch").output(cfg) / "samples.jsonl")
    rows = select_for_rephrasing(originals, args.limit or aug.limit)
    pcfg = cfg.llm.providers[aug.provider]
    embedder = load_embedder(cfg.dedup.embedder)
    import torch

    result = {"workload": {"profile": "demo", "items": len(rows), "k": aug.k, "max_attempts": aug.max_attempts,
                           "temperature": aug.temperature, "max_tokens_cap": aug.max_tokens,
                           "model": pcfg.model_path, "batch_size": pcfg.batch_size,
                           "categories": sorted({str(r.get("category")) for r in rows})},
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "variants": {}}
    provider = None
    for name in args.variants:
        provider = make_provider(aug.provider, pcfg, None)  # no response cache: every call generates
        if name == args.variants[0]:  # load the model (and warm up) outside the timings
            provider.generate_batch([__import__("datagen.llm", fromlist=["ChatRequest"]).ChatRequest(
                messages=[{"role": "user", "content": "Hi"}], max_tokens=2)])
            provider.usage = type(provider.usage)()
        settings = variant_settings(name, aug)
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        res = rephrase_rows(rows, provider, embedder, k=aug.k, max_attempts=aug.max_attempts,
                            temperature=aug.temperature, max_tokens=aug.max_tokens,
                            checks=RephraseChecks.from_config(aug), **settings)
        secs = time.perf_counter() - t0
        u = provider.usage.as_dict()
        kept = len(res.kept)
        v = {"settings": settings, "slots": res.slots, "kept": kept,
             "kept_slot_fraction": round(kept / res.slots, 4) if res.slots else None,
             "first_attempt_kept": sum(1 for r in res.kept if r["metadata"]["rephrase_attempt"] == 0),
             "requests": res.requests, "candidates": res.candidates, "surplus_valid": res.surplus,
             "seconds": round(secs, 1), "accepted_per_min": round(kept / secs * 60, 3),
             "completion_tokens": u["completion_tokens"], "prompt_tokens": u["prompt_tokens"],
             "completion_tokens_per_candidate": round(u["completion_tokens"] / max(1, res.candidates), 2),
             "tokens_per_accepted": round(u["completion_tokens"] / kept, 1) if kept else None,
             "prompt_tokens_per_accepted": round(u["prompt_tokens"] / kept, 1) if kept else None,
             "rejected_by_reason": dict(sorted(res.rejected_reasons.items())),
             "missing_by_reason": dict(sorted(res.missing_reasons.items())),
             "examples": [r["question"] for r in res.kept[:6]],
             "loadavg_before": [round(x, 2) for x in load_before],
             "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        result["variants"][name] = v
        print(name, json.dumps({k: v[k] for k in ("kept", "slots", "seconds", "accepted_per_min",
                                                  "tokens_per_accepted", "loadavg_before")}), flush=True)
    vs = result["variants"]
    if "new" in vs:
        result["kept_slot_fraction"] = vs["new"]["kept_slot_fraction"]
    if "new" in vs and "baseline" in vs and vs["baseline"]["accepted_per_min"]:
        result["accepted_per_min_ratio"] = round(vs["new"]["accepted_per_min"] / vs["baseline"]["accepted_per_min"], 2)
        b, n = vs["baseline"]["tokens_per_accepted"], vs["new"]["tokens_per_accepted"]
        result["tokens_per_accepted"] = {"baseline": b, "new": n}
    loads = [x for v in vs.values() for x in (v["loadavg_before"][0], v["loadavg_after"][0])]
    result["loadavg_max_1min"] = max(loads) if loads else None
    result["load_note"] = ("quiet enough (1-min load <= 3)" if result["loadavg_max_1min"] is not None
                           and result["loadavg_max_1min"] <= 3 else
                           "machine shared (1-min load > 3 during the run): absolute times are inflated")
    shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps({k: result.get(k) for k in ("kept_slot_fraction", "accepted_per_min_ratio",
                                                  "tokens_per_accepted", "loadavg_max_1min")}))


if __name__ == "__main__":
    main()
