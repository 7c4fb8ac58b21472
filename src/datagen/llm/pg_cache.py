"""The response cache and the run lock on PostgreSQL, for runs on several machines (``llm.cache:
postgresql://user@host:port/db``; docs/scale.md).

:class:`PostgresCache` has the interface and the behaviour of :class:`datagen.llm.cache.ResponseCache`:
the same rows in table ``finsynth_responses`` keyed by the request hash, written at once and replaced by a
newer answer for the same key; and the same claims in ``finsynth_claims``, so two workers asking for one key
at the same time pay for it once. A claim belongs to the database session (backend) of the process that
made it: when that process dies its session ends, and the claim is taken over at once; any claim older than
:data:`CLAIM_TTL_S` is taken over too.

:func:`pg_run_lock` is the run lock when the cache is on PostgreSQL: a session advisory lock on a hash of
the resolved project root, held on its own connection for the run; the server releases it when the holder's
session ends, so a killed run never leaves a stale lock.

The URL's password is never printed: every message names :func:`datagen.config.mask_url` of it. psycopg
(``finsynth[scale]``) is imported only when a PostgreSQL cache is opened.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from datagen.config import mask_url
from datagen.faults import CacheFault

RESPONSES = "finsynth_responses"
CLAIMS = "finsynth_claims"
CLAIM_TTL_S = 900.0  # as in the SQLite cache: a claim older than this is void even if its owner seems alive
_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {RESPONSES} (
        key text PRIMARY KEY,
        provider text NOT NULL,
        model text NOT NULL,
        text text NOT NULL,
        prompt_tokens integer NOT NULL DEFAULT 0,
        completion_tokens integer NOT NULL DEFAULT 0,
        created timestamptz NOT NULL DEFAULT now())""",
    f"""CREATE TABLE IF NOT EXISTS {CLAIMS} (
        key text PRIMARY KEY,
        owner text NOT NULL,
        host text NOT NULL,
        pid integer NOT NULL,
        backend_pid integer NOT NULL,
        backend_start timestamptz,
        expires timestamptz NOT NULL)""",
)
# transaction-level advisory lock around CREATE TABLE IF NOT EXISTS: two processes creating the tables of a
# new database at once would otherwise race on the catalog
_SCHEMA_LOCK = int.from_bytes(b"finsynth", "big")
_CONNECT_TIMEOUT_S = 10
T = TypeVar("T")


def is_postgres_url(target: object) -> bool:
    return isinstance(target, str) and target.split("://", 1)[0].lower() in ("postgresql", "postgres") \
        and "://" in target


def _secrets(url: str) -> list[str]:
    """Every form the password of ``url`` (or ``PGPASSWORD``) may take in a message (raw, percent-decoded)."""
    from urllib.parse import unquote, urlsplit

    found: set[str] = set()
    try:
        pw = urlsplit(url).password
        if pw:
            found |= {pw, unquote(pw)}
    except ValueError:
        pass
    for m in re.finditer(r"(?i)[?&]password=([^&#]*)", url):
        if m.group(1):
            found |= {m.group(1), unquote(m.group(1))}
    m = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*:([^?#]*)@", url)
    if m and m.group(1):
        found |= {m.group(1), unquote(m.group(1))}
    if os.environ.get("PGPASSWORD"):  # where the password belongs (the config refuses one in the URL)
        found.add(os.environ["PGPASSWORD"])
    return sorted(found, key=len, reverse=True)


def redacted_error(exc: BaseException, url: str) -> str:
    """The error's text on one line, without the URL's password."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text.replace(url, mask_url(url))


def _fault(exc: BaseException, url: str, what: str, *, timeout_s: float | None = None) -> CacheFault | None:
    """A :class:`CacheFault` naming the masked URL for a fault of the server or the connection, or None
    when the error is not one (a bug in a query stays a bug)."""
    import psycopg
    from psycopg import errors

    where, said = mask_url(url), redacted_error(exc, url)
    if isinstance(exc, (errors.LockNotAvailable, errors.QueryCanceled)):
        waited = f" for {timeout_s:g} s" if timeout_s is not None else ""
        return CacheFault(f"the {what} at {where} stayed locked{waited} (postgresql: {said})", None,
                          "another session holds it: let that run finish (or stop it), then rerun")
    if isinstance(exc, errors.InsufficientPrivilege):
        return CacheFault(f"the {what} at {where} refused this user (postgresql: {said})", None,
                          "grant it CREATE on the database's schema (or create the tables as their owner), "
                          "then rerun")
    if isinstance(exc, errors.DiskFull):
        return CacheFault(f"the {what} at {where} could not be written (postgresql: {said})", None,
                          "free space on the database server, then rerun")
    if isinstance(exc, psycopg.OperationalError):
        return CacheFault(f"cannot use the {what} at {where} (postgresql: {said})", None,
                          "check that the server is running and reachable and that llm.cache is right, then rerun")
    return None


def connect(url: str, *, what: str, application_name: str = "finsynth") -> Any:
    """An autocommit psycopg connection to ``url``; a failure is a one-line :class:`CacheFault` naming
    the masked URL (never its password), not a traceback."""
    try:
        import psycopg
    except ImportError:
        raise CacheFault(f"the {what} at {mask_url(url)} needs psycopg, which is not installed", None,
                         "install it with `pip install 'finsynth[scale]'` (or `psycopg[binary]`)") from None
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S,
                               application_name=application_name[:63])
    except psycopg.Error as e:
        fault = _fault(e, url, what) or CacheFault(f"cannot connect to the {what} at {mask_url(url)} "
                                                   f"(postgresql: {redacted_error(e, url)})", None,
                                                   "check llm.cache, then rerun")
        raise fault from None


class PostgresCache:
    """:class:`datagen.llm.cache.ResponseCache` on a PostgreSQL database; several processes on several
    machines may share it. Thread-safe: one connection, used by one thread at a time.

    A connection that breaks (the server restarted) is opened again for the next call, and the call that
    met the break is retried once (every method is idempotent); a process that forked opens its own.
    Faults of the server (unreachable, locked past ``timeout_s``, refused, full) raise
    :class:`datagen.faults.CacheFault` naming the masked URL."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        self.url = url
        self.where = mask_url(url)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = -1
        self._closed = False
        with self._lock:
            self._connect()

    def __repr__(self) -> str:
        return f"PostgresCache({self.where!r})"

    def _connect(self) -> None:
        conn = connect(self.url, what="response cache",
                       application_name=f"finsynth cache: pid {os.getpid()} on {socket.gethostname()}")
        try:
            with self._guard():
                conn.execute(f"SET lock_timeout = {int(self.timeout_s * 1000)}")
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    for stmt in _SCHEMA:
                        conn.execute(stmt)
                # who this session is, as other sessions see it in pg_stat_activity (claims name it)
                self._backend = conn.execute(
                    "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()
        except BaseException:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        import psycopg

        try:
            yield
        except psycopg.Error as e:
            fault = _fault(e, self.url, "response cache", timeout_s=self.timeout_s)
            if fault is None:
                raise
            raise fault from None

    def _run(self, op: Callable[[Any], T]) -> T:
        """``op(connection)`` under the lock, on a live connection of this process; once more on a
        fresh connection when this one broke (or on a deadlock, which claims in key order should not meet)."""
        import psycopg

        with self._lock:
            if self._closed:
                raise RuntimeError(f"the response cache {self.where} is closed")
            for attempt in (0, 1):
                if self._pid != os.getpid():  # a forked child: the parent's connection is not ours to use
                    self._conn, self._pid = None, -1
                if self._conn is None or self._conn.closed:
                    self._connect()
                with self._guard():
                    try:
                        return op(self._conn)
                    except psycopg.OperationalError as e:
                        if attempt == 0 and (self._conn.closed or isinstance(e, psycopg.errors.DeadlockDetected)):
                            continue
                        raise
            raise AssertionError("unreachable")

    def get(self, key: str) -> dict[str, Any] | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        uniq = list(dict.fromkeys(keys))
        if not uniq:
            return {}

        def op(conn: Any) -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for i in range(0, len(uniq), 10_000):
                for k, text, pt, ct in conn.execute(
                        f"SELECT key, text, prompt_tokens, completion_tokens FROM {RESPONSES} WHERE key = ANY(%s)",
                        (uniq[i:i + 10_000],)):
                    out[k] = {"text": text, "prompt_tokens": pt, "completion_tokens": ct}
            return out

        return self._run(op)

    def put(self, key: str, *, provider: str, model: str, text: str, prompt_tokens: int = 0,
            completion_tokens: int = 0) -> None:
        """Store one success (committed immediately; replaces an older answer for the key)."""
        self.put_many([(key, {"provider": provider, "model": model, "text": text, "prompt_tokens": prompt_tokens,
                              "completion_tokens": completion_tokens})])

    def put_many(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        """Store several successes in one statement: ``[(key, {provider, model, text, prompt_tokens,
        completion_tokens}), ...]``. A key given twice keeps its last answer, as in the SQLite cache."""
        last = {k: r for k, r in rows}
        if not last:
            return
        cols = ([k for k in last], [r["provider"] for r in last.values()], [r["model"] for r in last.values()],
                [r["text"] for r in last.values()], [int(r.get("prompt_tokens", 0)) for r in last.values()],
                [int(r.get("completion_tokens", 0)) for r in last.values()])
        self._run(lambda conn: conn.execute(
            f"INSERT INTO {RESPONSES} (key, provider, model, text, prompt_tokens, completion_tokens) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::int[], %s::int[]) "
            "ON CONFLICT (key) DO UPDATE SET provider = EXCLUDED.provider, model = EXCLUDED.model, "
            "text = EXCLUDED.text, prompt_tokens = EXCLUDED.prompt_tokens, "
            "completion_tokens = EXCLUDED.completion_tokens, created = now()", cols))

    # ------------------------------------------------------------------ claims
    def claim_many(self, keys: list[str], owner: str) -> tuple[list[str], list[str]]:
        """Claim keys for ``owner``: ``(mine, theirs)``, in the order of ``keys``. A key is mine when it is
        unclaimed, already ``owner``'s, or its claim is void: the session that made it has ended (its
        process died) or it is older than :data:`CLAIM_TTL_S`. One statement; rows are taken in key order,
        so two workers claiming overlapping keys wait for each other instead of deadlocking."""
        uniq = sorted(set(keys))
        if not uniq:
            return [], []
        host, pid = socket.gethostname(), os.getpid()

        def op(conn: Any) -> set[str]:
            backend_start = self._backend[1]
            return {r[0] for r in conn.execute(
                f"INSERT INTO {CLAIMS} AS c (key, owner, host, pid, backend_pid, backend_start, expires) "
                "SELECT k, %s, %s, %s, pg_backend_pid(), %s, now() + make_interval(secs => %s) "
                "FROM unnest(%s::text[]) AS k ORDER BY k "
                "ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, host = EXCLUDED.host, pid = EXCLUDED.pid, "
                "backend_pid = EXCLUDED.backend_pid, backend_start = EXCLUDED.backend_start, "
                "expires = EXCLUDED.expires "
                "WHERE c.owner = EXCLUDED.owner OR c.expires < now() OR NOT EXISTS ("
                "  SELECT 1 FROM pg_stat_activity a WHERE a.pid = c.backend_pid"
                "  AND (a.backend_start IS NULL OR c.backend_start IS NULL OR a.backend_start = c.backend_start)) "
                "RETURNING c.key", (owner, host, pid, backend_start, CLAIM_TTL_S, uniq))}

        taken = self._run(op)
        return [k for k in keys if k in taken], [k for k in keys if k not in taken]

    def release(self, keys: list[str], owner: str) -> None:
        if keys:
            self._run(lambda conn: conn.execute(f"DELETE FROM {CLAIMS} WHERE owner = %s AND key = ANY(%s)",
                                                (owner, list(keys))))

    def delete(self, key: str) -> None:
        self._run(lambda conn: conn.execute(f"DELETE FROM {RESPONSES} WHERE key = %s", (key,)))

    def __len__(self) -> int:
        return int(self._run(lambda conn: conn.execute(f"SELECT count(*) FROM {RESPONSES}").fetchone()[0]))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


# ---------------------------------------------------------------------------------------------- run lock
_RUN_LOCKS: dict[tuple[int, str, int], list] = {}  # (thread, url, key) -> [connection, depth]


def run_lock_key(root: str | Path) -> int:
    """The advisory lock key of a project root: a signed 64-bit hash of its resolved path."""
    digest = hashlib.sha256(f"finsynth run lock:{Path(root).resolve()}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _holder(conn: Any, key: int) -> str:
    """Who holds the advisory lock ``key``, from pg_locks and pg_stat_activity (``another process``
    when the server does not say)."""
    try:
        row = conn.execute(
            "SELECT a.application_name, a.backend_start FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::bigint::oid "
            "AND l.objid = %s::bigint::oid AND l.objsubid = 1 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF)).fetchone()
    except Exception:
        return "another process"
    if row is None:
        return "another process"
    name = (row[0] or "").removeprefix("finsynth run: ") or "another process"
    return f"{name}, started {row[1]:%Y-%m-%d %H:%M:%S}" if row[1] is not None else name


@contextmanager
def pg_run_lock(root: str | Path, url: str) -> Iterator[None]:
    """One run per project root at a time among every process using the database at ``url``, on any
    machine: ``pg_try_advisory_lock`` on :func:`run_lock_key`, on a connection held for the run. A second
    run fails at once naming the holder; the lock goes when the holder's session ends (the run finished,
    or its process died). Re-entrant in one thread."""
    key = run_lock_key(root)
    ident = (threading.get_ident(), url, key)
    held = _RUN_LOCKS.get(ident)
    if held is None:
        conn = connect(url, what="run lock",
                       application_name=f"finsynth run: pid {os.getpid()} on {socket.gethostname()}")
        try:
            import psycopg

            try:
                got = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
            except psycopg.Error as e:
                raise (_fault(e, url, "run lock") or e) from None
            if not got:
                raise RuntimeError(f"another finsynth run is using {root} ({_holder(conn, key)}); wait for it to "
                                   f"finish, or give this run its own --root")
        except BaseException:
            conn.close()
            raise
        held = _RUN_LOCKS[ident] = [conn, 0]
    held[1] += 1
    try:
        yield
    finally:
        held[1] -= 1
        if held[1] == 0:
            _RUN_LOCKS.pop(ident, None)
            held[0].close()  # ending the session releases its advisory locks
