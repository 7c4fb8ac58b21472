"""Prefect orchestration: one flow per stage, and ``pipeline`` that runs them in order.

Each stage flow calls one task, which brings the stage (its spec, ``STAGE`` in its ``src/`` module, see
:mod:`datagen.stage`) up to date through :func:`flows.stages.settle`. That function alone decides
whether a stage reruns: it keeps an output made from the stage's current key
(:func:`flows.stages.cache_inputs`), which covers

- the config sections the spec names (dotted, e.g. augment reads ``dedup.embedder``),
- each upstream stage's *content* hash (its output files, not timings: those live in ``timings.json``),
- the content of the files outside ``data/processed`` the stage reads (the spec's ``input_files``:
  ``data/raw`` sources, the gold and calibration files),
- the content hashes of the prompts it renders (the spec's list, plus every prompt name in its code),
- the code: every project module in the import closure of the stage's module,
- the project root (two roots never share results);

and records the key beside the output (``run.json``), whichever way the stage ran: ``finsynth <stage>``
or this flow. The task's Prefect cache key is that key, and Prefect's cached result is used only while
the stage's folder holds the output made from it, so Prefect's cache is a view of the same decision: an
unchanged rerun reports the stage ``Cached``, and a lost Prefect home (or result storage) reruns nothing
that is current. A changed config value, input file or prompt reruns exactly the stage that reads it and
the stages downstream of it. ``refresh=True`` forces a rerun. Results (the stage manifests) are persisted
under ``prefect.result_storage`` inside the data folder. Flows take plain parameters (profile, config
path, overrides) so deployments can run them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.filesystems import LocalFileSystem
from prefect.logging import get_run_logger

from datagen.config import Config, load_config
from flows.lock import run_lock
from datagen.manifest import EvaluateManifest, Manifest
from datagen.progress import stage_log
from datagen.render import md_cell, md_code
from flows.progress import to_run_log
from flows.stages import (
    STAGES,
    cache_inputs,
    get_stage,
    keep_current,
    output_matches,
    probe_providers,
    select,
    settle,
)


@task(cache_policy=(INPUTS - "cfg" - "refresh") + TASK_SOURCE, persist_result=True, result_serializer="json",
      task_run_name="{key[stage]}")
def run_stage(cfg: Config, key: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
    """Bring one stage up to date (:func:`flows.stages.settle`: run it, or keep its current output).
    ``key`` is its key (:func:`flows.stages.cache_inputs`). Returns the manifest as JSON (Prefect persists
    it) and whether the stage ran."""
    outcome = settle(cfg, key["stage"], refresh=refresh)
    return {"manifest": outcome.manifest.to_json(), "ran": outcome.ran}


def _result_storage(cfg: Config) -> LocalFileSystem:
    """A saved LocalFileSystem block under the project's data folder (Prefect wants it server-side)."""
    path = cfg.paths.resolve(cfg.prefect.result_storage).resolve()
    path.mkdir(parents=True, exist_ok=True)
    name = "finsynth-results-" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    block = LocalFileSystem(basepath=str(path))
    block.save(name, overwrite=True)
    return block


def _load(profile: str | None, config_path: str | None, overrides: list[str] | None,
          root: str | None) -> Config:
    return load_config(config_path, profile=profile, overrides=overrides,
                       root=Path(root) if root else None)


def _run_one(cfg: Config, name: str, refresh: bool) -> dict[str, Any]:
    stage = get_stage(name)
    key = cache_inputs(cfg, stage)
    # a cached result only where settle() would keep the folder's output: Prefect's cache mirrors its decision
    current = not refresh and output_matches(cfg, stage, key)
    t = run_stage.with_options(result_storage=_result_storage(cfg), refresh_cache=None if current else True)
    t0 = time.monotonic()
    state = t(cfg, key, refresh, return_state=True)
    result = state.result()
    if state.name == "Cached":  # the task did not run: what settle() does with a current output
        keep_current(cfg, stage)
    cached = state.name == "Cached" or not result["ran"]
    manifest = stage.manifest.from_json(result["manifest"])
    publish_artifacts(cfg, name, manifest)
    return {"stage": name, "state": state.name, "cached": cached, "output": str(stage.output(cfg)),
            "seconds": round(time.monotonic() - t0, 1)}


def _png_markdown(title: str, png: Path, max_bytes: int = 1_500_000) -> str:
    """A heading and the PNG inline as a ``data:`` URL (the Prefect UI renders those; a relative path
    renders as a broken image), then its path on disk."""
    if not png.exists() or png.stat().st_size > max_bytes:
        return f"### {title}\n\n`{png}`\n"
    return f"### {title}\n\n{_png_image(title, png)}\n\n`{png}`\n"


def _png_image(alt: str, png: Path) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"


def inline_images(md: str, folder: Path, max_bytes: int = 1_500_000) -> str:
    """Replace relative ``![alt](file.png)`` links with ``data:`` URLs of the files in ``folder``
    (a link to a missing or too large file becomes its path in code)."""
    def sub(m: re.Match) -> str:
        png = folder / m.group(2)
        if png.is_file() and png.stat().st_size <= max_bytes:
            return _png_image(m.group(1), png)
        return f"`{png}`"
    return re.sub(r"!\[([^\]]*)\]\((?!data:|https?:|/)([^)\s]+\.png)\)", sub, md)


def card_for_ui(card: str) -> str:
    """The dataset card with its YAML front matter as a compact two-column table under the title (the
    UI renders raw front matter as one large heading per line); the file itself is left as it is."""
    m = re.match(r"---\n(.*?)\n---\n", card, re.S)
    if not m:
        return card
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        meta = None
    if isinstance(meta, dict):
        def value(v: Any) -> str:
            if isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v):
                return ", ".join(md_cell(x) for x in v)
            if isinstance(v, (dict, list)):
                return md_code(json.dumps(v, separators=(", ", ": "), default=str), in_table=True)
            return md_cell(v)
        table = "\n".join(["| Hub metadata | value |", "|---|---|"]
                           + [f"| {md_cell(k)} | {value(v)} |" for k, v in meta.items()])
    else:
        table = "```yaml\n" + m.group(1) + "\n```"
    body = card[m.end():].lstrip("\n")
    title, sep, rest = body.partition("\n")
    if title.startswith("# "):
        return f"{title}\n\n{table}\n{sep}{rest}"
    return f"{table}\n\n{body}"


def ui_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact: the UI renders each string cell as Markdown (and drops raw
    HTML), so a string from data goes through :func:`datagen.render.md_cell` to show as it is."""
    return [{k: md_cell(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]


def publish_artifacts(cfg: Config, name: str, manifest: Manifest) -> None:
    """Prefect artifacts for what a person inspects: the dataset card, judge scores, plots."""
    out = get_stage(name).output(cfg)
    if name == "format" and (out / "README.md").exists():
        create_markdown_artifact(markdown=card_for_ui((out / "README.md").read_text(encoding="utf-8")),
                                 key="dataset-card", description="Hugging Face dataset card")
        create_markdown_artifact(markdown=_png_markdown("Token lengths", out / "__meta__" / "token_lengths.png"),
                                 key="token-lengths", description="token-length histogram")
    elif name == "train":
        pngs = sorted(out.glob("*.png"))
        if pngs:
            create_markdown_artifact(markdown="\n".join(_png_markdown(p.stem, p) for p in pngs),
                                     key="loss-curves", description="training and validation loss")
    elif name == "evaluate":
        from training.model_card import arms, is_difference, score_table

        rows = manifest.table_rows if isinstance(manifest, EvaluateManifest) else []
        if rows:  # two narrow tables rather than one that scrolls sideways in the UI
            create_table_artifact(table=ui_table(score_table(rows, part="scores", ci_in_header=False)),
                                  key="judge-scores",
                                  description="per-category mean score [95% bootstrap CI] of each arm; LLM judge: "
                                              "whether the row rests on the judge, and the judge's self-check verdict")
            if any(is_difference(a) for a in arms(rows)):
                create_table_artifact(table=ui_table(score_table(rows, part="differences", ci_in_header=False)),
                                      key="score-differences",
                                      description="paired differences per category, mean [95% bootstrap CI]; "
                                                  "an interval that excludes 0 is a difference the sample supports")
        f1_rows = manifest.classification_rows if isinstance(manifest, EvaluateManifest) else []
        if f1_rows:  # classification: macro-F1 of every arm incl. the majority baseline, and collapse flags
            create_table_artifact(table=ui_table(f1_rows), key="classification-f1",
                                  description="classification per category: macro-F1 [95% clustered CI] of base "
                                              "zero-shot, base few-shot, tuned and the majority-label baseline "
                                              "(log-likelihood scoring), tuned's paired gains, and the arms flagged "
                                              "as collapsed (> 80% one label; a collapsed tuned arm's gain is no "
                                              "claim)")
        if (out / "report.md").exists():
            md = inline_images((out / "report.md").read_text(encoding="utf-8"), out)
            if "data:image/png" not in md:
                md += "\n\n" + _png_markdown("Scores", out / "scores.png")
            create_markdown_artifact(markdown=md, key="evaluation-report", description="evaluation report")


def _stage_flow(name: str):
    @flow(name=f"{name}")
    def stage_flow(profile: str | None = "demo", config_path: str | None = None,
                   overrides: list[str] | None = None, root: str | None = None,
                   refresh: bool = False, allow_stale: bool = False) -> dict[str, Any]:
        if allow_stale:
            os.environ["FINSYNTH_ALLOW_STALE"] = "1"
        cfg = _load(profile, config_path, overrides, root)
        with to_run_log(), run_lock(cfg.paths.root, cfg.llm.cache):
            return _run_one(cfg, name, refresh)

    stage_flow.__name__ = f"{name}_flow"
    return stage_flow


STAGE_FLOWS = {s.name: _stage_flow(s.name) for s in STAGES}  # one flow per stage, registered ones too


@flow(name="finsynth-pipeline", persist_result=True, result_serializer="json")
def pipeline(profile: str | None = "demo", config_path: str | None = None,
             overrides: list[str] | None = None, root: str | None = None,
             only: str | None = None, start: str | None = None, refresh: bool = False,
             allow_stale: bool = False) -> dict[str, Any]:
    """The whole pipeline (or ``only`` one stage, or from ``start`` on). Returns each stage's state."""
    if allow_stale:
        os.environ["FINSYNTH_ALLOW_STALE"] = "1"
    cfg = _load(profile, config_path, overrides, root)
    with to_run_log(), run_lock(cfg.paths.root, cfg.llm.cache):
        return _pipeline(cfg, profile, config_path, overrides, root, only, start, refresh, allow_stale)


def _pipeline(cfg: Config, profile, config_path, overrides, root, only, start, refresh,
              allow_stale) -> dict[str, Any]:
    logger = get_run_logger()
    stages = select(only, start)
    probed = probe_providers(cfg, stages)  # a missing key or dead server fails before any stage runs
    if probed:
        stage_log.info("providers answering: %s", ", ".join(probed))
    progress = create_progress_artifact(progress=0.0, key="pipeline-progress",
                                        description="stages finished / stages selected")
    results = []
    for i, stage in enumerate(stages, start=1):
        logger.info("stage %s (%d/%d)", stage.name, i, len(stages))
        stage_flow = STAGE_FLOWS[stage.name]
        results.append(stage_flow(profile, config_path, overrides, root, refresh, allow_stale))
        update_progress_artifact(progress, progress=100.0 * i / len(stages))
    summary = {
        "profile": cfg.profile,
        "stages": results,
        "executed": [r["stage"] for r in results if not r["cached"]],
        "cached": [r["stage"] for r in results if r["cached"]],
        "dataset_card": str(get_stage("format").output(cfg) / "README.md"),
        "adapter": str(get_stage("train").output(cfg)),
        "report": str(get_stage("evaluate").output(cfg) / "report.md"),
    }
    logger.info("executed: %s; cached: %s", summary["executed"], summary["cached"])
    return summary
