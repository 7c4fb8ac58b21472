"""The one number parser of finsynth: figures with sign, scale words and units, in answers and in text.

``parse_number`` reads a string that *is* one figure ("14.16 percent", "-7 million", "$1.2bn",
"(3.4)", "1,234.5", "12%", "about 5.2x"); ``find_numbers`` finds every figure in free text;
``answer_values`` turns a reference answer (a string or a list of spans) into the
``metadata["answer_values"]`` records graders read: ``[{"name", "value", "unit"}]``.

Conventions (the same everywhere, so a figure parsed here compares equal to the same figure parsed
from a model's answer):

- ``value`` is scaled: ``-7 million`` -> ``-7000000.0``, ``$1.2bn`` -> ``1200000000.0`` (exact decimal
  arithmetic, no ``1.2e9 + 2e-7`` artefacts); percentages stay in percent: ``12%`` -> ``12.0``.
- ``unit``: ``"%"`` (percent, per cent, pct), ``"pp"`` (percentage points), ``"bp"`` (basis points),
  ``"x"`` (a multiple), an ISO currency code (``$`` and ``dollars`` -> ``USD``, ``€`` -> ``EUR``,
  ``£`` -> ``GBP``, ``¥`` -> ``JPY``, ``₹``/``Rs`` -> ``INR``, or a code written out), or ``""``.
- Negative: a minus sign (``-``, ``−``, ``–``) or accounting parentheses ``(3.4)``; with
  ``directional=True``, also a figure right after a falling word ("down 3.2%", "fell by 4"). A minus
  with a space after it, right after a figure, is an operator or a range, not a sign: ``100% - 40%``,
  ``12 - 5``, ``2017 – 2018`` are all positive (``- 3.2%`` after a word stays negative).
- Thousands separators must be well formed (``1,234,567``); ``1,5`` is not a number here.

- Currency codes: ``USD``, ``EUR``, ... in any case (``usd 5``); codes that are also English words
  (``TRY``) or rarer (``BRL``, ``MXN``, ``ZAR``, ``IDR``) only in capitals.

Every stage reads figures here: source QA and graders (:func:`answer_values`, :func:`find_numbers`),
the rephrase validators (:func:`find_numbers` over text with its dates masked: amounts, percentages,
other numbers), dedup (signed figures, figure sets). :class:`Figure` says how a figure was written
(``sign``, ``written``, ``scale``, ``unit``, span) as well as what it is worth (``value``), so each
caller compares what it needs; none keeps its own number regex.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["Figure", "SCALES", "answer_values", "find_numbers", "format_number", "number_keys", "parse_number"]

SCALES: dict[str, int] = {
    "thousand": 10**3, "thousands": 10**3, "k": 10**3,
    "million": 10**6, "millions": 10**6, "mn": 10**6, "mln": 10**6, "mm": 10**6, "m": 10**6,
    "billion": 10**9, "billions": 10**9, "bn": 10**9, "bln": 10**9, "b": 10**9,
    "trillion": 10**12, "trillions": 10**12, "tn": 10**12,
    "lakh": 10**5, "lakhs": 10**5, "crore": 10**7, "crores": 10**7,
}
_CUR_PREFIX = {"us$": "USD", "$": "USD", "€": "EUR", "£": "GBP", "¥": "JPY", "₹": "INR", "rs": "INR", "rs.": "INR"}
_CODES = ("USD", "EUR", "GBP", "JPY", "INR", "CHF", "CNY", "CAD", "AUD", "HKD", "SGD")
_CAPS_CODES = ("BRL", "TRY", "MXN", "ZAR", "IDR")  # only in capitals: "try 5 times" is not TRY 5
_CUR_WORD = {"dollar": "USD", "dollars": "USD", "us dollar": "USD", "us dollars": "USD", "euro": "EUR", "euros": "EUR",
             "pounds": "GBP", "yen": "JPY", "rupee": "INR", "rupees": "INR"}
_MINUS = "-\u2212\u2013"

_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"
_SCALE_RE = r"thousands?|millions?|billions?|trillions?|lakhs?|crores?|mln|mn|mm|bln|bn|tn|k|m|b"
_PCT_RE = (r"%|percentage\s+points?|per\s?cent|percent|pct|pp|basis\s+points?|bps|bp|x")
_CODE_RE = "|".join(_CODES) + "|(?-i:" + "|".join(_CAPS_CODES) + ")"
_CUR_PRE_RE = rf"US\$|\$|€|£|¥|₹|Rs\.?(?=\s?\d)|(?:{_CODE_RE})(?=\s?[{_MINUS}(]?\s?[\d.])"
_CUR_POST_RE = rf"{_CODE_RE}|(?:US\s+)?dollars?|euros?|pounds|yen|rupees?"

_FIGURE = re.compile(
    r"(?<![\w.,])"
    r"(?P<open>\(\s*)?"
    rf"(?P<sign>[{_MINUS}+])?\s?"
    rf"(?P<cur>{_CUR_PRE_RE})?\s?"
    r"(?P<open2>\(\s*)?"
    rf"(?P<sign2>[{_MINUS}+])?"
    rf"(?P<num>{_NUM})(?![\d,]*\d)(?!\.\d)"
    r"(?P<close1>\s*\))?"
    rf"(?:\s?(?P<scale>{_SCALE_RE})\b)?"
    rf"(?:\s?(?P<unit>{_PCT_RE})(?![\w]))?"
    rf"(?:\s?(?P<cur2>{_CUR_POST_RE})\b)?"
    r"(?P<close2>(?(close1)(?!)|\s*\)))?",
    re.IGNORECASE)
_ISO_DATE = re.compile(r"\b\d{4}-\d{1,2}-\d{1,2}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b")
_APPROX = re.compile(r"^(?:(?:about|approximately|approx\.?|around|roughly|nearly|almost|circa|ca\.|~|≈)\s*)+",
                     re.IGNORECASE)
_DOWN = re.compile(
    r"\b(?:down|fell|fallen|falls?|declined?|declines|decline\s+of|decreased?|decreases|drop(?:ped|s)?|"
    r"lost|loss\s+of|lower\s+by|negative|shrank|contracted|slid|plunged|tumbled|dipped|slipped|sank)"
    r"(?:\s+(?:by|of|to))?(?:\s+(?:about|around|approximately|roughly|some|nearly|almost))?\s*$",
    re.IGNORECASE)


@dataclass(frozen=True)
class Figure:
    """A number found in text: ``value`` signed and scaled, ``unit`` normalised (see the module
    docstring), and how it was written: ``written`` (the digits' value, unsigned and unscaled:
    ``-$1.2bn`` -> 1.2), ``scale`` (10**9 there), ``sign`` (``"-"`` a minus sign, ``"+"``, ``"()"``
    accounting parentheses, ``"down"`` a falling word before it with ``directional=True``, ``""``
    none) and its span ``text[start:end]`` in the searched text (``text`` is the figure itself,
    without a parenthesis it does not close)."""

    value: float
    unit: str
    text: str
    start: int = 0
    end: int = 0
    scale: int = 1
    written: float | None = None  # None: same as abs(value) (a figure passed in as a number)
    sign: str = ""

    def __post_init__(self) -> None:
        if self.written is None:  # a figure given as a value: its sign is the value's
            object.__setattr__(self, "written", abs(self.value))
            if self.value < 0 and not self.sign:
                object.__setattr__(self, "sign", "-")

    @property
    def negative(self) -> bool:
        return self.sign in ("-", "()", "down")

    @property
    def is_percent(self) -> bool:
        """Percent or percentage points (``12%``, ``2.5 pp``); basis points and multiples are not."""
        return self.unit in ("%", "pp")

    @property
    def currency(self) -> str:
        """The ISO currency code of an amount (``$5`` -> ``USD``), else ``""``."""
        return self.unit if len(self.unit) == 3 and self.unit.isupper() else ""

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end


def _unit(m: re.Match[str]) -> str:
    u = " ".join((m.group("unit") or "").lower().split())
    if u:
        if u.startswith("percentage") or u == "pp":
            return "pp"
        if u == "%" or u.startswith(("per", "pct")):
            return "%"
        if u.startswith(("basis", "bp")):
            return "bp"
        return "x"
    cur = (m.group("cur") or "").strip().lower()
    if cur:
        return _CUR_PREFIX.get(cur, cur.upper())
    cur2 = " ".join((m.group("cur2") or "").lower().split())
    if cur2:
        return _CUR_WORD.get(cur2, cur2.upper())
    return ""


def _figure(m: re.Match[str], text: str, directional: bool) -> Figure | None:
    scale_word = (m.group("scale") or "").lower()
    scale = SCALES.get(scale_word, 1)
    try:
        written = Decimal(m.group("num").replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex only admits digits
        return None
    d = written * scale
    signs = [m.group(g) for g in ("sign", "sign2") if m.group(g)]
    sign = "-" if any(s in _MINUS for s in signs) else "+" if signs else ""
    opened = m.group("open") or m.group("open2")
    closed = m.group("close1") or m.group("close2")
    if opened and closed and sign != "-":
        sign = "()"  # accounting style: (3.4)
    if directional and not sign and _DOWN.search(text[max(0, m.start() - 40):m.start()]):
        sign = "down"
    negative = sign in ("-", "()", "down")
    value = float(-d if negative else d)
    raw = m.group(0)
    lo, hi = 0, len(raw)
    # a parenthesis that only wraps part of the match is not ours: "(see 3" keeps no "("
    if opened and not closed:
        lo = len(raw) - len(raw.lstrip("( "))
    if closed and not opened:
        hi = len(raw.rstrip(") "))
    while lo < hi and raw[lo].isspace():
        lo += 1
    while hi > lo and raw[hi - 1].isspace():
        hi -= 1
    return Figure(value=value, unit=_unit(m), text=raw[lo:hi], start=m.start() + lo, end=m.start() + hi,
                  scale=scale, written=float(written), sign=sign)


def _operator(m: re.Match[str], text: str) -> bool:
    """A minus (or plus) with a space after it, right after a figure, is arithmetic or a range, not a
    sign: ``100% - 40%``, ``12 - 5``, ``2017 – 2018`` (``-5`` and ``- 5`` elsewhere are negative)."""
    if not m.group("sign") or m.group("open") or not text[m.end("sign"):m.end("sign") + 1].isspace():
        return False
    before = text[:m.start("sign")].rstrip()
    return before[-1:].isdigit() or before[-1:] in ("%", ")")


_DIGIT = re.compile(r"\d")
_PREFIX_CHARS = frozenset("(+$€£¥₹." + _MINUS)  # what may stand between a figure's start and its first digit


def _reach_back(text: str, d: int, floor: int) -> int:
    """The leftmost place a figure whose first digit is ``text[d]`` can start: back over parentheses,
    signs, currency symbols, dots and spaces, up to three letters (``US$``, ``Rs.``, ``USD``), then those
    again (``(-USD 5``)."""
    i = d
    for letters in (3, 0):
        while i > floor and (text[i - 1] in _PREFIX_CHARS or text[i - 1].isspace()):
            i -= 1
        for _ in range(letters):
            if i > floor and text[i - 1].isalpha():
                i -= 1
    return i


def _figure_matches(text: str) -> Iterator[re.Match[str]]:
    """``_FIGURE.finditer(text)``, with the search started near the next digit instead of trying the
    pattern at every position (a match holds a digit, and at most a short prefix precedes its first
    one). Same matches, about twice as fast on rendered tables, where most positions hold no figure."""
    pos = 0
    while (d := _DIGIT.search(text, pos)) is not None:
        m = _FIGURE.search(text, _reach_back(text, d.start(), pos))
        if m is None:
            return
        yield m
        pos = m.end()


def date_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each date written ``2024-01-02`` or ``1/2/2024`` in ``text``."""
    return [m.span() for m in _ISO_DATE.finditer(text or "")]


def find_numbers(text: str | None, *, directional: bool = False, skip_dates: bool = True) -> list[Figure]:
    """Every figure in ``text``, in order. ``skip_dates`` leaves ``2024-01-02`` and ``1/2/2024`` out
    (their parts are not figures); ``directional`` reads "down 3%" as -3."""
    text = text or ""
    masked = _ISO_DATE.sub(lambda m: " " * len(m.group(0)), text) if skip_dates else text
    out = []
    for m in _figure_matches(masked):
        if _operator(m, masked):  # read the figure after the operator instead
            pos = m.end("sign")
            while masked[pos].isspace():
                pos += 1
            m = _FIGURE.match(masked, pos)
            if m is None:  # pragma: no cover - the text after the operator matched already
                continue
        f = _figure(m, text, directional)
        if f is not None and math.isfinite(f.value):
            out.append(f)
    return out


def parse_number(text: Any) -> Figure | None:
    """``text`` read as exactly one figure, or None. Tolerates surrounding blanks, a trailing full
    stop and a leading "about" / "approximately" / "~". Ints and floats pass through (non-finite:
    None)."""
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, (int, float)):
        return Figure(float(text), "", str(text)) if math.isfinite(text) else None
    if not isinstance(text, str):
        return None
    s = text.strip().rstrip(".").strip()
    s = _APPROX.sub("", s)
    if not s:
        return None
    m = _FIGURE.fullmatch(s)
    if m is None:
        return None
    if bool(m.group("open") or m.group("open2")) != bool(m.group("close1") or m.group("close2")):
        return None  # an unbalanced parenthesis is not a figure
    return _figure(m, s, directional=False)


def answer_values(answer: Any, name: str = "answer") -> list[dict[str, Any]] | None:
    """``[{"name", "value", "unit"}]`` for an answer that is one figure, or a list of spans that are
    all figures (named ``answer_1``, ``answer_2``, ...); None when any part is not a figure."""
    if isinstance(answer, (list, tuple)):
        if not answer:
            return None
        if len(answer) == 1:
            return answer_values(answer[0], name)
        out = []
        for i, span in enumerate(answer, start=1):
            f = parse_number(span)
            if f is None:
                return None
            out.append({"name": f"{name}_{i}", "value": f.value, "unit": f.unit})
        return out
    f = parse_number(answer)
    return None if f is None else [{"name": name, "value": f.value, "unit": f.unit}]


def format_number(x: float) -> str:
    """A canonical figure string: ``1200.0`` -> ``'1200'``, ``12.50`` -> ``'12.5'``."""
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.10g}"


def number_keys(text: str | None) -> list[str]:
    """Canonical strings of the figures in ``text`` (sign and scale applied, unit appended when
    there is one): a figure written as "$1.2bn" and as "1,200,000,000 USD" gives the same key."""
    return [format_number(f.value) + (f.unit if f.unit else "") for f in find_numbers(text)]
