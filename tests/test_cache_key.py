"""What a stage's cache key covers (issue 12): each hole the review found, closed. Pure functions of
``flows.stages``; the Prefect run in tests/test_flows.py uses exactly these keys."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import flows.stages as fs
from datagen.manifest import Manifest
from datagen.io import (
    STALE,
    StageOutputError,
    manifest_hash,
    mark_stale,
    require_stage,
    write_json,
    write_jsonl,
    write_manifest,
)
from flows.stages import cache_inputs, get_stage, inputs_key, output_matches

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def src_copy(tmp_path, monkeypatch):
    """A copy of src/ and prompts/ that the key functions read instead of the real ones."""
    for pkg in fs.PROJECT_PACKAGES:
        shutil.copytree(REPO / "src" / pkg, tmp_path / "src" / pkg)
    shutil.copytree(REPO / "prompts", tmp_path / "prompts")
    monkeypatch.setattr(fs, "_package_dir", lambda pkg: tmp_path / "src" / pkg)
    monkeypatch.setattr(fs, "PROMPTS_DIR", tmp_path / "prompts")
    return tmp_path


def keys(cfg) -> dict[str, str]:
    return {s.name: inputs_key(cache_inputs(cfg, s)) for s in fs.STAGES}


def test_editing_a_module_augment_imports_changes_augment_only(tiny_cfg, src_copy):
    before = keys(tiny_cfg)
    with open(src_copy / "src" / "datagen" / "augmentation" / "validators.py", "a") as f:
        f.write("\n# an edit\n")
    after = keys(tiny_cfg)
    assert after["augment"] != before["augment"]
    assert after["fetch"] == before["fetch"] and after["dedup"] == before["dedup"]
    assert "datagen.augmentation.validators" in fs.module_closure("datagen.augmentation.augment")


def test_the_model_package_is_stage_code_and_imports_no_stage(tiny_cfg, src_copy):
    """``lm`` (loading, generation) is project code: a change in it reruns the stages that run it
    (training, evaluation, and every stage that imports the LLM providers). It imports neither
    ``datagen`` nor ``training``."""
    for module in ("lm.causal_lm", "lm.packaged", "lm.config"):
        assert {m.split(".")[0] for m in fs.module_closure(module)} == {"lm"}, fs.module_closure(module)
    before = keys(tiny_cfg)
    with open(src_copy / "src" / "lm" / "causal_lm.py", "a") as f:
        f.write("\n# an edit\n")
    after = keys(tiny_cfg)
    assert after["train"] != before["train"] and after["evaluate"] != before["evaluate"]


def test_editing_sft_user_prompt_reruns_format_and_through_it_train_and_evaluate(tiny_cfg, src_copy):
    assert "sft_user" in fs.stage_prompts(tiny_cfg, get_stage("format"))
    assert {"rephrase", "rephrase_retry"} <= set(fs.stage_prompts(tiny_cfg, get_stage("augment")))
    before = keys(tiny_cfg)
    (src_copy / "prompts" / "sft_user.jinja").write_text("Q: {{ question }}\n")
    after = keys(tiny_cfg)
    assert after["format"] != before["format"]
    assert after["fetch"] == before["fetch"] and after["augment"] == before["augment"]
    # train and evaluate read format's rendered messages: its new content changes their keys
    _finish(tiny_cfg, "format", [{"id": "a", "messages": "old"}])
    k = keys(tiny_cfg)
    _finish(tiny_cfg, "format", [{"id": "a", "messages": "new"}])
    assert keys(tiny_cfg)["train"] != k["train"] and keys(tiny_cfg)["evaluate"] != k["evaluate"]


def test_dedup_embedder_is_in_augments_key_but_dedup_threshold_is_not(tiny_cfg):
    base = inputs_key(cache_inputs(tiny_cfg, get_stage("augment")))
    emb = tiny_cfg.model_copy(deep=True)
    emb.dedup.embedder.max_seq_length = 64
    thr = tiny_cfg.model_copy(deep=True)
    thr.dedup.threshold = 0.5
    assert inputs_key(cache_inputs(emb, get_stage("augment"))) != base
    assert inputs_key(cache_inputs(thr, get_stage("augment"))) == base


def _finish(cfg, name: str, rows: list[dict], **extra) -> None:
    out = get_stage(name).output(cfg)
    write_jsonl(out / "samples.jsonl", rows)
    write_manifest(out, Manifest(stage=name, **extra))


def test_deleted_or_edited_output_does_not_match_its_key(tiny_cfg):
    stage = get_stage("dedup")
    _finish(tiny_cfg, "augment", [{"id": "a"}])
    key = cache_inputs(tiny_cfg, stage)
    out = stage.output(tiny_cfg)
    _finish(tiny_cfg, "dedup", [{"id": "a"}])
    write_json(out / "run.json", {"inputs_key": inputs_key(key)})
    assert output_matches(tiny_cfg, stage, key)
    (out / "samples.jsonl").write_text('{"id": "edited"}\n')
    assert not output_matches(tiny_cfg, stage, key)
    shutil.rmtree(out)
    assert not output_matches(tiny_cfg, stage, key)


def test_rerun_to_identical_output_keeps_downstream_keys(tiny_cfg):
    _finish(tiny_cfg, "augment", [{"id": "a"}], timing={"embed_s": 1.5})
    h1, k1 = manifest_hash(tiny_cfg.paths.stage_dir("augment")), keys(tiny_cfg)["dedup"]
    _finish(tiny_cfg, "augment", [{"id": "a"}], timing={"embed_s": 9.9})  # other timings, same rows
    assert manifest_hash(tiny_cfg.paths.stage_dir("augment")) == h1 and keys(tiny_cfg)["dedup"] == k1
    assert (tiny_cfg.paths.stage_dir("augment") / "timings.json").exists()
    assert "embed_s" not in (tiny_cfg.paths.stage_dir("augment") / "manifest.json").read_text()
    _finish(tiny_cfg, "augment", [{"id": "b"}])
    assert keys(tiny_cfg)["dedup"] != k1


def test_stale_upstream_is_refused_with_the_command_that_refreshes_it(tiny_cfg, monkeypatch):
    _finish(tiny_cfg, "dedup", [{"id": "a"}])
    mark_stale(tiny_cfg.paths.stage_dir("dedup"), "upstream stage 'augment' was rerun")
    with pytest.raises(StageOutputError, match=r"stage 'dedup' is STALE \(upstream stage 'augment' was rerun\): "
                                               r"refresh it with `finsynth run --from dedup`, or pass --allow-stale"):
        require_stage(tiny_cfg.paths.stage_dir("dedup"), "dedup")
    monkeypatch.setenv("FINSYNTH_ALLOW_STALE", "1")
    assert require_stage(tiny_cfg.paths.stage_dir("dedup"), "dedup").stage == "dedup"
    assert (tiny_cfg.paths.stage_dir("dedup") / STALE).exists()


def test_cli_refuses_a_stale_upstream_and_allow_stale_lets_it_through(tiny_cfg, tmp_root, capsys):
    from flows.cli import main

    assert main(["fetch", "--profile", "tiny", "--root", str(tmp_root)]) == 0
    mark_stale(tiny_cfg.paths.stage_dir("fetch"), "testing")
    assert main(["augment", "--profile", "tiny", "--root", str(tmp_root), "--set", "augment.k=0"]) == 2
    assert "stage 'fetch' is STALE (testing)" in capsys.readouterr().err


def test_a_code_change_in_a_stage_module_reruns_that_stage_and_downstream_only(tiny_cfg, src_copy):
    """Each stage's own module is in its key and in no earlier stage's; and ``execute`` (what
    ``finsynth <stage>`` runs) decides by the key: after an edit of augment's module, fetch is kept and
    augment reruns; after an edit of fetch's module, fetch reruns to the same output and augment, whose
    inputs are then unchanged, is kept."""
    from flows.stages import execute

    order = [s.name for s in fs.STAGES]
    for s in fs.STAGES:
        before = keys(tiny_cfg)
        path = fs._module_file(s.module)
        path.write_text(path.read_text() + "\n# an edit\n")
        after = keys(tiny_cfg)
        changed = [n for n in order if after[n] != before[n]]
        assert s.name in changed and all(order.index(n) >= order.index(s.name) for n in changed), (s.name, changed)

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.augment.k = 0  # no model

    def made() -> dict[str, int]:  # when each stage last wrote its manifest
        return {n: (get_stage(n).output(cfg) / "manifest.json").stat().st_mtime_ns for n in ("fetch", "augment")}

    for n in ("fetch", "augment"):
        execute(cfg, n)
    first = made()
    for n in ("fetch", "augment"):
        execute(cfg, n)
    assert made() == first  # nothing changed: both kept
    with open(src_copy / "src" / "datagen" / "augmentation" / "augment.py", "a") as f:
        f.write("\n# another edit\n")
    for n in ("fetch", "augment"):
        execute(cfg, n)
    second = made()
    assert second["fetch"] == first["fetch"] and second["augment"] != first["augment"]
    with open(src_copy / "src" / "datagen" / "sources" / "fetch.py", "a") as f:
        f.write("\n# another edit\n")
    for n in ("fetch", "augment"):
        execute(cfg, n)
    third = made()
    assert third["fetch"] != second["fetch"] and third["augment"] == second["augment"]
