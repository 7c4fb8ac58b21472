"""The pipeline's stages, in order: name, output folder, and the plain ``src/`` function that runs it.

Each stage function takes a validated :class:`~datagen.config.Config`, reads its upstream stage's
output folder and writes its own, with ``manifest.json`` last. Imports are lazy so that ``finsynth
--help`` stays fast and a stage's heavy dependencies load only when it runs.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.config import Config
from datagen.io import RUN_INFO, begin_stage, manifest_hash, mark_stale, read_json, require_stage, verify_outputs
from datagen.prompts import PROMPTS_DIR

PROJECT_PACKAGES = ("datagen", "training")


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


def _augment_providers(c: Config) -> tuple[str, ...]:
    names = [c.augment.provider] if c.augment.k > 0 else []
    if c.augment.scenario.enabled and c.augment.scenario.per_cluster and c.augment.scenario.clusters:
        names.append(c.augment.scenario.provider)
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config], dict[str, Any]]
    output: Callable[[Config], Path]
    config_sections: tuple[str, ...]  # the config sections this stage's output depends on
    prompts: tuple[str, ...] = ()  # prompt templates it renders
    upstream: tuple[str, ...] = ()  # finished stages it reads
    providers: Callable[[Config], tuple[str, ...]] = lambda c: ()  # LLM providers it calls


STAGES: tuple[Stage, ...] = (
    Stage("fetch", _fetch, lambda c: c.paths.stage_dir("fetch"), ("sources",)),
    Stage("augment", _augment, lambda c: c.paths.stage_dir("augment"), ("augment", "llm", "dedup.embedder"),
          ("rephrase", "scenario_synthesis"), ("fetch",), _augment_providers),
    Stage("dedup", _dedup, lambda c: c.paths.stage_dir("dedup"), ("dedup",), (), ("augment",)),
    Stage("split", _split, lambda c: c.paths.stage_dir("split"), ("split", "dedup"), (), ("dedup",)),
    Stage("format", _format, lambda c: c.paths.stage_dir("dataset"), ("format", "model", "card", "split", "sources"),
          ("system_analyst", "gemma_chat"), ("split",)),
    Stage("train", _train, lambda c: c.paths.models_dir / c.train.run_name, ("train", "model"), (),
          ("format",)),
    Stage("evaluate", _evaluate, lambda c: c.paths.reports_dir / c.evaluate.run_name,
          ("evaluate", "llm", "model", "format.system_prompt"), ("judge_rubric",), ("format", "train"),
          lambda c: (c.evaluate.judge_provider,)),
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


def probe_providers(cfg: Config, stages: list[Stage]) -> list[str]:
    """Resolve the key of, and make one cheap call to, every provider these stages will call, before
    the first of them runs: a missing key, a dead server or a refused key fails the run up front."""
    from datagen.llm import probe_provider

    names = list(dict.fromkeys(n for s in stages for n in s.providers(cfg)))
    for n in names:
        probe_provider(cfg, n)
    return names


def execute(cfg: Config, name: str) -> dict[str, Any]:
    """Run one stage: its upstream outputs must be finished, intact and fresh; its providers answer;
    then its folder is marked in progress (old manifest removed) and the stage function writes it.
    Marks later stages STALE when its output content changed. Returns the new manifest."""
    stage = get_stage(name)
    for u in stage.upstream:
        require_stage(get_stage(u).output(cfg), u)
    probe_providers(cfg, [stage])
    out = stage.output(cfg)
    before = manifest_hash(out)
    begin_stage(out)
    manifest = stage.run(cfg)
    if manifest_hash(out) != before:
        mark_downstream_stale(cfg, name)
    return manifest


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


# ----------------------------------------------------------------------------- what a stage's output depends on
def _entry_module(stage: Stage) -> str:
    """The ``src/`` module a stage wrapper imports its function from (read off the wrapper's code)."""
    for node in ast.walk(ast.parse(_source_of(stage.run))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT_PACKAGES:
            return node.module
    raise ValueError(f"stage {stage.name!r}: its wrapper imports no project module")


def _source_of(fn: Callable) -> str:
    import inspect
    import textwrap

    return textwrap.dedent(inspect.getsource(fn))


@functools.cache
def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # the top-level package only: nothing below is imported
    assert spec is not None and spec.origin is not None, package
    return Path(spec.origin).parent


def _module_file(module: str) -> Path | None:
    """The source file of a project module, found without importing it (None if it is not a module,
    e.g. ``datagen.io.read_jsonl``)."""
    top, *rest = module.split(".")
    base = _package_dir(top).joinpath(*rest)
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def module_closure(module: str) -> tuple[str, ...]:
    """``module`` and every project module (``datagen``/``training``) it imports, transitively: the
    code a stage's output depends on. Package ``__init__`` modules on the way are included."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen or _module_file(m) is None:
            continue
        seen.add(m)
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        for node in ast.walk(ast.parse(_module_file(m).read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            todo.extend(n for n in names if n.split(".")[0] in PROJECT_PACKAGES)
    return tuple(sorted(seen))


def _prompt_names() -> set[str]:
    return {p.stem for p in PROMPTS_DIR.glob("*.jinja")}


def stage_prompts(cfg: Config, stage: Stage) -> tuple[str, ...]:
    """Prompts the stage can render: every prompt name written as a string in its code (closure), and
    every prompt a config value of its sections names (``format.system_prompt``, ``model.chat_template``).
    Read off the code, so the list cannot drift from what the code renders."""
    known = _prompt_names()
    found = set(stage.prompts)
    for m in module_closure(_entry_module(stage)):
        if m == "datagen.config":  # its defaults name prompts; the config walk below covers those
            continue
        for node in ast.walk(ast.parse(_module_file(m).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
                found.add(node.value)

    def walk(v: Any) -> None:
        if isinstance(v, str) and v in known:
            found.add(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for sec in stage.config_sections:
        walk(config_section(cfg, sec))
    return tuple(sorted(found & known))


def config_section(cfg: Config, dotted: str) -> Any:
    """A config section by dotted path (``dedup.embedder``), as public JSON."""
    node: Any = cfg.dump_public()
    for part in dotted.split("."):
        node = node[part]
    return node


def code_hash(stage: Stage) -> str:
    h = hashlib.sha256()
    for m in module_closure(_entry_module(stage)):
        h.update(m.encode() + b"\0" + _module_file(m).read_bytes())
    return h.hexdigest()[:16]


def cache_inputs(cfg: Config, stage: Stage) -> dict[str, Any]:
    """Everything a stage's output depends on; the Prefect task's cache key is computed over this:
    config sections, upstream *content* hashes, prompt file hashes, the code closure, the root."""
    return {
        "stage": stage.name,
        "config": {s: config_section(cfg, s) for s in stage.config_sections},
        "upstream": {u: manifest_hash(get_stage(u).output(cfg)) for u in stage.upstream},
        "prompts": {n: hashlib.sha256((PROMPTS_DIR / f"{n}.jinja").read_bytes()).hexdigest()[:12]
                    for n in stage_prompts(cfg, stage)},
        "code": code_hash(stage),
        "root": str(cfg.paths.root),
    }


def inputs_key(key: dict[str, Any]) -> str:
    from datagen.io import dumps

    return hashlib.sha256(dumps(key).encode()).hexdigest()[:24]


def output_matches(cfg: Config, stage: Stage, key: dict[str, Any]) -> bool:
    """The stage's folder holds a finished output made from exactly these inputs, with every file
    intact. When not (deleted, edited, or made from other inputs), a cached result must not be used."""
    out = stage.output(cfg)
    try:
        info = read_json(out / RUN_INFO)
        manifest = read_json(out / "manifest.json")
        verify_outputs(out, manifest, stage.name)
    except (OSError, ValueError, RuntimeError):
        return False
    return info.get("inputs_key") == inputs_key(key)
