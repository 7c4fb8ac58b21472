"""The proof benchmark: does finsynth make the packaged Gemma-3-270M better, and do rephrasings help?

Runs ``finsynth sweep --profile quality --grid augment.k=0,3`` (the same stages a user runs, through
Prefect) on a fresh root, then reads both points' evaluation reports and records, per category and
overall (test split, original questions): n, base zero-shot, base few-shot, tuned (k=0), tuned (k=3),
each with its 95% clustered bootstrap CI, and the paired differences tuned - base, tuned - few-shot
(for each point) and tuned(k=3) - tuned(k=0), with CIs; plus wall time per stage, tokens trained and the
machine load. Writes benchmarks/results/quality.json. Run it alone: it takes the 2 cores for ~1.5 h.

    .venv/bin/python benchmarks/bench_quality.py [--root DIR] [--grid augment.k=0,3] [--set key=value ...]

Top-level keys: ``overall.tuned_minus_fewshot.ci`` (the k=3 point), ``categories.<name>.n`` and
``categories.<name>.tuned_minus_fewshot.ci``; ``points.<k0|k3>`` hold each point's full figures.
Classification items are scored by label log-likelihood in every arm (the evaluation's headline
scoring), so ``overall`` uses it too. A classification category also has ``macro_f1.{base, fewshot,
majority, tuned}`` (``mean``, ``ci``: clustered bootstrap), ``tuned_minus_fewshot_f1`` /
``tuned_minus_majority_f1`` / ``tuned_minus_base_f1`` (paired), ``collapse.{arm}`` (> 80% of its
predictions on one label) and ``claims`` (a collapsed tuned arm's gain never counts).
``overall_without_collapsed`` is the overall paired comparison over the categories where tuned did not
collapse. ``test_sets.<name>`` holds the same figures for each external test set (``evaluate.test_sets``).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lm.causal_lm import vector_flags  # noqa: E402
from training.aggregate import F1_ARMS, F1_DIFFS, bootstrap_ci, summarize_split  # noqa: E402

ARMS = ("base", "fewshot", "tuned")
DIFFS = ("tuned_minus_base", "tuned_minus_fewshot")


def _stat(block: dict | None) -> dict:
    block = block or {}
    return {"mean": block.get("mean"), "ci": block.get("ci")}


def classification_figures(entry: dict) -> dict:
    """A category's macro-F1 block of ``report["macro_f1"]`` in quality.json's shape."""
    return {"macro_f1": {a: _stat(entry.get(a)) for a in F1_ARMS},
            **{f"{d}_f1": _stat(entry.get(d)) for d in F1_DIFFS},
            "collapse": dict(entry.get("collapse") or {}), "claims": entry.get("claims"),
            "scoring": entry.get("scoring"), "majority_label": entry.get("majority_label"),
            "class_prior": entry.get("class_prior")}


def overall_without_collapsed(report: dict, items: list[dict], split: str = "test", n_boot: int = 2000,
                              seed: int = 17) -> dict:
    """Overall (micro) arms and paired differences over the split's categories where tuned did not collapse:
    a collapsed arm's gain counts toward no claim."""
    flagged = sorted(k.split("/", 1)[1] for k, e in (report.get("macro_f1") or {}).items()
                     if k.startswith(f"{split}/") and (e.get("collapse") or {}).get("tuned"))
    kept = [i for i in items if i.get("split", "test") == split and i["category"] not in flagged]
    o = summarize_split(kept, n_boot=n_boot, seed=seed, split=split)["overall"] if kept else {}
    return {"excluded_categories": flagged, "n": o.get("n"), **{k: _stat(o.get(k)) for k in (*ARMS, *DIFFS)}}


def point_figures(report: dict, split: str = "test") -> dict:
    summary = report["summary"][split]
    f1 = report.get("macro_f1") or {}
    cats = {c: {"n": b.get("n"), **{k: _stat(b.get(k)) for k in (*ARMS, *DIFFS)},
                **(classification_figures(f1[f"{split}/{c}"]) if f"{split}/{c}" in f1 else {})}
            for c, b in sorted(summary["categories"].items())}
    o = summary["overall"]
    return {"overall": {"n": o.get("n"), **{k: _stat(o.get(k)) for k in (*ARMS, *DIFFS)}}, "categories": cats}


def paired_between_points(items_a: list[dict], items_b: list[dict], n_boot: int = 2000, seed: int = 17) -> dict:
    """tuned(b) - tuned(a) per category and overall, paired by item id, groups resampled."""
    ta = {i["id"]: i for i in items_a if i["model"] == "tuned" and i.get("split", "test") == "test"}
    tb = {i["id"]: i for i in items_b if i["model"] == "tuned" and i.get("split", "test") == "test"}
    ids = sorted(set(ta) & set(tb))
    out = {}
    cats = sorted({ta[i]["category"] for i in ids})
    for cat in [None, *cats]:
        sel = [i for i in ids if cat is None or ta[i]["category"] == cat]
        d = [float(tb[i]["score"]) - float(ta[i]["score"]) for i in sel]
        groups = [str(ta[i].get("group_id") or i) for i in sel]
        out["overall" if cat is None else cat] = {
            "n": len(sel), "mean": sum(d) / len(d) if d else None,
            "ci": bootstrap_ci(d, n_boot, [seed, len(sel)], groups=groups) if d else None}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="project root (default: a fresh temporary one)")
    ap.add_argument("--grid", default="augment.k=0,3")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    args = ap.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="finsynth-quality-"))
    (root / "data").mkdir(parents=True, exist_ok=True)
    if not (root / "data" / "raw").exists():
        (root / "data" / "raw").symlink_to(ROOT / "data" / "raw")
    load0, t0 = os.getloadavg(), time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PREFECT_HOME": str(root / ".prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    cmd = [sys.executable, "-m", "flows.cli", "sweep", "--profile", "quality", "--root", str(root),
           "--grid", args.grid, "--name", "quality", *[x for o in args.overrides for x in ("--set", o)]]
    print("running:", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE)
    wall = time.time() - t0
    if r.returncode != 0:
        print(r.stdout[-3000:], file=sys.stderr)
        raise SystemExit(f"sweep failed with exit {r.returncode}")
    table = json.loads((root / "data/reports/sweep-quality/comparison.json").read_text())
    points = {}
    items = {}
    for p in table["points"]:
        rep_path = Path(p["report"])
        report = json.loads(rep_path.read_text())
        items[p["name"]] = [json.loads(line) for line in (rep_path.parent / "items.jsonl").read_text().splitlines()
                            if line.strip()]
        train_m = json.loads((root / "data/models" / f"adapter-{p['name']}" / "manifest.json").read_text())
        sets = [s for s in report.get("summary", {}) if s not in ("test", "gold")]
        points[p["name"]] = {**point_figures(report),
                             "overall_without_collapsed": overall_without_collapsed(report, items[p["name"]]),
                             "test_sets": {s: point_figures(report, s) for s in sets},
                             "overrides": p["overrides"], "executed": p["executed"],
                             "cached": p["cached"], "stage_seconds": table["stage_seconds"][p["name"]],
                             "train": {k: train_m.get(k) for k in ("train_tokens", "steps", "wall_time_s",
                                                                   "tokens_per_s", "best_eval_loss", "counts")},
                             "judge": report.get("judge", {}).get("reliable")}
    names = list(points)
    best = names[-1]  # the last grid point (k=3 by default) is the one the proof is about
    result = {
        "benchmark": "quality", "grid": args.grid, "proof_point": best,
        "overall": points[best]["overall"], "categories": points[best]["categories"],
        "overall_without_collapsed": points[best]["overall_without_collapsed"],
        "test_sets": points[best]["test_sets"], "scoring": {"classification": "loglik"},
        "points": points,
        "tuned_last_minus_tuned_first": paired_between_points(items[names[0]], items[best]) if len(names) > 1
        else None,
        "wall_s": round(wall, 1), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "cpu_flags": vector_flags()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "root": str(root),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    o = result["overall"]
    print(json.dumps({"overall_tuned_minus_fewshot": o["tuned_minus_fewshot"], "wall_s": result["wall_s"],
                      "load": result["loadavg_end"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
