"""Dataset card: Hub-valid YAML metadata, a body built from the upstream manifests, robustness to
missing manifests, and `finsynth card`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from datagen.dataset.card import build_card, parse_card, size_category, source_info, write_card
from datagen.io import write_json, write_jsonl, write_manifest
from datagen.manifest import AugmentManifest, DedupManifest, FetchManifest, FormatManifest, SplitManifest

SUMMARY = {
    "stage": "format", "config_hash": "fmt123", "model": "packaged:gemma3-270m", "max_tokens": 768,
    "long_context": "drop", "fingerprint": "0123456789ab",
    "splits": ["train", "validation", "test"],
    "prompts": [{"name": "system_analyst", "hash": "aaaaaaaaaaaa"}, {"name": "sft_user", "hash": "bbbbbbbbbbbb"}],
    "counts": {"train": 80, "validation": 10, "test": 9, "dropped_too_long": 1, "truncated": 0},
    "data": {
        "by_task_type": {"train": {"classification": 20, "numeric_qa": 60}, "validation": {"numeric_qa": 10},
                         "test": {"numeric_qa": 9}},
        "by_source": {"train": {"market:simulator": 50, "finsynth-sample-qa": 30},
                      "validation": {"market:simulator": 10}, "test": {"finsynth-sample-qa": 9}},
        "by_cluster": {"train": {"crash": 30, "calm": 50}, "validation": {"crash": 10}, "test": {"calm": 9}},
        "groups": {"train": 30, "validation": 10, "test": 9},
        "rephrasings": {"train": 20, "validation": 0, "test": 0},
        "rephrased_groups": {"train": 8, "validation": 0, "test": 0},
    },
    "token_lengths": {"train": {"n": 80, "min": 50, "mean": 120.5, "p50": 110, "p95": 300, "max": 400}},
}


def UPSTREAM(cfg):  # noqa: N802 - what the format stage passes build_card: the upstream stages' folders
    return {n: cfg.paths.stage_dir(n) for n in ("fetch", "augment", "dedup", "split")}


def _manifests(cfg):
    p = cfg.paths
    write_manifest(p.stage_dir("fetch"), FetchManifest.from_json({
        "stage": "fetch", "config_hash": "f1",
        "counts": {"per_source": {"market:simulator": 60, "finsynth-sample-qa": 165},
                   "per_category": {"credit_risk": 40, "returns": 185}},
        "quarantine": {"total": 2, "by_reason": {"missing_field": 2}}}))
    write_manifest(p.stage_dir("augment"), AugmentManifest.from_json({
        "stage": "augment", "config_hash": "a1",
        "prompts": {"rephrase": {"name": "rephrase", "hash": "cccccccccccc"}},
        "counts": {"rephrased_items": 24},
        "rephrase": {"k": 3, "slots": 72, "kept": 54, "missing": 18, "acceptance": 0.75,
                     "first_attempt_acceptance": 0.6, "candidate_acceptance": 0.5,
                     "rejected_by_reason": {"too_similar": 10}},
        "llm_usage": {"local": {"model": "gemma3-270m", "calls": 100, "cache_hits": 4}}}))
    write_manifest(p.stage_dir("dedup"), DedupManifest.from_json({
        "stage": "dedup", "config_hash": "d1", "embedder": {"name": "packaged:all-minilm-l6-v2"},
        "threshold": 0.92, "within_group_threshold": 0.985, "method": "exact",
        "counts": {"in": 279, "kept": 270, "dropped_by_reason": {"exact_duplicate": 3, "near_duplicate": 5,
                                                               "within_group_near_copy": 1}}}))
    sd = p.stage_dir("split")
    write_json(sd / "clusters.json", {"cluster_by": "scenario", "kmeans": {}, "clusters": [  # before format
        {"name": "crash", "source": "scenario", "rows": {"train": 40, "validation": 5, "test": 4},
         "proportion": {"train": 0.5, "validation": 0.5, "test": 0.4444}},
        {"name": "calm", "source": "category", "rows": {"train": 60}, "proportion": {"train": 0.5}}]})
    write_manifest(sd, SplitManifest.from_json({"stage": "split", "config_hash": "s1",
                        "counts": {"groups": {"train": 30, "validation": 10, "test": 9},
                                   "dropped_by_reason": {"test_rephrase": 12, "balance_train": 0}},
                        "leakage": {"max_cross_split_cosine": 0.9123, "threshold": 0.92,
                                    "cross_split_pairs_above_threshold": 0, "cross_split_duplicates": 0,
                                    "min_number_overlap": 0.8, "groups_in_two_splits": 0}}))


def test_card_metadata_is_hub_shaped(demo_cfg):
    _manifests(demo_cfg)
    meta, body = parse_card(build_card(demo_cfg, FormatManifest.from_json(SUMMARY), UPSTREAM(demo_cfg)))
    assert meta["configs"] == [{"config_name": "finsynth-demo-0123456789ab", "default": True, "data_files": [
        {"split": "train", "path": "train.parquet"}, {"split": "validation", "path": "validation.parquet"},
        {"split": "test", "path": "test.parquet"}]}]
    assert meta["size_categories"] == ["n<1K"]
    # market QA is computed by code (machine-generated); the source QA file declares nothing: found, unknown
    assert meta["annotations_creators"] == ["found", "machine-generated"]
    assert meta["license"] == ["apache-2.0", "unknown"] and meta["language"] == ["en"]
    assert meta["task_categories"] == ["question-answering", "text-generation", "text-classification"]
    assert meta["source_datasets"] == ["extended|finsynth-sample-qa", "original"]
    assert meta["pretty_name"] == demo_cfg.card.pretty_name
    from huggingface_hub import DatasetCard

    card = DatasetCard(build_card(demo_cfg, FormatManifest.from_json(SUMMARY), UPSTREAM(demo_cfg)))
    assert card.data.to_dict()["configs"] == meta["configs"]


def test_card_body_states_every_stage(demo_cfg):
    _manifests(demo_cfg)
    _, body = parse_card(build_card(demo_cfg, FormatManifest.from_json(SUMMARY), UPSTREAM(demo_cfg)))
    for text in ["| finsynth-sample-qa | 39 | 165 | unknown | found |",
                 "| market:simulator | 60 | 60 | apache-2.0 | machine-generated |",
                 "Acceptance: 75.0% of slots filled (first attempt 60.0%; 50.0% of candidates accepted)",
                 "In this dataset: 20 rephrasings of 8 items.",
                 "| exact_duplicate | 3 |", "| near_duplicate | 5 |", "| within_group_near_copy | 1 |",
                 "At dedup: rows in 279, kept 270.",
                 "| calm | category | 50 (62.5%) | 0 (0.0%) | 9 (100.0%) |",
                 "| crash | scenario | 30 (37.5%) | 10 (100.0%) | 0 (0.0%) |",
                 "Groups per split: train 30, validation 10, test 9.",
                 "Removed at split: balance_train 0, test_rephrase 12.",
                 "largest cross-split cosine 0.9123", "of which duplicates (same figures, overlap >= 0.8): 0",
                 "| train | 80 | 50 | 120.5 | 110 | 300 | 400 |", "![token lengths](__meta__/token_lengths.png)",
                 "| `rephrase` | `cccccccccccc` |", "| `sft_user` | `bbbbbbbbbbbb` |",
                 "LLM `local`: `gemma3-270m` (100 calls, 4 cache hits)", "`packaged:all-minilm-l6-v2`",
                 "The test split holds originals only."]:
        assert text in body, text


def test_card_without_upstream_manifests_says_not_recorded(demo_cfg):
    meta, body = parse_card(build_card(demo_cfg, FormatManifest(counts={"train": 3})))
    assert meta["size_categories"] == ["n<1K"] and meta["source_datasets"] == []
    assert "not recorded" in body and "## Deduplication" in body


def _augment(cfg, **rephrase):
    write_manifest(cfg.paths.stage_dir("augment"), AugmentManifest(counts={"rephrased_items": 24}, rephrase=rephrase))


def test_card_items_rephrased_is_zero_when_k_is_zero(demo_cfg):
    _augment(demo_cfg, k=0, slots=0, kept=0, missing=0, acceptance=None, first_attempt_acceptance=None,
             candidate_acceptance=None, rejected_by_reason={})
    _, body = parse_card(build_card(demo_cfg, FormatManifest.from_json(
        {**SUMMARY, "data": {**SUMMARY["data"], "rephrasings": {}, "rephrased_groups": {}}}), UPSTREAM(demo_cfg)))
    assert "items rephrased: 0" in body and "24" not in body.split("## Rephrasing")[1].split("##")[0]
    assert "Acceptance" not in body and "not recorded of slots" not in body


def test_card_reports_drops_of_fetch_and_augment_by_reason(demo_cfg):
    p = demo_cfg.paths
    write_manifest(p.stage_dir("fetch"), FetchManifest(
        counts={"dropped_missing": 2, "dropped_bad_label": 1},
        quarantine={"total": 3, "by_reason": {"missing": 2, "bad_label": 1}}))
    write_manifest(p.stage_dir("augment"), AugmentManifest.from_json({
        "stage": "augment", "counts": {"rephrased_items": 5, "rejections": 7, "dropped_near_copy": 6,
                                       "dropped_missing_metrics": 1},
        "rephrase": {"k": 2, "slots": 10, "kept": 4, "missing": 6, "rejected_by_reason": {"near_copy": 6}}}))
    _, body = parse_card(build_card(demo_cfg, FormatManifest.from_json(SUMMARY), UPSTREAM(demo_cfg)))
    assert "Rows quarantined at fetch (invalid): 3, by reason: bad_label 1, missing 2." in body
    assert ("Dropped at augment (every rejected candidate, rephrasings and scenario tasks): missing_metrics 1, "
            "near_copy 6.") in body


def test_card_acceptance_only_when_recorded(demo_cfg):
    _augment(demo_cfg, k=2, slots=10, kept=4, missing=6, rejected_by_reason={"near_copy": 6})
    _, body = parse_card(build_card(demo_cfg, FormatManifest.from_json(SUMMARY), UPSTREAM(demo_cfg)))
    assert "Acceptance" not in body and "slots 10, kept 4, missing 6" in body


def test_source_info_reads_what_a_source_declares():
    declared = SimpleNamespace(name="finqa", path="x.jsonl", license="mit", annotations_creators=["expert-generated"],
                               language_creators=["found"], source_datasets=["extended|ibm/finqa"])
    assert source_info(declared, generated=False, own_license="apache-2.0") == {
        "license": "mit", "annotations_creators": ["expert-generated"], "language_creators": ["found"],
        "source_datasets": ["extended|ibm/finqa"]}
    plain = SimpleNamespace(name=None, path="data/raw/credit.csv")
    assert source_info(plain, generated=False, own_license="apache-2.0") == {
        "license": "unknown", "annotations_creators": ["found"], "language_creators": ["found"],
        "source_datasets": ["extended|credit"]}
    assert source_info(None, generated=True, own_license="apache-2.0") == {
        "license": "apache-2.0", "annotations_creators": ["machine-generated"],
        "language_creators": ["machine-generated"], "source_datasets": ["original"]}


@pytest.mark.parametrize("n,cat", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (250_000, "100K<n<1M"),
                                   (5_000_000, "1M<n<10M")])
def test_size_category(n, cat):
    assert size_category(n) == cat


def test_finsynth_card_prints_it(demo_cfg, capsys):
    from flows.cli import main

    _manifests(demo_cfg)
    write_card(demo_cfg.paths.stage_dir("format") / "README.md",
               build_card(demo_cfg, FormatManifest.from_json(SUMMARY), UPSTREAM(demo_cfg)))
    assert main(["card", "--profile", "demo", "--root", str(demo_cfg.paths.root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("---\n") and "# finsynth synthetic finance QA" in out


def _md_tables(body: str) -> dict[str, list[list[str]]]:
    """Every Markdown table of the body, keyed by its header cells joined with ','."""
    tables, cur = {}, None
    for line in body.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cur is None:
                cur = tables.setdefault(",".join(cells), [])
            else:
                cur.append(cells)
        elif not line.startswith("|"):
            cur = None
    return tables


@pytest.fixture(scope="module")
def tokenizer():
    from datagen.config import ModelConfig
    from datagen.tokenizer import load_tokenizer

    return load_tokenizer(ModelConfig())


def _qa(id_, source, cluster, group=None, rephrase=False, question="What is ACME's close?", task_type="numeric_qa"):
    return {"id": id_, "group_id": group or id_, "source": source, "task_type": task_type, "category": cluster,
            "scenario": None, "question": question, "context": {"text": "Close 101.5.", "table": None},
            "answer": "101.5", "labels": None, "metadata": {"cluster": cluster},
            "is_rephrase": rephrase, "rephrase_index": 1 if rephrase else None}


@pytest.mark.slow
def test_card_counts_match_the_parquet_files(demo_cfg, tokenizer):
    """Format a small split (with drops), read the written card back and check each figure against Parquet."""
    import pandas as pd

    from flows.stages import invoke

    _manifests(demo_cfg)  # upstream history (its cluster counts predate the length filter)
    long_q = "Why? " * 400
    rows = {"train": [_qa("m1", "market:simulator", "crash"),
                      _qa("m2", "market:simulator", "crash", question=long_q),
                      _qa("m2r", "market:simulator", "crash", group="m1", rephrase=True, question="Close of ACME?"),
                      _qa("q1", "finsynth-sample-qa", "calm"),
                      _qa("q2", "finsynth-sample-qa", "calm", question=long_q)],
            "validation": [_qa("q3", "finsynth-sample-qa", "calm"), _qa("s1", "scenario_synth", "fx_crisis")],
            "test": [_qa("m3", "market:simulator", "crash")]}
    d = demo_cfg.paths.stage_dir("split")
    for s, r in rows.items():
        write_jsonl(d / f"{s}.jsonl", r)
    invoke(demo_cfg, "format", tokenizer=tokenizer)
    out = demo_cfg.paths.stage_dir("format")
    meta, body = parse_card((out / "README.md").read_text())
    df = pd.concat([pd.read_parquet(out / f"{s}.parquet").assign(split=s) for s in ("train", "validation", "test")])
    t = _md_tables(body)
    assert {r[0]: int(r[1]) for r in t["split,rows"]} == {**df.split.value_counts().to_dict(), "total": len(df)}
    assert meta["size_categories"] == [size_category(len(df))]
    src = t["source,rows in dataset,rows fetched,license,annotations"]
    assert {r[0]: int(r[1]) for r in src} == df.source.value_counts().to_dict()
    clu = t["cluster,from,train rows (share),validation rows (share),test rows (share)"]
    assert {r[0] for r in clu} == set(df.cluster)
    for r in clu:
        for i, s in enumerate(("train", "validation", "test")):
            n, of = ((df.cluster == r[0]) & (df.split == s)).sum(), (df.split == s).sum()
            assert r[2 + i] == f"{n} ({100 * n / of:.1f}%)", (r, s)
    tl = t["split,n,min,mean,p50,p95,max"]
    for r in tl:
        lengths = df[df.split == r[0]].n_tokens
        assert [int(r[1]), int(r[2]), int(r[-1])] == [len(lengths), lengths.min(), lengths.max()], r
    assert {r[0] for r in tl} == set(df.split)
    g = df.groupby("split").group_id.nunique().to_dict()
    assert f"Groups per split: train {g['train']}, validation {g['validation']}, test {g['test']}." in body
    reph = df[df.is_rephrase]
    assert f"In this dataset: {len(reph)} rephrasings of {reph.group_id.nunique()} items." in body
    assert "too_long 2" in body and "dropped_too_long" not in meta
    tt = df.task_type.value_counts().to_dict()
    assert meta["task_categories"] == ["question-answering", "text-generation"] and set(tt) == {"numeric_qa"}


def test_card_states_the_measured_rephrase_precision_or_that_none_was_measured(demo_cfg):
    base = dict(k=3, slots=12, kept=7, missing=5, acceptance=0.58, first_attempt_acceptance=0.5,
                candidate_acceptance=0.2, rejected_by_reason={})
    summary = FormatManifest.from_json(SUMMARY)
    _augment(demo_cfg, **base, measured_precision={"measured": True, "precision": 0.9231, "ci": [0.8, 1.0],
                                                    "keep_rate": 0.41, "labelled_kept": 52,
                                                    "source": "benchmarks/results/rephrase_precision.json"})
    body = parse_card(build_card(demo_cfg, summary, UPSTREAM(demo_cfg)))[1].split("## Rephrasing")[1]
    assert ("Precision of kept rephrasings, measured on 52 hand-labelled real outputs of this model and prompt: "
            "92.3% (95% CI 80.0% to 100.0%) at a keep rate of 41.0%") in body
    _augment(demo_cfg, **base, measured_precision={"measured": False, "why": "measured for packaged:gemma3-270m "
                                                                            "with prompt abc, not this model"})
    body = parse_card(build_card(demo_cfg, summary, UPSTREAM(demo_cfg)))[1].split("## Rephrasing")[1]
    assert "Precision of kept rephrasings: not measured for this model and prompt" in body


def test_measured_precision_only_for_the_model_and_prompt_it_was_measured_on(tmp_path):
    from datagen.augmentation.rephrase import measured_precision

    path = tmp_path / "rephrase_precision.json"
    assert measured_precision("m", "h", path) == {"measured": False, "why": "no precision measurement found"}
    path.write_text(json.dumps({"model": "packaged:gemma3-270m", "prompt": {"name": "rephrase_base", "hash": "h1"},
                                "headline": {"precision": 0.93, "ci": [0.85, 0.98], "keep_rate": 0.4, "kept": 60}}))
    got = measured_precision("packaged:gemma3-270m", "h1", path)
    assert got["measured"] and got["precision"] == 0.93 and got["labelled_kept"] == 60
    assert not measured_precision("packaged:gemma3-270m", "h2", path)["measured"]  # another prompt
    assert not measured_precision("gpt-4o-mini", "h1", path)["measured"]  # another model
