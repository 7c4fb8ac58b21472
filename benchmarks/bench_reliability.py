"""Fail loudly, lose nothing, leak nothing: the reliability suite, with figures.

Runs the real ``finsynth`` CLI (one process per run) on throwaway roots, with the teacher behind the
fault-injecting OpenAI-compatible proxy of tests/llm_fakes.py on 127.0.0.1, and a planted API key:

- fault matrix: 20% of requests get one fault kind (429, 500, hang, truncate, garbage) and augment must
  finish with every rephrasing slot kept or given a final reason;
- a dead server, a 401 server and an always-500 server: augment must exit non-zero with no manifest;
- kill -9 at three points (mid-LLM calls, augment between its outputs and its manifest, dedup between
  its outputs and its manifest), then a rerun: no completed call is made twice (``repeated_calls``: calls
  whose answer was stored before the kill and were asked again, measured as rerun answers that added no
  new cache row; ``redelivered_in_flight``: answers the server sent that died with the killed process,
  at most the concurrency), stale data is refused;
- two runs on different roots sharing one LLM cache at the same time (no key paid twice), and two runs
  on one root (the second refused);
- the malformed-input corpus (tests/data/malformed/): every row kept or quarantined (with a source QA
  file whose category holds ``|``, a newline, ``<script>`` and ``<img onerror>``);
- faults of the machine: a full disk and a read-only root (a 1 MiB tmpfs, when run as root), a corrupt
  response cache: exit non-zero with one ``finsynth: error:`` line naming the stage and the path, no
  traceback, no manifest, and the corrupt cache left byte for byte.

Each case records ``rows_in``, ``rows_out``, ``rows_quarantined``, ``rows_unaccounted``, ``repeated_calls``,
``secret_hits`` and ``exit_code``. Writes benchmarks/results/reliability.json.

    .venv/bin/python benchmarks/bench_reliability.py
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from llm_fakes import FaultProxy  # noqa: E402

KEY = "sk-bench-reliability-7f3a9c21d4e8b605"
CORPUS = ROOT / "tests" / "data" / "malformed"


class CountingProxy(FaultProxy):
    """The fault proxy, also logging per request the hash of its body and the fault it got."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log: list[tuple[str, str]] = []
        self._tl = threading.local()

    def _pick(self, tag, n):
        self._tl.fault = super()._pick(tag, n)
        return self._tl.fault

    def handle_post(self, h, raw: bytes) -> None:
        body = json.loads(raw or b"{}")
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()  # seed differs per slot
        self._tl.fault = "?"
        try:
            super().handle_post(h, raw)
        finally:
            with self.lock:
                self.log.append((digest, self._tl.fault))


def responder(body: dict, tag: str) -> str:
    q = body["messages"][-1]["content"].rsplit("\n", 1)[-1][:200]
    return f"Could you tell me: {q}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(root: Path, base_url: str, cache: Path | None = None, **over) -> Path:
    cfg = {
        "extends": "tiny", "profile": "reliability",
        "sources": {"market": {"simulator": {"tickers": ["ACME", "BOLT"], "regimes": ["calm", "crash"],
                                             "days_per_regime": 20}, "questions_per_type": 1},
                    "source_qa": [{"path": str(ROOT / "data/raw/sample_source_qa.jsonl"),
                                   "name": "finsynth-sample-qa", "format": "jsonl"}]},
        "llm": {"providers": {"teacher": {"kind": "openai", "model": "fake", "base_url": base_url,
                                          "api_key_env": "FINSYNTH_BENCH_KEY", "max_retries": 4, "concurrency": 4,
                                          "backoff_base_s": 0.05, "backoff_max_s": 0.2, "timeout_s": 1.5},
                              "local": {"kind": "local"}, "judge": {"kind": "local"}},
                "cache_file": str(cache or root / "data/cache/llm_cache.sqlite")},
        "augment": {"provider": "teacher", "k": 3, "max_attempts": 2, "limit": 20,
                    "scenario": {"enabled": False}},
    }
    for k, v in over.items():
        node = cfg
        *parents, last = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    root.mkdir(parents=True, exist_ok=True)
    path = root / "reliability.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(root: Path, config: Path, *args: str, env_extra: dict | None = None, wait: bool = True):
    env = {**os.environ, "FINSYNTH_BENCH_KEY": KEY, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **(env_extra or {})}
    cmd = [sys.executable, "-m", "flows.cli", *args, "--config", str(config), "--root", str(root)]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return r


def secret_hits(root: Path, *texts: str) -> int:
    n = sum(t.count(KEY) for t in texts)
    for p in root.rglob("*"):
        if p.is_file():
            n += p.read_bytes().count(KEY.encode())
    return n


def augment_rows(root: Path) -> dict:
    out = root / "data/processed/augment"
    m = out / "manifest.json"
    if not m.exists():
        return {"rows_out": None, "rows_quarantined": None, "rows_unaccounted": 0, "manifest": False}
    man = json.loads(m.read_text())
    rej = [json.loads(line) for line in (out / "rejections.jsonl").read_text().splitlines() if line.strip()]
    slots, kept = man["rephrase"]["slots"], man["rephrase"]["kept"]
    final = sum(1 for r in rej if r.get("final") and r["kind"] == "rephrase")
    return {"rows_in": slots, "rows_out": kept, "rows_quarantined": final,
            "rows_unaccounted": slots - kept - final, "manifest": True}


def repeated(log_before: list[tuple[str, str]], log_after: list[tuple[str, str]]) -> int:
    done = {h for h, f in log_before if f == "ok"}
    return sum(1 for h, _ in log_after if h in done)


def cached_answers(root: Path) -> int:
    import sqlite3

    db = root / "data/cache/llm_cache.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        return con.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def fetched(root: Path, config: Path) -> None:
    r = cli(root, config, "fetch")
    assert r.returncode == 0, r.stderr[-2000:]


def case_faults(work: Path, kind: str) -> dict:
    root = work / f"fault-{kind}"
    with CountingProxy(rates={kind: 0.2}, seed=11, hang_s=3.0, responder=responder) as proxy:
        config = write_config(root, proxy.url + "/v1")
        fetched(root, config)
        r = cli(root, config, "augment")
        first = list(proxy.log)
        r2 = cli(root, config, "augment")  # rerun: every completed call comes from the cache
        again = proxy.log[len(first):]
    rows = augment_rows(root)
    return {"case": f"20% {kind}", **rows, "repeated_calls": repeated(first, again),
            "requests": len(first), "faults": dict(Counter(f for _, f in first)),
            "secret_hits": secret_hits(root, r.stdout, r.stderr, r2.stdout, r2.stderr),
            "exit_code": r.returncode, "rerun_exit_code": r2.returncode}


def case_failing(work: Path, name: str) -> dict:
    root = work / f"fail-{name}"
    if name == "dead":
        config = write_config(root, f"http://127.0.0.1:{_closed_port()}/v1")
        fetched(root, config)
        r = cli(root, config, "augment")
        log: list = []
    else:
        with CountingProxy(rates={"401": 1.0} if name == "401" else {"500": 1.0}) as proxy:
            config = write_config(root, proxy.url + "/v1", **{"llm.providers.teacher.max_retries": 1})
            fetched(root, config)
            r = cli(root, config, "augment")
            log = list(proxy.log)
    rows = augment_rows(root)
    return {"case": {"dead": "dead server", "401": "401 on every call", "500": "500 on every call"}[name],
            "rows_in": 20 * 3, **rows, "repeated_calls": 0, "requests": len(log),
            "secret_hits": secret_hits(root, r.stdout, r.stderr), "exit_code": r.returncode,
            "message": r.stderr.strip().splitlines()[-1][:300] if r.stderr.strip() else ""}


def case_kill(work: Path, point: str) -> dict:
    root = work / f"kill-{point}"
    with CountingProxy(responder=responder, delay_s=0.05) as proxy:
        config = write_config(root, proxy.url + "/v1")
        fetched(root, config)
        texts: list[str] = []
        if point == "mid-llm-calls":
            p = cli(root, config, "augment", wait=False)
            while sum(1 for _, f in proxy.log if f == "ok") < 40 and p.poll() is None:
                time.sleep(0.05)
            p.send_signal(signal.SIGKILL)
            p.wait()
            first_exit = p.returncode
        elif point == "augment-before-manifest":
            r = cli(root, config, "augment", env_extra={"FINSYNTH_FAULT_KILL_BEFORE_MANIFEST": "augment"})
            first_exit = r.returncode
            d = cli(root, config, "dedup")  # must refuse the unfinished augment output
            texts += [d.stderr]
            assert d.returncode != 0, d.stderr
        else:  # dedup-before-manifest
            r = cli(root, config, "augment")
            assert r.returncode == 0, r.stderr[-2000:]
            r = cli(root, config, "dedup", env_extra={"FINSYNTH_FAULT_KILL_BEFORE_MANIFEST": "dedup"})
            first_exit = r.returncode
            s = cli(root, config, "split")  # must refuse the unfinished dedup output
            texts += [s.stderr]
            assert s.returncode != 0, s.stderr
        first = list(proxy.log)
        stored = cached_answers(root)
        r2 = cli(root, config, "augment")
        r3 = cli(root, config, "dedup")
        again = proxy.log[len(first):]
    rows = augment_rows(root)
    ok_after = sum(1 for _, f in again if f == "ok")
    # a completed call (its answer stored before the kill) asked again would add no new cache row
    repeated_completed = ok_after - (cached_answers(root) - stored)
    return {"case": f"kill -9 {point}", **rows, "killed_exit_code": first_exit,
            "repeated_calls": repeated_completed,
            "redelivered_in_flight": repeated(first, again) - repeated_completed,
            "answers_stored_before_kill": stored, "requests_before_kill": len(first),
            "requests_after": len(again), "secret_hits": secret_hits(root, r2.stdout, r2.stderr, *texts),
            "exit_code": r2.returncode, "dedup_after_exit_code": r3.returncode,
            "refused_message": (texts[-1].strip().splitlines() or [""])[-1][:300] if texts else None}


def case_concurrent(work: Path) -> list[dict]:
    out = []
    cache = work / "shared-cache.sqlite"
    with CountingProxy(responder=responder, delay_s=0.05) as proxy:
        roots = [work / "conc-a", work / "conc-b"]
        configs = [write_config(r, proxy.url + "/v1", cache=cache) for r in roots]
        for r, c in zip(roots, configs):
            fetched(r, c)
        procs = [cli(r, c, "augment", wait=False) for r, c in zip(roots, configs)]
        res = [p.communicate(timeout=900) for p in procs]
        hashes = Counter(h for h, f in proxy.log if f == "ok")
        out.append({"case": "two roots, one LLM cache, at once", **augment_rows(roots[0]),
                    "repeated_calls": sum(n - 1 for n in hashes.values()), "requests": len(proxy.log),
                    "secret_hits": sum(secret_hits(r, *t) for r, t in zip(roots, res)),
                    "exit_code": max(p.returncode for p in procs)})
        # the same root twice at once: the second is refused at once
        root = work / "same-root"
        config = write_config(root, proxy.url + "/v1")
        fetched(root, config)
        before = len(proxy.log)
        a = cli(root, config, "augment", wait=False)
        while len(proxy.log) == before and a.poll() is None:
            time.sleep(0.05)
        b = cli(root, config, "augment")
        a_out = a.communicate(timeout=900)
        out.append({"case": "two runs on one root", **augment_rows(root), "repeated_calls": 0,
                    "secret_hits": secret_hits(root, b.stdout, b.stderr, *a_out),
                    "exit_code": a.returncode, "second_run_exit_code": b.returncode,
                    "second_run_message": b.stderr.strip().splitlines()[-1][:300]})
    return out


def case_corpus(work: Path) -> list[dict]:
    from flows.cli import main

    expected = json.loads((CORPUS / "EXPECTED.json").read_text())
    out = []
    for name, exp in sorted(expected.items()):
        if exp["kind"] not in ("rows", "source_error"):
            continue
        root = work / "corpus" / name
        spec = {"path": str(CORPUS / name), "name": "corpus", **exp.get("spec", {})}
        config = root / "c.yaml"
        root.mkdir(parents=True)
        config.write_text(yaml.safe_dump({"extends": "tiny", "sources": {"market": None, "source_qa": [spec]}}))
        code = main(["fetch", "--config", str(config), "--root", str(root)])
        m = root / "data/processed/fetch/manifest.json"
        # per-file row accounting is under source_files (the manifest's counts hold no rows_in)
        files = json.loads(m.read_text()).get("source_files") or {} if m.exists() else {}
        counts = {k: sum(f.get(k) or 0 for f in files.values())
                  for k in ("rows_in", "rows_out", "rows_quarantined", "rows_unaccounted")} if files else {}
        out.append({"case": f"corpus {name}", "kind": exp["kind"], "rows_in": counts.get("rows_in"),
                    "rows_out": counts.get("rows_out"), "rows_quarantined": counts.get("rows_quarantined"),
                    "rows_unaccounted": counts.get("rows_unaccounted", 0), "repeated_calls": 0,
                    "secret_hits": secret_hits(root), "exit_code": code,
                    "expected_exit": 0 if exp["kind"] == "rows" else 2})
    return out


def _tmpfs(where: Path) -> Path | None:
    """A 1 MiB tmpfs mounted at ``where`` (root only), or None where mount is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return None
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    return where if r.returncode == 0 else None


def _fault_case(name: str, stage: str, root: Path, r: subprocess.CompletedProcess, **extra) -> dict:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("finsynth:")]
    return {"case": name, "rows_unaccounted": 0, "repeated_calls": 0, "exit_code": r.returncode,
            "one_line": len(lines) == 1 and f"error: {stage}: " in lines[0] and str(root) in lines[0],
            "traceback": "Traceback" in r.stderr,
            "manifest": (root / "data/processed" / stage / "manifest.json").exists(),
            "secret_hits": secret_hits(root, r.stdout, r.stderr),
            "message": lines[-1][:300] if lines else r.stderr.strip()[-300:], **extra}


def case_environment(work: Path) -> list[dict]:
    out = []
    for name in ("full disk", "read-only root"):
        mnt = _tmpfs(work / name.replace(" ", "-"))
        if mnt is None:
            out.append({"case": name, "skipped": "needs root and mount", "rows_unaccounted": 0,
                        "repeated_calls": 0, "secret_hits": 0})
            continue
        try:
            root = mnt / "proj"
            (root / "data").mkdir(parents=True)
            (root / "data/raw").symlink_to(ROOT / "data/raw")
            config = write_config(work / f"{name}-config", "http://127.0.0.1:9/v1", cache=root / "cache.sqlite")
            if name == "full disk":
                st = os.statvfs(mnt)
                (mnt / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - 8192))
            else:
                subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            out.append(_fault_case(name, "fetch", root, cli(root, config, "fetch")))
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    root = work / "corrupt-cache"
    config = write_config(root, f"http://127.0.0.1:{_closed_port()}/v1")
    fetched(root, config)
    cache = root / "data/cache/llm_cache.sqlite"
    cache.parent.mkdir(parents=True, exist_ok=True)
    junk = b"not an SQLite file\n" * 100
    cache.write_bytes(junk)
    r = cli(root, config, "augment")
    out.append(_fault_case("corrupt cache", "augment", root, r, cache_kept=cache.read_bytes() == junk))
    return out


def main(argv: list[str] | None = None) -> int:
    """``--only environment,corpus``: run those parts only and keep the other parts' cases from the last
    full run in reliability.json (the summary is recomputed over all of them; ``partial_runs`` says so)."""
    argv = sys.argv[1:] if argv is None else argv
    only = set(argv[argv.index("--only") + 1].split(",")) if "--only" in argv else None
    out = ROOT / "benchmarks" / "results" / "reliability.json"
    prev = json.loads(out.read_text()) if only and out.exists() else {}
    t0 = time.time()
    load0 = os.getloadavg()
    cases: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="finsynth-reliability-") as tmp:
        work = Path(tmp)
        if only is not None:
            cases = prev.get("llm_cases", []) if "llm" not in only else []
        for kind in ("429", "500", "hang", "truncate", "garbage") if only is None or "llm" in only else ():
            cases.append(case_faults(work, kind))
            print(json.dumps(cases[-1]), flush=True)
        if only is None or "llm" in only:
            for name in ("dead", "401", "500"):
                cases.append(case_failing(work, name))
                print(json.dumps(cases[-1]), flush=True)
            for point in ("mid-llm-calls", "augment-before-manifest", "dedup-before-manifest"):
                cases.append(case_kill(work, point))
                print(json.dumps(cases[-1]), flush=True)
            cases += case_concurrent(work)
            print(json.dumps(cases[-2:]), flush=True)
        if only is None or "environment" in only:
            env_cases = case_environment(work)
            print(json.dumps(env_cases), flush=True)
        else:
            env_cases = prev.get("environment_cases", [])
        corpus = case_corpus(work) if only is None or "corpus" in only else prev.get("corpus_cases", [])
    llm_cases = [c for c in cases]
    summary = {
        "cases": len(llm_cases) + len(corpus) + len(env_cases),
        "rows_unaccounted": sum(c.get("rows_unaccounted") or 0 for c in llm_cases + corpus + env_cases),
        "repeated_calls_after_kill": sum(c["repeated_calls"] for c in llm_cases if c["case"].startswith("kill")),
        "repeated_calls": sum(c["repeated_calls"] for c in llm_cases),
        "secret_hits": sum(c["secret_hits"] for c in llm_cases + corpus + env_cases),
        "failing_teacher_exit_codes": {c["case"]: c["exit_code"] for c in llm_cases
                                       if c["case"] in ("dead server", "401 on every call", "500 on every call")},
        "corpus_cases": len(corpus),
        "corpus_exit_codes_as_expected": all(c["exit_code"] == c["expected_exit"] for c in corpus),
        "environment_faults_one_line": {c["case"]: (c["exit_code"] != 0 and c["one_line"] and not c["traceback"]
                                                    and not c["manifest"]) if "skipped" not in c else "skipped"
                                        for c in env_cases},
    }
    result = {"benchmark": "reliability", "summary": summary, "llm_cases": llm_cases, "corpus_cases": corpus,
              "environment_cases": env_cases,
              "wall_s": round(time.time() - t0, 1), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if only is not None:
        result["partial_runs"] = [*prev.get("partial_runs", []),
                                  {"only": sorted(only), "date": result["date"], "wall_s": result["wall_s"]}]
        result["wall_s"], result["date"] = prev.get("wall_s"), prev.get("date")  # of the last full run
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
