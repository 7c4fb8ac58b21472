"""The one model loader and the one generation function for causal LMs.

The ``local`` LLM provider, training, evaluation and ``finsynth chat`` all load through
:func:`load_causal_lm` and (except training) generate through :func:`generate`.

- :func:`load_causal_lm` loads ``model.name_or_path`` (``packaged:gemma3-270m`` resolves to its cached
  safetensors directory): safetensors only, ``trust_remote_code`` only when the config sets it, dtype
  ``model.dtype`` (``auto``: fp32 on CPU, bf16 or fp16 on a GPU), optionally 4-bit (a ``BitsAndBytesConfig``)
  and a LoRA adapter on top. ``for_training=True`` picks the training attention (flash attention when
  installed, else SDPA one packed conversation at a time) and Liger kernels on a GPU; inference always uses
  PyTorch SDPA (what transformers picked before, so generated text did not change).
- :func:`generate` completes rendered prompts as one left-padded batch, greedy or sampled, with EOS,
  end-of-turn tokens and stop strings ending each row *during* generation, and ``n`` candidates per prompt
  from one prefill. Callers choose the batches (the provider groups requests, evaluation sorts by length).
  A caller whose prompts start alike (the same few-shot exemplars) can have their common head prefilled
  once: at batch 1, optionally kept across calls in a ``heads`` store, its KV cache repeated for every row.

Sampling defaults, the same for every caller: greedy (``temperature=0``); with ``temperature > 0``,
top-k 64 and top-p 0.95 (Gemma's recommendation; the whole 262k vocabulary puts long-tail tokens into a
small model's output). Evaluation samples from the whole vocabulary (``top_k=None, top_p=1.0``), as it
did with ``model.generate``, and passes that explicitly.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm.config import ModelConfig
from lm.packaged import resolve_model_path

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TOP_K, TOP_P = 64, 0.95  # used when temperature > 0, unless the caller passes its own
END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>")  # Gemma, Llama 3, ChatML: each ends a row
RAW_ROLE = "text"  # a conversation of only these turns is raw completion text, no chat template
MIN_SHARED_HEAD = 32  # tokens: a shorter shared head is not worth a forward pass of its own


# ----------------------------------------------------------------------------- device and precision
def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is returned unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@functools.cache
def _glibc() -> Any:
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): its allocator is left as it is
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def release_memory() -> None:
    """Give freed memory back to the OS, now and from now on.

    A training step allocates and frees gigabytes of activations in blocks of a few MB from glibc's heap,
    which keeps what is freed, so the next stage's models would stack on top of it. Here the heap is
    trimmed whenever 1 MB is free at its top, the mmap threshold is fixed at 32 MB (glibc's own limit for
    it; a lower one maps and zeroes every activation anew: 31 s a demo step instead of 19 in one 4-step run
    each), garbage is
    collected and the heap trimmed now. Idempotent; nothing happens where the C library is not glibc."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 20)
        libc.malloc_trim(0)


def compute_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU that supports it, else fp16; fp32 elsewhere (bf16 is ~12x slower on CPU)."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def has_amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 in AMX tiles: torch's own probe (``torch.cpu._is_amx_tile_supported``,
    private, present in torch 2.3 to 2.13 at least; torch is pinned by scripts/setup.sh), and, where Linux
    lists the CPU's flags, ``amx_bf16`` among them. Without the probe (a torch that dropped it) the flags
    alone decide; without either, no. To drop the private call: read the flags only."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        tiles = bool(probe()) if probe is not None else None
    except Exception:  # a probe that cannot run says nothing
        tiles = None
    flags = cpu_flags()
    if tiles is None:
        return "amx_bf16" in flags
    return tiles and (not flags or "amx_bf16" in flags)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vector_flags() -> list[str]:
    """The CPU's vector and matrix flags (AVX*, AMX*, FMA, F16C): what decides CPU training speed, recorded
    with every benchmark."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))


def cpu_autocast_dtype() -> torch.dtype | None:
    """The autocast dtype for training and generation on this CPU: bf16 where the CPU has AMX-BF16
    (a 2048x2048 matmul ~6x the fp32 rate there; a LoRA step of Gemma-3-270M ~1.4x faster), None (plain
    fp32) elsewhere, where bf16 is ~12x slower. ``FINSYNTH_CPU_BF16=0`` / ``1`` overrides."""
    import torch

    env = os.environ.get("FINSYNTH_CPU_BF16", "auto").strip().lower()
    if env in ("0", "off", "false", "no"):
        return None
    if env in ("1", "on", "true", "yes"):
        return torch.bfloat16
    return torch.bfloat16 if has_amx_bf16() else None


def autocast_for(device: str | Any, dtype: torch.dtype | None = None) -> Any:
    """``torch.autocast("cpu", bf16)`` for an fp32 model on a CPU with AMX-BF16 (:func:`cpu_autocast_dtype`),
    else a context that changes nothing."""
    import contextlib

    import torch

    if str(device).startswith("cpu") and dtype in (None, torch.float32):
        half = cpu_autocast_dtype()
        if half is not None:
            return torch.autocast("cpu", dtype=half)
    return contextlib.nullcontext()


def model_dtype(model_cfg: ModelConfig, device: str) -> torch.dtype:
    """``model.dtype``, or for ``auto`` the compute dtype of ``device``."""
    import torch

    return compute_dtype(device) if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype)


VARLEN_SDPA = "finsynth_varlen_sdpa"  # registered with transformers by register_varlen_sdpa()


def attn_implementation(device: str, dtype: torch.dtype) -> str:
    """Training attention: ``flash_attention_2`` on a GPU in half precision when flash-attn is installed,
    else PyTorch SDPA one packed sequence at a time (:func:`varlen_sdpa_attention`).

    Both score each conversation of a padding-free packed batch on its own, from the ``cu_seq_lens`` TRL's
    collator passes.
    """
    import torch

    if device.startswith("cuda") and dtype in (torch.bfloat16, torch.float16) and is_installed("flash_attn"):
        return "flash_attention_2"
    return VARLEN_SDPA


def varlen_sdpa_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                          dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                          **kwargs: Any) -> tuple[Any, None]:
    """PyTorch SDPA over a padding-free batch, one packed sequence at a time.

    TRL's padding-free collator puts a batch's conversations end to end in one row and passes their
    boundaries (``cu_seq_lens_q``). Plain SDPA scores that row as one sequence under a block-diagonal mask:
    ``(sum n)^2`` query-key pairs of which only ``sum n^2`` count (8x the pairs for 8 equal conversations;
    ``benchmarks/bench_train_attention.py`` times both). Here each conversation is scored alone (causal, and within
    ``sliding_window`` on sliding layers, as the mask would have it), like flash attention's varlen kernel.
    Anything else (no boundaries, padded rows, decoding with a cache) is transformers' own SDPA.
    """
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if (cu is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    fused = flash_varlen(query, key, value, cu, dropout, scaling, sliding_window)
    if fused is not None:
        return fused, None
    bounds = cu.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if sliding_window is not None and n > sliding_window:
            i = torch.arange(n, device=query.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                                 scale=scaling)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                                 is_causal=n > 1)
        out.append(o)
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


@functools.cache
def _varlen_kernel() -> tuple[Any, str | None]:
    """PyTorch's flash-attention varlen kernel and how it takes causality (``window_size`` or ``is_causal``;
    None if neither), or ``(None, None)`` where this torch has none. Looked up once, off the hot path."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, next((p for p in ("window_size", "is_causal") if p in params), None)


def flash_varlen(query: Any, key: Any, value: Any, cu: Any, dropout: float, scaling: float | None,
                  sliding_window: int | None) -> Any:
    """On CUDA, every conversation of the packed row in one call of PyTorch's flash-attention varlen kernel
    (``torch.nn.attention.varlen.varlen_attn``) instead of one SDPA call per conversation, whose launches
    bound the GPU step (``benchmarks/results/train_gpu_profile.txt``). Returns ``(1, T, H, D)``, or None
    where it does not apply (CPU, dropout, a sliding window the installed kernel cannot take, no kernel)."""
    import torch

    if not query.is_cuda or dropout or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    kernel, causal = _varlen_kernel()
    kw: dict[str, Any] = {"scale": scaling}
    if causal == "window_size":
        kw["window_size"] = (sliding_window - 1 if sliding_window else -1, 0)
    elif causal == "is_causal" and not sliding_window:
        kw["is_causal"] = True
    else:
        return None
    cu = cu.to(device=query.device, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    return kernel(q, k, v, cu, cu, longest, longest, **kw).unsqueeze(0)


def register_varlen_sdpa() -> str:
    """Register :func:`varlen_sdpa_attention` (with SDPA's mask builder, for its fallback) under
    :data:`VARLEN_SDPA` (once per process; :func:`load_causal_lm` calls it); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if VARLEN_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
        AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    return VARLEN_SDPA


def apply_liger(model: Any) -> bool:
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


# ----------------------------------------------------------------------------- loading
def load_causal_lm(model_cfg: ModelConfig, *, device: str = "auto", quantization: Any = None,
                   adapter: str | Path | None = None, for_training: bool = False, attn: str | None = None) -> Any:
    """The causal LM named by ``model_cfg`` on ``device``.

    - ``quantization``: a ``BitsAndBytesConfig`` (4-bit NF4, see ``training.models.get_quantization_config``)
      or None. On a GPU the parts it leaves unquantized (norms, embeddings) load in the compute dtype.
    - ``adapter``: a saved LoRA adapter folder, put on top (frozen).
    - ``for_training``: flash attention when installed and Liger kernels on a GPU; the model is left in the
      mode transformers loads it in. Otherwise SDPA and ``eval()``.
    - ``attn``: force an attention implementation (``sdpa``, ``eager``, ...).

    On a GPU the model goes to ``cuda:$LOCAL_RANK`` (one process per GPU under accelerate/torchrun).
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    cuda = device.startswith("cuda")
    dtype = compute_dtype(device) if quantization is not None and cuda else model_dtype(model_cfg, device)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": model_cfg.trust_remote_code,
        "attn_implementation": attn or (attn_implementation(device, dtype) if for_training else "sdpa"),
    }
    if kwargs["attn_implementation"] == VARLEN_SDPA:
        register_varlen_sdpa()
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if cuda:
        idx = int(os.environ.get("LOCAL_RANK", "0")) if device == "cuda" else int(device.split(":")[1])
        kwargs["device_map"] = {"": idx}
    elif quantization is not None:
        kwargs["device_map"] = {"": "cpu"}
    log.info("loading %s (%s, dtype=%s, attn=%s, 4-bit=%s, adapter=%s)", model_cfg.name_or_path, device, dtype,
             kwargs["attn_implementation"], quantization is not None, adapter)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_cfg.name_or_path), **kwargs)
    if not cuda and quantization is None and device != "cpu":
        model.to(device)  # mps, xpu, ...
    if for_training and cuda:
        apply_liger(model)
    if adapter is not None:
        model = attach_adapter(model, adapter)
    return model if for_training else model.eval()


def attach_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """``model`` wrapped with the LoRA adapter saved in ``adapter_dir`` (this changes ``model`` in place)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


# ----------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class Generation:
    texts: list[str]  # n candidates: special tokens dropped, cut at the first stop string, stripped
    prompt_tokens: int
    completion_tokens: int  # over all candidates, a row's final stop token included


def render_prompt(tok: Any, conv: Sequence[dict[str, str]]) -> str:
    """The prompt text: the chat template with a generation prompt, or, when every turn has the ``text``
    role, ``<bos>`` and the raw text (a document for a base model to continue)."""
    if conv and all(m["role"] == RAW_ROLE for m in conv):
        return (tok.bos_token or "") + "".join(m["content"] for m in conv)
    return tok.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=True)


def stop_token_ids(tok: Any) -> list[int]:
    """EOS and the end-of-turn tokens the vocabulary has."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    vocab = tok.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s and s in text:
            cut = min(cut, text.index(s))
    return text[:cut]


def generate(model: Any, tok: Any, prompts: Sequence[str], *, max_new_tokens: int | Sequence[int],
             temperature: float = 0.0, top_k: int | None = TOP_K, top_p: float = TOP_P, n: int = 1,
             stop: Sequence[Sequence[str]] | None = None, seed: int | None = None,
             shared: int = 0, heads: dict | None = None) -> list[Generation]:
    """Complete the rendered ``prompts`` (see :func:`render_prompt`) as one left-padded batch.

    Returns one :class:`Generation` per prompt, in order. ``max_new_tokens`` is one limit for all or one
    per prompt; ``stop`` is a tuple of stop strings per prompt. Greedy at ``temperature=0``, else sampling
    with ``top_k`` (None: the whole vocabulary) and ``top_p``, from a generator seeded with ``seed``.
    ``shared`` and ``heads``: the common head prefilled once (see :func:`decode`).
    """
    if not prompts:
        return []
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]  # the template writes <bos>
    stop_ids = stop_token_ids(tok)
    stops = [tuple(s for s in ss if s) for ss in stop] if stop is not None else [()] * len(prompts)
    tail = max((len(s) for ss in stops for s in ss), default=0) + 1  # enough tokens to hold any stop string

    def stopped(b: int, so_far: list[int]) -> bool:  # a stop string ends the row as soon as it appears
        if not stops[b]:
            return False
        text = tok.decode(so_far[-tail:], skip_special_tokens=True)
        return any(s in text for s in stops[b])

    out = decode(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 n=n, stop_ids=stop_ids, pad_id=tok.pad_token_id, stopped=stopped if any(stops) else None,
                 seed=seed, shared=shared, heads=heads)
    return [Generation(texts=[cut_at_stop(tok.decode([t for t in c if t not in stop_ids], skip_special_tokens=True),
                                          stops[b]).strip() for c in cands],
                       prompt_tokens=len(ids[b]), completion_tokens=sum(len(c) for c in cands))
            for b, cands in enumerate(out)]


def _pick(logits: Any, temperature: float, top_k: int | None, top_p: float, generator: Any) -> Any:
    """Next token per row: argmax at temperature 0, else a draw from the top-k tokens (all for None) cut
    to the smallest set whose probability reaches ``top_p``."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    k = min(top_k, logits.shape[-1]) if top_k else logits.shape[-1]
    vals, idx = torch.topk(logits / temperature, k, dim=-1)  # sorted, descending
    probs = vals.softmax(-1)
    if top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return idx.gather(1, choice).squeeze(1)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """``(ids, attention_mask)`` of token lists padded on the left to the longest, on ``device``."""
    import torch

    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, x in enumerate(seqs):
        ids[b, width - len(x):] = torch.tensor(list(x), dtype=torch.long)
        mask[b, width - len(x):] = 1
    return ids.to(device), mask.to(device)


def shared_head_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of the token-id ``prompts``, short of the shortest one's last
    token (every row keeps at least one token of its own to prefill)."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def decode(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
           temperature: float = 0.0, top_k: int | None = TOP_K, top_p: float = TOP_P,
           n: int = 1, stop_ids: Sequence[int] = (), pad_id: int = 0,
           stopped: Callable[[int, list[int]], bool] | None = None,
           seed: int | None = None, shared: int = 0, heads: dict | None = None
           ) -> list[list[list[int]]]:
    """The token loop under :func:`generate`: ``n`` continuations of each prompt of token ids.

    Returns, per prompt, ``n`` lists of new token ids (a stop token, when one ended the row, included).
    A row ends at a token of ``stop_ids``, at ``max_new_tokens`` (one for all, or one per prompt), or
    when ``stopped(prompt_index, ids_so_far)`` says so, and leaves the batch at once (its rows are dropped
    from the KV cache), so a batch gets cheaper as it runs. The prompt is prefilled once and its cache
    repeated ``n`` times. Sampling draws from a generator seeded with ``seed`` (the global RNG when None);
    greedy decoding equals ``model.generate``'s.

    **Shared head**: the first ``shared`` tokens (cut to the prompts' common prefix,
    :func:`shared_head_len`; off below :data:`MIN_SHARED_HEAD`) are prefilled once at batch 1 and their
    cache is repeated for every row; each row's own tail is then left-padded after the head. ``heads``
    (a dict the caller keeps) holds the last head's cache across calls, keyed by its token ids, so the
    batches of one few-shot prompt family pay for its exemplars once. The result equals the unshared one
    for rows as long as the batch's longest tail; a shorter row's padding sits inside the sliding window
    of sliding-window layers (Gemma 3), so those see that many fewer real tokens (batches sorted by length
    keep this to a few).
    """
    import copy

    import torch
    from transformers import DynamicCache

    dev = model.device
    h = min(shared, shared_head_len(prompts)) if shared else 0
    h = h if h >= MIN_SHARED_HEAD else 0
    ids, tail_mask = left_pad([list(p[h:]) for p in prompts], pad_id, dev)
    mask = torch.cat([tail_mask.new_ones((len(prompts), h)), tail_mask], dim=1)
    gen = None
    if seed is not None and temperature > 0:
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seed))
    stop_set = set(stop_ids)
    caps = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model passes kwargs on
    params = inspect.signature(inner.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x

    def forward(cache: Any, input_ids: Any, attn: Any, positions: Any, cache_position: Any, **kw: Any) -> Any:
        if "cache_position" in params:
            kw["cache_position"] = cache_position
        return model(input_ids=input_ids, attention_mask=attn, position_ids=positions, use_cache=True,
                     **{cache_kw: cache}, **kw)

    out: list[list[int]] = [[] for _ in range(len(prompts) * n)]
    rows = list(range(len(out)))  # batch row -> index into out (prompt b, candidate j at b * n + j)
    with torch.inference_mode(), autocast_for(dev, getattr(model, "dtype", None)):
        if h:
            key = (id(model), tuple(prompts[0][:h]))
            head = heads.get(key) if heads is not None else None
            if head is None:
                head = DynamicCache(config=model.config)
                head_ids = torch.tensor([list(prompts[0][:h])], dtype=torch.long, device=dev)
                pos = torch.arange(h, device=dev)
                forward(head, head_ids, mask.new_ones((1, h)), pos.unsqueeze(0), pos, logits_to_keep=1)
                if heads is not None:
                    heads.clear()  # one head at a time: callers batch one prompt family after another
                    heads[key] = head
            cache = copy.deepcopy(head)
            cache.batch_repeat_interleave(len(prompts))
        else:
            cache = DynamicCache(config=model.config)
        step = forward(cache, ids, mask, (h + tail_mask.cumsum(-1) - 1).clamp(min=0),
                       torch.arange(h, h + ids.shape[1], device=dev), logits_to_keep=1)
        logits = step.logits[:, -1, :].float()
        if n > 1:  # one prefill, n continuations
            cache.batch_repeat_interleave(n)
            mask = mask.repeat_interleave(n, dim=0)
            logits = logits.repeat_interleave(n, dim=0)
        while rows:
            nxt = _pick(logits, temperature, top_k, top_p, gen)
            keep = []
            for j, (r, t) in enumerate(zip(rows, nxt.tolist())):
                out[r].append(t)
                if not (t in stop_set or len(out[r]) >= caps[r // n] or (stopped and stopped(r // n, out[r]))):
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(rows):  # finished rows leave the batch
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, nxt = mask[sel], nxt[sel]
                rows = [rows[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            step = forward(cache, nxt.unsqueeze(1), mask, mask.sum(-1, keepdim=True) - 1,
                           torch.tensor([mask.shape[1] - 1], device=dev))
            logits = step.logits[:, -1, :].float()
    return [out[b * n:(b + 1) * n] for b in range(len(prompts))]


# ----------------------------------------------------------------------------- log-likelihood scoring
def continuation_logprobs(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                          end_of_turn: bool = True) -> list[tuple[float, int]]:
    """``(sum of log-probabilities, token count)`` of each continuation given its rendered prompt.

    The ``loglikelihood`` request of lm-evaluation-harness: prompt and continuation are tokenized apart
    (a chat prompt ends with the assistant header, so the boundary is a turn boundary), and only the
    continuation's tokens are scored. With ``end_of_turn`` the tokenizer's end-of-turn token (or EOS) is
    appended and scored too, so ``Paris`` is scored as the whole answer, not as the start of
    ``Paris, France``. Continuations of one prompt that differ only in their last token (one-token labels,
    a verdict's ``{"score": 1`` ... ``{"score": 5``) share one row: its logits at the last position score
    every such last token, so ``k`` options cost one forward pass, not ``k``. Rows are left-padded in
    batches of ``batch_size`` (longest first) and the LM head runs on the continuation positions only.
    """
    import torch

    if not pairs:
        return []
    eot = [i for t in END_OF_TURN if (i := tok.get_vocab().get(t)) is not None][:1] or (
        [tok.eos_token_id] if tok.eos_token_id is not None else [])
    enc = []
    for prompt, cont in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(cont, add_special_tokens=False)["input_ids"] + (eot if end_of_turn else [])
        if not c:
            raise ValueError(f"empty continuation for prompt {prompt[-40:]!r}")
        enc.append((p, c))
    # one row per (prompt, continuation but its last token): the row's input is prompt + that head
    shared: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for i, (p, c) in enumerate(enc):
        shared.setdefault((tuple(p), tuple(c[:-1])), []).append(i)
    rows = list(shared.items())
    out: list[tuple[float, int]] = [(0.0, 0)] * len(enc)
    order = sorted(range(len(rows)), key=lambda r: -(len(rows[r][0][0]) + len(rows[r][0][1])))
    dev = model.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            batch = [rows[r] for r in order[s:s + batch_size]]
            seqs = [list(p) + list(head) for (p, head), _ in batch]
            keep = max(len(head) for (_, head), _ in batch) + 1  # the positions that predict the continuation
            ids, mask = left_pad(seqs, pad, dev)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           logits_to_keep=keep).logits.float()
            logp = logits.log_softmax(-1)  # (batch, keep, vocab); the last position predicts the last token
            for b, ((_, head), members) in enumerate(batch):
                n = len(head) + 1
                head_sum = 0.0
                if head:
                    target = torch.tensor(head, device=dev)
                    head_sum = float(logp[b, keep - n:keep - 1].gather(1, target.unsqueeze(1)).sum())
                for i in members:
                    out[i] = (head_sum + float(logp[b, keep - 1, enc[i][1][-1]]), n)
    return out
