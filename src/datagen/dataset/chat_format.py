"""Chat formatting: split rows -> ``messages`` conversations, rendered with the target model's chat
template, filtered by token length, saved as a Parquet ``DatasetDict`` with its dataset card.

A conversation is ``[system, user, assistant]``: the system prompt is ``prompts/<format.system_prompt>``,
the user turn is ``prompts/sft_user.jinja`` (rendered context, question and, for classification, the
allowed labels), the assistant turn is the answer. :func:`render_conversation` returns token ids and
the assistant mask (1 where loss falls) from the tokenizer's chat template; the packaged Gemma uses
``prompts/gemma_chat.jinja`` whose ``{% generation %}`` markers put the mask on the answer and its
``<end_of_turn>`` only.

Rows longer than ``format.max_tokens`` are handled by ``format.long_context``: ``drop`` (reason
``too_long``), or ``truncate`` (:func:`truncate_context`: drop the table rows and paragraphs farthest
from those holding the answer's and the question's figures until it fits; a row whose answer's
figures are not all in its context, e.g. a volatility computed from every close, is dropped as
``too_long``). Rows without assistant tokens are dropped as ``no_assistant_tokens``. A split that had
rows and lost all of them fails the stage with a one-line reason (:class:`EmptySplitError`).

Output (its folder, ``data/processed/format``), laid out so that ``datasets`` reads only the data:

- ``train|validation|test.parquet``: canonical fields (``context`` and ``metadata`` as JSON strings, so
  Arrow schemas stay stable), ``cluster``, ``messages``, ``n_tokens``, ``n_assistant_tokens`` (a split
  that the split stage left empty gets no file);
- ``README.md``: the card, whose ``configs`` name the Parquet files under a config named after this
  run's content (``<card.dataset_name>-<fingerprint>``), so ``load_dataset(<dir>)`` never serves another
  run's rows from the ``datasets`` cache;
- ``__arrow__/``: the same ``DatasetDict`` saved with ``save_to_disk``, for ``load_from_disk``;
- ``__meta__/``: ``drops.jsonl`` (one :func:`~datagen.io.drop_record` per dropped row) and
  ``token_lengths.png``. ``datasets`` ignores folders whose names start with ``__``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datagen import executor
from datagen.config import Config
from datagen.dataset.card import DISK_DIR, META_DIR, build_card, write_card
from datagen.io import (
    atomic_path,
    drop_counts,
    drop_record,
    manifest_hash,
    read_jsonl,
    sha256_file,
    sha256_text,
    write_jsonl,
    write_manifest,
)
from datagen.manifest import FormatManifest
from datagen.prompts import Prompt, load_prompt
from datagen.schema import SPLITS, render_context
from datagen.stage import Inputs, StageSpec

log = logging.getLogger(__name__)

USER_PROMPT = "sft_user"


class EmptySplitError(ValueError):
    """A split that had rows lost all of them at format (the message is the one-line reason)."""


def build_messages(row: dict[str, Any], system: Prompt, user: Prompt) -> list[dict[str, str]]:
    labels = row.get("labels") if row.get("task_type") == "classification" else None
    return [
        {"role": "system", "content": system.render()},
        {"role": "user", "content": user.render(context=render_context(row.get("context")),
                                                 question=row["question"].strip(), labels=labels or None)},
        {"role": "assistant", "content": row["answer"].strip()},
    ]


def training_template(tokenizer) -> str | None:
    """The chat template that marks the assistant turns: None when the tokenizer's own has ``{% generation %}``
    markers, else TRL's training variant of it (what ``assistant_only_loss=True`` would use)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return None
    try:
        template = get_training_chat_template(tokenizer)
    except ValueError:  # TRL refuses a template it cannot patch
        template = None
    if template is None:
        raise ValueError("the chat template has no {% generation %} markers and TRL has no training variant "
                         "for it: set model.chat_template to a template with markers")
    return template


def render_conversation(tokenizer, messages: list[dict[str, str]], template: str | None = None
                        ) -> tuple[list[int], list[int]]:
    """Token ids and the assistant (loss) mask of a conversation: the one path from messages to training
    tokens, used by the format stage and by training. ``template``: :func:`training_template` (pass it
    when rendering many rows; computed here when omitted)."""
    template = template if template is not None else training_template(tokenizer)
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
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


# ----------------------------------------------------------------------------- long contexts
def figures(text: str) -> set[str]:
    """The figures of a text, normalised and unsigned: numbers, percentages and amounts by value
    (``5,829`` = ``5829``, ``12.50%`` -> ``12.5``), dates as ISO strings."""
    from datagen.augmentation.validators import extract_facts

    f = extract_facts(text)
    out = set(f.dates) | set(f.numbers)
    out |= {p[:-1] for p in f.percents} | {a.rsplit(" ", 1)[-1] for a in f.amounts}
    return {x.lstrip("-") for x in out}


def answer_figures(row: dict[str, Any]) -> set[str]:
    """The answer's figures: those in its text and its graded ``answer_values``."""
    out = figures(row.get("answer") or "")
    for v in (row.get("metadata") or {}).get("answer_values") or []:
        x = v.get("value") if isinstance(v, dict) else None
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            out.add(format(abs(round(float(x), 6)), ".10g"))
    return out


def _paragraphs(text: str) -> tuple[list[str], str]:
    """Paragraphs (else lines, else sentences) of a text, and the separator that joins them back."""
    text = text.strip()
    for sep, pat in (("\n\n", r"\n\s*\n"), ("\n", r"\n"), (" ", r"(?<=[.!?])\s+")):
        parts = [p.strip() for p in re.split(pat, text) if p.strip()]
        if len(parts) > 1:
            return parts, sep
    return ([text] if text else []), "\n\n"


def truncate_context(row: dict[str, Any], fits: Callable[[dict[str, Any]], bool]) -> tuple[dict | None, str]:
    """A shorter context for which ``fits(context)`` holds, or ``(None, why)``.

    The table rows and paragraphs that hold the answer's figures (:func:`answer_figures`) or the
    question's are always kept; the others are dropped farthest first (by distance to the nearest such
    row, or paragraph), the table header is kept and kept parts stay in order. A row is not truncatable
    when its answer has no figures (a label) or some are not in the context (computed from cells that
    cannot be told apart, e.g. a volatility over every close): which cells it used is unknown.
    """
    ctx = row.get("context") or {}
    table = ctx.get("table")
    rows = list(table["rows"]) if table else []
    paras, sep = _paragraphs(ctx.get("text") or "")
    units = [("row", i, figures(" | ".join(r))) for i, r in enumerate(rows)]
    units += [("para", j, figures(p)) for j, p in enumerate(paras)]
    need = answer_figures(row)
    if not need:
        return None, "the answer has no figures to anchor on"
    have = set().union(*(u[2] for u in units))
    missing = sorted(need - have)
    if missing:
        return None, f"the answer's figures are not all in the context ({', '.join(missing)})"
    anchor_figs = need | (figures(row.get("question") or "") & have)
    anchors = [u for u in units if u[2] & anchor_figs]
    at = {kind: [u[1] for u in anchors if u[0] == kind] for kind in ("row", "para")}

    def dist(u: tuple) -> int:
        idx = at[u[0]]
        return min(abs(u[1] - a) for a in idx) if idx else u[1]

    others = sorted((u for u in units if not (u[2] & anchor_figs)), key=lambda u: (dist(u), u[0] != "row", u[1]))

    def build(m: int) -> dict[str, Any]:
        keep = {(u[0], u[1]) for u in anchors + others[:m]}
        out_rows = [r for i, r in enumerate(rows) if ("row", i) in keep]
        text = sep.join(p for j, p in enumerate(paras) if ("para", j) in keep)
        return {"text": text, "table": {"columns": list(table["columns"]), "rows": out_rows} if table else None}

    if not fits(build(0)):
        return None, "the context holding the question's and answer's figures alone exceeds max_tokens"
    lo, hi = 0, len(others)  # the most parts that fit (adding parts only adds tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(build(mid)) else (lo, mid - 1)
    return build(lo), ""


def format_rows(rows: list[dict[str, Any]], tokenizer, system: Prompt, user: Prompt, max_tokens: int,
                long_context: str = "drop", split: str | None = None) -> tuple[list[dict], list[dict]]:
    """Records that fit (truncated where ``long_context == "truncate"`` allows), and drop records."""
    from tqdm.auto import tqdm

    where = {"split": split} if split else {}
    template = training_template(tokenizer)
    kept, drops = [], []
    for row in tqdm(rows, desc="format", unit="row", disable=len(rows) < 500):
        msgs = build_messages(row, system, user)
        ids, mask = render_conversation(tokenizer, msgs, template)
        why = None
        if len(ids) > max_tokens and long_context == "truncate":
            def fits(ctx: dict[str, Any], row=row) -> bool:
                msgs = build_messages({**row, "context": ctx}, system, user)
                return len(render_conversation(tokenizer, msgs, template)[0]) <= max_tokens

            ctx, why = truncate_context(row, fits)
            if ctx is not None:
                old = row.get("context") or {}
                n_rows = len((old.get("table") or {}).get("rows") or [])
                n_paras = len(_paragraphs(old.get("text") or "")[0])
                cut = {"table_rows": [len((ctx["table"] or {}).get("rows") or []), n_rows],
                       "paragraphs": [len(_paragraphs(ctx["text"])[0]), n_paras]}
                row = {**row, "context": ctx, "metadata": {**(row.get("metadata") or {}), "truncated": cut}}
                msgs = build_messages(row, system, user)
                ids, mask = render_conversation(tokenizer, msgs, template)
        n_asst = sum(mask)
        if len(ids) > max_tokens:
            detail = f"{len(ids)} tokens > {max_tokens}" + (f"; not truncatable: {why}" if why else "")
            drops.append(drop_record(STAGE.name, row["id"], "too_long", detail, source=row["source"],
                                     n_tokens=len(ids), max_tokens=max_tokens, **where))
        elif n_asst == 0:
            drops.append(drop_record(STAGE.name, row["id"], "no_assistant_tokens",
                                     "the chat template marks no assistant tokens", source=row["source"],
                                     n_tokens=len(ids), **where))
        else:
            kept.append(to_record(row, msgs, len(ids), n_asst))
    return kept, drops


def empty_split_message(split: str, n_in: int, drops: list[dict], max_tokens: int, long_context: str) -> str:
    """``format: test has 0 rows: 99 of 99 dropped as too_long (max_tokens 768); raise ...``."""
    by = Counter(d["reason"] for d in drops)
    limit = f"max_tokens {max_tokens}" if "too_long" in by else ""
    if len(by) == 1:
        how = f"dropped as {next(iter(by))}" + (f" ({limit})" if limit else "")
    else:
        how = "dropped (" + ", ".join(f"{r} {n}" for r, n in sorted(by.items())) + (f"; {limit}" if limit else "") + ")"
    hints = []
    if "too_long" in by:
        hints.append("raise format.max_tokens, set format.long_context: truncate, or shorten the context"
                     if long_context == "drop" else "raise format.max_tokens or shorten the context")
    if "no_assistant_tokens" in by:
        hints.append("use a chat template with {% generation %} markers (model.chat_template)")
    return f"format: {split} has 0 rows: {n_in} of {n_in} {how}; " + "; ".join(hints)


def dataset_stats(records: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Counts of the final data, per split: what the card states (nothing from before the length filter)."""
    def count(key: str) -> dict[str, dict[str, int]]:
        return {s: dict(sorted(Counter(str(r[key]) for r in records[s]).items())) for s in SPLITS}

    reph = {s: [r for r in records[s] if r["is_rephrase"]] for s in SPLITS}
    return {"by_task_type": count("task_type"), "by_source": count("source"), "by_cluster": count("cluster"),
            "by_category": count("category"),
            "labels_by_category": {s: {c: dict(sorted(Counter(str(r["answer"]).strip() for r in records[s]
                                                              if r["category"] == c).items()))
                                       for c in sorted({r["category"] for r in records[s]
                                                        if r["task_type"] == "classification"})} for s in SPLITS},
            "groups": {s: len({r["group_id"] for r in records[s]}) for s in SPLITS},
            "rephrasings": {s: len(reph[s]) for s in SPLITS},
            "rephrased_groups": {s: len({r["group_id"] for r in reph[s]}) for s in SPLITS},
            "truncated": {s: sum("truncated" in json.loads(r["metadata"]) for r in records[s]) for s in SPLITS}}


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


def save_dataset(records: dict[str, list[dict]], out: Path) -> tuple[list[str], str]:
    """One Parquet file per non-empty split, all with the same explicit schema, and the same
    ``DatasetDict`` under ``__arrow__/`` (``save_to_disk``). A split without rows gets no file
    (``load_dataset`` rejects an empty split). Returns the splits written and the content fingerprint."""
    from datasets import Dataset, DatasetDict

    feats = features()
    dsets = {}
    for s in SPLITS:
        path = out / f"{s}.parquet"
        if not records[s]:
            path.unlink(missing_ok=True)
            continue
        dsets[s] = Dataset.from_list(records[s], features=feats)
        with atomic_path(path) as tmp:
            dsets[s].to_parquet(str(tmp))
    tmp = out / f".{DISK_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    DatasetDict(dsets).save_to_disk(str(tmp))
    shutil.rmtree(out / DISK_DIR, ignore_errors=True)
    os.replace(tmp, out / DISK_DIR)
    fingerprint = sha256_text("\n".join(f"{s}:{sha256_file(out / f'{s}.parquet')}" for s in dsets))[:12]
    return list(dsets), fingerprint


def format_shard(cfg: Config, tokenizer, items: list[list[Any]]) -> dict[str, Any]:
    """``format_rows`` over ``[split, row]`` items: ``{"kept": [[split, record]], "drops": [...]}``."""
    system, user = load_prompt(cfg.format.system_prompt), load_prompt(USER_PROMPT)
    kept, drops = [], []
    for s in SPLITS:
        rows = [r for split, r in items if split == s]
        k, d = format_rows(rows, tokenizer, system, user, cfg.format.max_tokens, cfg.format.long_context, split=s)
        kept += [[s, rec] for rec in k]
        drops += d
    return {"kept": kept, "drops": drops}


def format_worker(cfg: Config) -> Callable[[list[list[Any]]], dict[str, Any]]:
    """What a Ray actor holds for formatting: the tokenizer, loaded once."""
    from datagen.tokenizer import load_tokenizer

    return functools.partial(format_shard, cfg, load_tokenizer(cfg.model))


def run_format(cfg: Config, inputs: Inputs, out: Path, tokenizer=None) -> FormatManifest:
    """The format stage: ``inputs["split"]``'s rows into ``out``, with the dataset card (which also reads
    the fetch, augment and dedup manifests). ``tokenizer`` (else the configured one) is used with
    ``run.executor: local``, and Ray workers load the configured one."""
    from datagen.tokenizer import load_tokenizer

    fc = cfg.format
    system, user = load_prompt(fc.system_prompt), load_prompt(USER_PROMPT)
    src = inputs["split"]
    rows_in = {s: sorted(read_jsonl(src / f"{s}.jsonl"), key=lambda r: r["id"]) for s in SPLITS}
    items = [[s, r] for s in SPLITS for r in rows_in[s]]
    if cfg.run.executor == "ray":  # shards of rows on Ray workers, each with its own tokenizer
        key = f"format|{STAGE.config_hash(cfg)}|{manifest_hash(src)}"
        shards = executor.plan(key, items, cfg.run.shard_rows, cfg.run.ray_workers)
        parts = executor.map_shards(cfg.run, functools.partial(format_worker, cfg), shards, out / ".shards",
                                    what="format: tokenise shards")
    else:
        parts = [format_shard(cfg, tokenizer or load_tokenizer(cfg.model), items)]
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    drops: list[dict] = []
    for p in parts:  # in shard order: the rows' order does not depend on the executor
        for s, rec in p["kept"]:
            records[s].append(rec)
        drops += p["drops"]
    for s in SPLITS:
        if rows_in[s] and not records[s]:
            d = [x for x in drops if x["split"] == s]
            raise EmptySplitError(empty_split_message(s, len(rows_in[s]), d, fc.max_tokens, fc.long_context))
    if not any(rows_in.values()):
        raise EmptySplitError(f"format: the split stage wrote 0 rows in {src}; nothing to format")
    empty = [s for s in SPLITS if not rows_in[s]]
    if empty:
        log.warning("format: the split stage left %s empty; no file for %s", ", ".join(empty), "/".join(empty))
    if fc.max_tokens > cfg.train.max_length:
        log.warning("format: max_tokens %d > train.max_length %d: training truncates longer conversations, "
                    "and with them their answers", fc.max_tokens, cfg.train.max_length)

    # sources that lost every row (not an empty split, but never silent either)
    n_in = Counter(r["source"] for s in SPLITS for r in rows_in[s])
    n_out = Counter(r["source"] for s in SPLITS for r in records[s])
    by_source: dict[str, list[dict]] = defaultdict(list)
    for d in drops:
        by_source[d["source"]].append(d)
    dropped_by_source = {k: drop_counts(v) for k, v in sorted(by_source.items())}
    lost = sorted(k for k in n_in if not n_out[k])
    for k in lost:
        log.warning("format: every row of source %s was dropped (%d: %s)", k, n_in[k], dropped_by_source[k])

    for stray in ("drops.jsonl", "token_lengths.png"):  # these belong in __meta__, not beside the data files
        (out / stray).unlink(missing_ok=True)
    written, fingerprint = save_dataset(records, out)
    drops.sort(key=lambda d: (d["split"], d["row_id"]))
    write_jsonl(out / META_DIR / "drops.jsonl", drops)
    lengths = {s: [r["n_tokens"] for r in records[s]] for s in SPLITS}
    plot_lengths(lengths, fc.max_tokens, out / META_DIR / "token_lengths.png")
    prompts = [system.ref, user.ref]
    if cfg.model.chat_template:
        prompts.append(load_prompt(cfg.model.chat_template).ref)
    data = dataset_stats(records)
    summary = FormatManifest(
        stage=STAGE.name,
        config_hash=STAGE.config_hash(cfg),
        upstream={"split": manifest_hash(src)},
        prompts=prompts,
        model=cfg.model.name_or_path,
        max_tokens=fc.max_tokens,
        long_context=fc.long_context,
        fingerprint=fingerprint,
        splits=written,
        empty_splits=empty,
        counts={**{s: len(records[s]) for s in SPLITS}, "in": {s: len(rows_in[s]) for s in SPLITS},
                **drop_counts(drops), "truncated": sum(data["truncated"].values())},
        dropped_by_source=dropped_by_source,
        sources_emptied=lost,
        data=data,
        token_lengths={s: length_stats(v) for s, v in lengths.items()},
    )
    write_card(out / "README.md", build_card(cfg, summary, inputs))
    executor.clear(out / ".shards")
    log.info("format: %s rows; %s", {s: len(records[s]) for s in SPLITS}, drop_counts(drops) or "none dropped")
    return write_manifest(out, summary)


STAGE = StageSpec("format", run_format, __name__,
                  ("format", "model", "card", "split", "sources"), upstream=("fetch", "augment", "dedup", "split"),
                  prompts=lambda c: (c.format.system_prompt, c.model.chat_template, "sft_user"),
                  manifest=FormatManifest)
