"""Market price providers: an offline scenario simulator, CSV/Parquet files, and yfinance (online).

Every provider returns a :class:`MarketData` whose ``prices`` is a tidy frame with one row per
(ticker, trading day)::

    date (datetime64), ticker, open, high, low, close, volume, regime

``regime`` is the simulator's market regime (``calm``, ``rate_shock``, ``crash``, ``recovery``,
``fx_crisis``) and ``"observed"`` for real data; market QA uses it as the sample's ``scenario``.

Files are validated: unsorted dates are sorted and exact duplicate rows dropped (both recorded in
``repairs``); anything that cannot be repaired safely (a conflicting duplicate date, a NaN or
non-positive price, High < Low, a missing column, an unparsable date, a CSV row with a wrong cell
count or an unclosed quote, an empty or header-only file) raises :class:`MarketDataError` on one line
naming the file, the 1-based data row as it appears in the file, and the field. A pandas export whose
dates are its unnamed first column (``,Open,...`` or ``Unnamed: 0``) is read with that column as Date.
Missing business days are left missing: nothing is fabricated. :meth:`MarketData.row_counts`
reconciles price rows read with rows kept, dropped as duplicates and filtered out.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datagen.config import MarketConfig, SimulatorConfig
from datagen.io import clip
from datagen.sources.source_qa import BOM, SourceQAError, read_csv_table

log = logging.getLogger(__name__)

PRICE_COLUMNS = ("open", "high", "low", "close")
COLUMNS = ("date", "ticker", "open", "high", "low", "close", "volume", "regime")
OBSERVED = "observed"

# Daily drift and daily volatility of log returns per regime (annualised vol ~ sigma * sqrt(252)).
REGIMES: dict[str, tuple[float, float]] = {
    "calm": (0.0008, 0.007),        # ~11% annualised
    "rate_shock": (-0.0012, 0.017),  # ~27%
    "crash": (-0.0070, 0.036),       # ~57%
    "recovery": (0.0050, 0.019),     # ~30%
    "fx_crisis": (-0.0025, 0.030),   # ~48%
}


class MarketDataError(ValueError):
    """Price data that cannot be used safely; the message names file, row and field."""


@dataclass
class MarketData:
    prices: pd.DataFrame
    provider: str
    currency: str = ""  # "USD" for the simulator; unknown ("") for files
    repairs: list[dict[str, Any]] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)
    # per input file: rows_in, rows_dropped_duplicate, rows_filtered (tickers), rows_out
    file_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    rows_filtered_dates: int = 0  # price rows outside sources.market.start / end

    def row_counts(self) -> dict[str, int]:
        """Price rows read from files = kept + dropped as exact duplicates + filtered out (tickers, dates);
        ``rows_unaccounted`` is 0 unless a reader lost rows. Provider data (simulator, yfinance) counts
        as read."""
        if self.file_counts:
            rows_in = sum(c["rows_in"] for c in self.file_counts.values())
            dup = sum(c["rows_dropped_duplicate"] for c in self.file_counts.values())
            filt = sum(c["rows_filtered"] for c in self.file_counts.values())
        else:
            rows_in, dup, filt = len(self.prices) + self.rows_filtered_dates, 0, 0
        out = {"rows_in": rows_in, "rows_out": len(self.prices), "rows_dropped_duplicate": dup,
               "rows_filtered": filt + self.rows_filtered_dates}
        out["rows_unaccounted"] = rows_in - out["rows_out"] - dup - out["rows_filtered"]
        return out

    @property
    def tickers(self) -> list[str]:
        return sorted(self.prices["ticker"].unique().tolist())


# ----------------------------------------------------------------------------- simulator
def simulate(sim: SimulatorConfig) -> MarketData:
    """Seeded daily OHLCV for ``sim.tickers`` through ``sim.regimes`` in order, ``days_per_regime`` each.

    All tickers share the trading calendar (business days from ``start_date``) and the regime path;
    each has its own start price, beta to a common factor and idiosyncratic noise. Prices are rounded
    to cents, volume to whole shares, and OHLC is consistent (low <= open, close <= high).
    """
    rng = np.random.default_rng(sim.seed)
    n = sim.days_per_regime * len(sim.regimes)
    dates = pd.bdate_range(pd.Timestamp(sim.start_date), periods=n)
    regime_of_day = np.repeat(np.array(sim.regimes, dtype=object), sim.days_per_regime)
    mu = np.array([REGIMES[r][0] for r in regime_of_day])
    sigma = np.array([REGIMES[r][1] for r in regime_of_day])
    market = rng.standard_normal(n)
    frames = []
    for ticker in sim.tickers:
        start = float(rng.uniform(20, 250))
        beta = float(rng.uniform(0.7, 1.3))
        idio = rng.standard_normal(n)
        z = 0.8 * market + 0.6 * idio  # unit variance
        r = beta * mu + beta * sigma * z
        close = start * np.exp(np.cumsum(r))
        gap = rng.normal(0, 0.25, n) * sigma
        prev = np.concatenate([[start], close[:-1]])
        open_ = prev * np.exp(gap)
        wick_hi = np.abs(rng.normal(0, 0.5, n)) * sigma
        wick_lo = np.abs(rng.normal(0, 0.5, n)) * sigma
        open_r, close_r = np.round(open_, 2), np.round(close, 2)
        high = np.maximum(np.round(np.maximum(open_, close) * np.exp(wick_hi), 2), np.maximum(open_r, close_r))
        low = np.minimum(np.round(np.minimum(open_, close) * np.exp(-wick_lo), 2), np.minimum(open_r, close_r))
        base_vol = rng.uniform(2e5, 3e6)
        volume = np.round(base_vol * np.exp(rng.normal(0, 0.25, n)) * (1 + 20 * sigma)).astype(np.int64)
        frames.append(pd.DataFrame({
            "date": dates, "ticker": ticker, "open": open_r, "high": high, "low": low, "close": close_r,
            "volume": volume, "regime": regime_of_day.astype(str)}))
    prices = pd.concat(frames, ignore_index=True)
    return MarketData(prices=_canonical(prices), provider="simulator", currency="USD")


# ----------------------------------------------------------------------------- files
_REQUIRED = ("date", "open", "high", "low", "close", "volume")


def _read_table(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The file as a frame, and the 1-based data row of each frame row as it appears in the file.

    CSV goes through :func:`datagen.sources.source_qa.read_csv_table` (strict quoting, one broken record never
    swallows the next, BOM stripped, cells up to 64 MiB): a broken row is an error naming file, data row
    and field, on one line.
    """
    suffix = path.suffix.lower()
    if path.is_dir():
        raise MarketDataError(f"{path}: is a directory; list it in sources.market.paths to read its files")
    if not path.exists():
        raise MarketDataError(f"{path}: file not found")
    if suffix not in (".csv", ".parquet", ".pq"):
        raise MarketDataError(f"{path}: unsupported price file type {clip(suffix, 40)!r} (use .csv or .parquet)")
    if suffix == ".csv":
        data = path.read_bytes()
        if not data.replace(BOM.encode(), b"").strip():
            raise MarketDataError(f"{path}: empty file (no header, no rows)")
        try:
            t = read_csv_table(path, data)
        except SourceQAError as e:
            raise MarketDataError(str(e)) from None
        for rec in t.records:
            if rec.error is not None:
                raise _fail(path, rec.row, rec.error.field, f"{rec.error.reason}: {rec.error.detail}")
        df = pd.DataFrame([list(r.obj.values()) for r in t.records], columns=t.header, dtype=object)
        rows = np.array([r.row for r in t.records], dtype=np.int64)
    else:
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - any reader failure is a file-level error
            raise MarketDataError(f"{path}: cannot read as parquet ({type(e).__name__}: {clip(str(e), 200)})") from None
        if isinstance(df.index, pd.DatetimeIndex):  # pandas wrote its date index into the file
            df = df.reset_index(names=df.index.name or "")
        rows = np.arange(1, len(df) + 1)
    df.columns = [str(c).replace(BOM, "") for c in df.columns]
    if len(df) == 0:
        raise MarketDataError(f"{path}: no data rows (header: {clip(', '.join(map(str, df.columns)), 200)})")
    return df, rows


def _fail(path: Path, row: int | None, fld: str, msg: str) -> MarketDataError:
    where = f"row {row}" if row is not None else "header"
    return MarketDataError(f"{path}: {where}: field {clip(fld, 80)}: {' '.join(msg.split())}")


def _parses_as_dates(s: pd.Series) -> bool:
    v = s.astype(str).str.strip()
    v = v[v != ""]
    if v.empty or not v.str.contains(r"\d{4}|\d{1,2}[/.-]\d{1,2}[/.-]\d{2}", regex=True).all():
        return False
    return bool(pd.to_datetime(v, errors="coerce", format="mixed").notna().all())


def _yfinance_export(path: Path, raw: pd.DataFrame, rows: np.ndarray, repairs: list[dict]
                     ) -> tuple[pd.DataFrame, np.ndarray]:
    """A yfinance frame saved with ``to_csv`` has three header rows (``Price,Close,...`` /
    ``Ticker,SPY,...`` / ``Date,,,``): fold them into one header and a Ticker column."""
    if len(raw) < 2 or len(raw.columns) < 2 or str(raw.columns[0]).strip().lower() != "price":
        return raw, rows
    first = raw.iloc[:, 0].astype(str).str.strip().str.lower()
    if first.iloc[0] != "ticker" or first.iloc[1] != "date":
        return raw, rows
    names = sorted({str(t).strip() for t in raw.iloc[0, 1:]})
    if len(names) != 1:
        raise MarketDataError(f"{path}: a yfinance export of several tickers ({clip(', '.join(names), 120)}); "
                              f"save one ticker per file")
    out = raw.iloc[2:].reset_index(drop=True)
    out.columns = ["Date", *map(str, raw.columns[1:])]
    out["Ticker"] = names[0]
    repairs.append({"file": str(path), "action": "read_yfinance_export", "ticker": names[0], "count": len(out)})
    return out, rows[2:]


def load_price_file(path: str | Path, tickers: list[str] | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """Read and validate one CSV/Parquet price file; returns (prices, repairs).

    Columns Date, Open, High, Low, Close, Volume (any case; an optional Ticker/Symbol column makes it a
    long table, otherwise the file stem is the ticker). A file written by pandas with its dates as the
    index (an unnamed first column, ``Unnamed: 0`` or ``index``) is read with that column as Date
    (recorded in ``repairs``). Row numbers in errors are 1-based data rows (the header is not counted).
    """
    prices, repairs, _ = read_price_file(path, tickers)
    return prices, repairs


def read_price_file(path: str | Path, tickers: list[str] | None = None
                    ) -> tuple[pd.DataFrame, list[dict], dict[str, int]]:
    """:func:`load_price_file` plus the file's row counts: ``rows_in`` (data rows read),
    ``rows_dropped_duplicate`` (exact copies), ``rows_filtered`` (other tickers), ``rows_out``."""
    path = Path(path)
    raw, file_rows = _read_table(path)
    repairs: list[dict] = []
    raw, file_rows = _yfinance_export(path, raw, file_rows, repairs)
    colmap: dict[str, str] = {}
    for c in raw.columns:
        key = str(c).strip().lower().replace(" ", "_")
        if key == "symbol":
            key = "ticker"
        colmap.setdefault(key, c)
    if "date" not in colmap and len(raw.columns):
        first = str(raw.columns[0])
        if (first.strip() == "" or re.fullmatch(r"Unnamed: 0|index|level_0", first.strip())) \
                and _parses_as_dates(raw.iloc[:, 0]):
            colmap["date"] = raw.columns[0]
            repairs.append({"file": str(path), "action": "date_from_unnamed_first_column",
                            "column": first, "count": len(raw)})
    for req in _REQUIRED:
        if req not in colmap:
            raise _fail(path, None, req.capitalize(),
                        f"missing column (found: {clip(', '.join(map(str, raw.columns)), 200) or 'none'})")
    df = pd.DataFrame({k: raw[colmap[k]] for k in (*_REQUIRED, *(("ticker",) if "ticker" in colmap else ()))})
    df["_row"] = file_rows
    rows_in = len(df)
    if "ticker" not in df:
        df["ticker"] = path.stem
    df["ticker"] = df["ticker"].astype(str).str.strip()
    names = {k: str(colmap[k]) for k in colmap}

    # dates
    dates = pd.to_datetime(df["date"].astype(str).str.strip(), errors="coerce", format="mixed")
    bad = dates.isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise _fail(path, int(df["_row"].iloc[i]), names["date"], f"unparsable date {clip(df['date'].iloc[i], 80)!r}")
    df["date"] = dates.dt.tz_localize(None) if dates.dt.tz is not None else dates
    df["date"] = df["date"].dt.normalize()

    # numbers
    for col in (*PRICE_COLUMNS, "volume"):
        s = df[col]
        num = pd.to_numeric(s.astype(str).str.strip().replace({"": "nan"}), errors="coerce") \
            if s.dtype == object else pd.to_numeric(s, errors="coerce")
        bad = num.isna() | ~np.isfinite(num.astype(float))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise _fail(path, int(df["_row"].iloc[i]), names[col],
                        f"missing or non-numeric value {clip(s.iloc[i], 80)!r}")
        lim = num <= 0 if col != "volume" else num < 0
        if lim.any():
            i = int(np.flatnonzero(lim.to_numpy())[0])
            what = "non-positive price" if col != "volume" else "negative volume"
            raise _fail(path, int(df["_row"].iloc[i]), names[col], f"{what} {float(num.iloc[i]):g}")
        df[col] = num.astype(float)
    hl = df["high"] < df["low"]
    if hl.any():
        i = int(np.flatnonzero(hl.to_numpy())[0])
        raise _fail(path, int(df["_row"].iloc[i]), names["high"],
                    f"High {df['high'].iloc[i]} is below Low {df['low'].iloc[i]}")

    if tickers:
        df = df[df["ticker"].isin(tickers)]
    rows_filtered = rows_in - len(df)
    # duplicates: exact copies are dropped, conflicting dates rejected
    value_cols = ["ticker", "date", *PRICE_COLUMNS, "volume"]
    exact = df.duplicated(subset=value_cols, keep="first")
    if exact.any():
        repairs.append({"file": str(path), "action": "dropped_exact_duplicates", "count": int(exact.sum()),
                        "rows": df.loc[exact, "_row"].astype(int).tolist()})
        df = df[~exact]
    rows_dup = int(exact.sum())
    conflict = df.duplicated(subset=["ticker", "date"], keep="first")
    if conflict.any():
        i = int(np.flatnonzero(conflict.to_numpy())[0])
        dup = df.iloc[i]
        first = df[(df["ticker"] == dup["ticker"]) & (df["date"] == dup["date"])].iloc[0]
        diff = [names[c] for c in (*PRICE_COLUMNS, "volume") if first[c] != dup[c]]
        raise _fail(path, int(dup["_row"]), names["date"],
                    f"duplicate date {dup['date']:%Y-%m-%d} for {dup['ticker']} conflicts with row "
                    f"{int(first['_row'])} (different {', '.join(diff)})")
    for t, g in df.groupby("ticker", sort=True):
        if not g["date"].is_monotonic_increasing:
            repairs.append({"file": str(path), "action": "sorted_dates", "ticker": str(t), "count": len(g)})
    df = df.assign(regime=OBSERVED)
    volume_int = df["volume"].round()
    if (volume_int == df["volume"]).all():
        df["volume"] = volume_int.astype(np.int64)
    counts = {"rows_in": rows_in, "rows_dropped_duplicate": rows_dup, "rows_filtered": rows_filtered,
              "rows_out": len(df)}
    return _canonical(df.drop(columns="_row")), repairs, counts


def _canonical(df: pd.DataFrame) -> pd.DataFrame:
    return df.loc[:, list(COLUMNS)].sort_values(["ticker", "date"], kind="mergesort").reset_index(drop=True)


def _price_files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in (".csv", ".parquet", ".pq"))
            if not found:
                raise MarketDataError(f"{p}: folder has no .csv or .parquet price files")
            out += found
        else:
            out.append(p)
    return out


def load_files(paths: list[str | Path], tickers: list[str] | None = None) -> MarketData:
    """Price files (a file per ticker, or long tables), or folders of them."""
    files = _price_files([Path(p) for p in paths])
    if not files:
        raise MarketDataError("market provider 'csv' needs sources.market.paths (files or folders)")
    frames, repairs = [], []
    file_counts: dict[str, dict[str, int]] = {}
    for f in files:
        df, rep, counts = read_price_file(f, tickers or None)
        frames.append(df)
        repairs += rep
        file_counts[str(f)] = counts
    prices = pd.concat(frames, ignore_index=True)
    dup = prices.duplicated(subset=["ticker", "date"])
    if dup.any():
        row = prices[dup].iloc[0]
        raise MarketDataError(f"ticker {row['ticker']} has prices for {row['date']:%Y-%m-%d} in more than one file")
    return MarketData(prices=_canonical(prices), provider="csv", repairs=repairs, inputs=files,
                      file_counts=file_counts)


# ----------------------------------------------------------------------------- yfinance
def fetch_yfinance(tickers: list[str], start: str | None, end: str | None) -> MarketData:
    """Daily prices from Yahoo Finance (needs the network). Not used by tests or the demo."""
    if not tickers:
        raise MarketDataError("market provider 'yfinance' needs sources.market.tickers")
    try:
        import yfinance as yf
    except ImportError as e:  # pragma: no cover - yfinance is a dependency
        raise MarketDataError(f"yfinance is not installed ({e})") from None
    frames = []
    for t in tickers:
        try:
            raw = yf.download(t, start=start, end=end, auto_adjust=False, progress=False, threads=False)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise MarketDataError(f"yfinance: could not download {t} (network unreachable?): "
                                  f"{type(e).__name__}: {e}") from None
        if raw is None or len(raw) == 0:
            raise MarketDataError(f"yfinance: no data for {t} between {start} and {end} "
                                  f"(unknown ticker or network unreachable)")
        if isinstance(raw.columns, pd.MultiIndex):
            raw.columns = raw.columns.get_level_values(0)
        raw = raw.reset_index()
        df = pd.DataFrame({
            "date": pd.to_datetime(raw["Date"]).dt.tz_localize(None).dt.normalize(), "ticker": t,
            **{c: raw[c.capitalize()].astype(float) for c in PRICE_COLUMNS},
            "volume": raw["Volume"].astype(np.int64), "regime": OBSERVED})
        df = df.dropna()
        frames.append(df)
    return MarketData(prices=_canonical(pd.concat(frames, ignore_index=True)), provider="yfinance")


def load_market(mc: MarketConfig, resolve=lambda p: Path(p)) -> MarketData:
    """Prices from the configured provider. ``resolve`` turns relative config paths into real ones."""
    if mc.provider == "simulator":
        return simulate(mc.simulator)
    if mc.provider == "csv":
        md = load_files([resolve(p) for p in mc.paths], mc.tickers)
    else:
        md = fetch_yfinance(mc.tickers, mc.start, mc.end)
    p = md.prices
    if mc.start:
        p = p[p["date"] >= pd.Timestamp(mc.start)]
    if mc.end:
        p = p[p["date"] <= pd.Timestamp(mc.end)]
    md.rows_filtered_dates = len(md.prices) - len(p)
    md.prices = p.reset_index(drop=True)
    if md.prices.empty:
        files = f" in {clip(', '.join(f.name for f in md.inputs), 200)}" if md.inputs else ""
        raise MarketDataError(f"market provider {mc.provider!r}: no prices left{files} after filters "
                              f"(tickers={clip(mc.tickers, 120)}, start={mc.start}, end={mc.end})")
    return md
