"""The fetch stage: market QA + every configured source-QA file -> ``data/processed/fetch/``.

Outputs (sorted by ``(source, id)``; no timestamps, so the same inputs and config give byte-identical
files): ``samples.jsonl`` (canonical rows) and ``quarantine.jsonl`` (rejected source rows, one
:func:`datagen.io.drop_record` each, sorted by file and row). ``manifest.json`` is written last with
counts per category / source / task type / scenario and ``dropped_<reason>``, quarantine counts by
reason and file, market-data repairs, input file hashes and the ``sources`` config hash; its only
non-deterministic entry is ``timing``.

Row accounting: for every source file, ``source_files[file]`` holds ``rows_in`` (rows read),
``rows_out`` (in ``samples.jsonl``), ``rows_quarantined`` and ``rows_unaccounted`` (plus physical line
counts for CSV and JSONL); ``rows`` sums them, and ``market.rows`` reconciles price rows. A non-zero
``rows_unaccounted`` raises :class:`~datagen.sources.source_qa.RowCountError` before anything is written.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from datagen.config import Config
from datagen.io import clip, drop_counts, drop_record, sha256_file, write_jsonl, write_manifest
from datagen.manifest import FetchManifest
from datagen.sources.market import load_market
from datagen.sources.market_qa import build_market_qa
from datagen.sources.source_qa import RowCountError, load_source_qa
from datagen.stage import Inputs, StageSpec

log = logging.getLogger(__name__)

SAMPLES = "samples.jsonl"
QUARANTINE = "quarantine.jsonl"


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _counts(rows: list[dict[str, Any]], key: str) -> dict[str, int]:
    return dict(sorted(Counter("(none)" if r.get(key) is None else str(r[key]) for r in rows).items()))


def _reconcile(per_file: dict[str, dict[str, int]], samples: list[dict[str, Any]],
               quarantine: list[dict[str, Any]]) -> dict[str, int]:
    """Complete each source file's counts from the final outputs (after the cross-source id check):
    ``rows_out`` (its rows in ``samples``), ``rows_quarantined``, ``rows_unaccounted`` = in - out -
    quarantined. Raises :class:`RowCountError` naming the file when that is not 0; returns the totals."""
    kept = Counter(s["metadata"].get("origin", {}).get("file") for s in samples
                   if not s["source"].startswith("market:"))
    quarantined = Counter(q["file"] for q in quarantine)
    totals = dict.fromkeys(("rows_in", "rows_out", "rows_quarantined", "rows_unaccounted"), 0)
    for file, c in per_file.items():
        rows = {"rows_in": c["rows_in"], "rows_out": kept[file], "rows_quarantined": quarantined[file]}
        rows["rows_unaccounted"] = rows["rows_in"] - rows["rows_out"] - rows["rows_quarantined"]
        if rows["rows_unaccounted"]:
            raise RowCountError(f"{file}: {rows['rows_in']} rows read, {rows['rows_out']} kept + "
                                f"{rows['rows_quarantined']} quarantined: {rows['rows_unaccounted']} unaccounted for")
        per_file[file] = {**rows, **{k: v for k, v in c.items() if k != "rows_in"}}
        for k in totals:
            totals[k] += rows[k]
    stray = set(kept) - set(per_file) | set(quarantined) - set(per_file)
    if stray:
        raise RowCountError(f"rows from files that were not read: {clip(sorted(map(str, stray)), 200)}")
    return totals


def run_fetch(cfg: Config, inputs: Inputs, out_dir: Path) -> FetchManifest:
    """Run the fetch stage (no upstream: it reads the configured sources); returns its manifest."""
    t0 = time.perf_counter()
    root = cfg.paths.root
    samples: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    files_read: dict[str, str] = {}
    market_info: dict[str, Any] | None = None

    mc = cfg.sources.market
    if mc is not None and mc.n_questions > 0:
        md = load_market(mc, cfg.paths.resolve)
        price_rows = md.row_counts()
        if price_rows["rows_unaccounted"]:
            raise RowCountError(f"market prices: {price_rows}: rows unaccounted for")
        rows = build_market_qa(md, mc)
        samples += rows
        for f in md.inputs:
            files_read[_rel(f, root)] = sha256_file(f)
        market_info = {
            "provider": md.provider, "tickers": md.tickers, "price_rows": len(md.prices),
            "first_date": md.prices["date"].min().strftime("%Y-%m-%d"),
            "last_date": md.prices["date"].max().strftime("%Y-%m-%d"),
            "questions": len(rows), "rows": price_rows,
            "repairs": [{**r, "file": _rel(Path(r["file"]), root)} for r in md.repairs]}
        log.info("market: %d QA rows from %s (%d tickers)", len(rows), md.provider, len(md.tickers))

    per_file: dict[str, dict[str, int]] = {}
    for spec in tqdm(cfg.sources.source_qa, desc="source QA files", disable=None):
        path = cfg.paths.resolve(spec.path)
        res = load_source_qa(spec, path, file_label=spec.path.as_posix())
        files_read[_rel(path, root)] = sha256_file(path)
        samples += res.samples
        quarantine += res.quarantine
        per_file[res.file] = {"rows_in": res.rows_in, **res.lines}
        log.info("%s: %d rows kept, %d quarantined", res.file, len(res.samples), len(res.quarantine))

    # ids must be unique across sources too: later occurrences go to quarantine
    seen: dict[str, str] = {}
    unique: list[dict[str, Any]] = []
    for s in samples:
        if s["id"] in seen:
            origin = s["metadata"].get("origin", {})
            quarantine.append(drop_record(
                "fetch", s["id"], "duplicate_id", f"{clip(s['id'], 80)!r} already used by source {seen[s['id']]!r}",
                file=origin.get("file", s["source"]), row=origin.get("row"), field="id", raw=s))
            continue
        seen[s["id"]] = s["source"]
        unique.append(s)
    samples = sorted(unique, key=lambda r: (r["source"], r["id"]))
    quarantine.sort(key=lambda q: (q["file"], q["row"] or 0, q["field"], q["reason"]))
    totals = _reconcile(per_file, samples, quarantine)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / SAMPLES, samples)
    write_jsonl(out_dir / QUARANTINE, quarantine)
    return write_manifest(out_dir, FetchManifest(
        config_hash=STAGE.config_hash(cfg),
        counts={
            "samples": len(samples),
            "per_category": _counts(samples, "category"),
            "per_source": _counts(samples, "source"),
            "per_task_type": _counts(samples, "task_type"),
            "per_scenario": _counts(samples, "scenario"),
            **drop_counts(quarantine),
        },
        rows=totals,
        quarantine={
            "total": len(quarantine),
            "by_reason": _counts(quarantine, "reason"),
            "by_file": _counts(quarantine, "file"),
        },
        source_files=dict(sorted(per_file.items())),
        market=market_info,
        inputs=dict(sorted(files_read.items())),
        timing={"wall_s": round(time.perf_counter() - t0, 3)},
    ))


def _input_files(cfg: Config) -> tuple[Path, ...]:
    """The source-QA files and the market's price files (or folders): what ``run_fetch`` reads."""
    mc = cfg.sources.market
    market = tuple(mc.paths) if mc is not None and mc.provider == "csv" and mc.n_questions > 0 else ()
    return market + tuple(s.path for s in cfg.sources.source_qa)


STAGE = StageSpec("fetch", run_fetch, __name__, ("sources",), input_files=_input_files,
                  manifest=FetchManifest)
