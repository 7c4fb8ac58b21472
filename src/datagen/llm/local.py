"""``local``: batched transformers generation on a local model directory.

The default is the packaged Gemma-3-270M base (``packaged:gemma3-270m``). A base model has no chat
template of its own, so messages are rendered with the Gemma turn template from
``prompts/gemma_chat.jinja`` (the one training uses) and generation stops at ``<end_of_turn>``.
A model that ships its own chat template (an instruct model) keeps it.

The model is loaded once per process (keyed by path and device) and shared by every provider
instance. Requests are grouped by sampling parameters, sorted by prompt length and generated in
left-padded batches of ``batch_size``; schema requests that fail validation go round again with the
error appended, like the remote providers.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections import defaultdict
from typing import Any

from datagen.config import ModelConfig
from datagen.llm.base import ChatRequest, LLMResult, Message
from datagen.llm.engine import BaseProvider, failure, schema_feedback

log = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = "packaged:gemma3-270m"
_MODELS: dict[tuple[str, str], tuple[Any, Any, threading.Lock]] = {}
_MODELS_LOCK = threading.Lock()


def _pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_local_model(model_path: str, device: str = "auto") -> tuple[Any, Any, threading.Lock]:
    """``(model, tokenizer, lock)`` for ``model_path``; loaded once per process."""
    from datagen.packaged import resolve_model_path

    dev = _pick_device(device)
    path = resolve_model_path(model_path)
    with _MODELS_LOCK:
        if (path, dev) in _MODELS:
            return _MODELS[(path, dev)]
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from datagen.tokenizer import load_tokenizer

        own = AutoTokenizer.from_pretrained(path)
        if own.chat_template:
            tok = own
        else:  # a base model: the Gemma turn template training uses
            tok = load_tokenizer(ModelConfig(name_or_path=path, chat_template="gemma_chat"))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        dtype = torch.float32 if dev == "cpu" else torch.bfloat16
        log.info("loading local model %s on %s (%s)", path, dev, dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev)
        model.eval()
        _MODELS[(path, dev)] = (model, tok, threading.Lock())
        return _MODELS[(path, dev)]


class _Item:
    __slots__ = ("i", "req", "key", "conv", "attempts", "round", "pt", "ct")

    def __init__(self, i: int, req: ChatRequest, key: str):
        self.i, self.req, self.key = i, req, key
        self.conv: list[Message] = [dict(m) for m in req.messages]
        self.attempts = self.round = self.pt = self.ct = 0

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.pt, "completion_tokens": self.ct}


class LocalProvider(BaseProvider):
    kind = "local"

    def default_model(self) -> str:
        return self.cfg.model_path or DEFAULT_MODEL_PATH

    @property
    def base_url(self) -> str | None:
        return None

    def cache_params(self, req: ChatRequest) -> dict[str, Any]:
        p = super().cache_params(req)
        p.pop("json_mode", None)
        p.pop("extra_body", None)
        return p

    def _run_batch(self, items, done) -> None:
        model, tok, lock = load_local_model(self.cfg.model_path or DEFAULT_MODEL_PATH, self.cfg.device)
        pending = [_Item(i, req, key) for i, req, key in items]
        while pending:
            again: list[_Item] = []
            for chunk in self._chunks(pending, tok):
                try:
                    with lock:
                        outs = self._generate(model, tok, chunk)
                except Exception as e:  # an item's failure, never the batch's exception
                    log.exception("%s: local generation failed", self.name)
                    for it in chunk:
                        done(it.i, it.key, failure(f"local_error: {type(e).__name__}: {e}",
                                                   attempts=it.attempts, usage=it.usage()))
                    continue
                for it, (text, pt, ct) in zip(chunk, outs):
                    it.attempts += 1
                    it.pt += pt
                    it.ct += ct
                    self.usage.add(calls=1, prompt_tokens=pt, completion_tokens=ct)
                    parsed, err = self.check_reply(it.req, text)
                    if err is None:
                        done(it.i, it.key, LLMResult(ok=True, text=text, parsed=parsed,
                                                     attempts=it.attempts, usage=it.usage()))
                    elif it.round < self.cfg.schema_retries:
                        it.round += 1
                        it.conv = it.conv + schema_feedback(text, err, it.req.schema)
                        self.usage.add(schema_retries=1)
                        again.append(it)
                    else:
                        done(it.i, it.key, failure(f"schema_invalid: {err}", text=text,
                                                   attempts=it.attempts, usage=it.usage()))
            pending = again

    def _chunks(self, items: list[_Item], tok) -> list[list[_Item]]:
        """Group by sampling parameters, sort by prompt length, cut into ``batch_size`` chunks."""
        groups: dict[tuple, list[_Item]] = defaultdict(list)
        for it in items:
            groups[(it.req.temperature, it.req.max_tokens)].append(it)
        chunks = []
        for _, group in sorted(groups.items(), key=lambda kv: kv[0]):
            group.sort(key=lambda it: sum(len(m["content"]) for m in it.conv))
            bs = self.cfg.batch_size
            chunks.extend(group[j:j + bs] for j in range(0, len(group), bs))
        return chunks

    def _generate(self, model, tok, chunk: list[_Item]) -> list[tuple[str, int, int]]:
        import torch

        prompts = [tok.apply_chat_template(it.conv, tokenize=False, add_generation_prompt=True)
                   for it in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        stop_ids = [tok.eos_token_id]
        eot = tok.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(eot, int) and eot != tok.unk_token_id:
            stop_ids.append(eot)
        req = chunk[0].req
        gen_kwargs: dict[str, Any] = {"max_new_tokens": req.max_tokens, "eos_token_id": stop_ids,
                                      "pad_token_id": tok.pad_token_id}
        if req.temperature > 0:
            # Gemma's recommended sampling (top-k 64, top-p 0.95): sampling from the whole 262k vocabulary
            # puts long-tail tokens (other scripts, stray words) into a small model's output
            gen_kwargs.update(do_sample=True, temperature=req.temperature, top_p=0.95, top_k=64)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        seeds = [it.req.seed for it in chunk if it.req.seed is not None]
        seed = zlib.crc32(repr(seeds).encode()) if seeds else None
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(**enc, **gen_kwargs)
        n_in = enc["input_ids"].shape[1]
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, it in enumerate(chunk):
            new = out[row, n_in:].tolist()
            cut = len(new)
            for j, t in enumerate(new):
                if t in stop_ids:
                    cut = j + 1
                    break
            ids = [t for t in new[:cut] if t not in stop_ids and t != tok.pad_token_id]
            text = tok.decode(ids, skip_special_tokens=True)
            for s in it.req.stop:
                if s and s in text:
                    text = text[:text.index(s)]
            results.append((text.strip(), int(prompt_lens[row]), cut))
        return results
