"""What a stage is, declared once, in the stage's own module: ``STAGE = StageSpec(...)``.

A stage is a plain function ``run(cfg, inputs, out) -> Manifest``: ``inputs`` maps each upstream stage's
name to its finished output folder, ``out`` is the folder it writes; it returns its manifest (a
:class:`datagen.manifest.Manifest`), written by ``datagen.io.write_manifest`` (``manifest.json`` last). The
orchestration passes both from the specs, so no stage module knows where another stage writes. A data
stage's folder is ``data/processed/<name>``; a stage whose output lives elsewhere (an adapter, a report)
says where with ``output``.

The spec says everything the orchestration needs to know about a stage, and nothing else declares it:
``flows/stages.py`` collects the specs (the built-in ones, then any registered under the
``finsynth.stages`` entry-point group) and builds from them the order, the staleness rules, the Prefect
tasks and the stage's key (config sections + upstream content + prompts + the code closure of
``module`` + the content of the files it reads, ``input_files``), which decides whether its output is
current, and the CLI. Adding a stage is one module with one spec.
No Prefect here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from datagen.config import Config
from datagen.manifest import Manifest

Inputs = Mapping[str, Path]  # upstream stage name -> its finished output folder


def _none(cfg: Config) -> tuple:
    return ()


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: Callable[..., Manifest]  # run(cfg, inputs, out) -> the manifest it wrote
    module: str  # the declaring module (``__name__``): its project-module import closure is the stage's code
    config_sections: tuple[str, ...]  # config sections (dotted: ``dedup.embedder``) its output depends on
    upstream: tuple[str, ...] = ()  # finished stages it reads, passed to ``run`` as ``inputs``
    prompts: Callable[[Config], tuple[str, ...]] = _none  # prompt templates it renders, for this config
    providers: Callable[[Config], tuple[str, ...]] = _none  # LLM providers it calls, for this config
    # files outside data/processed it reads, for this config, as configured (relative: against paths.root;
    # a folder stands for every file under it): their content is part of the stage's key
    input_files: Callable[[Config], tuple[Path, ...]] = _none
    folder: Callable[[Config], Path] | None = None  # where it writes, when not data/processed/<name>
    manifest: type[Manifest] = Manifest  # the class of the manifest ``run`` returns

    def output(self, cfg: Config) -> Path:
        """The folder the stage writes."""
        return self.folder(cfg) if self.folder else cfg.paths.stage_dir(self.name)

    def config_hash(self, cfg: Config) -> str:
        """The hash of the config the stage reads (``config_sections``): its manifest's ``config_hash``."""
        return cfg.section_hash(*self.config_sections)
