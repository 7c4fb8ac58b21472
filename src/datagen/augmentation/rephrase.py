"""k validated rephrasings per question, with bounded retries.

Split as distilabel does: :func:`format_input` (row, attempt) -> chat messages and
:func:`format_output` (text, row) -> ``{"question": str | None, "error": str | None}``, both pure.
:func:`rephrase_rows` hands them to :func:`~datagen.llm.tasks.run_task` (one ``generate_batch`` per attempt
round over every item that still misses rephrasings); its ``review`` hook adds the embeddings for the
similarity band, the validators and the best-of-n picks.

Each item has ``k`` slots (``rephrase_index`` 1..k). With ``candidates=1`` each open slot is one request
and is filled by its candidate if it passes validation. With ``candidates=c > 1`` (best-of-n) an item
with ``m`` open slots is one request for ``m * c`` candidates (one prefill on the local provider, ``n``
on OpenAI-compatible servers); every candidate goes through every validator, and the valid ones fill
the slots most-different first (:func:`pick_distinct`). A slot still empty after ``max_attempts`` rounds
is *missing*, and its last rejection (marked ``final``) is the recorded reason. Every rejected candidate
is written out for audit.

Two prompt formats, both versioned under ``prompts/``: ``chat`` (few-shot chat turns: ``rephrase`` then
``rephrase_retry``) and ``base`` (``rephrase_base``: a plain few-shot document that a base model
continues, sent as raw text).

The source question is data, not instructions: it goes into a ``Question:`` field after the few-shot
turns, and whatever the model answers is validated like any other output, so a question that says
"ignore previous instructions" cannot change what is kept.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from datagen.augmentation.validators import RephraseChecks, check_near_copy, validate_rephrasing
from datagen.config import REPHRASE_MAX_TEMPERATURE, asset_dir
from datagen.embed import Embedder
from datagen.llm.base import LLMProvider, LLMResult, Message
from datagen.llm.tasks import Reject, Task, Turn, llm_error, resolve_prompt_format, run_task, temperature_at
from datagen.prompts import Prompt, load_prompt, split_turns
from datagen.schema import stable_id

log = logging.getLogger(__name__)

PROMPT_FIRST = "rephrase"
PROMPT_RETRY = "rephrase_retry"
PROMPT_BASE = "rephrase_base"
STOP = ("\n", "<end_of_turn>")
HEAT = 0.2  # each retry samples this much hotter, up to the cap the configuration enforces


# ----------------------------------------------------------------------------- pure parts
def prompt_for(attempt: int, prompt_format: str = "chat") -> Prompt:
    if prompt_format == "base":  # one document; retries differ by seed and temperature
        return load_prompt(PROMPT_BASE)
    return load_prompt(PROMPT_FIRST if attempt == 0 else PROMPT_RETRY)


def format_input(row: dict[str, Any], attempt: int = 0, prompt_format: str = "chat") -> list[Message]:
    """The messages asking for a rephrasing of ``row["question"]`` (attempt 0: first prompt).

    ``chat``: few-shot chat turns. ``base``: one ``{"role": "text"}`` message, the raw few-shot document
    ending in ``Paraphrase:`` for a base model to continue.
    """
    question = " ".join(str(row["question"]).split())  # one line: the model answers in one line
    rendered = prompt_for(attempt, prompt_format).render(question=question)
    if prompt_format == "base":
        return [{"role": "text", "content": rendered}]
    return split_turns(rendered)


_PREFIX = re.compile(
    r"^\s*(?:(?:rewritten|rephrased|paraphrased|reworded|new|revised)(?:\s+question)?|question|q|output|answer)"
    r"\s*[:\-–]\s*", re.I)
_LIST = re.compile(r"^\s*(?:[-*•]|\d{1,2}[.)])\s+")
_SPECIAL = re.compile(r"<(?:end_of_turn|start_of_turn|eos|bos|/s|s|pad)>|<\|[^|>]*\|>")
_QUOTES = "\"'“”‘’`"


def format_output(text: str | None, row: dict[str, Any]) -> dict[str, Any]:
    """Model text -> ``{"question": str, "error": None}`` or ``{"question": None, "error": reason}``.

    Robust to what small models do: special tokens, code fences, a "Rephrased:" label, list markers,
    quotes, bold, trailing chatter on the same line after the question mark, more lines after it.
    """
    if text is None or not text.strip():
        return {"question": None, "error": "empty_output"}
    t = _SPECIAL.sub("\n", text).replace("```", "\n")
    lines = [ln.strip() for ln in t.splitlines() if ln.strip()]
    for ln in lines:
        q = _LIST.sub("", ln).replace("**", "").strip()
        q = _PREFIX.sub("", q).strip().strip(_QUOTES).strip()
        if not q or re.fullmatch(r"(?:rewritten|rephrased|paraphrased)(?:\s+question)?:?", q, re.I):
            continue  # a bare label line: the question follows on the next line
        if "?" in q:  # keep the question, drop chatter after it ("...2024? prochains")
            q = q[: q.index("?") + 1]
        q = q.strip().strip(_QUOTES).strip()
        if len(q) < 8 or not re.search(r"[A-Za-z]{2}", q):
            return {"question": None, "error": "malformed_output"}
        return {"question": q, "error": None}
    return {"question": None, "error": "empty_output"}


def attempt_temperature(base: float, attempt: int) -> float:
    """Retries sample hotter (bounded): 0.7 -> 0.9 -> 1.1."""
    return temperature_at(base, attempt, HEAT, REPHRASE_MAX_TEMPERATURE)


def max_tokens_for(question: str, cap: int) -> int:
    """Enough new tokens for a rephrasing up to the length-ratio bound, in buckets of 16, at most ``cap``.

    A local model generates until it stops or hits the limit, and a small base model rarely stops on
    its own, so the limit is the cost. ~0.6 tokens per character covers digit-by-digit tokenizers.
    """
    need = int(0.6 * len(question)) + 8
    return max(16, min(cap, 16 * -(-need // 16)))


PRECISION_FILE = asset_dir("benchmarks") / "results" / "rephrase_precision.json"


def measured_precision(model: str | None, prompt_hash: str | None, path: Path = PRECISION_FILE) -> dict[str, Any]:
    """The precision of kept rephrasings measured on hand-labelled real outputs of ``model`` with the prompt
    of ``prompt_hash`` (``benchmarks/bench_rephrase_precision.py``), or ``{"measured": False}`` with why not:
    a figure measured on another model or prompt says nothing about this one."""
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"measured": False, "why": "no precision measurement found"}
    if res.get("model") != model or (res.get("prompt") or {}).get("hash") != prompt_hash:
        return {"measured": False, "why": f"measured for {res.get('model')} with prompt "
                                          f"{(res.get('prompt') or {}).get('hash')}, not this model and prompt"}
    h = res.get("headline") or {}
    return {"measured": True, "precision": h.get("precision"), "ci": h.get("ci"), "keep_rate": h.get("keep_rate"),
            "labelled_kept": h.get("kept"), "source": "benchmarks/results/rephrase_precision.json"}


def rephrase_id(row_id: str, slot: int) -> str:
    return stable_id(row_id, "rephrase", slot)


def make_rephrasing(row: dict[str, Any], question: str, slot: int, attempt: int, prompt: Prompt,
                    cosine: float | None) -> dict[str, Any]:
    """A rephrased copy of ``row``: same group, answer, context, labels; new id and question."""
    out = copy.deepcopy(row)
    meta = out.get("metadata") or {}
    if "prompt" in meta:
        meta["source_prompt"] = meta["prompt"]
    meta.update({"prompt": prompt.ref, "rephrase_of": row["id"], "rephrase_attempt": attempt})
    if cosine is not None:
        meta["rephrase_cosine"] = round(float(cosine), 4)
    out.update(id=rephrase_id(row["id"], slot), question=question, metadata=meta, is_rephrase=True,
               rephrase_index=slot)
    return out


# ----------------------------------------------------------------------------- the task
@dataclass
class RephraseResult:
    kept: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    slots: int = 0
    missing_reasons: Counter = field(default_factory=Counter)  # final reason per missing slot
    rejected_reasons: Counter = field(default_factory=Counter)  # every rejected candidate
    by_category: dict[str, dict[str, int]] = field(default_factory=dict)
    requests: int = 0
    rounds: int = 0
    candidates: int = 0  # candidate texts generated (requests x n)
    surplus: int = 0  # valid candidates left over once their row's slots were full
    prompts: dict[str, dict[str, str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (``dataclasses.asdict`` would turn a Counter's items into keys)."""
        return {f.name: dict(v) if isinstance(v := getattr(self, f.name), Counter) else v for f in fields(self)}


def merge_results(parts: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], k: int) -> RephraseResult:
    """One :class:`RephraseResult` from the results of :func:`rephrase_rows` over shards of ``rows`` (each
    as :meth:`RephraseResult.as_dict`): the same result as one call over all of ``rows``."""
    res = RephraseResult()
    for p in parts:
        res.kept += p["kept"]
        res.rejections += p["rejections"]
        res.missing_reasons.update(p["missing_reasons"])
        res.rejected_reasons.update(p["rejected_reasons"])
        res.prompts.update(p["prompts"])
        res.rounds = max(res.rounds, p["rounds"])
        for f in ("slots", "requests", "candidates", "surplus"):
            setattr(res, f, getattr(res, f) + p[f])
    _tally(res, rows, k)
    _sort(res)
    return res


def _sort(res: RephraseResult) -> None:
    res.kept.sort(key=lambda x: (x["group_id"], x["rephrase_index"], x["id"]))
    res.rejections.sort(key=lambda x: (x["group_id"], x["source_id"], x["rephrase_index"], x["attempt"]))


@dataclass(frozen=True)
class _Item:
    """A row and the slots one request asks for: one slot each (``candidates=1``), else all k."""

    row: dict[str, Any]
    slots: tuple[int, ...]


def pick_distinct(valid: Sequence[int], to_original: Sequence[float | None], pairwise: np.ndarray | None,
                  taken: Sequence[int], want: int) -> list[int]:
    """Up to ``want`` of the ``valid`` candidate indices, most different first: each pick minimises the
    largest cosine to the original and to what is already picked (``taken``: earlier kept ones, as
    indices into ``pairwise``, the candidates-and-kept cosine matrix). Ties keep candidate order."""
    picked: list[int] = []
    pool = list(valid)
    while pool and len(picked) < want:
        def score(i: int) -> float:
            others = [float(pairwise[i, j]) for j in (*taken, *picked)] if pairwise is not None else []
            return max([to_original[i] if to_original[i] is not None else 0.0, *others])

        best = min(pool, key=score)
        picked.append(best)
        pool.remove(best)
    return picked


def rephrase_rows(rows: Sequence[dict[str, Any]], provider: LLMProvider, embedder: Embedder | None, *,
                  k: int, max_attempts: int, temperature: float, max_tokens: int,
                  checks: RephraseChecks = RephraseChecks(), candidates: int = 1, prompt_format: str = "chat",
                  early_stop: bool = True) -> RephraseResult:
    """Fill k rephrasing slots per row; one batch per attempt round; deterministic order throughout.

    ``embedder`` None skips the similarity band (tests of other checks only). ``candidates`` > 1 asks
    for that many candidates per open slot in one request per row (best-of-n). ``early_stop`` False
    sends no stop strings (the model generates to ``max_tokens``; the answer is cut afterwards).
    """
    prompt_format = resolve_prompt_format(prompt_format, provider, "augment.prompt_format")
    prompts = [prompt_for(a, prompt_format) for a in range(max_attempts)]
    kept_text: dict[str, list[str]] = defaultdict(list)  # row id -> kept questions (for duplicates)
    best_of_n = candidates > 1

    def parse(result: LLMResult, item: _Item) -> dict[str, Any] | Reject:
        if not result.ok:
            return llm_error(result)
        p = format_output(result.text, item.row)
        return Reject(p["error"]) if p["error"] else {"question": p["question"], "cosine": None}

    def review(turns: list[Turn]) -> None:
        """Validate each candidate (similarity band, facts, duplicates) and fill the slots from the valid ones,
        most different first; one row at a time, so a kept one counts against the next request's."""
        questions = [[a.value["question"] if isinstance(a.value, dict) else None for a in t.answers] for t in turns]
        for t, qs, cs in zip(turns, questions, _cosines(embedder, turns, questions)):
            row, kept = t.item.row, kept_text[t.item.row["id"]]
            for a, q, cos in zip(t.answers, qs, cs):
                if q is not None:
                    v = validate_rephrasing(row, q, cosine=cos, kept=kept, checks=checks)
                    a.value = {"question": q, "cosine": cos} if v.ok else Reject(v.reason, v.detail, q, _r4(cos))
            pairwise = _pairwise(embedder, qs, kept) if best_of_n else None
            valid = [i for i, a in enumerate(t.answers) if not isinstance(a.value, Reject)]
            t.keep = []
            while valid and len(t.keep) < t.want:
                taken = range(len(qs), len(qs) + len(kept))  # the kept ones' rows of the matrix
                i = pick_distinct(valid, cs, pairwise, taken, 1)[0] if best_of_n else valid[0]
                valid.remove(i)
                dup = check_near_copy(str(row["question"]), qs[i], kept, checks.near_copy_char_ratio)
                if not dup.ok:  # a copy of one picked from this same request
                    t.answers[i].value = Reject(dup.reason, dup.detail, qs[i], _r4(cs[i]))
                    continue
                t.keep.append(i)
                kept.append(qs[i])
                if pairwise is not None:  # the new kept one is the last row/column of the matrix
                    pairwise = _pairwise(embedder, qs, kept)

    def record(item: _Item, pos: int, attempt: int) -> dict[str, Any]:
        return {"kind": "rephrase", "group_id": item.row["group_id"], "source_id": item.row["id"],
                "category": item.row.get("category"), "rephrase_index": item.slots[pos],
                "prompt": prompts[attempt].ref}

    task = Task(
        name="rephrase", format_input=lambda it, a: format_input(it.row, a, prompt_format), format_output=parse,
        temperature=temperature, heat=HEAT, max_temperature=REPHRASE_MAX_TEMPERATURE,
        seed_by=lambda it: (it.row["id"], 0 if best_of_n else it.slots[0]),
        max_tokens=lambda it: max_tokens_for(str(it.row["question"]), max_tokens), stop=STOP if early_stop else (),
        wanted=lambda it: len(it.slots), candidates=candidates,
        key=lambda it, a, open_: f"{it.row['id']}#{','.join(str(it.slots[p]) for p in open_)}@{a}",
        record=record, review=review)
    slots = [(s,) for s in range(1, k + 1)] if candidates == 1 else [tuple(range(1, k + 1))]
    items = [_Item(r, s) for r in rows for s in slots]
    run = run_task(provider, items, task, max_attempts=max_attempts)

    res = RephraseResult(slots=len(rows) * k, rejections=run.rejections, missing_reasons=run.missing,
                         rejected_reasons=run.rejected, requests=run.requests, rounds=run.rounds,
                         candidates=run.answers, surplus=run.surplus,
                         prompts={p.name: p.ref for p in prompts[:run.rounds]})
    for it, outs in zip(items, run.outputs):
        for pos, (attempt, value) in enumerate(outs):
            res.kept.append(make_rephrasing(it.row, value["question"], it.slots[pos], attempt, prompts[attempt],
                                            value["cosine"]))
    _tally(res, rows, k)
    _sort(res)
    return res


def _r4(cosine: float | None) -> float | None:
    return None if cosine is None else round(float(cosine), 4)


def _cosines(embedder: Embedder | None, turns: list[Turn],
             questions: list[list[str | None]]) -> list[list[float | None]]:
    """Cosine of each parsed candidate to its original (None without an embedder or a parse)."""
    out: list[list[float | None]] = [[None] * len(qs) for qs in questions]
    idx = [(t, c) for t, qs in enumerate(questions) for c, q in enumerate(qs) if q]
    if embedder is None or not idx:
        return out
    originals = embedder.encode([str(turns[t].item.row["question"]) for t, _ in idx])
    cands = embedder.encode([questions[t][c] for t, c in idx])
    sims = np.sum(np.asarray(originals) * np.asarray(cands), axis=1)
    for (t, c), v in zip(idx, sims):
        out[t][c] = float(v)
    return out


def _pairwise(embedder: Embedder | None, questions: list[str | None], kept: list[str]) -> np.ndarray | None:
    """Cosines among one request's candidates followed by the row's kept rephrasings (0 for no parse)."""
    if embedder is None:
        return None
    texts = [q or "" for q in questions] + list(kept)
    v = np.asarray(embedder.encode(texts), dtype=np.float32)
    m = v @ v.T
    for i, q in enumerate(questions):
        if not q:
            m[i, :] = m[:, i] = 0.0
    return m


def _tally(res: RephraseResult, rows: Sequence[dict[str, Any]], k: int) -> None:
    cats: dict[str, dict[str, int]] = defaultdict(lambda: {"items": 0, "slots": 0, "kept": 0, "complete": 0})
    per_row = Counter(r["rephrase_of"] for r in (x["metadata"] for x in res.kept))
    for row in rows:
        c = cats[str(row.get("category"))]
        c["items"] += 1
        c["slots"] += k
        c["kept"] += per_row[row["id"]]
        c["complete"] += int(per_row[row["id"]] == k)
    res.by_category = {name: {**c, "acceptance": round(c["kept"] / c["slots"], 4) if c["slots"] else None}
                       for name, c in sorted(cats.items())}
