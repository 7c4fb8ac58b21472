"""The response cache and the run lock on PostgreSQL (issue 30, docs/scale.md): the cache's behaviours run
against both backends (SQLite file, PostgreSQL database) through one parametrised fixture; worker processes
sharing one PostgreSQL cache pay once per key; the advisory run lock; a password in the URL never reaches a
message. A real throwaway server on 127.0.0.1 (tests/pg_server.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from llm_fakes import FaultProxy

from datagen.config import ConfigError, LLMConfig, ProviderConfig, load_config, mask_url
from datagen.faults import CacheFault
from flows.lock import run_lock
from datagen.llm import ChatRequest, make_provider
from datagen.llm.cache import CacheWriter, ResponseCache, cache_target, configured_cache, open_cache
from datagen.llm.pg_cache import PostgresCache, redacted_error

pytest_plugins = ["pg_server"]

SECRET = "s3cr3t-Pa55"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path) -> str:
    """Where a fresh cache lives, as ``open_cache`` takes it: a SQLite file or a new PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "cache.sqlite")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def cache(target):
    return open_cache(target)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _py(script: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, **kw)


def _until(check, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


# ----------------------------------------------------------------------------- the cache, both backends
def test_open_cache_picks_the_backend_by_scheme(target, cache):
    assert isinstance(cache, PostgresCache if target.startswith("postgresql://") else ResponseCache)
    assert open_cache(target) is cache  # one per place per process


def test_rows_round_trip(cache):
    assert cache.get("a") is None and len(cache) == 0
    cache.put("a", provider="openai", model="m", text="alpha", prompt_tokens=3, completion_tokens=4)
    assert cache.get("a") == {"text": "alpha", "prompt_tokens": 3, "completion_tokens": 4}
    cache.put_many([("b", {"provider": "p", "model": "m", "text": "beta"}),
                    ("c", {"provider": "p", "model": "m", "text": "gamma", "prompt_tokens": 1,
                           "completion_tokens": 2})])
    assert cache.get_many(["a", "b", "c", "missing", "b"]) == {
        "a": {"text": "alpha", "prompt_tokens": 3, "completion_tokens": 4},
        "b": {"text": "beta", "prompt_tokens": 0, "completion_tokens": 0},
        "c": {"text": "gamma", "prompt_tokens": 1, "completion_tokens": 2}}
    assert cache.get_many([]) == {} and len(cache) == 3
    cache.delete("b")
    assert cache.get("b") is None and len(cache) == 2
    cache.put_many([])
    assert len(cache) == 2


def test_a_newer_answer_replaces_the_old_one(cache):
    """The engine asks again when a cached answer no longer validates (the schema changed) and stores
    the new one under the same key: the next run must read the new one, on both backends."""
    cache.put("k", provider="p", model="m", text="old", prompt_tokens=1)
    cache.put("k", provider="p", model="m", text="new", prompt_tokens=2)
    cache.put_many([("j", {"provider": "p", "model": "m", "text": "first"}),
                    ("j", {"provider": "p", "model": "m", "text": "last"})])
    assert cache.get("k") == {"text": "new", "prompt_tokens": 2, "completion_tokens": 0}
    assert cache.get("j")["text"] == "last" and len(cache) == 2


def test_claims_of_a_live_owner_are_theirs_until_released(cache):
    keys = ["k1", "k2", "k3"]
    assert cache.claim_many(keys[:2], "run-a") == (["k1", "k2"], [])
    assert cache.claim_many(keys, "run-b") == (["k3"], ["k1", "k2"])
    assert cache.claim_many(keys[:2], "run-a") == (["k1", "k2"], [])  # its own claims stay its own
    cache.release(keys, "run-b")  # b releases only its own (k3)
    assert cache.claim_many(keys, "run-c") == (["k3"], ["k1", "k2"])
    cache.release(["k1"], "run-a")
    assert cache.claim_many(keys, "run-d") == (["k1"], ["k2", "k3"])
    assert cache.claim_many([], "run-c") == ([], [])


def test_an_expired_claim_is_taken_over(cache, monkeypatch):
    import datagen.llm.cache as sqlite_mod
    import datagen.llm.pg_cache as pg_mod

    assert cache.claim_many(["k"], "run-a") == (["k"], [])
    assert cache.claim_many(["k"], "run-b") == ([], ["k"])
    monkeypatch.setattr(sqlite_mod, "CLAIM_TTL_S", -1.0)
    monkeypatch.setattr(pg_mod, "CLAIM_TTL_S", -1.0)
    assert cache.claim_many(["k"], "run-a") == (["k"], [])  # refreshed, and now already expired
    assert cache.claim_many(["k"], "run-b") == (["k"], [])


def test_a_dead_processs_claim_is_taken_over(target, cache):
    """A worker that claimed keys and was SIGKILLed: its claims are taken over (PostgreSQL: its session
    ended; SQLite: its pid is gone), while it lived they were not."""
    holder = _py("""
        import sys, time
        from datagen.llm.cache import open_cache
        c = open_cache(sys.argv[1])
        print(c.claim_many(["k1", "k2"], "doomed"), flush=True)
        time.sleep(60)
    """, target)
    try:
        assert holder.stdout.readline().strip() == "(['k1', 'k2'], [])"
        assert cache.claim_many(["k1", "k2", "k3"], "alive") == (["k3"], ["k1", "k2"])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert _until(lambda: cache.claim_many(["k1", "k2"], "alive") == (["k1", "k2"], []))


def test_cache_is_safe_from_many_threads(cache):
    errors = []

    def work(t: int) -> None:
        try:
            for i in range(40):
                cache.put(f"t{t}-{i}", provider="p", model="m", text=f"{t}/{i}")
                assert cache.get(f"t{t}-{i}")["text"] == f"{t}/{i}"
                mine, theirs = cache.claim_many([f"shared-{i}"], f"owner-{t}")
                assert len(mine) + len(theirs) == 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and len(cache) == 8 * 40


def test_cache_writer_commits_in_windows(cache):
    """Answers arriving 2 ms apart (a fast server) are grouped into one commit per window instead of one per
    answer (docs/providers.md); ``close`` puts every answer in the cache at once, without waiting out the window."""
    commits = []
    real = cache.put_many
    cache.put_many = lambda rows: (commits.append(len(rows)), real(rows))[1]
    w = CacheWriter(cache, linger_s=0.2)
    t0 = time.monotonic()
    for i in range(60):
        w.put(f"k{i}", provider="openai", model="m", text=f"a{i}")
        time.sleep(0.002)
    w.close()
    took = time.monotonic() - t0
    assert sum(commits) == 60 and len(cache) == 60  # nothing lost
    assert len(commits) <= 2 + took / 0.2, commits  # one per 0.2 s window (+ the last, cut short)
    assert took < 0.6  # close did not sit out a window per put
    assert cache.get("k59")["text"] == "a59"


WORKER = """
    import json, os, sys, time
    from datagen.llm.cache import open_cache
    target, log, go, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cache = open_cache(target)
    keys = [f"key-{i}" for i in range(n)]
    owner = f"worker-{os.getpid()}"
    while not os.path.exists(go):
        time.sleep(0.01)

    def compute(k):  # the paid call: one line per computation, in a file both workers append to
        with open(log, "a") as f:
            f.write(f"{k} {os.getpid()}\\n")
        time.sleep(0.03)
        cache.put(k, provider="fake", model="m", text=f"answer to {k}")

    answers, waiting = {}, list(keys)
    deadline = time.monotonic() + 60
    while waiting and time.monotonic() < deadline:
        answers.update({k: v["text"] for k, v in cache.get_many(waiting).items()})
        waiting = [k for k in waiting if k not in answers]
        mine, _ = cache.claim_many(waiting[:3], owner)  # a few at a time: the workers collide on keys
        for k in mine:
            if cache.get(k) is None:  # answered between our read and our claim: not paid again
                compute(k)
            answers[k] = cache.get(k)["text"]
        cache.release(mine, owner)
        waiting = [k for k in waiting if k not in answers]
        if waiting and not mine:
            time.sleep(0.05)
    print(json.dumps(answers), flush=True)
"""


def test_two_worker_processes_pay_once_per_key(target, tmp_path):
    """(b) Two worker processes sharing one cache ask for the same 30 keys at the same moment: every key
    is computed exactly once, and both get every answer."""
    log, go, n = tmp_path / "computed.log", tmp_path / "go", 30
    workers = [_py(WORKER, target, str(log), str(go), str(n)) for _ in range(2)]
    time.sleep(1.0)  # both started and waiting: they begin together
    go.touch()
    outs = [json.loads(w.communicate(timeout=120)[0]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    computed = [ln.split()[0] for ln in log.read_text().splitlines()]
    assert sorted(computed) == sorted(f"key-{i}" for i in range(n))  # each key once, none twice
    assert outs[0] == outs[1] == {f"key-{i}": f"answer to key-{i}" for i in range(n)}
    pids = {ln.split()[1] for ln in log.read_text().splitlines()}
    assert len(pids) == 2  # both did a share of the work: they really ran at the same time


def test_two_provider_processes_sharing_one_cache_never_pay_twice(target):
    """The real engine path (claims, waits, group-committed answers) over the wire: two runs ask a live
    OpenAI-compatible server for the same 12 answers through one cache; each reaches the server once."""
    script = """
        import json, sys
        from datagen.config import ProviderConfig
        from datagen.llm import ChatRequest, make_provider, open_cache
        p = make_provider("t", ProviderConfig(kind="openai", model="fake", base_url=sys.argv[1], concurrency=4,
                                              max_retries=0), open_cache(sys.argv[2]))
        out = p.generate_batch([ChatRequest(messages=[{"role": "user", "content": f"Say it. [item {i}]"}])
                                for i in range(12)])
        print(json.dumps({"texts": [r.text for r in out], "ok": all(r.ok for r in out),
                          "calls": p.usage.calls, "hits": p.usage.cache_hits}))
    """
    with FaultProxy(delay_s=0.3) as proxy:
        procs = [_py(script, proxy.url + "/v1", target) for _ in range(2)]
        outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        assert proxy.received == {str(i): 1 for i in range(12)}  # each key paid for once
        # a third run, in this process, reads every answer from the cache: no call
        p = make_provider("t", ProviderConfig(kind="openai", model="fake", base_url=proxy.url + "/v1", concurrency=4,
                                              max_retries=0), open_cache(target))
        out = p.generate_batch([ChatRequest(messages=[{"role": "user", "content": f"Say it. [item {i}]"}])
                                for i in range(12)])
        assert [r.text for r in out] == [f"echo {i}" for i in range(12)] and all(r.cached for r in out)
        assert proxy.received == {str(i): 1 for i in range(12)}
    assert all(o["ok"] for o in outs) and outs[0]["texts"] == outs[1]["texts"] == [f"echo {i}" for i in range(12)]
    assert sum(o["calls"] for o in outs) == 12 and sum(o["hits"] for o in outs) == 12


# ----------------------------------------------------------------------------- configuration
def test_llm_cache_wins_over_cache_file(tmp_root, pg_url):
    plain = load_config(profile="tiny", root=tmp_root)
    assert cache_target(plain) == (tmp_root / plain.llm.cache_file).resolve()
    rel = load_config(profile="tiny", root=tmp_root, overrides=["llm.cache=sqlite:///data/cache/other.sqlite"])
    assert cache_target(rel) == (tmp_root / "data/cache/other.sqlite").resolve()
    absolute = load_config(profile="tiny", root=tmp_root, overrides=[f"llm.cache=sqlite:///{tmp_root}/abs.sqlite"])
    assert cache_target(absolute) == tmp_root / "abs.sqlite"
    pg = load_config(profile="tiny", root=tmp_root, overrides=[f"llm.cache={pg_url}"])
    assert cache_target(pg) == pg_url
    assert isinstance(configured_cache(pg), PostgresCache) and configured_cache(pg) is open_cache(pg_url)
    assert isinstance(configured_cache(rel), ResponseCache)


def test_a_bad_cache_url_names_the_key_and_hides_the_password(tmp_root):
    with pytest.raises(ConfigError) as e:
        load_config(profile="tiny", root=tmp_root, overrides=[f"llm.cache=mysql://bob:{SECRET}@db.example/x"])
    assert "llm.cache: 'mysql://bob:***@db.example/x' is not a cache URL" in str(e.value)
    assert SECRET not in str(e.value)
    with pytest.raises(ConfigError, match="llm.cache: a sqlite URL needs a file"):
        load_config(profile="tiny", root=tmp_root, overrides=["llm.cache=sqlite:///"])
    with pytest.raises(Exception) as e:  # a direct pydantic error does not echo the input either
        LLMConfig(cache=f"redis://bob:{SECRET}@h/0")
    assert SECRET not in str(e.value) and "bob:***@h" in str(e.value)


def test_a_password_in_the_cache_url_is_refused_without_echoing_it(tmp_root):
    """A config value is recorded with the run (Prefect's flow parameters, run.json): a password there would
    be stored in the clear, so the URL must not hold one (PGPASSWORD or ~/.pgpass carry it instead)."""
    for url in (f"postgresql://bob:{SECRET}@127.0.0.1:5/db", f"postgresql://bob@127.0.0.1:5/db?password={SECRET}"):
        with pytest.raises(ConfigError) as e:
            load_config(profile="tiny", root=tmp_root, overrides=[f"llm.cache={url}"])
        assert "llm.cache" in str(e.value) and "PGPASSWORD" in str(e.value) and SECRET not in str(e.value)


def test_the_cache_url_is_in_the_public_dump_and_absent_without_one(tmp_root):
    plain = load_config(profile="tiny", root=tmp_root)
    assert "cache" not in plain.dump_public()["llm"]  # unset: stage hashes as before the key existed
    cfg = load_config(profile="tiny", root=tmp_root, overrides=["llm.cache=postgresql://bob@127.0.0.1:5/db"])
    assert cfg.dump_public()["llm"]["cache"] == "postgresql://bob@127.0.0.1:5/db"
    assert cfg.section_hash("llm") != plain.section_hash("llm")


# ----------------------------------------------------------------------------- run lock
LOCK_HOLDER = """
    import sys, time
    from flows.lock import run_lock
    with run_lock(sys.argv[1], cache_url=sys.argv[2]):
        print("held", flush=True)
        time.sleep(60)
"""


def test_second_run_lock_on_the_same_root_is_refused_until_the_holder_dies(tmp_path, pg_url):
    """(c) While a holder process lives, a second run on the same root (however spelled) is refused with
    who holds it; another root is free; SIGKILL the holder and the lock is free (no stale lock)."""
    root = tmp_path / "project"
    root.mkdir()
    holder = _py(LOCK_HOLDER, str(root), pg_url)
    try:
        assert holder.stdout.readline().strip() == "held"
        host = socket.gethostname()
        with pytest.raises(RuntimeError, match=rf"another finsynth run is using .*project \(pid {holder.pid} on "
                                               rf"{host}, started \d{{4}}-"):
            with run_lock(root, cache_url=pg_url):
                pass
        with pytest.raises(RuntimeError, match="another finsynth run"):
            with run_lock(tmp_path / "x" / ".." / "project", cache_url=pg_url):
                pass
        with run_lock(tmp_path / "other", cache_url=pg_url):  # another root is free
            pass
        assert not (root / "data" / ".finsynth-run.lock").exists()  # the database holds it, not a file
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    def free() -> bool:
        try:
            with run_lock(root, cache_url=pg_url):
                return True
        except RuntimeError:
            return False

    assert _until(free)
    with run_lock(root, cache_url=pg_url):
        with run_lock(root, cache_url=pg_url):  # re-entrant in one thread
            pass
        refused = []

        def other_thread() -> None:
            try:
                with run_lock(root, cache_url=pg_url):
                    pass
            except RuntimeError as e:
                refused.append(str(e))

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert len(refused) == 1 and f"pid {os.getpid()} on" in refused[0]
    assert free()  # released when the outermost exits


# ----------------------------------------------------------------------------- passwords and one-line faults
def test_a_password_in_the_url_never_reaches_a_message(pg_server, monkeypatch):
    """(d) Unreachable server, unknown database named like the password, run lock: every message names
    the masked URL and never the password."""
    port = _closed_port()
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/finsynth"
    with pytest.raises(CacheFault) as e:
        PostgresCache(url)
    msg = str(e.value)
    assert f"postgresql://postgres:***@127.0.0.1:{port}/finsynth" in msg and SECRET not in msg
    assert "\n" not in msg and "cannot use the response cache" in msg
    with pytest.raises(CacheFault) as e:
        with run_lock(Path("/tmp/nowhere"), cache_url=url):
            pass
    assert SECRET not in str(e.value) and "run lock" in str(e.value) and "postgres:***@" in str(e.value)
    # an error from the server: one line, the masked URL
    server = pg_server.removeprefix("postgresql://postgres@")
    url = f"postgresql://postgres:{SECRET}@{server}/no_such_db"
    with pytest.raises(CacheFault) as e:
        PostgresCache(url)
    assert SECRET not in str(e.value) and 'database "no_such_db" does not exist' in str(e.value), str(e.value)
    assert mask_url(url) in str(e.value)
    # an error text that repeats the password (raw or percent-encoded) is scrubbed before it is shown
    odd = "pa@ss/w0rd"
    url = f"postgresql://bob:{quote(odd, safe='')}@127.0.0.1:{port}/db"
    said = redacted_error(RuntimeError(f"auth failed for {odd} ({quote(odd, safe='')})\nsee {url}"), url)
    assert odd not in said and quote(odd, safe="") not in said and "\n" not in said
    assert said == f"auth failed for *** (***) see postgresql://bob:***@127.0.0.1:{port}/db"
    # the password's right place, PGPASSWORD, is scrubbed from a server's message too
    monkeypatch.setenv("PGPASSWORD", SECRET)
    plain = f"postgresql://bob@127.0.0.1:{port}/db"
    assert redacted_error(RuntimeError(f"password {SECRET} refused"), plain) == "password *** refused"
    url = f"postgresql://postgres@127.0.0.1:{port}/db?password={SECRET}"
    with pytest.raises(CacheFault) as e:
        open_cache(url)
    assert SECRET not in str(e.value) and "password=***" in str(e.value)


def test_an_unreachable_cache_is_one_line_from_the_cli(tmp_root):
    """The CLI prints one line naming the masked URL (no traceback) when the configured database is down."""
    port = _closed_port()
    p = subprocess.run([sys.executable, "-m", "flows.cli", "fetch", "--profile", "tiny", "--root", str(tmp_root),
                        "--set", f"llm.cache=postgresql://bob@127.0.0.1:{port}/db"],
                       capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PGPASSWORD": SECRET})
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("finsynth:")]
    assert len(lines) == 1, p.stderr[-3000:]
    assert f"postgresql://bob@127.0.0.1:{port}/db" in lines[0] and "run lock" in lines[0]
    assert SECRET not in p.stderr + p.stdout


def test_a_broken_or_inherited_connection_is_opened_anew(pg_url):
    """The server ended our session (a restart, an administrator): the next call reconnects and is retried
    once. A forked child does not use its parent's connection (which would corrupt both): it opens its own."""
    import psycopg

    c = PostgresCache(pg_url)
    c.put("a", provider="p", model="m", text="parent")
    with psycopg.connect(pg_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (c._backend[0],)).fetchone()[0]
    assert c.get("a")["text"] == "parent"  # no error: reconnected and retried
    parents_session = c._backend[0]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        try:
            c.put("b", provider="p", model="m", text="child")
            os._exit(0 if c.get("a")["text"] == "parent" and c._backend[0] != parents_session else 1)
        except BaseException:
            os._exit(3)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert c.get("b")["text"] == "child" and len(c) == 2  # the parent's session still works
    c.close()
    with pytest.raises(RuntimeError, match="is closed"):
        c.get("a")


def test_an_answer_stored_between_the_cache_read_and_the_claim_is_not_paid_again(target, monkeypatch):
    """Another worker finishes a key after this batch read the cache (a miss) and before it claimed the key
    (the other worker's claim is released by then, so the claim succeeds): the batch must take that answer
    from the cache, not call the server for it."""
    cache = open_cache(target)
    real_claim = cache.claim_many

    def claim_after_the_other_worker_finished(keys, owner):
        for k in keys:
            cache.put(k, provider="openai", model="fake", text=f"answered elsewhere {k[:8]}")
        return real_claim(keys, owner)

    monkeypatch.setattr(cache, "claim_many", claim_after_the_other_worker_finished)
    with FaultProxy() as proxy:
        p = make_provider("t", ProviderConfig(kind="openai", model="fake", base_url=proxy.url + "/v1",
                                              max_retries=0), cache)
        out = p.generate_batch([ChatRequest(messages=[{"role": "user", "content": f"Say it. [item {i}]"}])
                                for i in range(3)])
        assert proxy.received == {}
    assert all(r.ok and r.cached and r.text.startswith("answered elsewhere") for r in out)
    assert p.usage.calls == 0 and p.usage.cache_hits == 3
