"""The hand-written headline-sentiment set (data/raw/headline_sentiment.jsonl) used by the quality profile."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from datagen.config import SourceQAFile
from datagen.sources.source_qa import load_source_qa

ROOT = Path(__file__).resolve().parents[1]
HEADLINES = ROOT / "data" / "raw" / "headline_sentiment.jsonl"
SAMPLE = ROOT / "data" / "raw" / "sample_source_qa.jsonl"
SCRIPT = ROOT / "scripts" / "make_headlines.py"
LABELS = ["positive", "negative", "neutral"]


@pytest.fixture(scope="module")
def loaded():
    res = load_source_qa(SourceQAFile(path=HEADLINES, name="headline-sentiment", format="jsonl"))
    assert res.quarantine == []
    assert res.counts()["rows_unaccounted"] == 0
    return res.samples


def test_all_rows_load_balanced_and_distinct(loaded):
    assert len(loaded) == 150
    assert Counter(s["answer"] for s in loaded) == {"positive": 50, "negative": 50, "neutral": 50}
    assert all(s["category"] == "sentiment" and s["task_type"] == "classification" and s["labels"] == LABELS
               for s in loaded)
    assert len({s["id"] for s in loaded}) == 150
    assert len({s["metadata"]["source_id"] for s in loaded}) == 150
    texts = [s["context"]["text"].strip().lower() for s in loaded]
    assert len(set(texts)) == 150
    assert {s["metadata"]["difficulty"] for s in loaded} <= {"easy", "medium"}


def test_every_prefix_is_balanced():
    rows = [json.loads(line) for line in HEADLINES.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [f"hl-{i:03d}" for i in range(1, 151)]
    for n in range(3, 151, 3):
        assert Counter(r["answer"] for r in rows[:n]) == {label: n // 3 for label in LABELS}


def test_no_headline_from_the_sample_set():
    sample_text = SAMPLE.read_text(encoding="utf-8").lower()
    sample_heads = {json.loads(line)["context"]["text"].strip().lower()
                    for line in sample_text.splitlines() if '"category": "sentiment"' in line}
    assert len(sample_heads) == 30
    for line in HEADLINES.read_text(encoding="utf-8").splitlines():
        h = json.loads(line)["context"]["text"].strip().lower()
        assert h not in sample_heads and json.dumps(h)[1:-1] not in sample_text, h


def test_generator_rewrites_the_same_bytes(tmp_path):
    out = tmp_path / "h.jsonl"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == HEADLINES.read_bytes()
