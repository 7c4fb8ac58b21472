"""``openai``: the official openai SDK (async client) against OpenAI or any compatible server.

``base_url`` points it at vLLM (``http://host:8000/v1``), llama.cpp's ``llama-server`` or
llama-cpp-python's server (``http://127.0.0.1:8080/v1``), Ollama (``http://127.0.0.1:11434/v1``).
A server that needs no key gets a placeholder key.

Structured output (``ChatRequest.schema``) by ``json_mode``:

- ``schema``: ``response_format={"type": "json_schema", ...}`` (OpenAI, vLLM, llama-server);
- ``json_object``: ``{"type": "json_object", "schema": ...}`` (llama.cpp servers honour the schema
  there; llama-cpp-python's server answers HTTP 500 to ``json_schema``);
- ``none``: no ``response_format`` (the prompt asks for JSON).

Whatever the mode, the reply is validated against the pydantic model here; an invalid one is asked
again with the validation error (see :mod:`datagen.llm.engine`). ``extra_body`` is merged into
every request body (``top_k``, ``repetition_penalty``, ...). The SDK's own retries are off: retries,
backoff and the timeout are the engine's.

The body is built here (:meth:`OpenAIProvider.request_body`, plain JSON) and sent with the SDK's
``client.post``; the response is parsed into the SDK's ``ChatCompletion`` and its errors are the
SDK's, as with ``chat.completions.create``. What this skips is ``create``'s per-request walk of its
typed parameters, which leaves plain JSON unchanged and cost 0.5 to 1.1 ms of CPU per request, by host
(``benchmarks/results/llm.json``: ``raw`` vs ``raw_post`` on echo). The body is the same JSON that
``create`` sends (tests/test_llm_providers.py).
"""

from __future__ import annotations

import json
from typing import Any

from datagen.llm.base import ChatRequest, LLMResult, Message, pack_candidates, unpack_candidates
from datagen.llm.engine import (
    AsyncProvider,
    CallError,
    Reply,
    classify_transport,
    json_schema_of,
    status_error,
)
from datagen.llm.keys import resolve_api_key

NO_KEY = "sk-no-key-needed"


class OpenAIProvider(AsyncProvider):
    kind = "openai"

    def __init__(self, name, cfg, cache=None):
        super().__init__(name, cfg, cache)
        if not self.model:
            raise ValueError(f"llm.providers.{name}.model: the openai provider needs a model name")
        self._api_key = resolve_api_key(name, cfg)  # held in memory only

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIProvider(name={self.name!r}, model={self.model!r}, base_url={self.base_url!r})"

    async def _make_client(self) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(api_key=self._api_key or NO_KEY, base_url=self.cfg.base_url,
                           timeout=self.cfg.timeout_s, max_retries=0)

    async def _aprobe(self, client: Any) -> None:
        await client.models.list()

    def cache_params(self, req: ChatRequest) -> dict[str, Any]:
        p = super().cache_params(req)
        if req.n > 1 and req.schema is None:
            p["n"] = req.n
        return p

    def generate_batch(self, requests, *, desc: str = "llm") -> list[LLMResult]:
        return unpack_candidates(super().generate_batch(requests, desc=desc))

    def request_body(self, messages: list[Message], req: ChatRequest) -> dict[str, Any]:
        """The JSON body of one ``/chat/completions`` request (pure; tested exactly)."""
        kw: dict[str, Any] = {"model": self.model, "messages": messages,
                              "temperature": req.temperature, "max_tokens": req.max_tokens}
        if req.seed is not None:
            kw["seed"] = req.seed
        if req.stop:
            kw["stop"] = list(req.stop)
        if req.n > 1 and req.schema is None:  # n choices of one prompt (a schema request gets one)
            kw["n"] = req.n
        if req.schema is not None and self.cfg.json_mode != "none":
            schema = json_schema_of(req.schema)
            if self.cfg.json_mode == "schema":
                kw["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": req.schema.__name__, "schema": schema, "strict": False}}
            else:
                kw["response_format"] = {"type": "json_object", "schema": schema}
        if self.cfg.extra_body:  # merged on top, as the SDK merges ``extra_body``
            kw.update(self.cfg.extra_body)
        return kw

    async def _acall(self, client: Any, messages: list[Message], req: ChatRequest) -> Reply:
        from openai.types.chat import ChatCompletion

        resp = await client.post("/chat/completions", body=self.request_body(messages, req), cast_to=ChatCompletion)
        if isinstance(resp, (str, bytes)):  # a non-JSON body the SDK handed back as-is
            raise CallError("bad_response", f"unparseable body: {str(resp)[:200]!r}", retryable=True)
        if not getattr(resp, "choices", None):
            raise CallError("bad_response", "response without choices", retryable=True)
        text = resp.choices[0].message.content or ""
        if req.n > 1 and req.schema is None:  # every choice, in index order (a server may return fewer)
            choices = sorted(resp.choices, key=lambda c: getattr(c, "index", 0) or 0)
            text = pack_candidates([c.message.content or "" for c in choices])
        u = getattr(resp, "usage", None)
        return Reply(text=text, prompt_tokens=int(getattr(u, "prompt_tokens", 0) or 0),
                     completion_tokens=int(getattr(u, "completion_tokens", 0) or 0))

    def _classify(self, exc: BaseException) -> CallError:
        import openai

        if isinstance(exc, openai.APITimeoutError):
            return CallError("timeout", str(exc)[:300], retryable=True)
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__
            return CallError("connection", f"{exc}{f' ({type(cause).__name__})' if cause else ''}"[:300],
                             retryable=True)
        if isinstance(exc, openai.APIStatusError):
            body = exc.body if exc.body is not None else exc.message
            detail = body if isinstance(body, str) else json.dumps(body, default=str)
            return status_error(exc.status_code, detail, exc.response.headers)
        if isinstance(exc, openai.APIResponseValidationError):
            return CallError("bad_response", str(exc)[:300], retryable=True)
        return classify_transport(exc)
