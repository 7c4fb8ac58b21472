"""Atomic, deterministic file I/O and stage manifests.

Every stage writes its outputs with these helpers and writes ``manifest.json`` *last*: a stage
folder without a manifest is partial work. Writes go to a temporary file in the same folder and are
moved into place with ``os.replace``, so a killed run never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from datagen.manifest import Manifest

MANIFEST = "manifest.json"
STALE = "STALE"
IN_PROGRESS = "IN_PROGRESS"
TIMINGS = "timings.json"  # wall-clock figures: beside the manifest, never part of a cache key
RUN_INFO = "run.json"  # the inputs key the output was made from (written by the orchestration)
_BOOKKEEPING = (MANIFEST, STALE, IN_PROGRESS, TIMINGS, RUN_INFO)
M = TypeVar("M", bound=Manifest)


class StageOutputError(RuntimeError):
    """An upstream stage's output is unfinished, stale or not what its manifest lists."""


class StageNotFinished(StageOutputError, FileNotFoundError):
    """An upstream stage has no finished output (no manifest)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps(obj: Any) -> str:
    """Canonical JSON: sorted keys, UTF-8, no NaN surprises."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False, default=str)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as canonical JSON lines, atomically. Returns the row count."""
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
                n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
    return rows


def drop_record(stage: str, row_id: str | None, reason: str, detail: str = "", **extra: Any) -> dict[str, Any]:
    """The one shape of a dropped or quarantined row, in every stage (datatrove-style):
    ``{stage, row_id, reason, detail}`` plus stage-specific fields (``kept_id``, ``split``, ``file``,
    ``line``, ``field``, ...). ``reason`` is a stable snake_case tag; ``detail`` is for people."""
    return {"stage": stage, "row_id": row_id, "reason": reason, "detail": clip(detail), **extra}


def drop_counts(drops: Iterable[dict[str, Any]]) -> dict[str, int]:
    """``{"dropped_<reason>": n}`` over drop records, sorted: what every manifest and card reports."""
    counts: dict[str, int] = {}
    for d in drops:
        k = f"dropped_{d['reason']}"
        counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items()))


def clip(value: Any, limit: int = 200) -> str:
    """A value as text, cut to ``limit`` characters (error messages never echo a 10 MB cell)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def begin_stage(stage_dir: str | Path) -> None:
    """Mark a stage's folder as work in progress: its old manifest goes first, so a run killed while it
    replaces outputs leaves no finished manifest over half-new files (``write_manifest`` ends it)."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stage_dir / IN_PROGRESS, f"pid {os.getpid()}\n")
    for name in (MANIFEST, RUN_INFO):
        (stage_dir / name).unlink(missing_ok=True)


def write_manifest(stage_dir: str | Path, manifest: M) -> M:
    """Record the output file hashes in ``manifest.outputs`` and write ``manifest.json`` last (its
    ``timing`` to ``timings.json`` beside it); clears STALE and IN_PROGRESS. Returns the manifest."""
    stage_dir = Path(stage_dir)
    manifest.outputs = {str(p.relative_to(stage_dir)): sha256_file(p) for p in sorted(stage_dir.rglob("*"))
                        if p.is_file() and p.name not in _BOOKKEEPING and not p.name.startswith(".")}
    if os.environ.get("FINSYNTH_FAULT_KILL_BEFORE_MANIFEST") == manifest.stage:
        os.kill(os.getpid(), 9)  # fault injection (benchmarks/bench_reliability.py): die in the worst window
    if manifest.timing:
        write_json(stage_dir / TIMINGS, manifest.timing)
    write_json(stage_dir / MANIFEST, manifest.to_json())
    (stage_dir / STALE).unlink(missing_ok=True)
    (stage_dir / IN_PROGRESS).unlink(missing_ok=True)
    return manifest


def read_manifest(stage_dir: str | Path, kind: type[M] = Manifest) -> M | None:  # type: ignore[assignment]
    """The finished stage's manifest as ``kind`` (the stage's manifest class), or None if unfinished."""
    p = Path(stage_dir) / MANIFEST
    if not p.exists():
        return None
    try:
        m = kind.from_json(read_json(p))
    except (ValueError, TypeError) as e:  # not JSON (a JSONDecodeError is a ValueError), or not a manifest
        raise StageOutputError(f"{p} is not a finsynth manifest ({clip(str(e), 120)}); rerun the stage that "
                               "writes this folder") from e
    return m


def manifest_hash(stage_dir: str | Path) -> str | None:
    """Content hash of a finished stage: the hash of the output files its manifest lists (not of the
    manifest itself, so a rerun that writes the same files gives the same hash); None if unfinished."""
    m = read_manifest(stage_dir)
    if m is None:
        return None
    return sha256_text(dumps(m.outputs))[:16]


def verify_outputs(stage_dir: str | Path, manifest: Manifest, stage: str) -> None:
    """Every file the manifest lists is there with the listed hash, or :class:`StageOutputError`
    naming the path and the expected vs found hash."""
    stage_dir = Path(stage_dir)
    for rel, want in sorted(manifest.outputs.items()):
        p = stage_dir / rel
        if not p.is_file():
            raise StageOutputError(f"stage {stage!r}: {p} is listed in its manifest but missing; "
                                   f"rerun `finsynth {stage}`")
        found = sha256_file(p)
        if found != want:
            raise StageOutputError(f"stage {stage!r}: {p} does not match its manifest (expected sha256 "
                                   f"{want[:12]}, found {found[:12]}): the output changed after the stage "
                                   f"finished; rerun `finsynth {stage}`")


def allow_stale() -> bool:
    """``--allow-stale`` (the CLI and flows set FINSYNTH_ALLOW_STALE=1): read stale upstream output."""
    return os.environ.get("FINSYNTH_ALLOW_STALE", "") not in ("", "0", "false")


def require_stage(stage_dir: str | Path, stage: str) -> Manifest:
    """The manifest of a finished upstream stage whose files are intact and not stale, or a clear error
    telling the user what to run."""
    stage_dir = Path(stage_dir)
    m = read_manifest(stage_dir)
    if m is None:
        why = "unfinished (IN_PROGRESS: a run stopped before it finished)" if (stage_dir / IN_PROGRESS).exists() \
            else "no manifest.json"
        raise StageNotFinished(
            f"stage {stage!r} has no finished output in {stage_dir} ({why}); "
            f"run `finsynth {stage}` or `finsynth run` first")
    stale = stage_dir / STALE
    if stale.exists() and not allow_stale():
        reason = stale.read_text(encoding="utf-8").strip()
        raise StageOutputError(f"stage {stage!r} is STALE ({reason}): refresh it with `finsynth run --from {stage}`, "
                               f"or pass --allow-stale to use it as it is")
    verify_outputs(stage_dir, m, stage)
    return m


def mark_stale(stage_dir: str | Path, reason: str) -> bool:
    """Mark a finished stage's output as stale (an upstream stage was rerun). Returns True if marked."""
    stage_dir = Path(stage_dir)
    if not (stage_dir / MANIFEST).exists():
        return False
    atomic_write_text(stage_dir / STALE, reason + "\n")
    return True


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of a ``torchrun`` launch (or not launched by it): the one that takes
    the run lock and reports."""
    return int(os.environ.get("RANK", "0")) == 0
