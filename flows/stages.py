"""The pipeline's stages, in order, collected from the ``STAGE`` spec each stage module declares
(:class:`datagen.stage.StageSpec`), and what the orchestration builds from them: what a stage's output
depends on (its key, :func:`cache_inputs`), and running one stage with its checks (:func:`execute`).

Freshness is decided here, once: :func:`settle` keeps a stage's output when its folder holds a finished,
intact output made from the stage's current key (``run.json`` beside it, written by :func:`settle` after
the stage function returns), and runs the stage otherwise. ``finsynth <stage>`` and the Prefect task both
go through it, so either sees what the other made; Prefect's cache only mirrors the decision.

A stage of your own is one module with one spec, registered as an entry point of your package
(``[project.entry-points."finsynth.stages"] mystage = "mypkg.mystage:STAGE"``): it runs after its last
upstream stage, gets its own CLI command, ``--only`` / ``--from`` and Prefect flow, and nothing here
changes.

Stage modules import their heavy dependencies (torch, transformers) inside functions, so collecting
the specs keeps ``finsynth --help`` fast.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.augmentation import augment
from datagen.config import Config
from datagen.dataset import chat_format, dedup, split
from datagen.faults import find
from datagen.io import (RUN_INFO, STALE, begin_stage, manifest_hash, mark_stale, read_json, read_manifest,
                        require_stage, sha256_file, verify_outputs, write_json)
from datagen.manifest import Manifest
from datagen.progress import seconds, stage_done_line, stage_log
from datagen.prompts import PROMPTS_DIR
from datagen.sources import fetch
from datagen.stage import StageSpec
from lm.causal_lm import release_memory
from training import evaluate, train

PROJECT_PACKAGES = ("lm", "datagen", "training")


ENTRY_POINTS = "finsynth.stages"  # the entry-point group other packages register their stages in
BUILTIN: tuple[StageSpec, ...] = tuple(m.STAGE for m in (fetch, augment, dedup, split, chat_format, train, evaluate))


def collect(builtin: tuple[StageSpec, ...] = BUILTIN) -> tuple[StageSpec, ...]:
    """The built-in stages, each registered stage inserted after its last upstream stage (in name order
    among registered ones). A registered stage whose name is taken, or whose upstream is unknown, is
    refused with its entry point named."""
    from importlib.metadata import entry_points

    order = list(builtin)
    for ep in sorted(entry_points(group=ENTRY_POINTS), key=lambda e: e.name):
        spec = ep.load()
        names = [s.name for s in order]
        if not isinstance(spec, StageSpec):
            raise TypeError(f"entry point {ep.value} ({ENTRY_POINTS}) is not a datagen.stage.StageSpec")
        if spec.name in names:
            raise ValueError(f"entry point {ep.value}: a stage named {spec.name!r} exists already")
        unknown = [u for u in spec.upstream if u not in names]
        if unknown:
            raise ValueError(f"entry point {ep.value}: stage {spec.name!r} reads unknown stages {unknown}; "
                             f"stages: {', '.join(names)}")
        after = max((names.index(u) for u in spec.upstream), default=-1)
        order.insert(after + 1, spec)
    return tuple(order)


# One spec per stage, declared in its own module (``STAGE = StageSpec(...)``); this tuple is the order.
STAGES: tuple[StageSpec, ...] = collect()
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def get_stage(name: str) -> StageSpec:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def stage_inputs(cfg: Config, stage: StageSpec) -> dict[str, Path]:
    """What a stage's ``run`` gets as ``inputs``: each upstream stage's output folder, by name."""
    return {u: get_stage(u).output(cfg) for u in stage.upstream}


def invoke(cfg: Config, name: str, **kw: Any) -> Manifest:
    """Call one stage's function on the folders its spec names, without :func:`execute`'s checks
    (tests, notebooks); ``kw`` go to the stage function (e.g. a test's provider)."""
    stage = get_stage(name)
    return stage.run(cfg, stage_inputs(cfg, stage), stage.output(cfg), **kw)


def mark_downstream_stale(cfg: Config, name: str) -> list[str]:
    """After ``name`` ran, mark every later stage's finished output STALE (until it reruns)."""
    later = STAGE_NAMES[STAGE_NAMES.index(get_stage(name).name) + 1:]
    return [n for n in later if mark_stale(get_stage(n).output(cfg), f"upstream stage {name!r} was rerun")]


def probe_providers(cfg: Config, stages: list[StageSpec]) -> list[str]:
    """Resolve the key of, and make one cheap call to, every provider these stages will call, before
    the first of them runs: a missing key, a dead server or a refused key fails the run up front."""
    from datagen.llm import probe_provider

    names = list(dict.fromkeys(n for s in stages for n in s.providers(cfg)))
    for n in names:
        probe_provider(cfg, n)
    return names


@dataclass(frozen=True)
class Outcome:
    """What :func:`settle` did with a stage: ``ran`` False when its output was current and kept."""

    manifest: Manifest
    ran: bool
    key: str  # the stage's inputs key (:func:`inputs_key`) its output was made from


def execute(cfg: Config, name: str, *, refresh: bool = False) -> Manifest:
    """Run one stage unless its output is current (see :func:`settle`); returns its manifest."""
    return settle(cfg, name, refresh=refresh).manifest


def settle(cfg: Config, name: str, *, refresh: bool = False) -> Outcome:
    """Bring one stage's output up to date. When its folder holds a finished, intact output made from the
    stage's current key (:func:`output_matches`), it is kept (and its STALE mark cleared: it was made from
    the upstream content there now), unless ``refresh``. Otherwise the stage runs: its upstream outputs must
    be finished, intact and fresh; its providers answer; then its folder is marked in progress (old manifest
    and ``run.json`` removed), the stage function writes it, and ``run.json`` records the key. Marks later
    stages STALE when its output content changed."""
    stage = get_stage(name)
    key = cache_inputs(cfg, stage)
    ikey = inputs_key(key)
    out = stage.output(cfg)
    if not refresh and output_matches(cfg, stage, key):
        return Outcome(keep_current(cfg, stage), ran=False, key=ikey)
    t0 = time.monotonic()
    stage_log.info("%s: started", name)
    release_memory()
    try:
        ups = [require_stage(get_stage(u).output(cfg), u) for u in stage.upstream]
        probe_providers(cfg, [stage])
        before = manifest_hash(out)
        begin_stage(out)
        manifest = stage.run(cfg, stage_inputs(cfg, stage), out)
        write_json(out / RUN_INFO, {"inputs_key": ikey, "key": key})
    except Exception as e:  # a full disk, a read-only root, a corrupt cache: one line naming this stage
        fault = find(e, stage=name, path=out)
        stage_log.error("%s: failed after %s: %s", name, seconds(time.monotonic() - t0),
                        " ".join(str(fault or e).split()) or type(e).__name__)
        if fault is None or fault is e:
            raise
        raise fault from e
    finally:
        release_memory()  # what the stage freed goes back to the OS before the next stage loads its models
    ins = [m.rows_out() for m in ups]
    stage_log.info("%s", stage_done_line(name, manifest, time.monotonic() - t0,
                                         sum(ins) if ins and None not in ins else None))
    if manifest_hash(out) != before:
        mark_downstream_stale(cfg, name)
    return Outcome(manifest, ran=True, key=ikey)


def keep_current(cfg: Config, stage: StageSpec) -> Manifest:
    """Keep a stage's output that is current (made from its key): it was made from the upstream content
    there now, so its STALE mark goes. Returns its manifest."""
    out = stage.output(cfg)
    (out / STALE).unlink(missing_ok=True)
    stage_log.info("%s: current (same config, upstream content, input files, prompts and code): not rerun",
                   stage.name)
    return read_manifest(out, stage.manifest)


def select(only: str | None = None, start: str | None = None) -> list[StageSpec]:
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
    cands = [base.with_suffix(".py"), base / "__init__.py"] if rest else [base / "__init__.py", base / f"{top}.py"]
    for cand in cands:  # a top-level name is a package (its __init__) or a plain module (a registered stage's)
        if cand.is_file():
            return cand
    return None


@functools.lru_cache(maxsize=512)
def _parsed(source: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """A module's source read once: the project modules it names in imports (and ``module.name`` for each
    name it imports from one), and its string constants. Cached by content, so an edit is seen."""
    imports: list[str] = []
    strings: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imports += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imports += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
    return tuple(n for n in imports if n.split(".")[0] in PROJECT_PACKAGES), frozenset(strings)


def module_closure(module: str) -> tuple[str, ...]:
    """``module`` and every project module (``lm``/``datagen``/``training``) it imports, transitively: the
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
        todo.extend(_parsed(_module_file(m).read_text(encoding="utf-8"))[0])
    return tuple(sorted(seen))


def _prompt_names() -> set[str]:
    return {p.stem for p in PROMPTS_DIR.glob("*.jinja")}


def stage_prompts(cfg: Config, stage: StageSpec) -> tuple[str, ...]:
    """Prompts the stage can render: every prompt name written as a string in its code (closure), and
    every prompt a config value of its sections names (``format.system_prompt``, ``model.chat_template``).
    Read off the code, so the list cannot drift from what the code renders."""
    known = _prompt_names()
    found = {p for p in stage.prompts(cfg) if p}
    for m in module_closure(stage.module):
        if m == "datagen.config":  # its defaults name prompts; the config walk below covers those
            continue
        found |= _parsed(_module_file(m).read_text(encoding="utf-8"))[1] & known

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
        walk(cfg.section(sec))
    return tuple(sorted(found & known))


def code_hash(stage: StageSpec) -> str:
    h = hashlib.sha256()
    for m in module_closure(stage.module):
        h.update(m.encode() + b"\0" + _module_file(m).read_bytes())
    return h.hexdigest()[:16]


def file_hash(path: Path) -> str | None:
    """sha256 of a file's content; of a folder, over every file under it (relative path and content);
    None when there is nothing there (the stage will say so when it runs)."""
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\0")
    return h.hexdigest()


def cache_inputs(cfg: Config, stage: StageSpec) -> dict[str, Any]:
    """The stage's key: everything its output depends on. The hash of the config sections its spec names
    (the manifest's ``config_hash``), upstream *content* hashes, the content of the files it reads
    (``input_files``), prompt file hashes, the code closure, the root. :func:`settle` keeps an output made
    from the same key; the Prefect task's cache key is computed over it too."""
    return {
        "stage": stage.name,
        "config": stage.config_hash(cfg),
        "upstream": {u: manifest_hash(get_stage(u).output(cfg)) for u in stage.upstream},
        "prompts": {n: hashlib.sha256((PROMPTS_DIR / f"{n}.jinja").read_bytes()).hexdigest()[:12]
                    for n in stage_prompts(cfg, stage)},
        "files": {str(p): file_hash(cfg.paths.resolve(Path(p))) for p in stage.input_files(cfg)},
        "code": code_hash(stage),
        "root": str(cfg.paths.root),
    }


def inputs_key(key: dict[str, Any]) -> str:
    from datagen.io import dumps

    return hashlib.sha256(dumps(key).encode()).hexdigest()[:24]


def output_matches(cfg: Config, stage: StageSpec, key: dict[str, Any]) -> bool:
    """The stage's folder holds a finished output made from exactly these inputs, with every file
    intact. When not (deleted, edited, or made from other inputs), a cached result must not be used."""
    out = stage.output(cfg)
    try:
        info = read_json(out / RUN_INFO)
        manifest = read_manifest(out)
        if manifest is None:
            return False
        verify_outputs(out, manifest, stage.name)
    except (OSError, ValueError, RuntimeError):  # a corrupt manifest is a StageOutputError (RuntimeError)
        return False
    return info.get("inputs_key") == inputs_key(key)
