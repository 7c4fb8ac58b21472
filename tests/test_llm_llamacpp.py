"""The ``openai`` provider against a real OpenAI-compatible server: llama-cpp-python's server on
127.0.0.1 serving the packaged Gemma-3-270M GGUF, directly and behind a fault-injecting proxy;
and a batch killed mid-way then rerun. Needs the ``llamacpp`` extra."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from llm_fakes import FaultProxy
from pydantic import BaseModel

from datagen.config import ProviderConfig
from datagen.llm import ChatRequest, make_provider, open_cache
from datagen.llm.llamacpp_server import LlamaCppServer, llama_cpp_available

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    if not llama_cpp_available():
        pytest.skip("llama_cpp is not importable: pip install -e '.[llamacpp]' (llama-cpp-python[server])")
    log = tmp_path_factory.mktemp("llamacpp") / "server.log"
    with LlamaCppServer(log_path=log) as srv:
        yield srv


class YesNo(BaseModel):
    ok: bool


def ask(i: int, **kw) -> ChatRequest:
    # a shared prefix keeps the server's prompt (KV) reuse high; the tag identifies the item
    return ChatRequest(messages=[{"role": "user", "content": f"Say one word. [item {i}]"}],
                       max_tokens=kw.pop("max_tokens", 2), **kw)


def provider(url: str, cache_file: Path, **kw):
    pcfg = ProviderConfig(kind="openai", model="gemma3-270m", base_url=url, json_mode="json_object", **kw)
    return make_provider("llamacpp", pcfg, open_cache(cache_file))


def test_openai_provider_plain_and_json_object(llama_server, tmp_path):
    from openai import OpenAI

    p = provider(llama_server.base_url, tmp_path / "c.sqlite", concurrency=2)
    yes_no = [{"role": "user", "content": 'Is 2 > 1? Answer as {"ok": true/false}.'}]
    out = p.generate_batch([ask(0, max_tokens=3), ask(1, max_tokens=3),
                            ChatRequest(messages=yes_no, schema=YesNo, max_tokens=16)])
    assert all(r.ok for r in out), [r.error for r in out]
    raw = OpenAI(base_url=llama_server.base_url, api_key="x").chat.completions.create(
        model="gemma3-270m", messages=list(ask(0).messages), max_tokens=3, temperature=0.0)
    assert out[0].text == raw.choices[0].message.content  # greedy: the same answer as the bare SDK
    assert 1 <= out[0].usage["completion_tokens"] <= 3 and out[0].usage["prompt_tokens"] > 5
    assert isinstance(out[2].parsed, YesNo)  # json_object + schema: constrained by the server
    assert p.usage.calls == 3 + p.usage.schema_retries and p.usage.failures == 0
    again = p.generate_batch([ask(0, max_tokens=3)])
    assert again[0].cached and again[0].text == out[0].text and p.usage.cache_hits == 1


def test_fault_proxy_batch_of_50_nothing_lost_or_duplicated(llama_server, tmp_path):
    n = 50
    plan = {}
    for i in range(n):
        first = {1: "429", 2: "500", 3: "truncate", 4: "garbage"}.get(i % 10)
        if first:
            plan[str(i)] = [first]
    plan["5"] = plan["25"] = ["hang"]
    upstream = llama_server.base_url.removesuffix("/v1")
    with FaultProxy(upstream, plan=plan, always={"9": "500", "19": "400"}, hang_s=15.0) as proxy:
        p = provider(proxy.url + "/v1", tmp_path / "c.sqlite", concurrency=4, max_retries=3,
                     timeout_s=10.0, backoff_base_s=0.05, backoff_max_s=0.5)
        out = p.generate_batch([ask(i) for i in range(n)], desc="faults")
        assert len(out) == n
        assert not out[9].ok and out[9].error.startswith("http_500") and "gave up after 4 attempts" in out[9].error
        assert proxy.received["9"] == 4 and proxy.forwarded["9"] == 0
        assert not out[19].ok and out[19].error.startswith("http_400") and proxy.received["19"] == 1
        others = [i for i in range(n) if i not in (9, 19)]
        assert all(out[i].ok for i in others), [(i, out[i].error) for i in others if not out[i].ok]
        for i in others:
            tag = str(i)
            assert out[i].text in proxy.delivered[tag]  # the item's own answer, not another's
            assert proxy.received[tag] <= out[i].attempts
            if tag in plan:  # the planned fault happened, then a retry succeeded
                assert proxy.times[tag][0][1] == plan[tag][0] and out[i].attempts >= 2
        for tag in (str(i) for i in range(1, n, 10)):  # Retry-After: 1 was honoured
            (t0, f0), (t1, _) = proxy.times[tag][:2]
            assert f0 == "429" and t1 - t0 >= 1.0
        assert proxy.forwarded["3"] >= 2  # truncated after the server answered, then asked again
        assert sum(r.attempts for r in out) == p.usage.calls and p.usage.failures == 2
        assert p.usage.retries == p.usage.calls - n

        # rerun with the faults gone: only the two failures are asked again
        proxy.plan, proxy.always = {}, {}
        seen = proxy.received.copy()
        out2 = p.generate_batch([ask(i) for i in range(n)], desc="rerun")
        assert all(r.ok for r in out2)
        assert proxy.received - seen == {"9": 1, "19": 1}
        assert [out2[i].text for i in others] == [out[i].text for i in others]


CHILD = textwrap.dedent("""
    import sys
    from datagen.config import ProviderConfig
    from datagen.llm import ChatRequest, make_provider, open_cache
    url, cache, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    p = make_provider("llamacpp", ProviderConfig(kind="openai", model="gemma3-270m", base_url=url,
                      json_mode="json_object", concurrency=1), open_cache(cache))
    reqs = [ChatRequest(messages=[{"role": "user", "content": f"Say one word. [item {i}]"}], max_tokens=2)
            for i in range(n)]
    p.generate_batch(reqs)
    print("finished")
""")


def _rows(cache_file: Path) -> set[str]:
    if not cache_file.exists():
        return set()
    con = sqlite3.connect(f"file:{cache_file}?mode=ro", uri=True, timeout=10)
    try:
        return {r[0] for r in con.execute("SELECT key FROM responses")}
    except sqlite3.OperationalError:  # table not created yet
        return set()
    finally:
        con.close()


def test_killed_mid_batch_rerun_asks_only_for_unfinished(llama_server, tmp_path):
    n = 12
    cache_file = tmp_path / "c.sqlite"
    upstream = llama_server.base_url.removesuffix("/v1")
    with FaultProxy(upstream) as proxy:
        url = proxy.url + "/v1"
        child = subprocess.Popen([sys.executable, "-c", CHILD, url, str(cache_file), str(n)], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        deadline = time.monotonic() + 180
        while len(_rows(cache_file)) < 3 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert b"finished" not in child.stdout.read()
        done_keys = _rows(cache_file)
        assert 3 <= len(done_keys) < n

        p = provider(url, cache_file, concurrency=1)
        keys = p.batch_keys([ask(i) for i in range(n)])
        done = [i for i in range(n) if keys[i] in done_keys]
        assert len(done) == len(done_keys)  # the child wrote exactly our keys
        seen = proxy.received.copy()
        assert all(seen[str(i)] == 1 for i in done)
        out = p.generate_batch([ask(i) for i in range(n)], desc="rerun")
        assert all(r.ok for r in out)
        assert [i for i in range(n) if out[i].cached] == done
        new = proxy.received - seen
        assert not any(str(i) in new for i in done)  # no second request for what finished before the kill
        assert set(new) == {str(i) for i in range(n) if i not in done}
        assert p.usage.cache_hits == len(done) and p.usage.calls == n - len(done)
