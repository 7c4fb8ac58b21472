"""``gemini``: the google-genai SDK (``client.aio.models.generate_content``).

System messages become ``system_instruction``; ``assistant`` turns become ``model`` turns. A schema
request sets ``response_mime_type="application/json"`` and ``response_schema`` (the pydantic model);
the reply is still validated here and, if invalid, asked again with the error. ``base_url`` (optional)
goes to ``types.HttpOptions(base_url=...)``: the tests point it at a local server speaking the Gemini
REST wire format, since Google cannot be reached from the test machines. The SDK's own retries are
off (its default); retries, backoff and the timeout are the engine's.
"""

from __future__ import annotations

import json
from typing import Any

from datagen.llm.base import ChatRequest, Message
from datagen.llm.engine import AsyncProvider, CallError, Reply, classify_transport, status_error
from datagen.llm.keys import resolve_api_key


class GeminiProvider(AsyncProvider):
    kind = "gemini"

    def __init__(self, name, cfg, cache=None):
        super().__init__(name, cfg, cache)
        if not self.model:
            raise ValueError(f"llm.providers.{name}.model: the gemini provider needs a model name")
        self._api_key = resolve_api_key(name, cfg)  # held in memory only

    def __repr__(self) -> str:  # never shows the key
        return f"GeminiProvider(name={self.name!r}, model={self.model!r}, base_url={self.base_url!r})"

    async def _make_client(self) -> Any:
        from google import genai
        from google.genai import types

        opts: dict[str, Any] = {"timeout": int(self.cfg.timeout_s * 1000)}
        if self.cfg.base_url:
            opts["base_url"] = self.cfg.base_url
        return genai.Client(api_key=self._api_key or "no-key", http_options=types.HttpOptions(**opts))

    def request_args(self, messages: list[Message], req: ChatRequest) -> dict[str, Any]:
        """``model``, ``contents`` and ``config`` for ``generate_content`` (pure; tested exactly)."""
        from google.genai import types

        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        contents = [types.Content(role="model" if m["role"] == "assistant" else "user",
                                  parts=[types.Part(text=m["content"])])
                    for m in messages if m["role"] != "system"]
        conf: dict[str, Any] = {"temperature": req.temperature, "max_output_tokens": req.max_tokens}
        if system:
            conf["system_instruction"] = system
        if req.seed is not None:
            conf["seed"] = req.seed
        if req.stop:
            conf["stop_sequences"] = list(req.stop)
        if req.schema is not None and self.cfg.json_mode != "none":
            conf["response_mime_type"] = "application/json"
            conf["response_schema"] = req.schema
        if self.cfg.extra_body:
            conf.update(self.cfg.extra_body)
        return {"model": self.model, "contents": contents, "config": types.GenerateContentConfig(**conf)}

    async def _acall(self, client: Any, messages: list[Message], req: ChatRequest) -> Reply:
        resp = await client.aio.models.generate_content(**self.request_args(messages, req))
        cands = getattr(resp, "candidates", None)
        if not cands:
            fb = getattr(resp, "prompt_feedback", None)
            raise CallError("blocked" if fb else "bad_response",
                            f"no candidates{f' ({fb})' if fb else ''}", retryable=fb is None)
        parts = (cands[0].content.parts if cands[0].content else None) or []
        text = "".join(p.text for p in parts if getattr(p, "text", None) and not getattr(p, "thought", False))
        um = getattr(resp, "usage_metadata", None)
        return Reply(text=text, prompt_tokens=int(getattr(um, "prompt_token_count", 0) or 0),
                     completion_tokens=int(getattr(um, "candidates_token_count", 0) or 0))

    def _classify(self, exc: BaseException) -> CallError:
        from google.genai import errors

        if isinstance(exc, errors.APIError):
            detail = exc.details if exc.details is not None else exc.message
            detail = detail if isinstance(detail, str) else json.dumps(detail, default=str)
            headers = getattr(getattr(exc, "response", None), "headers", None)
            return status_error(int(exc.code or 0), f"{exc.status}: {detail}", headers)
        return classify_transport(exc)
