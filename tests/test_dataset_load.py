"""The dataset folder as a user loads it, with the real `datasets` library and a fresh HF cache:
`load_dataset(<dir>)` reads exactly this run's rows (two roots, one cache), the audit files stay out of
the way, and `load_from_disk` works on the saved copy."""

from __future__ import annotations

import pytest

from datagen.config import load_config
from datagen.dataset.chat_format import DISK_DIR
from flows.stages import invoke
from datagen.io import write_jsonl, write_manifest
from datagen.manifest import Manifest


def _row(id_, group=None, question="Is ACME risky?"):
    return {"id": id_, "group_id": group or id_, "source": "t", "task_type": "classification", "category": "risk",
            "scenario": None, "question": question, "context": {"text": "Vol 45%.", "table": None},
            "answer": "high", "labels": ["low", "high"], "metadata": {"cluster": "risk"},
            "is_rephrase": False, "rephrase_index": None}


@pytest.fixture(scope="module")
def tokenizer():
    from datagen.config import ModelConfig
    from datagen.tokenizer import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _make(root, tokenizer, prefix, n, long_rows=0):
    cfg = load_config(profile="demo", root=root)
    d = cfg.paths.stage_dir("split")
    rows = {"train": [_row(f"{prefix}-tr{i}") for i in range(n)],
            "validation": [_row(f"{prefix}-va0")],
            "test": [_row(f"{prefix}-te0")] + [_row(f"{prefix}-long{i}", question="Why? " * 400)
                                               for i in range(long_rows)]}
    for s, r in rows.items():
        write_jsonl(d / f"{s}.jsonl", r)
    write_manifest(d, Manifest(stage="split"))
    invoke(cfg, "format", tokenizer=tokenizer)
    return cfg.paths.stage_dir("format")


@pytest.mark.slow
def test_load_dataset_dir_returns_this_runs_rows(tmp_path, tokenizer, hf_cache):
    from datasets import load_dataset

    a = _make(tmp_path / "a", tokenizer, "a", 2, long_rows=1)  # a drop: drops.jsonl exists
    b = _make(tmp_path / "b", tokenizer, "b", 3)
    assert a.name == b.name == "format"
    da, db = load_dataset(str(a)), load_dataset(str(b))
    assert sorted(da["train"]["id"]) == ["a-tr0", "a-tr1"] and da["test"]["id"] == ["a-te0"]
    assert sorted(db["train"]["id"]) == ["b-tr0", "b-tr1", "b-tr2"] and db["validation"]["id"] == ["b-va0"]
    # a rerun in the same root with other rows is read afresh, and force_redownload agrees
    a2 = _make(tmp_path / "a", tokenizer, "c", 1)
    assert load_dataset(str(a2))["train"]["id"] == ["c-tr0"]
    assert load_dataset(str(a2), download_mode="force_redownload")["train"]["id"] == ["c-tr0"]
    # the plain parquet builder over the folder reads only the splits, never the audit files
    dp = load_dataset("parquet", data_dir=str(b))
    assert set(dp) == {"train", "validation", "test"} and sorted(dp["train"]["id"]) == ["b-tr0", "b-tr1", "b-tr2"]


@pytest.mark.slow
def test_load_from_disk_reads_the_saved_copy(tmp_path, tokenizer, hf_cache):
    from datasets import load_dataset, load_from_disk

    out = _make(tmp_path, tokenizer, "a", 2, long_rows=1)
    disk = load_from_disk(str(out / DISK_DIR))
    parquet = load_dataset(str(out))
    assert set(disk) == set(parquet) == {"train", "validation", "test"}
    for s in disk:
        assert disk[s].features == parquet[s].features
        assert disk[s].to_list() == parquet[s].to_list()
