"""Turn price windows into context-grounded QA whose answers are computed by code.

Each question's context is a small table of ``window_days`` daily rows (Date, Open, High, Low, Close,
Volume) plus one sentence naming the ticker and the period; the answer is computed from exactly the
figures in that table (prices rounded to cents, as shown) and nothing else. Question types (one
category each, ``questions_per_type`` items per type (an int: categories are balanced; or a count per type)):

==================  ========================  ================================================
type                category                  answer
==================  ========================  ================================================
latest_value        market_price_lookup       latest close / high / low / volume
period_return       market_return             (close_t / close_{t-N} - 1) * 100
volatility          market_volatility         std(daily log returns, ddof=1) * sqrt(252) * 100
max_drawdown        market_drawdown           max over t of (1 - close_t / running peak) * 100
ma_trend            market_trend              latest close above / below its K-day SMA
comparison          market_comparison         which of two tickers returned more (two tables)
risk_level          market_risk_level         low / medium / high by the stated vol rule
==================  ========================  ================================================

All are ``numeric_qa`` except ``risk_level`` (``classification`` with labels low/medium/high).
Exact figures go into ``metadata["answer_values"]``. Generation is seeded; ids come from
:func:`~datagen.schema.stable_id` over the question's defining parts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from datagen.config import QUESTION_TYPES, MarketConfig
from datagen.schema import Sample, stable_id
from datagen.sources.market import MarketData

log = logging.getLogger(__name__)

CATEGORIES: dict[str, str] = {
    "latest_value": "market_price_lookup", "period_return": "market_return",
    "volatility": "market_volatility", "max_drawdown": "market_drawdown", "ma_trend": "market_trend",
    "comparison": "market_comparison", "risk_level": "market_risk_level"}
RISK_LABELS = ["low", "medium", "high"]
TREND_LABELS = ("above", "below", "equal to")
TABLE_COLUMNS = ["Date", "Open", "High", "Low", "Close", "Volume"]
VOL_FORMULA = "standard deviation (sample, n-1) of the daily log returns of the closes x sqrt(252)"


# ----------------------------------------------------------------------------- pure computations
def period_return(closes: np.ndarray, n: int) -> float:
    """Percent return over the last ``n`` trading days: (last / close n rows earlier - 1) * 100."""
    closes = np.asarray(closes, dtype=float)
    if not 1 <= n < len(closes):
        raise ValueError(f"return over {n} days needs at least {n + 1} closes, got {len(closes)}")
    return (closes[-1] / closes[-1 - n] - 1.0) * 100.0


def annualised_volatility(closes: np.ndarray) -> float:
    """Percent annualised volatility: sample std of daily log returns * sqrt(252) * 100."""
    lr = np.diff(np.log(np.asarray(closes, dtype=float)))
    if len(lr) < 2:
        raise ValueError("volatility needs at least 3 closes")
    return float(np.std(lr, ddof=1) * math.sqrt(252) * 100.0)


def max_drawdown(closes: np.ndarray) -> tuple[float, int, int]:
    """(percent max drawdown as a positive number, peak index, trough index) of a close series."""
    c = np.asarray(closes, dtype=float)
    peaks = np.maximum.accumulate(c)
    dd = 1.0 - c / peaks
    trough = int(np.argmax(dd))
    peak = int(np.argmax(c[: trough + 1]))
    return float(dd[trough] * 100.0), peak, trough


def sma(closes: np.ndarray, k: int) -> float:
    """Simple moving average of the last ``k`` closes (the latest included)."""
    c = np.asarray(closes, dtype=float)
    if not 1 <= k <= len(c):
        raise ValueError(f"SMA({k}) needs at least {k} closes")
    return float(c[-k:].mean())


def risk_level(vol_pct: float, thresholds: tuple[float, float]) -> str:
    """low if vol < a; medium if a <= vol < b; high if vol >= b (thresholds as fractions, vol in %)."""
    a, b = (t * 100.0 for t in thresholds)
    return "low" if vol_pct < a else ("medium" if vol_pct < b else "high")


# ----------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Window:
    scenario: str
    frames: tuple[tuple[str, pd.DataFrame], ...]  # (ticker, rows) — one, or two for comparisons

    @property
    def tickers(self) -> list[str]:
        return [t for t, _ in self.frames]

    @property
    def dates(self) -> pd.Series:
        return self.frames[0][1]["date"]


def _segments(prices: pd.DataFrame, min_len: int) -> dict[str, dict[str, list[pd.DataFrame]]]:
    """scenario -> ticker -> runs of consecutive rows in that regime at least ``min_len`` long."""
    out: dict[str, dict[str, list[pd.DataFrame]]] = {}
    for ticker, g in prices.groupby("ticker", sort=True):
        g = g.reset_index(drop=True)
        run_id = (g["regime"] != g["regime"].shift()).cumsum()
        for _, run in g.groupby(run_id, sort=True):
            if len(run) >= min_len:
                out.setdefault(str(run["regime"].iloc[0]), {}).setdefault(str(ticker), []).append(
                    run.reset_index(drop=True))
    return out


def _shown(rows: pd.DataFrame) -> pd.DataFrame:
    """The window as it appears in the context: prices rounded to cents."""
    rows = rows.copy()
    for c in ("open", "high", "low", "close"):
        rows[c] = rows[c].astype(float).round(2)
    return rows.reset_index(drop=True)


def _pick_window(segs, scenario: str, n: int, rng: np.random.Generator, pair: bool) -> Window | None:
    by_ticker = segs[scenario]
    tickers = sorted(by_ticker)
    if pair:
        if len(tickers) < 2:
            return None
        a, b = (tickers[i] for i in sorted(rng.choice(len(tickers), size=2, replace=False)))
        ra = by_ticker[a][int(rng.integers(len(by_ticker[a])))]
        common = ra.merge(pd.concat(by_ticker[b]), on="date", suffixes=("", "_b"))
        if len(common) < n:
            return None
        s = int(rng.integers(len(common) - n + 1))
        dates = common["date"].iloc[s:s + n]
        fa = ra[ra["date"].isin(dates)]
        fb = pd.concat(by_ticker[b])
        fb = fb[fb["date"].isin(dates)]
        return Window(scenario, ((a, _shown(fa)), (b, _shown(fb))))
    t = tickers[int(rng.integers(len(tickers)))]
    run = by_ticker[t][int(rng.integers(len(by_ticker[t])))]
    s = int(rng.integers(len(run) - n + 1))
    return Window(scenario, ((t, _shown(run.iloc[s:s + n])),))


# ----------------------------------------------------------------------------- rendering
def _d(ts: Any) -> str:
    return pd.Timestamp(ts).strftime("%Y-%m-%d")


def _p(x: float) -> str:
    return f"{x:.2f}"


def _row(r: pd.Series) -> list[str]:
    return [_d(r["date"]), _p(r["open"]), _p(r["high"]), _p(r["low"]), _p(r["close"]), str(int(r["volume"]))]


def _context(w: Window, md: MarketData) -> dict[str, Any]:
    start, end, n = _d(w.dates.iloc[0]), _d(w.dates.iloc[-1]), len(w.dates)
    if md.provider == "simulator":
        note = " Simulated prices of fictional tickers, in USD; volume in shares."
    else:
        note = " Volume in shares." if not md.currency else f" Prices in {md.currency}; volume in shares."
    if len(w.frames) == 1:
        (t, rows), = w.frames
        text = f"Daily prices of {t} from {start} to {end} ({n} trading days).{note}"
        table = {"columns": TABLE_COLUMNS, "rows": [_row(r) for _, r in rows.iterrows()]}
    else:
        names = " and ".join(w.tickers)
        text = (f"Daily prices of {names} over the same {n} trading days, {start} to {end}; the table lists "
                f"{w.tickers[0]}'s rows first, then {w.tickers[1]}'s.{note}")
        table = {"columns": ["Ticker", *TABLE_COLUMNS],
                 "rows": [[t, *_row(r)] for t, rows in w.frames for _, r in rows.iterrows()]}
    return {"text": text, "table": table}


def _val(name: str, value: float, unit: str, exact: bool = False) -> dict[str, Any]:
    """An expected figure for the grader; ``exact``: a value copied from the table as shown (graded
    without the relative tolerance that computed figures get)."""
    return {"name": name, "value": round(float(value), 6), "unit": unit} | ({"exact": True} if exact else {})


# ----------------------------------------------------------------------------- question builders
# Each builder: (window, index, rng, config, currency) -> dict with question, answer, answer_values,
# params (what defines the question besides the window), template index; optional labels/reasoning.
_LATEST_FIELDS = ("close", "high", "low", "volume")
_LATEST_T = (
    "What was {t}'s {f} on {d}, the last day in the table?",
    "According to the table, what is the latest {f} of {t}?",
    "Looking at the most recent trading day shown ({d}), what {f} did {t} record?",
    "Report {t}'s {f} for the final row of the price table.",
)


def _q_latest(w: Window, i: int, rng, mc: MarketConfig, cur: str) -> dict:
    (t, rows), = w.frames
    f = _LATEST_FIELDS[i % len(_LATEST_FIELDS)]
    last = rows.iloc[-1]
    k = int(rng.integers(len(_LATEST_T)))
    name = {"close": "closing price", "high": "intraday high", "low": "intraday low", "volume": "trading volume"}[f]
    d = _d(last["date"])
    if f == "volume":
        v = int(last["volume"])
        shown, unit = f"{v} shares", "shares"
    else:
        v = float(_p(float(last[f])))  # the cell as the table shows it
        shown, unit = (_p(v) + (f" {cur}" if cur else "")), cur
    return {"question": _LATEST_T[k].format(t=t, f=name, d=d),
            "answer": f"{shown}: the {f.capitalize()} column of the last row ({d}).",
            "answer_values": [_val(f, v, unit, exact=True)], "params": {"field": f}, "template": k}


_RETURN_T = (
    "What was {t}'s return over the last {n} trading days shown, from the close on {d0} to the close on {d1}?",
    "By what percentage did {t}'s closing price change between {d0} and {d1}?",
    "Compute the {n}-day price return of {t} ending on {d1}, based on closing prices.",
    "Using the closes in the table, how much did {t} gain or lose in percent over the {n} trading days to {d1}?",
)


def _q_return(w: Window, i: int, rng, mc: MarketConfig, cur: str) -> dict:
    (t, rows), = w.frames
    c = rows["close"].to_numpy()
    choices = sorted({len(c) - 1, min(5, len(c) - 1), min(3, len(c) - 1)})
    n = choices[i % len(choices)]
    r = period_return(c, n)
    d0, d1 = _d(rows["date"].iloc[-1 - n]), _d(rows["date"].iloc[-1])
    k = int(rng.integers(len(_RETURN_T)))
    return {"question": _RETURN_T[k].format(t=t, n=n, d0=d0, d1=d1),
            "answer": f"{r:+.2f}%: ({_p(c[-1])} / {_p(c[-1 - n])} - 1) x 100, using the closes of {d0} and {d1}.",
            "answer_values": [_val("return", r, "%")], "params": {"n": n}, "template": k}


_VOL_T = (
    ("What is the annualised volatility of {t} over this window, computed as the sample standard deviation of "
    "daily log returns of the closing prices times sqrt(252)?"),
    ("Estimate {t}'s annualised volatility from the {n} closes in the table (use daily log returns, sample "
    "standard deviation, and annualise with sqrt(252))."),
    ("Using daily log returns of the close, annualised with the square root of 252 trading days, how volatile "
    "was {t} between {d0} and {d1}?"),
)


def _q_vol(w: Window, i: int, rng, mc: MarketConfig, cur: str) -> dict:
    (t, rows), = w.frames
    c = rows["close"].to_numpy()
    v = annualised_volatility(c)
    k = int(rng.integers(len(_VOL_T)))
    daily = v / 100 / math.sqrt(252)
    return {"question": _VOL_T[k].format(t=t, n=len(c), d0=_d(rows["date"].iloc[0]), d1=_d(rows["date"].iloc[-1])),
            "answer": f"{v:.2f}%: annualised volatility = {VOL_FORMULA}; the daily standard deviation over "
                      f"{len(c) - 1} log returns is {daily:.5f}.",
            "answer_values": [_val("annualised_volatility", v, "%")], "params": {}, "template": k}


_DD_T = (
    "What was the maximum drawdown of {t}'s closing price over the period shown?",
    "Measured on closing prices, what was {t}'s largest peak-to-trough decline between {d0} and {d1}, in percent?",
    "How deep was {t}'s worst drawdown in this window (fall of the close from its running peak)?",
)


def _q_dd(w: Window, i: int, rng, mc: MarketConfig, cur: str) -> dict:
    (t, rows), = w.frames
    c = rows["close"].to_numpy()
    dd, pk, tr = max_drawdown(c)
    k = int(rng.integers(len(_DD_T)))
    if dd == 0:
        why = "the close never fell below an earlier peak in this window."
    else:
        why = (f"the close fell from a peak of {_p(c[pk])} on {_d(rows['date'].iloc[pk])} to "
               f"{_p(c[tr])} on {_d(rows['date'].iloc[tr])}, (1 - {_p(c[tr])} / {_p(c[pk])}) x 100.")
    return {"question": _DD_T[k].format(t=t, d0=_d(rows["date"].iloc[0]), d1=_d(rows["date"].iloc[-1])),
            "answer": f"{dd:.2f}%: {why}", "answer_values": [_val("max_drawdown", dd, "%")],
            "params": {}, "template": k}


_TREND_T = (
    "Is {t}'s latest close above or below its {k}-day simple moving average of closing prices?",
    "On {d}, was {t} trading above or below the average of its last {k} closes (including that day)?",
    "Compare {t}'s most recent closing price with its {k}-day simple moving average: above or below?",
)


def _q_trend(w: Window, i: int, rng, mc: MarketConfig, cur: str) -> dict:
    (t, rows), = w.frames
    c = rows["close"].to_numpy()
    choices = sorted({min(5, len(c)), len(c)})
    kd = choices[i % len(choices)]
    ma = sma(c, kd)
    last = float(c[-1])
    label = "above" if last > ma else ("below" if last < ma else "equal to")
    k = int(rng.integers(len(_TREND_T)))
    return {"question": _TREND_T[k].format(t=t, k=kd, d=_d(rows["date"].iloc[-1])),
            "answer": f"{label.capitalize()}: the latest close {_p(last)} is {label} the {kd}-day simple moving "
                      f"average of the closes, {ma:.2f}.",
            "answer_values": [_val("latest_close", last, cur), _val(f"sma_{kd}", ma, cur)],
            "answer_label": label, "answer_choices": list(TREND_LABELS), "params": {"k": kd}, "template": k}


_CMP_T = (
    ("Which of {a} and {b} had the higher return over the window shown (first to last close), and by how many "
    "percentage points?"),
    ("Between {d0} and {d1}, did {a} or {b} perform better on a close-to-close basis? Give the gap in "
    "percentage points."),
    ("Compare the close-to-close returns of {a} and {b} over these {n} trading days: which was higher and by "
    "how much?"),
)


def _q_cmp(w: Window, i: int, rng, mc: MarketConfig, cur: str) -> dict:
    (a, ra), (b, rb) = w.frames
    n = len(ra) - 1
    xa, xb = period_return(ra["close"].to_numpy(), n), period_return(rb["close"].to_numpy(), n)
    win, lose, rw, rl = (a, b, xa, xb) if xa >= xb else (b, a, xb, xa)
    diff = rw - rl
    k = int(rng.integers(len(_CMP_T)))
    tie = round(diff, 4) == 0
    if tie:  # no winner to name (equal to four decimals): say so, with the shared return
        answer = (f"Neither: {a} and {b} both returned {xa:+.2f}% from the first to the last close, a "
                  f"difference of 0 percentage points.")
        diff = 0.0
    else:  # a gap too small for two decimals is shown with four, never as "by 0.00"
        dp = 2 if round(diff, 2) > 0 else 4
        answer = (f"{win}, by {diff:.{dp}f} percentage points: {win} returned {rw:+.{dp}f}% and {lose} "
                  f"{rl:+.{dp}f}% from the first to the last close.")
    return {"question": _CMP_T[k].format(a=a, b=b, n=len(ra), d0=_d(ra["date"].iloc[0]), d1=_d(ra["date"].iloc[-1])),
            "answer": answer,
            "answer_values": [_val(f"return_{a}", xa, "%"), _val(f"return_{b}", xb, "%"),
                              _val("difference", diff, "pp")],
            "answer_label": "tie" if tie else win, "answer_choices": [a, b, "tie"], "params": {}, "template": k}


_RISK_T = (
    ("Classify {t}'s risk level over this window. Rule: annualised volatility (sample standard deviation of "
    "daily log returns of the close x sqrt(252)) below {a}% is low, from {a}% up to {b}% is medium, {b}% or "
    "more is high. Answer low, medium or high."),
    ("Using annualised volatility of daily log returns (sample std x sqrt(252)) with the thresholds low < {a}% "
    "<= medium < {b}% <= high, what risk level does {t} fall into? Answer low, medium or high."),
    ("A desk labels a ticker low risk when its annualised volatility (sample std of daily log returns x "
    "sqrt(252)) is under {a}%, medium when it is at least {a}% but under {b}%, and high otherwise. Which label "
    "applies to {t} for the period shown?"),
)


def _q_risk(w: Window, i: int, rng, mc: MarketConfig, cur: str) -> dict:
    (t, rows), = w.frames
    v = annualised_volatility(rows["close"].to_numpy())
    a, b = (round(x * 100, 6) for x in mc.risk_vol_thresholds)
    label = risk_level(v, mc.risk_vol_thresholds)
    k = int(rng.integers(len(_RISK_T)))
    fa, fb = f"{a:g}", f"{b:g}"
    return {"question": _RISK_T[k].format(t=t, a=fa, b=fb), "answer": label, "labels": list(RISK_LABELS),
            "reasoning": f"Annualised volatility is {v:.2f}% ({VOL_FORMULA}); thresholds {fa}% and {fb}% give "
                         f"{label}.",
            "answer_values": [_val("annualised_volatility", v, "%")], "answer_label": label,
            "params": {"thresholds": [a, b]}, "template": k}


BUILDERS: dict[str, Callable[..., dict]] = {
    "latest_value": _q_latest, "period_return": _q_return, "volatility": _q_vol, "max_drawdown": _q_dd,
    "ma_trend": _q_trend, "comparison": _q_cmp, "risk_level": _q_risk}


# ----------------------------------------------------------------------------- generation
def build_market_qa(md: MarketData, mc: MarketConfig) -> list[dict[str, Any]]:
    """``mc.count(type)`` QA rows per question type from ``md``; scenarios rotate round-robin."""
    n = mc.window_days
    segs = _segments(md.prices, n)
    if not segs:
        raise ValueError(f"market data has no run of {n} consecutive rows for any ticker "
                         f"(sources.market.window_days={n})")
    scenarios = sorted(segs)
    source = f"market:{md.provider}"
    out: list[dict[str, Any]] = []
    for ti, qtype in enumerate(QUESTION_TYPES):
        rng = np.random.default_rng([mc.seed, ti])
        pair = qtype == "comparison"
        used: set[str] = set()
        for i in range(mc.count(qtype)):
            for attempt in range(64):
                scen = scenarios[(i * len(QUESTION_TYPES) + ti + attempt) % len(scenarios)]
                w = _pick_window(segs, scen, n, rng, pair)
                if w is None:
                    continue
                q = BUILDERS[qtype](w, i, rng, mc, md.currency)
                if q.get("answer_label") == "equal to":
                    continue
                sid = stable_id("market", md.provider, qtype, w.tickers, _d(w.dates.iloc[0]), _d(w.dates.iloc[-1]),
                                q["params"], q["template"])
                if sid in used:
                    continue
                used.add(sid)
                out.append(_sample(sid, source, qtype, w, q, md).to_row())
                break
            else:
                log.warning("market QA: could not build %s question %d (too few tickers or windows)", qtype, i + 1)
    return out


def _sample(sid: str, source: str, qtype: str, w: Window, q: dict, md: MarketData) -> Sample:
    meta: dict[str, Any] = {
        "answer_values": q["answer_values"], "question_type": qtype, "template": q["template"],
        "params": q["params"], "provider": md.provider,
        "window": {"tickers": w.tickers, "start": _d(w.dates.iloc[0]), "end": _d(w.dates.iloc[-1]),
                   "days": len(w.dates)}}
    for key in ("answer_label", "answer_choices", "reasoning"):
        if key in q:
            meta[key] = q[key]
    return Sample(id=sid, group_id=sid, source=source,
                  task_type="classification" if qtype == "risk_level" else "numeric_qa",
                  category=CATEGORIES[qtype], scenario=w.scenario, question=q["question"],
                  context=_context(w, md), answer=q["answer"], labels=q.get("labels"), metadata=meta)
