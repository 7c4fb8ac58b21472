"""Language-model providers behind one interface.

    from datagen.llm import ChatRequest, get_provider
    llm = get_provider(cfg, cfg.augment.provider)
    results = llm.generate_batch([ChatRequest(messages=[...], schema=MyModel)], desc="rephrase")
    manifest["llm_usage"] = llm.usage.as_dict()

Kinds (``cfg.llm.providers[name].kind``): ``openai`` (OpenAI and every OpenAI-compatible server),
``gemini`` (google-genai) and ``local`` (transformers). See docs/providers.md.
"""

from __future__ import annotations

import threading

from datagen.config import Config, ConfigError, ProviderConfig
from datagen.llm.base import (
    ChatRequest,
    FunctionProvider,
    LLMProvider,
    LLMResult,
    LLMUnavailable,
    Message,
    Usage,
    check_failure_rate,
    parse_structured,
)
from datagen.llm.cache import ResponseCache, cache_target, configured_cache, open_cache

__all__ = [
    "ChatRequest", "FunctionProvider", "LLMProvider", "LLMResult", "LLMUnavailable", "Message", "Usage",
    "check_failure_rate", "probe_provider",
    "parse_structured", "get_provider", "make_provider", "ResponseCache", "open_cache",
    "cache_target", "configured_cache",
]

_PROVIDERS: dict[tuple[str, str, str], LLMProvider] = {}
_PROVIDERS_LOCK = threading.Lock()


def make_provider(name: str, pcfg: ProviderConfig, cache: ResponseCache | None) -> LLMProvider:
    """A new provider instance (no reuse); ``get_provider`` is what callers want."""
    if pcfg.kind == "local":
        from datagen.llm.local import LocalProvider

        return LocalProvider(name, pcfg, cache)
    if pcfg.kind == "openai":
        from datagen.llm.openai_provider import OpenAIProvider

        return OpenAIProvider(name, pcfg, cache)
    if pcfg.kind == "llamacpp_server":
        from datagen.llm.llamacpp_server import LlamaServerProvider

        return LlamaServerProvider(name, pcfg, cache)
    if pcfg.kind == "gemini":
        from datagen.llm.gemini_provider import GeminiProvider

        return GeminiProvider(name, pcfg, cache)
    raise ConfigError(f"llm.providers.{name}.kind: unknown provider kind {pcfg.kind!r}")


def get_provider(cfg: Config, name: str) -> LLMProvider:
    """The provider ``cfg.llm.providers[name]``, sharing the response cache ``cfg.llm.cache`` (a URL) or,
    when that is unset, ``cfg.llm.cache_file``.

    One instance per (provider settings, cache) per process, so its usage counters, rate limit
    and concurrency limit are shared by every caller in the process.
    """
    if name not in cfg.llm.providers:
        raise ConfigError(f"llm.providers: no provider named {name!r} (defined: {sorted(cfg.llm.providers)})")
    pcfg = cfg.llm.providers[name]
    target = cache_target(cfg)
    ident = (name, pcfg.model_dump_json(), str(target))
    with _PROVIDERS_LOCK:
        prov = _PROVIDERS.get(ident)
        if prov is None:
            prov = make_provider(name, pcfg, open_cache(target))
            _PROVIDERS[ident] = prov
        return prov


_PROBED: set[int] = set()


def probe_provider(cfg: Config, name: str) -> LLMProvider:
    """``get_provider``, then one cheap call (once per provider per process): a missing key, a dead
    server or a refused key fails here, before any stage spends time, with one line."""
    prov = get_provider(cfg, name)
    if id(prov) not in _PROBED:
        probe = getattr(prov, "probe", None)
        if probe is not None:
            probe()
        _PROBED.add(id(prov))
    return prov
