"""The pipeline through a real local Prefect server and process worker, on the tiny profile.

One session-scoped server + worker and one finished tiny run (fixtures in conftest.py, shared with the
browser test of the UI; PREFECT_HOME and result storage in temporary folders, so cached results never
leak between test sessions). The first run executes every stage through the
deployment; a second run with nothing changed executes none (all Cached); a changed augmentation
setting with ``--only augment`` executes augmentation alone and marks downstream outputs stale.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from datagen.io import STALE, read_json
from flows.stages import STAGE_NAMES

pytestmark = pytest.mark.slow


def _cli_run(env: dict, root: Path, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--root", str(root), *args],
                       env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    return json.loads(out[out.index("{"): out.rindex("}") + 1])


def test_deployment_runs_the_whole_pipeline(first_run, prefect_env, project):
    assert first_run["state"] == "COMPLETED", first_run.get("message")
    result = first_run["result"]
    assert result["executed"] == list(STAGE_NAMES) and result["cached"] == []
    dataset = project / "data" / "processed" / "dataset"
    assert (dataset / "README.md").read_text().startswith("---\n")
    assert (dataset / "train.parquet").exists() and (dataset / "test.parquet").exists()
    adapter = project / "data" / "models" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    report = read_json(project / "data" / "reports" / "eval" / "report.json")
    assert report  # a report with content
    for stage in ("fetch", "augment", "dedup", "split", "dataset"):
        assert (project / "data" / "processed" / stage / "manifest.json").exists(), stage
    # print() is not rerouted into the run log: dill (datasets' fingerprinting of TRL's map functions) reads
    # its own dis.dis output through a stdout capture, and a rerouted print spilled ~600 bytecode lines per
    # run into the log and left dill with nothing to read
    worker_log = (Path(prefect_env["PREFECT_HOME"]) / "logs" / "worker.log").read_text(errors="replace")
    assert "Task run 'train'" in worker_log
    assert "Disassembly of" not in worker_log and "LOAD_FAST" not in worker_log


def test_unchanged_rerun_executes_nothing_and_only_augment_reruns_augment(first_run, prefect_env, project):
    assert first_run["state"] == "COMPLETED"
    again = _cli_run(prefect_env, project)
    assert again["executed"] == [] and again["cached"] == list(STAGE_NAMES)

    only = _cli_run(prefect_env, project, "--only", "augment", "--set", "augment.temperature=0.9")
    assert only["executed"] == ["augment"] and [s["stage"] for s in only["stages"]] == ["augment"]
    for downstream in ("dedup", "split", "dataset"):
        assert (project / "data" / "processed" / downstream / STALE).exists(), downstream
    assert not (project / "data" / "processed" / "fetch" / STALE).exists()


def test_sweep_two_points_reuses_unchanged_stages(first_run, prefect_env, project):
    """``finsynth sweep`` on the tiny profile with two learning rates: both points in the comparison; for
    each, the data stages (same inputs as the first run) are served from cache and only train and evaluate
    execute, each point with its own adapter and report."""
    assert first_run["state"] == "COMPLETED"
    # one training step and two evaluation items per point keep it short; those keys are train/evaluate
    # settings, so the data stages' keys are the first run's
    r = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", "--profile", "tiny", "--root", str(project),
                        "--grid", "train.learning_rate=1e-4,3e-4", "--name", "lr", "--set", "train.max_steps=1",
                        "--set", "train.eval_steps=1", "--set", "evaluate.max_items=2"],
                       env=prefect_env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout[r.stdout.rindex('{\n  "comparison"'):])  # the trainer prints dicts too
    assert result["points"] == ["learning_rate1e-4", "learning_rate3e-4"]
    # the test before left augment's folder holding another setting's output: the first point reruns
    # augment alone of the data stages (to identical output, from the LLM cache), the second none of them
    first, second = result["points"]
    assert result["executed"][first] == ["augment", "train", "evaluate"]
    assert result["executed"][second] == ["train", "evaluate"]
    for point in result["points"]:
        assert {"fetch", "dedup", "split", "format"} <= set(result["cached"][point])
        assert (project / "data" / "models" / f"adapter-{point}" / "adapter_model.safetensors").exists()
    table = read_json(project / "data" / "reports" / "sweep-lr" / "comparison.json")
    assert {row["point"] for row in table["rows"]} == set(result["points"])
    overall = [row for row in table["rows"] if row["category"] == "overall"]
    assert len(overall) == 2 and all(row["n"] and row["tuned"]["mean"] is not None for row in overall)
    assert (project / "data" / "reports" / "sweep-lr" / "comparison.png").stat().st_size > 1000
    md = (project / "data" / "reports" / "sweep-lr" / "comparison.md").read_text()
    assert "| learning_rate3e-4 | overall |" in md
