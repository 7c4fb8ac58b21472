"""The LLM judge: reference-guided rubric grading, pairwise comparison, and the judge's self-check.

Split as distilabel does: ``format_*_input(...) -> messages`` and ``format_*_output(result) -> value``
are pure and tested on clean, noisy and malformed output; the ``judge_*`` functions only hand them to
:func:`~datagen.llm.tasks.run_task` (one round: the judge is not retried). The judge runs at temperature 0
with a JSON schema; output that still does not parse after the provider's schema retries is recorded as
*unparsable*: score 0, never a pass.

A provider that hands out its model (the ``local`` provider's ``loaded()``: the embedded Gemma-3-270M
base) does not generate a verdict at all: each allowed verdict is scored by log-likelihood as the start of
the judge's reply (``{"score": 1`` ... ``{"score": 5``; ``{"winner": "A`` / ``"B`` / ``"tie``), with
the function that scores classification labels in evaluation (:func:`training.generate.score_choices`),
and the most likely one is the verdict. It always parses; whether it is any good is what the self-check
measures. The options differ only in their last token, so one forward pass per item scores them all.
A server or API keeps its generated JSON under a schema (``response_format``, ``response_schema``).

The self-check (:func:`selfcheck`) asks the judge to grade each sampled item's *reference* answer
(it should pass) and the reference answer of *another item of the same category* (it should fail).
Its accuracy, plus Cohen's kappa against the programmatic numeric grader and, if given, against
human labels, decide whether the report may trust the judge (:func:`reliability`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from datagen.llm.base import LLMProvider, LLMResult, parse_structured
from datagen.llm.tasks import Task, TaskRun, run_task
from datagen.prompts import Prompt, load_prompt
from datagen.schema import render_context
from training.aggregate import cohen_kappa
from training.graders import Grade, _norm, pick_by_loglik

log = logging.getLogger(__name__)

RUBRIC_PROMPT = "judge_rubric"
PAIRWISE_PROMPT = "judge_pairwise"


class JudgeVerdict(BaseModel):
    """What the rubric prompt asks for: ``{"score": 1-5, "pass": bool, "rationale": str}``."""

    model_config = ConfigDict(populate_by_name=True)
    score: int = Field(ge=1, le=5)
    passed: bool = Field(alias="pass")
    rationale: str = ""


class PairwiseVerdict(BaseModel):
    winner: Literal["A", "B", "tie"]
    rationale: str = ""

    @field_validator("winner", mode="before")
    @classmethod
    def _winner(cls, v: Any) -> Any:
        if isinstance(v, str):
            s = v.strip().strip(".").lower().removeprefix("answer").strip()
            return {"a": "A", "b": "B", "tie": "tie", "draw": "tie", "equal": "tie"}.get(s, v)
        return v


@dataclass(frozen=True)
class JudgeItem:
    question: str
    reference: str
    answer: str
    context: str = ""
    key: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any], answer: str, key: str | None = None) -> JudgeItem:
        return cls(question=row["question"], reference=row["answer"], answer=answer,
                   context=render_context(row.get("context")), key=key)


# ----------------------------------------------------------------------------- rubric grading
def format_judge_input(item: JudgeItem, prompt: Prompt) -> list[dict[str, str]]:
    text = prompt.render(question=item.question, context=item.context, reference=item.reference,
                         answer=item.answer if item.answer.strip() else "(empty answer)")
    return [{"role": "user", "content": text}]


def format_judge_output(result: LLMResult, *, pass_score: int = 4, judge_model: str = "",
                        prompt_ref: dict[str, str] | None = None) -> Grade:
    """A provider result as a :class:`Grade`; unparsable output is a failed grade with its reason.

    score = (rubric score - 1) / 4; pass needs the judge's ``pass`` AND a score >= ``pass_score``
    (a judge that says "pass" with a 2 is not believed).
    """
    verdict = result.parsed if isinstance(result.parsed, JudgeVerdict) else None
    error = result.error
    if verdict is None and result.text:
        verdict, err = parse_structured(result.text, JudgeVerdict)
        error = error or err
    base = {"judge_model": judge_model, "judge_prompt": prompt_ref or {}, "attempts": result.attempts}
    if verdict is None:
        return Grade(score=0.0, passed=False, grader="judge", unparsable=True,
                     detail={**base, "error": error or "no output", "raw": (result.text or "")[:500]})
    return Grade(score=(verdict.score - 1) / 4, passed=bool(verdict.passed and verdict.score >= pass_score),
                 grader="judge",
                 detail={**base, "judge_score": verdict.score, "judge_pass": verdict.passed,
                         "rationale": verdict.rationale})


RUBRIC_OPTIONS = tuple(f'{{"score": {s}' for s in range(1, 6))  # the verdict's first field, scores 1-5
PAIRWISE_OPTIONS = {"A": '{"winner": "A', "B": '{"winner": "B', "tie": '{"winner": "tie'}


def scores_verdicts(provider: LLMProvider) -> bool:
    """Whether ``provider`` hands out its model (``loaded()``), so verdicts are scored, not generated."""
    return callable(getattr(provider, "loaded", None))


def score_options(provider: LLMProvider, conversations: Sequence[list[dict[str, str]]], options: Sequence[str],
                  *, desc: str = "judge") -> list[list[tuple[float, int]]]:
    """Per conversation, ``(sum log-probability, token count)`` of each of ``options`` as the start of the
    model's reply: :func:`training.generate.score_choices` (evaluation's label scoring) on the provider's
    model, under its lock. Counted in the provider's usage as one call per conversation."""
    from lm.causal_lm import render_prompt
    from training.generate import score_choices

    if not conversations:
        return []
    model, tok, lock = provider.loaded()  # type: ignore[attr-defined]
    prompts = [render_prompt(tok, conv) for conv in conversations]
    batch = getattr(getattr(provider, "cfg", None), "batch_size", 8) or 8
    with lock:
        scores = score_choices(model, tok, prompts, [list(options)] * len(prompts), batch_size=batch, desc=desc)
    n_prompt = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    provider.usage.add(calls=len(prompts), requests=len(prompts), prompt_tokens=n_prompt)
    log.debug("%s: %d verdicts scored by log-likelihood over %d options", desc, len(prompts), len(options))
    return [list(s) for s in scores]  # type: ignore[arg-type]


def format_judge_scores(scores: Sequence[tuple[float, int]], *, pass_score: int = 4, judge_model: str = "",
                        prompt_ref: dict[str, str] | None = None) -> Grade:
    """The rubric grade whose score option (:data:`RUBRIC_OPTIONS`, 1-5) the judge finds most likely;
    pass = that score >= ``pass_score`` (the prompt's own rule). Never unparsable."""
    score = pick_by_loglik(scores) + 1
    return Grade(score=(score - 1) / 4, passed=score >= pass_score, grader="judge",
                 detail={"judge_model": judge_model, "judge_prompt": prompt_ref or {}, "attempts": 1,
                         "judge_score": score, "judge_pass": score >= pass_score, "rationale": "",
                         "scoring": "loglik", "loglik": [round(float(x), 4) for x, _ in scores]})


def judge_answers(provider: LLMProvider, items: Sequence[JudgeItem], *, prompt: Prompt | None = None,
                  seed: int | None = None, max_tokens: int = 256, pass_score: int = 4,
                  desc: str = "judge") -> list[Grade]:
    """Rubric grades for ``items``, in order: scored verdicts where the provider hands out its model
    (:func:`scores_verdicts`), else generated at temperature 0 under the JSON schema."""
    prompt = prompt or load_prompt(RUBRIC_PROMPT)
    judge = f"{provider.name}:{provider.model}"
    if scores_verdicts(provider):
        scores = score_options(provider, [format_judge_input(it, prompt) for it in items], RUBRIC_OPTIONS, desc=desc)
        return [format_judge_scores(sc, pass_score=pass_score, judge_model=judge, prompt_ref=prompt.ref)
                for sc in scores]
    task = Task(name=desc, format_input=lambda it, _: format_judge_input(it, prompt),
                format_output=lambda r, _: format_judge_output(r, pass_score=pass_score, judge_model=judge,
                                                               prompt_ref=prompt.ref),
                schema=JudgeVerdict, seed=seed, max_tokens=max_tokens, key=lambda it, *_: it.key)
    return _one_each(run_task(provider, items, task))


def _one_each(run: TaskRun) -> list[Any]:
    """Each item's one output: the judge's parsers never reject (unparsable is a value)."""
    return [outs[0].value for outs in run.outputs]


# ----------------------------------------------------------------------------- pairwise
def format_pairwise_input(item: JudgeItem, answer_a: str, answer_b: str, prompt: Prompt) -> list[dict[str, str]]:
    text = prompt.render(question=item.question, context=item.context, reference=item.reference,
                         answer_a=answer_a or "(empty answer)", answer_b=answer_b or "(empty answer)")
    return [{"role": "user", "content": text}]


def format_pairwise_output(result: LLMResult) -> str | None:
    """"A" / "B" / "tie", or None when unparsable."""
    verdict = result.parsed if isinstance(result.parsed, PairwiseVerdict) else None
    if verdict is None and result.text:
        verdict, _ = parse_structured(result.text, PairwiseVerdict)
    return verdict.winner if verdict else None


def combine_orders(first: str | None, second: str | None) -> str:
    """Outcome for tuned vs base from both orders: (A=base, B=tuned) then (A=tuned, B=base).

    Agreement gives ``tuned`` / ``base`` / ``tie``; a verdict that flips with the order is a ``tie``;
    either order unparsable gives ``unparsable``.
    """
    if first is None or second is None:
        return "unparsable"
    map1 = {"A": "base", "B": "tuned", "tie": "tie"}
    map2 = {"A": "tuned", "B": "base", "tie": "tie"}
    a, b = map1[first], map2[second]
    return a if a == b else "tie"


def judge_pairwise(provider: LLMProvider, items: Sequence[JudgeItem], base: Sequence[str],
                   tuned: Sequence[str], *, prompt: Prompt | None = None, seed: int | None = None,
                   max_tokens: int = 192) -> list[dict[str, Any]]:
    """Each item judged twice (base first, then tuned first); see :func:`combine_orders`."""
    prompt = prompt or load_prompt(PAIRWISE_PROMPT)
    asks = [(it, a, b) for it, base_ans, tuned_ans in zip(items, base, tuned, strict=True)
            for a, b in ((base_ans, tuned_ans), (tuned_ans, base_ans))]  # both orders, one after the other
    if scores_verdicts(provider):
        names = list(PAIRWISE_OPTIONS)
        scores = score_options(provider, [format_pairwise_input(*ask, prompt) for ask in asks],
                               list(PAIRWISE_OPTIONS.values()), desc="pairwise")
        verdicts = [names[pick_by_loglik(sc)] for sc in scores]
        return _pairwise_outcomes(items, verdicts)
    task = Task(name="pairwise", format_input=lambda ask, _: format_pairwise_input(*ask, prompt),
                format_output=lambda r, _: format_pairwise_output(r), schema=PairwiseVerdict, seed=seed,
                max_tokens=max_tokens, key=lambda ask, *_: ask[0].key)
    return _pairwise_outcomes(items, _one_each(run_task(provider, asks, task)))


def _pairwise_outcomes(items: Sequence[JudgeItem], verdicts: Sequence[str | None]) -> list[dict[str, Any]]:
    out = []
    for i, it in enumerate(items):
        first, second = verdicts[2 * i], verdicts[2 * i + 1]
        out.append({"key": it.key, "base_first": first, "tuned_first": second,
                    "outcome": combine_orders(first, second)})
    return out


# ----------------------------------------------------------------------------- self-check
def selfcheck_cases(rows: Sequence[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """Up to ``n`` items, each with its own reference (expect pass) and a mismatched answer: the reference
    of another item of the same category whose answer differs (expect fail). Seeded, deterministic."""
    rng = random.Random(seed)
    rows = sorted(rows, key=lambda r: r["id"])
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    eligible = [(r, [o for o in by_cat[r["category"]] if _norm(o["answer"]) != _norm(r["answer"])])
                for r in rows]
    eligible = [(r, others) for r, others in eligible if others]
    picked = rng.sample(eligible, min(n, len(eligible)))
    picked.sort(key=lambda p: p[0]["id"])
    cases = []
    for r, others in picked:
        other = rng.choice(others)
        cases.append({"id": r["id"], "category": r["category"], "kind": "reference", "expect_pass": True,
                      "item": JudgeItem.from_row(r, r["answer"], key=f"selfcheck:{r['id']}:ref")})
        cases.append({"id": r["id"], "category": r["category"], "kind": "mismatch", "expect_pass": False,
                      "mismatch_id": other["id"],
                      "item": JudgeItem.from_row(r, other["answer"], key=f"selfcheck:{r['id']}:mis")})
    return cases


def score_selfcheck(cases: Sequence[dict[str, Any]], grades: Sequence[Grade]) -> dict[str, Any]:
    """Accuracy of the judge on self-check cases; an unparsable verdict is always counted wrong."""
    rows = []
    for c, g in zip(cases, grades, strict=True):
        correct = (not g.unparsable) and g.passed == c["expect_pass"]
        rows.append({"id": c["id"], "category": c["category"], "kind": c["kind"],
                     "mismatch_id": c.get("mismatch_id"), "expect_pass": c["expect_pass"],
                     "judge_pass": g.passed, "judge_score": g.detail.get("judge_score"),
                     "unparsable": g.unparsable, "correct": correct})
    ref = [r for r in rows if r["kind"] == "reference"]
    mis = [r for r in rows if r["kind"] == "mismatch"]
    n = len(rows)
    return {
        "n_items": len(ref), "n_cases": n,
        "accuracy": sum(r["correct"] for r in rows) / n if n else None,
        "reference_pass_rate": sum(r["correct"] for r in ref) / len(ref) if ref else None,
        "mismatch_fail_rate": sum(r["correct"] for r in mis) / len(mis) if mis else None,
        "unparsable": sum(r["unparsable"] for r in rows),
        "cases": rows,
    }


def selfcheck(provider: LLMProvider, rows: Sequence[dict[str, Any]], *, n: int, seed: int,
              prompt: Prompt | None = None, max_tokens: int = 256, pass_score: int = 4) -> dict[str, Any]:
    cases = selfcheck_cases(rows, n, seed)
    grades = judge_answers(provider, [c["item"] for c in cases], prompt=prompt, seed=seed,
                           max_tokens=max_tokens, pass_score=pass_score, desc="judge self-check")
    return score_selfcheck(cases, grades)


def agreement(judge_pass: Sequence[bool], other_pass: Sequence[bool]) -> dict[str, Any]:
    """Cohen's kappa and raw agreement of the judge's pass/fail against another rater."""
    n = len(judge_pass)
    return {"n": n, "kappa": cohen_kappa(list(judge_pass), list(other_pass)),
            "agreement": sum(a == b for a, b in zip(judge_pass, other_pass, strict=True)) / n if n else None}


def reliability(check: dict[str, Any] | None, kappas: dict[str, dict[str, Any]], *,
                min_accuracy: float, min_kappa: float) -> dict[str, Any]:
    """Whether the judge's scores may be trusted, with the reasons when not.

    Unreliable when it was not self-checked, when self-check accuracy < ``min_accuracy``, or when a
    defined kappa < ``min_kappa``. An undefined kappa (one rater constant) is noted, not failed.
    """
    reasons, notes = [], []
    if not check or not check.get("n_cases"):
        reasons.append("not self-checked (no items with a same-category mismatch)")
    elif check["accuracy"] < min_accuracy:
        reasons.append(f"self-check accuracy {check['accuracy']:.2f} < {min_accuracy:.2f} "
                       f"(passes references {check['reference_pass_rate']:.2f}, "
                       f"fails mismatches {check['mismatch_fail_rate']:.2f}, unparsable {check['unparsable']})")
    if check and 0 < check.get("n_items", 0) < 10:
        notes.append(f"self-check ran on only {check['n_items']} items: its accuracy is a rough estimate")
    for name, k in kappas.items():
        if not k.get("n"):
            continue
        if k["kappa"] is None:
            notes.append(f"kappa vs {name} undefined on {k['n']} items (one rater gave a single label)")
        elif k["kappa"] < min_kappa:
            reasons.append(f"kappa vs {name} {k['kappa']:.2f} < {min_kappa:.2f} (n={k['n']})")
    return {"reliable": not reasons, "reasons": reasons, "notes": notes,
            "thresholds": {"min_accuracy": min_accuracy, "min_kappa": min_kappa}}
