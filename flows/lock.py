"""One run per project root at a time (:func:`run_lock`), taken by the CLI and the flows around a run.

Orchestration, not stage code: no stage imports it, so it is in no stage's key.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datagen.io import atomic_write_text, is_rank_zero


@contextmanager
def run_lock(root: str | Path, cache_url: str | None = None) -> Iterator[None]:
    """One run per project root at a time: a second ``finsynth`` run on the same root fails at once
    with who holds it, instead of paying for every LLM call twice. Re-entrant in one thread. Under
    ``torchrun`` only rank 0 takes it (the other ranks are the same run).

    A file lock under the root; with ``cache_url`` a PostgreSQL URL (``llm.cache``), an advisory lock in
    that database instead, which holds across machines that share the root (docs/scale.md)."""
    from filelock import FileLock, Timeout

    if not is_rank_zero():  # a torchrun worker: rank 0 of the same launch holds the lock
        yield
        return
    from datagen.llm.pg_cache import is_postgres_url, pg_run_lock

    if is_postgres_url(cache_url):
        with pg_run_lock(root, cache_url):
            yield
        return
    path = Path(root) / "data" / ".finsynth-run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _LOCKS.setdefault(str(path), FileLock(str(path)))
    holder = path.with_suffix(".holder")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = holder.read_text(encoding="utf-8").strip() if holder.exists() else "another process"
        raise RuntimeError(f"another finsynth run is using {root} ({who}); wait for it to finish, "
                           f"or give this run its own --root") from None
    try:
        if lock.lock_counter == 1:
            atomic_write_text(holder, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        yield
    finally:
        lock.release()


_LOCKS: dict[str, Any] = {}
