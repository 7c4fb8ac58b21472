"""Ingest existing QA sets (CSV / JSONL / JSON / Parquet) into canonical samples, quarantining bad rows.

A :class:`~datagen.config.SourceQAFile` maps canonical fields to the file's columns
(``columns: {question: Question, answer: Answer, ...}``); a field not mapped is read from a column of
the same name when there is one. Canonical fields:

``id``, ``group_id``, ``question``, ``answer``, ``category``, ``task_type``, ``scenario``, ``labels``,
``difficulty``, ``metadata``, and the context, given as any of

- ``context``: a string (paragraphs), a list of strings, or ``{"text"|"paragraphs", "table"}``;
- ``table``: ``{"columns": [...], "rows": [[...]]}``, a list of rows whose first row is the header
  (FinQA / TAT-QA style), or a list of records (dicts);
- ``paragraphs`` (alias ``text``): a string, a list of strings, or a list of ``{"text": ...}`` objects,
  appended after ``context``'s text.

In JSON / JSONL, a column name may be a dotted path into nested objects (``qa.question``). In CSV,
structured cells (table, labels, metadata, a dict context, a list answer) are JSON strings.

**Answers** are text, a number, or a list of spans (a JSON list; in CSV a cell such as
``["2019", "2021"]``): a list is kept in ``metadata["answer_spans"]`` and ``answer`` is the spans joined
by ``"; "``. For ``numeric_qa`` rows, figures are parsed by :mod:`datagen.numbers` ("14.16 percent",
"-7 million", "$1.2bn", "(3.4)") into ``metadata["answer_values"]``, one per span.

**Nested records** (one record per document with a list of questions, TAT-QA style): set
``records_path`` to the dotted path of that list. Each item becomes one row; the record's other fields
are visible to every item (an item's own field of the same name wins), so ``table: table.table`` and
``paragraphs: paragraphs`` map the document's context. Items of one record share a ``group_id`` (a hash
of the record) unless ``group_id`` is mapped. A JSON file holds a list of records or one object.

**Limits.** A CSV cell or a JSON string may be up to :data:`MAX_FIELD_CHARS` characters (64 MiB); a
longer one quarantines its row as ``field_too_large``. Byte-order marks are stripped (file start, every
JSONL line, column names).

A row that fails validation goes to quarantine as one :func:`datagen.io.drop_record` with ``file``,
``row``, ``line`` (where known), ``field`` and ``raw``; ingestion goes on. ``row`` is the 1-based data
row: the JSONL line number; the CSV record after the header (blank records count, as in a spreadsheet);
the JSON / Parquet record; with ``records_path``, the running item number (``record`` and ``item`` say
where it came from). A CSV record whose quote never closes does not swallow the rows after it: its first
line is quarantined (``unterminated_quote``) and reading resumes on the next line. Reasons: ``missing``,
``empty``, ``wrong_type``, ``duplicate_id``, ``undecodable_text``, ``nul_byte``, ``non_finite`` (NaN /
Infinity), ``field_too_large``, ``invalid_json``, ``unterminated_quote``, ``malformed_row`` (wrong cell
count: ``field`` names the first missing column or ``<extra cell N>``), ``bad_task_type``, ``bad_table``,
``bad_labels``, ``answer_not_in_labels``, ``invalid``.

Every file is reconciled: rows read = rows kept + rows quarantined (:meth:`SourceResult.counts`; for CSV
also physical lines = header + blank + record lines), or :class:`RowCountError` is raised. A problem
with the whole file (missing, a directory, empty, header only, unreadable, a mapped question/answer
column absent from the header, duplicate column names) raises :class:`SourceQAError` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from datagen.config import SourceQAFile
from datagen.io import clip, drop_record
from datagen.numbers import answer_values
from datagen.schema import TASK_TYPES, Sample, stable_id

log = logging.getLogger(__name__)

STAGE = "fetch"
MAX_FIELD_CHARS = 64 * 1024 * 1024  # the largest CSV cell / JSON string accepted (characters)
RAW_CHARS = 10_000  # a quarantined row's text values are kept for audit up to this length
FIELDS = ("id", "group_id", "question", "answer", "category", "task_type", "scenario", "labels",
          "difficulty", "metadata", "context", "table", "paragraphs")
_ALIASES = {"paragraphs": ("paragraphs", "text")}
_SURROGATE = re.compile(r"[\udc80-\udcff]")
_NONFINITE_TEXT = re.compile(r"^[+\-\u2212]?(?:nan|inf|infinity)$", re.IGNORECASE)
BOM = "\ufeff"


class SourceQAError(ValueError):
    """A problem with a whole source file (named in the message)."""


class RowCountError(RuntimeError):
    """Rows read and rows kept + quarantined disagree: a reader lost rows. Never expected; loud."""


class RowError(Exception):
    def __init__(self, fld: str, reason: str, detail: str = ""):
        super().__init__(f"{fld}: {reason}{': ' + detail if detail else ''}")
        self.field, self.reason, self.detail = fld, reason, detail


class _NonFinite(str):
    """A ``NaN`` / ``Infinity`` literal read from JSON, kept as its token so its row is quarantined."""


@dataclass
class Record:
    """One input row as read: the parsed object, or the error that made it unreadable."""

    row: int
    obj: Any = None
    error: RowError | None = None
    raw: Any = None  # the text shown in quarantine when ``obj`` is None
    line: int | None = None  # 1-based physical line where the row starts (CSV, JSONL)
    lines: int = 1  # physical lines it spans (CSV)
    where: dict[str, Any] = field(default_factory=dict)  # {"record", "item"} for exploded rows
    group: str | None = None  # the group of exploded items (a hash of their record)


@dataclass
class CSVTable:
    header: list[str]
    records: list[Record]
    lines_in: int
    lines_header: int
    lines_blank: int


@dataclass
class SourceResult:
    source: str
    file: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    rows_in: int = 0
    lines: dict[str, int] = field(default_factory=dict)  # CSV: lines_in, lines_header, lines_blank

    @property
    def rows_read(self) -> int:
        return self.rows_in

    def counts(self) -> dict[str, int]:
        """``rows_in``, ``rows_out``, ``rows_quarantined``, ``rows_unaccounted`` (0 unless a bug)."""
        out = {"rows_in": self.rows_in, "rows_out": len(self.samples), "rows_quarantined": len(self.quarantine)}
        out["rows_unaccounted"] = out["rows_in"] - out["rows_out"] - out["rows_quarantined"]
        return {**out, **self.lines}


# ----------------------------------------------------------------------------- reading
def _detect_format(spec: SourceQAFile, path: Path) -> str:
    if spec.format != "auto":
        return spec.format
    suffix = path.suffix.lower()
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
           ".pq": "parquet"}.get(suffix)
    if fmt is None:
        raise SourceQAError(f"{path}: cannot tell the format from suffix {clip(suffix, 40)!r}; "
                            f"set format: csv|jsonl|json|parquet")
    return fmt


def check_input_file(path: Path, what: str = "source QA file") -> None:
    """A clear error when ``path`` is missing, a directory or not a regular file."""
    if path.is_dir():
        raise SourceQAError(f"{path}: is a directory, not a file; name one file per {what}")
    if not path.exists():
        raise SourceQAError(f"{what} not found: {path}")
    if not path.is_file():
        raise SourceQAError(f"{path}: not a regular file")


def _is_blank_text(data: bytes) -> bool:
    return not data.replace(BOM.encode(), b"").strip()


def _decode(data: bytes) -> str:
    text = data.decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith(BOM) else text


class _Lines:
    """An iterator over physical lines that knows how many it has handed out (csv.reader's input)."""

    def __init__(self, lines: list[str], pos: int):
        self.lines, self.pos = lines, pos

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]


def _blank(cells: list[str]) -> bool:
    return not cells or all(not c.strip() for c in cells)


def _cell_count_error(cells: list[str], header: list[str]) -> RowError:
    n, h = len(cells), len(header)
    if n > h:
        return RowError(f"<extra cell {h + 1}>", "malformed_row",
                        f"{n} cells, header has {h} (extra cell {h + 1}: {clip(cells[h], 80)!r})")
    return RowError(header[n], "malformed_row", f"{n} cells, header has {h} (no value for {clip(header[n], 80)!r})")


def _broken_line_error(line: str, msg: str | None) -> RowError:
    if msg and "field larger than field limit" in msg:
        return RowError("<row>", "field_too_large", f"a cell is longer than {MAX_FIELD_CHARS} characters")
    if line.count('"') % 2 == 1:
        return RowError("<row>", "unterminated_quote",
                        "a quoted cell opens on this line and is not closed; the next line is read as a new row")
    return RowError("<row>", "malformed_row", f"not valid CSV ({msg})" if msg else "not valid CSV")


def read_csv_table(path: Path, data: bytes | None = None) -> CSVTable:
    """Read a CSV file record by record, never letting one broken record swallow the next ones.

    Strict quoting: a record that raises a CSV error, or that spans several physical lines and has the
    wrong cell count (an opening quote that never closed), is reported as its *first* line only and
    reading resumes on the next line. Cells may be up to :data:`MAX_FIELD_CHARS` characters. Every
    physical line ends up in the header, a blank record, or exactly one record.
    """
    text = _decode(path.read_bytes() if data is None else data)
    lines = io.StringIO(text, newline="").readlines()
    csv.field_size_limit(MAX_FIELD_CHARS)
    header: list[str] | None = None
    lines_header = blank = row = 0
    records: list[Record] = []
    pos = 0
    while pos < len(lines):
        feed = _Lines(lines, pos)
        start, restart = pos, None
        try:
            for cells in csv.reader(feed, strict=True):
                end = feed.pos
                if header is None:
                    if _blank(cells):
                        blank += end - start
                    else:
                        header = [c.replace(BOM, "") for c in cells]
                        lines_header = end - start
                        dup = sorted({c for c in header if c and header.count(c) > 1})
                        if dup:
                            raise SourceQAError(f"{path}: duplicate column names in the header: "
                                                f"{clip(', '.join(dup), 200)}")
                    start = end
                    continue
                row += 1
                if _blank(cells):
                    blank += end - start
                elif len(cells) == len(header):
                    records.append(Record(row, dict(zip(header, cells)), line=start + 1, lines=end - start))
                elif end - start > 1:  # a quote opened on `start` and swallowed what follows: resume after it
                    records.append(Record(row, None, _broken_line_error(lines[start], None),
                                          raw=lines[start].rstrip("\r\n"), line=start + 1))
                    restart = start + 1
                    break
                else:
                    records.append(Record(row, None, _cell_count_error(cells, header),
                                          raw=lines[start].rstrip("\r\n"), line=start + 1))
                start = end
        except csv.Error as e:
            if header is None:
                raise SourceQAError(f"{path}: unreadable CSV header ({clip(str(e), 200)})") from None
            row += 1
            records.append(Record(row, None, _broken_line_error(lines[start], str(e)),
                                  raw=lines[start].rstrip("\r\n"), line=start + 1))
            restart = start + 1
        pos = len(lines) if restart is None else restart
    if header is None:
        raise SourceQAError(f"{path}: empty file (no header, no rows)")
    covered = lines_header + blank + sum(r.lines for r in records)
    if covered != len(lines):
        raise RowCountError(f"{path}: read {len(lines)} lines but accounted for {covered}")
    return CSVTable(header, records, len(lines), lines_header, blank)


def _read_jsonl(path: Path, data: bytes) -> tuple[list[Record], dict[str, int]]:
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the final newline ends the last line; it does not start one
    out: list[Record] = []
    blank = 0
    for lineno, raw in enumerate(raw_lines, start=1):
        text = raw.decode("utf-8", errors="surrogateescape").rstrip("\r").lstrip(BOM)
        if not text.strip():
            blank += 1
            continue
        try:
            obj = json.loads(text, parse_constant=_NonFinite)
        except json.JSONDecodeError as e:
            if "\x00" in text:
                err = RowError("<row>", "nul_byte", "a raw NUL byte in the line")
            elif _SURROGATE.search(text):
                err = RowError("<row>", "undecodable_text", "not valid UTF-8")
            else:
                err = RowError("<row>", "invalid_json", f"{e.msg} at column {e.colno}")
            out.append(Record(lineno, None, err, raw=text, line=lineno))
            continue
        out.append(Record(lineno, obj, line=lineno))
    return out, {"lines_in": len(raw_lines), "lines_blank": blank}


def _read_json(path: Path, data: bytes) -> list[Record]:
    text = _decode(data)
    try:
        doc = json.loads(text, parse_constant=_NonFinite)
    except json.JSONDecodeError as e:
        raise SourceQAError(f"{path}: unreadable JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    items = [doc] if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise SourceQAError(f"{path}: expected a JSON array of records or one object, got {type(doc).__name__}")
    if not items:
        raise SourceQAError(f"{path}: no records (an empty JSON array)")
    return [Record(i, obj) for i, obj in enumerate(items, start=1)]


def _read_parquet(path: Path) -> tuple[list[str], list[Record]]:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        table = pf.read()
    except Exception as e:  # noqa: BLE001 - any reader failure is a file-level error
        raise SourceQAError(f"{path}: unreadable Parquet ({type(e).__name__}: {clip(str(e), 200)})") from None
    names = [str(c).replace(BOM, "") for c in table.column_names]
    table = table.rename_columns(names)
    if table.num_rows == 0:
        raise SourceQAError(f"{path}: no rows (columns: {clip(', '.join(names), 200)})")
    rows = table.to_pylist()
    if len(rows) != pf.metadata.num_rows:
        raise RowCountError(f"{path}: Parquet metadata says {pf.metadata.num_rows} rows, read {len(rows)}")
    return names, [Record(i, r) for i, r in enumerate(rows, start=1)]


def _explode(records: list[Record], records_path: str, source: str) -> list[Record]:
    """One row per item of the list at ``records_path`` in each record (see the module docstring)."""
    out: list[Record] = []
    n = 0
    for rec in records:
        where = {"record": rec.row}
        if rec.error is not None or not isinstance(rec.obj, dict):
            n += 1
            out.append(replace(rec, row=n, where=where))
            continue
        found, items = _get(rec.obj, records_path)
        if found and isinstance(items, str) and items.strip().startswith("["):
            try:
                items = json.loads(items, parse_constant=_NonFinite)
            except json.JSONDecodeError:
                pass
        err = None
        if not found or _is_missing(items):
            err = RowError(records_path, "missing", f"no list of questions at records_path {records_path!r}")
        elif not isinstance(items, list):
            err = RowError(records_path, "wrong_type", f"expected a list of questions, got {type(items).__name__}")
        elif not items:
            err = RowError(records_path, "empty", "the record has no questions")
        if err is not None:
            n += 1
            out.append(Record(n, None, err, raw=rec.obj, line=rec.line, where=where))
            continue
        parent = {k: v for k, v in rec.obj.items() if k != records_path}
        group = stable_id(source, "record", _jsonable(parent))
        for j, item in enumerate(items, start=1):
            n += 1
            w = {**where, "item": j}
            if not isinstance(item, dict):
                out.append(Record(n, None, RowError("<row>", "wrong_type",
                                                    f"expected a question object, got {type(item).__name__}"),
                                  raw=item, line=rec.line, where=w))
                continue
            out.append(Record(n, {**parent, **item}, line=rec.line, where=w, group=group))
    return out


# ----------------------------------------------------------------------------- field helpers
def _get(obj: dict, col: str) -> tuple[bool, Any]:
    if col in obj:
        return True, obj[col]
    node: Any = obj
    for part in col.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _check_value(fld: str, v: Any) -> None:
    """Reject values no dataset should carry, recursively: text that did not decode as UTF-8 (lone
    surrogates from surrogateescape), NUL bytes, NaN / Infinity literals and infinite floats, and
    strings over :data:`MAX_FIELD_CHARS`. (A float NaN is a missing value, as pandas writes one.)"""
    if isinstance(v, _NonFinite):
        raise RowError(fld, "non_finite", f"{v} is not a finite number")
    if isinstance(v, float) and math.isinf(v):
        raise RowError(fld, "non_finite", f"{v!r} is not a finite number")
    if isinstance(v, str):
        if _SURROGATE.search(v) or any(0xD800 <= ord(ch) <= 0xDFFF for ch in v):
            raise RowError(fld, "undecodable_text", "not valid UTF-8")
        if "\x00" in v:
            raise RowError(fld, "nul_byte", f"a NUL byte at character {v.index(chr(0)) + 1}")
        if len(v) > MAX_FIELD_CHARS:
            raise RowError(fld, "field_too_large", f"{len(v)} characters, the limit is {MAX_FIELD_CHARS}")
    elif isinstance(v, dict):
        for x in v.values():
            _check_value(fld, x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _check_value(fld, x)


def _maybe_json(fld: str, v: Any, fmt: str) -> Any:
    if fmt not in ("jsonl", "json") and isinstance(v, str) and v.strip()[:1] in ("[", "{"):
        try:
            parsed = json.loads(v, parse_constant=_NonFinite)
        except json.JSONDecodeError as e:
            raise RowError(fld, "wrong_type", f"not valid JSON ({e.msg})") from None
        _check_value(fld, parsed)
        return parsed
    return v


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _text(fld: str, v: Any, *, numbers_ok: bool = False, required: bool = True) -> str | None:
    if _is_missing(v):
        if required:
            raise RowError(fld, "missing")
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int, float)) or (isinstance(v, (int, float)) and not numbers_ok):
        raise RowError(fld, "wrong_type", f"expected text, got {type(v).__name__}")
    s = v if isinstance(v, str) else (str(v) if isinstance(v, int) else repr(v))
    s = s.replace(BOM, "") if isinstance(v, str) else s
    if not s.strip():
        if required:
            raise RowError(fld, "empty")
        return None
    return s.strip() if isinstance(v, str) else s


def _answer(v: Any, fmt: str) -> tuple[str, list[str] | None]:
    """The answer text, and its spans when the answer is a list (a JSON list in CSV / Parquet text)."""
    if isinstance(v, str) and fmt not in ("jsonl", "json") and v.strip().startswith("["):
        try:
            parsed = json.loads(v, parse_constant=_NonFinite)
        except json.JSONDecodeError:
            parsed = None  # "[a] see note" is text
        if isinstance(parsed, list):
            _check_value("answer", parsed)
            v = parsed
    if isinstance(v, (list, tuple)):
        if not v:
            raise RowError("answer", "empty", "an empty list of answer spans")
        spans = [_text("answer", x, numbers_ok=True) or "" for x in v]
    else:
        spans = None
    for s in spans if spans is not None else [_text("answer", v, numbers_ok=True) or ""]:
        if _NONFINITE_TEXT.match(s):
            raise RowError("answer", "non_finite", f"{clip(s, 40)!r} is not an answer")
    if spans is not None:
        return "; ".join(spans), spans
    return _text("answer", v, numbers_ok=True) or "", None


def _cell(x: Any) -> str:
    return "" if _is_missing(x) else (x if isinstance(x, str) else json.dumps(x))


def _table(v: Any) -> dict[str, Any] | None:
    if _is_missing(v) or (isinstance(v, str) and not v.strip()) or v == [] or v == {}:
        return None
    if isinstance(v, dict) and "columns" in v and "rows" in v:
        cols, rows = v["columns"], v["rows"]
    elif isinstance(v, list) and all(isinstance(r, dict) for r in v):
        cols = list(dict.fromkeys(k for r in v for k in r))
        rows = [[r.get(c, "") for c in cols] for r in v]
    elif isinstance(v, list) and all(isinstance(r, list) for r in v):
        cols, rows = v[0], v[1:]
    else:
        raise RowError("table", "bad_table", "expected {columns, rows}, a list of rows or a list of records")
    if not isinstance(cols, list) or not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise RowError("table", "bad_table", "columns and rows must be lists")
    for i, r in enumerate(rows):
        if len(r) != len(cols):
            raise RowError("table", "bad_table", f"row {i + 1} has {len(r)} cells, expected {len(cols)}")
    return {"columns": [_cell(c) for c in cols], "rows": [[_cell(x) for x in r] for r in rows]}


def _paragraphs(fld: str, v: Any) -> str:
    if _is_missing(v):
        return ""
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in v):
        v = [p["text"] for p in v]  # TAT-QA style: [{"uid", "order", "text"}]
    if isinstance(v, list) and all(isinstance(p, str) for p in v):
        return "\n\n".join(p.strip() for p in v if p.strip())
    raise RowError(fld, "wrong_type", "expected a string, a list of strings or a list of {text} objects")


def _context(values: dict[str, Any]) -> dict[str, Any]:
    text_parts: list[str] = []
    table = None
    c = values.get("context")
    if isinstance(c, dict):
        extra = set(c) - {"text", "paragraphs", "table"}
        if extra:
            raise RowError("context", "wrong_type", f"unknown context keys {clip(sorted(extra), 120)}")
        text_parts.append(_paragraphs("context", c.get("text")))
        text_parts.append(_paragraphs("context", c.get("paragraphs")))
        table = _table(c.get("table"))
    elif c is not None:
        text_parts.append(_paragraphs("context", c))
    if values.get("table") is not None:
        if table is not None:
            raise RowError("table", "bad_table", "table given both in context and in its own column")
        table = _table(values["table"])
    text_parts.append(_paragraphs("paragraphs", values.get("paragraphs")))
    ctx: dict[str, Any] = {"text": "\n\n".join(p for p in text_parts if p)}
    if table is not None:
        ctx["table"] = table
    return ctx


# ----------------------------------------------------------------------------- one row
def _row_to_sample(rec: Record, spec: SourceQAFile, source: str, fmt: str, has_category: bool = True) -> dict[str, Any]:
    obj = rec.obj
    if not isinstance(obj, dict):
        raise RowError("<row>", "wrong_type", f"expected an object, got {type(obj).__name__}")
    values: dict[str, Any] = {}
    for f in FIELDS:
        cols = [spec.columns[f]] if f in spec.columns else list(_ALIASES.get(f, (f,)))
        for col in cols:
            found, v = _get(obj, col)
            if found:
                _check_value(f, v)
                values[f] = _maybe_json(f, v, fmt) if f in ("table", "labels", "metadata", "context") else v
                break
    question = _text("question", values.get("question"))
    answer, spans = _answer(values.get("answer"), fmt)
    given_id = _text("id", values.get("id"), numbers_ok=True, required=False)
    task_type = _text("task_type", values.get("task_type"), required=False) or spec.task_type or "open_qa"
    if task_type not in TASK_TYPES:
        raise RowError("task_type", "bad_task_type", f"{clip(task_type, 120)!r} is not one of {', '.join(TASK_TYPES)}")
    if has_category:
        category = _text("category", values.get("category"), required=spec.category is None) or spec.category
    else:
        category = spec.category or source
    labels = values.get("labels")
    if _is_missing(labels) or labels == "":
        labels = None
    elif isinstance(labels, str):
        labels = [s.strip() for s in labels.split("|") if s.strip()]
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels)):
        raise RowError("labels", "bad_labels", "expected a list of non-empty strings")
    if task_type == "classification":
        if spans is not None and len(spans) > 1:
            raise RowError("answer", "wrong_type", f"a classification answer is one label, got {len(spans)} spans")
        if not labels:
            raise RowError("labels", "missing", "classification rows need their label set")
        if answer not in labels:
            raise RowError("answer", "answer_not_in_labels", f"{clip(answer, 80)!r} not in {clip(labels, 120)}")
    meta = values.get("metadata")
    if _is_missing(meta) or meta == "":
        meta = {}
    if not isinstance(meta, dict):
        raise RowError("metadata", "wrong_type", f"expected an object, got {type(meta).__name__}")
    meta = dict(meta)
    difficulty = _text("difficulty", values.get("difficulty"), numbers_ok=True, required=False)
    if difficulty is not None:
        meta["difficulty"] = difficulty
    if spans is not None:
        meta["answer_spans"] = spans
    if task_type == "numeric_qa" and "answer_values" not in meta:
        av = answer_values(spans if spans is not None else answer)
        if av:
            meta["answer_values"] = av
    context = _context(values)
    sid = given_id or stable_id(source, question, answer, context)
    if given_id:
        meta["source_id"] = given_id
    meta["origin"] = {"file": spec.path.as_posix(), "row": rec.row, **rec.where}
    group = _text("group_id", values.get("group_id"), numbers_ok=True, required=False) or rec.group or sid
    try:
        s = Sample(id=sid, group_id=group, source=source, task_type=task_type, category=category,
                   scenario=_text("scenario", values.get("scenario"), required=False), question=question,
                   context=context, answer=answer, labels=labels, metadata=meta)
    except ValidationError as e:
        err = e.errors()[0]
        raise RowError(".".join(map(str, err["loc"])) or "<row>", "invalid", err["msg"]) from None
    return s.to_row()


def _printable(s: str) -> str:
    """Text safe to write as UTF-8: undecodable bytes shown as \\xNN, other lone surrogates replaced."""
    if not any(0xD800 <= ord(ch) <= 0xDFFF for ch in s):
        return s
    return "".join(f"\\x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF
                   else ("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch) for ch in s)


def _jsonable(x: Any, limit: int | None = None) -> Any:
    """``x`` as strict JSON (NaN / Infinity as None, undecodable bytes escaped); strings clipped to
    ``limit`` characters when given."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, _NonFinite):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v, limit) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, limit) for v in x]
    if isinstance(x, str):
        s = _printable(x)
        return clip(s, limit) if limit is not None else s
    if isinstance(x, bytes):
        return _jsonable(x.decode("utf-8", errors="backslashreplace"), limit)
    if x is None or isinstance(x, (bool, int, float)):
        return x
    return str(x)


def _row_id(obj: Any, spec: SourceQAFile) -> str | None:
    if not isinstance(obj, dict):
        return None
    found, v = _get(obj, spec.columns.get("id", "id"))
    return clip(v, 80) if found and isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip() else None


# ----------------------------------------------------------------------------- one file
def load_source_qa(spec: SourceQAFile, path: Path | None = None, file_label: str | None = None) -> SourceResult:
    """Read one source-QA file. ``path`` is the resolved location (default ``spec.path``); ``file_label``
    is how the file is named in quarantine rows (default: ``spec.path`` as written in the config)."""
    path = Path(path or spec.path)
    label = file_label or spec.path.as_posix()
    source = spec.name or path.stem
    check_input_file(path)
    fmt = _detect_format(spec, path)
    lines: dict[str, int] = {}
    header: list[str] | None = None
    if fmt == "parquet":
        header, records = _read_parquet(path)
    else:
        data = path.read_bytes()
        if _is_blank_text(data):
            raise SourceQAError(f"{path}: empty file (no header, no rows)")
        if fmt == "csv":
            t = read_csv_table(path, data)
            header, records = t.header, t.records
            lines = {"lines_in": t.lines_in, "lines_header": t.lines_header, "lines_blank": t.lines_blank}
            if not records:
                raise SourceQAError(f"{path}: header only, no data rows (header: {clip(', '.join(header), 200)})")
        elif fmt == "json":
            records = _read_json(path, data)
        else:
            records, lines = _read_jsonl(path, data)
            if records and all(r.error is not None for r in records):
                raise SourceQAError(f"{path}: unreadable JSONL (no line is a valid JSON object)")
    if not records:
        raise SourceQAError(f"{path}: empty file (no rows)")
    if header is not None and spec.records_path is None:
        for f in ("question", "answer"):
            col = spec.columns.get(f, f)
            if col not in header:
                raise SourceQAError(f"{path}: column {clip(col, 80)!r} for field {f!r} not in the header "
                                    f"({clip(', '.join(header), 200)}); set columns.{f} in the source's config")
    if spec.records_path:
        records = _explode(records, spec.records_path, source)
    cat_col = spec.columns.get("category", "category")
    if header is not None and spec.records_path is None:
        has_category = cat_col in header
    else:
        has_category = "category" in spec.columns or any(
            isinstance(r.obj, dict) and _get(r.obj, cat_col)[0] for r in records)
    res = SourceResult(source=source, file=label, rows_in=len(records), lines=lines)
    seen: dict[str, int] = {}
    for rec in records:
        err = rec.error
        if err is None:
            try:
                s = _row_to_sample(rec, spec, source, fmt, has_category)
                if s["id"] in seen:
                    raise RowError("id", "duplicate_id", f"{clip(s['id'], 80)!r} already used on row {seen[s['id']]}")
                seen[s["id"]] = rec.row
                res.samples.append(s)
            except RowError as e:
                err = e
        if err is not None:
            raw = rec.obj if rec.obj is not None else rec.raw
            extra: dict[str, Any] = {"line": rec.line} if rec.line is not None else {}
            res.quarantine.append(drop_record(
                STAGE, _row_id(rec.obj, spec), err.reason, err.detail, file=label, row=rec.row, **extra,
                **rec.where, field=err.field, raw=_jsonable(raw, RAW_CHARS)))
    c = res.counts()
    if c["rows_unaccounted"]:
        raise RowCountError(f"{path}: {c['rows_in']} rows read, {c['rows_out']} kept + {c['rows_quarantined']} "
                            f"quarantined: {c['rows_unaccounted']} unaccounted for")
    if res.quarantine:
        log.warning("%s: %d of %d rows quarantined", label, len(res.quarantine), res.rows_in)
    return res
