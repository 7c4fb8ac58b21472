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
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--root", str(root), "--json",
                        *args],
                       env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    return json.loads(out[out.index("{"): out.rindex("}") + 1])


def test_deployment_runs_the_whole_pipeline(first_run, prefect_env, project):
    assert first_run["state"] == "COMPLETED", first_run.get("message")
    result = first_run["result"]
    assert result["executed"] == list(STAGE_NAMES) and result["cached"] == []
    dataset = project / "data" / "processed" / "format"
    assert (dataset / "README.md").read_text().startswith("---\n")
    assert (dataset / "train.parquet").exists() and (dataset / "test.parquet").exists()
    adapter = project / "data" / "models" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    report = read_json(project / "data" / "reports" / "eval" / "report.json")
    assert report  # a report with content
    for stage in ("fetch", "augment", "dedup", "split", "format"):
        assert (project / "data" / "processed" / stage / "manifest.json").exists(), stage
    # print() is not rerouted into the run log: dill (datasets' fingerprinting of TRL's map functions) reads
    # its own dis.dis output through a stdout capture, and a rerouted print spilled ~600 bytecode lines per
    # run into the log and left dill with nothing to read
    worker_log = (Path(prefect_env["PREFECT_HOME"]) / "logs" / "worker.log").read_text(errors="replace")
    assert "Task run 'train'" in worker_log
    assert "Disassembly of" not in worker_log and "LOAD_FAST" not in worker_log


def test_every_manifests_config_hash_is_its_specs(first_run, project):
    """A manifest's config hash comes from its stage's spec (the config sections the stage reads), in one
    place: augment's covers ``dedup.embedder`` and evaluate's ``format.system_prompt``, which they read."""
    from datagen.config import load_config
    from flows.stages import STAGES

    assert first_run["state"] == "COMPLETED", first_run.get("message")
    cfg = load_config(profile="tiny", root=project)
    for spec in STAGES:
        manifest = read_json(spec.output(cfg) / "manifest.json")
        assert manifest["config_hash"] == cfg.section_hash(*spec.config_sections), spec.name


def test_the_main_commands_reader_streams_stage_lines_while_the_run_runs(first_run, prefect_env):
    """flows.deploy's reader (flows.progress.follow over Prefect's logs API) got each stage's lines while
    the flow run was still running, and only finsynth's lines: no library warning, no traceback."""
    assert first_run["state"] == "COMPLETED", first_run.get("message")
    lines = first_run["progress"]
    msgs = [ln["message"] for ln in lines]
    assert {ln["name"] for ln in lines} <= {"finsynth.stage", "finsynth.progress"}, msgs
    for stage in STAGE_NAMES:
        assert f"{stage}: started" in msgs, msgs
        assert any(m.startswith(f"{stage}: done in ") for m in msgs), msgs
    fetch_done = next(ln for ln in lines if ln["message"].startswith("fetch: done in "))
    assert " rows" in fetch_done["message"]
    # it arrived while later stages still ran: before the flow run ended, by the server's clock
    assert fetch_done["received"] < first_run["end_time"], (fetch_done, first_run["end_time"])
    train_done = next(ln for ln in lines if ln["message"].startswith("train: done in "))
    assert train_done["received"] < first_run["end_time"]
    # live progress of the long parts: rephrasing requests, training steps with their loss, evaluation batches
    assert any(m.startswith("rephrase") and " requests (" in m for m in msgs), msgs
    assert any(m.startswith("train step ") and ", loss " in m for m in msgs), msgs
    assert any(m.startswith("generate tuned ") and " batches (" in m for m in msgs), msgs
    assert not any("Traceback" in m or "Warning" in m for m in msgs)
    # the same lines are the flow run's log in Prefect (what the UI's run page shows)
    code = ("import json, sys; from prefect import get_client; from prefect.client.schemas.filters import LogFilter, "
            "LogFilterFlowRunId\nwith get_client(sync_client=True) as c:\n    logs = c.read_logs(LogFilter(flow_run_id="
            "LogFilterFlowRunId(any_=[sys.argv[1]])), limit=200)\nprint(json.dumps([lg.message for lg in logs]))")
    r = subprocess.run([sys.executable, "-c", code, first_run["flow_run_id"]], env=prefect_env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert fetch_done["message"] in json.loads(r.stdout)


def test_a_failing_run_ends_with_the_stage_and_one_line(tmp_path, prefect_env):
    """``finsynth run --only fetch`` on an empty root: the terminal shows the stage line and the one-line
    error, the rest is in the log file whose path it prints."""
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--only", "fetch", "--root",
                        str(tmp_path)], env=prefect_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    err = r.stderr.splitlines()
    assert len(err) <= 6 and "Traceback" not in r.stderr and "HTTP Request" not in r.stderr, r.stderr
    assert any(ln.endswith("  fetch: started") for ln in err), r.stderr
    assert any("fetch: failed after " in ln and "source QA file not found" in ln for ln in err), r.stderr
    assert err[-2] == f"finsynth: error: source QA file not found: {tmp_path}/data/raw/sample_source_qa.jsonl"
    log = err[-1].removeprefix("  full log: ").split(" (--debug")[0]
    assert "Traceback" in Path(log).read_text()  # the whole story is kept, in the file


def test_unchanged_rerun_executes_nothing_and_only_augment_reruns_augment(first_run, prefect_env, project):
    assert first_run["state"] == "COMPLETED"
    again = _cli_run(prefect_env, project)
    assert again["executed"] == [] and again["cached"] == list(STAGE_NAMES)

    only = _cli_run(prefect_env, project, "--only", "augment", "--set", "augment.temperature=0.9")
    assert only["executed"] == ["augment"] and [s["stage"] for s in only["stages"]] == ["augment"]
    for downstream in ("dedup", "split", "format"):
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
