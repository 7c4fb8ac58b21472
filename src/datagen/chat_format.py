"""Chat formatting: split rows -> ``messages`` conversations, rendered with the target model's chat
template, filtered by token length, saved as a Parquet ``DatasetDict`` with its dataset card.

A conversation is ``[system, user, assistant]``: the system prompt is ``prompts/<format.system_prompt>``,
the user turn is ``prompts/sft_user.jinja`` (rendered context, question and, for classification, the
allowed labels), the assistant turn is the answer. :func:`render_conversation` returns token ids and
the assistant mask (1 where loss falls) from the tokenizer's chat template; the packaged Gemma uses
``prompts/gemma_chat.jinja`` whose ``{% generation %}`` markers put the mask on the answer and its
``<end_of_turn>`` only.

Rows longer than ``format.max_tokens`` (reason ``too_long``) or without assistant tokens (reason
``no_assistant_tokens``, e.g. a template without generation markers) are dropped and listed in
``drops.jsonl``. Output (``stage_dir("dataset")``): ``train|validation|test.parquet`` with the
canonical fields (``context`` and ``metadata`` as JSON strings, so Arrow schemas stay stable),
``cluster``, ``messages`` and ``n_tokens`` (an empty split gets no file); ``README.md`` (the card),
``token_lengths.png``.
Load with ``datasets.load_dataset("parquet", data_dir=...)``; TRL's SFTTrainer takes it as is.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from datagen.config import Config
from datagen.io import atomic_path, manifest_hash, read_jsonl, require_stage, write_jsonl, write_manifest
from datagen.prompts import Prompt, load_prompt
from datagen.schema import render_context

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
USER_PROMPT = "sft_user"


def build_messages(row: dict[str, Any], system: Prompt, user: Prompt) -> list[dict[str, str]]:
    labels = row.get("labels") if row.get("task_type") == "classification" else None
    return [
        {"role": "system", "content": system.render()},
        {"role": "user", "content": user.render(context=render_context(row.get("context")),
                                                 question=row["question"].strip(), labels=labels or None)},
        {"role": "assistant", "content": row["answer"].strip()},
    ]


def render_conversation(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and the assistant (loss) mask of a conversation, from the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    mask = list(out.get("assistant_masks") or [0] * len(ids))
    if ids and isinstance(ids[0], list):  # a batch of one
        ids, mask = ids[0], mask[0]
    return [int(i) for i in ids], [int(m) for m in mask]


def features():
    from datasets import Features, List, Value

    return Features({
        "id": Value("string"), "group_id": Value("string"), "source": Value("string"),
        "task_type": Value("string"), "category": Value("string"), "scenario": Value("string"),
        "cluster": Value("string"), "question": Value("string"), "context": Value("string"),
        "answer": Value("string"), "labels": List(Value("string")), "metadata": Value("string"),
        "is_rephrase": Value("bool"), "rephrase_index": Value("int32"),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "n_tokens": Value("int32"), "n_assistant_tokens": Value("int32"),
    })


def to_record(row: dict[str, Any], messages: list[dict[str, str]], n_tokens: int, n_assistant: int) -> dict:
    meta = row.get("metadata") or {}
    return {
        "id": row["id"], "group_id": row["group_id"], "source": row["source"], "task_type": row["task_type"],
        "category": row["category"], "scenario": row.get("scenario"), "cluster": meta.get("cluster"),
        "question": row["question"], "context": json.dumps(row.get("context") or {}, sort_keys=True,
                                                           ensure_ascii=False),
        "answer": row["answer"], "labels": row.get("labels"),
        "metadata": json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str),
        "is_rephrase": bool(row.get("is_rephrase")), "rephrase_index": row.get("rephrase_index"),
        "messages": messages, "n_tokens": n_tokens, "n_assistant_tokens": n_assistant,
    }


def format_rows(rows: list[dict[str, Any]], tokenizer, system: Prompt, user: Prompt,
                max_tokens: int) -> tuple[list[dict], list[dict]]:
    """Records that fit, and drops with reasons."""
    from tqdm.auto import tqdm

    kept, drops = [], []
    for row in tqdm(rows, desc="format", unit="row", disable=len(rows) < 500):
        msgs = build_messages(row, system, user)
        ids, mask = render_conversation(tokenizer, msgs)
        n_asst = sum(mask)
        if len(ids) > max_tokens:
            drops.append({"id": row["id"], "reason": "too_long", "n_tokens": len(ids), "max_tokens": max_tokens})
        elif n_asst == 0:
            drops.append({"id": row["id"], "reason": "no_assistant_tokens", "n_tokens": len(ids)})
        else:
            kept.append(to_record(row, msgs, len(ids), n_asst))
    return kept, drops


def length_stats(lengths: list[int]) -> dict[str, float]:
    import numpy as np

    if not lengths:
        return {"n": 0}
    a = np.asarray(lengths)
    return {"n": int(len(a)), "min": int(a.min()), "mean": round(float(a.mean()), 1),
            "p50": int(np.percentile(a, 50)), "p95": int(np.percentile(a, 95)), "max": int(a.max())}


def plot_lengths(by_split: dict[str, list[int]], max_tokens: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    allv = [v for vs in by_split.values() for v in vs]
    bins = 30 if allv else 1
    for s, vs in by_split.items():
        if vs:
            ax.hist(vs, bins=bins, range=(0, max(allv + [max_tokens // 4])), alpha=0.6, label=f"{s} ({len(vs)})")
    ax.axvline(max_tokens, color="k", linestyle="--", linewidth=1, label=f"max_tokens={max_tokens}")
    ax.set_xlabel("tokens per conversation")
    ax.set_ylabel("rows")
    ax.set_title("Token lengths by split")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def save_dataset(records: dict[str, list[dict]], out: Path) -> list[str]:
    """One Parquet file per non-empty split, all with the same explicit schema. An empty split gets no
    file (``load_dataset`` rejects a split without rows); returns the splits written."""
    from datasets import Dataset

    feats = features()
    written = []
    for s in SPLITS:
        path = out / f"{s}.parquet"
        if not records[s]:
            path.unlink(missing_ok=True)
            continue
        ds = Dataset.from_list(records[s], features=feats)
        with atomic_path(path) as tmp:
            ds.to_parquet(str(tmp))
        written.append(s)
    return written


def run_format(cfg: Config, tokenizer=None) -> dict[str, Any]:
    from datagen.card import write_card
    from datagen.tokenizer import load_tokenizer

    src = cfg.paths.stage_dir("split")
    require_stage(src, "split")
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    system, user = load_prompt(cfg.format.system_prompt), load_prompt(USER_PROMPT)
    out = cfg.paths.stage_dir("dataset")
    records, drops = {}, []
    for s in SPLITS:
        rows = sorted(read_jsonl(src / f"{s}.jsonl"), key=lambda r: r["id"])
        records[s], d = format_rows(rows, tokenizer, system, user, cfg.format.max_tokens)
        drops += [{**x, "split": s} for x in d]
    written = save_dataset(records, out)
    write_jsonl(out / "drops.jsonl", sorted(drops, key=lambda d: (d["split"], d["id"])))
    lengths = {s: [r["n_tokens"] for r in records[s]] for s in SPLITS}
    plot_lengths(lengths, cfg.format.max_tokens, out / "token_lengths.png")
    prompts = [system.ref, user.ref]
    if cfg.model.chat_template:
        prompts.append(load_prompt(cfg.model.chat_template).ref)
    summary = {
        "stage": "format",
        "config_hash": cfg.section_hash("format", "model", "card"),
        "upstream": {"split": manifest_hash(src)},
        "prompts": prompts,
        "model": cfg.model.name_or_path,
        "max_tokens": cfg.format.max_tokens,
        "splits": written,
        "counts": {**{s: len(records[s]) for s in SPLITS},
                   "dropped_by_reason": dict(sorted(Counter(d["reason"] for d in drops).items())),
                   "by_task_type": {s: dict(sorted(Counter(r["task_type"] for r in records[s]).items()))
                                    for s in SPLITS}},
        "token_lengths": {s: length_stats(v) for s, v in lengths.items()},
    }
    write_card(cfg, summary)
    log.info("format: %s rows; dropped %s", {s: len(records[s]) for s in SPLITS},
             summary["counts"]["dropped_by_reason"])
    return write_manifest(out, summary)
