"""k validated rephrasings per question, with bounded retries.

Split as distilabel does: :func:`format_input` (row, attempt) -> chat messages and
:func:`format_output` (text, row) -> ``{"question": str | None, "error": str | None}``, both pure.
:func:`rephrase_rows` drives them: one ``provider.generate_batch`` call per attempt round over every
item that still misses rephrasings, then embeddings for the similarity band, then the validators.

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
from datagen.validators import RephraseChecks, Verdict, check_near_copy, validate_rephrasing

log = logging.getLogger(__name__)

PROMPT_FIRST = "rephrase"
PROMPT_RETRY = "rephrase_retry"
PROMPT_BASE = "rephrase_base"
STOP = ("\n", "<end_of_turn>")


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
    candidates: int = 0  # candidate texts generated (requests x n)
    surplus: int = 0  # valid candidates left over once their row's slots were full
    prompts: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class _Ask:
    """One request: a row's open slots and how many candidates to ask for."""

    row: dict[str, Any]
    slots: list[int]
    n: int


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
    if prompt_format == "auto":  # a base model continues a document; an API serves chat
        prompt_format = "base" if getattr(provider, "kind", None) == "local" else "chat"
    if prompt_format == "base" and getattr(provider, "kind", "local") != "local":
        raise ValueError(f"augment.prompt_format=base sends raw text, which only the local provider takes; "
                         f"provider {provider.name!r} is {getattr(provider, 'kind', '?')!r}: use prompt_format=chat")
    res = RephraseResult(slots=len(rows) * k)
    kept_text: dict[str, list[str]] = defaultdict(list)  # row id -> kept questions (for duplicates)
    open_slots: dict[str, list[int]] = {r["id"]: list(range(1, k + 1)) for r in rows}
    last: dict[tuple[str, int], dict[str, Any]] = {}  # (row id, slot) -> last rejection record
    stop = STOP if early_stop else ()
    for attempt in range(max_attempts):
        if candidates == 1:  # one request per slot
            asks = [_Ask(r, [s], 1) for r in rows for s in open_slots[r["id"]]]
        else:  # one request per row for all its open slots
            asks = [_Ask(r, list(open_slots[r["id"]]), len(open_slots[r["id"]]) * candidates)
                    for r in rows if open_slots[r["id"]]]
        if not asks:
            break
        prompt = prompt_for(attempt, prompt_format)
        res.prompts[prompt.name] = prompt.ref
        temp = attempt_temperature(temperature, attempt)
        reqs = [ChatRequest(messages=tuple(format_input(a.row, attempt, prompt_format)), temperature=temp,
                            max_tokens=max_tokens_for(str(a.row["question"]), max_tokens),
                            seed=request_seed(a.row["id"], a.slots[0] if a.n == 1 else 0, attempt), stop=stop,
                            n=a.n, key=f"{a.row['id']}#{','.join(map(str, a.slots))}@{attempt}") for a in asks]
        results = provider.generate_batch(reqs, desc=f"rephrase attempt {attempt + 1}/{max_attempts}")
        res.requests += len(reqs)
        res.rounds += 1
        # a failed request is one llm_error per slot it was for
        texts = [(r.candidates() or [r.text]) if r.ok else [None] * len(a.slots) for a, r in zip(asks, results)]
        res.candidates += sum(len(t) for t in texts)
        parsed = [[format_output(t, a.row) for t in ts] for a, ts in zip(asks, texts)]
        cosines = _cosines(embedder, asks, parsed)
        for a, r, ts, ps, cs in zip(asks, results, texts, parsed, cosines):
            rid = a.row["id"]
            verdicts = []
            for p, cos in zip(ps, cs):
                if not r.ok:
                    verdicts.append(Verdict(False, "llm_error", str(r.error or "")[:200]))
                elif p["error"]:
                    verdicts.append(Verdict(False, p["error"]))
                else:
                    verdicts.append(validate_rephrasing(a.row, p["question"], cosine=cos, kept=kept_text[rid],
                                                        checks=checks))
            pairwise = _pairwise(embedder, ps, kept_text[rid]) if a.n > 1 else None
            valid = [i for i, v in enumerate(verdicts) if v.ok]
            picked: list[int] = []
            while valid and len(picked) < len(a.slots):
                choice = pick_distinct(valid, cs, pairwise, range(len(ps), len(ps) + len(kept_text[rid])) if
                                       pairwise is not None else (), 1) if a.n > 1 else valid[:1]
                i = choice[0]
                valid.remove(i)
                dup = check_near_copy(str(a.row["question"]), ps[i]["question"], kept_text[rid],
                                      checks.near_copy_char_ratio)
                if not dup.ok:  # a copy of one picked from this same request
                    verdicts[i] = dup
                    continue
                slot = a.slots[len(picked)]
                picked.append(i)
                kept_text[rid].append(ps[i]["question"])
                if pairwise is not None:  # the new kept one is the last row/column of the matrix
                    pairwise = _pairwise(embedder, ps, kept_text[rid])
                res.kept.append(make_rephrasing(a.row, ps[i]["question"], slot, attempt, prompt, cs[i]))
            res.surplus += len(valid)
            unfilled = a.slots[len(picked):]
            open_slots[rid] = [s for s in open_slots[rid] if s not in a.slots] + unfilled
            open_slots[rid].sort()
            rejected = [i for i, v in enumerate(verdicts) if not v.ok]
            for j, i in enumerate(rejected):
                v, cos = verdicts[i], cs[i]
                slot = unfilled[j % len(unfilled)] if unfilled else a.slots[j % len(a.slots)]
                rec = {"kind": "rephrase", "group_id": a.row["group_id"], "source_id": rid,
                       "category": a.row.get("category"), "rephrase_index": slot, "attempt": attempt,
                       "text": ts[i], "candidate": ps[i]["question"], "reason": v.reason,
                       "detail": v.detail, "cosine": None if cos is None else round(float(cos), 4),
                       "prompt": prompt.ref, "final": False}
                res.rejections.append(rec)
                res.rejected_reasons[v.reason] += 1
                if slot in unfilled:
                    last[(rid, slot)] = rec
            for slot in unfilled[len(rejected):]:  # a server that returned fewer candidates than asked
                if (rid, slot) not in last:
                    rec = {"kind": "rephrase", "group_id": a.row["group_id"], "source_id": rid,
                           "category": a.row.get("category"), "rephrase_index": slot, "attempt": attempt,
                           "text": None, "candidate": None, "reason": "empty_output",
                           "detail": f"{len(ts)} of {a.n} candidates returned", "cosine": None,
                           "prompt": prompt.ref, "final": False}
                    res.rejections.append(rec)
                    res.rejected_reasons["empty_output"] += 1
                    last[(rid, slot)] = rec
    for r in rows:
        for s in open_slots[r["id"]]:
            rec = last[(r["id"], s)]
            rec["final"] = True
            res.missing_reasons[rec["reason"]] += 1
    _tally(res, rows, k)
    res.kept.sort(key=lambda x: (x["group_id"], x["rephrase_index"], x["id"]))
    res.rejections.sort(key=lambda x: (x["group_id"], x["source_id"], x["rephrase_index"], x["attempt"]))
    return res


def _cosines(embedder: Embedder | None, asks: list[_Ask],
             parsed: list[list[dict[str, Any]]]) -> list[list[float | None]]:
    """Cosine of each parsed candidate to its original (None without an embedder or a parse)."""
    out: list[list[float | None]] = [[None] * len(ps) for ps in parsed]
    idx = [(a, c) for a, ps in enumerate(parsed) for c, p in enumerate(ps) if p["question"]]
    if embedder is None or not idx:
        return out
    originals = embedder.encode([str(asks[a].row["question"]) for a, _ in idx])
    cands = embedder.encode([parsed[a][c]["question"] for a, c in idx])
    sims = np.sum(np.asarray(originals) * np.asarray(cands), axis=1)
    for (a, c), v in zip(idx, sims):
        out[a][c] = float(v)
    return out


def _pairwise(embedder: Embedder | None, parsed: list[dict[str, Any]], kept: list[str]) -> np.ndarray | None:
    """Cosines among one request's candidates followed by the row's kept rephrasings (0 for no parse)."""
    if embedder is None:
        return None
    texts = [p["question"] or "" for p in parsed] + list(kept)
    v = np.asarray(embedder.encode(texts), dtype=np.float32)
    m = v @ v.T
    for i, p in enumerate(parsed):
        if not p["question"]:
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
