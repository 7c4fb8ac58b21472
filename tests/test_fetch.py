"""The fetch stage end to end: manifest counts, byte-identical reruns, the CLI's exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from datagen.config import load_config
from datagen.io import read_jsonl
from datagen.schema import Sample
from flows.stages import invoke

BAD = Path(__file__).parent / "data" / "bad_inputs"
MALFORMED = Path(__file__).parent / "data" / "malformed"


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "finsynth"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, check=False)


def test_fetch_demo_counts_and_byte_identical_rerun(demo_cfg):
    m = invoke(demo_cfg, "fetch")
    out = demo_cfg.paths.stage_dir("fetch")
    rows = read_jsonl(out / "samples.jsonl")
    for r in rows:
        Sample.model_validate(r)
    n_market = demo_cfg.sources.market.n_questions
    sample_set = len(read_jsonl(demo_cfg.paths.resolve(demo_cfg.sources.source_qa[0].path)))
    assert m.stage == "fetch" and m.config_hash == demo_cfg.section_hash("sources")
    assert m.counts["samples"] == len(rows) == n_market + sample_set
    assert m.counts["per_source"] == {"finsynth-sample-qa": sample_set, "market:simulator": n_market}
    assert sum(m.counts["per_category"].values()) == len(rows)
    assert m.counts["per_category"]["market_volatility"] == demo_cfg.sources.market.count("volatility")
    assert m.counts["per_task_type"] == {
        t: sum(1 for r in rows if r["task_type"] == t) for t in ("classification", "numeric_qa", "open_qa")}
    assert m.quarantine == {"total": 0, "by_reason": {}, "by_file": {}}
    assert set(m.outputs) == {"samples.jsonl", "quarantine.jsonl"}
    assert [(r["source"], r["id"]) for r in rows] == sorted((r["source"], r["id"]) for r in rows)

    first = {f: (out / f).read_bytes() for f in ("samples.jsonl", "quarantine.jsonl")}
    m2 = invoke(demo_cfg, "fetch")
    assert {f: (out / f).read_bytes() for f in first} == first
    assert m2.to_json() == m.to_json()  # the same manifest.json: wall-clock timing is kept apart
    assert json.loads((out / "manifest.json").read_text())["outputs"] == m.outputs


def test_fetch_quarantines_bad_rows_and_cross_source_duplicates(tmp_root):
    (tmp_root / "data" / "raw" / "dup.jsonl").symlink_to(BAD / "sqa_duplicate_id.jsonl")
    (tmp_root / "data" / "raw" / "empty.jsonl").symlink_to(BAD / "sqa_empty_answer.jsonl")
    cfg = load_config(profile="tiny", root=tmp_root, overrides=[
        "sources.source_qa=[{path: data/raw/dup.jsonl, name: a}, {path: data/raw/empty.jsonl, name: b}]"])
    m = invoke(cfg, "fetch")
    q = read_jsonl(cfg.paths.stage_dir("fetch") / "quarantine.jsonl")
    # dup.jsonl: row 2 repeats id g1; empty.jsonl: row 2 blank answer, row 1 reuses g1 from source a
    assert [(x["file"], x["row"], x["reason"]) for x in q] == [
        ("data/raw/dup.jsonl", 2, "duplicate_id"), ("data/raw/empty.jsonl", 1, "duplicate_id"),
        ("data/raw/empty.jsonl", 2, "empty")]
    assert m.quarantine["by_reason"] == {"duplicate_id": 2, "empty": 1}
    assert m.counts["per_source"]["a"] == 1 and "b" not in m.counts["per_source"]
    # counted after the cross-source check: empty.jsonl's row 1 (id g1 again) is quarantined there
    assert m.source_files["data/raw/empty.jsonl"] == {
        "rows_in": 2, "rows_out": 0, "rows_quarantined": 2, "rows_unaccounted": 0, "lines_in": 2, "lines_blank": 0}
    assert all(x["stage"] == "fetch" and "row_id" in x for x in q)
    assert m.counts["dropped_duplicate_id"] == 2 and m.counts["dropped_empty"] == 1


def test_fetch_from_price_files_records_repairs(tmp_root):
    src = tmp_root / "data" / "raw" / "prices.csv"
    lines = ["ticker,date,open,high,low,close,volume"]
    for t, base in (("AAA", 100.0), ("BBB", 40.0)):
        for i in range(15):
            c = base * (1 + 0.01 * ((i * 7) % 5 - 2))
            lines.append(f"{t},2024-02-{i + 1:02d},{c:.2f},{c + 1:.2f},{c - 1:.2f},{c:.2f},{1000 + i}")
    lines.append(lines[3])  # an exact duplicate row
    src.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")  # and unsorted
    cfg = load_config(profile="tiny", root=tmp_root, overrides=[
        "sources.market.provider=csv", "sources.market.paths=[data/raw/prices.csv]", "sources.source_qa=[]"])
    m = invoke(cfg, "fetch")
    actions = sorted(r["action"] for r in m.market["repairs"])
    assert actions == ["dropped_exact_duplicates", "sorted_dates", "sorted_dates"]
    assert m.market["repairs"][0]["file"] == "data/raw/prices.csv"
    assert m.inputs.keys() == {"data/raw/prices.csv"}
    assert m.counts["per_scenario"] == {"observed": 7}


def test_cli_fetch_demo_writes_files(tmp_root):
    p = _cli("fetch", "--profile", "demo", "--root", str(tmp_root))
    assert p.returncode == 0, p.stderr
    out = tmp_root / "data" / "processed" / "fetch"
    assert {f.name for f in out.iterdir()} >= {"samples.jsonl", "quarantine.jsonl", "manifest.json"}
    assert json.loads(p.stdout)["counts"]["samples"] == len(read_jsonl(out / "samples.jsonl"))


@pytest.mark.parametrize("override, expect", [
    ("sources.source_qa=[{path: %s}]" % (BAD / "sqa_not_parquet.parquet"), "sqa_not_parquet.parquet"),
    ("sources.source_qa=[{path: data/raw/missing.jsonl}]", "missing.jsonl"),
])
def test_cli_fetch_bad_file_exits_nonzero_with_one_line(tmp_root, override, expect):
    p = _cli("fetch", "--profile", "tiny", "--root", str(tmp_root), "--set", override)
    assert p.returncode != 0
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("finsynth:")]
    assert len(err) == 1 and expect in err[0] and "Traceback" not in p.stderr
    assert not (tmp_root / "data" / "processed" / "fetch" / "manifest.json").exists()


def test_cli_fetch_bad_price_file_names_row_and_field(tmp_root):
    bad = BAD / "market_nan_price.csv"
    p = _cli("fetch", "--profile", "tiny", "--root", str(tmp_root), "--set", "sources.market.provider=csv",
             "--set", f"sources.market.paths=[{bad}]")
    assert p.returncode != 0
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("finsynth:")]
    assert "market_nan_price.csv: row 2: field Close" in line


def test_fetch_reconciles_rows_of_every_format(tmp_root):
    raw = tmp_root / "data" / "raw"
    for name in ("csv_unterminated_quote.csv", "json_nested_documents.json", "jsonl_nan_answer.jsonl",
                 "parquet_non_finite.parquet"):
        (raw / name).symlink_to(MALFORMED / name)
    nested = "{path: data/raw/json_nested_documents.json, records_path: questions, category: report, " \
             "columns: {id: uid, table: table.table, paragraphs: paragraphs}}"
    cfg = load_config(profile="tiny", root=tmp_root, overrides=[
        "sources.market=null",
        f"sources.source_qa=[{{path: data/raw/csv_unterminated_quote.csv}}, {nested}, "
        "{path: data/raw/jsonl_nan_answer.jsonl, name: nan}, {path: data/raw/parquet_non_finite.parquet}]"])
    m = invoke(cfg, "fetch")
    files = m.source_files
    assert files["data/raw/csv_unterminated_quote.csv"] == {
        "rows_in": 6, "rows_out": 5, "rows_quarantined": 1, "rows_unaccounted": 0,
        "lines_in": 7, "lines_header": 1, "lines_blank": 0}
    assert {k: v["rows_in"] for k, v in files.items()} == {
        "data/raw/csv_unterminated_quote.csv": 6, "data/raw/json_nested_documents.json": 5,
        "data/raw/jsonl_nan_answer.jsonl": 2, "data/raw/parquet_non_finite.parquet": 3}
    assert m.rows == {"rows_in": 16, "rows_out": 10, "rows_quarantined": 6, "rows_unaccounted": 0}
    assert m.counts["samples"] == 10 and m.quarantine["total"] == 6
    assert m.quarantine["by_reason"] == {"empty": 1, "missing": 1, "non_finite": 2, "unterminated_quote": 1,
                                            "duplicate_id": 1}
    q = read_jsonl(cfg.paths.stage_dir("fetch") / "quarantine.jsonl")
    assert ("data/raw/csv_unterminated_quote.csv", 3, 4, "<row>") in {
        (x["file"], x["row"], x.get("line"), x["field"]) for x in q}


def test_fetch_fails_loudly_when_rows_go_unaccounted(tmp_root, monkeypatch):
    from datagen.sources import fetch
    from datagen.sources.source_qa import RowCountError

    real = fetch.load_source_qa

    def lossy(*a, **k):
        res = real(*a, **k)
        res.samples.pop()  # a reader bug that loses a row
        return res

    monkeypatch.setattr(fetch, "load_source_qa", lossy)
    cfg = load_config(profile="tiny", root=tmp_root, overrides=[
        "sources.market=null", f"sources.source_qa=[{{path: {MALFORMED / 'csv_bom.csv'}}}]"])
    with pytest.raises(RowCountError, match="csv_bom.csv: 2 rows read, 1 kept \\+ 0 quarantined: 1 unaccounted"):
        invoke(cfg, "fetch")
    assert not (cfg.paths.stage_dir("fetch") / "manifest.json").exists()


@pytest.mark.parametrize("name, expect", [
    ("jsonl_empty.jsonl", "jsonl_empty.jsonl: empty file"),
    ("csv_header_only.csv", "csv_header_only.csv: header only"),
])
def test_cli_fetch_empty_source_exits_nonzero_naming_the_file(tmp_root, name, expect):
    p = _cli("fetch", "--profile", "tiny", "--root", str(tmp_root),
             "--set", f"sources.source_qa=[{{path: {MALFORMED / name}}}]")
    assert p.returncode != 0
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("finsynth:")]
    assert expect in line


def test_cli_fetch_directory_as_source_says_directory(tmp_root):
    (tmp_root / "data" / "raw" / "qa_dir").mkdir()
    p = _cli("fetch", "--profile", "tiny", "--root", str(tmp_root),
             "--set", "sources.source_qa=[{path: data/raw/qa_dir}]")
    assert p.returncode != 0
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("finsynth:")]
    assert "qa_dir: is a directory" in line


def test_fetch_price_csv_exported_by_pandas(tmp_root):
    import pandas as pd

    idx = pd.bdate_range("2024-02-01", periods=30)
    closes = [100 + (i * 7) % 5 - 2 + i * 0.3 for i in range(30)]
    df = pd.DataFrame({"Open": closes, "High": [c + 1 for c in closes], "Low": [c - 1 for c in closes],
                       "Close": closes, "Volume": [1000 + i for i in range(30)]}, index=idx)
    df.to_csv(tmp_root / "data" / "raw" / "SPY.csv")  # the date is an unnamed first column
    cfg = load_config(profile="tiny", root=tmp_root, overrides=[
        "sources.market.provider=csv", "sources.market.paths=[data/raw/SPY.csv]", "sources.source_qa=[]"])
    m = invoke(cfg, "fetch")
    assert m.market["tickers"] == ["SPY"] and m.market["price_rows"] == 30
    assert m.market["rows"] == {"rows_in": 30, "rows_out": 30, "rows_dropped_duplicate": 0, "rows_filtered": 0,
                                   "rows_unaccounted": 0}
    assert m.market["repairs"][0]["action"] == "date_from_unnamed_first_column"
