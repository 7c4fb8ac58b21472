"""Few-shot evaluation prompts with and without a shared head, on the packaged Gemma-3-270M, one run.

The few-shot arm of evaluation gives every item of a category the same ``evaluate.fewshot_k`` exemplars
(:func:`training.evaluate.fewshot_exemplars`), so a category's prompts share a long head (system turn and
exemplars, ~1,300 tokens on the ``quality`` profile). :func:`training.generate.answer_prompts` with
``groups`` prefills that head once per category and then only each item's own turn; without ``groups`` every
prompt is prefilled whole (what evaluation did before). Both arms answer the same prompts, greedy, in
batches of ``evaluate.batch_size``, with the same model loaded once; the shared arm runs first.

The data is the ``quality`` profile's own (fetch .. format at ``augment.k=0`` on a fresh root, no LLM
calls); items are the first ``--per-category`` test items of each category, ids sorted. Records seconds per
arm, the ratio plain / shared, prompt tokens, how many answers are identical, and the load average.
Writes ``benchmarks/results/fewshot.json``.

    .venv/bin/python benchmarks/bench_fewshot.py [--per-category 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fewshot.json"


def build_dataset(root: Path) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    if not (root / "data" / "raw").exists():
        (root / "data" / "raw").symlink_to(ROOT / "data" / "raw")
    for stage in ("fetch", "augment", "dedup", "split", "format"):
        subprocess.run([sys.executable, "-m", "flows.cli", stage, "--profile", "quality", "--root", str(root),
                        "--set", "augment.k=0"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=8)
    ap.add_argument("--root", type=Path, default=None, help="a root with the quality dataset (default: build one)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    root = args.root or Path(tempfile.mkdtemp(prefix="finsynth-fewshot-"))
    if not (root / "data/processed/format/test.parquet").exists():
        build_dataset(root)

    from lm.causal_lm import load_causal_lm, render_prompt
    from datagen.config import load_config
    from datagen.prompts import load_prompt
    from datagen.tokenizer import load_tokenizer
    from training.evaluate import fewshot_exemplars, load_split_rows
    from training.generate import answer_prompts, fewshot_messages

    cfg = load_config(profile="quality", root=root)
    ev = cfg.evaluate
    dataset = cfg.paths.stage_dir("format")
    test, train = load_split_rows(dataset, "test"), load_split_rows(dataset, "train")
    by_cat: dict[str, list[dict]] = {}
    for r in sorted(test, key=lambda r: r["id"]):
        by_cat.setdefault(r["category"], []).append(r)
    rows = [r for c in sorted(by_cat) for r in by_cat[c][:args.per_category]]
    system = load_prompt(cfg.format.system_prompt).render() if cfg.format.system_prompt else None
    convs = [fewshot_messages(r, fewshot_exemplars(r, train, ev.fewshot_k, ev.seed), system) for r in rows]
    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model)
    prompts = [render_prompt(tok, c) for c in convs]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    kw = {"max_new_tokens": ev.max_new_tokens, "batch_size": ev.batch_size}
    t = time.perf_counter()
    shared = answer_prompts(model, tok, prompts, groups=[json.dumps(c[:-1]) for c in convs], **kw)
    t_shared = time.perf_counter() - t
    t = time.perf_counter()
    plain = answer_prompts(model, tok, prompts, **kw)
    t_plain = time.perf_counter() - t
    result = {
        "benchmark": "fewshot", "items": len(rows), "categories": len(by_cat), "fewshot_k": ev.fewshot_k,
        "batch_size": ev.batch_size, "max_new_tokens": ev.max_new_tokens,
        "prompt_tokens": {"total": sum(lengths), "max": max(lengths), "min": min(lengths)},
        "shared_head_s": round(t_shared, 2), "plain_s": round(t_plain, 2),
        "speedup_plain_over_shared": round(t_plain / t_shared, 3),
        "identical_answers": sum(a == b for a, b in zip(shared, plain, strict=True)),
        "differing": [{"id": r["id"], "shared": a, "plain": b}
                      for r, a, b in zip(rows, shared, plain, strict=True) if a != b],
        "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "differing"}, indent=2))
    return result


if __name__ == "__main__":
    main()
