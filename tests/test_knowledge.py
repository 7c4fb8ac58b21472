"""Closed-book knowledge: the knowledge split, held-out phrasings, controls, compute-matched arms, and dedup on
facts that differ only in their entity."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datagen.config import load_config
from datagen.dataset.dedup import dedup_rows
from datagen.dataset.knowledge import (
    NGRAM,
    arm_rows,
    knowledge_leakage,
    knowledge_leakage_failure,
    knowledge_split,
    shares_ngram,
    tokens,
)

ROOT = Path(__file__).resolve().parents[1]


def _make_facts():
    spec = importlib.util.spec_from_file_location("make_facts", ROOT / "scripts" / "make_facts.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_facts"] = mod
    spec.loader.exec_module(mod)
    return mod.make_facts(n_companies=10, n_controls=3, n_validation=2)


@pytest.fixture(scope="module")
def facts():
    return _make_facts()


def test_fact_set_answers_come_from_candidates_and_wording_decides(facts):
    by_company: dict[str, list[dict]] = {}
    for f in facts:
        assert f["answer"] in f["metadata"]["candidates"] and len(set(f["metadata"]["candidates"])) == 4
        assert f.get("context") in (None, {}, "")  # closed-book
        by_company.setdefault(f["metadata"]["entity"], []).append(f)
    for rows in by_company.values():  # a company's four city answers differ and are each other's distractors
        cities = [f["answer"] for f in rows if f["category"] == "knowledge_city"]
        assert len(cities) == 4 == len(set(cities))
        assert all(set(f["metadata"]["candidates"]) == set(cities) for f in rows if f["category"] == "knowledge_city")


def test_heldout_phrasing_is_never_trained(facts):
    split = knowledge_split(arm_rows(facts, 3))
    train_q = {" ".join(tokens(r["question"])) for r in split["train"]}
    asked = split["test"] + split["validation"]
    assert asked
    by_fact: dict[str, list[str]] = {}
    for r in split["train"]:
        by_fact.setdefault(r["group_id"], []).append(r["question"])
    for r in asked:
        assert " ".join(tokens(r["question"])) not in train_q
        assert not shares_ngram(r["question"], by_fact.get(r["group_id"], []), NGRAM)
    assert knowledge_leakage(split) == {"asked_question_in_train": 0, "asked_question_shares_ngram": 0,
                                        "controls_trained": 0, "facts_in_validation_and_test": 0}


def test_controls_are_never_trained_and_stay_whole_per_company(facts):
    split = knowledge_split(arm_rows(facts, 3))
    controls = [r for r in split["test"] if r["metadata"]["knowledge"] == "control"]
    trained = {r["group_id"] for r in split["train"]}
    assert len(controls) == 3 * 8
    assert not {r["group_id"] for r in controls} & trained
    assert not {r["metadata"]["entity"] for r in controls} & {r["metadata"]["entity"] for r in split["train"]}


def test_leak_check_fails_when_a_heldout_phrasing_is_trained(facts):
    split = knowledge_split(arm_rows(facts, 3))
    leaked = {**split, "train": split["train"] + [split["test"][0]]}
    leak = knowledge_leakage(leaked)
    assert leak["asked_question_in_train"] == 1
    assert "knowledge split leaks" in knowledge_leakage_failure(leak)


def test_teacher_rephrasing_is_held_out_only_without_a_shared_ngram():
    """User data: no given held-out question; the last rephrasing that shares no 6-token run is asked."""
    base = {"group_id": "f1", "answer": "Oslo", "task_type": "open_qa", "category": "facts",
            "metadata": {"role": "test"}}
    rows = [
        {**base, "id": "f1", "question": "In which city does the Nordic Bank keep its head office?"},
        {**base, "id": "f1-r1", "is_rephrase": True, "rephrase_index": 1,
         "question": "Where does the Nordic Bank have its head office located?"},
        {**base, "id": "f1-r2", "is_rephrase": True, "rephrase_index": 2,  # shares 6 tokens with the original
         "question": "Tell me in which city does the Nordic Bank keep its head office."},
    ]
    split = knowledge_split(rows)
    assert [r["id"] for r in split["test"]] == ["f1-r1"]
    assert sorted(r["id"] for r in split["train"]) == ["f1", "f1-r2"]


def test_matched_arms_have_equal_rows_exposures_and_steps(facts):
    trained = [f for f in facts if f["metadata"]["role"] != "control"]
    k3, matched, plain = arm_rows(trained, 3), arm_rows(trained, 0, repeat=4), arm_rows(trained, 0)
    assert len(k3) == len(matched) == 4 * len(plain)
    assert Counter(r["group_id"] for r in k3) == Counter(r["group_id"] for r in matched)  # answer exposures
    assert all(len({r["question"] for r in matched if r["group_id"] == f["group_id"]}) == 1 for f in trained)
    assert all(len({r["question"] for r in k3 if r["group_id"] == f["group_id"]}) == 4 for f in trained)
    cfg = load_config(profile="knowledge")
    assert not cfg.train.packing  # rows, not packed tokens, make a step: equal rows give equal steps
    b = cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps
    assert -(-len(k3) // b) == -(-len(matched) // b)


def test_dedup_keeps_facts_that_differ_only_in_their_entity():
    """Two companies a letter apart, same relation, different answers: two facts, not a conflict."""
    rows = [
        {"id": "a", "group_id": "a", "question": "In which city is Norbrook Capital headquartered?", "answer": "Oslo",
         "task_type": "open_qa", "category": "knowledge_city", "context": None, "metadata": {}},
        {"id": "b", "group_id": "b", "question": "In which city is Corbrook Capital headquartered?", "answer": "Lyon",
         "task_type": "open_qa", "category": "knowledge_city", "context": None, "metadata": {}},
    ]
    vecs = np.ones((2, 4), dtype=np.float32) / 2.0  # cosine 1.0: the embedding cannot tell them apart
    res = dedup_rows(rows, vecs, threshold=0.92, within_group_threshold=0.985)
    assert sorted(r["id"] for r in res.kept) == ["a", "b"]
    assert res.drops == []


def test_split_stage_knowledge_strategy(facts, tmp_path):
    cfg = load_config(profile="knowledge", root=tmp_path, overrides=["split.strategy=knowledge"])
    from datagen.dataset.split import split_rows

    rows = arm_rows(facts, 3)
    vecs = np.random.default_rng(0).normal(size=(len(rows), 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    res = split_rows(rows, vecs, cfg)
    assert all(v == 0 for v in res["leakage"].values()), res["leakage"]
    assert {r["metadata"]["knowledge"] for r in res["splits"]["test"]} == {"heldout", "control"}
    n_train = sum(f["metadata"]["role"] != "control" for f in facts)
    assert len(res["splits"]["train"]) == 4 * n_train
    json.dumps(res["clusters"])  # the card's cluster table is built

