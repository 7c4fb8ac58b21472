"""The main command's terminal: the stage and progress lines of a run (:mod:`datagen.progress`), and
nothing else.

- :func:`to_run_log`: inside a flow, sends the ``finsynth.*`` records to that flow run's log in Prefect
  (the UI's run log shows them), including records made on other threads (a provider's workers).
- :func:`follow`: reads a flow run's ``finsynth.*`` lines from Prefect's logs API while it runs, and
  prints them (``scripts/demo.sh`` -> ``flows.deploy``, where the run happens in a worker's process).
- :func:`quiet_terminal`: for a run in this process (``finsynth run``), everything that would reach the
  terminal (logging, library warnings, progress bars, Prefect's temporary server) goes to a log file,
  and the terminal gets the ``finsynth.*`` lines only.
- :class:`Terminal`: prints those lines; on a terminal, a progress line is replaced by the next line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from datagen.progress import PROGRESS_LOGGER

ROOT_LOGGER = "finsynth"


class Terminal:
    """Prints ``HH:MM:SS  message`` lines; on a TTY a progress line stays on one row until the next."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._open = False  # a progress line is on the screen without its newline
        self._lock = threading.Lock()  # lines come from the run's log and from a thread of the main command

    def line(self, message: str, *, progress: bool = False, when: float | None = None) -> None:
        text = f"{datetime.fromtimestamp(when or time.time()):%H:%M:%S}  {message}"
        with self._lock:
            if self.tty:
                self.stream.write("\r\033[K" + text + ("" if progress else "\n"))
                self._open = progress
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def end(self) -> None:
        """End an open progress line (before other output)."""
        with self._lock:
            if self._open:
                self.stream.write("\n")
                self.stream.flush()
                self._open = False


class TerminalHandler(logging.Handler):
    """``finsynth.*`` records (INFO and up) to a :class:`Terminal`."""

    def __init__(self, terminal: Terminal):
        super().__init__(logging.INFO)
        self.terminal = terminal
        self.addFilter(lambda r: r.name == ROOT_LOGGER or r.name.startswith(ROOT_LOGGER + "."))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.terminal.line(record.getMessage(), progress=record.name == PROGRESS_LOGGER, when=record.created)
        except Exception:
            self.handleError(record)


# ----------------------------------------------------------------------------- into the run log
@contextmanager
def to_run_log() -> Iterator[None]:
    """Inside a flow: the ``finsynth.*`` records of this process go to this flow run's log (once: a stage
    flow inside the pipeline flow leaves the pipeline's handler in place, so one run holds every line)."""
    from prefect.context import get_run_context
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(ROOT_LOGGER)
    if any(isinstance(h, APILogHandler) for h in logger.handlers):
        yield
        return
    flow_run_id = get_run_context().flow_run.id

    class RunLogHandler(APILogHandler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "flow_run_id", None) is None:  # a record from another thread has no run context
                record.flow_run_id = flow_run_id
            super().emit(record)

    handler = RunLogHandler(logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# ----------------------------------------------------------------------------- out of the run log
def follow(flow_run_id: Any, on_line: Callable[[Any], None], *, poll_s: float = 1.0, timeout_s: float | None = None,
           settle_s: float = 4.0) -> Any:
    """Call ``on_line(log)`` for each ``finsynth.*`` log of the flow run, in time order, while it runs,
    until it ends (and its last lines have arrived: ``settle_s`` without a new one); returns the flow run.
    Logs reach the API in batches (Prefect's log worker, ~2 s), so lines arrive a few seconds late."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
    from prefect.client.schemas.sorting import LogSort

    seen: set = set()
    newest = None  # logs reach the API in batches, not quite in time order: reread the last 30 s, skip seen ones
    t0 = time.monotonic()
    quiet_since: float | None = None
    with get_client(sync_client=True) as client:
        while True:
            fr = client.read_flow_run(flow_run_id)
            final = fr.state is not None and fr.state.is_final()
            new, offset = 0, 0
            since = newest - timedelta(seconds=30) if newest else None
            flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
                            timestamp=LogFilterTimestamp(after_=since) if since else None)
            while True:
                page = client.read_logs(flt, limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC)
                for lg in page:
                    if lg.id in seen:
                        continue
                    seen.add(lg.id)
                    new += 1
                    newest = max(newest, lg.timestamp) if newest else lg.timestamp
                    if lg.name == ROOT_LOGGER or lg.name.startswith(ROOT_LOGGER + "."):
                        on_line(lg)
                if len(page) < 200:
                    break
                offset += 200
            if final:
                quiet_since = time.monotonic() if new or quiet_since is None else quiet_since
                if time.monotonic() - quiet_since >= settle_s:
                    return fr
            elif timeout_s is not None and time.monotonic() - t0 > timeout_s:
                return fr
            time.sleep(poll_s)


# ----------------------------------------------------------------------------- a run in this process
def log_file(root: Path, command: str) -> Path:
    """``<root>/data/logs/<command>-<time>.log``, or under the temporary folder when that cannot be made."""
    name = f"{command}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    for folder in (root / "data" / "logs", Path(os.environ.get("TMPDIR", "/tmp")) / "finsynth-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.touch()
            return path
        except OSError:
            continue
    return Path(os.devnull)


@contextmanager
def quiet_terminal(path: Path) -> Iterator[tuple[TextIO, Terminal]]:
    """File descriptors 1 and 2 go to ``path`` (so also child processes, C libraries and ``warnings``);
    yields the terminal's stdout, and a :class:`Terminal` on its stderr that ``finsynth.*`` records reach."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    err = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    terminal = Terminal(err)
    handler = TerminalHandler(terminal)
    logger = logging.getLogger(ROOT_LOGGER)
    logger.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield out, terminal
    finally:
        terminal.end()
        logger.removeHandler(handler)
        for stream in (sys.stdout, sys.stderr, out, err):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (out, err):
            f.close()
        for s in saved:
            os.close(s)
        _keep_logging_in(path)


def _keep_logging_in(path: Path) -> None:
    """Logging handlers that write to the terminal's streams write to ``path`` from now on: what logs at
    exit (Prefect stopping its temporary server) stays in the log file too."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    stream = None
    for lg in loggers:
        for h in lg.handlers:
            if (type(h) is logging.StreamHandler or type(h).__name__ == "PrefectConsoleHandler") \
                    and getattr(h, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                if stream is None:
                    stream = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 (lives to exit)
                h.setStream(stream)
                if hasattr(h, "console"):  # Prefect's handler prints through a rich Console of its own
                    h.console.file = stream
