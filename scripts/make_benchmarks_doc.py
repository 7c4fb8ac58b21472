"""Write ``docs/benchmarks.md`` from ``benchmarks/results/*.json``: every figure the docs quote comes from a
result file, so the two cannot disagree (``tests/test_benchmarks_doc.py`` regenerates and compares).

    python scripts/make_benchmarks_doc.py [--check]

Each benchmark below names its result file, what it measures, its baseline, and the figures to show as
dotted paths into the JSON. A missing file or key shows as ``-``; the run conditions (date, load average,
CPU flags) are read from whichever of the usual keys the file has.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "benchmarks.md"


def ci(path: str) -> tuple[str, str]:
    return (path, "ci")


# file, title, what it measures and against what, [(label, dotted path, kind)]
BENCHMARKS: list[tuple[str, str, str, list[tuple[str, str, str]]]] = [
    ("knowledge.json", "Closed-book knowledge: does rephrasing teach facts? (`bench_knowledge.py`)",
     "Fictional issuers' facts (`scripts/make_facts.py`), each asked after training in a held-out phrasing of "
     "another template family. Arms: the original once (`k0_plain`), the original 4 times (`k0_matched`: same "
     "steps and answer exposures as k=3), the original + 3 rephrasings (`k3`). Log-likelihood rank of the gold "
     "answer among 4 candidates (chance 0.25); control facts are never trained.",
     [("base model before training", "base_before_training", "acc"),
      ("controls after training (never trained)", "controls", "acc"),
      ("k0_plain held-out accuracy", "arms.k0_plain.heldout", "acc"),
      ("k0_matched held-out accuracy", "arms.k0_matched.heldout", "acc"),
      ("k3 held-out accuracy", "arms.k3.heldout", "acc"),
      ("k3 held-out exact match (greedy)", "arms.k3.heldout_em", "acc"),
      ("k0_matched held-out exact match (greedy)", "arms.k0_matched.heldout_em", "acc"),
      ("**k3 - k0_matched** (paired per fact)", "k3_minus_k0_matched", "diff"),
      ("k3 - k0_plain (paired per fact)", "k3_minus_k0_plain", "diff"),
      ("McNemar p, k3 vs k0_matched", "k3_minus_k0_matched.mcnemar_p", "num"),
      ("k3 - k0_matched, greedy exact match (paired per fact)", "k3_minus_k0_matched_em", "diff"),
      ("steps k0_plain / k0_matched / k3", "arms.k0_plain.steps|arms.k0_matched.steps|arms.k3.steps", "multi"),
      ("epochs (each arm read at the epoch its validation facts chose)", "settings.epochs", "num"),
      ("held-out accuracy at the last epoch, k0_matched / k3",
       "arms.k0_matched.last_epoch.heldout.acc|arms.k3.last_epoch.heldout.acc", "multi"),
      ("wall time (s)", "wall_s", "num"),
      ("previous run (`earlier_runs[0]`): epochs", "earlier_runs.0.settings.epochs", "num"),
      ("previous run: k3 - k0_matched", "earlier_runs.0.k3_minus_k0_matched", "diff"),
      ("previous run: k3 - k0_plain", "earlier_runs.0.k3_minus_k0_plain", "diff")]),
    ("quality.json", "Open-book grounded QA: does finsynth make the model better? (`bench_quality.py`)",
     "`finsynth sweep --profile quality --grid augment.k=0,3`: base zero-shot, base few-shot and tuned on "
     "held-out *new* questions whose answer is in the prompt's context. Clustered bootstrap CIs.",
     [("n test items", "overall.n", "num"),
      ("base zero-shot", "overall.base", "mean"),
      ("base few-shot", "overall.fewshot", "mean"),
      ("tuned (k=3)", "overall.tuned", "mean"),
      ("**tuned - few-shot**", "overall.tuned_minus_fewshot", "mean"),
      ("tuned(k=3) - tuned(k=0)", "tuned_last_minus_tuned_first.overall", "mean"),
      ("sentiment: tuned - few-shot (accuracy, label log-likelihood)",
       "categories.sentiment.tuned_minus_fewshot", "mean"),
      ("sentiment macro-F1: tuned", "categories.sentiment.macro_f1.tuned", "mean"),
      ("sentiment macro-F1: majority label", "categories.sentiment.macro_f1.majority", "mean"),
      ("**sentiment macro-F1: tuned - few-shot**", "categories.sentiment.tuned_minus_fewshot_f1", "mean"),
      ("**sentiment macro-F1: tuned - majority**", "categories.sentiment.tuned_minus_majority_f1", "mean"),
      ("sentiment: tuned flagged collapsed", "categories.sentiment.collapse.tuned", "num"),
      ("headlines (external set) macro-F1: tuned - majority",
       "test_sets.headlines.categories.sentiment.tuned_minus_majority_f1", "mean"),
      ("price look-up: tuned - few-shot", "categories.market_price_lookup.tuned_minus_fewshot", "mean"),
      ("risk level: tuned - few-shot", "categories.market_risk_level.tuned_minus_fewshot", "mean"),
      ("wall time (s)", "wall_s", "num")]),
    ("demo.json", "The main command from a fresh clone (`bench_demo.py`)",
     "`bash scripts/demo.sh` in a fresh clone (its own set-up, Prefect server, worker and the `pipeline` "
     "deployment on the demo profile), timed end to end, with the peak resident memory of every process it "
     "started. Goals: 10 minutes with set-up, 6 GB per process, tuned above base few-shot with a CI above 0.",
     [("wall time with set-up (s)", "wall_s", "num"),
      ("to the first stage line: set-up and server (s)", "setup_s", "num"),
      ("pipeline (s)", "pipeline_s", "num"),
      ("augment / train / evaluate (s)", "stage_seconds.augment|stage_seconds.train|stage_seconds.evaluate", "multi"),
      ("terminal lines before the first stage", "setup_lines", "num"),
      ("peak resident memory, largest process (GB)", "peak_rss_gb_max", "num"),
      ("price look-up test items", "categories.market_price_lookup.n", "num"),
      ("price look-up: tuned - few-shot", "categories.market_price_lookup.tuned_minus_fewshot", "mean")]),
    ("train_cpu.json", "CPU training throughput (`bench_train_cpu.py`)",
     "Gemma-3-270M LoRA r16 fp32: finsynth's trainer (padding-free packing, assistant-only loss, LM head on "
     "labelled positions) against plain TRL defaults (padded batches).",
     [("tokens per CPU-second, ratio", "speedup_tokens_per_cpu_s", "ratio"),
      ("tokens per second (wall), ratio", "speedup_tokens_per_s", "ratio")]),
    ("train_gpu.json", "GPU QLoRA throughput (`bench_train_gpu.py`)",
     "Random-init Llama-3.2-3B shape, NF4 + double quantization, LoRA r16 on all linear layers, sequence 2048: "
     "finsynth's trainer against plain TRL defaults on the same GPU and data.",
     [("device", "machine.gpu", "num"),
      ("speed-up in tokens per second", "speedup_tokens_per_s", "ratio"),
      ("tokens per second, finsynth / plain TRL", "finsynth.tokens_per_s|plain_trl.tokens_per_s", "multi"),
      ("peak GiB, finsynth / plain TRL", "peak_gib.finsynth|peak_gib.plain_trl", "multi"),
      ("MFU (4N FLOPs per token), finsynth", "finsynth.mfu", "num")]),
    ("llm.json", "Provider overhead (`bench_llm.py`)",
     "The `openai` provider against a raw `AsyncOpenAI` load generator, same server and concurrency.",
     [("echo server: provider / raw throughput", "echo.ratio_median_runs", "ratio"),
      ("llama.cpp llama-server", "llama_server.ratio_median_runs", "ratio"),
      ("llama-cpp-python server", "llamacpp.ratio_median_runs", "ratio"),
      ("fully cached rerun of 400 requests (s)", "echo.cached_rerun_s", "num")]),
    ("dedup.json", "Similarity search for dedup (`bench_dedup.py`)",
     "All pairs with cosine >= 0.9 over 384-d vectors: faiss IVF partitioned search against exact search.",
     [("1M rows, partitioned (s)", "search.1000000.partitioned.seconds", "num"),
      ("1M rows, sampled recall", "search.1000000.partitioned.recall", "num"),
      ("100k rows: partitioned / exact speed-up", "search.100000.speedup_vs_exact", "ratio"),
      ("templated questions, 100k rows: dedup + leakage check (s)", "templated_100k_s", "num"),
      ("templated questions, 10k rows: dedup + leakage check (s)", "templated.10000.total_s", "num"),
      ("templated, 1,050 rows: dedup checking every pair / blocked (s)",
       "templated.1000.every_pair_dedup_s|templated.1000.dedup_s", "multi"),
      ("templated, 1,050 rows: same decisions as every pair", "templated.1000.same_decisions_as_every_pair", "num"),
      ("embedding cache, dedup then split: ratio", "embed.2000.pipeline_dedup_then_split.ratio", "ratio")]),
    ("scale.json", "The Ray executor against local (`bench_scale.py`)",
     "`run.executor: ray` (a private Ray, 2 worker actors) against `local` on the same machine: the demo "
     "profile's data stages with every LLM answer in a shared cache (what Ray itself costs: start, one model "
     "load per actor, shard files), and embedding + dedup of generated finance rows.",
     [("demo data stages: Ray / local wall time", "demo.ray_over_local", "ratio"),
      ("demo data stages: local / Ray (s)", "demo.local.wall_s|demo.ray.wall_s", "multi"),
      ("demo data stages: same outputs", "demo.same_outputs", "num"),
      ("embed + dedup, 5,000 rows: Ray / local wall time", "embed_dedup.compare.ray_over_local", "ratio"),
      ("embed + dedup, 5,000 rows: same rows kept", "embed_dedup.compare.same_kept", "num"),
      ("embed + dedup, 100,000 rows on Ray: embed / dedup (s)",
       "embed_dedup.100000.embed_s|embed_dedup.100000.dedup_s", "multi"),
      ("embed, 100,000 rows on Ray: rows per second", "embed_dedup.100000.rows_per_s", "num")]),
    ("dedup_calibration.json", "Dedup's pair rule on labelled pairs (`bench_dedup_calibration.py`)",
     "Duplicates, distinct pairs and conflicts written for this project.",
     [("precision", "default.precision", "num"), ("recall", "default.recall", "num"),
      ("conflict recall", "default.conflict_recall", "num"),
      ("the first wave's rule: precision", "old_rule.precision", "num")]),
    ("augment.json", "Rephrasing yield on the packaged Gemma (`bench_augment.py`)",
     "The demo's rephrasing workload: best-of-n with a base-model prompt and early stop, against one "
     "candidate with the chat prompt.",
     [("kept slot fraction", "kept_slot_fraction", "num"),
      ("accepted rephrasings per minute, ratio", "accepted_per_min_ratio", "ratio"),
      ("tokens per accepted rephrasing (new / old)", "tokens_per_accepted.new|tokens_per_accepted.baseline", "multi")]),
    ("fewshot.json", "Few-shot prompt prefill (`bench_fewshot.py`)",
     "A category's exemplar head prefilled once against every prompt prefilled whole.",
     [("speed-up", "speedup_plain_over_shared", "ratio"), ("identical greedy answers", "identical_answers", "num"),
      ("items", "items", "num")]),
    ("reliability.json", "Reliability under faults (`bench_reliability.py`)",
     "The real CLI against a fault proxy, kills, malformed inputs and machine faults.",
     [("cases", "summary.cases", "num"), ("rows unaccounted", "summary.rows_unaccounted", "num"),
      ("secret hits", "summary.secret_hits", "num"),
      ("finished calls repeated after kill -9", "summary.repeated_calls_after_kill", "num")]),
]


def get(d: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(d, list) and part.isdigit() and int(part) < len(d):
            d = d[int(part)]
        elif isinstance(d, dict) and part in d:
            d = d[part]
        else:
            return None
    return d


def fmt_num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if abs(x) < 0.001 and x != 0:
            return f"{x:.3g}"
        return f"{x:.3f}".rstrip("0").rstrip(".") if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def fmt(d: dict, path: str, kind: str) -> str:
    if kind == "multi":
        return " / ".join(fmt_num(get(d, p)) for p in path.split("|"))
    v = get(d, path)
    if v is None:
        return "-"
    if kind == "ratio":
        return f"{v:.2f}x" if isinstance(v, int | float) else str(v)
    if kind in ("acc", "mean", "diff"):
        mean = v.get("acc", v.get("mean")) if isinstance(v, dict) else v
        c = v.get("ci") if isinstance(v, dict) else None
        sign = "+" if kind == "diff" and isinstance(mean, int | float) and mean > 0 else ""
        body = f"{sign}{mean:.3f}" if isinstance(mean, int | float) else "-"
        if c:
            body += f" [{c[0]:.3f}, {c[1]:.3f}]"
        n = v.get("n") if isinstance(v, dict) else None
        return body + (f" (n={n})" if n is not None and kind != "mean" else "")
    return fmt_num(v)


def conditions(d: dict) -> str:
    date = d.get("date") or get(d, "machine.date") or "-"
    start = d.get("loadavg_start") or d.get("load_avg_start") or get(d, "machine.load_avg_start")
    end = d.get("loadavg_end") or d.get("load_avg_end") or get(d, "machine.load_avg_end")
    flags = get(d, "machine.cpu_flags")
    parts = [f"date {str(date)[:10]}"]
    if start:
        parts.append(f"1-min load {start[0]:.2f} at start" + (f", {end[0]:.2f} at end" if end else ""))
    if flags:
        parts.append("CPU flags " + " ".join(flags))
    return "; ".join(parts)


def render(results: Path = RESULTS) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `scripts/make_benchmarks_doc.py` from `benchmarks/results/*.json`; do not edit by hand "
             "(`tests/test_benchmarks_doc.py` fails when this page and the JSONs disagree). Each script compares "
             "against its natural baseline in the same run; 95% CIs are bootstraps clustered by group.", ""]
    for name, title, what, figures in BENCHMARKS:
        path = results / name
        lines += [f"## {title}", "", what, ""]
        if not path.exists():
            lines += [f"Not run yet: `benchmarks/results/{name}` does not exist.", ""]
            continue
        d = json.loads(path.read_text())
        lines += [f"`benchmarks/results/{name}` ({conditions(d)})", "", "| figure | value |", "|---|---|"]
        lines += [f"| {label} | {fmt(d, p, kind)} |" for label, p, kind in figures]
        if d.get("note") or d.get("load_note"):
            lines += ["", f"Note: {d.get('note') or d.get('load_note')}"]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is not up to date")
    a = ap.parse_args()
    text = render()
    if a.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/make_benchmarks_doc.py", file=sys.stderr)
            return 1
        return 0
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
