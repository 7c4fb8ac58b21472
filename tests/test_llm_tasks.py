"""The one LLM task driver (datagen.llm.tasks) against the OpenAI wire protocol on 127.0.0.1:
rounds, the temperature schedule, seeds per (item, attempt), rejection records and reasons, best-of-n,
the review hook, and a rerun answered from the response cache."""

from __future__ import annotations

import hashlib
import json

from llm_fakes import FaultProxy, echo_completion, item_tag

from datagen.config import ProviderConfig
from datagen.llm import make_provider, open_cache
from datagen.llm.tasks import Kept, Reject, Task, llm_error, run_task, seed_of, temperature_at


def provider(tmp_path, url: str):
    return make_provider("t", ProviderConfig(kind="openai", model="fake", base_url=url + "/v1"),
                         open_cache(tmp_path / "cache.sqlite"))


def ask(i, attempt):
    return [{"role": "user", "content": f"[item {i}] Say it."}]


def good_or_not(result, item):
    if not result.ok:
        return llm_error(result)
    return {"text": result.text} if result.text.startswith("good") else Reject("not_good", result.text)


def test_seed_and_temperature_schedule():
    assert seed_of("a", 1, 0) == int(hashlib.sha256(b"a|1|0").hexdigest()[:8], 16)
    assert len({seed_of("a", s, a) for s in (1, 2) for a in (0, 1)}) == 4
    assert [temperature_at(0.7, a, 0.2, 1.2) for a in range(4)] == [0.7, 0.9, 1.1, 1.2]
    assert temperature_at(0.0, 3) == 0.0


def test_retries_hotter_with_a_seed_per_item_and_attempt_and_record_every_reason(tmp_path):
    def respond(body, tag):  # item 1 answers well only once sampled hot enough
        return "good" if tag == "0" or body["temperature"] >= 0.75 else "bad"

    task = Task(name="t", format_input=ask, format_output=good_or_not, temperature=0.5, heat=0.25,
                max_temperature=0.9, seed_by=lambda i: ("item", i), max_tokens=lambda i: 16 * (i + 1),
                key=lambda i, a, open_: f"{i}@{a}", record=lambda i, pos, a: {"item": i, "pos": pos})
    with FaultProxy(responder=respond, always={"2": "400"}) as proxy:  # item 2: a client error, every time
        run = run_task(provider(tmp_path, proxy.url), [0, 1, 2], task, max_attempts=3)
        sent = {tag: [(b["temperature"], b["seed"], b["max_tokens"]) for b in bodies]
                for tag, bodies in proxy.bodies.items()}
        assert sent == {"0": [(0.5, seed_of("item", 0, 0), 16)],
                        "1": [(0.5, seed_of("item", 1, 0), 32), (0.75, seed_of("item", 1, 1), 32)],
                        "2": [(0.5, seed_of("item", 2, 0), 48), (0.75, seed_of("item", 2, 1), 48),
                              (0.9, seed_of("item", 2, 2), 48)]}
        assert run.outputs == [[Kept(0, {"text": "good"})], [Kept(1, {"text": "good"})], []]
        assert (run.requests, run.rounds, run.answers, run.surplus) == (6, 3, 6, 0)
        assert [(r["item"], r["pos"], r["attempt"], r["text"], r["reason"], r["final"]) for r in run.rejections] == [
            (1, 0, 0, "bad", "not_good", False), (2, 0, 0, None, "llm_error", False),
            (2, 0, 1, None, "llm_error", False), (2, 0, 2, None, "llm_error", True)]
        assert run.rejections[0] == {"item": 1, "pos": 0, "attempt": 0, "text": "bad", "candidate": None,
                                     "reason": "not_good", "detail": "bad", "cosine": None, "final": False}
        assert all(r["detail"].startswith("http_400") and len(r["detail"]) <= 200 for r in run.rejections[1:])
        assert run.rejected == {"not_good": 1, "llm_error": 3} and run.missing == {"llm_error": 1}

        # a rerun sends the same requests: the finished ones come from the cache, only failures go out again
        before = dict(proxy.received)
        again = run_task(provider(tmp_path, proxy.url), [0, 1, 2], task, max_attempts=3)
        assert dict(proxy.received) == {**before, "2": before["2"] + 3}
        assert again.outputs == run.outputs and again.rejections == run.rejections


class Choices(FaultProxy):
    """The echo endpoint, answering each request of an item with its next scripted list of choices."""

    def __init__(self, script: dict[str, list[list[str]]]):
        super().__init__()
        self.script = {tag: list(replies) for tag, replies in script.items()}

    def _upstream(self, raw: bytes, body: dict) -> tuple[int, bytes]:
        texts = self.script[item_tag(body)].pop(0)
        reply = echo_completion(body, texts[0])
        reply["choices"] = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                            for i, t in enumerate(texts)]
        return 200, json.dumps(reply).encode()


def test_best_of_n_fills_several_outputs_with_a_review_of_the_round(tmp_path):
    server = Choices({"0": [["good a"], ["good a", "good b"]],  # 1 of 4 asked; then a repeat and a new one
                      "1": [["good c", "good dd"]]})  # two valid: the review keeps the longer

    def review(turns):  # no repeats of an item's kept outputs; the longest first
        for t in turns:
            for a in t.answers:
                if not isinstance(a.value, Reject) and a.text in seen.get(t.index, ()):
                    a.value = Reject("duplicate", candidate=a.text)
            ok = [j for j, a in enumerate(t.answers) if not isinstance(a.value, Reject)]
            t.keep = sorted(ok, key=lambda j: -len(t.answers[j].text))[:t.want]
            seen.setdefault(t.index, set()).update(t.answers[j].text for j in t.keep)

    seen: dict[int, set[str]] = {}
    task = Task(name="t", format_input=ask, format_output=good_or_not, temperature=0.7, seed_by=lambda i: (i,),
                wanted=lambda i: 2 - i, candidates=2, record=lambda i, pos, a: {"item": i, "pos": pos},
                review=review)
    with server:
        run = run_task(provider(tmp_path, server.url), [0, 1], task, max_attempts=3)
        assert {tag: [b["n"] for b in bodies] for tag, bodies in server.bodies.items()} == {"0": [4, 2], "1": [2]}
    assert run.outputs == [[Kept(0, {"text": "good a"}), Kept(1, {"text": "good b"})], [Kept(0, {"text": "good dd"})]]
    assert [(r["item"], r["pos"], r["attempt"], r["candidate"], r["reason"], r["detail"], r["final"])
            for r in run.rejections] == [
        (0, 1, 0, None, "empty_output", "1 of 4 candidates returned", False),  # the server sent fewer
        (0, 1, 1, "good a", "duplicate", "", False)]
    assert (run.requests, run.rounds, run.answers, run.surplus) == (3, 2, 5, 1) and run.missing == {}


def test_no_items_no_call_and_a_parser_that_never_rejects_gives_one_output_each(tmp_path):
    task = Task(name="judge", format_input=ask, format_output=lambda r, i: r.text, seed=3, max_tokens=8)
    with FaultProxy() as proxy:
        p = provider(tmp_path, proxy.url)
        assert run_task(p, [], task).outputs == [] and proxy.total_received == 0
        run = run_task(p, [5, 6], task, max_attempts=4)
        assert run.outputs == [[Kept(0, "echo 5")], [Kept(0, "echo 6")]] and run.rounds == 1
        assert [(b["seed"], b["temperature"], b["max_tokens"]) for b in proxy.bodies["5"]] == [(3, 0.0, 8)]
