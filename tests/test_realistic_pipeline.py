"""Fetch -> format on realistic data that nobody tuned the pipeline for (issue 13's "done"): a
financial-report QA set with ten questions over each of two shared table+text contexts (plus one true
copy and one copy whose answer's sign differs), a credit table whose applicants differ in a field or
two, and a daily price history exported by pandas with its date as the unnamed index column.

Asserted: no distinct question is dropped as a duplicate, nothing of a group, a context or a price day
is in two splits, every row that does not reach the dataset has a reason, and the card's figures match
the Parquet files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_card import _md_tables, parse_card

from datagen.config import load_config
from datagen.io import read_jsonl
from flows.stages import execute

DATA = Path(__file__).parent / "data" / "realistic"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("realistic")
    prices = pd.read_csv(DATA / "prices_daily.csv")
    for t, frame in prices.groupby("Ticker"):  # what `df.set_index("Date").to_csv()` writes: ",Open,..."
        frame.drop(columns="Ticker").set_index("Date").rename_axis(None).to_csv(root / f"{t}.csv")
    cfg_file = root / "realistic.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "extends": "demo", "profile": "realistic",
        "sources": {"market": {"provider": "csv", "paths": [str(root / "KO.csv"), str(root / "MSFT.csv")],
                               "window_days": 5, "questions_per_type": 6},
                    "source_qa": [{"path": str(DATA / "report_qa.jsonl"), "name": "reports", "format": "jsonl",
                                   "license": "cc-by-4.0", "annotations_creators": ["expert-generated"]},
                                  {"path": str(DATA / "credit_table.jsonl"), "name": "credit", "format": "jsonl"}]},
        "augment": {"k": 0, "scenario": {"enabled": False}},
        "card": {"dataset_name": "finsynth-realistic"},
    }))
    cfg = load_config(cfg_file, root=root)
    manifests = {s: execute(cfg, s) for s in ("fetch", "augment", "dedup", "split", "format")}
    return cfg, manifests


def test_no_distinct_question_is_dropped_and_conflicts_are_flagged(run):
    cfg, m = run
    drops = read_jsonl(cfg.paths.stage_dir("dedup") / "drops.jsonl")
    by_reason = {}
    for d in drops:
        by_reason.setdefault(d["reason"], []).append(d["row_id"])
    # the two true copies (a re-cased question, an applicant listed twice) are the only duplicates; the
    # sign-flipped copy and its original are quarantined
    dups = by_reason.pop("exact_duplicate", []) + by_reason.pop("near_duplicate", [])
    assert sorted(dups) == ["credit-011", "doc-acme-2019-q00-copy"]
    assert sorted(by_reason.pop("conflicting_answers")) == ["doc-acme-2019-q01", "doc-acme-2019-q01-copy"]
    assert by_reason == {}
    kept = {r["id"] for r in read_jsonl(cfg.paths.stage_dir("dedup") / "samples.jsonl")}
    credit = {r["id"] for r in read_jsonl(DATA / "credit_table.jsonl")} - {"credit-011"}
    assert credit <= kept  # applicants who differ in one field are different applicants


def test_no_group_context_or_price_day_in_two_splits(run):
    cfg, m = run
    split = cfg.paths.stage_dir("split")
    rows = {s: read_jsonl(split / f"{s}.jsonl") for s in ("train", "validation", "test")}
    assert all(rows[s] for s in ("train", "test"))
    for key in (lambda r: r["group_id"], lambda r: json.dumps(r["context"], sort_keys=True)):
        seen = {}
        for s, rs in rows.items():
            for r in rs:
                assert seen.setdefault(key(r), s) == s
    days = {}
    for s, rs in rows.items():
        for r in rs:
            if r["source"].startswith("market:"):
                table = r["context"]["table"]
                ti = table["columns"].index("Ticker") if "Ticker" in table["columns"] else None
                for row in table["rows"]:
                    ticker = row[ti] if ti is not None else r["metadata"]["window"]["tickers"][0]
                    day = (ticker, row[1 if ti == 0 else 0])
                    assert days.setdefault(day, s) == s, day
    assert days  # the market rows were there
    report = m["split"].leakage
    assert report["groups_in_two_splits"] == report["context_hashes_in_two_splits"] == 0
    assert report["price_rows_in_two_splits"] == 0


def test_every_row_ends_in_the_dataset_or_with_a_reason(run):
    cfg, m = run
    fetched = m["fetch"].counts["samples"]
    out = cfg.paths.stage_dir("format")
    in_dataset = sum(len(pd.read_parquet(out / f"{s}.parquet")) for s in ("train", "validation", "test")
                     if (out / f"{s}.parquet").exists())
    reasons = (len(read_jsonl(cfg.paths.stage_dir("dedup") / "drops.jsonl"))
               + len(read_jsonl(cfg.paths.stage_dir("split") / "drops.jsonl"))
               + len(read_jsonl(out / "__meta__" / "drops.jsonl")))
    assert in_dataset + reasons == fetched
    for d in read_jsonl(out / "__meta__" / "drops.jsonl") + read_jsonl(cfg.paths.stage_dir("split") / "drops.jsonl"):
        assert d["reason"] and d["row_id"]


def test_card_figures_match_the_files_and_name_the_sources(run):
    cfg, _ = run
    out = cfg.paths.stage_dir("format")
    meta, body = parse_card((out / "README.md").read_text())
    df = pd.concat([pd.read_parquet(out / f"{s}.parquet").assign(split=s) for s in ("train", "validation", "test")
                    if (out / f"{s}.parquet").exists()])
    t = _md_tables(body)
    assert {r[0]: int(r[1]) for r in t["split,rows"]} == {**df.split.value_counts().to_dict(), "total": len(df)}
    src = t["source,rows in dataset,rows fetched,license,annotations"]
    assert {r[0]: int(r[1]) for r in src} == df.source.value_counts().to_dict()
    assert "cc-by-4.0" in json.dumps(meta["license"]) and "expert-generated" in meta["annotations_creators"]
