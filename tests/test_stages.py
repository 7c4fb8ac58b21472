"""The stage registry: selection, and staleness after a stage reruns outside Prefect too."""

import pytest

from datagen.io import STALE, write_manifest
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
        write_manifest(tiny_cfg.paths.stage_dir(stage), {"stage": stage})
    assert mark_downstream_stale(tiny_cfg, "augment") == ["dedup", "split"]  # format/train/... unfinished
    assert (tiny_cfg.paths.stage_dir("dedup") / STALE).exists()
    assert not (tiny_cfg.paths.stage_dir("fetch") / STALE).exists()


def test_cli_stage_command_marks_downstream_stale(tiny_cfg, tmp_root):
    dedup = tiny_cfg.paths.stage_dir("dedup")
    write_manifest(dedup, {"stage": "dedup"})
    assert main(["fetch", "--profile", "tiny", "--root", str(tmp_root)]) == 0
    assert (dedup / STALE).read_text().startswith("upstream stage 'fetch' was rerun")
    assert not (tiny_cfg.paths.stage_dir("fetch") / STALE).exists()


def test_each_stage_module_declares_one_spec_and_nothing_else_named_stage():
    """``STAGE`` in a stage module is its spec, assigned once (a string constant of the same name
    would be overwritten by the spec and leak into drop records and manifests)."""
    import ast
    import importlib

    from datagen.stage import StageSpec
    from flows.stages import STAGES

    for spec in STAGES:
        mod = importlib.import_module(spec.module)
        assert isinstance(spec, StageSpec) and mod.STAGE is spec
        tree = ast.parse(open(mod.__file__, encoding="utf-8").read())
        assigned = [n for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name) and t.id == "STAGE"]
        assert len(assigned) == 1, f"{spec.module} assigns STAGE {len(assigned)} times"
