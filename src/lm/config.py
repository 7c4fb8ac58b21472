"""What names a model: the one config section :mod:`lm` reads (``model:`` in a finsynth profile)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name_or_path: str = "packaged:gemma3-270m"  # a folder, a Hub id (offline: already cached) or packaged:<name>
    chat_template: str | None = "gemma_chat"  # template name under prompts/; None = the tokenizer's own
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
