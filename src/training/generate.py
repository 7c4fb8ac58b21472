"""Batched generation for evaluation: the base model (zero-shot and few-shot prompts), then the same
base with the adapter on top.

Prompts are rendered with the tokenizer and chat template that training used
(:func:`datagen.tokenizer.load_tokenizer`), from a row's ``messages`` minus the assistant turn, with
``add_generation_prompt=True``. A few-shot prompt (:func:`fewshot_messages`) puts each exemplar's own
user turn and answer before the item's user turn, as earlier turns of the same chat.

Models load with :func:`lm.causal_lm.load_causal_lm` and answers come from
:func:`lm.causal_lm.generate` (stops at EOS or ``<end_of_turn>``), in batches of ``batch_size``,
longest prompts first, one few-shot family (the same exemplar turns) after another: a family's common
head is prefilled once for all its batches, so a few-shot prompt costs about what its own turn does.
Greedy unless ``temperature > 0``; then sampled from the whole vocabulary (``top_k=None, top_p=1.0``,
what evaluation always did), not with the shared top-k 64 / top-p 0.95.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lm.causal_lm import (
    attach_adapter,
    continuation_logprobs,
    generate,
    load_causal_lm,
    render_prompt,
    shared_head_len,
)
from datagen.config import ModelConfig
from datagen.progress import Progress
from datagen.schema import render_context
from datagen.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

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


def plan_batches(enc: Sequence[Sequence[int]], batch_size: int,
                 groups: Sequence[str] | None = None) -> list[tuple[list[int], int]]:
    """``[(prompt indices, shared head length)]`` for :func:`answer_prompts`: longest prompts first; with
    ``groups``, one family's batches share its head, and families smaller than ``batch_size`` are pooled."""
    keys = list(groups) if groups is not None else [""] * len(enc)
    families: dict[str, list[int]] = {k: [] for k in keys}  # in order of first appearance
    for i in sorted(range(len(enc)), key=lambda i: (-len(enc[i]), i)):
        families[keys[i]].append(i)
    pooled = sorted((i for m in families.values() if len(m) < batch_size for i in m), key=lambda i: (-len(enc[i]), i))
    batches: list[tuple[list[int], int]] = []
    for members in [m for m in families.values() if len(m) >= batch_size] + ([pooled] if pooled else []):
        head = shared_head_len([enc[i] for i in members]) if groups is not None and members is not pooled else 0
        batches += [(members[i:i + batch_size], head) for i in range(0, len(members), batch_size)]
    return batches


def answer_prompts(model, tok, prompts: Sequence[str], *, max_new_tokens: int | Sequence[int],
                   temperature: float = 0.0, batch_size: int = 8, seed: int = 0, desc: str = "generate",
                   groups: Sequence[str] | None = None) -> list[str]:
    """One answer per rendered prompt, in order: batches of ``batch_size``, longest prompts first (less
    padding; an out-of-memory error comes early); batch ``k`` samples with seed ``seed + k``.
    ``max_new_tokens``: one limit for all, or one per prompt (a row that reaches its own leaves the batch).

    ``groups`` (one key per prompt, e.g. the few-shot turns before the item): batches are formed within a
    group, and a group's common token head (its exemplars) is prefilled once for all its batches
    (:func:`lm.causal_lm.decode`). A group too small to fill one batch is pooled with the other small
    ones, without a shared head: a batch of its own would cost a whole decode loop to save a prefill."""
    batches = plan_batches([tok(p, add_special_tokens=False)["input_ids"] for p in prompts], batch_size, groups)
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    out = [""] * len(prompts)
    heads: dict = {}
    progress = Progress(desc, len(batches), "batches", every_s=0)
    for k, (batch, head) in enumerate(tqdm(batches, desc=desc, unit="batch", leave=False)):
        gens = generate(model, tok, [prompts[i] for i in batch], max_new_tokens=[limits[i] for i in batch],
                        temperature=temperature, top_k=None, top_p=1.0, seed=seed + k,  # sampling: whole vocabulary
                        shared=head, heads=heads)
        for i, g in zip(batch, gens, strict=True):
            out[i] = g.texts[0]
        progress.update(1)
    return out


def label_budget(tok, labels: Sequence[str], cap: int, slack: int = 6) -> int:
    """New tokens enough for an answer that is one of ``labels`` (the longest, plus ``slack`` for a full stop or
    a short "Answer:" lead-in), at most ``cap``: an item scored by label log-likelihood needs no more text."""
    return min(cap, max(len(tok(str(x), add_special_tokens=False)["input_ids"]) for x in labels) + slack)


def _prefix_ambiguous(tok, choices: Sequence[str]) -> bool:
    """Whether one choice's tokens are a proper prefix of another's ("high" / "high risk"): only then does
    the end of the answer need scoring to tell them apart."""
    ids = [tuple(tok(str(c), add_special_tokens=False)["input_ids"]) for c in choices]
    return any(a != b and b[:len(a)] == a for a in ids for b in ids)


def score_choices(model, tok, prompts: Sequence[str], choices: Sequence[Sequence[str] | None], *,
                  batch_size: int = 8, desc: str = "loglik") -> list[list[tuple[float, int]] | None]:
    """Per rendered prompt, the ``(sum log-probability, token count)`` of each of its ``choices`` as the
    start of the assistant's answer (:func:`lm.causal_lm.continuation_logprobs`); None where a prompt
    has no choices. :func:`training.graders.pick_by_loglik` turns a row of scores into the chosen label.

    The end-of-turn token is scored too only for an item whose choices are token prefixes of one another
    (else the shorter one would win by being a prefix): a base model never learned ``<end_of_turn>`` after
    a label (measured on the packaged Gemma-3-270M: about -32 nats, varying by up to 2.3 between labels,
    more than the labels' own differences), so scoring it would rank the labels by noise. As in
    lm-evaluation-harness' multiple choice, the label's own tokens decide."""
    if len(prompts) != len(choices):
        raise ValueError("prompts and choices differ in length")
    flat = [(i, j, p, str(c)) for i, (p, cs) in enumerate(zip(prompts, choices, strict=True))
            for j, c in enumerate(cs or [])]
    eot = {i: _prefix_ambiguous(tok, cs) for i, cs in enumerate(choices) if cs}
    got: dict[tuple[int, int], tuple[float, int]] = {}
    for with_eot in (False, True):
        part = [x for x in flat if eot[x[0]] == with_eot]
        if part:
            res = continuation_logprobs(model, tok, [(p, c) for _, _, p, c in part], batch_size=batch_size,
                                        end_of_turn=with_eot)
            got.update({(i, j): (float(s), int(n)) for (i, j, _, _), (s, n) in zip(part, res, strict=True)})
    log.debug("%s: %d prompts, %d continuations scored", desc, len(prompts), len(flat))
    return [[got[i, j] for j in range(len(cs))] if cs else None for i, cs in enumerate(choices)]


LOGLIK = "loglik"  # generate_arms' extra key: {arm: [per item: [(sum logprob, n tokens) per choice] | None]}
ADAPTER_ARMS = ("tuned",)  # arms generated with the adapter on; every other arm is the base model


def generate_arms(model_cfg: ModelConfig, adapter_dir: str | Path,
                  conversations: dict[str, Sequence[list[dict[str, str]]]], *, max_new_tokens: int,
                  temperature: float = 0.0, batch_size: int = 8, seed: int = 0, cache=None,
                  choices: Sequence[Sequence[str] | None] | None = None, run_cfg: Any = None,
                  scratch: Path | None = None, key: str = "") -> dict[str, Any]:
    """``{arm: [answer, ...]}`` for ``{arm: conversations}``: the base model answers every base arm
    (``base``, ``fewshot``), the base with the adapter on top answers ``tuned``.

    ``choices`` (one entry per item, the same for every arm: a classification item's labels, else None):
    each arm also scores every choice as its answer (:func:`score_choices`, the same prompt the arm
    generates from), returned under :data:`LOGLIK` as ``{arm: [scores | None per item]}``. The score decides
    such an item, so its answer is generated only as far as a label needs (:func:`label_budget`), not to
    ``max_new_tokens``: the generated label is kept beside the scored one in the report.

    With ``cache`` (a :class:`datagen.llm.ResponseCache`), base-model answers and choice scores are looked
    up and stored by (model, rendered prompt, settings / choices): the base arms do not change between runs
    that train different adapters (a sweep), so only the first run pays for them. Tuned ones never are.

    The rest is cut into deterministic shards (:func:`datagen.executor.plan`, ``key`` names the adapter and
    the settings) that run in this process or on Ray actors (``run_cfg``, the config's ``run`` section);
    each worker loads the model and the adapter once (:func:`eval_worker`). Both executors answer the
    same shards in the same batches, so they write the same answers. With ``scratch``, finished shards
    are kept there and a rerun skips them."""
    from datagen import executor
    from datagen.config import RunConfig
    from datagen.llm.cache import cache_key

    run_cfg = run_cfg or RunConfig()
    kw = {"max_new_tokens": max_new_tokens, "temperature": temperature, "batch_size": batch_size, "seed": seed}
    tok = load_tokenizer(model_cfg)
    prompts = {arm: [render_prompt(tok, c) for c in convs] for arm, convs in conversations.items()}
    out: dict[str, list[str | None]] = {arm: [None] * len(p) for arm, p in prompts.items()}
    want = [bool(c) for c in choices] if choices is not None else []
    n_items = max((len(p) for p in prompts.values()), default=0)
    limits = [label_budget(tok, choices[i], max_new_tokens) if want and want[i] else max_new_tokens
              for i in range(n_items)]
    scored: dict[str, list[Any]] = {arm: [None] * len(p) for arm, p in prompts.items()}
    keys: dict[str, list[str]] = {}
    lkeys: dict[str, dict[int, str]] = {}
    if cache is not None and temperature == 0.0:
        params = {**kw, "dtype": model_cfg.dtype, "batch_size": None}
        for arm, ps in prompts.items():
            if arm in ADAPTER_ARMS:
                continue
            keys[arm] = [cache_key(kind="eval-generate", model=model_cfg.name_or_path, base_url=None,
                                   params={**params, "max_new_tokens": limits[i]},
                                   messages=[{"role": "prompt", "content": p}]) for i, p in enumerate(ps)]
            hits = cache.get_many(keys[arm])
            out[arm] = [hits[k]["text"] if k in hits else None for k in keys[arm]]
    if cache is not None and want:
        for arm, ps in prompts.items():
            if arm in ADAPTER_ARMS:
                continue
            lkeys[arm] = {i: cache_key(kind="eval-loglik", model=model_cfg.name_or_path, base_url=None,
                                       params={"dtype": model_cfg.dtype, "choices": list(choices[i]),
                                               "end_of_turn": "when-prefix"},
                                       messages=[{"role": "prompt", "content": ps[i]}])
                          for i in range(len(ps)) if want[i]}
            hits = cache.get_many(list(lkeys[arm].values()))
            for i, k in lkeys[arm].items():
                if k in hits:
                    scored[arm][i] = [tuple(x) for x in json.loads(hits[k]["text"])]

    # a prompt's family: the turns before the item (the few-shot arm's exemplars)
    items = []
    for arm, convs in conversations.items():
        for i, conv in enumerate(convs):
            gen, lik = out[arm][i] is None, bool(want and want[i] and scored[arm][i] is None)
            if gen or lik:
                items.append({"arm": arm, "i": i, "prompt": prompts[arm][i], "family": json.dumps(conv[:-1]),
                              "generate": gen, "choices": list(choices[i]) if lik else None,
                              "max_new_tokens": limits[i]})
    if items:
        # a shard holds one arm (one model, the few-shot families whole), so splitting work for Ray's
        # workers never costs the local executor extra batches or head prefills
        shards = executor.plan(f"evaluate|{model_cfg.name_or_path}|{key}|{json.dumps(kw)}", items,
                               run_cfg.shard_rows, run_cfg.ray_workers, group=lambda it: it["arm"])
        make = functools.partial(eval_worker, model_cfg, str(adapter_dir), kw)
        parts = executor.map_shards(run_cfg, make, shards, scratch, what="evaluate")
        for shard, part in zip(shards, parts, strict=True):  # in shard order
            for it, text, sc in zip(shard.items, part["texts"], part["scores"], strict=True):
                arm, i = it["arm"], it["i"]
                if text is not None:
                    out[arm][i] = text
                    if arm in keys:
                        cache.put(keys[arm][i], provider="eval-generate", model=model_cfg.name_or_path, text=text)
                if sc is not None:
                    scored[arm][i] = [tuple(x) for x in sc]
                    if arm in lkeys:
                        cache.put(lkeys[arm][i], provider="eval-loglik", model=model_cfg.name_or_path,
                                  text=json.dumps(scored[arm][i]))
    res: dict[str, Any] = {arm: list(out[arm]) for arm in conversations}
    if want:
        res[LOGLIK] = {arm: list(scored[arm]) for arm in conversations}
    return res


@contextlib.contextmanager
def merged(model: Any) -> Iterator[None]:
    """Inside, the adapter's weights are folded into the base layers (PEFT's ``merge_adapter``), so a forward
    pass costs what the base model's does (unmerged, every LoRA layer adds two small matmuls per token: the
    demo's tuned arm was about a quarter slower than its base arm on 2 cores). Only for full-precision fp32
    weights: merging into 4-bit or half-precision weights and back is lossy, and later base arms would run on
    the changed weights."""
    import torch

    quantized = getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False)
    if not hasattr(model, "merge_adapter") or quantized or next(model.parameters()).dtype != torch.float32:
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def eval_worker(model_cfg: ModelConfig, adapter_dir: str, kw: dict[str, Any]):
    """One evaluation worker: ``work(items)`` answers (and scores the choices of) a shard's items, arm
    by arm. The base model loads on the first item; the adapter is attached on the first tuned item,
    and base arms after it run with the adapter disabled (PEFT's ``disable_adapter``: the base layers'
    own outputs), so a worker holds one model; the tuned arm runs with the adapter merged (:func:`merged`)."""
    tok = load_tokenizer(model_cfg)
    held: dict[str, Any] = {}

    def model_for(arm: str):
        if "base" not in held:
            held["base"] = load_causal_lm(model_cfg)
        if arm in ADAPTER_ARMS:
            if "tuned" not in held:
                held["tuned"] = attach_adapter(held["base"], adapter_dir)
            return held["tuned"], merged(held["tuned"])
        if "tuned" in held:
            return held["tuned"], held["tuned"].disable_adapter()
        return held["base"], contextlib.nullcontext()

    def work(items: list[dict[str, Any]]) -> dict[str, Any]:
        texts: list[str | None] = [None] * len(items)
        scores: list[Any] = [None] * len(items)
        for arm in dict.fromkeys(it["arm"] for it in items):
            model, mode = model_for(arm)
            with mode:
                lik = [j for j, it in enumerate(items) if it["arm"] == arm and it["choices"]]
                if lik:
                    got = score_choices(model, tok, [items[j]["prompt"] for j in lik],
                                        [items[j]["choices"] for j in lik], batch_size=kw["batch_size"],
                                        desc=f"loglik {arm}")
                    for j, sc in zip(lik, got, strict=True):
                        scores[j] = sc
                gen = [j for j, it in enumerate(items) if it["arm"] == arm and it["generate"]]
                if gen:
                    got = answer_prompts(model, tok, [items[j]["prompt"] for j in gen], desc=f"generate {arm}",
                                         groups=[items[j]["family"] for j in gen],
                                         **{**kw, "max_new_tokens": [items[j]["max_new_tokens"] for j in gen]})
                    for j, text in zip(gen, got, strict=True):
                        texts[j] = text
        return {"texts": texts, "scores": scores}

    return work


def chat(model_cfg: ModelConfig, adapter_dir: str | Path | None, system_prompt: str | None, *,
         read=input, write=print, max_new_tokens: int = 160) -> int:
    """A terminal chat with the tuned model (the base with ``adapter_dir`` on top; the base alone when
    None): the same chat template and greedy decoding as evaluation. Ends on EOF, ``exit`` or ``quit``.
    Returns the number of answers given."""
    tok = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, adapter=adapter_dir)
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
        (answer,) = generate(model, tok, [render_prompt(tok, conv)], max_new_tokens=max_new_tokens)[0].texts
        conv.append({"role": "assistant", "content": answer})
        write(f"model> {answer}")
        answers += 1
    return answers
