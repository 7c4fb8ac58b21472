"""What a person running the pipeline reads while it runs: one line when a stage starts and ends, and
the progress of its long loops (rephrasing rounds, scenario tasks, training steps, evaluation batches).

Plain :mod:`logging` on two named loggers, so ``src/`` stays free of Prefect and ``.fn()`` / plain use
keep working: ``finsynth.stage`` (stage start, end, failure) and ``finsynth.progress`` (a loop's
position, at most one line every ``every_s`` seconds, and its last step). ``flows/`` sends both to the
Prefect run log (the UI shows them), and the main command's terminal prints these loggers only
(:mod:`flows.progress`), not library warnings or Prefect's own records.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from datagen.manifest import AugmentManifest, FetchManifest, Manifest, TrainManifest

STAGE_LOGGER = "finsynth.stage"
PROGRESS_LOGGER = "finsynth.progress"
stage_log = logging.getLogger(STAGE_LOGGER)
progress_log = logging.getLogger(PROGRESS_LOGGER)


def seconds(s: float) -> str:
    """``0.4 s``, ``41 s``, ``3 min 05 s``."""
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    m, r = divmod(round(s), 60)
    return f"{m} min {r:02d} s"


class Progress:
    """A loop's position as log lines on ``finsynth.progress``: ``what 3/8 unit (12 s, loss 2.31)``.

    Logs the first step, then at most one line every ``every_s`` seconds, and always the last step (or
    the position reached, at :meth:`close`). With ``heartbeat_s``, a quiet stretch that long logs the
    position too (``scenarios 0/8 requests (30 s)``): a batch decoded together finishes all at once,
    and the terminal should not look stuck meanwhile. Thread-safe: a provider may report answers from
    its own threads."""

    def __init__(self, what: str, total: int | None, unit: str = "", *, every_s: float = 10.0,
                 heartbeat_s: float | None = None, logger: logging.Logger | None = None):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.log = logger or progress_log
        self.done = 0
        self.t0 = time.monotonic()
        self._last = -float("inf")
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if heartbeat_s:
            threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name=f"progress {what}").start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                if self._closed:
                    return
                if time.monotonic() - max(self._last, self.t0) >= every * 0.99:
                    self._last = time.monotonic()
                    self.log.info("%s", self.line())

    def update(self, n: int = 1, **fields: Any) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            last = self.total is not None and self.done >= self.total
            if last or now - self._last >= self.every_s:
                self._last = now
                self._closed = self._closed or last
                self.log.info("%s", self.line(fields))

    def close(self, **fields: Any) -> None:
        """Log the position reached unless the last step was logged already; the heartbeat stops."""
        self._stop.set()
        with self._lock:
            if not self._closed and self.done:
                self._closed = True
                self.log.info("%s", self.line(fields))

    def line(self, fields: Mapping[str, Any] | None = None) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        extra = "".join(f", {k.replace('_', ' ')} {_fmt(v)}" for k, v in (fields or {}).items() if v is not None)
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.what} {self.done}{of}{unit} ({seconds(time.monotonic() - self.t0)}{extra})"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- stage lines
def stage_done_line(name: str, manifest: Manifest, s: float, rows_in: int | None = None) -> str:
    """``dedup: done in 12 s: 215 -> 198 rows; dropped: near_duplicate 15, conflicting_answer 2``, with
    what train and evaluate report in place of rows."""
    parts = [f"{name}: done in {seconds(s)}"]
    out = manifest.rows_out()
    if out is not None:
        parts.append(f"{rows_in} -> {out} rows" if rows_in is not None else f"{out} rows")
    if isinstance(manifest, TrainManifest):
        loss = manifest.final_train_loss
        parts.append(f"{manifest.steps} steps" + (f", final loss {loss:.3f}" if isinstance(loss, float) else ""))
    d = manifest.drops()
    text = ": ".join(parts[:2]) + "".join(f", {p}" for p in parts[2:])
    if d:
        text += "; dropped: " + ", ".join(f"{k} {v}" for k, v in d.items())
    mp = (manifest.rephrase or {}).get("measured_precision") if isinstance(manifest, AugmentManifest) else None
    if mp and mp.get("measured") and (manifest.rephrase or {}).get("kept"):
        ci = mp.get("ci") or [0.0, 0.0]
        text += (f"; kept rephrasings' precision, measured on hand-labelled outputs of this model: "
                 f"{mp['precision']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]")
    q = manifest.quarantine if isinstance(manifest, FetchManifest) else {}
    if q.get("total"):
        reasons = q.get("by_reason") or {}
        text += f"; quarantined {q['total']}" + (": " + ", ".join(f"{k} {v}" for k, v in sorted(
            reasons.items(), key=lambda kv: (-kv[1], kv[0]))) if reasons else "")
    return text
