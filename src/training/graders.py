"""Programmatic graders: exact figures for ``numeric_qa``, normalised labels for ``classification``,
exact match and token F1 for short span answers (extractive).

Every grader returns a :class:`Grade` with a score in [0, 1] and a pass flag; nothing here raises on
odd model output. Judge-graded items (``open_qa``) live in :mod:`training.judge`.

Numeric grading reads ``metadata["answer_values"]`` (``[{"name", "value", "unit"}]``, percent values
in percent units) and looks for each expected figure among the numbers the answer states as its result
(its first and last ones, :func:`stated_figures`, read by :func:`datagen.numbers.find_numbers`, the
project's one number parser), within a relative tolerance; a value marked ``"exact": true`` (a cell
copied from a table) must be equal.
Units are reconciled: ``12.5%`` = ``12.5 percent`` = ``1250 bp`` = ``0.125``;
``$1.5bn`` = ``1,500,000,000``; ``-3.2%`` = ``down 3.2%`` = ``(3.2%)``.

Extractive grading (SQuAD / TAT-QA style) applies to rows whose gold answer is a short span or a list
of spans (:func:`span_answers`): both sides are normalised (:func:`normalise_answer`: lowercase, no
punctuation, no articles, single spaces); the score is token F1, the pass flag exact match. A list
answer is graded as a bag: the predicted answer is split into spans, each gold span is aligned with at
most one predicted span so that the summed F1 is largest, and the score is that sum over
``max(#gold, #predicted)`` (DROP / TAT-QA); exact match means the same set of normalised spans.
"""

from __future__ import annotations

import itertools
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

NONE_LABEL = "<none>"


@dataclass(frozen=True)
class Grade:
    score: float  # in [0, 1]
    passed: bool
    grader: str  # "numeric" | "classification" | "extractive" | "judge"
    detail: dict[str, Any] = field(default_factory=dict)
    unparsable: bool = False


# ----------------------------------------------------------------------------- numbers
@dataclass(frozen=True)
class Figure:
    """A number found in text, scaled (``1.5bn`` -> 1.5e9) with a normalised unit."""

    value: float
    unit: str  # "%" | "bp" | "USD" | "CUR" (another currency) | "x" | "" (plain)
    text: str
    start: int = 0  # where it starts in the text it was read from


def _grader_unit(unit: str) -> str:
    """:mod:`datagen.numbers` units as the grader reads them: percentage points are percent, any
    currency but USD is ``CUR``."""
    if unit == "pp":
        return "%"
    if unit in ("%", "bp", "x", "", "USD"):
        return unit
    return "CUR"


def extract_figures(text: str) -> list[Figure]:
    """All numbers in ``text`` with sign (also from a falling word before it: "fell 3.2%"), scale and
    unit resolved, in order of appearance; read by :func:`datagen.numbers.find_numbers`, the one
    number parser, with dates kept as plain numbers."""
    from datagen.numbers import find_numbers

    return [Figure(float(f.value), _grader_unit(f.unit), f.text, f.start)
            for f in find_numbers(text or "", directional=True, skip_dates=False)]


def normalise_unit(unit: str | None) -> str:
    u = (unit or "").strip().lower()
    if u in ("%", "pct", "percent", "pp") or "percent" in u:
        return "%"
    if u in ("bp", "bps") or u.startswith("basis"):
        return "bp"
    if "usd" in u or "$" in u or "dollar" in u:
        return "USD"
    if u == "x":
        return "x"
    return ""


def _readings(fig: Figure, unit: str) -> list[float]:
    """The values ``fig`` can stand for when the expected figure is in ``unit``."""
    if unit == "%":
        return {"%": [fig.value], "bp": [fig.value / 100], "": [fig.value, fig.value * 100]}.get(fig.unit, [])
    if unit == "bp":
        return {"bp": [fig.value], "%": [fig.value * 100], "": [fig.value]}.get(fig.unit, [])
    if unit == "USD":
        return [fig.value] if fig.unit in ("USD", "") else []
    return [fig.value] if fig.unit in ("", "x", "USD", "CUR") else []


def close(a: float, b: float, rel_tol: float) -> bool:
    """``a`` within ``rel_tol`` of the expected ``b`` (an exact zero needs |a| < 1e-9)."""
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


EXACT_TOL = 1e-9  # an expected value marked ``exact`` (copied as shown): equal up to float rounding
STATED_SLACK = 2  # figures of reasoning an answer may state before its result ("from 100.00 to 103.21: +3.21%")


def stated_figures(answer: str, figures: Sequence[Figure], n_expected: int) -> list[Figure]:
    """The figures an answer states as its result: its first ``n_expected + STATED_SLACK`` figures and
    its last ``n_expected``, dates (``2024-08-28``) not counted. An answer that lists many figures (a
    base model copying the price table) is not credited for the one it happens to contain."""
    from datagen.numbers import date_spans

    dates = date_spans(answer)
    plain = [i for i, f in enumerate(figures) if not any(a <= f.start < b for a, b in dates)]
    keep = set(plain[:n_expected + STATED_SLACK]) | set(plain[-n_expected:] if n_expected else [])
    return [f for i, f in enumerate(figures) if i in keep]


def grade_numeric(answer: str, expected: Sequence[dict[str, Any]], rel_tol: float,
                  label: tuple[str, Sequence[str]] | None = None) -> Grade:
    """Fraction of the expected figures found among those ``answer`` states as its result
    (:func:`stated_figures`); pass when all are found.

    A figure in the answer may match several expected values (e.g. two equal figures). With ``label``
    (``(gold, choices)``: the side of an above/below question, the ticker of a which-did-better one), the
    label the answer names (:func:`normalise_label`) counts as one more expected element: a wrong side
    with the right figures is not a pass.
    """
    every = extract_figures(answer)
    figures = stated_figures(answer, every, len(expected))
    matches = []
    for e in expected:
        target, unit = float(e["value"]), normalise_unit(e.get("unit"))
        tol = EXACT_TOL if e.get("exact") else rel_tol
        hit = next((f for f in figures if any(close(r, target, tol) for r in _readings(f, unit))), None)
        matches.append({"name": e.get("name", ""), "expected": target, "unit": e.get("unit", ""),
                        "found": hit.text if hit else None})
    n_ok = sum(m["found"] is not None for m in matches)
    n = len(matches)
    detail: dict[str, Any] = {"matches": matches, "n_figures_in_answer": len(every), "n_figures_graded": len(figures)}
    if label is not None:
        gold, choices = label
        pred = normalise_label(answer, choices)
        detail["label"] = {"gold": gold, "pred": pred if pred is not None else NONE_LABEL}
        n_ok, n = n_ok + (pred == gold), n + 1
    score = n_ok / n if matches else 0.0
    return Grade(score=score, passed=bool(matches) and n_ok == n, grader="numeric", detail=detail)


def answer_label(row: dict[str, Any]) -> tuple[str, list[str]] | None:
    """``(gold, choices)`` for a numeric item that also names a label (``metadata["answer_label"]`` among
    ``metadata["answer_choices"]``), else None."""
    meta = row.get("metadata") or {}
    gold, choices = meta.get("answer_label"), meta.get("answer_choices")
    if isinstance(gold, str) and isinstance(choices, list) and gold in choices:
        return gold, [str(c) for c in choices]
    return None


def expected_values(row: dict[str, Any]) -> list[dict[str, Any]]:
    """``metadata["answer_values"]``; failing that, the figures written in the reference answer."""
    vals = (row.get("metadata") or {}).get("answer_values") or []
    if vals:
        return [v for v in vals if isinstance(v, dict) and "value" in v]
    return [{"name": f"ref{i}", "value": f.value, "unit": f.unit}
            for i, f in enumerate(extract_figures(row.get("answer", "")))]


# ----------------------------------------------------------------------------- spans
SPAN_MAX_TOKENS = 8  # a gold span longer than this (normalised tokens) is an open answer: the judge's
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_SPAN_SEP = re.compile(r"\s*(?:[;,\n]|\band\b|&)\s*", re.IGNORECASE)


def normalise_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, punctuation removed, articles removed, whitespace collapsed."""
    s = "".join(ch for ch in (text or "").lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def token_f1(pred: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings (SQuAD); two empty strings score 1, one empty 0."""
    p, g = normalise_answer(pred).split(), normalise_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def _is_figure(span: str) -> bool:
    from datagen.numbers import parse_number

    return parse_number(span) is not None and not span.strip().isdigit()


def span_answers(row: dict[str, Any]) -> list[str] | None:
    """The gold spans when the extractive grader applies to ``row``, else None.

    Spans are ``metadata["answer_spans"]`` (a list answer) or the answer itself. The grader applies to
    rows that are not ``classification`` when every span has 1 to :data:`SPAN_MAX_TOKENS` normalised
    tokens and none is a figure with a sign, unit or separators (``-3.2%``, ``$1.5bn``: normalisation
    would drop the sign; those belong to the numeric grader or the judge). Bare digits (a year) are spans.
    """
    if row.get("task_type") == "classification":
        return None
    spans = (row.get("metadata") or {}).get("answer_spans")
    if not (isinstance(spans, list) and spans and all(isinstance(x, str) for x in spans)):
        spans = [str(row.get("answer") or "")]
    for sp in spans:
        n = len(normalise_answer(sp).split())
        if not 1 <= n <= SPAN_MAX_TOKENS or _is_figure(sp):
            return None
    return list(spans)


def _align(gold: list[str], pred: list[str]) -> float:
    """Largest summed F1 over one-to-one alignments of gold and predicted spans (exhaustive up to 7
    spans a side, greedy by best pair beyond)."""
    small, big = sorted((gold, pred), key=len)
    if not small:
        return 0.0
    f1 = [[token_f1(a, b) for b in big] for a in small]  # F1 is symmetric
    if len(big) <= 7:
        return max(sum(f1[i][j] for i, j in enumerate(perm))
                   for perm in itertools.permutations(range(len(big)), len(small)))
    total, rows, cols = 0.0, set(), set()
    for v, i, j in sorted(((f1[i][j], i, j) for i in range(len(small)) for j in range(len(big))), reverse=True):
        if i not in rows and j not in cols:
            rows.add(i)
            cols.add(j)
            total += v
    return total


def grade_extractive(answer: str, spans: Sequence[str]) -> Grade:
    """Token F1 (score) and exact match (pass) of ``answer`` against the gold ``spans``."""
    gold = [s for s in spans if normalise_answer(s)]
    if len(gold) <= 1:
        ref = gold[0] if gold else ""
        em = normalise_answer(answer) == normalise_answer(ref)
        f1 = token_f1(answer, ref)
        return Grade(score=f1, passed=em, grader="extractive", detail={"em": em, "f1": f1, "spans": gold})
    pred = [p for p in _SPAN_SEP.split(answer or "") if normalise_answer(p)]
    f1 = _align(gold, pred) / max(len(gold), len(pred))
    em = sorted({normalise_answer(p) for p in pred}) == sorted({normalise_answer(g) for g in gold})
    return Grade(score=f1, passed=em, grader="extractive",
                 detail={"em": em, "f1": f1, "spans": gold, "pred_spans": pred})


# ----------------------------------------------------------------------------- labels
SYNONYMS: dict[str, str] = {
    "bullish": "positive", "bearish": "negative", "optimistic": "positive", "pessimistic": "negative",
    "favourable": "positive", "favorable": "positive", "unfavourable": "negative", "unfavorable": "negative",
    "mixed": "neutral", "moderate": "medium", "med": "medium", "elevated": "high", "neither": "tie",
}


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", (text or "").lower()).split())


def normalise_label(answer: str, labels: Sequence[str], synonyms: dict[str, str] | None = None) -> str | None:
    """The allowed label ``answer`` names, or None.

    Exact match after normalisation (case, punctuation) first; else the label (or a synonym of one)
    that appears earliest as a whole word, the longest one at a tie ("very high" over "high").
    """
    syn = SYNONYMS if synonyms is None else synonyms
    by_norm = {_norm(lab): lab for lab in labels}
    a = _norm(answer)
    if a in by_norm:
        return by_norm[a]
    if a in syn and _norm(syn[a]) in by_norm:
        return by_norm[_norm(syn[a])]
    terms = dict(by_norm)
    for word, target in syn.items():
        if _norm(target) in by_norm and word not in terms:
            terms[word] = by_norm[_norm(target)]
    best: tuple[int, int, str] | None = None
    padded = f" {a} "
    for term, label in terms.items():
        if not term:
            continue
        pos = padded.find(f" {term} ")
        if pos >= 0 and (best is None or (pos, -len(term)) < (best[0], best[1])):
            best = (pos, -len(term), label)
    return best[2] if best else None


def grade_classification(answer: str, reference: str, labels: Sequence[str] | None) -> Grade:
    allowed = list(labels) if labels else [reference]
    gold = normalise_label(reference, allowed) or reference
    pred = normalise_label(answer, allowed)
    ok = pred == gold
    return Grade(score=1.0 if ok else 0.0, passed=ok, grader="classification",
                 detail={"gold": gold, "pred": pred if pred is not None else NONE_LABEL})


def classification_metrics(gold: Sequence[str], pred: Sequence[str | None],
                           labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1 and the confusion matrix ``{gold: {pred: count}}``.

    Macro-F1 averages over ``labels`` (default: every label seen in gold or pred); an unrecognised
    prediction (None) is recorded as ``<none>``: a miss for its gold class, never a class of its own.
    """
    pred = [p if p is not None else NONE_LABEL for p in pred]
    if len(gold) != len(pred):
        raise ValueError("gold and pred differ in length")
    classes = sorted(set(labels) if labels is not None else (set(gold) | set(pred)) - {NONE_LABEL})
    confusion: dict[str, dict[str, int]] = {}
    for g, p in zip(gold, pred, strict=True):
        confusion.setdefault(g, {}).setdefault(p, 0)
        confusion[g][p] += 1
    per_class = {}
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred, strict=True))
        fp = sum(g != c and p == c for g, p in zip(gold, pred, strict=True))
        fn = sum(g == c and p != c for g, p in zip(gold, pred, strict=True))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[c] = {"precision": prec, "recall": rec, "f1": f1, "support": tp + fn}
    n = len(gold)
    return {
        "n": n,
        "accuracy": sum(g == p for g, p in zip(gold, pred, strict=True)) / n if n else None,
        "macro_f1": sum(v["f1"] for v in per_class.values()) / len(per_class) if per_class else None,
        "per_class": per_class,
        "confusion": {g: dict(sorted(row.items())) for g, row in sorted(confusion.items())},
    }


def pick_by_loglik(scores: Sequence[tuple[float, int]], normalise: bool = True) -> int:
    """Index of the choice the model finds most likely, from :func:`lm.causal_lm.continuation_logprobs`.

    ``normalise``: rank by mean log-probability per token where the choices differ in token count (a
    sum favours short choices); with equal counts the two rankings agree. Ties go to the first choice.
    """
    if not scores:
        raise ValueError("no choices to rank")
    uneven = len({n for _, n in scores}) > 1
    keys = [s / max(n, 1) if normalise and uneven else s for s, n in scores]
    return max(range(len(keys)), key=lambda i: (keys[i], -i))


COLLAPSE_SHARE = 0.8  # an arm putting more than this share of a category's predictions on one label has collapsed


def collapse(pred: Sequence[str | None], gold: Sequence[str], threshold: float = COLLAPSE_SHARE) -> dict[str, Any]:
    """Whether an arm's predictions on one category collapsed onto one label.

    Collapsed: the category has at least 2 gold labels and more than ``threshold`` of the predictions
    (unrecognised ones, ``<none>``, included in the count but never the top label) are one label. A
    collapsed arm is the majority-class baseline in disguise; its gain over another arm is no claim.
    """
    n = len(pred)
    counts = Counter(p for p in pred if p is not None and p != NONE_LABEL)
    top, k = (sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else (None, 0))
    share = k / n if n else 0.0
    n_gold = len(set(gold))
    return {"collapsed": bool(n_gold >= 2 and share > threshold), "top_label": top, "top_share": share,
            "n_gold_labels": n_gold, "threshold": threshold}


def majority_labels(train_rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per category of the training rows' classification items: the most frequent label (``majority``;
    ties: the label first in alphabetical order) and the class prior ``{label: share}``."""
    by_cat: dict[str, Counter] = {}
    for r in train_rows:
        if r.get("task_type") == "classification":
            by_cat.setdefault(r["category"], Counter())[str(r["answer"]).strip()] += 1
    out = {}
    for cat, c in sorted(by_cat.items()):
        n = sum(c.values())
        out[cat] = {"majority": sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0], "n": n,
                    "prior": {lab: k / n for lab, k in sorted(c.items())}}
    return out
