"""Dataset card: Hub-valid YAML metadata, a body built from the upstream manifests, robustness to
missing manifests, and `finsynth card`."""

from __future__ import annotations

import pytest

from datagen.card import build_card, parse_card, size_category, write_card
from datagen.io import write_json, write_manifest

SUMMARY = {
    "stage": "format", "config_hash": "fmt123", "model": "packaged:gemma3-270m", "max_tokens": 768,
    "splits": ["train", "validation", "test"],
    "prompts": [{"name": "system_analyst", "hash": "aaaaaaaaaaaa"}, {"name": "sft_user", "hash": "bbbbbbbbbbbb"}],
    "counts": {"train": 80, "validation": 10, "test": 9, "dropped_by_reason": {"too_long": 1},
               "by_task_type": {"train": {"classification": 20, "numeric_qa": 60}, "validation": {}, "test": {}}},
    "token_lengths": {"train": {"n": 80, "min": 50, "mean": 120.5, "p50": 110, "p95": 300, "max": 400}},
}


def _manifests(cfg):
    p = cfg.paths
    write_manifest(p.stage_dir("fetch"), {
        "stage": "fetch", "config_hash": "f1",
        "counts": {"per_source": {"market_simulator": 60, "finsynth-sample-qa": 165},
                   "per_category": {"credit_risk": 40, "returns": 185}},
        "quarantine": {"total": 2, "by_reason": {"missing_field": 2}}})
    write_manifest(p.stage_dir("augment"), {
        "stage": "augment", "config_hash": "a1",
        "prompts": {"rephrase": {"name": "rephrase", "hash": "cccccccccccc"}},
        "counts": {"rephrased_items": 24},
        "rephrase": {"k": 3, "slots": 72, "kept": 54, "missing": 18, "acceptance": 0.75,
                     "first_attempt_acceptance": 0.6, "candidate_acceptance": 0.5,
                     "rejected_by_reason": {"too_similar": 10}},
        "llm_usage": {"local": {"model": "gemma3-270m", "calls": 100, "cache_hits": 4}}})
    write_manifest(p.stage_dir("dedup"), {
        "stage": "dedup", "config_hash": "d1", "embedder": {"name": "packaged:all-minilm-l6-v2"},
        "threshold": 0.92, "within_group_threshold": 0.985, "method": "exact",
        "counts": {"in": 279, "kept": 270, "dropped_by_reason": {"exact_duplicate": 3, "near_duplicate": 5,
                                                               "within_group_near_copy": 1}}})
    sd = p.stage_dir("split")
    write_json(sd / "clusters.json", {"cluster_by": "scenario", "kmeans": {}, "clusters": [
        {"name": "crash", "source": "scenario", "rows": {"train": 40, "validation": 5, "test": 4},
         "proportion": {"train": 0.5, "validation": 0.5, "test": 0.4444}}]})
    write_manifest(sd, {"stage": "split", "config_hash": "s1",
                        "counts": {"groups": {"train": 30, "validation": 10, "test": 9},
                                   "dropped_by_reason": {"test_rephrase": 12, "balance_train": 0}},
                        "leakage": {"max_cross_split_cosine": 0.9123, "threshold": 0.92,
                                    "cross_split_pairs_above_threshold": 0, "cross_split_duplicates": 0,
                                    "min_number_overlap": 0.8, "groups_in_two_splits": 0}})


def test_card_metadata_is_hub_shaped(demo_cfg):
    _manifests(demo_cfg)
    meta, body = parse_card(build_card(demo_cfg, SUMMARY))
    assert meta["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "train.parquet"}, {"split": "validation", "path": "validation.parquet"},
        {"split": "test", "path": "test.parquet"}]}]
    assert meta["size_categories"] == ["n<1K"]
    assert meta["annotations_creators"] == ["machine-generated"]
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert meta["task_categories"] == ["question-answering", "text-generation", "text-classification"]
    assert meta["source_datasets"] == ["original", "extended|finsynth-sample-qa", "extended|market_simulator"]
    assert meta["pretty_name"] == demo_cfg.card.pretty_name
    from huggingface_hub import DatasetCard

    card = DatasetCard(build_card(demo_cfg, SUMMARY))
    assert card.data.to_dict()["configs"] == meta["configs"]


def test_card_body_states_every_stage(demo_cfg):
    _manifests(demo_cfg)
    _, body = parse_card(build_card(demo_cfg, SUMMARY))
    for text in ["| finsynth-sample-qa | 165 |", "| market_simulator | 60 |",
                 "Acceptance: 75.0% of slots filled (first attempt 60.0%; 50.0% of candidates accepted)",
                 "| exact_duplicate | 3 |", "| near_duplicate | 5 |", "| within_group_near_copy | 1 |",
                 "Rows in: 279, kept: 270.",
                 "| crash | scenario | 40 (50.0%) | 5 (50.0%) | 4 (44.4%) |",
                 "Removed at split: balance_train 0, test_rephrase 12.",
                 "largest cross-split cosine 0.9123", "of which duplicates (same figures, overlap >= 0.8): 0",
                 "| train | 80 | 50 | 120.5 | 110 | 300 | 400 |", "![token lengths](token_lengths.png)",
                 "| `rephrase` | `cccccccccccc` |", "| `sft_user` | `bbbbbbbbbbbb` |",
                 "LLM `local`: `gemma3-270m` (100 calls, 4 cache hits)", "`packaged:all-minilm-l6-v2`",
                 "The test split holds originals only."]:
        assert text in body, text


def test_card_without_upstream_manifests_says_not_recorded(demo_cfg):
    meta, body = parse_card(build_card(demo_cfg, {"counts": {"train": 3}}))
    assert meta["size_categories"] == ["n<1K"] and meta["source_datasets"] == ["original"]
    assert "not recorded" in body and "## Deduplication" in body


@pytest.mark.parametrize("n,cat", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (250_000, "100K<n<1M"),
                                   (5_000_000, "1M<n<10M")])
def test_size_category(n, cat):
    assert size_category(n) == cat


def test_finsynth_card_prints_it(demo_cfg, capsys):
    from flows.cli import main

    _manifests(demo_cfg)
    write_card(demo_cfg, SUMMARY)
    assert main(["card", "--profile", "demo", "--root", str(demo_cfg.paths.root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("---\n") and "# finsynth synthetic finance QA" in out
