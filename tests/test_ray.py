"""Data stages on a real Ray cluster (2 worker processes on 127.0.0.1) against the local executor.

- the same config and response cache give the same outputs and manifests (apart from timings) on both;
- a Ray worker killed mid-augment: the run completes, and no LLM call answered before the kill is made again;
- a provider's requests-per-minute limit holds for the whole cluster, measured at the server.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from datagen.config import load_config
from datagen.io import read_json, write_jsonl, write_manifest
from datagen.manifest import Manifest

from llm_fakes import _Base, echo_completion
from test_augment import QA

ray = pytest.importorskip("ray")

os.environ.setdefault("FINSYNTH_TEST_KEY", "sk-test-ray")  # before ray.init: workers inherit the environment


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 2 worker CPUs; its workers can import this test module. (Ray binds its own
    services to this host's address even when asked for 127.0.0.1, ray-project/ray#26293; nothing leaves
    the machine, and every server the test talks to is on 127.0.0.1.)"""
    tests = str(Path(__file__).resolve().parent)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests, old) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


class CountingServer(_Base):
    """OpenAI-compatible endpoint that answers each request with a fixed text and records every request's
    body hash and arrival time. ``gate_after``: once that many requests were answered, later ones are held
    (never answered) until :meth:`open_gate`."""

    def __init__(self, text: str = "What was the closing price?", gate_after: int | None = None):
        super().__init__()
        self.text = text
        self.gate_after = gate_after
        self.answered: Counter[str] = Counter()
        self.arrivals: list[float] = []
        self.held = 0
        self._gate = threading.Event()

    def handle_post(self, h, raw: bytes) -> None:
        body = json.loads(raw)
        key = hashlib.sha256(raw).hexdigest()
        with self.lock:
            self.arrivals.append(time.monotonic())
            hold = self.gate_after is not None and not self._gate.is_set() and (
                sum(self.answered.values()) >= self.gate_after)
            if hold:
                self.held += 1
        if hold:  # the client is killed while it waits: this request is never answered
            self._gate.wait(60)
            h.close_connection = True
            return
        with self.lock:
            self.answered[key] += 1
        h.send_json(200, echo_completion(body, self.text))

    def open_gate(self) -> None:
        self._gate.set()


def _fetched(root: Path, n: int, overrides: list[str]):
    cfg = load_config(profile="tiny", root=root, overrides=overrides)
    rows = [{**QA, "id": f"q{i:02d}", "group_id": f"g{i:02d}"} for i in range(n)]
    fetch = cfg.paths.stage_dir("fetch")
    write_jsonl(fetch / "samples.jsonl", rows)
    write_manifest(fetch, Manifest(stage="fetch"))
    return cfg


def _teacher(url: str, **extra) -> list[str]:
    return ["llm.providers.teacher.kind=openai", "llm.providers.teacher.model=fake",
            f"llm.providers.teacher.base_url={url}/v1", "llm.providers.teacher.api_key_env=FINSYNTH_TEST_KEY",
            "llm.providers.teacher.max_retries=0", "llm.providers.teacher.timeout_s=120",
            "augment.provider=teacher", "augment.k=2", "augment.limit=null", "augment.candidates=1",
            "augment.max_attempts=1", "augment.prompt_format=chat",
            *[f"{k}={v}" for k, v in extra.items()]]


def _worker_pids() -> list[int]:
    """The processes running a shard actor (Ray titles them ``ray::ShardWorker...``)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().startswith(b"ray::ShardWorker"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_killed_worker_mid_augment_completes_without_repeating_answered_calls(ray_cluster, tmp_path):
    from flows.stages import invoke

    with CountingServer(gate_after=10) as server:
        cfg = _fetched(tmp_path, 12, _teacher(server.url, **{
            "run.executor": "ray", "run.shard_rows": 3, "llm.providers.teacher.concurrency": 2}))
        done: dict = {}
        t = threading.Thread(target=lambda: done.setdefault("m", invoke(cfg, "augment")), daemon=True)
        t.start()
        deadline = time.monotonic() + 180
        while server.held < 2 and time.monotonic() < deadline:  # both workers wait at the gate
            time.sleep(0.1)
        assert server.held >= 2, "the augment never reached the gate"
        time.sleep(1.0)  # answered calls are committed to the response cache (group commit: 0.2 s)
        pids = _worker_pids()
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        server.open_gate()
        t.join(300)
        assert not t.is_alive() and "m" in done, "the run did not complete after its workers were killed"
    m = done["m"]
    assert m.rephrase["slots"] == 24 and m.rephrase["requests"] == 24
    assert len(server.answered) == 24  # every request answered once in the end ...
    assert max(server.answered.values()) == 1  # ... and none answered twice
    assert not (cfg.paths.stage_dir("augment") / ".shards").exists()


@pytest.mark.slow
def test_cluster_wide_rate_limit_holds_with_two_workers(ray_cluster, tmp_path):
    from datagen import executor

    rpm = 300  # one call start every 0.2 s for the whole cluster
    with CountingServer() as server:
        cfg = load_config(profile="tiny", root=tmp_path, overrides=_teacher(server.url, **{
            "run.executor": "ray", "llm.providers.teacher.rpm": rpm, "llm.providers.teacher.concurrency": 8}))
        shards = executor.plan("rate-test", [f"[item {i}] say hi" for i in range(16)], 8, 2)
        executor.map_shards(cfg.run, functools.partial(_chat_worker, cfg), shards, tmp_path / "shards",
                            what="rate test", rpm={"teacher": rpm})
    t = sorted(server.arrivals)
    assert len(t) == 16
    # one limiter per worker would let 2 x 5 calls start per second; the shared one lets 5 (+1 at an edge)
    most_in_1s = max(sum(1 for x in t if a <= x < a + 1.0) for a in t)
    assert most_in_1s <= 6, f"{most_in_1s} calls started within one second (limit {rpm}/min)"
    assert t[-1] - t[0] >= 15 * 0.2 * 0.9


def _chat_worker(cfg):
    from datagen.llm import get_provider
    from datagen.llm.base import ChatRequest

    prov = get_provider(cfg, "teacher")

    def work(prompts):
        res = prov.generate_batch([ChatRequest([{"role": "user", "content": p}]) for p in prompts])
        assert all(r.ok for r in res), [r.error for r in res]
        return {"texts": [r.text for r in res]}

    return work


@pytest.mark.slow
def test_ray_and_local_write_the_same_data_stages(ray_cluster, tmp_path):
    """The tiny profile's data stages (packaged Gemma and MiniLM), once locally and once on Ray (augment,
    dedup's embedding and format's tokenisation in shards) with the same response and embedding caches:
    the same rows (JSONL and Parquet bytes), in the same order, and the same manifests apart from timings.
    A first local run fills the caches, so both compared runs find every answer there (the cache-hit
    counts are then equal too)."""
    from flows.stages import execute

    shared = [f"llm.cache_file={tmp_path / 'cache' / 'llm.sqlite'}", f"paths.cache={tmp_path / 'cache'}"]
    outs = {}
    for executor_name in ("warm", "local", "ray"):
        root = tmp_path / executor_name
        (root / "data").mkdir(parents=True)
        (root / "data" / "raw").symlink_to(Path(__file__).resolve().parents[1] / "data" / "raw")
        executor = "ray" if executor_name == "ray" else "local"
        cfg = load_config(profile="tiny", root=root,
                          overrides=[*shared, f"run.executor={executor}", "run.shard_rows=2"])
        for stage in ("fetch", "augment", "dedup", "split", "format"):
            execute(cfg, stage)
        outs[executor_name] = {s: _stage_files(cfg.paths.stage_dir(s)) for s in ("augment", "dedup", "split",
                                                                                   "format")}
        assert not list(root.rglob(".shards"))
    assert outs["ray"] == outs["local"]


def _stage_files(folder: Path) -> dict[str, object]:
    out: dict[str, object] = {f.name: f.read_bytes() for pattern in ("*.jsonl", "*.parquet")
                              for f in sorted(folder.glob(pattern))}
    out["manifest"] = _without_timings(read_json(folder / "manifest.json"))
    return out


def _without_timings(m):
    if isinstance(m, dict):
        return {k: _without_timings(v) for k, v in m.items()
                if k not in ("seconds", "created", "finished", "started", "wall_s", "elapsed_s")}
    if isinstance(m, list):
        return [_without_timings(v) for v in m]
    return m


def test_an_unreachable_cluster_is_one_error_naming_the_setting():
    """``run.ray_address`` naming a Ray head that is not there (a closed port on 127.0.0.1): one error line
    that names the setting (the CLI prints it as ``finsynth: error: ...``), not Ray's traceback. Ray's client
    gives up after its 30 s connection timeout."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    code = ("from datagen.config import RunConfig\nfrom datagen.executor import ensure_ray\n"
            f"try:\n    ensure_ray(RunConfig(executor='ray', ray_address='ray://127.0.0.1:{port}'))\n"
            "except RuntimeError as e:\n    print('ERROR', e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("ERROR")]
    assert len(lines) == 1, p.stdout + p.stderr[-2000:]
    assert f"run.ray_address=ray://127.0.0.1:{port}" in lines[0] and "connection timeout" in lines[0]


def _counting_worker(calls: list, fail_at: int | None):
    def work(items):
        calls.append(items[0])
        if items[0] == fail_at:
            raise RuntimeError("killed")
        return {"doubled": [2 * x for x in items]}

    return work


def test_a_rerun_skips_the_shards_an_interrupted_run_finished(tmp_path):
    """Shard results are kept in the scratch folder: a run that died at its third shard is rerun, and only
    the shards without a completion marker are done again; the results come back in shard order."""
    from datagen import executor
    from datagen.config import RunConfig

    shards = executor.plan("resume-test", list(range(10)), 2)
    assert [s.items[0] for s in shards] == [0, 2, 4, 6, 8]
    calls: list[int] = []
    with pytest.raises(RuntimeError, match="killed"):
        executor.map_shards(RunConfig(), functools.partial(_counting_worker, calls, 4), shards, tmp_path, what="t")
    assert calls == [0, 2, 4]
    calls.clear()
    got = executor.map_shards(RunConfig(), functools.partial(_counting_worker, calls, None), shards, tmp_path,
                              what="t")
    assert calls == [4, 6, 8]
    assert [x for part in got for x in part["doubled"]] == [2 * x for x in range(10)]


def test_evaluation_shards_never_straddle_two_arms():
    """Evaluation cuts its items into shards by arm: a shard is one model's batches, and a few-shot arm is
    not split in two for the local executor (two head prefills and a short batch each). With one arm,
    ``min_shards`` still spreads the work over the workers."""
    from datagen import executor

    items = [{"arm": a, "i": i} for a, n in (("base", 5), ("fewshot", 6), ("tuned", 5)) for i in range(n)]
    shards = executor.plan("eval", items, 256, 2, group=lambda it: it["arm"])
    assert [[it["arm"] for it in s.items] for s in shards] == [["base"] * 5, ["fewshot"] * 6, ["tuned"] * 5]
    assert [s.index for s in shards] == [0, 1, 2]
    assert [len(s.items) for s in executor.plan("eval", items, 4, 2, group=lambda it: it["arm"])] == [3, 2, 3, 3, 3, 2]
    one = [it for it in items if it["arm"] == "fewshot"]
    assert [len(s.items) for s in executor.plan("eval", one, 256, 2, group=lambda it: it["arm"])] == [3, 3]
    assert [len(s.items) for s in executor.plan("eval", items, 256, 2)] == [8, 8]  # no groups: as before


@pytest.mark.slow
def test_evaluate_on_ray_gives_the_local_answers_and_report(ray_cluster, tmp_path):
    """One briefly tuned adapter on the packaged Gemma, evaluated locally and on Ray (the arms' generation
    and label log-likelihoods in shards of 5 items on 2 actors, each holding one model with the adapter
    switched off for the base arms): the same items (answers, grades) and the same report and manifest,
    apart from the run folder and timings. Each run has its own response cache, so both generate."""
    import shutil

    from test_evaluate import ROWS, _train_tiny_adapter, _write_dataset, reference_judge

    from datagen.io import read_jsonl
    from datagen.llm.base import FunctionProvider
    from flows.stages import invoke

    got = {}
    for name in ("local", "ray"):
        root = tmp_path / name
        cfg = load_config(profile="tiny", root=root, overrides=[f"run.executor={name}", "run.shard_rows=5"])
        ev = cfg.evaluate
        ev.max_items, ev.max_new_tokens, ev.batch_size, ev.fewshot_k = None, 12, 4, 1
        ev.selfcheck_samples, ev.bootstrap_samples = 2, 200
        _write_dataset(cfg, ROWS)
        adapter = cfg.paths.models_dir / cfg.train.run_name
        if name == "local":
            _train_tiny_adapter(cfg, ROWS, adapter)
            trained = adapter
        else:
            shutil.copytree(trained, adapter)
        m = invoke(cfg, "evaluate", judge=FunctionProvider(reference_judge))
        out = Path(m.report_json).parent
        assert not (out / ".shards").exists()
        items = read_jsonl(out / "items.jsonl")
        assert {i["model"] for i in items} >= {"base", "fewshot", "tuned"}
        assert all(isinstance(i["answer"], str) for i in items)
        report = _without_timings(read_json(out / "report.json"))
        got[name] = json.loads(json.dumps([items, report, _without_timings(m.to_json())]).replace(str(root), "<root>"))
    assert got["ray"][0] == got["local"][0]
    assert got["ray"] == got["local"]
