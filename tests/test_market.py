"""Market providers and market QA: computed answers against an independent computation."""

from __future__ import annotations

import itertools
import json
import math
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datagen.config import MarketConfig, SimulatorConfig
from datagen.sources.market import MarketDataError, fetch_yfinance, load_files, load_price_file, simulate
from datagen.sources.market_qa import (
    CATEGORIES,
    QUESTION_TYPES,
    annualised_volatility,
    build_market_qa,
    max_drawdown,
    period_return,
    risk_level,
    sma,
)

BAD = Path(__file__).parent / "data" / "bad_inputs"
EXPECTED = json.loads((BAD / "EXPECTED.json").read_text())

# A fixed, hand-written price series (two tickers, 12 trading days; 2024-01-15 is deliberately missing).
DATES = ["2024-01-08", "2024-01-09", "2024-01-10", "2024-01-11", "2024-01-12", "2024-01-16", "2024-01-17",
         "2024-01-18", "2024-01-19", "2024-01-22", "2024-01-23", "2024-01-24"]
CLOSE_A = [100.00, 101.50, 99.80, 97.25, 98.10, 102.40, 104.00, 103.20, 99.90, 101.10, 105.75, 106.30]
CLOSE_B = [50.00, 49.10, 48.70, 49.90, 51.20, 50.60, 52.80, 53.10, 52.00, 54.40, 53.90, 55.25]


def _frame(closes: list[float], vol0: int) -> pd.DataFrame:
    c = np.array(closes)
    o = np.concatenate([[c[0]], c[:-1]])
    return pd.DataFrame({"Date": DATES, "Open": o, "High": np.maximum(o, c) + 0.5, "Low": np.minimum(o, c) - 0.5,
                         "Close": c, "Volume": [vol0 + 1000 * i for i in range(len(c))]})


@pytest.fixture
def price_files(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "AAA.csv", tmp_path / "BBB.csv"
    _frame(CLOSE_A, 500_000).to_csv(a, index=False)
    _frame(CLOSE_B, 90_000).to_csv(b, index=False)
    return [a, b]


# ----------------------------------------------------------------------------- pure computations
def test_computations_on_known_series():
    c = [100.0, 110.0, 99.0, 108.9, 105.0]
    assert period_return(c, 4) == pytest.approx(5.0)
    assert period_return(c, 1) == pytest.approx((105 / 108.9 - 1) * 100)
    dd, peak, trough = max_drawdown(c)
    assert (dd, peak, trough) == (pytest.approx(10.0), 1, 2)
    assert max_drawdown([1.0, 2.0, 3.0])[0] == 0.0
    assert sma(c, 3) == pytest.approx((99 + 108.9 + 105) / 3)
    # volatility: a plain-Python sample standard deviation of log returns
    lr = [math.log(b / a) for a, b in itertools.pairwise(c)]
    m = sum(lr) / len(lr)
    sd = math.sqrt(sum((x - m) ** 2 for x in lr) / (len(lr) - 1))
    assert annualised_volatility(c) == pytest.approx(sd * math.sqrt(252) * 100)
    assert [risk_level(v, (0.2, 0.4)) for v in (19.99, 20.0, 39.99, 40.0)] == ["low", "medium", "medium", "high"]
    with pytest.raises(ValueError):
        period_return(c, 5)


def _table_frame(sample: dict) -> pd.DataFrame:
    t = sample["context"]["table"]
    df = pd.DataFrame(t["rows"], columns=t["columns"])
    for col in ("Open", "High", "Low", "Close", "Volume"):
        df[col] = pd.to_numeric(df[col])
    return df


def _independent(sample: dict) -> dict[str, float]:
    """Recompute the answer from the context table alone, with pandas, written differently from the code."""
    df = _table_frame(sample)
    meta = sample["metadata"]
    qt = meta["question_type"]
    if qt == "comparison":
        out = {}
        for t, g in df.groupby("Ticker"):
            s = g["Close"].reset_index(drop=True)
            out[f"return_{t}"] = (s.iloc[-1] - s.iloc[0]) / s.iloc[0] * 100
        a, b = meta["window"]["tickers"]
        out["difference"] = abs(out[f"return_{a}"] - out[f"return_{b}"])
        return out
    s = df["Close"]
    if qt == "latest_value":
        f = meta["params"]["field"]
        return {f: float(df[f.capitalize()].iloc[-1])}
    if qt == "period_return":
        n = meta["params"]["n"]
        return {"return": float(s.pct_change(periods=n).iloc[-1] * 100)}
    if qt in ("volatility", "risk_level"):
        return {"annualised_volatility": float(np.log(s).diff().dropna().std() * np.sqrt(252) * 100)}
    if qt == "max_drawdown":
        return {"max_drawdown": float(-(s / s.cummax() - 1).min() * 100)}
    if qt == "ma_trend":
        k = meta["params"]["k"]
        return {"latest_close": float(s.iloc[-1]), f"sma_{k}": float(s.rolling(k).mean().iloc[-1])}
    raise AssertionError(qt)


def test_market_qa_answers_match_independent_computation(price_files):
    md = load_files(price_files)
    mc = MarketConfig(provider="csv", window_days=8, questions_per_type=3, risk_vol_thresholds=(0.1, 0.3))
    rows = build_market_qa(md, mc)
    assert Counter(r["category"] for r in rows) == {c: 3 for c in CATEGORIES.values()}
    for r in rows:
        got = {v["name"]: v["value"] for v in r["metadata"]["answer_values"]}
        want = _independent(r)
        assert got.keys() == want.keys(), r["question"]
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-5), (r["question"], k)
        table = _table_frame(r)
        assert len(table) == 8 * len(r["metadata"]["window"]["tickers"])
        assert set(table["Date"]) <= set(DATES)  # nothing fabricated: 2024-01-15 never appears
        w = r["metadata"]["window"]
        assert (table["Date"].iloc[0], table["Date"].iloc[-1]) == (w["start"], w["end"])
        for t in w["tickers"]:
            assert t in r["context"]["text"] and t in r["question"]
        qt = r["metadata"]["question_type"]
        if qt == "risk_level":
            v = got["annualised_volatility"]
            assert r["answer"] == ("low" if v < 10 else "medium" if v < 30 else "high")
            assert r["labels"] == ["low", "medium", "high"] and r["task_type"] == "classification"
            assert "10%" in r["question"] and "30%" in r["question"]
        else:
            assert r["task_type"] == "numeric_qa"
        if qt in ("period_return", "volatility", "max_drawdown"):
            assert f"{next(iter(want.values())):.2f}".lstrip("-") in r["answer"]
        if qt == "ma_trend":
            k = r["metadata"]["params"]["k"]
            side = "above" if want["latest_close"] > want[f"sma_{k}"] else "below"
            assert r["answer"].lower().startswith(side) and r["metadata"]["answer_label"] == side
        if qt == "comparison":
            a, b = w["tickers"]
            win = a if want[f"return_{a}"] > want[f"return_{b}"] else b
            assert r["answer"].startswith(win)
        assert r["scenario"] == "observed" and r["source"] == "market:csv"


def test_simulator_is_seeded_and_consistent():
    sim = SimulatorConfig(tickers=["AAA", "BBB"], days_per_regime=30, seed=3)
    a, b = simulate(sim).prices, simulate(sim).prices
    pd.testing.assert_frame_equal(a, b)
    c = simulate(sim.model_copy(update={"seed": 4})).prices
    assert not np.allclose(a["close"], c["close"])
    assert len(a) == 2 * 30 * 5 and set(a["regime"]) == {"calm", "rate_shock", "crash", "recovery", "fx_crisis"}
    assert (a["low"] <= a[["open", "close"]].min(axis=1)).all()
    assert (a["high"] >= a[["open", "close"]].max(axis=1)).all()
    assert (a[["open", "high", "low", "close"]] > 0).all().all()
    a = a.assign(lr=a.groupby("ticker")["close"].transform(lambda s: np.log(s).diff()))
    vol = a.groupby("regime")["lr"].std()
    assert vol["calm"] < vol["rate_shock"] < vol["crash"]


def test_questions_per_type_as_a_mapping_builds_each_types_count_and_none_of_the_unnamed():
    mc = MarketConfig(questions_per_type={"latest_value": 9, "ma_trend": 2}, window_days=5)
    rows = build_market_qa(simulate(mc.simulator), mc)
    assert Counter(r["category"] for r in rows) == {"market_price_lookup": 9, "market_trend": 2}
    assert mc.n_questions == 11 and mc.count("volatility") == 0
    assert MarketConfig(questions_per_type=3).count("volatility") == 3


@pytest.mark.parametrize("per", [{"lookup": 5}, {"latest_value": -1}, -2])
def test_questions_per_type_refuses_an_unknown_type_or_a_negative_count(per):
    with pytest.raises(ValueError, match="questions_per_type"):
        MarketConfig(questions_per_type=per)


def test_market_qa_deterministic_balanced_and_varied():
    mc = MarketConfig(questions_per_type=10, window_days=10)
    md = simulate(mc.simulator)
    rows = build_market_qa(md, mc)
    assert rows == build_market_qa(simulate(mc.simulator), mc)
    assert len({r["id"] for r in rows}) == len(rows) == 10 * len(QUESTION_TYPES)
    assert Counter(r["category"] for r in rows) == {c: 10 for c in CATEGORIES.values()}
    scen = Counter(r["scenario"] for r in rows)
    assert set(scen) == set(mc.simulator.regimes) and max(scen.values()) - min(scen.values()) <= 1
    for qt in QUESTION_TYPES:
        templates = {r["metadata"]["template"] for r in rows if r["metadata"]["question_type"] == qt}
        assert len(templates) >= 3, qt
    risk = [r for r in rows if r["category"] == "market_risk_level"]
    assert all(r["answer"] in r["labels"] for r in risk)
    assert len({r["answer"] for r in risk}) >= 2
    other = build_market_qa(md, mc.model_copy(update={"seed": 99}))
    assert [r["id"] for r in other] != [r["id"] for r in rows]


def test_file_repairs_sort_and_drop_exact_duplicates(tmp_path):
    df = _frame(CLOSE_A, 1000)
    messy = pd.concat([df.iloc[[5, 0, 3]], df.iloc[[3]], df.iloc[[1, 2, 4]]])
    path = tmp_path / "ZZZ.csv"
    messy.to_csv(path, index=False)
    prices, repairs = load_price_file(path)
    assert prices["date"].dt.strftime("%Y-%m-%d").tolist() == DATES[:6]
    assert prices["close"].tolist() == CLOSE_A[:6] and set(prices["ticker"]) == {"ZZZ"}
    actions = {r["action"]: r for r in repairs}
    assert actions["dropped_exact_duplicates"]["count"] == 1 and actions["dropped_exact_duplicates"]["rows"] == [4]
    assert actions["sorted_dates"]["ticker"] == "ZZZ"


def test_long_table_parquet_with_case_insensitive_columns(tmp_path):
    long = pd.concat([_frame(CLOSE_A, 1).assign(TICKER="AAA"), _frame(CLOSE_B, 1).assign(TICKER="BBB")])
    long.columns = [c.upper() for c in long.columns]
    path = tmp_path / "prices.parquet"
    long.to_parquet(path)
    md = load_files([path], tickers=["BBB"])
    assert md.tickers == ["BBB"] and md.prices["close"].tolist() == CLOSE_B
    assert md.prices["volume"].dtype == np.int64


@pytest.mark.parametrize("name", sorted(k for k, v in EXPECTED.items() if v["kind"] == "market_error"))
def test_bad_market_file_is_rejected_with_file_row_field(name):
    exp = EXPECTED[name]
    with pytest.raises(MarketDataError) as e:
        load_price_file(BAD / name)
    msg = str(e.value)
    assert name in msg
    assert (f"row {exp['row']}:" if exp["row"] is not None else "header:") in msg
    assert f"field {exp['field']}:" in msg


def test_every_bad_input_file_has_an_expectation():
    assert sorted(p.name for p in BAD.iterdir() if p.name != "EXPECTED.json") == sorted(EXPECTED)


def test_yfinance_unreachable_gives_clear_error(monkeypatch):
    def download(*a, **k):
        raise ConnectionError("Failed to resolve query1.finance.yahoo.com")

    monkeypatch.setitem(sys.modules, "yfinance", types.SimpleNamespace(download=download))
    with pytest.raises(MarketDataError, match="could not download SPY .network unreachable"):
        fetch_yfinance(["SPY"], "2024-01-01", "2024-02-01")
    monkeypatch.setitem(sys.modules, "yfinance", types.SimpleNamespace(download=lambda *a, **k: pd.DataFrame()))
    with pytest.raises(MarketDataError, match="no data for SPY"):
        fetch_yfinance(["SPY"], None, None)
    with pytest.raises(MarketDataError, match="needs sources.market.tickers"):
        fetch_yfinance([], None, None)


# ----------------------------------------------------------------------------- ties and pandas exports
def _tie_files(tmp_path: Path, closes_b: list[float]) -> list[Path]:
    a, b = tmp_path / "AAA.csv", tmp_path / "BBB.csv"
    _frame(CLOSE_A, 500_000).to_csv(a, index=False)
    _frame(closes_b, 500_000).to_csv(b, index=False)
    return [a, b]


def test_comparison_of_identical_series_names_no_winner(tmp_path):
    md = load_files(_tie_files(tmp_path, CLOSE_A))
    mc = MarketConfig(provider="csv", window_days=8, questions_per_type=3)
    cmp = [r for r in build_market_qa(md, mc) if r["metadata"]["question_type"] == "comparison"]
    assert len(cmp) == 3
    for r in cmp:
        assert "by 0.00" not in r["answer"] and r["answer"].startswith("Neither")
        assert r["metadata"]["answer_label"] == "tie"
        vals = {v["name"]: v["value"] for v in r["metadata"]["answer_values"]}
        assert vals["difference"] == 0 and vals["return_AAA"] == vals["return_BBB"]


def test_comparison_of_nearly_identical_series_shows_the_gap(tmp_path):
    closes = [*CLOSE_A[:-1], CLOSE_A[-1] + 0.001]  # returns differ by ~0.001 percentage points at the end
    md = load_files(_tie_files(tmp_path, closes))
    mc = MarketConfig(provider="csv", window_days=8, questions_per_type=6)
    cmp = [r for r in build_market_qa(md, mc) if r["metadata"]["question_type"] == "comparison"]
    assert cmp and all("by 0.00 " not in r["answer"] for r in cmp)


def test_pandas_export_with_date_index_is_read(tmp_path):
    df = _frame(CLOSE_A, 1000).set_index("Date")
    df.index = pd.to_datetime(df.index)
    df.index.name = None
    p = tmp_path / "AAA.csv"
    df.to_csv(p)  # header ",Open,High,Low,Close,Volume"
    prices, repairs = load_price_file(p)
    assert prices["close"].tolist() == CLOSE_A and repairs[0]["action"] == "date_from_unnamed_first_column"
    q = tmp_path / "AAA.parquet"
    df.to_parquet(q)  # the dates travel as the index
    assert load_price_file(q)[0]["close"].tolist() == CLOSE_A


def test_header_only_price_file_names_the_file(tmp_path):
    p = tmp_path / "EMPTY.csv"
    p.write_text("Date,Open,High,Low,Close,Volume\n")
    mc = MarketConfig(provider="csv", paths=[p])
    from datagen.sources.market import load_market

    with pytest.raises(MarketDataError, match="EMPTY.csv: no data rows"):
        load_market(mc)
    d = tmp_path / "none"
    d.mkdir()
    with pytest.raises(MarketDataError, match="none: folder has no .csv or .parquet price files"):
        load_files([d])


def test_price_row_counts_reconcile(tmp_path):
    df = _frame(CLOSE_A, 1000)
    long = pd.concat([df.assign(Ticker="AAA"), df.iloc[[0]].assign(Ticker="AAA"), df.assign(Ticker="BBB")])
    p = tmp_path / "long.csv"
    long.to_csv(p, index=False)
    from datagen.sources.market import load_market

    md = load_market(MarketConfig(provider="csv", paths=[p], tickers=["AAA"], start="2024-01-10"))
    assert md.row_counts() == {"rows_in": 25, "rows_out": 10, "rows_dropped_duplicate": 1, "rows_filtered": 14,
                               "rows_unaccounted": 0}


def test_yfinance_export_with_three_header_rows(tmp_path):
    p = tmp_path / "prices.csv"
    lines = ["Price,Adj Close,Close,High,Low,Open,Volume", "Ticker,SPY,SPY,SPY,SPY,SPY,SPY", "Date,,,,,,"]
    for d, c in zip(DATES, CLOSE_A, strict=True):
        lines.append(f"{d},{c},{c},{c + 1},{c - 1},{c},1000")
    p.write_text("\n".join(lines) + "\n")
    prices, repairs = load_price_file(p)
    assert set(prices["ticker"]) == {"SPY"} and prices["close"].tolist() == CLOSE_A
    assert repairs[0]["action"] == "read_yfinance_export"
    lines[1] = "Ticker,SPY,QQQ,SPY,SPY,SPY,SPY"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(MarketDataError, match="several tickers"):
        load_price_file(p)


def test_long_bad_value_is_clipped_in_price_errors(tmp_path):
    p = tmp_path / "AAA.csv"
    p.write_text("Date,Open,High,Low,Close,Volume\n2024-01-02,1,2,0.5,1.5,10\n" + "9" * 1000 + "x,1,2,0.5,1.5,10\n")
    with pytest.raises(MarketDataError) as e:
        load_price_file(p)
    msg = str(e.value)
    assert "row 2: field Date: unparsable date" in msg and "9" * 1000 not in msg and len(msg) < 400
