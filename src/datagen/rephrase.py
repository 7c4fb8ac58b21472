"""k validated rephrasings per question, with bounded retries.

Split as distilabel does: :func:`format_input` (row, attempt) -> chat messages and
:func:`format_output` (text, row) -> ``{"question": str | None, "error": str | None}``, both pure.
:func:`rephrase_rows` drives them: one ``provider.generate_batch`` call per attempt round over every
item that still misses rephrasings, then embeddings for the similarity band, then the validators.

Each item has ``k`` slots (``rephrase_index`` 1..k). A slot is filled by the first candidate that
passes validation; a slot still empty after ``max_attempts`` rounds is *missing*, and its last
rejection (marked ``final``) is the recorded reason. Every rejected candidate is written out for audit.

The source question is data, not instructions: it goes into a ``Question:`` field after the few-shot
turns, and whatever the model answers is validated like any other output, so a question that says
"ignore previous instructions" cannot change what is kept.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datagen.embed import Embedder
from datagen.llm.base import ChatRequest, LLMProvider, Message
from datagen.prompts import Prompt, load_prompt, split_turns
from datagen.schema import stable_id
from datagen.validators import RephraseChecks, Verdict, validate_rephrasing

log = logging.getLogger(__name__)

PROMPT_FIRST = "rephrase"
PROMPT_RETRY = "rephrase_retry"
STOP = ("\n", "<end_of_turn>")


# ----------------------------------------------------------------------------- pure parts
def prompt_for(attempt: int) -> Prompt:
    return load_prompt(PROMPT_FIRST if attempt == 0 else PROMPT_RETRY)


def format_input(row: dict[str, Any], attempt: int = 0) -> list[Message]:
    """The chat messages asking for one rephrasing of ``row["question"]`` (attempt 0: first prompt)."""
    question = " ".join(str(row["question"]).split())  # one line: the model answers in one line
    return split_turns(prompt_for(attempt).render(question=question))


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
    return round(min(base + 0.2 * attempt, 1.2), 3)


def max_tokens_for(question: str, cap: int) -> int:
    """Enough new tokens for a rephrasing up to the length-ratio bound, in buckets of 16, at most ``cap``.

    A local model generates until it stops or hits the limit, and a small base model rarely stops on
    its own, so the limit is the cost. ~0.6 tokens per character covers digit-by-digit tokenizers.
    """
    need = int(0.6 * len(question)) + 8
    return max(16, min(cap, 16 * -(-need // 16)))


def request_seed(row_id: str, slot: int, attempt: int) -> int:
    return int(hashlib.sha256(f"{row_id}|{slot}|{attempt}".encode()).hexdigest()[:8], 16)


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


# ----------------------------------------------------------------------------- the loop
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
    prompts: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class _Slot:
    row: dict[str, Any]
    slot: int
    last: dict[str, Any] | None = None  # last rejection record


def rephrase_rows(rows: Sequence[dict[str, Any]], provider: LLMProvider, embedder: Embedder | None, *,
                  k: int, max_attempts: int, temperature: float, max_tokens: int,
                  checks: RephraseChecks = RephraseChecks()) -> RephraseResult:
    """Fill k rephrasing slots per row; one batch per attempt round; deterministic order throughout.

    ``embedder`` None skips the similarity band (tests of other checks only).
    """
    res = RephraseResult(slots=len(rows) * k)
    kept_text: dict[str, list[str]] = defaultdict(list)  # row id -> kept questions (for duplicates)
    open_slots = [_Slot(r, s) for r in rows for s in range(1, k + 1)]
    for attempt in range(max_attempts):
        if not open_slots:
            break
        prompt = prompt_for(attempt)
        res.prompts[prompt.name] = prompt.ref
        temp = attempt_temperature(temperature, attempt)
        reqs = [ChatRequest(messages=tuple(format_input(s.row, attempt)), temperature=temp,
                            max_tokens=max_tokens_for(str(s.row["question"]), max_tokens),
                            seed=request_seed(s.row["id"], s.slot, attempt), stop=STOP,
                            key=f"{s.row['id']}#{s.slot}@{attempt}") for s in open_slots]
        results = provider.generate_batch(reqs, desc=f"rephrase attempt {attempt + 1}/{max_attempts}")
        res.requests += len(reqs)
        res.rounds += 1
        parsed = [format_output(r.text if r.ok else None, s.row) for r, s in zip(results, open_slots)]
        cosines = _cosines(embedder, open_slots, parsed)
        still_open = []
        for s, r, p, cos in zip(open_slots, results, parsed, cosines):
            if not r.ok:
                verdict = Verdict(False, "llm_error", str(r.error or "")[:200])
            elif p["error"]:
                verdict = Verdict(False, p["error"])
            else:
                verdict = validate_rephrasing(s.row, p["question"], cosine=cos, kept=kept_text[s.row["id"]],
                                              checks=checks)
            if verdict.ok:
                kept_text[s.row["id"]].append(p["question"])
                res.kept.append(make_rephrasing(s.row, p["question"], s.slot, attempt, prompt, cos))
                continue
            rec = {"kind": "rephrase", "group_id": s.row["group_id"], "source_id": s.row["id"],
                   "category": s.row.get("category"), "rephrase_index": s.slot, "attempt": attempt,
                   "text": r.text, "candidate": p["question"], "reason": verdict.reason,
                   "detail": verdict.detail, "cosine": None if cos is None else round(float(cos), 4),
                   "prompt": prompt.ref, "final": False}
            res.rejections.append(rec)
            res.rejected_reasons[verdict.reason] += 1
            s.last = rec
            still_open.append(s)
        open_slots = still_open
    for s in open_slots:
        s.last["final"] = True
        res.missing_reasons[s.last["reason"]] += 1
    _tally(res, rows, k)
    res.kept.sort(key=lambda x: (x["group_id"], x["rephrase_index"], x["id"]))
    return res


def _cosines(embedder: Embedder | None, slots: list[_Slot], parsed: list[dict[str, Any]]) -> list[float | None]:
    idx = [i for i, p in enumerate(parsed) if p["question"]]
    out: list[float | None] = [None] * len(slots)
    if embedder is None or not idx:
        return out
    originals = embedder.encode([str(slots[i].row["question"]) for i in idx])
    cands = embedder.encode([parsed[i]["question"] for i in idx])
    sims = np.sum(np.asarray(originals) * np.asarray(cands), axis=1)
    for i, c in zip(idx, sims):
        out[i] = float(c)
    return out


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
