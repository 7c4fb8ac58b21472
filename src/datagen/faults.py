"""Faults of the machine rather than of the data or the code, said in one line.

A full disk, a read-only or unwritable root, a corrupt or locked response cache and a missing model
file are not bugs: the person running the pipeline fixes them. :func:`explain` turns the exception
into an :class:`EnvironmentFault` whose text names the stage, the path and what to do; the CLI prints
that one line (``--debug`` keeps the traceback) and exits non-zero. The stage never reaches its
manifest, so nothing is marked finished.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from lm.packaged import ModelFilesError


class EnvironmentFault(RuntimeError):
    """A fault of the machine: ``stage`` (may be filled in later by the caller that knows it), the
    ``path`` concerned, what happened and what to do."""

    def __init__(self, what: str, path: str | Path | None, todo: str, stage: str | None = None):
        self.what, self.path, self.todo, self.stage = what, None if path is None else str(path), todo, stage
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" ({self.path})" if self.path and self.path not in self.what else ""
        return f"{self.stage + ': ' if self.stage else ''}{self.what}{where}: {self.todo}"

    def at(self, stage: str | None) -> EnvironmentFault:
        """This fault with its stage set (kept when it already has one)."""
        if stage and not self.stage:
            self.stage = stage
            self.args = (str(self),)
        return self


class CacheFault(EnvironmentFault):
    """The response cache cannot be used (corrupt, locked, unwritable)."""


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EROFS}
_DENIED = {errno.EACCES, errno.EPERM}


def _rerun(stage: str | None) -> str:
    return f"then rerun `finsynth {stage}`" if stage else "then rerun"


def explain(exc: BaseException, *, stage: str | None = None, path: str | Path | None = None
            ) -> EnvironmentFault | None:
    """The :class:`EnvironmentFault` an exception stands for, or None when it is not one.

    ``path``: where the stage was writing, used when the exception does not name a file (a ``write``
    to a full disk names none)."""
    if isinstance(exc, EnvironmentFault):
        return exc.at(stage)
    if isinstance(exc, ModelFilesError):
        return EnvironmentFault(exc.what, None, exc.todo, stage)
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL | _READ_ONLY | _DENIED:
        where = exc.filename or path
        if exc.errno in _DISK_FULL:
            return EnvironmentFault(f"no space left on the device holding {where}", None,
                                    f"free space there or choose another --root, {_rerun(stage)}", stage)
        if exc.errno in _READ_ONLY:
            return EnvironmentFault(f"{where} is on a read-only file system", None,
                                    f"choose a writable --root (or remount it read-write), {_rerun(stage)}", stage)
        return EnvironmentFault(f"permission denied on {where}", None,
                                f"give this user write access to it or choose another --root, {_rerun(stage)}",
                                stage)
    if isinstance(exc, sqlite3.DatabaseError):
        return cache_fault(exc, path, stage=stage)
    return None


def find(exc: BaseException, *, stage: str | None = None, path: str | Path | None = None
         ) -> EnvironmentFault | None:
    """:func:`explain` of ``exc`` or of the first exception in its chain (``raise ... from``, or raised
    while handling) that is an environment fault."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        fault = explain(e, stage=stage, path=path)
        if fault is not None:
            return fault
        e = e.__cause__ or e.__context__
    return None


def cache_fault(exc: sqlite3.Error, path: str | Path | None, *, stage: str | None = None,
                timeout_s: float | None = None) -> CacheFault | None:
    """A :class:`CacheFault` for an SQLite error on the response cache at ``path``, or None when the
    error is not about the file (a bug in a query stays a bug)."""
    msg = str(exc)
    if "not a database" in msg or "malformed" in msg or "file is encrypted" in msg:
        return CacheFault(f"the response cache {path} is corrupt (sqlite: {msg})", None,
                          f"it is kept as it is: move it aside (mv '{path}' '{path}.corrupt') and rerun "
                          f"`finsynth {stage or 'augment'}`, which starts a new cache and asks the LLM again "
                          "for answers that were only in the old one", stage)
    if "locked" in msg or "busy" in msg:
        waited = f" for {timeout_s:g} s" if timeout_s is not None else ""
        return CacheFault(f"the response cache {path} stayed locked{waited} (sqlite: {msg})", None,
                          "another process holds it: let that run finish (or stop it), "
                          f"{_rerun(stage or 'augment')}", stage)
    if "disk is full" in msg or "disk I/O error" in msg:
        return CacheFault(f"the response cache {path} could not be written (sqlite: {msg})", None,
                          f"free space on its disk or set llm.cache_file to another place, {_rerun(stage)}", stage)
    if "readonly" in msg or "unable to open" in msg:
        return CacheFault(f"the response cache {path} cannot be opened for writing (sqlite: {msg})", None,
                          f"make it and its folder writable or set llm.cache_file to another place, {_rerun(stage)}",
                          stage)
    return None
