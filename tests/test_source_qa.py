"""Source-QA ingest: column mapping, table+paragraph context, quarantine, and the shipped sample set."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from datagen.config import SourceQAFile
from datagen.schema import Sample
from datagen.sources.source_qa import SourceQAError, load_source_qa

BAD = Path(__file__).parent / "data" / "bad_inputs"
EXPECTED = json.loads((BAD / "EXPECTED.json").read_text())
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "raw" / "sample_source_qa.jsonl"


@pytest.mark.parametrize("name", sorted(k for k, v in EXPECTED.items() if v["kind"] == "quarantine"))
def test_bad_row_goes_to_quarantine_and_run_continues(name):
    exp = EXPECTED[name]
    res = load_source_qa(SourceQAFile(path=BAD / name))
    assert [s["metadata"]["source_id"] for s in res.samples] == ["g1"]  # the good row survives
    assert len(res.quarantine) == 1
    q = res.quarantine[0]
    assert (q["row"], q["field"], q["reason"]) == (exp["row"], exp["field"], exp["reason"])
    assert q["file"].endswith(name) and q["raw"]
    json.dumps(q, allow_nan=False).encode("utf-8")  # always writable as UTF-8 JSON


@pytest.mark.parametrize("name", sorted(k for k, v in EXPECTED.items() if v["kind"] == "source_error"))
def test_file_level_problem_raises_naming_the_file(name):
    with pytest.raises(SourceQAError) as e:
        load_source_qa(SourceQAFile(path=BAD / name))
    assert name in str(e.value) and EXPECTED[name]["match"] in str(e.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(SourceQAError, match="not found: .*nope.jsonl"):
        load_source_qa(SourceQAFile(path=tmp_path / "nope.jsonl"))
    (tmp_path / "junk.jsonl").write_bytes(b"\x1f\x8b\x08\x00binary\n\x00\x01\n")
    with pytest.raises(SourceQAError, match="junk.jsonl: unreadable JSONL"):
        load_source_qa(SourceQAFile(path=tmp_path / "junk.jsonl"))
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(SourceQAError, match="x.txt.*format"):
        load_source_qa(SourceQAFile(path=tmp_path / "x.txt"))


def test_csv_with_column_mapping_table_and_paragraphs(tmp_path):
    table = json.dumps([["Year", "Revenue"], ["2023", "120"], ["2024", "150"]])
    df = pd.DataFrame({
        "qid": ["a1", "a2"], "Q": ["By how much did revenue grow?", "Tone?"], "A": ["25%", "positive"],
        "Topic": ["growth", "sentiment"], "Kind": ["numeric_qa", "classification"],
        "Tbl": [table, ""], "Notes": ["Revenue figures in USD millions.", "Profits beat forecasts."],
        "Opts": ["", "positive|negative|neutral"], "Level": ["easy", "hard"]})
    path = tmp_path / "reports.csv"
    df.to_csv(path, index=False)
    spec = SourceQAFile(path=path, name="reports", columns={
        "id": "qid", "question": "Q", "answer": "A", "category": "Topic", "task_type": "Kind", "table": "Tbl",
        "paragraphs": "Notes", "labels": "Opts", "difficulty": "Level"})
    res = load_source_qa(spec)
    assert res.quarantine == []
    a, b = res.samples
    assert a["id"] == "a1" and a["source"] == "reports" and a["category"] == "growth"
    assert a["context"] == {"text": "Revenue figures in USD millions.",
                            "table": {"columns": ["Year", "Revenue"], "rows": [["2023", "120"], ["2024", "150"]]}}
    assert a["metadata"]["answer_values"] == [{"name": "answer", "value": 25.0, "unit": "%"}]
    assert a["metadata"]["difficulty"] == "easy" and a["metadata"]["origin"] == {"file": path.as_posix(), "row": 1}
    assert b["task_type"] == "classification" and b["labels"] == ["positive", "negative", "neutral"]
    assert b["context"] == {"text": "Profits beat forecasts.", "table": None}
    for s in res.samples:
        Sample.model_validate(s)


def test_finqa_like_jsonl_with_nested_columns(tmp_path):
    row = {"uid": "f-7", "pre_text": ["Net interest income rose.", "Costs were flat."],
           "table": [["", "2023", "2024"], ["NII", "410", "455"]],
           "qa": {"question": "What was the change in NII?", "answer": 45}}
    path = tmp_path / "finqa.jsonl"
    path.write_text(json.dumps(row) + "\n")
    spec = SourceQAFile(path=path, task_type="numeric_qa", columns={
        "id": "uid", "question": "qa.question", "answer": "qa.answer", "paragraphs": "pre_text"})
    res = load_source_qa(spec)
    (s,) = res.samples
    assert s["answer"] == "45" and s["task_type"] == "numeric_qa" and s["category"] == "finqa"
    assert s["context"]["text"] == "Net interest income rose.\n\nCosts were flat."
    assert s["context"]["table"] == {"columns": ["", "2023", "2024"], "rows": [["NII", "410", "455"]]}
    assert s["metadata"]["answer_values"][0]["value"] == 45.0


def test_parquet_with_records_table(tmp_path):
    df = pd.DataFrame({"question": ["Total?", "Blank?"], "answer": ["7", None], "category": ["x", "x"],
                       "context": [json.dumps({"text": "Two items.",
                                               "table": [{"k": "a", "v": 3}, {"k": "b", "v": 4}]}), None]})
    path = tmp_path / "p.parquet"
    df.to_parquet(path)
    res = load_source_qa(SourceQAFile(path=path))
    (s,) = res.samples
    assert s["context"]["table"] == {"columns": ["k", "v"], "rows": [["a", "3"], ["b", "4"]]}
    assert [(q["row"], q["field"], q["reason"]) for q in res.quarantine] == [(2, "answer", "missing")]
    # ids without an id column are stable content hashes
    assert load_source_qa(SourceQAFile(path=path)).samples[0]["id"] == s["id"]


def test_classification_needs_labels_and_default_category(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"question": "Tone?", "answer": "up", "task_type": "classification"}) + "\n"
                    + json.dumps({"question": "Why?", "answer": "Because.", "metadata": "not a dict"}) + "\n")
    res = load_source_qa(SourceQAFile(path=path, name="cls"))
    assert [(q["row"], q["field"], q["reason"]) for q in res.quarantine] == [(1, "labels", "missing"),
                                                                          (2, "metadata", "wrong_type")]


# ----------------------------------------------------------------------------- the shipped sample set
@pytest.fixture(scope="module")
def sample_rows() -> list[dict]:
    res = load_source_qa(SourceQAFile(path=SAMPLE, name="finsynth-sample-qa", format="jsonl"))
    assert res.quarantine == []
    return res.samples


def test_sample_set_shape(sample_rows):
    assert len(sample_rows) >= 150
    cats = Counter(s["category"] for s in sample_rows)
    assert len(cats) >= 6 and min(cats.values()) >= 20
    assert {"credit_risk", "capital_adequacy", "liquidity", "market_risk", "banking_regulation",
            "sentiment"} <= set(cats)
    sent = [s for s in sample_rows if s["category"] == "sentiment"]
    assert Counter(s["answer"] for s in sent) == {"positive": 10, "negative": 10, "neutral": 10}
    assert all(s["task_type"] == "classification" and s["labels"] == ["positive", "negative", "neutral"] for s in sent)
    assert sum(1 for s in sample_rows if s["context"].get("table")) >= 15
    for s in sample_rows:
        if s["task_type"] == "numeric_qa":
            assert s["metadata"]["answer_values"], s["id"]


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def test_sample_set_arithmetic_independently(sample_rows):
    """Re-derive answers from the context text with regexes and plain arithmetic."""
    checked = Counter()
    for s in sample_rows:
        text = s["context"]["text"]
        vals = {v["name"]: v["value"] for v in s["metadata"].get("answer_values", [])}
        if m := re.search(r"PD\) is ([\d.]+)%, loss given default \(LGD\) is (\d+)% and exposure at default \(EAD\) "
                          r"is ([\d,]+) USD", text):
            el = float(m[1]) / 100 * float(m[2]) / 100 * _num(m[3])
            assert vals["expected_loss"] == pytest.approx(el, abs=0.01), s["id"]
            checked["el"] += 1
        elif m := re.search(r"holds USD ([\d,]+) million of high-quality.* are USD ([\d,]+) million", text):
            assert vals["lcr"] == pytest.approx(_num(m[1]) / _num(m[2]) * 100, abs=1e-4), s["id"]
            checked["lcr"] += 1
        elif m := re.search(r"Common Equity Tier 1 capital of USD ([\d,]+) million and risk-weighted assets of USD "
                            r"([\d,]+) million", text):
            assert vals["cet1_ratio"] == pytest.approx(_num(m[1]) / _num(m[2]) * 100, abs=1e-4), s["id"]
            checked["cet1"] += 1
        elif m := re.search(r"holds a USD ([\d,]+) equity position whose daily return volatility is ([\d.]+)%", text):
            z = float(re.search(r"z = (\d+\.\d+)", s["question"])[1])
            assert vals["var"] == pytest.approx(z * float(m[2]) / 100 * _num(m[1]), abs=0.01), s["id"]
            checked["var"] += 1
        elif s["context"].get("table") and s["context"]["table"]["columns"] == ["Loan", "PD", "LGD", "EAD"]:
            rows = s["context"]["table"]["rows"]
            el = sum(float(pd_[:-1]) / 100 * float(lgd[:-1]) / 100 * _num(ead) for _, pd_, lgd, ead in rows)
            assert vals["expected_loss"] == pytest.approx(el, abs=0.01), s["id"]
            checked["portfolio"] += 1
        elif s["context"].get("table") and s["context"]["table"]["columns"] == ["Day", "P&L"]:
            losses = sorted((-_num(p) for _, p in s["context"]["table"]["rows"] if _num(p) < 0), reverse=True)
            assert (vals["var"], vals["expected_shortfall"]) == (losses[1], (losses[0] + losses[1]) / 2), s["id"]
            checked["hist"] += 1
    assert checked == {"el": 10, "lcr": 8, "cet1": 6, "var": 8, "portfolio": 5, "hist": 6}


def test_sample_generator_is_deterministic(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "s.jsonl"
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_sample_qa.py"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == SAMPLE.read_bytes()
    # the demo's part of it: the first 4 items of each category, the same bytes as the committed file
    assert (tmp_path / "demo_source_qa.jsonl").read_bytes() == SAMPLE.with_name("demo_source_qa.jsonl").read_bytes()
