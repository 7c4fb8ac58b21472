"""The target model's tokenizer with the chat template finsynth trains and evaluates with.

``model.chat_template`` names a template under ``prompts/`` (the packaged Gemma base has none of its
own; ``gemma_chat`` adds TRL's ``{% generation %}`` markers so loss falls on assistant turns only).
``None`` keeps the tokenizer's own template (an instruct model such as Llama-3.2-3B-Instruct).
"""

from __future__ import annotations

from datagen.config import ModelConfig
from lm.packaged import resolve_model_path
from datagen.prompts import load_prompt


def load_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model_cfg.name_or_path),
                                        trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.chat_template:
        tok.chat_template = load_prompt(model_cfg.chat_template).text
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
