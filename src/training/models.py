"""Quantization and PEFT factories for training, and the training-side call of the one model loader.

Small factories in the style of TRL's ``trl/trainer/utils.py``:

- :func:`get_quantization_config` -> a ``BitsAndBytesConfig`` (4-bit NF4, double quantization) or ``None``.
  ``train.quantization: auto`` means NF4 on a GPU and none on CPU; ``nf4`` forces it (bitsandbytes 0.50
  runs NF4 forward and backward on CPU too).
- :func:`get_peft_config` -> a ``peft.LoraConfig`` from ``train.lora``; with ``train.lora.end_of_turn`` and a
  tokenizer, the end-of-turn token's embedding row is trained too (PEFT's ``trainable_token_indices``: one row,
  and on a model with tied embeddings the LM head's row with it, see :func:`trainable_token_ids`).
- :func:`load_model` -> :func:`lm.causal_lm.load_causal_lm` (the one loader, also used by the local
  provider, evaluation and chat) for training: the quantization ``train.quantization`` asks for, SDPA or
  flash attention, Liger kernels on a GPU when installed. Device and dtype choice live there too.

Nothing here trains; :mod:`training.train` configures TRL's ``SFTTrainer`` with what these return.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lm.causal_lm import END_OF_TURN, compute_dtype, is_installed, load_causal_lm, resolve_device
from datagen.config import Config, TrainConfig

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, PreTrainedModel

log = logging.getLogger(__name__)


def wants_quantization(train_cfg: TrainConfig, device: str) -> bool:
    if train_cfg.quantization == "auto":
        return device.startswith("cuda")
    return train_cfg.quantization == "nf4"


def get_quantization_config(train_cfg: TrainConfig, device: str) -> BitsAndBytesConfig | None:
    """4-bit NF4 with double quantization (QLoRA), computing in bf16/fp16 on a GPU and fp32 on CPU; or None."""
    if not wants_quantization(train_cfg, device):
        return None
    if not is_installed("bitsandbytes"):
        raise RuntimeError("train.quantization needs bitsandbytes (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(device)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # storing the packed weights in the compute dtype lets FSDP shard them with the rest of the model
        bnb_4bit_quant_storage=dtype,
    )


def trainable_token_ids(train_cfg: TrainConfig, tokenizer: Any) -> list[int]:
    """The token ids whose embedding rows the adapter trains: the tokenizer's end-of-turn token (the first of
    :data:`lm.causal_lm.END_OF_TURN` it has) when ``train.lora.end_of_turn``, else none.

    Why: a base model never ends a chat turn, so its end-of-turn row is untrained. Gemma-3-270M's
    ``<end_of_turn>`` (id 106) has a cosine of ~0.995 with many unused tokens; a LoRA adapter alone cannot make
    it likely, and the tuned model wrote its answer and went on to ``max_new_tokens``. Gemma ties the LM head
    to the embeddings, and PEFT (>= 0.17) then wraps the LM head with the same one-row delta, so the output
    side learns too (see :func:`expose_lm_head_bias` for TRL's fused LM head)."""
    if not train_cfg.lora.end_of_turn or tokenizer is None:
        return []
    vocab = tokenizer.get_vocab()
    found = [vocab[t] for t in END_OF_TURN if t in vocab][:1]
    if not found:
        log.info("train.lora.end_of_turn: the tokenizer has none of %s; no token row is trained", END_OF_TURN)
    return found


def get_peft_config(train_cfg: TrainConfig, tokenizer: Any = None) -> LoraConfig:
    """LoRA on the configured modules (``all-linear`` or a list of module names), no bias, causal-LM task; with a
    ``tokenizer``, also the rows of :func:`trainable_token_ids` (PEFT's ``trainable_token_indices``)."""
    from peft import LoraConfig

    lora = train_cfg.lora
    target = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    tokens = trainable_token_ids(train_cfg, tokenizer)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target,
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices=tokens or None,
    )


def expose_lm_head_bias(model: Any) -> bool:
    """Let TRL's fused LM head read ``lm_head.bias`` when PEFT wraps the LM head for trainable tokens.

    TRL 1.16's fused head (``add_fused_lm_head``) reads ``lm_head.weight`` and ``lm_head.bias`` on every call.
    When the embeddings are tied and ``trainable_token_indices`` is set, PEFT 0.22 replaces the LM head with a
    ``TrainableTokensWrapper`` whose ``weight`` is the effective matrix (the base with the trained rows, so the
    output side is trained through it) but which raises ``AttributeError`` for ``bias`` while the adapter is
    active. This sets the wrapper's ``bias`` to its base layer's (None: a plain attribute, not a parameter, so
    nothing is added to the state dict). A no-op (False) when the LM head is not such a wrapper or already
    answers ``bias``; drop it once PEFT's wrapper forwards ``bias``."""
    head = model.get_output_embeddings()
    if head is None or type(head).__name__ != "TrainableTokensWrapper":
        return False
    try:
        head.bias  # noqa: B018 - the question is whether it raises
        return False
    except AttributeError:
        pass
    bias = head.token_adapter.get_base_layer().bias
    if bias is not None:  # a parameter would be registered on the wrapper and saved twice
        raise ValueError("trainable tokens on an LM head with a bias are not supported by TRL's fused LM head here")
    head.bias = None
    return True


def load_model(cfg: Config, device: str | None = None, *,
               quantization_config: BitsAndBytesConfig | None | str = "auto",
               attn: str | None = None) -> PreTrainedModel:
    """The causal LM of ``cfg.model`` ready to train on ``device`` (``load_causal_lm(..., for_training=True)``).

    ``quantization_config="auto"`` asks :func:`get_quantization_config`; pass ``None`` for a plain load.
    """
    device = resolve_device(device or "auto")
    if quantization_config == "auto":
        quantization_config = get_quantization_config(cfg.train, device)
    return load_causal_lm(cfg.model, device=device, quantization=quantization_config, attn=attn, for_training=True)


def compact_lm_head_on_cpu() -> bool:
    """Make TRL's fused LM head score only the labelled positions on CPU too.

    TRL 1.16's ``add_fused_lm_head`` projects only positions whose label is not -100 on Triton devices,
    but every position elsewhere (so that Neuron keeps fixed tile shapes). On CPU that sends every prompt
    token through the LM head for nothing; for Gemma-3-270M (262k vocabulary, hidden 640) the head is
    ~2/3 of a step's FLOPs, and with assistant-only loss most tokens are prompt. The switch is the
    module-level name ``_use_triton`` in ``trl.trainer.utils``, read only for that decision there (the
    kernels read their own copy, so the tiles stay in plain PyTorch). Applied once per process, and
    only for the TRL versions checked here; returns whether it is active.
    """
    import trl
    import trl.trainer.utils as tu

    current = getattr(tu, "_use_triton", None)
    if current is None:
        return False
    if getattr(current, "_finsynth_compact", False):
        return True
    if not trl.__version__.startswith("1.16"):
        log.info("compact LM head on CPU not applied: checked for TRL 1.16, found %s", trl.__version__)
        return False

    def _compact_everywhere(device) -> bool:
        return True

    _compact_everywhere._finsynth_compact = True  # type: ignore[attr-defined]
    tu._use_triton = _compact_everywhere
    return True


def count_parameters(model: Any) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
