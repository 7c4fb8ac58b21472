"""The malformed-input corpus (tests/data/malformed/, EXPECTED.json): every input row ends in the
output or in quarantine with a reason, file-level problems fail with a one-line message naming the file,
and echoed values are clipped. Cases too big to ship (a 10 MB cell) are built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datagen.config import SourceQAFile
from datagen.schema import Sample
from datagen.sources import source_qa
from datagen.sources.market import MarketDataError, load_price_file
from datagen.sources.source_qa import SourceQAError, load_source_qa

CORPUS = Path(__file__).parent / "data" / "malformed"
EXPECTED = json.loads((CORPUS / "EXPECTED.json").read_text())


def _names(kind: str) -> list[str]:
    return sorted(k for k, v in EXPECTED.items() if v["kind"] == kind)


def test_corpus_is_complete():
    files = sorted(p.name for p in CORPUS.iterdir() if p.name not in ("EXPECTED.json", "make_corpus.py"))
    assert files == sorted(EXPECTED)
    assert len(EXPECTED) >= 40


@pytest.mark.parametrize("name", _names("rows"))
def test_every_row_is_kept_or_quarantined(name):
    exp = EXPECTED[name]
    res = load_source_qa(SourceQAFile(path=CORPUS / name, **exp.get("spec", {})))
    c = res.counts()
    assert c["rows_unaccounted"] == 0
    assert (c["rows_in"], c["rows_out"], c["rows_quarantined"]) == (
        exp["rows_in"], exp["rows_out"], len(exp["quarantine"]))
    assert sorted([q["row"], q["field"], q["reason"]] for q in res.quarantine) == exp["quarantine"]
    for q in res.quarantine:
        assert q["stage"] == "fetch" and q["file"].endswith(name) and q["detail"] is not None
        assert "\n" not in q["detail"] and len(q["detail"]) <= exp.get("max_detail", 10_000)
        json.dumps(q, allow_nan=False).encode("utf-8")  # always writable as UTF-8 JSON
    for s in res.samples:
        Sample.model_validate(s)
        assert "\x00" not in s["question"] + s["answer"] and not s["question"].startswith("\ufeff")
        json.dumps(s, allow_nan=False)


@pytest.mark.parametrize("name", _names("source_error"))
def test_file_level_problem_is_one_line_naming_the_file(name):
    exp = EXPECTED[name]
    with pytest.raises(SourceQAError) as e:
        load_source_qa(SourceQAFile(path=CORPUS / name, **exp.get("spec", {})))
    msg = str(e.value)
    assert name in msg and exp["match"] in msg and "\n" not in msg
    assert len(msg) <= exp.get("max_len", 1000)


@pytest.mark.parametrize("name", _names("market_ok"))
def test_price_file_loads(name):
    prices, _ = load_price_file(CORPUS / name)
    assert len(prices) == EXPECTED[name]["rows"]
    assert prices["date"].is_monotonic_increasing and prices["close"].notna().all()


@pytest.mark.parametrize("name", _names("market_error"))
def test_bad_price_file_is_one_line_naming_the_file(name):
    with pytest.raises(MarketDataError) as e:
        load_price_file(CORPUS / name)
    msg = str(e.value)
    assert name in msg and EXPECTED[name]["match"] in msg and "\n" not in msg, msg


# ----------------------------------------------------------------------------- built here
def test_unterminated_quote_keeps_the_rows_after_it():
    """Issue 11 item 3: 6 rows in, 5 kept, 1 quarantined with file, data row, line and field."""
    res = load_source_qa(SourceQAFile(path=CORPUS / "csv_unterminated_quote.csv"))
    assert [s["metadata"]["source_id"] for s in res.samples] == ["g1", "g2", "g4", "g5", "g6"]
    (q,) = res.quarantine
    assert (q["row"], q["line"], q["field"], q["reason"]) == (3, 4, "<row>", "unterminated_quote")
    assert res.counts() == {"rows_in": 6, "rows_out": 5, "rows_quarantined": 1, "rows_unaccounted": 0,
                            "lines_in": 7, "lines_header": 1, "lines_blank": 0}


def test_ten_megabyte_cell_is_accepted(tmp_path):
    big = "x" * (10 * 1024 * 1024)
    for path, text in ((tmp_path / "big.csv", f"question,answer,category\nQ?,{big},c\nQ2?,2,c\n"),
                       (tmp_path / "big.jsonl", json.dumps({"question": "Q?", "answer": big, "category": "c"}) + "\n")):
        path.write_text(text)
        res = load_source_qa(SourceQAFile(path=path))
        assert res.quarantine == [] and len(res.samples[0]["answer"]) == len(big), path.name


def test_field_over_the_documented_limit_is_quarantined_not_fatal(tmp_path, monkeypatch):
    assert source_qa.MAX_FIELD_CHARS == 64 * 1024 * 1024
    monkeypatch.setattr(source_qa, "MAX_FIELD_CHARS", 1000)
    p = tmp_path / "big.csv"
    p.write_text("question,answer,category\nQ1?,1,c\nQ?," + "y" * 5000 + ",c\nQ3?,3,c\n")
    res = load_source_qa(SourceQAFile(path=p))
    assert [s["answer"] for s in res.samples] == ["1", "3"]
    (q,) = res.quarantine
    assert (q["row"], q["reason"]) == (2, "field_too_large") and len(json.dumps(q["raw"])) < 20_000
    p = tmp_path / "big.jsonl"
    p.write_text(json.dumps({"question": "Q?", "answer": "y" * 5000, "category": "c"}) + "\n")
    assert [(q["field"], q["reason"]) for q in load_source_qa(SourceQAFile(path=p)).quarantine] == [
        ("answer", "field_too_large")]


def test_directory_given_as_path_says_directory(tmp_path):
    d = tmp_path / "qa.jsonl"
    d.mkdir()
    with pytest.raises(SourceQAError, match="qa.jsonl: is a directory"):
        load_source_qa(SourceQAFile(path=d))


def test_nested_documents_share_a_group_and_keep_their_context():
    exp = EXPECTED["json_nested_documents.json"]
    res = load_source_qa(SourceQAFile(path=CORPUS / "json_nested_documents.json", **exp["spec"]))
    a, b, c, d = res.samples
    assert a["group_id"] == b["group_id"] == c["group_id"] != d["group_id"]
    assert a["context"]["table"]["rows"][0] == ["Net sales", "1,200", "1,350"]
    assert a["context"]["text"] == "Amounts in USD million.\n\nNet sales grew on volume."
    assert a["metadata"]["answer_values"] == [{"name": "answer", "value": 12.5, "unit": "%"}]
    assert a["metadata"]["origin"] == {"file": (CORPUS / "json_nested_documents.json").as_posix(), "row": 1,
                                       "record": 1, "item": 1}
    assert c["answer"] == "2023; 2024" and c["metadata"]["answer_spans"] == ["2023", "2024"]
    assert c["metadata"]["answer_values"] == [{"name": "answer_1", "value": 2023.0, "unit": ""},
                                              {"name": "answer_2", "value": 2024.0, "unit": ""}]
    assert d["answer"] == "40" and d["category"] == "annual_report"
    (q,) = res.quarantine
    assert (q["row"], q["record"], q["item"], q["field"], q["reason"]) == (5, 2, 2, "question", "empty")


def test_scaled_numbers_get_answer_values():
    res = load_source_qa(SourceQAFile(path=CORPUS / "jsonl_scaled_numbers.jsonl"))
    got = [s["metadata"]["answer_values"][0] for s in res.samples]
    assert [(v["value"], v["unit"]) for v in got] == [
        (14.16, "%"), (-7e6, ""), (1.2e9, "USD"), (-3.4, ""), (1234.5, ""), (12.0, "%")]


def test_list_answers_are_kept_as_spans():
    res = load_source_qa(SourceQAFile(path=CORPUS / "csv_list_answer.csv"))
    a, b, c = res.samples
    assert a["answer"] == "2019; 2021" and a["metadata"]["answer_spans"] == ["2019", "2021"]
    assert b["metadata"]["answer_values"] == [{"name": "answer_1", "value": 14.2, "unit": "%"},
                                              {"name": "answer_2", "value": 15.1, "unit": "%"}]
    assert c["answer"] == "[a] see note" and "answer_spans" not in c["metadata"]


def test_long_bad_value_is_clipped_in_the_record():
    res = load_source_qa(SourceQAFile(path=CORPUS / "csv_long_bad_value.csv"))
    (q,) = res.quarantine
    assert "y" * 100 in q["detail"] and "y" * 1000 not in q["detail"] and "chars)" in q["detail"]


def test_extra_cell_reports_data_row_and_field_in_one_line():
    (q,) = load_source_qa(SourceQAFile(path=CORPUS / "csv_extra_cell.csv")).quarantine
    assert (q["row"], q["line"], q["field"]) == (2, 3, "<extra cell 5>")
    assert q["detail"] == "5 cells, header has 4 (extra cell 5: 'surplus')"
