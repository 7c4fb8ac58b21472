"""Closed-book knowledge: which phrasings of a fact are trained, which are asked, and the compute-matched arms.

A *fact* is one group (``group_id``): its original question, its rephrasings, one answer, no context.
The question a knowledge benchmark asks is whether the model learned the fact, not the sentence, so:

- every phrasing of a **trained** fact goes to train (the original and its ``k`` rephrasings);
- the test asks each trained fact in a **held-out phrasing** that no training row contains and that shares
  no run of :data:`NGRAM` tokens with any training phrasing of that fact (:func:`heldout_phrasing`);
- **control** facts are never trained; they are asked too, and their accuracy must stay at chance (a
  leak check that can fail);
- **validation** holds the held-out phrasings of *other* trained facts, so hyperparameters are never
  chosen on the test.

Which facts are controls and which are validation is decided per entity when rows name one
(``metadata.entity``: the facts of one company stay together, so one company's facts are never both
trained and control), else per fact, by a hash of the key and the seed. A row may also carry its role
(``metadata.role``: ``test``, ``validation`` or ``control``) and its held-out phrasing
(``metadata.heldout_question``), as ``scripts/make_facts.py`` writes them.

Compute matching (:func:`arm_rows`): ``k`` rephrasings give ``k + 1`` rows per fact; the exposure-matched
``k = 0`` arm repeats the original ``k + 1`` times, so both arms take the same steps and see each answer
equally often, and the only difference is the wording.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

NGRAM = 6  # a held-out phrasing may share no run of this many tokens with a trained one
ROLES = ("test", "validation", "control")


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    t = tokens(text)
    return {tuple(t[i:i + n]) for i in range(len(t) - n + 1)}


def shares_ngram(text: str, others: Sequence[str], n: int = NGRAM) -> bool:
    """Whether ``text`` shares a run of ``n`` tokens with any of ``others``."""
    mine = ngrams(text, n)
    return any(mine & ngrams(o, n) for o in others)


def _unit(key: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16 ** 12


def fact_role(row: dict[str, Any], *, controls: float, validation: float, seed: int) -> str:
    """``test``, ``validation`` or ``control`` for the fact of ``row`` (see the module docstring)."""
    meta = row.get("metadata") or {}
    if meta.get("role") in ROLES:
        return str(meta["role"])
    u = _unit(str(meta.get("entity") or row["group_id"]), seed)
    return "control" if u < controls else "validation" if u < controls + validation else "test"


def heldout_phrasing(original: dict[str, Any], rephrasings: Sequence[dict[str, Any]]
                     ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """``(held-out row, training rows)`` of one fact.

    The held-out question is ``metadata.heldout_question`` of the original when given, else the last
    rephrasing that shares no :data:`NGRAM`-token run with the original and the other rephrasings (the
    teacher's extra rephrasing). None when no phrasing qualifies: the fact is then trained but not asked.
    """
    train = [original, *rephrasings]
    given = (original.get("metadata") or {}).get("heldout_question")
    if given:
        if shares_ngram(given, [r["question"] for r in train]):
            return None, train
        held = {**original, "id": f"{original['id']}-heldout", "question": given, "is_rephrase": True,
                "rephrase_index": None}
        return held, train
    for cand in reversed(rephrasings):
        rest = [r for r in train if r is not cand]
        if not shares_ngram(cand["question"], [r["question"] for r in rest]):
            return cand, rest
    return None, train


def knowledge_split(rows: Sequence[dict[str, Any]], *, controls: float = 0.2, validation: float = 0.2,
                    seed: int = 13) -> dict[str, list[dict[str, Any]]]:
    """``{"train", "validation", "test"}`` for closed-book facts (rows grouped by ``group_id``).

    Train: every phrasing of trained facts except each fact's held-out one. Test: the held-out phrasing
    of each ``test`` fact and the original question of each control fact (``metadata.knowledge`` says
    which: ``heldout`` or ``control``). Validation: the held-out phrasings of ``validation`` facts.
    """
    facts: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        facts.setdefault(r["group_id"], []).append(r)
    out: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    for gid in sorted(facts):
        members = sorted(facts[gid], key=lambda r: (bool(r.get("is_rephrase")), r.get("rephrase_index") or 0, r["id"]))
        original, rephrasings = members[0], members[1:]
        role = fact_role(original, controls=controls, validation=validation, seed=seed)
        if role == "control":
            asked = (original.get("metadata") or {}).get("heldout_question") or original["question"]
            out["test"].append(_tag({**original, "question": asked}, "control"))
            continue
        held, train = heldout_phrasing(original, rephrasings)
        out["train"] += train
        if held is not None:
            out["validation" if role == "validation" else "test"].append(_tag(held, "heldout"))
    return out


def _tag(row: dict[str, Any], kind: str) -> dict[str, Any]:
    return {**row, "metadata": {**(row.get("metadata") or {}), "knowledge": kind}}


def arm_rows(facts: Sequence[dict[str, Any]], k: int, *, repeat: int = 1) -> list[dict[str, Any]]:
    """Training rows of one arm from fact rows carrying ``metadata.train_phrasings`` (original first).

    Each fact gives its first ``k + 1`` phrasings, each ``repeat`` times: ``k=3`` is 4 phrasings once,
    the exposure-matched ``k=0`` is the original 4 times (``repeat=4``), plain ``k=0`` the original once.
    """
    out = []
    for f in facts:
        phrasings = (f.get("metadata") or {}).get("train_phrasings") or [f["question"]]
        if k + 1 > len(phrasings):
            raise ValueError(f"fact {f['id']} has {len(phrasings) - 1} rephrasings, the arm needs {k}")
        for i, q in enumerate(phrasings[:k + 1]):
            for j in range(repeat):
                out.append({**f, "id": f"{f['id']}-p{i}-r{j}", "question": q, "is_rephrase": i > 0,
                            "rephrase_index": i or None})
    return out


def knowledge_leakage(splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """What must be 0 in a knowledge split: asked questions found in train (normalised text, or a shared
    :data:`NGRAM`-token run with a training phrasing of the same fact), control facts with training rows,
    and facts asked in both validation and test."""
    train_q: dict[str, list[str]] = {}
    for r in splits.get("train", []):
        train_q.setdefault(r["group_id"], []).append(r["question"])
    all_train = {" ".join(tokens(q)) for qs in train_q.values() for q in qs}
    asked = [r for s in ("validation", "test") for r in splits.get(s, [])]
    in_train = sum(" ".join(tokens(r["question"])) in all_train for r in asked)
    ngram = sum(shares_ngram(r["question"], train_q.get(r["group_id"], [])) for r in asked)
    controls = sum((r.get("metadata") or {}).get("knowledge") == "control" and r["group_id"] in train_q for r in asked)
    both = len({r["group_id"] for r in splits.get("validation", [])} & {r["group_id"] for r in splits.get("test", [])})
    return {"asked_question_in_train": in_train, "asked_question_shares_ngram": ngram,
            "controls_trained": controls, "facts_in_validation_and_test": both}


def knowledge_leakage_failure(leak: dict[str, Any]) -> str | None:
    bad = {k: v for k, v in leak.items() if v}
    if not bad:
        return None
    return "knowledge split leaks: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in bad.items())
