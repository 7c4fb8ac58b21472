"""Machinery shared by every provider, written once.

- :class:`BaseProvider` owns the batch contract: cache look-up, one result per request in input
  order, a progress bar, schema validation with the validation error fed back to the model, the
  response cache write on each success, and the :class:`~datagen.llm.base.Usage` counters.
- :class:`AsyncProvider` adds what a remote API needs: bounded concurrency, a requests-per-minute
  limiter, a per-call timeout, and retries with exponential backoff and jitter on 429 / 5xx /
  timeouts / connection errors / unreadable bodies, honouring ``Retry-After``; other 4xx fail at
  once. It runs its own event loop in a daemon thread, so ``generate_batch`` is a plain blocking call
  from any thread (also one that already runs a loop, such as a Prefect task) and the concurrency
  limit holds across threads that share the provider.

A subclass supplies only the wire call (``_acall``) and how its SDK's exceptions map onto
:class:`CallError` (``_classify``).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from tqdm.auto import tqdm

from datagen.config import ProviderConfig
from datagen.executor import shared_rate_limiter
from datagen.llm.base import ChatRequest, LLMResult, LLMUnavailable, Message, Usage, parse_structured
from datagen.llm.cache import CacheWriter, ResponseCache, cache_key
from datagen.llm.keys import redact
from datagen.progress import Progress

log = logging.getLogger(__name__)

RETRY_AFTER_CAP_S = 300.0  # never sleep longer than this on a server's say-so


@dataclass
class Reply:
    """One model answer off the wire."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class CallError(Exception):
    """A failed call, classified: ``kind`` is a stable tag (``http_429``, ``timeout``, ...)."""

    def __init__(self, kind: str, detail: str, *, retryable: bool, retry_after: float | None = None):
        detail = redact(detail) or ""  # servers echo headers and keys back in error bodies
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after


def status_error(status: int, detail: str, headers: Any = None) -> CallError:
    """The shared HTTP status policy: retry 408, 409, 429 and 5xx; fail other 4xx at once."""
    retryable = status in (408, 409, 429) or status >= 500
    return CallError(f"http_{status}", detail[:500], retryable=retryable,
                     retry_after=parse_retry_after(headers) if retryable else None)


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if not headers:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        ra = headers.get("retry-after")
    except Exception:  # an odd headers object: no hint
        return None
    if ra is None:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify_transport(exc: BaseException) -> CallError:
    """Errors below the SDK's own classes: timeouts, dropped connections, unreadable bodies.

    Transient transport faults and unparseable responses (truncated or garbage bodies) are
    retried; anything else (a bug, a bad argument) fails the item at once.
    """
    name = type(exc).__name__
    mod = type(exc).__module__.split(".")[0]
    detail = f"{name}: {exc}"[:500]
    if isinstance(exc, TimeoutError) or "Timeout" in name:
        return CallError("timeout", detail, retryable=True)
    if isinstance(exc, (ConnectionError, EOFError)) or (
            mod.startswith(("httpx", "httpcore", "h11", "anyio", "aiohttp"))
            and any(w in name for w in ("Connect", "Protocol", "Read", "Write", "Network", "Transport",
                                        "Closed", "Incomplete", "Stream"))):
        return CallError("connection", detail, retryable=True)
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)) or name in (
            "ValidationError", "DecodingError", "APIResponseValidationError"):
        return CallError("bad_response", detail, retryable=True)
    return CallError("error", detail, retryable=False)


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (0-based).

    With a server hint: the hint (capped at 5 min), plus a little jitter so a crowd does not return
    in lockstep. Without: exponential ``base * 2**attempt`` capped at ``cap``, with "equal jitter"
    (half fixed, half random).
    """
    r = rng or random
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP_S) + r.uniform(0, min(0.1 * retry_after, 1.0))
    d = min(cap, base * (2 ** attempt))
    return d / 2 + r.uniform(0, d / 2)


class RateLimiter:
    """Requests-per-minute limit: call starts are spaced ``60 / rpm`` seconds apart."""

    def __init__(self, rpm: int | None, clock: Callable[[], float] = time.monotonic):
        self.interval = 60.0 / rpm if rpm else 0.0
        self._clock = clock
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Book the next start slot; returns how long to wait for it."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        return slot - now

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)


@functools.lru_cache(maxsize=256)
def json_schema_of(schema: type[BaseModel]) -> dict[str, Any]:
    """``schema.model_json_schema()``, computed once per class (treat the result as read-only)."""
    return schema.model_json_schema()


def schema_feedback(text: str, error: str, schema: type[BaseModel]) -> list[Message]:
    """The turns appended after an invalid structured answer: the answer, then the error."""
    from datagen.prompts import load_prompt

    schema_json = json.dumps(json_schema_of(schema), separators=(",", ":"))
    return [
        {"role": "assistant", "content": text},
        {"role": "user", "content": load_prompt("schema_retry").render(error=error, schema_json=schema_json)},
    ]


def failure(error: str, *, text: str | None = None, attempts: int = 0,
            usage: dict[str, int] | None = None) -> LLMResult:
    """A failed item. Its texts are redacted: this is where an error leaves the provider."""
    return LLMResult(ok=False, text=redact(text), error=redact(error), attempts=attempts, usage=usage or {})


AUTH_ERRORS = ("http_401", "http_403")


class BaseProvider:
    """Batch contract shared by all providers; subclasses implement ``_run_batch``."""

    kind = "base"

    def __init__(self, name: str, cfg: ProviderConfig, cache: ResponseCache | None = None):
        self.name = name
        self.cfg = cfg
        self.cache = cache
        self.model = cfg.model or self.default_model()
        self.usage = Usage()
        self.auth_error: str | None = None  # set at the first 401/403: every later call is refused
        self._owner = f"{os.getpid()}:{id(self)}"  # whose claims these are, in the shared response cache
        self._claims: list[str] = []

    # ------------------------------------------------------------------ identity
    def default_model(self) -> str:
        return ""

    @property
    def base_url(self) -> str | None:
        return self.cfg.base_url

    def cache_params(self, req: ChatRequest) -> dict[str, Any]:
        """Everything besides model and messages that changes the answer (part of the cache key)."""
        return {
            "temperature": req.temperature,
            "max_tokens": req.max_tokens,
            "seed": req.seed,
            "stop": list(req.stop),
            "schema": json_schema_of(req.schema) if req.schema is not None else None,
            "json_mode": self.cfg.json_mode if req.schema is not None else None,
            "extra_body": self.cfg.extra_body or None,
        }

    def request_key(self, req: ChatRequest, sample: int = 0) -> str:
        return cache_key(kind=self.kind, model=self.model, base_url=self.base_url,
                         params=self.cache_params(req), messages=list(req.messages), sample=sample)

    def batch_keys(self, requests: Sequence[ChatRequest]) -> list[str]:
        """Cache keys; the n-th identical request in a batch is its own sample (its own key)."""
        seen: Counter[str] = Counter()
        keys = []
        for req in requests:
            base = self.request_key(req)
            n = seen[base]
            seen[base] += 1
            keys.append(base if n == 0 else self.request_key(req, sample=n))
        return keys

    def _safe_keys(self, requests: list[ChatRequest]) -> tuple[list[str | None], dict[int, str]]:
        """``batch_keys``, but a malformed request becomes an error for that item, not an exception."""
        try:
            return list(self.batch_keys(requests)), {}
        except Exception:
            pass
        ok, errors = [], {}
        for i, req in enumerate(requests):
            try:
                self.request_key(req)
                ok.append(req)
            except Exception as e:
                errors[i] = f"bad_request: {type(e).__name__}: {e}"
        good = iter(self.batch_keys(ok))
        return [None if i in errors else next(good) for i in range(len(requests))], errors

    # ------------------------------------------------------------------ batch contract
    def generate_batch(self, requests: Sequence[ChatRequest], *, desc: str = "llm") -> list[LLMResult]:
        """One :class:`LLMResult` per request, in input order; never raises for an item."""
        requests = list(requests)
        results: list[LLMResult | None] = [None] * len(requests)
        if not requests:
            return []
        keys, bad = self._safe_keys(requests)
        bar = _Bar(tqdm(total=len(requests), desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5),
                   Progress(desc, len(requests), "requests", heartbeat_s=30.0))
        writer = CacheWriter(self.cache) if self.cache is not None else None
        try:
            hits = self.cache.get_many([k for k in keys if k]) if self.cache is not None else {}
            todo: list[tuple[int, ChatRequest, str]] = []
            for i, (req, key) in enumerate(zip(requests, keys)):
                if key is None:
                    results[i] = failure(bad[i])
                    self.usage.failed(bad[i])
                    bar.update(1)
                    continue
                hit = hits.get(key)
                res = self._from_cache(req, hit) if hit is not None else None
                if res is None:
                    todo.append((i, req, key))
                    continue
                results[i] = res
                self.usage.add(cache_hits=1)
                bar.update(1)

            def done(i: int, key: str, res: LLMResult) -> None:
                if results[i] is not None:  # a second answer for one item is a bug; keep the first
                    log.error("%s: item %d answered twice; keeping the first", self.name, i)
                    return
                if res.ok and writer is not None:  # stored off this thread (it may be an event loop)
                    writer.put(key, provider=self.kind, model=self.model, text=res.text or "",
                               prompt_tokens=res.usage.get("prompt_tokens", 0),
                               completion_tokens=res.usage.get("completion_tokens", 0))
                if not res.ok:
                    self.usage.failed(res.error)
                results[i] = res
                bar.update(1)

            todo = self._claimed(todo, results, hits_from=lambda i, req, hit: self._from_cache(req, hit), bar=bar)
            self.usage.add(requests=len(todo))
            if todo and self.auth_error:
                raise LLMUnavailable(self._auth_message())
            if todo:
                try:
                    self._run_batch(todo, done)
                except Exception as e:  # the contract: never raise mid-batch
                    log.error("%s: batch runner failed: %s", self.name, redact(f"{type(e).__name__}: {e}"))
                    for i, _req, key in todo:
                        if results[i] is None:
                            done(i, key, failure(f"internal: {type(e).__name__}: {e}"))
                for i, _req, key in todo:
                    if results[i] is None:
                        done(i, key, failure("internal: no result produced"))
        finally:
            bar.close()
            if writer is not None:
                writer.close()  # every answer on disk before our claims on them are released
            if self.cache is not None and self._claims:
                self.cache.release(self._claims, self._owner)
                self._claims = []
        if self.auth_error:  # the one exception to "never raise": a refused key fails everything after it
            raise LLMUnavailable(self._auth_message())
        return results  # type: ignore[return-value]

    def _claimed(self, todo, results, *, hits_from, bar) -> list[tuple[int, ChatRequest, str]]:
        """Claim the keys this batch must call for; wait for those another process is calling right now
        (a second run sharing the cache file) and take their answers from the cache instead of paying twice.
        Returns the items left for us to call."""
        if self.cache is None or not todo or not hasattr(self.cache, "claim_many"):
            return todo
        def answered(keys: set[str]) -> set[str]:
            """Serve the items whose keys now have an answer in the cache; the keys served."""
            found = self.cache.get_many(list(keys)) if keys else {}
            served = set()
            for i, req, key in todo:
                if key in found and results[i] is None:
                    res = hits_from(i, req, found[key])
                    if res is not None:
                        results[i] = res
                        self.usage.add(cache_hits=1)
                        bar.update(1)
                        served.add(key)
            return served

        mine, theirs = self.cache.claim_many([k for _, _, k in todo], self._owner)
        self._claims = list(mine)
        answered(set(mine))  # another worker may have finished a key between our first read and our claim
        waiting = set(theirs)
        deadline = time.monotonic() + self.cfg.timeout_s * (self.cfg.max_retries + 1) + 60
        while waiting and time.monotonic() < deadline:
            time.sleep(0.5)
            waiting -= answered(waiting)
            if waiting:  # an owner that gave up or died releases its claim: take it over
                took, _ = self.cache.claim_many(list(waiting), self._owner)
                self._claims += took
                waiting -= set(took)
                answered(set(took))
        return [(i, req, key) for i, req, key in todo if results[i] is None]

    def _auth_message(self) -> str:
        return (f"provider {self.name!r}: the server refused our credentials ({self.auth_error}); "
                f"check llm.providers.{self.name}.api_key_env / api_key_secret_block")

    def probe(self) -> None:
        """A cheap check that the provider can work, before the first stage that needs it (the key is
        already resolved at construction). Raises :class:`LLMUnavailable` with one line."""
        return None

    def _from_cache(self, req: ChatRequest, hit: dict[str, Any]) -> LLMResult | None:
        usage = {"prompt_tokens": hit["prompt_tokens"], "completion_tokens": hit["completion_tokens"]}
        if req.schema is None:
            return LLMResult(ok=True, text=hit["text"], cached=True, usage=usage)
        parsed, err = parse_structured(hit["text"], req.schema)
        if err is not None:  # e.g. the schema's validators changed: ask again
            return None
        return LLMResult(ok=True, text=hit["text"], parsed=parsed, cached=True, usage=usage)

    def _run_batch(self, items: list[tuple[int, ChatRequest, str]],
                   done: Callable[[int, str, LLMResult], None]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ structured output
    def check_reply(self, req: ChatRequest, text: str) -> tuple[Any, str | None]:
        """Validate a reply: ``(parsed, None)`` when fine (``parsed`` is None without a schema)."""
        if req.schema is None:
            return None, None
        return parse_structured(text, req.schema)


class _ItemState:
    __slots__ = ("attempts", "prompt_tokens", "completion_tokens")

    def __init__(self) -> None:
        self.attempts = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


class AsyncProvider(BaseProvider):
    """A remote API: concurrency, RPM limit, timeouts, retries; one event loop thread per provider."""

    def __init__(self, name: str, cfg: ProviderConfig, cache: ResponseCache | None = None):
        super().__init__(name, cfg, cache)
        # on a Ray worker, the rpm limit is the whole cluster's (datagen.executor), not this process's
        shared = shared_rate_limiter(name) if cfg.rpm else None
        self.limiter: RateLimiter | Any = shared or RateLimiter(cfg.rpm)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._loop_pid = 0
        self._loop_lock = threading.Lock()
        self._sem: asyncio.Semaphore | None = None
        self._client: Any = None

    # ------------------------------------------------------------------ subclass hooks
    async def _make_client(self) -> Any:
        raise NotImplementedError

    async def _acall(self, client: Any, messages: list[Message], req: ChatRequest) -> Reply:
        raise NotImplementedError

    def _classify(self, exc: BaseException) -> CallError:
        raise NotImplementedError

    async def _aprobe(self, client: Any) -> None:
        """One cheap request (a models list); the default makes none."""

    def probe(self) -> None:
        loop = self._ensure_loop()

        async def go() -> None:
            if self._client is None:
                self._client = await self._make_client()
            async with asyncio.timeout(min(self.cfg.timeout_s, 30.0)):
                await self._aprobe(self._client)

        try:
            asyncio.run_coroutine_threadsafe(go(), loop).result()
        except Exception as e:
            err = e if isinstance(e, CallError) else (
                CallError("timeout", "no answer", retryable=True) if isinstance(e, TimeoutError) else self._classify(e))
            if err.kind in AUTH_ERRORS:
                self.auth_error = err.kind
                raise LLMUnavailable(self._auth_message()) from None
            raise LLMUnavailable(f"provider {self.name!r} is not reachable at {self.base_url or 'its default URL'}: "
                                 f"{err.kind}: {err.detail}") from None

    # ------------------------------------------------------------------ loop plumbing
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            alive = (self._loop is not None and not self._loop.is_closed() and self._loop_pid == os.getpid()
                     and self._loop_thread is not None and self._loop_thread.is_alive())
            if not alive:  # first use, or a forked child that inherited a dead loop thread
                loop = asyncio.new_event_loop()
                t = threading.Thread(target=loop.run_forever, name=f"llm-{self.name}", daemon=True)
                t.start()
                self._loop, self._loop_thread, self._loop_pid = loop, t, os.getpid()
                self._sem, self._client = None, None  # both belong to a loop
            return self._loop

    def _run_batch(self, items, done) -> None:
        loop = self._ensure_loop()
        # ``done`` runs in the loop thread; it only touches its own item's slot
        fut = asyncio.run_coroutine_threadsafe(self._abatch(items, done), loop)
        try:
            fut.result()
        except BaseException:  # e.g. KeyboardInterrupt in the caller: stop the batch's calls too
            fut.cancel()
            raise

    async def _abatch(self, items, done) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.cfg.concurrency)
        if self._client is None:
            self._client = await self._make_client()
        await asyncio.gather(*(self._aitem(i, req, key, done) for i, req, key in items))

    # ------------------------------------------------------------------ one item
    async def _aitem(self, i: int, req: ChatRequest, key: str, done) -> None:
        st = _ItemState()
        try:
            conv: list[Message] = [dict(m) for m in req.messages]
            last_text, last_err = None, None
            for round_ in range(self.cfg.schema_retries + 1):
                reply, err = await self._call_with_retries(conv, req, st)
                if reply is None:
                    done(i, key, failure(err or "unknown", attempts=st.attempts, usage=st.usage()))
                    return
                parsed, perr = self.check_reply(req, reply.text)
                if perr is None:
                    done(i, key, LLMResult(ok=True, text=reply.text, parsed=parsed,
                                           attempts=st.attempts, usage=st.usage()))
                    return
                last_text, last_err = reply.text, perr
                if round_ < self.cfg.schema_retries:
                    self.usage.add(schema_retries=1)
                    conv = conv + schema_feedback(reply.text, perr, req.schema)
            done(i, key, failure(f"schema_invalid: {last_err}", text=last_text, attempts=st.attempts,
                                 usage=st.usage()))
        except Exception as e:
            log.error("%s: item %d crashed: %s", self.name, i, redact(f"{type(e).__name__}: {e}"))
            done(i, key, failure(f"internal: {type(e).__name__}: {e}", attempts=st.attempts,
                                 usage=st.usage()))

    async def _call_with_retries(self, conv: list[Message], req: ChatRequest,
                                 st: _ItemState) -> tuple[Reply | None, str | None]:
        cfg = self.cfg
        for attempt in range(cfg.max_retries + 1):
            await self.limiter.acquire()
            assert self._sem is not None
            async with self._sem:
                if self.auth_error:  # refused once: make no more calls with that key
                    return None, f"skipped: credentials refused earlier ({self.auth_error})"
                self.usage.add(calls=1)
                st.attempts += 1
                try:
                    async with asyncio.timeout(cfg.timeout_s):  # no extra task per call (unlike wait_for)
                        reply = await self._acall(self._client, conv, req)
                except asyncio.CancelledError:
                    raise
                except TimeoutError:
                    err = CallError("timeout", f"no answer within {cfg.timeout_s:g}s", retryable=True)
                except Exception as e:
                    err = e if isinstance(e, CallError) else self._classify(e)
                else:
                    st.prompt_tokens += reply.prompt_tokens
                    st.completion_tokens += reply.completion_tokens
                    self.usage.add(prompt_tokens=reply.prompt_tokens,
                                   completion_tokens=reply.completion_tokens)
                    return reply, None
            if err.kind in AUTH_ERRORS:
                self.auth_error = self.auth_error or err.kind
            if not err.retryable:
                return None, f"{err.kind}: {err.detail}"
            if attempt == cfg.max_retries:
                return None, f"{err.kind}: {err.detail} (gave up after {attempt + 1} attempts)"
            self.usage.add(retries=1)
            delay = backoff_delay(attempt, cfg.backoff_base_s, cfg.backoff_max_s, err.retry_after)
            log.debug("%s: %s; retry %d in %.2fs", self.name, err.kind, attempt + 1, delay)
            await asyncio.sleep(delay)
        return None, "unreachable"


class _Bar:
    """A tqdm bar (the worker's own output) and a :class:`~datagen.progress.Progress` (log lines that reach
    the run log and the main command's terminal), moved together."""

    def __init__(self, bar: Any, progress: Progress):
        self.bar, self.progress = bar, progress

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.progress.update(n)

    def close(self) -> None:
        self.bar.close()
        self.progress.close()
