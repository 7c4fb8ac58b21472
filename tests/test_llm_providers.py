"""Providers against local HTTP servers: the engine's contract (order, retries, schema feedback,
cache, accounting, keys), the openai provider on an OpenAI-compatible echo endpoint with injected
faults, and the gemini provider on a fake speaking the Gemini REST wire format.
The same machinery against a real llama.cpp server is in test_llm_llamacpp.py."""

from __future__ import annotations

import json
import logging
import random

import pytest
from llm_fakes import FaultProxy, GeminiFake, item_tag
from pydantic import BaseModel

from datagen.config import ProviderConfig, load_config
from datagen.llm import ChatRequest, get_provider, make_provider, open_cache
from datagen.llm.engine import RateLimiter, backoff_delay, parse_retry_after
from datagen.llm.keys import MissingKeyError

FAKE_KEY = "sk-finsynth-FAKE-9f8e7d6c5b4a"


class Verdict(BaseModel):
    label: str
    score: int


def req(i: int, **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": f"[item {i}] Say something."}], **kw)


def openai_provider(tmp_path, url: str, **kw):
    pcfg = ProviderConfig(kind="openai", model="fake", base_url=url + "/v1", **kw)
    return make_provider("t", pcfg, open_cache(tmp_path / "cache.sqlite"))


# ----------------------------------------------------------------------------- pure parts
def test_openai_request_body_per_json_mode(tmp_path):
    p = make_provider("t", ProviderConfig(kind="openai", model="m", json_mode="json_object",
                                          extra_body={"top_k": 5}), None)
    r = ChatRequest(messages=[{"role": "user", "content": "hi"}], schema=Verdict, temperature=0.5,
                    max_tokens=9, seed=3, stop=("\n",))
    body = p.request_body(list(r.messages), r)
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5,
                    "max_tokens": 9, "seed": 3, "stop": ["\n"],
                    "response_format": {"type": "json_object", "schema": Verdict.model_json_schema()},
                    "top_k": 5}
    p2 = make_provider("t", ProviderConfig(kind="openai", model="m"), None)
    assert p2.request_body(list(r.messages), r)["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "Verdict", "schema": Verdict.model_json_schema(),
                                               "strict": False}}
    p3 = make_provider("t", ProviderConfig(kind="openai", model="m", json_mode="none"), None)
    assert "response_format" not in p3.request_body(list(r.messages), r)
    plain = ChatRequest(messages=[{"role": "user", "content": "hi"}])
    assert p3.request_body(list(plain.messages), plain) == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0, "max_tokens": 256}


@pytest.mark.parametrize("json_mode", ["schema", "json_object", "none"])
def test_the_wire_body_is_what_the_sdks_create_sends(tmp_path, json_mode):
    """The provider builds its body itself and sends it with ``client.post`` (skipping ``create``'s
    parameter walk); the server must see exactly what ``chat.completions.create`` would have sent."""
    import asyncio

    from openai import AsyncOpenAI

    reqs = [req(0), req(1, temperature=0.7, max_tokens=5, seed=11, stop=("\n", "Q:")), req(2, n=3),
            req(3, schema=Verdict, temperature=0.2)]
    extra = {"top_k": 4, "repetition_penalty": 1.1}
    with FaultProxy(responder=lambda body, tag: '{"label": "up", "score": 2}') as proxy:
        p = openai_provider(tmp_path, proxy.url, json_mode=json_mode, extra_body=extra, schema_retries=0)
        assert all(r.ok for r in p.generate_batch(reqs))

        async def via_create() -> None:
            client = AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
            for r in reqs:
                kw = {"model": "fake", "messages": list(r.messages), "temperature": r.temperature,
                      "max_tokens": r.max_tokens}
                if r.seed is not None:
                    kw["seed"] = r.seed
                if r.stop:
                    kw["stop"] = list(r.stop)
                if r.n > 1:
                    kw["n"] = r.n
                if r.schema is not None and json_mode == "schema":
                    kw["response_format"] = {"type": "json_schema", "json_schema": {
                        "name": "Verdict", "schema": Verdict.model_json_schema(), "strict": False}}
                elif r.schema is not None and json_mode == "json_object":
                    kw["response_format"] = {"type": "json_object", "schema": Verdict.model_json_schema()}
                await client.chat.completions.create(**kw, extra_body=extra)
            await client.close()

        asyncio.run(via_create())
    for i in range(4):
        ours, sdk = proxy.bodies[str(i)]
        assert ours == sdk


def test_retry_after_and_backoff():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after(None) is None
    rng = random.Random(0)
    for attempt, lo, hi in [(0, 0.25, 0.5), (1, 0.5, 1.0), (2, 1.0, 2.0), (10, 1.5, 3.0)]:
        d = [backoff_delay(attempt, 0.5, 3.0, rng=rng) for _ in range(200)]
        assert lo <= min(d) and max(d) <= hi and max(d) - min(d) > 0.1 * (hi - lo)  # jittered
    assert 2.0 <= backoff_delay(0, 0.5, 3.0, retry_after=2.0, rng=rng) <= 2.2  # the server's hint wins


def test_rate_limiter_spaces_starts():
    now = [100.0]
    lim = RateLimiter(120, clock=lambda: now[0])  # one start per 0.5 s
    assert [lim.reserve() for _ in range(3)] == [0.0, 0.5, 1.0]
    now[0] = 110.0
    assert lim.reserve() == 0.0
    assert RateLimiter(None).reserve() == 0.0


def test_identical_requests_in_a_batch_are_separate_samples():
    p = make_provider("t", ProviderConfig(kind="openai", model="m"), None)
    keys = p.batch_keys([req(1), req(2), req(1), req(1)])
    assert len(set(keys)) == 4
    assert keys[0] == p.request_key(req(1)) and keys[1] == p.request_key(req(2))
    assert p.batch_keys([req(1), req(1)]) == keys[0:1] + keys[2:3]  # stable across runs
    assert p.request_key(req(1, temperature=0.1)) != keys[0]
    assert p.request_key(req(1, schema=Verdict)) != keys[0]
    assert p.request_key(req(1, key="caller-id")) == keys[0]  # the caller's id is not in the key


def test_get_provider_reuses_instances_and_reads_keys_from_env(tmp_root, monkeypatch):
    cfg = load_config(profile="demo", root=tmp_root, overrides=[
        "llm.providers.api.kind=openai", "llm.providers.api.model=gpt-x",
        "llm.providers.api.api_key_env=FINSYNTH_TEST_KEY"])
    monkeypatch.delenv("FINSYNTH_TEST_KEY", raising=False)
    with pytest.raises(MissingKeyError, match="FINSYNTH_TEST_KEY is not set"):
        get_provider(cfg, "api")
    monkeypatch.setenv("FINSYNTH_TEST_KEY", FAKE_KEY)
    a = get_provider(cfg, "api")
    assert a is get_provider(cfg, "api") and a.model == "gpt-x"
    assert FAKE_KEY not in repr(a)
    assert get_provider(cfg, "local").model == "packaged:gemma3-270m"
    with pytest.raises(ValueError, match="no provider named 'nope'"):
        get_provider(cfg, "nope")


# ----------------------------------------------------------------------------- openai on the echo endpoint
def test_openai_batch_order_cache_and_key_never_stored(tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("FINSYNTH_TEST_KEY", FAKE_KEY)
    caplog.set_level(logging.DEBUG)
    with FaultProxy() as proxy:
        p = openai_provider(tmp_path, proxy.url, api_key_env="FINSYNTH_TEST_KEY", concurrency=4)
        reqs = [req(i) for i in range(12)]
        out = p.generate_batch(reqs, desc="echo")
        assert [r.text for r in out] == [f"echo {i}" for i in range(12)]
        assert all(r.ok and not r.cached and r.attempts == 1 for r in out)
        assert out[0].usage == {"prompt_tokens": 7, "completion_tokens": 3}
        assert p.usage.as_dict() == {"calls": 12, "requests": 12, "cache_hits": 0, "retries": 0, "failures": 0,
                                     "schema_retries": 0, "prompt_tokens": 84, "completion_tokens": 36}
        assert set(proxy.auth) == {f"Bearer {FAKE_KEY}"}  # the key did reach the server
        before = p.usage.as_dict()
        again = p.generate_batch(reqs + [req(99)], desc="echo")
        assert proxy.received == {**{str(i): 1 for i in range(12)}, "99": 1}  # only the new one was sent
        assert [r.cached for r in again] == [True] * 12 + [False]
        assert [r.text for r in again] == [f"echo {i}" for i in range(12)] + ["echo 99"]
        now = p.usage.as_dict()
        assert {k: now[k] - before[k] for k in now} == {
            "calls": 1, "requests": 1, "cache_hits": 12, "retries": 0, "failures": 0, "schema_retries": 0,
            "prompt_tokens": 7, "completion_tokens": 3}
    blobs = b"".join(f.read_bytes() for f in tmp_path.glob("cache.sqlite*"))
    assert b"echo 99" in blobs or len(open_cache(tmp_path / "cache.sqlite")) == 13
    assert FAKE_KEY.encode() not in blobs
    captured = capfd.readouterr()
    assert FAKE_KEY not in caplog.text + captured.out + captured.err
    assert "127.0.0.1" in caplog.text  # the HTTP client did log at DEBUG: the check had something to see


def test_a_key_claimed_by_a_live_run_is_waited_for_and_a_dead_runs_claim_is_taken_over(tmp_path):
    """Two runs sharing one response cache: what the other (live) run is asking right now is not asked
    twice; a claim left by a process that died is taken over at once."""
    import subprocess
    import sys
    import threading
    import time

    with FaultProxy() as proxy:
        p = openai_provider(tmp_path, proxy.url, concurrency=4)
        cache = p.cache
        keys = p.batch_keys([req(i) for i in range(4)])
        mine, theirs = cache.claim_many(keys[:2], "other-run")  # a live run (this pid) is asking 0 and 1
        assert mine == keys[:2] and theirs == []
        # a run that claims key 2 and dies without releasing it
        subprocess.run([sys.executable, "-c", "from datagen.llm.cache import ResponseCache; "
                        f"ResponseCache({str(cache.path)!r}).claim_many([{keys[2]!r}], 'dead-run')"], check=True)

        def other_run_answers():  # the other run's answers land 0.7 s later
            time.sleep(0.7)
            for k, i in zip(keys[:2], (0, 1)):
                cache.put(k, provider="openai", model="fake", text=f"theirs {i}")
            cache.release(keys[:2], "other-run")

        t = threading.Thread(target=other_run_answers)
        t.start()
        out = p.generate_batch([req(i) for i in range(4)], desc="shared")
        t.join()
        assert [r.text for r in out] == ["theirs 0", "theirs 1", "echo 2", "echo 3"]
        assert [r.cached for r in out] == [True, True, False, False]
        assert proxy.received == {"2": 1, "3": 1}  # 0 and 1 were not paid for twice; 2's dead claim was taken
        assert p.usage.calls == 2 and p.usage.cache_hits == 2
        assert cache.claim_many(keys, "third-run") == (keys, [])  # our claims were released at the end


def test_openai_schema_feedback_then_success_and_final_failure(tmp_path):
    def responder(body, tag):
        turns = len(body["messages"])
        if tag == "1":  # invalid, then valid once the error was shown
            return '{"label": "up", "score": 7}' if turns > 2 else '{"label": "up", "score": "high"}'
        if tag == "2":
            return "sorry, no JSON today"
        return '```json\n{"label": "flat", "score": 1}\n```'

    with FaultProxy(responder=responder) as proxy:
        p = openai_provider(tmp_path, proxy.url, schema_retries=2, json_mode="json_object")
        out = p.generate_batch([req(i, schema=Verdict) for i in (0, 1, 2)])
        assert out[0].ok and out[0].parsed == Verdict(label="flat", score=1) and out[0].attempts == 1
        assert out[1].ok and out[1].parsed == Verdict(label="up", score=7) and out[1].attempts == 2
        assert not out[2].ok and out[2].text == "sorry, no JSON today" and out[2].attempts == 3
        assert out[2].error == "schema_invalid: invalid JSON: Expecting value at char 0"
        assert proxy.received == {"0": 1, "1": 2, "2": 3}
        assert p.usage.schema_retries == 3 and p.usage.failures == 1 and p.usage.calls == 6
        # the model was shown its answer and the validation error
        retry_msgs = proxy.bodies["1"][1]["messages"]
        assert retry_msgs[:2] == proxy.bodies["1"][0]["messages"]
        assert retry_msgs[2] == {"role": "assistant", "content": '{"label": "up", "score": "high"}'}
        assert retry_msgs[3]["role"] == "user" and "score: Input should be a valid integer" in retry_msgs[3]["content"]
        # the failure was not cached (asked again), the two successes were
        out2 = p.generate_batch([req(i, schema=Verdict) for i in (0, 1, 2)])
        assert [r.cached for r in out2] == [True, True, False]
        assert out2[1].parsed == Verdict(label="up", score=7)
        assert proxy.received == {"0": 1, "1": 2, "2": 6}


@pytest.mark.slow  # ~5 s: Retry-After and timeouts are real waits
def test_openai_faults_every_item_accounted_once(tmp_path):
    n = 60
    rates = {"429": 0.12, "500": 0.1, "hang": 0.04, "truncate": 0.06, "garbage": 0.06}
    with FaultProxy(rates=rates, always={"7": "500", "13": "400"}, seed=1, hang_s=5.0) as proxy:
        p = openai_provider(tmp_path, proxy.url, concurrency=8, max_retries=4, timeout_s=2.0,
                            backoff_base_s=0.02, backoff_max_s=0.2)
        out = p.generate_batch([req(i) for i in range(n)], desc="faults")
        assert len(out) == n
        for i, r in enumerate(out):
            if r.ok:
                assert r.text == f"echo {i}" and r.text in proxy.delivered[str(i)]
            else:
                assert r.error and r.text is None
        assert not out[7].ok and out[7].error.startswith("http_500") and "gave up after 5 attempts" in out[7].error
        assert not out[13].ok and out[13].error.startswith("http_400") and proxy.received["13"] == 1
        assert sum(r.ok for r in out) >= n - 6
        # nothing lost, nothing duplicated: every request the server saw is one of its item's attempts
        # (an attempt that timed out before the server read it is counted by us only)
        assert all(proxy.received[str(i)] <= r.attempts for i, r in enumerate(out))
        assert sum(r.attempts for r in out) == p.usage.calls >= proxy.total_received
        assert p.usage.retries == p.usage.calls - n
        assert p.usage.failures == sum(not r.ok for r in out)
        assert min(proxy.faults[k] for k in ("429", "500", "hang", "truncate", "garbage")) >= 1
        # Retry-After honoured: the request after a 429 came >= 1 s later
        for times in proxy.times.values():
            for (t0, f0), (t1, _) in zip(times, times[1:]):
                if f0 == "429":
                    assert t1 - t0 >= 1.0
        failed = [i for i, r in enumerate(out) if not r.ok]
        proxy.rates, proxy.always = {}, {}
        seen = proxy.received.copy()
        out2 = p.generate_batch([req(i) for i in range(n)], desc="rerun")
        assert all(r.ok for r in out2)
        assert proxy.received - seen == {str(i): 1 for i in failed}  # only the failures were asked again


# ----------------------------------------------------------------------------- gemini on the wire-format fake
def gemini_provider(tmp_path, url: str, **kw):
    pcfg = ProviderConfig(kind="gemini", model="gemini-2.5-flash", base_url=url,
                          api_key_env="FINSYNTH_TEST_KEY", backoff_base_s=0.01, **kw)
    return make_provider("g", pcfg, open_cache(tmp_path / "cache.sqlite"))


def test_gemini_plain_and_structured(tmp_path, monkeypatch):
    monkeypatch.setenv("FINSYNTH_TEST_KEY", FAKE_KEY)

    def script(model, body, n):
        if "responseSchema" in body.get("generationConfig", {}) or "responseJsonSchema" in body.get(
                "generationConfig", {}):
            return 200, GeminiFake.answer(json.dumps({"label": f"L{item_tag(body)}", "score": n})), {}
        return 200, GeminiFake.answer(f"gemini says {item_tag(body)}"), {}

    with GeminiFake(script) as fake:
        p = gemini_provider(tmp_path, fake.url)
        out = p.generate_batch([req(1, temperature=0.2, max_tokens=7, seed=5, stop=("END",)), req(2),
                                req(3, schema=Verdict)])
        assert [r.text for r in out[:2]] == ["gemini says 1", "gemini says 2"]
        assert out[2].parsed == Verdict(label="L3", score=1)
        assert out[0].usage == {"prompt_tokens": 11, "completion_tokens": 5}
        assert p.usage.prompt_tokens == 33 and p.usage.calls == 3
        first = next(r for r in fake.requests if item_tag(r["body"]) == "1")
        # the SDK's default API version (v1 in google-genai 3.x, v1beta before)
        assert first["path"] in ("/v1/models/gemini-2.5-flash:generateContent",
                                 "/v1beta/models/gemini-2.5-flash:generateContent")
        assert first["api_key"] == FAKE_KEY
        assert first["body"]["contents"] == [{"role": "user", "parts": [{"text": "[item 1] Say something."}]}]
        assert first["body"]["systemInstruction"]["parts"] == [{"text": "Be brief."}]
        gc = first["body"]["generationConfig"]
        assert (gc["temperature"], gc["maxOutputTokens"], gc["seed"], gc["stopSequences"]) == (0.2, 7, 5, ["END"])
        third = next(r for r in fake.requests if item_tag(r["body"]) == "3")
        assert third["body"]["generationConfig"]["responseMimeType"] == "application/json"
    assert FAKE_KEY.encode() not in b"".join(f.read_bytes() for f in tmp_path.glob("cache.sqlite*"))


def test_gemini_429_then_success_and_400_not_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("FINSYNTH_TEST_KEY", FAKE_KEY)

    def script(model, body, n):
        tag = item_tag(body)
        if tag == "1" and n == 1:
            return 429, GeminiFake.error(429, "RESOURCE_EXHAUSTED", "quota"), {"retry-after": "1"}
        if tag == "2":
            return 400, GeminiFake.error(400, "INVALID_ARGUMENT", "bad field"), {}
        if tag == "3" and n <= 2:
            return 503, GeminiFake.error(503, "UNAVAILABLE", "overloaded"), {}
        return 200, GeminiFake.answer(f"ok {tag} after {n}"), {}

    with GeminiFake(script) as fake:
        p = gemini_provider(tmp_path, fake.url)
        out = p.generate_batch([req(1), req(2), req(3)])
        assert out[0].ok and out[0].text == "ok 1 after 2" and out[0].attempts == 2
        assert not out[1].ok and out[1].attempts == 1 and fake.per_tag["2"] == 1
        assert out[1].error.startswith("http_400: INVALID_ARGUMENT") and "bad field" in out[1].error
        assert out[2].ok and out[2].text == "ok 3 after 3"
        assert p.usage.as_dict() == {"calls": 6, "requests": 3, "cache_hits": 0, "retries": 3, "failures": 1,
                                     "schema_retries": 0, "prompt_tokens": 22, "completion_tokens": 10}


# ----------------------------------------------------------------------------- local provider's rounds (fake model)
def test_local_rounds_schema_feedback_and_chunking(tmp_path, monkeypatch):
    import threading

    import datagen.llm.local as local

    calls = []

    def fake_generate(self, model, tok, chunk):
        calls.append([(it.i, len(it.conv)) for it in chunk])
        outs = []
        for it in chunk:
            tag = item_tag({"messages": it.conv})
            if tag == "2" and len(it.conv) == 2:  # invalid first, valid after seeing the error
                outs.append(('{"label": "x"}', 4, 3))
            elif tag == "3":
                outs.append(("never JSON", 4, 2))
            else:
                outs.append((f'{{"label": "L{tag}", "score": {len(it.conv)}}}', 4, 5))
        return outs

    monkeypatch.setattr(local, "load_local_model", lambda path, device: (None, None, threading.Lock()))
    monkeypatch.setattr(local.LocalProvider, "_generate", fake_generate)
    p = make_provider("l", ProviderConfig(kind="local", batch_size=2, schema_retries=1),
                      open_cache(tmp_path / "c.sqlite"))
    out = p.generate_batch([req(i, schema=Verdict) for i in range(5)])
    assert [r.ok for r in out] == [True, True, True, False, True]
    assert out[2].parsed == Verdict(label="L2", score=4) and out[2].attempts == 2
    assert out[3].error.startswith("schema_invalid: ") and out[3].text == "never JSON" and out[3].attempts == 2
    assert [len(c) for c in calls] == [2, 2, 1, 2]  # 5 items in chunks of 2, then the 2 retries together
    assert sorted(i for c in calls[3:] for i, n in c) == [2, 3] and all(n == 4 for c in calls[3:] for _, n in c)
    assert p.usage.as_dict() == {"calls": 7, "requests": 5, "cache_hits": 0, "retries": 0, "failures": 1,
                                 "schema_retries": 2, "prompt_tokens": 28, "completion_tokens": 27}


def test_key_from_prefect_secret_block(monkeypatch):
    from prefect.blocks.system import Secret

    from datagen.llm.keys import resolve_api_key

    loaded = []

    def fake_load(name, *a, **kw):
        loaded.append(name)
        if name != "openai-key":
            raise ValueError("no such block")
        return Secret(value=FAKE_KEY)

    monkeypatch.setattr(Secret, "load", fake_load)
    monkeypatch.delenv("FINSYNTH_TEST_KEY", raising=False)
    cfg = ProviderConfig(kind="openai", model="m", api_key_env="FINSYNTH_TEST_KEY",
                         api_key_secret_block="openai-key")
    assert resolve_api_key("api", cfg) == FAKE_KEY  # env var unset: falls back to the block
    monkeypatch.setenv("FINSYNTH_TEST_KEY", "sk-from-env")
    assert resolve_api_key("api", cfg) == "sk-from-env" and loaded == ["openai-key"]
    with pytest.raises(MissingKeyError, match="cannot load Prefect Secret block 'missing'") as e:
        resolve_api_key("api", ProviderConfig(kind="openai", model="m", api_key_secret_block="missing"))
    assert e.value.__cause__ is None
    assert resolve_api_key("api", ProviderConfig(kind="openai", model="m")) is None


def test_malformed_request_is_a_failed_item_not_an_exception(tmp_path):
    with FaultProxy() as proxy:
        p = openai_provider(tmp_path, proxy.url)
        bad = ChatRequest(messages=[{"role": "user"}])  # no content
        out = p.generate_batch([req(0), bad, req(2)])
    assert [r.ok for r in out] == [True, False, True] and [out[0].text, out[2].text] == ["echo 0", "echo 2"]
    assert out[1].error == "bad_request: KeyError: 'content'"
    assert p.usage.failures == 1 and p.usage.calls == 2 and proxy.total_received == 2


def test_each_fault_gets_its_reason(tmp_path):
    always = {"1": "garbage", "2": "html", "3": "truncate", "4": "hang", "5": "429", "6": "500", "7": "400"}
    with FaultProxy(always=always, hang_s=3.0, retry_after="0") as proxy:
        p = openai_provider(tmp_path, proxy.url, max_retries=0, timeout_s=1.0)
        out = p.generate_batch([req(i) for i in range(1, 8)])
    errors = [r.error for r in out]
    assert errors[0].startswith("bad_response: UnicodeDecodeError")
    assert errors[1] == ("bad_response: JSONDecodeError: Expecting value: line 1 column 1 (char 0) "
                         "(gave up after 1 attempts)")
    assert errors[2] == "connection: Connection error. (RemoteProtocolError) (gave up after 1 attempts)"
    assert errors[3] == "timeout: no answer within 1s (gave up after 1 attempts)"
    assert errors[4].startswith("http_429: ") and errors[5].startswith("http_500: ")
    assert errors[6] == 'http_400: {"message": "bad request", "type": "invalid_request_error"}'
    assert all(not r.ok and r.attempts == 1 for r in out) and p.usage.failures == 7


def test_llamacpp_server_with_a_missing_gguf_names_the_field_and_the_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ValueError, match=rf"llm\.providers\.fast\.model_path: {missing} is not a GGUF file"):
        make_provider("fast", ProviderConfig(kind="llamacpp_server", model_path=str(missing)), None)
