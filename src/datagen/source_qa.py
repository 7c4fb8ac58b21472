"""Ingest existing QA sets (CSV / JSONL / Parquet) into canonical samples, quarantining bad rows.

A :class:`~datagen.config.SourceQAFile` maps canonical fields to the file's columns
(``columns: {question: Question, answer: Answer, ...}``); a field not mapped is read from a column of
the same name when there is one. Canonical fields:

``id``, ``group_id``, ``question``, ``answer``, ``category``, ``task_type``, ``scenario``, ``labels``,
``difficulty``, ``metadata``, and the context, given as any of

- ``context``: a string (paragraphs), a list of strings, or ``{"text"|"paragraphs", "table"}``;
- ``table``: ``{"columns": [...], "rows": [[...]]}``, a list of rows whose first row is the header
  (FinQA / TAT-QA style), or a list of records (dicts);
- ``paragraphs`` (alias ``text``): a string or a list of strings, appended after ``context``'s text.

In JSONL, a column name may be a dotted path into nested objects (``qa.question``). In CSV, structured
cells (table, labels, metadata, a dict context) are JSON strings.

A row that fails validation goes to quarantine as ``{file, row, field, reason, raw}`` and ingestion
goes on; ``row`` is the 1-based data row (the JSONL line number; the CSV record after the header; the
Parquet row). Reasons: ``missing``, ``empty``, ``wrong_type``, ``duplicate_id``, ``undecodable_text``,
``invalid_json``, ``bad_task_type``, ``bad_table``, ``bad_labels``, ``answer_not_in_labels``,
``malformed_row``, ``invalid``. A problem with the whole file (missing, unreadable, a mapped
question/answer column absent from the header) raises :class:`SourceQAError` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from datagen.config import SourceQAFile
from datagen.schema import TASK_TYPES, Sample, stable_id

log = logging.getLogger(__name__)

FIELDS = ("id", "group_id", "question", "answer", "category", "task_type", "scenario", "labels",
          "difficulty", "metadata", "context", "table", "paragraphs")
_ALIASES = {"paragraphs": ("paragraphs", "text")}
_SURROGATE = re.compile(r"[\udc80-\udcff]")
_NUMBER = re.compile(r"^\s*(?P<cur>[$€£])?\s*(?P<num>[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+)\s*(?P<pct>%)?\s*$")


class SourceQAError(ValueError):
    """A problem with a whole source file (named in the message)."""


class RowError(Exception):
    def __init__(self, fld: str, reason: str, detail: str = ""):
        super().__init__(f"{fld}: {reason}{': ' + detail if detail else ''}")
        self.field, self.reason, self.detail = fld, reason, detail


@dataclass
class SourceResult:
    source: str
    file: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    rows_read: int = 0


# ----------------------------------------------------------------------------- reading
def _detect_format(spec: SourceQAFile, path: Path) -> str:
    if spec.format != "auto":
        return spec.format
    suffix = path.suffix.lower()
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}.get(suffix)
    if fmt is None:
        raise SourceQAError(f"{path}: cannot tell the format from suffix {suffix!r}; set format: csv|jsonl|parquet")
    return fmt


def _read_jsonl(path: Path) -> list[tuple[int, Any, str | None, str]]:
    """(line number, parsed object or None, error reason or None, raw text) for each non-blank line."""
    out = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        text = raw.decode("utf-8", errors="surrogateescape").rstrip("\r")
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            out.append((lineno, None, f"invalid_json: {e.msg} at column {e.colno}", text))
            continue
        out.append((lineno, obj, None, text))
    return out


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, Any, str | None, str]]]:
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            raise SourceQAError(f"{path}: empty CSV file (no header)")
        rows = []
        for i, cells in enumerate(reader, start=1):
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                rows.append((i, None, f"malformed_row: {len(cells)} cells, header has {len(header)}",
                             ",".join(cells)))
                continue
            rows.append((i, dict(zip(header, cells)), None, ""))
    except csv.Error as e:
        raise SourceQAError(f"{path}: unreadable CSV ({e})") from None
    return header, rows


def _read_parquet(path: Path) -> tuple[list[str], list[tuple[int, Any, str | None, str]]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a file-level error
        raise SourceQAError(f"{path}: unreadable Parquet ({type(e).__name__}: {e})") from None
    return table.column_names, [(i, r, None, "") for i, r in enumerate(table.to_pylist(), start=1)]


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


def _check_text(fld: str, v: Any) -> None:
    """Reject text that did not decode as UTF-8 (lone surrogates from surrogateescape), recursively."""
    if isinstance(v, str):
        if _SURROGATE.search(v) or any(0xD800 <= ord(ch) <= 0xDFFF for ch in v):
            raise RowError(fld, "undecodable_text", "not valid UTF-8")
    elif isinstance(v, dict):
        for x in v.values():
            _check_text(fld, x)
    elif isinstance(v, list):
        for x in v:
            _check_text(fld, x)


def _maybe_json(fld: str, v: Any, fmt: str) -> Any:
    if fmt != "jsonl" and isinstance(v, str) and v.strip()[:1] in ("[", "{"):
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise RowError(fld, "wrong_type", f"not valid JSON ({e.msg})") from None
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
    if not s.strip():
        if required:
            raise RowError(fld, "empty")
        return None
    return s.strip() if isinstance(v, str) else s


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
    if isinstance(v, list) and all(isinstance(p, str) for p in v):
        return "\n\n".join(p.strip() for p in v if p.strip())
    raise RowError(fld, "wrong_type", "expected a string or a list of strings")


def _context(values: dict[str, Any]) -> dict[str, Any]:
    text_parts: list[str] = []
    table = None
    c = values.get("context")
    if isinstance(c, dict):
        extra = set(c) - {"text", "paragraphs", "table"}
        if extra:
            raise RowError("context", "wrong_type", f"unknown context keys {sorted(extra)}")
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


def _answer_values(answer: str) -> list[dict[str, Any]] | None:
    m = _NUMBER.match(answer)
    if not m:
        return None
    value = float(m["num"].replace(",", ""))
    unit = "%" if m["pct"] else {"$": "USD", "€": "EUR", "£": "GBP"}.get(m["cur"] or "", "")
    return [{"name": "answer", "value": value, "unit": unit}]


# ----------------------------------------------------------------------------- one row
def _row_to_sample(obj: Any, spec: SourceQAFile, source: str, fmt: str, row: int,
                   has_category: bool = True) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise RowError("<row>", "wrong_type", f"expected an object, got {type(obj).__name__}")
    values: dict[str, Any] = {}
    for f in FIELDS:
        cols = [spec.columns[f]] if f in spec.columns else list(_ALIASES.get(f, (f,)))
        for col in cols:
            found, v = _get(obj, col)
            if found:
                _check_text(f, v)
                values[f] = _maybe_json(f, v, fmt) if f in ("table", "labels", "metadata", "context") else v
                break
    question = _text("question", values.get("question"))
    answer = _text("answer", values.get("answer"), numbers_ok=True)
    given_id = _text("id", values.get("id"), numbers_ok=True, required=False)
    task_type = _text("task_type", values.get("task_type"), required=False) or spec.task_type or "open_qa"
    if task_type not in TASK_TYPES:
        raise RowError("task_type", "bad_task_type", f"{task_type!r} is not one of {', '.join(TASK_TYPES)}")
    if has_category:
        category = _text("category", values.get("category"))
    else:
        category = source
    labels = values.get("labels")
    if _is_missing(labels) or labels == "":
        labels = None
    elif isinstance(labels, str):
        labels = [s.strip() for s in labels.split("|") if s.strip()]
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels)):
        raise RowError("labels", "bad_labels", "expected a list of non-empty strings")
    if task_type == "classification":
        if not labels:
            raise RowError("labels", "missing", "classification rows need their label set")
        if answer not in labels:
            raise RowError("answer", "answer_not_in_labels", f"{answer!r} not in {labels}")
    meta = values.get("metadata")
    if _is_missing(meta) or meta == "":
        meta = {}
    if not isinstance(meta, dict):
        raise RowError("metadata", "wrong_type", f"expected an object, got {type(meta).__name__}")
    meta = dict(meta)
    difficulty = _text("difficulty", values.get("difficulty"), numbers_ok=True, required=False)
    if difficulty is not None:
        meta["difficulty"] = difficulty
    if task_type == "numeric_qa" and "answer_values" not in meta:
        av = _answer_values(answer)
        if av:
            meta["answer_values"] = av
    context = _context(values)
    sid = given_id or stable_id(source, question, answer, context)
    if given_id:
        meta["source_id"] = given_id
    meta["origin"] = {"file": spec.path.as_posix(), "row": row}
    group = _text("group_id", values.get("group_id"), numbers_ok=True, required=False) or sid
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


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, str):
        return _printable(x)
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="backslashreplace")
    if x is None or isinstance(x, (bool, int, float)):
        return x
    return str(x)


# ----------------------------------------------------------------------------- one file
def load_source_qa(spec: SourceQAFile, path: Path | None = None, file_label: str | None = None) -> SourceResult:
    """Read one source-QA file. ``path`` is the resolved location (default ``spec.path``); ``file_label``
    is how the file is named in quarantine rows (default: ``spec.path`` as written in the config)."""
    path = Path(path or spec.path)
    label = file_label or spec.path.as_posix()
    source = spec.name or path.stem
    if not path.is_file():
        raise SourceQAError(f"source QA file not found: {path}")
    fmt = _detect_format(spec, path)
    if fmt == "jsonl":
        records = _read_jsonl(path)
        if records and all(err is not None for _, _, err, _ in records):
            raise SourceQAError(f"{path}: unreadable JSONL (no line is a valid JSON object)")
    else:
        header, records = _read_csv(path) if fmt == "csv" else _read_parquet(path)
        for f in ("question", "answer"):
            col = spec.columns.get(f, f)
            if col not in header:
                raise SourceQAError(f"{path}: column {col!r} for field {f!r} not in the header "
                                    f"({', '.join(header)}); set columns.{f} in the source's config")
    cat_col = spec.columns.get("category", "category")
    if fmt == "jsonl":
        has_category = "category" in spec.columns or any(
            isinstance(o, dict) and _get(o, cat_col)[0] for _, o, _, _ in records)
    else:
        has_category = cat_col in header
    res = SourceResult(source=source, file=label, rows_read=len(records))
    seen: dict[str, int] = {}
    for row, obj, err, raw in records:
        q: dict[str, Any] | None = None
        if err is not None:
            reason, _, detail = err.partition(": ")
            fld = "<row>"
            if reason == "invalid_json" and _SURROGATE.search(raw):
                reason, detail = "undecodable_text", "not valid UTF-8"
            q = {"field": fld, "reason": reason, "detail": detail}
        else:
            try:
                s = _row_to_sample(obj, spec, source, fmt, row, has_category)
                if s["id"] in seen:
                    raise RowError("id", "duplicate_id", f"{s['id']!r} already used on row {seen[s['id']]}")
                seen[s["id"]] = row
                res.samples.append(s)
            except RowError as e:
                q = {"field": e.field, "reason": e.reason, "detail": e.detail}
        if q is not None:
            res.quarantine.append({"file": label, "row": row, **q, "raw": _jsonable(obj if obj is not None else raw)})
    if res.quarantine:
        log.warning("%s: %d of %d rows quarantined", label, len(res.quarantine), res.rows_read)
    return res
