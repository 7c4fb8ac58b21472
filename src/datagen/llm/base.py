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
    # candidates wanted for this one prompt (``num_return_sequences`` locally, ``n`` on OpenAI-compatible
    # servers): they share the prompt's prefill; ``LLMResult.texts`` holds them all. 1 = one answer.
    n: int = 1


@dataclass
class LLMResult:
    ok: bool
    text: str | None
    parsed: Any = None  # a validated schema instance when the request had a schema
    error: str | None = None  # why it failed (ok=False)
    cached: bool = False
    attempts: int = 0
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens
    texts: list[str] = field(default_factory=list)  # every candidate of an ``n > 1`` request; text is the first

    def candidates(self) -> list[str]:
        """All answers: ``texts`` for an ``n > 1`` request, else ``[text]`` (none when it failed)."""
        if self.texts:
            return list(self.texts)
        return [self.text] if self.ok and self.text is not None else []


# An ``n > 1`` answer travels through the provider machinery (response cache included) as one string;
# ``unpack_candidates`` turns it back into ``text`` (the first) + ``texts`` (all).
_PACKED = "\x01finsynth-candidates\x01"


def pack_candidates(texts: Sequence[str]) -> str:
    return _PACKED + json.dumps(list(texts), ensure_ascii=False)


def unpack_candidates(results: list[LLMResult]) -> list[LLMResult]:
    """Results whose text is a packed candidate list get ``texts`` = the list and ``text`` = its first."""
    for r in results:
        if r.text is not None and r.text.startswith(_PACKED):
            try:
                r.texts = [str(t) for t in json.loads(r.text[len(_PACKED):])]
            except (json.JSONDecodeError, TypeError):
                r.texts = []
            r.text = r.texts[0] if r.texts else ""
    return results


class LLMUnavailable(RuntimeError):
    """A provider that cannot do its job: authentication refused, or most of a stage's calls failed.
    The one exception a provider lets out of ``generate_batch`` (an item's failure never raises)."""


# failures that say "the model answered, but badly" rather than "the model is not there": they are
# the validators' business, not a reason to fail the stage
CONTENT_ERRORS = ("schema_invalid", "bad_request")


def error_kind(error: str | None) -> str:
    """The stable tag of an ``LLMResult.error`` (``http_401: ...`` -> ``http_401``)."""
    return (error or "unknown").split(":", 1)[0].strip() or "unknown"


@dataclass
class Usage:
    """Per-provider accounting, written into stage manifests."""

    calls: int = 0  # model calls made, retries included (not counting cache hits)
    requests: int = 0  # items sent to the model (not answered from the cache)
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    schema_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _errors: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def failed(self, error: str | None) -> None:
        """Count one failed item under its error kind."""
        kind = error_kind(error)
        with self._lock:
            self.failures += 1
            self._errors[kind] = self._errors.get(kind, 0) + 1

    def errors(self) -> dict[str, int]:
        """Failed items per error kind."""
        with self._lock:
            return dict(self._errors)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def snapshot(self) -> dict[str, Any]:
        """Counts and error kinds now, for :func:`check_failure_rate` after a stage's calls."""
        return {**self.as_dict(), "errors": self.errors()}


def check_failure_rate(stage: str, provider: LLMProvider, before: dict[str, Any], max_rate: float) -> None:
    """Fail loudly when a stage's model calls mostly failed: raise :class:`LLMUnavailable` with one line
    naming the provider, the dominant error kind and its count, when the items that failed for a
    non-content reason (connection, timeout, HTTP status, internal) are all of them, or more than
    ``max_rate`` of them. ``before`` is ``provider.usage.snapshot()`` taken when the stage started."""
    now = provider.usage.snapshot()
    sent = now["requests"] - before.get("requests", 0)
    errs = {k: v - before.get("errors", {}).get(k, 0) for k, v in now["errors"].items()}
    hard = {k: v for k, v in errs.items() if v > 0 and k not in CONTENT_ERRORS}
    failed = sum(hard.values())
    if sent <= 0 or failed == 0 or (failed < sent and failed / sent <= max_rate):
        return
    kind, n = max(hard.items(), key=lambda kv: kv[1])
    raise LLMUnavailable(
        f"{stage}: provider {provider.name!r} ({provider.model or 'model?'}) failed {failed} of {sent} calls; "
        f"most common error: {kind} x{n} (limit: more than {max_rate:.0%} fails the stage, llm.max_failure_rate)")


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
            self.usage.add(calls=1, requests=1)
            try:
                texts = [self.fn(list(req.messages)) for _ in range(max(1, req.n))]
                text = texts[0]
            except Exception as e:  # a broken fake is a failed item, like any provider
                error = f"internal: {type(e).__name__}: {e}"
                self.usage.failed(error)
                out.append(LLMResult(ok=False, text=None, error=error, attempts=1))
                continue
            if req.schema is None:
                out.append(LLMResult(ok=True, text=text, attempts=1, texts=texts if req.n > 1 else []))
                continue
            parsed, err = parse_structured(text, req.schema)
            if err:
                err = f"schema_invalid: {err}"
                self.usage.failed(err)
            out.append(LLMResult(ok=err is None, text=text, parsed=parsed, error=err, attempts=1))
        return out
