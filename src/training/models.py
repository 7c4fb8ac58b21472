"""Model loading for training and inference: device and precision choice, quantization and PEFT factories.

Small factories in the style of TRL's ``trl/trainer/utils.py``:

- :func:`get_quantization_config` -> a ``BitsAndBytesConfig`` (4-bit NF4, double quantization) or ``None``.
  ``train.quantization: auto`` means NF4 on a GPU and none on CPU; ``nf4`` forces it (bitsandbytes 0.50
  runs NF4 forward and backward on CPU too).
- :func:`get_peft_config` -> a ``peft.LoraConfig`` from ``train.lora``.
- :func:`load_model` -> the causal LM from ``model.name_or_path`` (``packaged:gemma3-270m`` is resolved to its
  cached safetensors directory), safetensors only, ``trust_remote_code`` from the config, SDPA or flash
  attention, Liger kernels on a GPU when installed.

Nothing here trains; :mod:`training.train` configures TRL's ``SFTTrainer`` with what these return.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import TYPE_CHECKING, Any

from datagen.config import Config, TrainConfig
from datagen.packaged import resolve_model_path

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, PreTrainedModel

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is returned unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def compute_dtype(device: str) -> torch.dtype:
    """Mixed-precision dtype: bf16 where the GPU supports it, else fp16; fp32 on CPU (bf16 is ~12x slower here)."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def model_dtype(cfg: Config, device: str) -> torch.dtype:
    """The dtype the (unquantized part of the) model is loaded in.

    ``model.dtype``, or for ``auto`` the compute dtype.
    """
    import torch

    if cfg.model.dtype == "auto":
        return compute_dtype(device)
    return getattr(torch, cfg.model.dtype)


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


def attn_implementation(device: str, dtype: torch.dtype) -> str:
    """``flash_attention_2`` on a GPU in half precision when flash-attn is installed, else PyTorch SDPA.

    Both handle padding-free packed batches: flash attention through ``cu_seq_lens``, SDPA through the
    block-diagonal mask transformers builds from the restarting ``position_ids``.
    """
    import torch

    if device.startswith("cuda") and dtype in (torch.bfloat16, torch.float16) and is_installed("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def load_model(cfg: Config, device: str | None = None, *,
               quantization_config: BitsAndBytesConfig | None | str = "auto",
               attn: str | None = None) -> PreTrainedModel:
    """Load the causal LM named by ``cfg.model`` for training (or inference) on ``device``.

    ``quantization_config="auto"`` asks :func:`get_quantization_config`; pass ``None`` for a plain load
    (e.g. the base for a merge). Weights must be safetensors (no pickle files).
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device or "auto")
    if quantization_config == "auto":
        quantization_config = get_quantization_config(cfg.train, device)
    dtype = model_dtype(cfg, device)
    if quantization_config is not None and device.startswith("cuda"):
        dtype = compute_dtype(device)  # non-quantized parts (norms, embeddings) in the compute dtype
    path = resolve_model_path(cfg.model.name_or_path)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": cfg.model.trust_remote_code,
        "attn_implementation": attn or attn_implementation(device, dtype),
    }
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device.startswith("cuda"):
        # one process per GPU under accelerate/torchrun: each loads onto its own device
        idx = int(os.environ.get("LOCAL_RANK", "0")) if device == "cuda" else int(device.split(":")[1])
        kwargs["device_map"] = {"": idx}
    elif quantization_config is not None:
        kwargs["device_map"] = {"": "cpu"}
    log.info("loading %s (%s, dtype=%s, attn=%s, 4-bit=%s)", cfg.model.name_or_path, device, dtype,
             kwargs["attn_implementation"], quantization_config is not None)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization_config is None and not device.startswith("cuda") and device != "cpu":
        model.to(device)
    if device.startswith("cuda"):
        apply_liger(model)
    return model


def apply_liger(model: PreTrainedModel) -> bool:
    """Patch the model's layers (RMSNorm, RoPE, SwiGLU/GeGLU) with Liger's Triton kernels when installed.

    Only the layer kernels: TRL's fused LM head already computes the loss without materialising logits,
    so Liger's fused linear cross-entropy is left off (TRL rejects it).
    """
    if not is_installed("liger_kernel"):
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    except Exception as e:  # noqa: BLE001 - an architecture Liger does not know: train without it
        log.warning("Liger kernels not applied: %s", e)
        return False
    log.info("Liger kernels applied")
    return True


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
