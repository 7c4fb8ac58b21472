"""The stage registry: selection, and staleness after a stage reruns outside Prefect too."""

import pytest

from datagen.io import STALE, write_manifest
from datagen.manifest import Manifest
from flows.cli import main
from flows.stages import STAGE_NAMES, mark_downstream_stale, select


def test_select_only_from_and_all():
    assert [s.name for s in select()] == list(STAGE_NAMES)
    assert [s.name for s in select(only="augment")] == ["augment"]
    assert [s.name for s in select(start="train")] == ["train", "evaluate"]
    with pytest.raises(ValueError, match="not both"):
        select(only="fetch", start="dedup")


def test_mark_downstream_stale_marks_only_finished_later_stages(tiny_cfg):
    for stage in ("fetch", "dedup", "split"):
        write_manifest(tiny_cfg.paths.stage_dir(stage), Manifest(stage=stage))
    assert mark_downstream_stale(tiny_cfg, "augment") == ["dedup", "split"]  # format/train/... unfinished
    assert (tiny_cfg.paths.stage_dir("dedup") / STALE).exists()
    assert not (tiny_cfg.paths.stage_dir("fetch") / STALE).exists()


def test_cli_stage_command_marks_downstream_stale(tiny_cfg, tmp_root):
    dedup = tiny_cfg.paths.stage_dir("dedup")
    write_manifest(dedup, Manifest(stage="dedup"))
    assert main(["fetch", "--profile", "tiny", "--root", str(tmp_root)]) == 0
    assert (dedup / STALE).read_text().startswith("upstream stage 'fetch' was rerun")
    assert not (tiny_cfg.paths.stage_dir("fetch") / STALE).exists()


def test_each_stage_module_exports_its_spec_and_its_manifest_names_it():
    """``STAGE`` in a stage module is its spec, and the manifest class it declares writes the stage's name
    (drop records name their stage too: test_fetch, test_augment, test_dedup, test_split, test_chat_format)."""
    import importlib

    from flows.stages import STAGES

    for spec in STAGES:
        assert importlib.import_module(spec.module).STAGE is spec
        assert spec.manifest().stage == spec.name and spec.manifest is not Manifest, spec.name


def test_no_stage_module_names_another_stages_folder():
    """Stages get their upstream folders and their own folder from the orchestration: no ``stage_dir``
    call in a stage module (or anywhere in src/ but the spec's default), no folder named apart from its stage."""
    import re
    from pathlib import Path

    from flows.stages import STAGES

    src = Path(__file__).resolve().parents[1] / "src"
    calls = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py")
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"stage_dir\(", line) and "def stage_dir" not in line
             and p.name != "stage.py" and not line.lstrip().startswith(("#", "``", "\""))]
    assert calls == []
    data_stages = [s for s in STAGES if s.folder is None]
    assert [s.name for s in data_stages] == ["fetch", "augment", "dedup", "split", "format"]


TOY = '''"""A stage from another package: the word count of every fetched question."""
from dataclasses import dataclass

from datagen.io import read_jsonl, write_jsonl, write_manifest
from datagen.manifest import Manifest
from datagen.stage import StageSpec


@dataclass(kw_only=True)
class ToyManifest(Manifest):
    stage: str = "toy"
    read: str = ""  # the folder it read


def run_toy(cfg, inputs, out):
    rows = read_jsonl(inputs["fetch"] / "samples.jsonl")
    write_jsonl(out / "words.jsonl", [{"id": r["id"], "words": len(r["question"].split())} for r in rows])
    return write_manifest(out, ToyManifest(config_hash=STAGE.config_hash(cfg), counts={"in": len(rows)},
                                           read=str(inputs["fetch"])))


STAGE = StageSpec("toy", run_toy, __name__, ("sources",), upstream=("fetch",), manifest=ToyManifest)
'''


@pytest.mark.slow
def test_a_stage_registered_by_another_package_runs_through_finsynth_run(prefect_env, tmp_path):
    """Adding a stage is one module with one spec: a package that registers ``toy`` under the
    ``finsynth.stages`` entry point (a real installed distribution's metadata on the path) gets a CLI
    command and a Prefect flow, runs after its upstream with its inputs and folder from the specs, and is
    ``Cached`` on an unchanged rerun, without a line of finsynth edited."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from datagen.io import read_jsonl

    site = tmp_path / "site"
    (site / "toy_stage-0.1.dist-info").mkdir(parents=True)
    (site / "toy_stage.py").write_text(TOY)
    (site / "toy_stage-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-stage\nVersion: 0.1\n")
    (site / "toy_stage-0.1.dist-info" / "entry_points.txt").write_text("[finsynth.stages]\ntoy = toy_stage:STAGE\n")
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "raw").symlink_to(Path(__file__).resolve().parents[1] / "data" / "raw")
    env = {**prefect_env, "PYTHONPATH": os.pathsep.join(p for p in (str(site), prefect_env.get("PYTHONPATH")) if p)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--profile", "tiny", "--root", str(root)],
                           env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return r

    usage = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], env=env, capture_output=True, text=True)
    assert "toy" in usage.stdout
    cli("fetch")
    runs = []
    for _ in range(2):
        out = cli("run", "--only", "toy", "--json").stdout
        runs.append(json.loads(out[out.index("{"): out.rindex("}") + 1]))
    assert runs[0]["executed"] == ["toy"] and runs[1]["cached"] == ["toy"]
    folder = root / "data" / "processed" / "toy"
    fetched = read_jsonl(root / "data" / "processed" / "fetch" / "samples.jsonl")
    assert [r["id"] for r in read_jsonl(folder / "words.jsonl")] == [r["id"] for r in fetched]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["read"] == str(root / "data" / "processed" / "fetch") and manifest["counts"]["in"] == len(fetched)
