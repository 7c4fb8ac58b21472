"""``local``: batched transformers generation on a local model directory.

The default is the packaged Gemma-3-270M base (``packaged:gemma3-270m``). A base model has no chat
template of its own, so messages are rendered with the Gemma turn template from
``prompts/gemma_chat.jinja`` (the one training uses) and generation stops at ``<end_of_turn>``.
A model that ships its own chat template (an instruct model) keeps it.

A conversation of ``{"role": "text"}`` messages only is sent as raw text after ``<bos>``, with no
chat template: the completion format a *base* model continues naturally (few-shot documents).

The model is loaded once per process (keyed by path and device) and shared by every provider
instance. Requests are grouped by sampling parameters, sorted by prompt length and generated in
left-padded batches of ``batch_size`` requests by :func:`decode`, the one local generation loop:

- stop strings (``ChatRequest.stop``) and EOS / ``<end_of_turn>`` end each sequence *during*
  generation, and a finished sequence leaves the batch (its rows are dropped from the KV cache), so
  the batch gets cheaper as it runs instead of waiting for its longest member;
- a request with ``n > 1`` is prefilled once and its KV cache is expanded to ``n`` sampled
  continuations (``num_return_sequences`` without paying the prompt ``n`` times).

Schema requests that fail validation go round again with the error appended, like the remote
providers (a schema request always gets one answer).
"""

from __future__ import annotations

import inspect
import logging
import threading
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from datagen.config import ModelConfig
from datagen.llm.base import ChatRequest, LLMResult, Message, pack_candidates, unpack_candidates
from datagen.llm.engine import BaseProvider, failure, schema_feedback

log = logging.getLogger(__name__)

DEFAULT_MODEL_PATH = "packaged:gemma3-270m"
RAW_ROLE = "text"  # messages of this role only: raw completion text, no chat template
TOP_K, TOP_P = 64, 0.95  # Gemma's recommended sampling
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


def render_prompt(tok: Any, conv: Sequence[Message]) -> str:
    """The prompt text: the chat template with a generation prompt, or raw text for ``text`` turns."""
    if conv and all(m["role"] == RAW_ROLE for m in conv):
        return (tok.bos_token or "") + "".join(m["content"] for m in conv)
    return tok.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=True)


def _pick(logits: Any, temperature: float, generator: Any) -> Any:
    """Next token per row: greedy at temperature 0, else temperature + top-k 64 + top-p 0.95 sampling
    (sampling from the whole 262k vocabulary puts long-tail tokens into a small model's output)."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    vals, idx = torch.topk(logits / temperature, min(TOP_K, logits.shape[-1]), dim=-1)  # sorted, descending
    probs = vals.softmax(-1)
    probs = probs.masked_fill(probs.cumsum(-1) - probs > TOP_P, 0.0)  # keep the smallest set reaching top_p
    choice = torch.multinomial(probs, 1, generator=generator)
    return idx.gather(1, choice).squeeze(1)


def decode(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
           temperature: float = 0.0,
           n: int = 1, stop_ids: Sequence[int] = (), pad_id: int = 0,
           stopped: Callable[[int, list[int]], bool] | None = None,
           seed: int | None = None) -> list[list[list[int]]]:
    """Generate ``n`` continuations of each prompt (token ids, left-padded into one batch).

    Returns, per prompt, ``n`` lists of new token ids (a stop token, when one ended the row, included).
    A row ends at a token of ``stop_ids``, at ``max_new_tokens`` (one for all, or one per prompt), or
    when ``stopped(prompt_index, ids_so_far)`` says so (stop strings), and leaves the batch at once.
    The prompt is prefilled once and its cache repeated ``n`` times. Sampling draws from a generator
    seeded with ``seed`` (the global RNG when None); greedy decoding equals ``model.generate``'s.
    """
    import torch
    from transformers import DynamicCache

    dev = model.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[b, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    gen = None
    if seed is not None and temperature > 0:
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seed))
    stop_set = set(stop_ids)
    caps = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x

    def forward(input_ids: Any, positions: Any, cache_position: Any, **kw: Any) -> Any:
        if "cache_position" in params:
            kw["cache_position"] = cache_position
        return model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     **{cache_kw: cache}, **kw)

    out: list[list[int]] = [[] for _ in range(len(prompts) * n)]
    rows = list(range(len(out)))  # batch row -> index into out (prompt b, candidate j at b * n + j)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        step = forward(ids, (mask.cumsum(-1) - 1).clamp(min=0), torch.arange(width, device=dev), logits_to_keep=1)
        logits = step.logits[:, -1, :].float()
        if n > 1:  # one prefill, n continuations
            cache.batch_repeat_interleave(n)
            mask = mask.repeat_interleave(n, dim=0)
            logits = logits.repeat_interleave(n, dim=0)
        while rows:
            nxt = _pick(logits, temperature, gen)
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
            step = forward(nxt.unsqueeze(1), mask.sum(-1, keepdim=True) - 1,
                           torch.tensor([mask.shape[1] - 1], device=dev))
            logits = step.logits[:, -1, :].float()
    return [out[b * n:(b + 1) * n] for b in range(len(prompts))]


def stop_token_ids(tok: Any) -> list[int]:
    ids = [tok.eos_token_id]
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(eot, int) and eot != tok.unk_token_id and eot not in ids:
        ids.append(eot)
    return ids


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s and s in text:
            cut = min(cut, text.index(s))
    return text[:cut]


class _Item:
    __slots__ = ("i", "req", "key", "conv", "attempts", "round", "pt", "ct")

    def __init__(self, i: int, req: ChatRequest, key: str):
        self.i, self.req, self.key = i, req, key
        self.conv: list[Message] = [dict(m) for m in req.messages]
        self.attempts = self.round = self.pt = self.ct = 0

    @property
    def n(self) -> int:  # a schema request gets one answer (its retry loop validates one text)
        return 1 if self.req.schema is not None else max(1, self.req.n)

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
        if req.n > 1 and req.schema is None:
            p["n"] = req.n
        return p

    def generate_batch(self, requests, *, desc: str = "llm") -> list[LLMResult]:
        return unpack_candidates(super().generate_batch(requests, desc=desc))

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
                    if it.n > 1:  # packed candidates; generate_batch unpacks them
                        done(it.i, it.key, LLMResult(ok=True, text=text, attempts=it.attempts, usage=it.usage()))
                        continue
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
        """Group by temperature and candidate count, sort by prompt length (length buckets), cut into
        chunks of ``batch_size`` requests (a request of ``n`` candidates is ``n`` rows). ``max_tokens``
        is per row: a row that reaches its own limit leaves the batch like a finished one."""
        groups: dict[tuple, list[_Item]] = defaultdict(list)
        for it in items:
            groups[(it.req.temperature, it.n)].append(it)
        chunks = []
        for _, group in sorted(groups.items(), key=lambda kv: kv[0]):
            group.sort(key=lambda it: sum(len(m["content"]) for m in it.conv))
            bs = self.cfg.batch_size
            chunks.extend(group[j:j + bs] for j in range(0, len(group), bs))
        return chunks

    def _generate(self, model, tok, chunk: list[_Item]) -> list[tuple[str, int, int]]:
        """Per item: its text (stop strings cut; ``n > 1``: the packed candidates), prompt tokens, tokens
        generated."""
        prompts = [tok(render_prompt(tok, it.conv), add_special_tokens=False)["input_ids"] for it in chunk]
        stop_ids = stop_token_ids(tok)
        stops = [tuple(s for s in it.req.stop if s) for it in chunk]
        tail = max((len(s) for ss in stops for s in ss), default=0) + 1

        def stopped(b: int, ids: list[int]) -> bool:  # a stop string ends the row as soon as it appears
            if not stops[b]:
                return False
            text = tok.decode(ids[-tail:], skip_special_tokens=True)
            return any(s in text for s in stops[b])

        seeds = [it.req.seed for it in chunk if it.req.seed is not None]
        seed = zlib.crc32(repr(seeds).encode()) if seeds else None
        gen = decode(model, prompts, max_new_tokens=[it.req.max_tokens for it in chunk],
                     temperature=chunk[0].req.temperature, n=chunk[0].n,
                     stop_ids=stop_ids, pad_id=tok.pad_token_id, stopped=stopped, seed=seed)
        results = []
        for b, (it, cands) in enumerate(zip(chunk, gen)):
            texts = [cut_at_stop(tok.decode([t for t in ids if t not in stop_ids], skip_special_tokens=True),
                                 stops[b]).strip() for ids in cands]
            results.append((pack_candidates(texts) if it.n > 1 else texts[0], len(prompts[b]),
                            sum(len(ids) for ids in cands)))
        return results
