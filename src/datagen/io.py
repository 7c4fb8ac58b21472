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
from typing import Any

MANIFEST = "manifest.json"
STALE = "STALE"
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual mode
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


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_manifest(stage_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Record output file hashes and write ``manifest.json`` last; clears a STALE mark."""
    stage_dir = Path(stage_dir)
    outputs = {}
    for p in sorted(stage_dir.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, STALE) and not p.name.startswith("."):
            outputs[str(p.relative_to(stage_dir))] = sha256_file(p)
    manifest = {**manifest, "outputs": outputs}
    write_json(stage_dir / MANIFEST, manifest)
    (stage_dir / STALE).unlink(missing_ok=True)
    return manifest


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    p = Path(stage_dir) / MANIFEST
    return read_json(p) if p.exists() else None


def manifest_hash(stage_dir: str | Path) -> str | None:
    """Hash of a finished stage's manifest (what a downstream stage depends on); None if unfinished."""
    p = Path(stage_dir) / MANIFEST
    return sha256_file(p) if p.exists() else None


def require_stage(stage_dir: str | Path, stage: str) -> dict[str, Any]:
    """The manifest of a finished upstream stage, or a clear error telling the user what to run."""
    m = read_manifest(stage_dir)
    if m is None:
        raise FileNotFoundError(
            f"stage {stage!r} has no finished output in {stage_dir} (no manifest.json); "
            f"run `finsynth {stage}` or `finsynth run` first")
    return m


def mark_stale(stage_dir: str | Path, reason: str) -> bool:
    """Mark a finished stage's output as stale (an upstream stage was rerun). Returns True if marked."""
    stage_dir = Path(stage_dir)
    if not (stage_dir / MANIFEST).exists():
        return False
    atomic_write_text(stage_dir / STALE, reason + "\n")
    return True
