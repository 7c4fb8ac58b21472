"""Persistent response cache: one SQLite file (WAL) shared by every provider and process, or a
PostgreSQL database shared by several machines (:mod:`datagen.llm.pg_cache`, same interface).

A row is written the moment a request succeeds, so a process killed mid-batch keeps what it
finished; a rerun makes no call for those. Only successes are stored (a failure is never cached).
Rows hold the model's text and token counts, never an API key or a request header.

The key is the sha256 of the provider kind, model, base URL, the generation parameters (including
the requested JSON schema) and the rendered messages; see :func:`cache_key`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datagen.faults import cache_fault

if TYPE_CHECKING:
    from datagen.config import Config
    from datagen.llm.pg_cache import PostgresCache

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    expires REAL NOT NULL
)
"""
CLAIM_TTL_S = 900.0  # a claim older than this is void even if its owner seems alive


def cache_key(*, kind: str, model: str, base_url: str | None, params: dict[str, Any],
              messages: list[dict[str, str]], sample: int = 0) -> str:
    """sha256 over everything that changes a model's answer (never over credentials).

    ``sample`` distinguishes identical requests inside one batch (the n-th copy is its own draw).
    """
    payload = {"kind": kind, "model": model, "base_url": base_url or "", "params": params,
               "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if sample:
        payload["sample"] = sample
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Thread-safe SQLite cache; several processes may share the file (WAL, busy timeout).

    A file that is not a readable SQLite database, or one that stays locked past ``timeout_s``, raises
    :class:`datagen.faults.CacheFault` naming the file and what to do. A corrupt cache is never deleted
    or replaced here: finished LLM work is data, and the person decides (move it aside, restore it)."""

    def __init__(self, path: Path | str, timeout_s: float = 30.0):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._guard():
            self._conn = sqlite3.connect(str(self.path), timeout=timeout_s, check_same_thread=False,
                                         isolation_level=None)
        try:
            with self._lock, self._guard():
                self._conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
                # switching to WAL (once per file) takes an exclusive lock and does not wait on the busy
                # timeout: two processes opening a new cache file at once retry instead of failing
                deadline, attempt = time.monotonic() + timeout_s, 0
                while True:
                    try:
                        self._conn.execute("PRAGMA journal_mode=WAL")
                        self._conn.execute("PRAGMA synchronous=NORMAL")
                        self._conn.executescript(_SCHEMA)
                        break
                    except sqlite3.OperationalError as e:
                        if "locked" not in str(e) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.05 + 0.05 * (attempt % 4))
                        attempt += 1
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite errors about the file itself (corrupt, locked, full, read-only) as a CacheFault."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            fault = cache_fault(e, self.path, timeout_s=self.timeout_s)
            if fault is None:
                raise
            raise fault from e

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock, self._guard():
            row = self._conn.execute(
                "SELECT text, prompt_tokens, completion_tokens FROM responses WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        return {"text": row[0], "prompt_tokens": row[1], "completion_tokens": row[2]}

    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        uniq = list(dict.fromkeys(keys))
        with self._lock, self._guard():
            for i in range(0, len(uniq), 500):
                chunk = uniq[i:i + 500]
                rows = self._conn.execute(
                    f"SELECT key, text, prompt_tokens, completion_tokens FROM responses "
                    f"WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                for k, text, pt, ct in rows:
                    out[k] = {"text": text, "prompt_tokens": pt, "completion_tokens": ct}
        return out

    def put(self, key: str, *, provider: str, model: str, text: str, prompt_tokens: int = 0,
            completion_tokens: int = 0) -> None:
        """Store one success (committed immediately)."""
        with self._lock, self._guard():
            self._conn.execute(
                "INSERT OR REPLACE INTO responses (key, provider, model, text, prompt_tokens, "
                "completion_tokens, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, provider, model, text, int(prompt_tokens), int(completion_tokens), time.time()))

    def put_many(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        """Store several successes in one transaction: ``[(key, {provider, model, text, prompt_tokens,
        completion_tokens}), ...]``."""
        now = time.time()
        with self._lock, self._guard():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO responses (key, provider, model, text, prompt_tokens, "
                    "completion_tokens, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(k, r["provider"], r["model"], r["text"], int(r.get("prompt_tokens", 0)),
                      int(r.get("completion_tokens", 0)), now) for k, r in rows])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ claims
    # Two processes (two runs on different roots sharing this file) that need the same answer: the
    # first claims the key and calls the model; the other waits for the row instead of paying twice.
    def claim_many(self, keys: list[str], owner: str) -> tuple[list[str], list[str]]:
        """Claim keys for ``owner``: ``(mine, theirs)``. A claim whose owner process is gone (same host,
        dead pid) or older than ``CLAIM_TTL_S`` is taken over."""
        mine, theirs = [], []
        host, pid, now = socket.gethostname(), os.getpid(), time.time()
        with self._lock, self._guard():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                held: dict[str, tuple] = {}
                for i in range(0, len(keys), 500):
                    chunk = keys[i:i + 500]
                    marks = ",".join("?" * len(chunk))
                    held.update((r[0], r[1:]) for r in self._conn.execute(
                        f"SELECT key, owner, host, pid, expires FROM claims WHERE key IN ({marks})", chunk))
                for k in keys:
                    row = held.get(k)
                    if row is None or row[0] == owner or row[3] < now or (row[1] == host and not _alive(row[2])):
                        mine.append(k)
                    else:
                        theirs.append(k)
                self._conn.executemany("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                                       [(k, owner, host, pid, now + CLAIM_TTL_S) for k in mine])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return mine, theirs

    def release(self, keys: list[str], owner: str) -> None:
        with self._lock, self._guard():
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                self._conn.execute(f"DELETE FROM claims WHERE owner = ? AND key IN ({','.join('?' * len(chunk))})",
                                   [owner, *chunk])

    def delete(self, key: str) -> None:
        with self._lock, self._guard():
            self._conn.execute("DELETE FROM responses WHERE key = ?", (key,))

    def __len__(self) -> int:
        with self._lock, self._guard():
            return self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock, self._guard():
            self._conn.close()


class CacheWriter:
    """Stores answers off the caller's thread: ``put`` queues an answer the moment it arrives, and one
    writer thread commits what has queued up in one transaction (group commit), at most once per
    ``linger_s``. An event loop serving many concurrent calls never waits on SQLite, and a fast server
    costs one commit per window rather than one per answer (docs/providers.md). A killed run loses, and a resumed run
    repeats, at most the answers of the last window. ``close`` writes everything still queued and
    waits for it, without waiting out the window."""

    def __init__(self, cache: ResponseCache, linger_s: float = 0.2):
        self.cache = cache
        self.linger_s = linger_s
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-cache-writer", daemon=True)
        self._thread.start()

    def put(self, key: str, **row: Any) -> None:
        self._q.put((key, row))

    def _run(self) -> None:
        while True:
            batch = [self._q.get()]
            if batch[0] is not None:
                self._closing.wait(self.linger_s)  # let answers pile up; ``close`` cuts the wait short
            while True:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            rows = [b for b in batch if b is not None]
            if rows:
                try:
                    self.cache.put_many(rows)
                except Exception as e:  # a cache problem must not lose the answers in memory
                    log.warning("cache write of %d answers failed: %s", len(rows), e)
            if None in batch:
                return

    def close(self) -> None:
        self._closing.set()
        self._q.put(None)
        self._thread.join()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_CACHES: dict[Path | str, Any] = {}
_CACHES_LOCK = threading.Lock()


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///relative.sqlite`` or ``sqlite:////absolute.sqlite`` URL."""
    rest = url.split("://", 1)[1]
    return Path(rest[1:] if rest.startswith("/") else rest)


def open_cache(target: Path | str) -> ResponseCache | PostgresCache:
    """One cache per place per process: a ``postgresql://`` (or ``postgres://``) URL opens a
    :class:`datagen.llm.pg_cache.PostgresCache`; a ``sqlite:///`` URL or a path, a :class:`ResponseCache`."""
    from datagen.llm.pg_cache import PostgresCache, is_postgres_url

    if is_postgres_url(target):
        where: Path | str = str(target)
    else:
        where = (sqlite_path(target) if isinstance(target, str) and target.lower().startswith("sqlite://")
                 else Path(target)).resolve()
    with _CACHES_LOCK:
        if where not in _CACHES:
            _CACHES[where] = PostgresCache(where) if isinstance(where, str) else ResponseCache(where)
        return _CACHES[where]


def cache_target(cfg: Config) -> Path | str:
    """Where ``cfg``'s response cache lives: ``llm.cache`` when set (a PostgreSQL URL as it is, a
    ``sqlite:///`` URL as its file), else ``llm.cache_file``; a file resolved against ``paths.root``."""
    from datagen.llm.pg_cache import is_postgres_url

    url = cfg.llm.cache
    if url is not None and is_postgres_url(url):
        return url
    path = sqlite_path(url) if url is not None else cfg.llm.cache_file
    return cfg.paths.resolve(path).resolve()


def configured_cache(cfg: Config) -> ResponseCache | PostgresCache:
    """The response cache ``cfg`` names (:func:`cache_target`), opened once per process."""
    return open_cache(cache_target(cfg))
