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
