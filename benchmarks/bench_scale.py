"""Scale-out benchmark: the Ray executor against the local one, on this machine.

    .venv/bin/python benchmarks/bench_scale.py                      # both sections
    .venv/bin/python benchmarks/bench_scale.py --sections demo      # one

Sections (each merged into ``benchmarks/results/scale.json`` as it finishes):

- ``demo``: the demo profile's data stages (fetch, augment, dedup, split, format) run once with
  ``run.executor: local`` and once with ``run.executor: ray`` (a private Ray with ``run.ray_workers``
  CPUs, started inside the run), each on a fresh project root. A first local run fills the response and
  embedding caches, which both timed runs share, so both find every LLM answer there: the ratio is the
  executor's own cost (Ray start, actor start with one model load each, shard files), which on 2 cores
  is what Ray adds, not what it saves. ``ray_over_local`` is the ratio of the two wall times; the
  compared outputs must be the same bytes.
- ``embed_dedup``: n rows of generated finance questions with a short price table each
  (``bench_dedup.corpus``: all different, 5% exact copies), embedded as the dedup stage embeds them
  (:func:`datagen.embed.sample_text`, no embedding cache) with :func:`datagen.embed.encode_sharded` on
  Ray with 2 workers, then deduplicated (:func:`datagen.dataset.dedup.dedup_rows`). At ``--local-n``
  rows the same is run with the local executor too, for a ratio and to check that both give the same
  vectors and decisions. (Templated rows, ``bench_dedup.templated_rows``, would not measure embedding:
  their 14-column header fills the 200 characters of context that are embedded, so their texts repeat.)

Every figure records the load average and the CPU's vector flags; run it with nothing else heavy running.
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

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
DATA_STAGES = ("fetch", "augment", "dedup", "split", "format")


def _save(section: str, value) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), **_conditions()}
    data[section] = value
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)
    print(section, json.dumps(value), flush=True)


def _conditions() -> dict:
    from lm.causal_lm import vector_flags

    return {"loadavg": os.getloadavg(), "cpu_flags": vector_flags(), "date": time.strftime("%Y-%m-%d")}


def _outputs(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.jsonl"))}


def bench_demo(work: Path) -> None:
    import ray

    from datagen.config import load_config
    from flows.stages import execute

    shared = [f"llm.cache_file={work / 'cache' / 'llm.sqlite'}", f"paths.cache={work / 'cache'}"]
    out: dict = {"profile": "demo", "stages": list(DATA_STAGES), "start": _conditions()}
    outputs = {}
    for name in ("warm", "local", "ray"):
        root = work / name
        (root / "data").mkdir(parents=True)
        (root / "data" / "raw").symlink_to(ROOT / "data" / "raw")
        cfg = load_config(profile="demo", root=root,
                          overrides=[*shared, f"run.executor={'ray' if name == 'ray' else 'local'}"])
        per_stage = {}
        t0 = time.perf_counter()
        for stage in DATA_STAGES:
            s0 = time.perf_counter()
            execute(cfg, stage)
            per_stage[stage] = round(time.perf_counter() - s0, 2)
        total = time.perf_counter() - t0
        out[name] = {"wall_s": round(total, 2), "stages_s": per_stage, **_conditions()}
        outputs[name] = {s: _outputs(cfg.paths.stage_dir(s)) for s in ("augment", "dedup", "split", "format")}
        print(name, out[name], flush=True)
    ray.shutdown()
    out["ray_over_local"] = round(out["ray"]["wall_s"] / out["local"]["wall_s"], 3)
    out["same_outputs"] = outputs["ray"] == outputs["local"]
    out["note"] = ("both timed runs answer every LLM call from the shared cache filled by the 'warm' run; "
                   "the Ray run includes starting Ray and one model load per actor")
    _save("demo", out)


def _embed_dedup(rows: list[dict], executor_name: str, scratch: Path) -> dict:
    from datagen.config import EmbedderConfig, RunConfig
    from datagen.dataset import dedup as dd
    from datagen.embed import encode_sharded, sample_text

    run_cfg = RunConfig(executor=executor_name, ray_workers=2)
    texts = [sample_text(r, 200) for r in rows]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    vecs, stats = encode_sharded(run_cfg, EmbedderConfig(), None, texts, scratch)
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = dd.dedup_rows(rows, vecs, 0.92, 0.985, context_threshold=0.98)
    t_dedup = time.perf_counter() - t0
    return {"executor": executor_name, "rows": len(rows), "embed_s": round(t_embed, 2),
            "rows_per_s": round(len(rows) / t_embed, 1), "dedup_s": round(t_dedup, 2),
            "total_s": round(t_embed + t_dedup, 2), "kept": len(res.kept), "drops": res.counts, "encoded": stats,
            "loadavg_start": load0, **_conditions(), "_vecs": vecs}


def corpus_rows(n: int) -> list[dict]:
    """``bench_dedup.corpus(n)`` as rows: the question, and the price table as the context's text."""
    from bench_dedup import corpus

    rows = []
    for i, text in enumerate(corpus(n)):
        q, ctx = text.split("\n", 1)
        rows.append({"id": f"c{i:07d}", "group_id": f"c{i:07d}", "source": "bench", "question": q,
                     "answer": "x", "context": {"text": ctx}, "metadata": {}})
    return rows


def bench_embed_dedup(work: Path, n: int, local_n: int) -> None:
    import ray

    out: dict = {"ray_workers": 2, "rows": "bench_dedup.corpus: generated questions with a short price table"}
    small = corpus_rows(local_n)
    runs = {name: _embed_dedup(small, name, work / f"scratch-{name}") for name in ("local", "ray")}
    out["compare"] = {"rows": len(small), "local_s": runs["local"]["total_s"], "ray_s": runs["ray"]["total_s"],
                      "ray_over_local": round(runs["ray"]["total_s"] / runs["local"]["total_s"], 3),
                      "max_abs_vector_diff": float(np.abs(runs["ray"]["_vecs"] - runs["local"]["_vecs"]).max()),
                      "same_kept": runs["ray"]["kept"] == runs["local"]["kept"]}
    print("compare", out["compare"], flush=True)
    big = _embed_dedup(corpus_rows(n), "ray", work / "scratch-big")
    big.pop("_vecs")
    out[str(n)] = big
    ray.shutdown()
    _save("embed_dedup", out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=["demo", "embed_dedup"], choices=["demo", "embed_dedup"])
    ap.add_argument("--n", type=int, default=100_000, help="rows of the Ray embed + dedup run")
    ap.add_argument("--local-n", type=int, default=5_000, help="rows of the local-vs-Ray embed + dedup pair")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="finsynth-bench-scale-"))
    try:
        if "demo" in args.sections:
            bench_demo(work / "demo")
        if "embed_dedup" in args.sections:
            bench_embed_dedup(work / "embed", args.n, args.local_n)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
