"""The pipeline's stages, in order: name, output folder, and the plain ``src/`` function that runs it.

Each stage function takes a validated :class:`~datagen.config.Config`, reads its upstream stage's
output folder and writes its own, with ``manifest.json`` last. Imports are lazy so that ``finsynth
--help`` stays fast and a stage's heavy dependencies load only when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.config import Config
from datagen.io import mark_stale


def _fetch(cfg: Config) -> dict[str, Any]:
    from datagen.fetch import run_fetch

    return run_fetch(cfg)


def _augment(cfg: Config) -> dict[str, Any]:
    from datagen.augment import run_augment

    return run_augment(cfg)


def _dedup(cfg: Config) -> dict[str, Any]:
    from datagen.dedup import run_dedup

    return run_dedup(cfg)


def _split(cfg: Config) -> dict[str, Any]:
    from datagen.split import run_split

    return run_split(cfg)


def _format(cfg: Config) -> dict[str, Any]:
    from datagen.chat_format import run_format

    return run_format(cfg)


def _train(cfg: Config) -> dict[str, Any]:
    from training.train import run_train

    return run_train(cfg)


def _evaluate(cfg: Config) -> dict[str, Any]:
    from training.evaluate import run_evaluate

    return run_evaluate(cfg)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config], dict[str, Any]]
    output: Callable[[Config], Path]
    config_sections: tuple[str, ...]  # the config sections this stage's output depends on
    prompts: tuple[str, ...] = ()  # prompt templates it renders


STAGES: tuple[Stage, ...] = (
    Stage("fetch", _fetch, lambda c: c.paths.stage_dir("fetch"), ("sources",)),
    Stage("augment", _augment, lambda c: c.paths.stage_dir("augment"), ("augment", "llm"),
          ("rephrase", "scenario_synthesis")),
    Stage("dedup", _dedup, lambda c: c.paths.stage_dir("dedup"), ("dedup",)),
    Stage("split", _split, lambda c: c.paths.stage_dir("split"), ("split", "dedup")),
    Stage("format", _format, lambda c: c.paths.stage_dir("dataset"), ("format", "model", "card"),
          ("system_analyst", "gemma_chat")),
    Stage("train", _train, lambda c: c.paths.models_dir / c.train.run_name, ("train", "model")),
    Stage("evaluate", _evaluate, lambda c: c.paths.reports_dir / c.evaluate.run_name,
          ("evaluate", "llm", "model"), ("judge_rubric",)),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def mark_downstream_stale(cfg: Config, name: str) -> list[str]:
    """After ``name`` ran, mark every later stage's finished output STALE (until it reruns)."""
    later = STAGE_NAMES[STAGE_NAMES.index(get_stage(name).name) + 1:]
    return [n for n in later if mark_stale(get_stage(n).output(cfg), f"upstream stage {name!r} was rerun")]


def select(only: str | None = None, start: str | None = None) -> list[Stage]:
    """Stages to run: all, ``only`` one, or ``start`` and everything after it."""
    if only and start:
        raise ValueError("give --only or --from, not both")
    if only:
        return [get_stage(only)]
    if start:
        i = STAGE_NAMES.index(get_stage(start).name)
        return list(STAGES[i:])
    return list(STAGES)
