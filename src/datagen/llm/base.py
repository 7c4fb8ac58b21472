"""The one interface every language-model call goes through.

Callers build :class:`ChatRequest` objects and hand a batch to a provider's ``generate_batch``;
they get back one :class:`LLMResult` per request, in order. A provider never raises in the middle of
a batch and never drops an item: a failure is a result with ``ok=False`` and a ``error`` reason.

``FunctionProvider`` turns a plain Python function into a provider, for unit tests whose behaviour
under test is ours (validators, parsers), not the model's.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...] | list[Message]
    schema: type[BaseModel] | None = None  # ask for JSON that validates against this model
    temperature: float = 0.0
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    key: str | None = None  # the caller's id for the item (logs, accounting); not part of the cache key


@dataclass
class LLMResult:
    ok: bool
    text: str | None
    parsed: Any = None  # a validated schema instance when the request had a schema
    error: str | None = None  # why it failed (ok=False)
    cached: bool = False
    attempts: int = 0
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens


@dataclass
class Usage:
    """Per-provider accounting, written into stage manifests."""

    calls: int = 0  # requests sent to the model (not counting cache hits)
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    schema_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """Counts accrued after ``before = usage.as_dict()`` (per-stage accounting on a shared provider)."""
        now = self.as_dict()
        return {k: v - before.get(k, 0) for k, v in now.items()}


@runtime_checkable
class LLMProvider(Protocol):
    name: str
    model: str
    usage: Usage

    def generate_batch(self, requests: Sequence[ChatRequest], *, desc: str = "llm") -> list[LLMResult]:
        """One result per request, in order; never raises for a single item's failure."""
        ...


_JSON_BLOCK = re.compile(r"\{.*\}", re.DOTALL)


def parse_structured(text: str | None, schema: type[BaseModel]) -> tuple[BaseModel | None, str | None]:
    """Parse model text into ``schema``: the whole text, else a fenced or first-to-last-brace JSON block.

    Returns ``(instance, None)`` or ``(None, reason)``; never raises.
    """
    if text is None or not text.strip():
        return None, "empty output"
    candidates = [text.strip()]
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fenced:
        candidates.append(fenced.group(1).strip())
    block = _JSON_BLOCK.search(text)
    if block:
        candidates.append(block.group(0))
    last_err = "no JSON object found"
    for c in candidates:
        try:
            data = json.loads(c)
        except json.JSONDecodeError as e:
            last_err = f"invalid JSON: {e.msg} at char {e.pos}"
            continue
        try:
            return schema.model_validate(data), None
        except ValidationError as e:
            errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or '<root>'}: {x['msg']}" for x in e.errors())
            last_err = f"schema validation failed: {errs}"
    return None, last_err


class FunctionProvider:
    """A provider backed by a Python function ``messages -> text`` (for tests and dry runs)."""

    def __init__(self, fn: Callable[[list[Message]], str], name: str = "function", model: str = "fn"):
        self.fn = fn
        self.name = name
        self.model = model
        self.usage = Usage()

    def generate_batch(self, requests: Sequence[ChatRequest], *, desc: str = "llm") -> list[LLMResult]:
        out = []
        for req in requests:
            self.usage.add(calls=1)
            try:
                text = self.fn(list(req.messages))
            except Exception as e:  # a broken fake is a failed item, like any provider
                self.usage.add(failures=1)
                out.append(LLMResult(ok=False, text=None, error=f"{type(e).__name__}: {e}", attempts=1))
                continue
            if req.schema is None:
                out.append(LLMResult(ok=True, text=text, attempts=1))
                continue
            parsed, err = parse_structured(text, req.schema)
            if err:
                self.usage.add(failures=1)
            out.append(LLMResult(ok=err is None, text=text, parsed=parsed, error=err, attempts=1))
        return out
