"""The LLM judge: prompt rendering, parsing clean/noisy/malformed output, pairwise order, self-check numbers."""

from __future__ import annotations

import json

import pytest

from datagen.llm.base import FunctionProvider, LLMResult
from datagen.prompts import load_prompt
from training.judge import (
    JudgeItem,
    combine_orders,
    format_judge_input,
    format_judge_output,
    format_pairwise_output,
    judge_answers,
    judge_pairwise,
    reliability,
    selfcheck,
    selfcheck_cases,
)

ITEM = JudgeItem(question="What was ACME's 10-day return?", reference="ACME returned -3.2% over 10 days.",
                 answer="-3.2%", context="| Date | Close |\n|---|---|\n| 2024-01-02 | 101.2 |", key="q1")


def test_judge_prompt_renders_all_parts():
    prompt = load_prompt("judge_rubric")
    msgs = format_judge_input(ITEM, prompt)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    text = msgs[0]["content"]
    for part in (ITEM.question, ITEM.reference, "Answer to grade:\n-3.2%", "| 2024-01-02 | 101.2 |",
                 '{"score": <1-5>, "pass": <true|false>, "rationale": "<one sentence>"}'):
        assert part in text
    empty = format_judge_input(JudgeItem("q", "r", "  "), prompt)[0]["content"]
    assert "(empty answer)" in empty and "Context given" not in empty


@pytest.mark.parametrize("text, score, passed", [
    ('{"score": 5, "pass": true, "rationale": "matches"}', 1.0, True),
    ('Here is my grade:\n```json\n{"score": 4, "pass": true, "rationale": "ok"}\n```\nThanks', 0.75, True),
    ('Sure! {"score": "2", "pass": "false", "rationale": "wrong figure"} done.', 0.25, False),
    ('{"score": 3, "pass": true, "rationale": "judge says pass but scores 3"}', 0.5, False),
    ('{"score": 1, "pass": false}', 0.0, False),
])
def test_format_judge_output_parses_clean_and_noisy(text, score, passed):
    g = format_judge_output(LLMResult(ok=True, text=text), pass_score=4, judge_model="m")
    assert (g.score, g.passed, g.unparsable, g.grader) == (score, passed, False, "judge")
    assert g.detail["judge_model"] == "m"


@pytest.mark.parametrize("text", [
    "The answer is good, I'd give it a 5.",
    '{"score": 7, "pass": true, "rationale": "out of range"}',
    '{"score": 4, "rationale": "no pass field"}',
    '{"score": 4, "pass": true, "rationale": ',
    "",
])
def test_format_judge_output_malformed_is_unparsable_never_pass(text):
    g = format_judge_output(LLMResult(ok=False, text=text, error="schema validation failed"))
    assert (g.score, g.passed, g.unparsable) == (0.0, False, True)
    assert g.detail["error"]


def test_judge_answers_through_function_provider_records_prompt_and_model():
    seen = []

    def fn(messages):
        seen.append(messages[0]["content"])
        return '{"score": 5, "pass": true, "rationale": "ok"}' if "-3.2%" in messages[0]["content"] else "garbage"

    prov = FunctionProvider(fn, name="fake", model="scripted")
    grades = judge_answers(prov, [ITEM, JudgeItem("q", "r", "a")])
    assert [(g.passed, g.unparsable) for g in grades] == [(True, False), (False, True)]
    assert grades[0].detail["judge_model"] == "fake:scripted"
    assert grades[0].detail["judge_prompt"] == load_prompt("judge_rubric").ref
    assert prov.usage.calls == 2 and prov.usage.failures == 1
    assert len(seen) == 2


def test_pairwise_output_parsing_and_order_combination():
    assert format_pairwise_output(LLMResult(True, '{"winner": "B", "rationale": "x"}')) == "B"
    assert format_pairwise_output(LLMResult(True, 'I pick {"winner": "answer a"}')) == "A"
    assert format_pairwise_output(LLMResult(True, '{"winner": "Tie"}')) == "tie"
    assert format_pairwise_output(LLMResult(False, "B is better")) is None
    # first order: A=base, B=tuned; second order: A=tuned, B=base
    assert combine_orders("B", "A") == "tuned"
    assert combine_orders("A", "B") == "base"
    assert combine_orders("A", "A") == "tie"  # position bias: flips with the order
    assert combine_orders("tie", "tie") == "tie"
    assert combine_orders("B", None) == "unparsable"


def test_judge_pairwise_runs_both_orders():
    def fn(messages):  # prefers whichever answer contains the right figure, whatever its position
        text = messages[0]["content"]
        a = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
        return json.dumps({"winner": "A" if "-3.2%" in a else "B", "rationale": "figure"})

    out = judge_pairwise(FunctionProvider(fn), [ITEM], base=["+1%"], tuned=["-3.2%"])
    assert out == [{"key": "q1", "base_first": "B", "tuned_first": "A", "outcome": "tuned"}]
    biased = judge_pairwise(FunctionProvider(lambda m: '{"winner": "A"}'), [ITEM], base=["x"], tuned=["y"])
    assert biased[0]["outcome"] == "tie"


def _rows():
    rows = []
    for cat, answers in (("rates", ["-3.2%", "4.1%", "0.5%"]), ("credit", ["BBB", "A-"]), ("solo", ["x"])):
        for i, a in enumerate(answers):
            rows.append({"id": f"{cat}{i}", "category": cat, "question": f"Q {cat}{i}?", "answer": a,
                         "context": {"text": ""}})
    return rows


def test_selfcheck_cases_pair_same_category_mismatches():
    cases = selfcheck_cases(_rows(), n=10, seed=3)
    # "solo" has no other item: 5 eligible items, 2 cases each
    assert len(cases) == 10
    assert {c["id"] for c in cases} == {"rates0", "rates1", "rates2", "credit0", "credit1"}
    for c in cases:
        if c["kind"] == "reference":
            assert c["item"].answer == c["item"].reference
        else:
            assert c["mismatch_id"] != c["id"] and c["mismatch_id"].startswith(c["category"])
            assert c["item"].answer != c["item"].reference
    assert selfcheck_cases(_rows(), n=10, seed=3) == cases  # seeded
    assert len(selfcheck_cases(_rows(), n=2, seed=3)) == 4


def test_selfcheck_numbers_on_scripted_judges():
    def perfect(messages):
        t = messages[0]["content"]
        ref = t.split("Reference answer (correct):\n")[1].split("\n\nAnswer to grade:")[0]
        ans = t.split("Answer to grade:\n")[1].split("\n\nGrade the answer")[0]
        return json.dumps({"score": 5 if ans == ref else 1, "pass": ans == ref, "rationale": "."})

    good = selfcheck(FunctionProvider(perfect), _rows(), n=10, seed=0)
    assert (good["n_items"], good["n_cases"], good["accuracy"]) == (5, 10, 1.0)
    assert (good["reference_pass_rate"], good["mismatch_fail_rate"], good["unparsable"]) == (1.0, 1.0, 0)

    yes_man = selfcheck(FunctionProvider(lambda m: '{"score": 5, "pass": true, "rationale": "."}'),
                        _rows(), n=10, seed=0)
    assert (yes_man["accuracy"], yes_man["reference_pass_rate"], yes_man["mismatch_fail_rate"]) == (0.5, 1.0, 0.0)

    # garbage is never a pass, but it is never *correct* either, even where "fail" was expected
    garbage = selfcheck(FunctionProvider(lambda m: "no idea"), _rows(), n=10, seed=0)
    assert (garbage["accuracy"], garbage["unparsable"]) == (0.0, 10)


def test_reliability_flags():
    good = {"n_items": 10, "n_cases": 20, "accuracy": 0.9, "reference_pass_rate": 1.0,
            "mismatch_fail_rate": 0.8, "unparsable": 0}
    bad = {**good, "accuracy": 0.5, "mismatch_fail_rate": 0.0}
    k_ok = {"numeric grader": {"n": 8, "kappa": 0.6, "agreement": 0.8}}
    k_low = {"numeric grader": {"n": 8, "kappa": 0.1, "agreement": 0.5}}
    k_undef = {"numeric grader": {"n": 8, "kappa": None, "agreement": 1.0}}
    kw = {"min_accuracy": 0.8, "min_kappa": 0.4}
    assert reliability(good, k_ok, **kw)["reliable"] is True
    r = reliability(bad, k_ok, **kw)
    assert r["reliable"] is False and r["reasons"][0].startswith("self-check accuracy 0.50 < 0.80")
    r = reliability(good, k_low, **kw)
    assert r["reasons"] == ["kappa vs numeric grader 0.10 < 0.40 (n=8)"]
    r = reliability(good, k_undef, **kw)
    assert r["reliable"] is True and "undefined" in r["notes"][0]
    assert reliability(None, {}, **kw)["reliable"] is False
    small = reliability({**good, "n_items": 3, "n_cases": 6}, k_ok, **kw)
    assert small["reliable"] is True and small["notes"] == [
        "self-check ran on only 3 items: its accuracy is a rough estimate"]


# ----------------------------------------------------------------------------- the embedded judge, real model
@pytest.mark.slow
def test_embedded_judge_gives_a_verdict_for_every_item_with_the_packaged_model():
    """The local provider's judge (the packaged Gemma-3-270M base) scores the verdict options by
    log-likelihood: every rubric item and every pairwise order gets a verdict, none is unparsable (the demo of
    2026-12-07 had 6 of 6 unparsable generated verdicts)."""
    from datagen.config import ProviderConfig
    from datagen.llm import make_provider
    from training.judge import RUBRIC_OPTIONS, scores_verdicts

    judge = make_provider("judge", ProviderConfig(kind="local", model_path="packaged:gemma3-270m", device="cpu",
                                                  batch_size=4, schema_retries=0), None)
    assert scores_verdicts(judge)
    items = [ITEM, JudgeItem("What is 2 + 2?", "4", "5", key="q2"),
             JudgeItem("Which central bank sets euro rates?", "The ECB.", "", key="q3")]
    grades = judge_answers(judge, items, pass_score=4)
    assert [g.unparsable for g in grades] == [False] * 3
    for g in grades:
        assert g.detail["scoring"] == "loglik" and len(g.detail["loglik"]) == len(RUBRIC_OPTIONS)
        assert g.detail["judge_score"] in range(1, 6) and g.score == (g.detail["judge_score"] - 1) / 4
        assert g.passed == (g.detail["judge_score"] >= 4)
    assert judge.usage.calls == 3
    pairs = judge_pairwise(judge, items[:2], ["I do not know."] * 2, [it.reference for it in items[:2]])
    assert all(p["base_first"] in ("A", "B", "tie") and p["tuned_first"] in ("A", "B", "tie") for p in pairs)
    assert all(p["outcome"] != "unparsable" for p in pairs)
