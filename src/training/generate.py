"""Batched generation for evaluation: the base model (zero-shot and few-shot prompts), then the same
base with the adapter on top.

Prompts are rendered with the tokenizer and chat template that training used
(:func:`datagen.tokenizer.load_tokenizer`), from a row's ``messages`` minus the assistant turn, with
``add_generation_prompt=True``. A few-shot prompt (:func:`fewshot_messages`) puts each exemplar's own
user turn and answer before the item's user turn, as earlier turns of the same chat. Generation is
greedy unless ``temperature > 0``, stops at ``<end_of_turn>`` or EOS, and runs in length-sorted
batches with left padding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from datagen.config import ModelConfig
from datagen.packaged import resolve_model_path
from datagen.schema import render_context

log = logging.getLogger(__name__)

STOP_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>")


def prompt_messages(row: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation up to (not including) the final assistant turn.

    A row from the dataset carries ``messages``; a row without them (a gold-task file of canonical
    rows) gets ``[system?, user: context + question]``.
    """
    msgs = row.get("messages")
    if msgs is not None and len(msgs) > 0:
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        return msgs
    ctx = render_context(row.get("context"))
    user = f"{ctx}\n\n{row['question']}" if ctx else row["question"]
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user}]


def fewshot_messages(row: dict[str, Any], exemplars: Sequence[dict[str, Any]],
                     system_prompt: str | None = None) -> list[dict[str, str]]:
    """``[system?, (user, assistant) per exemplar, user]``: the exemplars as prior turns of the chat.

    Each exemplar is rendered like the item (its ``messages`` when the item has them, else context +
    question), its assistant turn is its answer; the system turn, if any, is the item's.
    """
    item = prompt_messages(row, system_prompt)
    head = item[:1] if item and item[0]["role"] == "system" else []
    shots: list[dict[str, str]] = []
    for ex in exemplars:
        ex = ex if row.get("messages") is not None and len(row["messages"]) > 0 else {**ex, "messages": None}
        shots += [m for m in prompt_messages(ex, system_prompt) if m["role"] != "system"]
        shots.append({"role": "assistant", "content": str(ex["answer"]).strip()})
    return head + shots + item[len(head):]


def device_and_dtype(model_cfg: ModelConfig):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model_cfg.dtype != "auto":
        dtype = getattr(torch, model_cfg.dtype)
    else:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return device, dtype


def load_base(model_cfg: ModelConfig, tok=None):
    """(model, tokenizer): the base model (safetensors, fp32 on CPU) and the training tokenizer."""
    from transformers import AutoModelForCausalLM

    from datagen.tokenizer import load_tokenizer

    device, dtype = device_and_dtype(model_cfg)
    tok = tok or load_tokenizer(model_cfg)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_cfg.name_or_path), dtype=dtype,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    model.to(device).eval()
    return model, tok


def attach_adapter(model, adapter_dir: str | Path):
    """The base ``model`` wrapped with the LoRA adapter saved in ``adapter_dir``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def render_prompts(tok, conversations: Sequence[list[dict[str, str]]]) -> list[str]:
    return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def _stop_ids(tok) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    vocab = tok.get_vocab()
    ids.update(vocab[t] for t in STOP_TOKENS if t in vocab)
    return sorted(ids)


def generate(model, tok, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
             batch_size: int = 8, seed: int = 0, desc: str = "generate") -> list[str]:
    """Completions of ``prompts`` (already rendered), in order, cut at the first stop token."""
    import torch

    if not prompts:
        return []
    torch.manual_seed(seed)
    tok.padding_side = "left"
    # the template already writes <bos>: don't let the tokenizer add another
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    stop = _stop_ids(tok)
    out: list[str | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": stop,
                                  "pad_token_id": tok.pad_token_id}
    if temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        enc = tok([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.inference_mode():
            seqs = model.generate(**enc, **gen_kwargs)
        new = seqs[:, enc["input_ids"].shape[1]:]
        for i, ids in zip(batch, new, strict=True):
            ids = ids.tolist()
            cut = next((k for k, t in enumerate(ids) if t in stop), len(ids))
            out[i] = tok.decode(ids[:cut], skip_special_tokens=True).strip()
    return [o or "" for o in out]


ADAPTER_ARMS = ("tuned",)  # arms generated with the adapter on; every other arm is the base model


def generate_arms(model_cfg: ModelConfig, adapter_dir: str | Path,
                  conversations: dict[str, Sequence[list[dict[str, str]]]], *, max_new_tokens: int,
                  temperature: float = 0.0, batch_size: int = 8, seed: int = 0, cache=None) -> dict[str, list[str]]:
    """``{arm: [answer, ...]}`` for ``{arm: conversations}``: the base is loaded once, generates every
    base arm (``base``, ``fewshot``), and is then wrapped with the adapter for ``tuned``.

    With ``cache`` (a :class:`datagen.llm.ResponseCache`), base-model answers are looked up and stored by
    (model, rendered prompt, generation settings): the base arms do not change between runs that train
    different adapters (a sweep), so only the first run pays for them. Tuned answers are never cached."""
    import gc

    from datagen.llm.cache import cache_key
    from datagen.tokenizer import load_tokenizer

    kw = {"max_new_tokens": max_new_tokens, "temperature": temperature, "batch_size": batch_size, "seed": seed}
    tok = load_tokenizer(model_cfg)
    prompts = {arm: render_prompts(tok, convs) for arm, convs in conversations.items()}
    out: dict[str, list[str | None]] = {arm: [None] * len(p) for arm, p in prompts.items()}
    keys: dict[str, list[str]] = {}
    if cache is not None and temperature == 0.0:
        params = {**kw, "dtype": model_cfg.dtype, "batch_size": None}
        for arm, ps in prompts.items():
            if arm in ADAPTER_ARMS:
                continue
            keys[arm] = [cache_key(kind="eval-generate", model=model_cfg.name_or_path, base_url=None, params=params,
                                   messages=[{"role": "prompt", "content": p}]) for p in ps]
            hits = cache.get_many(keys[arm])
            out[arm] = [hits[k]["text"] if k in hits else None for k in keys[arm]]
    todo = {arm: [i for i, a in enumerate(out[arm]) if a is None] for arm in prompts}
    if not any(todo.values()):
        return {arm: list(out[arm]) for arm in conversations}  # type: ignore[misc]
    model, tok = load_base(model_cfg, tok)
    for arm in [a for a in prompts if a not in ADAPTER_ARMS and todo[a]]:
        got = generate(model, tok, [prompts[arm][i] for i in todo[arm]], desc=f"generate {arm}", **kw)
        for i, text in zip(todo[arm], got):
            out[arm][i] = text
            if arm in keys:
                cache.put(keys[arm][i], provider="eval-generate", model=model_cfg.name_or_path, text=text)
    if any(todo[a] for a in prompts if a in ADAPTER_ARMS):
        tuned_model = attach_adapter(model, adapter_dir)
        for arm in [a for a in prompts if a in ADAPTER_ARMS]:
            out[arm] = generate(tuned_model, tok, prompts[arm], desc=f"generate {arm}", **kw)
        del tuned_model
    del model
    gc.collect()
    return {arm: list(out[arm]) for arm in conversations}  # type: ignore[misc]


def chat(model_cfg: ModelConfig, adapter_dir: str | Path | None, system_prompt: str | None, *,
         read=input, write=print, max_new_tokens: int = 160) -> int:
    """A terminal chat with the tuned model (the base with ``adapter_dir`` on top; the base alone when
    None): the same chat template and greedy decoding as evaluation. Ends on EOF, ``exit`` or ``quit``.
    Returns the number of answers given."""
    model, tok = load_base(model_cfg)
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir)
    conv: list[dict[str, str]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    answers = 0
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        if line.lower() in ("exit", "quit"):
            break
        if not line:
            continue
        conv.append({"role": "user", "content": line})
        (answer,) = generate(model, tok, render_prompts(tok, [conv]), max_new_tokens=max_new_tokens, desc="answer")
        conv.append({"role": "assistant", "content": answer})
        write(f"model> {answer}")
        answers += 1
    return answers
