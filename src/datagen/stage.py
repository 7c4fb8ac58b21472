"""What a stage is, declared once, in the stage's own module: ``STAGE = StageSpec(...)``.

A stage is a plain function ``run(cfg) -> manifest`` that reads its upstream stages' output folders and
writes its own (``manifest.json`` last). The spec says everything the orchestration needs to know about
it, and nothing else declares it: ``flows/stages.py`` collects the specs and builds from them the order,
the staleness rules, the Prefect tasks and their cache keys (config sections + upstream content + prompts
+ the code closure of ``module`` + the stage's own output) and the CLI. Adding a stage is one spec.
No Prefect here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.config import Config


def _none(cfg: Config) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: Callable[[Config], dict[str, Any]]
    output: Callable[[Config], Path]  # the folder the stage writes
    module: str  # the declaring module (``__name__``): its project-module import closure is the stage's code
    config_sections: tuple[str, ...]  # config sections (dotted: ``dedup.embedder``) its output depends on
    upstream: tuple[str, ...] = ()  # finished stages it reads
    prompts: Callable[[Config], tuple[str, ...]] = _none  # prompt templates it renders, for this config
    providers: Callable[[Config], tuple[str, ...]] = _none  # LLM providers it calls, for this config

    def config_hash(self, cfg: Config) -> str:
        """The hash of the config the stage reads (``config_sections``): its manifest's ``config_hash``."""
        return cfg.section_hash(*self.config_sections)
