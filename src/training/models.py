"""Quantization and PEFT factories for training, and the training-side call of the one model loader.

Small factories in the style of TRL's ``trl/trainer/utils.py``:

- :func:`get_quantization_config` -> a ``BitsAndBytesConfig`` (4-bit NF4, double quantization) or ``None``.
  ``train.quantization: auto`` means NF4 on a GPU and none on CPU; ``nf4`` forces it (bitsandbytes 0.50
  runs NF4 forward and backward on CPU too).
- :func:`get_peft_config` -> a ``peft.LoraConfig`` from ``train.lora``.
- :func:`load_model` -> :func:`lm.causal_lm.load_causal_lm` (the one loader, also used by the local
  provider, evaluation and chat) for training: the quantization ``train.quantization`` asks for, SDPA or
  flash attention, Liger kernels on a GPU when installed. Device and dtype choice live there too.

Nothing here trains; :mod:`training.train` configures TRL's ``SFTTrainer`` with what these return.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lm.causal_lm import compute_dtype, is_installed, load_causal_lm, resolve_device
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


def get_peft_config(train_cfg: TrainConfig) -> LoraConfig:
    """LoRA on the configured modules (``all-linear`` or a list of module names), no bias, causal-LM task."""
    from peft import LoraConfig

    lora = train_cfg.lora
    target = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target,
        bias="none",
        task_type="CAUSAL_LM",
    )


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
