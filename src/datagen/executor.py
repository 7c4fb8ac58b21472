"""Where row-parallel work runs (``run.executor``): in this process, or as shards on a Ray cluster.

A stage cuts its rows into deterministic shards (:func:`plan`): a shard's id hashes the stage's key (the
config sections and upstream it depends on), the shard's index and its rows. :func:`map_shards` runs a
function over the shards and writes each shard's result to ``<scratch>/<id>.json`` (its arrays to
``<id>.npz`` first) atomically; the JSON file is the shard's completion marker. A rerun of an unfinished stage reads the
finished shards instead of redoing them, and the stage removes the scratch folder once its own output
is written (:func:`clear`). Results come back in shard order, so the stage's output does not depend on
the executor or on which worker finished first.

On Ray, the work runs in a pool of actors (``run.ray_workers``). Each actor builds its state once
(``make()``: load the embedder, open the providers and the response cache) and then takes shards, so a
model is loaded once per worker, not once per shard; LLM calls stay asynchronous inside each actor (the
provider's own event loop). Ray restarts a killed actor and retries its shard: finished LLM calls are
answered by the shared response cache, so nothing is paid twice. Ray tasks would reload the model for
every shard, and Ray Data would turn the rows (nested, variable JSON) into Arrow and back for no gain.

A requests-per-minute limit (``rpm`` of a provider) holds for the whole cluster: the driver starts one
small actor per limited provider (:class:`_RateBucket`) that books call slots for every worker
(:func:`shared_rate_limiter`), so adding workers does not multiply the rate.

Prefect stays the orchestrator: a stage task calls :func:`map_shards` and waits for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datagen.io import atomic_write_bytes, atomic_write_text
from datagen.progress import Progress

log = logging.getLogger(__name__)

Work = Callable[[list[Any]], dict[str, Any]]  # one shard's items -> JSON-able values and numpy arrays


@dataclass(frozen=True)
class Shard:
    id: str
    index: int
    items: list[Any]


def plan(key: str, items: Sequence[Any], shard_rows: int, min_shards: int = 1,
         group: Callable[[Any], Any] | None = None) -> list[Shard]:
    """Contiguous shards of at most ``shard_rows`` items (at least ``min_shards`` when there are that
    many items), each with an id that changes when the stage's key, its position or its items change.

    ``group``: items with the same ``group(item)`` that sit next to each other form a run, and no shard
    straddles two runs (evaluation's arms: a shard of one arm is one model's batches). ``min_shards``
    then applies when there is a single run."""
    if not items:
        return []
    runs: list[list[Any]] = []
    for it in items:
        if runs and (group is None or group(runs[-1][-1]) == group(it)):
            runs[-1].append(it)
        else:
            runs.append([it])
    chunks = []
    for run in runs:
        n = min(len(run), max(min_shards if len(runs) == 1 else 1, math.ceil(len(run) / shard_rows)))
        size = math.ceil(len(run) / n)
        chunks += [list(run[start:start + size]) for start in range(0, len(run), size)]
    shards = []
    for i, chunk in enumerate(chunks):
        blob = json.dumps(chunk, sort_keys=True, ensure_ascii=False, default=str)
        sid = hashlib.sha256(f"{key}|{i}|{blob}".encode()).hexdigest()[:16]
        shards.append(Shard(f"{i:05d}-{sid}", i, chunk))
    return shards


def _path(scratch: Path, shard: Shard, suffix: str) -> Path:
    return scratch / f"{shard.id}{suffix}"


def _save(scratch: Path, shard: Shard, result: dict[str, Any]) -> None:
    """A shard's result: its numpy arrays in ``<id>.npz``, then the rest in ``<id>.json`` (the marker)."""
    arrays = {k: v for k, v in result.items() if isinstance(v, np.ndarray)}
    if arrays:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(_path(scratch, shard, ".npz"), buf.getvalue())
    rest = {k: v for k, v in result.items() if k not in arrays}
    atomic_write_text(_path(scratch, shard, ".json"), json.dumps({**rest, "_arrays": sorted(arrays)},
                                                               ensure_ascii=False))


def _load(scratch: Path, shard: Shard) -> dict[str, Any] | None:
    """A finished shard's result from its files; None when it is unfinished (or its files unreadable)."""
    marker = _path(scratch, shard, ".json")
    if not marker.exists():
        return None
    try:
        out = json.loads(marker.read_text(encoding="utf-8"))
        names = out.pop("_arrays")
        if names:
            with np.load(_path(scratch, shard, ".npz"), allow_pickle=False) as z:
                out.update({k: z[k] for k in names})
        return out
    except (OSError, ValueError, KeyError) as e:
        log.warning("shard result %s unreadable (%s); redoing that shard", marker, e)
        return None


class ShardWorker:
    """What a Ray actor is: ``make()`` once, then one shard after another."""

    def __init__(self, make: Callable[[], Work]):
        self.work = make()

    def run(self, shard: Shard, scratch: str) -> str:
        _save(Path(scratch), shard, self.work(shard.items))
        return shard.id


def map_shards(run_cfg: Any, make: Callable[[], Work], shards: list[Shard], scratch: Path | None, *,
               what: str, rpm: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """``make()(shard.items)`` for every shard, in shard order, skipping shards finished earlier.

    ``run_cfg`` is the config's ``run`` section. ``make`` must be picklable for Ray (a module-level
    function or a ``functools.partial`` of one). ``rpm`` maps the providers the work calls to their
    requests-per-minute limits, for the cluster-wide limiter. ``scratch=None`` (local only) keeps no
    shard results: nothing to resume from."""
    if scratch is None:
        if run_cfg.executor == "ray":
            raise ValueError(f"{what}: shards on Ray need a scratch folder")
        work = make()
        return [work(s.items) for s in shards]
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    results: list[Any] = [_load(scratch, s) for s in shards]
    todo = [s for s in shards if results[s.index] is None]
    if len(todo) < len(shards):
        log.info("%s: %d of %d shards already finished", what, len(shards) - len(todo), len(shards))
    if todo:
        bar = Progress(what, len(todo), "shards") if len(shards) > 1 else None
        if run_cfg.executor == "ray":
            _ray_map(run_cfg, make, todo, scratch, rpm or {}, bar)
        else:
            work = make()
            for s in todo:
                _save(scratch, s, work(s.items))
                if bar:
                    bar.update()
        if bar:
            bar.close()
        for s in todo:
            results[s.index] = _load(scratch, s)
            if results[s.index] is None:
                raise RuntimeError(f"{what}: shard {s.id} finished without a readable result in {scratch}")
    return results


def clear(scratch: Path) -> None:
    """Remove a stage's shard results once the stage's own output is written."""
    shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------- Ray
def ensure_ray(run_cfg: Any) -> None:
    """Join (``ray_address``) or start (None: a local Ray with ``ray_workers`` CPUs) a Ray cluster once
    per process. Workers inherit this process's environment on a local Ray; on a remote cluster, API keys
    must be set in the cluster's environment (they are never shipped in a task)."""
    import ray

    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if run_cfg.ray_address is None:  # a private Ray for this run, on this machine
        kw["num_cpus"] = run_cfg.ray_workers
    try:
        ray.init(address=run_cfg.ray_address, **kw)
    except (ConnectionError, ValueError, RuntimeError) as e:  # no cluster there, a missing extra: one line
        where = run_cfg.ray_address or "a local Ray"
        raise RuntimeError(f"run.ray_address={where}: could not start or join Ray: {' '.join(str(e).split())}") from e


def _ray_map(run_cfg: Any, make: Callable[[], Work], todo: list[Shard], scratch: Path,
             rpm: dict[str, int], bar: Progress | None) -> None:
    import ray
    from ray.util import ActorPool

    ensure_ray(run_cfg)
    bucket = ray.remote(num_cpus=0)(_RateBucket)
    buckets = [bucket.options(name=_bucket_name(name)).remote(limit) for name, limit in sorted(rpm.items())]
    actor = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)(ShardWorker)
    actors = [actor.remote(make) for _ in range(min(run_cfg.ray_workers, len(todo)))]
    try:
        pool = ActorPool(actors)
        for _ in pool.map_unordered(lambda a, s: a.run.remote(s, str(scratch)), todo):
            if bar:
                bar.update()
    finally:
        for a in actors + buckets:
            ray.kill(a)


def _bucket_name(provider: str) -> str:
    return f"finsynth-rpm-{provider}"


class _RateBucket:
    """Books call start slots ``60 / rpm`` seconds apart for every worker of the cluster."""

    def __init__(self, rpm: int):
        self.interval = 60.0 / rpm
        self.next = 0.0

    def reserve(self) -> float:
        now = time.monotonic()
        slot = max(now, self.next)
        self.next = slot + self.interval
        return slot - now


class _SharedRateLimiter:
    """The provider-side face of a :class:`_RateBucket` (same ``acquire`` as ``engine.RateLimiter``)."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def acquire(self) -> None:
        wait = await self.handle.reserve.remote()
        if wait > 0:
            await asyncio.sleep(wait)


def shared_rate_limiter(provider: str) -> _SharedRateLimiter | None:
    """The cluster-wide limiter for ``provider`` when this process is a Ray worker of a stage that set
    one up, else None (the provider limits its own rate)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        return _SharedRateLimiter(ray.get_actor(_bucket_name(provider)))
    except ValueError:  # no such actor: no shared limit for this provider
        return None
