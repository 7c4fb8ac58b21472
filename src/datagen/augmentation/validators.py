"""Validators for LLM rephrasings: does the new question still ask the same thing?

Each check is a pure function that returns a :class:`Verdict` (``ok`` plus a short ``reason``) and
never raises. :func:`validate_rephrasing` runs them in a fixed order and reports the first failure,
so every rejection has exactly one reason that the manifest can count.

Facts are compared as *normalised extracted sets* (regex based, no NLP model). Dates are found here
and masked first; every other figure is read by :func:`datagen.numbers.find_numbers`, the project's one
number parser, and sorted by what it is:

- currency amounts (unsigned, scaled): ``$1,200`` = ``USD 1200`` = ``1,200 dollars``; ``$1.2m`` =
  ``$1.2 million`` = ``$1,200,000``
- percentages (and percentage points; signed by a minus sign, not by parentheses): ``12.5%`` = ``12.5 percent`` =
  ``12.5 per cent`` = ``12.5 pct``
- dates: ``2024-01-02`` = ``January 2, 2024`` = ``2 Jan 2024`` = ``01/02/2024`` (month first unless the
  first field is > 12); ``March 2024`` = ``2024-03``; fiscal periods ``FY23`` = ``FY2023``, ``Q3``, ``H1``
- other numbers (basis points and multiples too), as written, unsigned and unscaled: ``1,200`` = ``1200``
  = ``1200.0``; ``5 million`` -> ``5``
- tickers / acronyms: ALL-CAPS tokens of 2-6 letters (``ACME``, ``BRK.B``, ``LGD``)
- named entities: capitalised words outside a sentence start (and sentence-initial ones that are not
  common sentence openers), compared case-insensitively word by word
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Any

from datagen.numbers import find_numbers, format_number

# ----------------------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = "ok"
    detail: str = ""

    def __bool__(self) -> bool:  # `if verdict:` reads naturally
        return self.ok


OK = Verdict(True)


def fail(reason: str, detail: str = "") -> Verdict:
    return Verdict(False, reason, detail)


# ----------------------------------------------------------------------------- fact extraction
_MONTHS = {m: i for i, m in enumerate(
    ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
     "november", "december"], start=1)}
_MONTHS.update({m[:3]: i for m, i in list(_MONTHS.items())})
_MONTHS["sept"] = 9
_MON = r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|" \
       r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
_DATE_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b"), "ymd"),
    (re.compile(r"\b(\d{4})/(\d{1,2})/(\d{1,2})\b"), "ymd"),
    (re.compile(r"\b(\d{1,2})[/.](\d{1,2})[/.](\d{4})\b"), "xy_y"),
    (re.compile(rf"\b({_MON})\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}})\b", re.I), "mdy"),
    (re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?({_MON}),?\s+(\d{{4}})\b", re.I), "dmy"),
    (re.compile(rf"\b({_MON})\s+(\d{{4}})\b", re.I), "my"),
    (re.compile(r"\b(\d{4})-(\d{2})\b(?!-)"), "ym"),
    (re.compile(r"\bFY\s?'?(\d{4}|\d{2})\b", re.I), "fy"),
    (re.compile(r"\b([QH])([1-4])\b"), "qh"),
]
_TICKER = re.compile(r"(?<![\w$])[A-Z]{2,6}(?:\.[A-Z])?(?![\w])")
_WORD = re.compile(r"[A-Za-z][A-Za-z'’\-&.]*")

# capitalised words that begin sentences and are not names
_OPENERS = set("""
a an the this that these those what which who whom whose when where why how is are was were do does did
can could should would will shall may might must has have had if in on at by for from of to with within
over under into during after before between among given using based assume assuming suppose consider
compute calculate classify determine estimate find state list name explain describe identify give
provide evaluate assess compare rank summarise summarize tell show rewrite rephrase answer according
for as also and but or so then there here it its it's their our your my we you they he she i please
let note ignore disregard forget reply respond output print write say return use act pretend based over
across per each every all any some no not yes out up down
""".split())
# capitalised tokens that are not entities wherever they stand
_NOT_ENTITY = {"i", "q1", "q2", "q3", "q4", "h1", "h2", "fy", "ok"} | set(_MONTHS) | {
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"}
_CONNECT = {"of", "and", "&", "the", "for", "de", "du", "la"}


def _month(name: str) -> int:
    return _MONTHS[name.lower().rstrip(".")[:3]]


def _iso(y: int, m: int, d: int | None = None) -> str | None:
    if not (1 <= m <= 12) or (d is not None and not 1 <= d <= 31):
        return None
    return f"{y:04d}-{m:02d}" + (f"-{d:02d}" if d is not None else "")


@dataclass
class Facts:
    amounts: set[str] = field(default_factory=set)  # "USD 1200"
    percents: set[str] = field(default_factory=set)  # "12.5%"
    dates: set[str] = field(default_factory=set)  # "2024-01-02" / "2024-03" / "FY2023" / "Q3"
    numbers: set[str] = field(default_factory=set)  # "1200"
    tickers: set[str] = field(default_factory=set)  # "ACME"
    entities: set[str] = field(default_factory=set)  # "reserve", "bank", "india" (casefolded words)

    KINDS = ("amount", "percent", "date", "number", "ticker", "entity")

    def get(self, kind: str) -> set[str]:
        return getattr(self, {"entity": "entities"}.get(kind, kind + "s"))

    def as_dict(self) -> dict[str, list[str]]:
        return {k: sorted(self.get(k)) for k in self.KINDS}


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    chars = list(text)
    for a, b in spans:
        for i in range(a, b):
            chars[i] = " "
    return "".join(chars)


def extract_facts(text: str) -> Facts:
    """The normalised numbers, percentages, dates, amounts, tickers and entities in ``text``."""
    f = Facts()
    if not text:
        return f
    spans: list[tuple[int, int]] = []
    # dates first: their digits must not count as numbers
    for pat, kind in _DATE_PATTERNS:
        for m in pat.finditer(_mask(text, spans)):
            g = m.groups()
            iso = None
            if kind == "ymd":
                iso = _iso(int(g[0]), int(g[1]), int(g[2]))
            elif kind == "xy_y":
                a, b, y = int(g[0]), int(g[1]), int(g[2])
                iso = _iso(y, b, a) if a > 12 else _iso(y, a, b)
            elif kind == "mdy":
                iso = _iso(int(g[2]), _month(g[0]), int(g[1]))
            elif kind == "dmy":
                iso = _iso(int(g[2]), _month(g[1]), int(g[0]))
            elif kind == "my":
                iso = _iso(int(g[1]), _month(g[0]))
            elif kind == "ym":
                iso = _iso(int(g[0]), int(g[1]))
            elif kind == "fy":
                iso = "FY" + (g[0] if len(g[0]) == 4 else "20" + g[0])
            elif kind == "qh" and (g[0] == "Q" or g[1] in "12"):
                iso = g[0] + g[1]
            if iso:
                f.dates.add(iso)
                spans.append(m.span())
    # then every figure, from the one parser; amounts and percentages are masked for tickers and entities
    for fig in find_numbers(_mask(text, spans), skip_dates=False):
        if fig.currency:
            f.amounts.add(f"{fig.currency} {format_number(round(abs(fig.value), 6))}")
        elif fig.is_percent:
            f.percents.add(format_number(-fig.written if fig.sign == "-" else fig.written) + "%")
        else:
            f.numbers.add(format_number(fig.written))
            continue
        spans.append(fig.span)
    masked = _mask(text, spans)
    for m in _TICKER.finditer(masked):
        tok = m.group(0)
        if tok.lower() not in _NOT_ENTITY and tok not in {"OK"}:
            f.tickers.add(tok)
    f.entities = _entities(masked)
    return f


def _entities(text: str) -> set[str]:
    words: set[str] = set()
    sentence_start = True
    for m in _WORD.finditer(text):
        raw = m.group(0)
        tok = raw.rstrip(".'’").removesuffix("'s").removesuffix("’s").rstrip(".'’")
        before = text[max(0, m.start() - 3):m.start()]
        if re.search(r"[.?!:;\n]\s*$", before) or m.start() == 0 or not text[:m.start()].strip():
            sentence_start = True
        low = tok.lower()
        is_cap = tok[:1].isupper() and not tok.isupper()  # ALL-CAPS tokens are tickers
        if is_cap and low not in _NOT_ENTITY and not (sentence_start and low in _OPENERS):
            for part in re.split(r"[-&]", low):
                if part and part not in _CONNECT:
                    words.add(part)
        sentence_start = raw.endswith(".") and len(raw) > 2 and not raw[:-1].isupper() and "." not in raw[:-1]
    return words


def _word_present(word: str, text_low: str) -> bool:
    return re.search(rf"(?<![a-z]){re.escape(word)}(?![a-z])", text_low) is not None


def _is_acronym_of(token: str, text: str) -> bool:
    words = re.findall(r"[a-z]+", text.lower())
    initials = "".join(w[0] for w in words if w not in {"of", "and", "the"})
    full = "".join(w[0] for w in words)
    return len(token) >= 2 and (token.lower() in initials or token.lower() in full)


def compare_facts(original: str, candidate: str) -> Verdict:
    """Every fact of ``original`` is in ``candidate``, and ``candidate`` adds no numeric fact or ticker."""
    fo, fc = extract_facts(original), extract_facts(candidate)
    cand_low = candidate.lower()
    for kind in Facts.KINDS:
        if kind == "entity":
            missing = sorted(w for w in fo.entities if not _word_present(w, cand_low))
        else:
            missing = sorted(fo.get(kind) - fc.get(kind))
        if missing:
            return fail(f"missing_{kind}", ", ".join(missing))
    for kind in ("amount", "percent", "date", "number", "ticker"):
        added = sorted(fc.get(kind) - fo.get(kind))
        if kind == "ticker":  # "LGD" for "loss given default" is an abbreviation, not a new name
            added = [t for t in added if not _is_acronym_of(t, original)]
        if added:
            return fail(f"added_{kind}", ", ".join(added))
    return OK


# ----------------------------------------------------------------------------- key terms
# Opposite word families: a candidate that brings in one side where the original had only the other
# flips the question ("latest intraday low" -> "latest intraday high").
_OPPOSITES: list[tuple[frozenset[str], frozenset[str]]] = [(frozenset(a.split()), frozenset(b.split())) for a, b in [
    ("low lower lowest", "high higher highest"),
    ("minimum min minimal", "maximum max maximal"),
    ("gain gains gained", "loss losses lose lost"),
    ("above", "below"),
    ("increase increased increases rise rises rose", "decrease decreased decreases fall falls fell"),
    ("buy buying bought", "sell selling sold"),
    ("long", "short"),
    ("positive", "negative"),
    ("earliest", "latest"),
    ("best", "worst"),
    ("upgrade upgrades upgraded", "downgrade downgrades downgraded"),
    ("inflow inflows", "outflow outflows"),
    ("asset assets", "liability liabilities"),
    ("bid", "ask"),
]]
# Finance terms that carry the question's meaning: kept as written (by word stem) or as an alias.
_TERMS: list[tuple[str, tuple[str, ...]]] = [
    ("drawdown", ()), ("volatil", ("vol",)), ("volume", ()), ("spread", ()), ("yield", ()), ("coupon", ()),
    ("rating", ("rated",)), ("default", ("pd", "lgd")), ("exposure", ("ead",)), ("liquidity", ("lcr", "nsfr")),
    ("leverage", ()), ("sentiment", ()), ("moving average", ("sma", "ema")), ("coverage", ("lcr",)),
    ("expected loss", ("el",)), ("value at risk", ("var",)), ("intraday", ()), ("dividend", ()),
    ("duration", ()), ("inflation", ()), ("repo", ()), ("capital", ("cet1", "tier")), ("drawdown", ()),
    ("headline", ()), ("risk-weighted", ("rwa",)),
]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def check_terms(original: str, candidate: str) -> Verdict:
    """No flipped opposite (low -> high) and no dropped key finance term (liquidity, drawdown, ...)."""
    wo, wc = _words(original), _words(candidate)
    for a, b in _OPPOSITES:
        for x, y in ((a, b), (b, a)):
            if wo & x and not wo & y and wc & y:
                return fail("flipped_term", f"{sorted(wo & x)[0]} -> {sorted(wc & y)[0]}")
    lo, lc = original.lower(), candidate.lower()
    for stem, aliases in _TERMS:
        # a whole word, plural or inflected ("repo" is not "Report"); "volatil" is a stem on purpose
        pat = rf"(?<![a-z]){re.escape(stem)}" + ("" if stem == "volatil" else r"(?:s|es|d|ed|ing)?(?![a-z])")
        if re.search(pat, lo) and not re.search(pat, lc) and not any(al in wc for al in aliases):
            return fail("missing_term", stem)
    return OK


# ----------------------------------------------------------------------------- meaning drift
# What a small model does to a question that the fact checks cannot see (hand-labelled real outputs,
# tests/data/rephrase_real*.jsonl): it appends a second question, adds a condition, brings in another
# finance quantity, drops half of a compound question, or writes the label into a classification instruction.

# a clause that asks something more: "..., and what is ...", "... or is it ...", "... and by how much ..."
_ASK = (r"(?:what|which|who|whom|whose|when|where|why|how|is|are|was|were|do|does|did|can|could|should|would|"
        r"will|has|have|had|whether)")
_JOINED_ASK = re.compile(rf"\b(?:and|or|but|also|plus)\s+(?:(?:by|in|to|at|for|of)\s+)?{_ASK}\b", re.I)


def question_parts(text: str) -> int:
    """How many things ``text`` asks: its question marks (at least one) plus the clauses joined on with
    and / or / but that open with an interrogative ("..., and does it meet the minimum?")."""
    return max(1, text.count("?")) + len(_JOINED_ASK.findall(text))


def check_parts(original: str, candidate: str) -> Verdict:
    """The candidate asks as many things as the original: none appended, none dropped."""
    po, pc = question_parts(original), question_parts(candidate)
    if pc > po:
        return fail("added_question", f"{pc} parts vs {po}")
    if pc < po:
        return fail("dropped_question", f"{pc} parts vs {po}")
    return OK


_CONDITION = re.compile(r"\b(?:if|suppose|supposing|assume|assumed|assuming|provided|unless|hypothetical|"
                        r"hypothetically|imagine|in case|in the event|given that|were to|had been)\b|,\s*say\b",
                        re.I)


def check_condition(original: str, candidate: str) -> Verdict:
    """No condition or hypothetical that the original does not have ("If capital requirements rise, ...")."""
    co, cc = _CONDITION.findall(original), _CONDITION.findall(candidate)
    if len(cc) > len(co):
        return fail("added_condition", cc[-1].strip(", ").lower())
    return OK


# Finance quantities and instruments, each with the words that name it. A candidate that names a group the
# original does not is asking about something else ("expected loss" -> "expected loss given default",
# "revenue" -> "profit"). Longer names are matched first and masked, so "loss given default" is not also
# "default", and "common equity tier 1" is not also "equity".
_TERM_GROUPS: list[tuple[str, ...]] = [
    ("loss given default", "lgd"), ("probability of default", "default probability", "pd"),
    ("exposure at default", "ead"), ("expected loss", "el"), ("value at risk", "var"),
    ("revenue", "revenues", "sales", "turnover", "top line"),
    ("profit", "profits", "net income", "earnings", "bottom line", "eps"),
    ("operating income", "operating profit", "ebit"), ("ebitda",), ("margin", "margins"),
    ("cash flow", "cash flows", "free cash flow"), ("dividend", "dividends", "payout"),
    ("yield", "yields"), ("coupon", "coupons"), ("duration",), ("convexity",), ("spread", "spreads"),
    ("volatility", "volatile", "vol"), ("return", "returns", "gain or lose", "gain or loss"), ("drawdown", "drawdowns"),
    ("moving average", "moving averages", "sma", "ema"), ("volume", "volumes", "shares traded"),
    ("market cap", "market capitalisation", "market capitalization"),
    ("common equity tier 1", "cet1"), ("tier 1",), ("tier 2",), ("leverage ratio",),
    ("liquidity coverage ratio", "liquidity coverage", "lcr"), ("net stable funding ratio", "nsfr"),
    ("risk-weighted assets", "risk weighted assets", "rwa", "rwas"), ("capital buffer", "buffer"),
    ("inflation", "cpi"), ("gdp",), ("interest rate", "interest rates", "policy rate", "repo rate"),
    ("exposure", "exposures"), ("bond", "bonds"), ("loan", "loans"), ("deposit", "deposits"), ("mortgage", "mortgages"),
    ("option", "options"), ("future", "futures"), ("swap", "swaps"), ("fund", "funds"),
    ("bondholders", "bondholder", "creditors", "creditor", "lenders"),
    ("shareholders", "shareholder", "stockholders", "stockholder", "investors", "investor"),
    ("price", "prices", "priced", "close", "closed", "closing", "traded at", "trade at", "quoted"),
    ("debt", "borrowing", "borrowings", "liabilities"), ("asset", "assets"),
    ("chief executive", "chief executive officer", "ceo"), ("chief financial officer", "cfo", "finance chief"),
    ("audit", "audits", "audited", "auditor", "auditors"),
    ("underwriter", "underwriters", "underwriting", "underwrote"),
    ("headquarters", "headquartered", "head office"), ("founded", "established", "incorporated"),
    ("listing", "listed", "stock exchange", "exchange", "bourse"),
    ("tax", "taxes"), ("fee", "fees"), ("premium", "premiums"), ("rating", "ratings", "rated"),
]
_TERM_GROUP_OF = {w: i for i, g in enumerate(_TERM_GROUPS) for w in g}
_TERM_PATTERNS = [(w, re.compile(rf"(?<![a-z0-9]){re.escape(w)}(?![a-z0-9])")) for w in _TERM_GROUP_OF]


def finance_terms(text: str) -> set[int]:
    """The term groups ``text`` names (indices into the group list). Every name is found, overlapping ones
    too ("expected loss given default" names expected loss and loss given default); a name inside a longer
    one ("tier 1" in "common equity tier 1") does not count."""
    low = text.lower()
    spans = [(m.start(), m.end(), w) for w, pat in _TERM_PATTERNS if w in low for m in pat.finditer(low)]
    return {_TERM_GROUP_OF[w] for a, b, w in spans
            if not any(a2 <= a and b <= b2 and (b2 - a2) > (b - a) for a2, b2, _ in spans)}


def check_added_term(original: str, candidate: str) -> Verdict:
    """No finance quantity, instrument or stakeholder that the original does not name."""
    added = finance_terms(candidate) - finance_terms(original)
    if added:
        return fail("added_term", ", ".join(_TERM_GROUPS[i][0] for i in sorted(added)))
    return OK


def check_label_presupposed(original: str, candidate: str, labels: list[str]) -> Verdict:
    """A classification instruction names each label no more often than the original does: a candidate that
    says "if the headline is positive" has chosen the answer before asking."""
    lo, lc = original.lower(), candidate.lower()
    for label in labels:
        pat = rf"(?<![a-z]){re.escape(label.lower())}(?![a-z])"
        if len(re.findall(pat, lc)) > len(re.findall(pat, lo)):
            return fail("presupposes_label", label)
    return OK


# What else a small model adds or leaves out ("... for this exposure?", "How would we use ...?", "... what is
# its next close?"): the content words of the two questions, compared. Function words, the words a paraphrase
# of a quantity question reaches for ("how large", "how deep") and task verbs do not count; the names of one
# finance term group count as one word ("CEO" = "chief executive"); "window", "period" and "range" are one word.
_FUNCTION_WORDS = set("""
a an the this that these those what which who whom whose when where why how is are was were be been being do does
did can could should would will shall may might must has have had of in on at by for from to with within into onto
over under and or but so as than then its it their his her our your my we you they he she i me us them there here
not no yes any some each every all both either neither per via about across during after before between among
according based given using use used shown show shows
far deep large big much many size value level amount figure number home located
report give tell find state provide name compute calculate determine identify classify
deliver delivered post posted record recorded reach reached see saw make made achieve achieved register registered
""".split())
_SAME_WORD = [{"window", "period", "range"}, {"close", "closed", "closing", "closes"}, {"price", "prices", "priced"}]


def content_words(text: str) -> set[str]:
    """The content words of ``text``, lower-cased and crudely stemmed; a finance term's names as one token."""
    low = text.lower()
    out = {f"term{i}" for i in finance_terms(low)}
    for w, pat in _TERM_PATTERNS:  # a named term's own words are covered by its token
        if w in low and _TERM_GROUP_OF[w] in {int(t[4:]) for t in out}:
            low = pat.sub(" ", low)
    for w in re.findall(r"[a-z][a-z0-9\-']*", low):
        w = w.strip("'").removesuffix("'s")
        if len(w) < 2 or w in _FUNCTION_WORDS:
            continue
        stem = next((w[: -len(x)] for x in ("ing", "ed", "es", "s") if len(w) > 4 and w.endswith(x)), w)
        out.add(next((f"same{i}" for i, g in enumerate(_SAME_WORD) if w in g or stem in g), stem))
    return out


def check_content(original: str, candidate: str, max_new: int | None, max_dropped: int | None) -> Verdict:
    """At most ``max_new`` content words the original does not have, at most ``max_dropped`` of its own left out."""
    co, cc = content_words(original), content_words(candidate)
    new, dropped = sorted(cc - co), sorted(co - cc)
    if max_new is not None and len(new) > max_new:
        return fail("added_content", ", ".join(w for w in new if not w.startswith(("term", "same"))) or "term")
    if max_dropped is not None and len(dropped) > max_dropped:
        return fail("dropped_content", ", ".join(w for w in dropped if not w.startswith(("term", "same"))) or "term")
    return OK


# ----------------------------------------------------------------------------- individual checks
_INTERROGATIVE = set("""
what which who whom whose when where why how is are was were do does did can could should would will
shall may might has have had compute calculate classify determine estimate find state list name explain
describe identify give provide evaluate assess compare rank summarise summarize tell show predict
select choose decide label categorize categorise report scale convert express annualise annualize derive
apply answer quantify measure
""".split())
_OPENERS |= _INTERROGATIVE | {"rule", "hint", "context", "headline", "table", "scenario", "task", "between"}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def is_question(text: str) -> bool:
    """Some sentence ends with '?' or starts with an interrogative or an imperative task verb."""
    t = text.strip()
    if not t:
        return False
    for sentence in re.split(r"(?<=[.?!:;])\s+", t):
        if sentence.rstrip("\"'”’ )").endswith("?"):
            return True
        first = re.match(r"[A-Za-z]+", sentence.lstrip("\"'“‘(*- "))
        if first and first.group(0).lower() in _INTERROGATIVE:
            return True
    return False


def check_intent(original: str, candidate: str) -> Verdict:
    if is_question(original) and not is_question(candidate):
        return fail("not_a_question")
    return OK


def check_length(original: str, candidate: str, bounds: tuple[float, float]) -> Verdict:
    r = len(candidate.strip()) / max(1, len(original.strip()))
    if not bounds[0] <= r <= bounds[1]:
        return fail("length_ratio", f"{r:.2f} outside [{bounds[0]}, {bounds[1]}]")
    return OK


def char_ratio(a: str, b: str) -> float:
    return SequenceMatcher(None, _norm(a), _norm(b), autojunk=False).ratio()


def check_near_copy(original: str, candidate: str, kept: list[str], max_ratio: float) -> Verdict:
    r = char_ratio(original, candidate)
    if r >= max_ratio:
        return fail("near_copy", f"char ratio {r:.3f} >= {max_ratio}")
    for other in kept:
        r = char_ratio(other, candidate)
        if r >= max_ratio:
            return fail("duplicate_rephrase", f"char ratio {r:.3f} >= {max_ratio} to a kept rephrasing")
    return OK


def check_similarity(cosine: float, low: float, high: float) -> Verdict:
    if cosine < low:
        return fail("off_topic", f"cosine {cosine:.3f} < {low}")
    if cosine > high:
        return fail("too_similar", f"cosine {cosine:.3f} > {high}")
    return OK


def _answer_values(row: dict[str, Any]) -> list[tuple[float, str]]:
    vals = []
    for v in (row.get("metadata") or {}).get("answer_values") or []:
        try:
            vals.append((float(v["value"]), str(v.get("unit") or "")))
        except (KeyError, TypeError, ValueError):
            continue
    return vals


def _decimals(s: str) -> int:
    return len(s.split(".")[1]) if "." in s else 0


def check_answer_leak(original: str, candidate: str, row: dict[str, Any]) -> Verdict:
    """The answer's figures or label must not newly appear in the candidate."""
    answer = str(row.get("answer") or "")
    fo, fc = extract_facts(original), extract_facts(candidate)
    # figures: from metadata["answer_values"] and from the answer text
    new_nums = {s for s in (fc.numbers - fo.numbers)} | {s.rstrip("%") for s in fc.percents - fo.percents}
    new_nums |= {s.split(" ", 1)[1] for s in fc.amounts - fo.amounts}
    fa = extract_facts(answer)
    answer_nums = [(float(s), s) for s in fa.numbers | {p.rstrip("%") for p in fa.percents}
                   | {a.split(" ", 1)[1] for a in fa.amounts}]
    answer_nums += [(v, format_number(round(v, 6))) for v, _ in _answer_values(row)]
    for s in sorted(new_nums):
        x = float(s)
        for v, shown in answer_nums:
            # the candidate shows the answer, possibly rounded to the candidate's own precision
            if x == v or (_decimals(s) > 0 and abs(x - v) <= 0.5 * 10 ** -_decimals(s) + 1e-12):
                return fail("leaks_answer", f"answer figure {shown} appears as {s}")
    for d in sorted(fc.dates - fo.dates):
        if d in fa.dates:
            return fail("leaks_answer", f"answer date {d}")
    # a short answer (a label, a name): its words must not newly appear
    short = answer.strip().strip(".")
    if short and len(short.split()) <= 4 and not extract_facts(short).numbers:
        low_o, low_c = original.lower(), candidate.lower()
        ans = short.lower()
        if _word_present(ans, low_c):
            if not _word_present(ans, low_o):
                return fail("leaks_answer", f"answer {short!r} appears")
            labels = [str(x).lower() for x in row.get("labels") or []]
            # the original offers every label; a candidate naming only the answer reveals it
            if labels and all(_word_present(x, low_o) for x in labels) and \
                    not all(_word_present(x, low_c) for x in labels):
                return fail("leaks_answer", f"answer {short!r} kept, other labels dropped")
    return OK


# ----------------------------------------------------------------------------- all together
@dataclass(frozen=True)
class RephraseChecks:
    sim_low: float = 0.71
    sim_high: float = 0.98
    near_copy_char_ratio: float = 0.95
    length_ratio: tuple[float, float] = (0.5, 2.0)
    drift: bool = True  # the meaning-drift checks (parts, condition, term, label, content); False only to measure
    # content words a candidate may add / leave out; None: no limit. A small base model needs a tight limit
    # (the demo's 0 / 1, chosen on the calibration split, docs/augment.md); a capable teacher rewords freely
    max_new_words: int | None = None
    max_dropped_words: int | None = None

    @classmethod
    def from_config(cls, aug: Any) -> RephraseChecks:
        return cls(aug.sim_low, aug.sim_high, aug.near_copy_char_ratio, tuple(aug.length_ratio),
                   max_new_words=aug.max_new_words, max_dropped_words=aug.max_dropped_words)


def validate_rephrasing(row: dict[str, Any], candidate: str | None, *, cosine: float | None,
                        kept: list[str] = (), checks: RephraseChecks = RephraseChecks()) -> Verdict:
    """All checks in a fixed order; the first failure is the verdict. ``cosine`` None skips the band."""
    try:
        original = row["question"]
        if not isinstance(original, str):
            raise TypeError(f"question is {type(original).__name__}, not str")
        if candidate is None or not candidate.strip():
            return fail("empty")
        verdicts = [check_length(original, candidate, checks.length_ratio),
                    check_intent(original, candidate),
                    check_answer_leak(original, candidate, row),
                    compare_facts(original, candidate),
                    check_terms(original, candidate)]
        if checks.drift:
            verdicts += [check_parts(original, candidate),
                         check_condition(original, candidate),
                         check_added_term(original, candidate),
                         check_label_presupposed(original, candidate, [str(x) for x in row.get("labels") or []]),
                         check_content(original, candidate, checks.max_new_words, checks.max_dropped_words)]
        verdicts.append(check_near_copy(original, candidate, list(kept), checks.near_copy_char_ratio))
        for v in verdicts:
            if not v.ok:
                return v
        if cosine is not None:
            return check_similarity(cosine, checks.sim_low, checks.sim_high)
        return OK
    except Exception as e:  # a validator bug must not kill a stage: it is a rejection with a reason
        return fail("validator_error", f"{type(e).__name__}: {e}")
