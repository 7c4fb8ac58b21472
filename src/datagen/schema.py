"""The canonical sample: every stage reads and writes rows of this shape.

A row is a plain dict on disk (JSONL between stages, Parquet for the final dataset);
:class:`Sample` validates it. ``context`` holds text and/or a table::

    {"text": "paragraphs ...", "table": {"columns": ["Date", "Close"], "rows": [["2024-01-02", "101.2"]]}}

``metadata`` is free-form JSON: graders read exact figures from ``metadata["answer_values"]``,
provenance goes under ``metadata["prompt"]`` / ``metadata["origin"]``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TaskType = Literal["open_qa", "numeric_qa", "classification"]
TASK_TYPES: tuple[str, ...] = ("open_qa", "numeric_qa", "classification")
SPLITS = ("train", "validation", "test")  # the dataset's splits, in this order
SCENARIO_SOURCE = "scenario_synth"  # the ``source`` of tasks written by scenario synthesis


class Table(BaseModel):
    model_config = ConfigDict(extra="forbid")
    columns: list[str]
    rows: list[list[str]]

    @field_validator("rows")
    @classmethod
    def _width(cls, rows: list[list[str]], info: Any) -> list[list[str]]:
        cols = info.data.get("columns") or []
        for i, r in enumerate(rows):
            if len(r) != len(cols):
                raise ValueError(f"table row {i} has {len(r)} cells, expected {len(cols)}")
        return rows


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = ""
    table: Table | None = None


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    group_id: str = Field(min_length=1)
    source: str = Field(min_length=1)
    task_type: TaskType
    category: str = Field(min_length=1)
    scenario: str | None = None
    question: str = Field(min_length=1)
    context: Context = Context()
    answer: str = Field(min_length=1)
    labels: list[str] | None = None
    metadata: dict[str, Any] = {}
    is_rephrase: bool = False
    rephrase_index: int | None = None

    @field_validator("question", "answer")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    def to_row(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def render_table(table: Table | dict | None) -> str:
    """A table as a compact Markdown table (what the model sees)."""
    if not table:
        return ""
    t = table if isinstance(table, Table) else Table.model_validate(table)
    head = "| " + " | ".join(t.columns) + " |"
    sep = "|" + "|".join("---" for _ in t.columns) + "|"
    body = ["| " + " | ".join(r) + " |" for r in t.rows]
    return "\n".join([head, sep, *body])


def render_context(context: Context | dict | None) -> str:
    """Context as prompt text: the table first, then paragraphs."""
    if not context:
        return ""
    c = context if isinstance(context, Context) else Context.model_validate(context)
    parts = [render_table(c.table), c.text.strip()]
    return "\n\n".join(p for p in parts if p)


def stable_id(*parts: Any, n: int = 16) -> str:
    """Deterministic id from its parts (same inputs, same id, any machine)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]
