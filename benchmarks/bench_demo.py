"""The main command as a new user meets it: ``bash scripts/demo.sh`` in a fresh clone, timed end to end.

Clones this repository's HEAD into a temporary folder (committed files only, as a user gets them), runs
``bash scripts/demo.sh`` there (its own set-up: a new ``.venv``, torch from pip's index and cache, the rest
downloaded by uv into an empty cache, then the Prefect
server, worker and the ``pipeline`` deployment on the demo profile) with an empty model cache (the packaged
GGUF is converted in the run, as on a fresh machine; ``--warm-model-cache`` skips that) and records:

- ``wall_s`` (set-up included), ``setup_s`` (to the first stage line), ``pipeline_s`` and
  ``stage_seconds`` (from the run's own summary, ``.prefect/last-run.json``);
- the peak resident memory (``VmHWM``) of every process the command started, polled from ``/proc``
  every 0.5 s (a process that lives less than that can be missed), the largest first;
- the lines the terminal showed: how many before the first stage line (set-up), and in all;
- the run's own report: per test category n, each arm's mean and ``tuned - few-shot`` with its 95% CI,
  and the categories with n >= 20 where that CI is above 0 (the demo's claim);
- the host: CPU count, vector/matrix flags, load average before and after.

Writes ``benchmarks/results/demo.json``. Run it alone: it takes both cores for ~10 minutes.

    .venv/bin/python benchmarks/bench_demo.py [--keep] [--reuse-venv] [--warm-model-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "demo.json"
sys.path.insert(0, str(ROOT / "src"))


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (from each process's ``PPid``)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = re.search(r"^PPid:\s+(\d+)", (d / "status").read_text(), re.M)
            except OSError:
                continue
            if ppid:
                parent[int(d.name)] = int(ppid.group(1))
    out, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out.update(kids)
        todo += kids
    return out


class PeakMemory(threading.Thread):
    """Polls the ``VmHWM`` (peak resident set) of ``pid``'s process tree until :meth:`stop`."""

    def __init__(self, pid: int, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.done = pid, every_s, threading.Event()
        self.peaks: dict[int, dict] = {}

    def run(self) -> None:
        while not self.done.is_set():
            for p in descendants(self.pid):
                try:
                    status = Path(f"/proc/{p}/status").read_text()
                    cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                hwm = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
                if hwm:
                    gb = int(hwm.group(1)) / 2**20
                    if gb > self.peaks.get(p, {}).get("peak_rss_gb", -1):
                        self.peaks[p] = {"pid": p, "peak_rss_gb": round(gb, 2), "cmd": cmd.strip()[:160]}
            self.done.wait(self.every_s)

    def stop(self) -> list[dict]:
        self.done.set()
        self.join()
        return sorted(self.peaks.values(), key=lambda r: -r["peak_rss_gb"])


def report_figures(report: dict) -> dict:
    """Per test category: n, each arm's mean, ``tuned - few-shot`` with its 95% CI."""
    from training.report import table_rows

    cats = {}
    for r in table_rows(report):
        if r["split"] != "test":
            continue
        diff = {"mean": r["tuned_minus_fewshot_mean"], "ci": [r["tuned_minus_fewshot_lo"], r["tuned_minus_fewshot_hi"]]}
        cats[r["category"]] = {"n": r["n"], "n_groups": r["n_groups"],
                               **{a: r[f"{a}_mean"] for a in ("base", "fewshot", "tuned")},
                               "tuned_minus_fewshot": diff, "collapsed": r["collapsed"]}
    return cats


def run_figures(clone: Path) -> dict:
    """What the finished run says about itself: its seconds in all and per stage, and its report's figures."""
    run = json.loads((clone / ".prefect" / "last-run.json").read_text())
    res = run.get("result") or {}
    stages = res.get("stages") or []
    report = Path(res["report"]).parent / "report.json" if res.get("report") else None
    return {"pipeline_s": run.get("total_s"),
            "stage_seconds": {s["stage"]: s["seconds"] for s in stages if isinstance(s, dict)},
            "categories": report_figures(json.loads(report.read_text())) if report and report.exists() else {}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the clone (printed) instead of deleting it")
    ap.add_argument("--warm-model-cache", action="store_true",
                    help="use this machine's converted Gemma (~/.cache/finsynth) instead of converting it again, "
                         "as a fresh machine does in its first stage")
    ap.add_argument("--reuse-venv", action="store_true",
                    help="copy this checkout's .venv into the clone (times the pipeline without a fresh set-up)")
    args = ap.parse_args(argv)
    from lm.causal_lm import vector_flags

    work = Path(tempfile.mkdtemp(prefix="finsynth-demo-"))
    clone = work / "finsynth"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    if args.reuse_venv:
        shutil.copytree(ROOT / ".venv", clone / ".venv", symlinks=True)
        subprocess.run([str(clone / ".venv/bin/pip"), "install", "-q", "--no-deps", "-e", str(clone)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if not args.warm_model_cache:  # a fresh machine converts the packaged GGUF once, inside the run
        env["FINSYNTH_MODEL_CACHE"] = str(work / "model-cache")
    env["UV_CACHE_DIR"] = str(work / "uv-cache")  # uv downloads every dependency, as on a fresh machine
    load0, t0 = os.getloadavg(), time.monotonic()
    proc = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=clone, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    mem = PeakMemory(proc.pid)
    mem.start()
    lines: list[tuple[float, str]] = []
    for line in proc.stdout:
        lines.append((time.monotonic() - t0, line.rstrip("\n")))
        print(line, end="", flush=True)
    rc = proc.wait()
    wall = time.monotonic() - t0
    peaks = mem.stop()
    first_stage = next((t for t, s in lines if re.search(r"\d\d:\d\d:\d\d\s+\w+: started", s)), None)
    setup_lines = sum(1 for t, _ in lines if first_stage is None or t < first_stage)
    run = run_figures(clone) if rc == 0 else {"pipeline_s": None, "stage_seconds": {}, "categories": {}}
    cats = run["categories"]
    gains = [c for c, f in cats.items() if not c.startswith("overall") and f["n"] >= 20 and not f["collapsed"]
             and (f["tuned_minus_fewshot"]["ci"][0] or 0) > 0]
    result = {
        "benchmark": "demo", "command": "bash scripts/demo.sh (fresh clone" + (", copied .venv" if args.reuse_venv
                                                                               else ", fresh .venv")
        + (", this machine's converted model)" if args.warm_model_cache else ", empty model cache)"),
        "rc": rc, "wall_s": round(wall, 1), "setup_s": round(first_stage, 1) if first_stage else None,
        "pipeline_s": run["pipeline_s"], "stage_seconds": run["stage_seconds"],
        "terminal_lines": len(lines), "setup_lines": setup_lines,
        "peak_rss_gb_max": peaks[0]["peak_rss_gb"] if peaks else None, "processes": peaks[:8],
        "categories": cats, "gain_categories": gains,
        "machine": {"cpus": os.cpu_count(), "cpu_flags": vector_flags()},
        "loadavg_start": load0, "loadavg_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("rc", "wall_s", "setup_s", "pipeline_s", "setup_lines",
                                             "peak_rss_gb_max", "gain_categories")}, indent=2))
    if args.keep:
        print(f"clone kept: {clone}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
