"""API keys: from an environment variable or a Prefect Secret block, never from config files.

The key is handed straight to the SDK client. It is never logged, never part of a cache key or row,
and never written to a manifest (manifests carry ``Config.dump_public()``, which holds only the
*name* of the variable or block).
"""

from __future__ import annotations

import os
import re
import threading

from datagen.config import ProviderConfig

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()
# what a credential looks like even when we never saw it: bearer tokens, OpenAI / Google key shapes,
# and "api_key": "...", x-goog-api-key: ... pairs in echoed bodies or headers
_PATTERNS = [  # group 1 is kept (the label), the rest is the secret
    re.compile(r"(?i)\b((?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]{6,}"),
    re.compile(r"()\bsk-[A-Za-z0-9_-]{6,}"),
    re.compile(r"()\bAIza[0-9A-Za-z_-]{20,}"),
    re.compile(r"(?i)((?:api[_-]?key|x-goog-api-key|access[_-]?token|secret)[\"']?\s*[:=]\s*[\"']?)"
               r"[^\s\"',}]{6,}"),
]
REDACTED = "[REDACTED]"


def register_secret(value: str | None) -> None:
    """Remember a resolved key so :func:`redact` removes it verbatim wherever it shows up."""
    if value and len(value) >= 6:
        with _SECRETS_LOCK:
            _SECRETS.add(value)


def _env_secrets() -> list[str]:
    return [v for k, v in os.environ.items()
            if len(v) >= 8 and any(w in k.upper() for w in ("KEY", "TOKEN", "SECRET", "PASSWORD"))]


def redact(text: str | None) -> str | None:
    """The one redaction function: every string that leaves a provider (error bodies, headers,
    exception texts, echoed replies) passes through here before it reaches a record, log or artifact.
    Removes every registered key and every secret-looking environment value verbatim, then anything
    shaped like a credential."""
    if not text:
        return text
    with _SECRETS_LOCK:
        known = sorted(_SECRETS | set(_env_secrets()), key=len, reverse=True)
    for v in known:
        if v in text:
            text = text.replace(v, REDACTED)
    for pat in _PATTERNS:
        text = pat.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class MissingKeyError(RuntimeError):
    """The provider names a key source that holds nothing (the message names the source, not a key)."""


def resolve_api_key(name: str, cfg: ProviderConfig) -> str | None:
    """The provider's key, or None when it needs none (a local OpenAI-compatible server)."""
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if key:
            register_secret(key)
            return key
        if not cfg.api_key_secret_block:
            raise MissingKeyError(f"llm.providers.{name}: environment variable {cfg.api_key_env} is not set")
    if cfg.api_key_secret_block:
        try:
            from prefect.blocks.system import Secret  # lazy: datagen never needs Prefect otherwise
        except ImportError as e:
            raise MissingKeyError(f"llm.providers.{name}: Prefect is needed to read Secret block "
                                  f"{cfg.api_key_secret_block!r}") from e
        try:
            key = Secret.load(cfg.api_key_secret_block).get()
        except Exception as e:
            raise MissingKeyError(f"llm.providers.{name}: cannot load Prefect Secret block "
                                  f"{cfg.api_key_secret_block!r} ({type(e).__name__})") from None
        register_secret(key)
        return key
    return None
