"""One rule decides whether a stage reruns (``flows.stages.settle``), whichever way it is run: its output
is kept while it was made from the stage's key, which covers the files the stage reads. Through the CLI
and a real Prefect server (the session's, from conftest.py), on the tiny profile's fetch and augment
(``augment.k=0``: no model), in a root of its own whose ``data/raw`` files are copies it may edit."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from datagen.io import STALE, read_jsonl
from flows.cli import main

pytestmark = pytest.mark.slow

REPO_RAW = Path(__file__).resolve().parents[1] / "data" / "raw"
NO_MODEL = ("--set", "augment.k=0")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A project root with copies (not links) of the repo's data/raw files."""
    shutil.copytree(REPO_RAW, tmp_path / "data" / "raw")
    return tmp_path


def run(env: dict, root: Path, *args: str) -> dict:
    """``finsynth run --profile tiny ARGS`` in a child process; its JSON summary."""
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--root", str(root), *args],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = re.search(r"run summary \(JSON\):?\s+(\S+\.json)", r.stdout + r.stderr)  # else printed as JSON
    text = Path(saved.group(1)).read_text() if saved else r.stdout
    return json.loads(text[text.index("{"): text.rindex("}") + 1])


def stage(root: Path, *args: str) -> None:
    """``finsynth STAGE --profile tiny ARGS``, in this process (no Prefect)."""
    assert main([*args, "--profile", "tiny", "--root", str(root)]) == 0


def drop_last_source_row(root: Path) -> None:
    f = root / "data" / "raw" / "sample_source_qa.jsonl"
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:-1]))


def fetched(root: Path) -> int:
    return len(read_jsonl(root / "data" / "processed" / "fetch" / "samples.jsonl"))


def test_editing_a_raw_source_reruns_fetch_and_downstream_through_finsynth_run(prefect_env, root):
    """The reproduction in issue 49: fetch, drop a row of a source file, fetch again. ``finsynth run``
    reruns fetch (one row fewer) and, through its new content, augment after it."""
    assert run(prefect_env, root, "--only", "fetch")["executed"] == ["fetch"]
    rows = fetched(root)
    stage(root, "augment", *NO_MODEL)
    drop_last_source_row(root)
    assert run(prefect_env, root, "--only", "fetch")["executed"] == ["fetch"]
    assert fetched(root) == rows - 1
    assert (root / "data" / "processed" / "augment" / STALE).exists()
    assert run(prefect_env, root, "--only", "augment", *NO_MODEL)["executed"] == ["augment"]
    assert len(read_jsonl(root / "data" / "processed" / "augment" / "samples.jsonl")) == rows - 1


def test_a_stage_command_then_finsynth_run_reruns_nothing_and_an_edit_reruns(prefect_env, root):
    """``finsynth fetch`` and ``finsynth augment`` record the key they ran with, as the Prefect task does:
    ``finsynth run`` after them reruns neither. After a source file changes, both ways rerun fetch, and a
    stage command after the run keeps what the run made."""
    stage(root, "fetch")
    stage(root, "augment", *NO_MODEL)
    again = run(prefect_env, root, "--only", "augment", *NO_MODEL)
    assert again["executed"] == [] and again["cached"] == ["augment"]
    assert run(prefect_env, root, "--only", "fetch")["cached"] == ["fetch"]
    rows = fetched(root)
    drop_last_source_row(root)
    assert run(prefect_env, root, "--only", "fetch")["executed"] == ["fetch"] and fetched(root) == rows - 1
    made = (root / "data" / "processed" / "fetch" / "manifest.json").stat().st_mtime_ns
    stage(root, "fetch")  # current: kept
    assert (root / "data" / "processed" / "fetch" / "manifest.json").stat().st_mtime_ns == made
    drop_last_source_row(root)
    stage(root, "fetch")
    assert fetched(root) == rows - 2


def test_losing_prefects_home_and_results_reruns_nothing_that_is_current(prefect_env, root, tmp_path_factory):
    """Prefect's cache is a view of the decision, not the decision: a run under a new, empty Prefect home
    (a temporary server) with the old result storage gone keeps the current fetch output."""
    assert run(prefect_env, root, "--only", "fetch")["executed"] == ["fetch"]
    shutil.rmtree(root / "data" / "cache" / "prefect-results")
    home = tmp_path_factory.mktemp("new-prefect-home")
    fresh = {k: v for k, v in prefect_env.items()
             if k not in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_LOCAL_STORAGE_PATH",
                          "PREFECT_SERVER_API_PORT")}
    fresh.update(PREFECT_HOME=str(home), PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="true")
    again = run(fresh, root, "--only", "fetch")
    assert again["executed"] == [] and again["cached"] == ["fetch"]
