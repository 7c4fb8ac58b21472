"""One driver for every LLM step: ask, parse, retry, and say why anything was dropped.

A step describes itself as a :class:`Task`: ``format_input(item, attempt) -> messages`` and
``format_output(answer, item) -> value | Reject``, both pure (as in distilabel), plus its sampling
settings. :func:`run_task` does the rest. Each round it

1. sends one ``generate_batch`` with a request for every item that still wants outputs; attempt ``a``
   samples at :func:`temperature_at` and with seed :func:`seed_of` ``(*seed_by(item), a)``;
2. parses every answer (``n > 1`` requests have several: best-of-n) with ``format_output``;
3. lets the optional ``review`` hook judge the round's answers together (diversity, best-of-n picks);
4. keeps what passed and records every rejection, with its reason, in one record shape.

An item still short of outputs after ``max_attempts`` rounds is *missing*: its last rejection per
missing output is marked ``final``.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from pydantic import BaseModel

from datagen.llm.base import ChatRequest, LLMProvider, LLMResult, Message
from datagen.progress import progress_log


@dataclass(frozen=True)
class Reject:
    """Why an answer was not kept: a value, never an exception."""

    reason: str
    detail: str = ""
    candidate: str | None = None  # the parsed text, when there was one
    cosine: float | None = None  # its similarity to the source, when measured


def llm_error(result: LLMResult) -> Reject:
    """The rejection of a failed call."""
    return Reject("llm_error", str(result.error or "")[:200])


def resolve_prompt_format(prompt_format: str, provider: LLMProvider, setting: str) -> str:
    """``chat`` or ``base`` for ``prompt_format`` (``auto``: base, a few-shot document to continue, on the
    local provider, which runs a base model by default; chat on an API). Base sends raw text, which only
    the local provider takes: asking an API for it is an error naming ``setting``."""
    kind = getattr(provider, "kind", None)
    if prompt_format == "auto":
        return "base" if kind == "local" else "chat"
    if prompt_format == "base" and kind not in ("local", None):
        raise ValueError(f"{setting}=base sends raw text, which only the local provider takes; "
                         f"provider {provider.name!r} is {kind!r}: use {setting}=chat")
    return prompt_format


def temperature_at(start: float, attempt: int, step: float = 0.0, cap: float = math.inf) -> float:
    """Retries sample hotter, bounded: ``start + step * attempt``, at most ``cap``."""
    return round(min(start + step * attempt, cap), 3)


def seed_of(*parts: Any) -> int:
    """A stable 32-bit seed from ``parts`` (an item's identity and the attempt)."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


@dataclass(frozen=True)
class Task:
    """What one LLM step says; :func:`run_task` does the rest."""

    name: str  # progress-bar label
    format_input: Callable[[Any, int], list[Message]]  # (item, attempt) -> messages
    format_output: Callable[[LLMResult, Any], Any]  # (one answer, item) -> parsed value or Reject
    temperature: float = 0.0  # attempt 0; see temperature_at
    heat: float = 0.0  # added per retry
    max_temperature: float = math.inf
    seed: int | None = None  # every request's seed, unless seed_by is set
    seed_by: Callable[[Any], tuple] | None = None  # item -> identity; seed = seed_of(*identity, attempt)
    max_tokens: int | Callable[[Any], int] = 256
    stop: tuple[str, ...] = ()
    schema: type[BaseModel] | None = None
    wanted: Callable[[Any], int] = lambda item: 1  # outputs an item needs
    candidates: int = 1  # answers asked per output still wanted (best-of-n)
    # (item, attempt, open output positions) -> the request's label for logs (not in the cache key)
    key: Callable[[Any, int, list[int]], str | None] = lambda item, attempt, open_: None
    # (item, output position, attempt) -> the fields that say what a rejection was for
    record: Callable[[Any, int, int], dict[str, Any]] = lambda item, pos, attempt: {}
    review: Callable[[list[Turn]], None] | None = None  # judge a round's answers together (see Turn)

    def request(self, item: Any, attempt: int, open_: list[int]) -> ChatRequest:
        """The request for ``item``'s outputs at positions ``open_`` in round ``attempt``."""
        return ChatRequest(
            messages=tuple(self.format_input(item, attempt)), schema=self.schema,
            temperature=temperature_at(self.temperature, attempt, self.heat, self.max_temperature),
            max_tokens=self.max_tokens(item) if callable(self.max_tokens) else self.max_tokens,
            seed=seed_of(*self.seed_by(item), attempt) if self.seed_by else self.seed,
            stop=self.stop, n=len(open_) * self.candidates, key=self.key(item, attempt, open_))


@dataclass
class Answer:
    text: str | None
    value: Any  # format_output's value, or a Reject


@dataclass
class Turn:
    """One item's request in one round, as ``review`` sees it.

    ``review`` may replace an answer's value with a :class:`Reject` and may set ``keep``: the answers
    that fill the item's open outputs, in order (default: the accepted ones, in answer order).
    """

    index: int  # the item's position in ``items``
    item: Any
    attempt: int
    want: int  # outputs still wanted
    answers: list[Answer]
    keep: list[int] | None = None


class Kept(NamedTuple):
    attempt: int
    value: Any


@dataclass
class TaskRun:
    outputs: list[list[Kept]]  # per item, in output-position order
    rejections: list[dict[str, Any]] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)  # every rejection, by reason
    missing: Counter = field(default_factory=Counter)  # final reason of each missing output
    requests: int = 0
    rounds: int = 0
    answers: int = 0  # answers parsed (requests x candidates returned)
    surplus: int = 0  # accepted answers left over once their item was full


def run_task(provider: LLMProvider, items: Sequence[Any], task: Task, *, max_attempts: int = 1) -> TaskRun:
    """Up to ``max_attempts`` rounds of one ``generate_batch`` each; deterministic order throughout."""
    run = TaskRun(outputs=[[] for _ in items])
    wanted = [task.wanted(it) for it in items]
    last: dict[tuple[int, int], dict[str, Any]] = {}  # (item, position) -> its latest rejection
    for attempt in range(max_attempts):
        open_ = {i: list(range(len(run.outputs[i]), wanted[i])) for i in range(len(items))
                 if len(run.outputs[i]) < wanted[i]}
        if not open_:
            break
        reqs = [task.request(items[i], attempt, pos) for i, pos in open_.items()]
        desc = task.name if max_attempts == 1 else f"{task.name} attempt {attempt + 1}/{max_attempts}"
        results = provider.generate_batch(reqs, desc=desc)
        run.requests += len(reqs)
        run.rounds += 1
        turns = [Turn(i, items[i], attempt, len(pos), [Answer(r.text, task.format_output(r, items[i]))
                                                       for r in _split(res, len(pos))])
                 for (i, pos), res in zip(open_.items(), results)]
        if task.review:
            task.review(turns)
        for t, req in zip(turns, reqs):
            _settle(run, task, t, open_[t.index], req.n, last)
        filled = sum(min(len(o), w) for o, w in zip(run.outputs, wanted))
        progress_log.info("%s: round %d/%d: %d requests, %d of %d outputs kept so far", task.name, attempt + 1,
                          max_attempts, len(reqs), filled, sum(wanted))
    for i, outs in enumerate(run.outputs):
        for pos in range(len(outs), wanted[i]):
            if (rec := last.get((i, pos))) is not None:
                rec["final"] = True
                run.missing[rec["reason"]] += 1
    return run


def _split(result: LLMResult, want: int) -> list[LLMResult]:
    """One result per answer: each candidate of an ``n > 1`` reply; a failure once per wanted output."""
    if not result.ok:
        return [result] * want
    if not result.texts:
        return [result]
    return [replace(result, text=t, texts=[]) for t in result.texts]


def _settle(run: TaskRun, task: Task, turn: Turn, open_: list[int], n: int,
            last: dict[tuple[int, int], dict[str, Any]]) -> None:
    """Keep a turn's chosen answers and record its rejections against the outputs still open."""
    accepted = [j for j, a in enumerate(turn.answers) if not isinstance(a.value, Reject)]
    keep = accepted[:turn.want] if turn.keep is None else turn.keep
    assert len(keep) <= turn.want and set(keep) <= set(accepted), "review kept a rejected or surplus answer"
    run.outputs[turn.index].extend(Kept(turn.attempt, turn.answers[j].value) for j in keep)
    run.answers += len(turn.answers)
    run.surplus += len(accepted) - len(keep)
    unfilled = open_[len(keep):]
    rejected = [a for a in turn.answers if isinstance(a.value, Reject)]
    for j, a in enumerate(rejected):  # spread over the unfilled outputs (over all open ones if none)
        pos = unfilled[j % len(unfilled)] if unfilled else open_[j % len(open_)]
        rec = _record(run, task, turn, pos, a.text, a.value)
        if unfilled:
            last[(turn.index, pos)] = rec
    for pos in unfilled[len(rejected):]:  # a server that returned fewer candidates than asked
        if (turn.index, pos) not in last:
            why = Reject("empty_output", f"{len(turn.answers)} of {n} candidates returned")
            last[(turn.index, pos)] = _record(run, task, turn, pos, None, why)


def _record(run: TaskRun, task: Task, turn: Turn, pos: int, text: str | None, why: Reject) -> dict[str, Any]:
    """The one rejection record: what it was for (the task's ``record``), when, the text, and why."""
    rec = {**task.record(turn.item, pos, turn.attempt), "attempt": turn.attempt, "text": text,
           "candidate": why.candidate, "reason": why.reason, "detail": why.detail, "cosine": why.cosine,
           "final": False}
    run.rejections.append(rec)
    run.rejected[why.reason] += 1
    return rec
