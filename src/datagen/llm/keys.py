"""API keys: from an environment variable or a Prefect Secret block, never from config files.

The key is handed straight to the SDK client. It is never logged, never part of a cache key or row,
and never written to a manifest (manifests carry ``Config.dump_public()``, which holds only the
*name* of the variable or block).
"""

from __future__ import annotations

import os

from datagen.config import ProviderConfig


class MissingKeyError(RuntimeError):
    """The provider names a key source that holds nothing (the message names the source, not a key)."""


def resolve_api_key(name: str, cfg: ProviderConfig) -> str | None:
    """The provider's key, or None when it needs none (a local OpenAI-compatible server)."""
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if key:
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
            return Secret.load(cfg.api_key_secret_block).get()
        except Exception as e:
            raise MissingKeyError(f"llm.providers.{name}: cannot load Prefect Secret block "
                                  f"{cfg.api_key_secret_block!r} ({type(e).__name__})") from None
    return None
