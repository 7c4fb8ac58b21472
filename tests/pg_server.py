"""A throwaway PostgreSQL server on 127.0.0.1 for the session (the shared response cache and run lock,
docs/scale.md): initdb into a temporary folder, trust authentication, a free port, stopped and removed at
the end. As root it runs as the ``postgres`` system user (initdb refuses root). It fails loudly when it
cannot start: `scripts/test.sh` installs Debian's ``postgresql`` when it is missing."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:PORT``: a running server (superuser ``postgres``, trust auth)."""
    bins = _bin_dir()
    if bins is None:
        pytest.fail("PostgreSQL is not installed (no initdb): run `bash scripts/test.sh` as root, which installs "
                    "it, or `apt-get install -y --no-install-recommends postgresql`")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    tmp = Path(tempfile.mkdtemp(prefix="finsynth-pg-"))  # under /tmp: pytest's folders are root-only (0700)
    if as_user:
        shutil.chown(tmp, "postgres", "postgres")
    data, log, port = tmp / "data", tmp / "server.log", _free_port()

    def run(*cmd: str) -> None:
        r = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            pytest.fail(f"{Path(cmd[0]).name} failed (exit {r.returncode}): {r.stderr[-1500:]}{tail}")

    try:
        run(str(bins / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
            "--locale=C", "--no-sync", "--no-instructions")
        run(str(bins / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
            f"-k {tmp} -h 127.0.0.1 -p {port} -F -c full_page_writes=off", "start")
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}"
        finally:
            subprocess.run([*as_user, str(bins / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A fresh, empty database on the session's server, for one test: its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{pg_server}/{name}"
