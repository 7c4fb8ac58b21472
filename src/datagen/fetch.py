"""The fetch stage: market QA + every configured source-QA file -> ``data/processed/fetch/``.

Outputs (sorted by ``(source, id)``; no timestamps, so the same inputs and config give byte-identical
files): ``samples.jsonl`` (canonical rows) and ``quarantine.jsonl`` (rejected source rows, sorted by
file and row). ``manifest.json`` is written last with counts per category / source / task type /
scenario, quarantine counts by reason and file, market-data repairs, input file hashes and the
``sources`` config hash; its only non-deterministic entry is ``timing``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from datagen.config import Config
from datagen.io import sha256_file, write_jsonl, write_manifest
from datagen.market import load_market
from datagen.market_qa import build_market_qa
from datagen.source_qa import load_source_qa

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


def run_fetch(cfg: Config) -> dict[str, Any]:
    """Run the fetch stage; returns its manifest."""
    t0 = time.perf_counter()
    out_dir = cfg.paths.stage_dir("fetch")
    root = cfg.paths.root
    samples: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    inputs: dict[str, str] = {}
    market_info: dict[str, Any] | None = None

    mc = cfg.sources.market
    if mc is not None and mc.questions_per_type > 0:
        md = load_market(mc, cfg.paths.resolve)
        rows = build_market_qa(md, mc)
        samples += rows
        for f in md.inputs:
            inputs[_rel(f, root)] = sha256_file(f)
        market_info = {
            "provider": md.provider, "tickers": md.tickers, "price_rows": len(md.prices),
            "first_date": md.prices["date"].min().strftime("%Y-%m-%d"),
            "last_date": md.prices["date"].max().strftime("%Y-%m-%d"),
            "questions": len(rows),
            "repairs": [{**r, "file": _rel(Path(r["file"]), root)} for r in md.repairs]}
        log.info("market: %d QA rows from %s (%d tickers)", len(rows), md.provider, len(md.tickers))

    per_file: dict[str, dict[str, int]] = {}
    for spec in tqdm(cfg.sources.source_qa, desc="source QA files", disable=None):
        path = cfg.paths.resolve(spec.path)
        res = load_source_qa(spec, path, file_label=spec.path.as_posix())
        inputs[_rel(path, root)] = sha256_file(path)
        samples += res.samples
        quarantine += res.quarantine
        per_file[res.file] = {"rows": res.rows_read, "kept": len(res.samples), "quarantined": len(res.quarantine)}
        log.info("%s: %d rows kept, %d quarantined", res.file, len(res.samples), len(res.quarantine))

    # ids must be unique across sources too: later occurrences go to quarantine
    seen: dict[str, str] = {}
    unique: list[dict[str, Any]] = []
    for s in samples:
        if s["id"] in seen:
            origin = s["metadata"].get("origin", {})
            quarantine.append({"file": origin.get("file", s["source"]), "row": origin.get("row"), "field": "id",
                               "reason": "duplicate_id",
                               "detail": f"{s['id']!r} already used by source {seen[s['id']]!r}", "raw": s})
            continue
        seen[s["id"]] = s["source"]
        unique.append(s)
    samples = sorted(unique, key=lambda r: (r["source"], r["id"]))
    quarantine.sort(key=lambda q: (q["file"], q["row"] or 0, q["field"], q["reason"]))

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / SAMPLES, samples)
    write_jsonl(out_dir / QUARANTINE, quarantine)
    manifest = {
        "stage": "fetch",
        "config_hash": cfg.section_hash("sources"),
        "counts": {
            "samples": len(samples),
            "per_category": _counts(samples, "category"),
            "per_source": _counts(samples, "source"),
            "per_task_type": _counts(samples, "task_type"),
            "per_scenario": _counts(samples, "scenario"),
        },
        "quarantine": {
            "total": len(quarantine),
            "by_reason": _counts(quarantine, "reason"),
            "by_file": _counts(quarantine, "file"),
        },
        "source_files": dict(sorted(per_file.items())),
        "market": market_info,
        "inputs": dict(sorted(inputs.items())),
        "timing": {"wall_s": round(time.perf_counter() - t0, 3)},
    }
    return write_manifest(out_dir, manifest)
