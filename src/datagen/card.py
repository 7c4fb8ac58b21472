"""The dataset card: ``README.md`` in the dataset folder, a Hugging Face card built from the manifests.

The YAML header is valid Hub metadata (``configs`` with ``data_files`` per split, ``size_categories``,
``task_categories``, ``license``, ``source_datasets``, machine-generated ``annotations_creators``,
``language``, ``pretty_name``). The body states where the rows came from and what every stage did
to them, read from the upstream manifests (fetch, augment, dedup, split) and the format stage's
summary. Each upstream fact is optional: a missing manifest or key is reported as "not recorded",
never an error, so the card can be built while other stages evolve.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from datagen.config import Config
from datagen.io import atomic_write_text, read_json, read_manifest

SPLITS = ("train", "validation", "test")
NA = "not recorded"


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d or d[k] is None:
            return default
        d = d[k]
    return d


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return f"_{NA}_"
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else NA


def metadata(cfg: Config, summary: dict[str, Any], fetch: dict | None) -> dict[str, Any]:
    total = sum(_get(summary, "counts", s, default=0) for s in SPLITS)
    sources = sorted(_get(fetch, "counts", "per_source", default={}) or {})
    task_types = set()
    for s in SPLITS:
        task_types |= set(_get(summary, "counts", "by_task_type", s, default={}) or {})
    cats = ["question-answering", "text-generation"]
    if "classification" in task_types:
        cats.append("text-classification")
    return {
        "pretty_name": cfg.card.pretty_name,
        "license": cfg.card.license,
        "language": ["en"],
        "language_creators": ["machine-generated"],
        "annotations_creators": ["machine-generated"],
        "multilinguality": ["monolingual"],
        "size_categories": [size_category(total)],
        "source_datasets": ["original"] + [f"extended|{re.sub(r'[^A-Za-z0-9_.-]+', '-', s)}" for s in sources if s],
        "task_categories": cats,
        "tags": ["finance", "synthetic", "sft", "chat"],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": s, "path": f"{s}.parquet"}
                                    for s in summary.get("splits", SPLITS)]}],
    }


def build_card(cfg: Config, summary: dict[str, Any]) -> str:
    """The card's Markdown text (YAML header + body) from the manifests and the format summary."""
    fetch = read_manifest(cfg.paths.stage_dir("fetch"))
    aug = read_manifest(cfg.paths.stage_dir("augment"))
    dedup = read_manifest(cfg.paths.stage_dir("dedup"))
    split = read_manifest(cfg.paths.stage_dir("split"))
    clusters_path = cfg.paths.stage_dir("split") / "clusters.json"
    clusters = read_json(clusters_path) if clusters_path.exists() else None
    meta = metadata(cfg, summary, fetch)
    counts = {s: _get(summary, "counts", s, default=0) for s in SPLITS}
    lines: list[str] = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
                        f"# {cfg.card.pretty_name}", ""]
    lines += [f"Synthetic finance question answering for supervised fine-tuning (`{cfg.card.dataset_name}`), "
              f"built by the finsynth pipeline (profile `{cfg.profile}`): grounded QA from market data and "
              "source QA files, validated LLM rephrasings, embedding dedup, a group-aware split stratified by "
              "scenario cluster, and chat formatting with loss on the assistant turn only.", "",
              _table(["split", "rows"], [[s, counts[s]] for s in SPLITS] + [["total", sum(counts.values())]]), ""]

    # sources
    lines += ["## Sources", ""]
    per_source = _get(fetch, "counts", "per_source", default={}) or {}
    lines += [_table(["source", "rows fetched"], [[k, v] for k, v in sorted(per_source.items())]), ""]
    per_cat = _get(fetch, "counts", "per_category", default={}) or {}
    if per_cat:
        lines += ["Categories fetched: " + ", ".join(f"{k} ({v})" for k, v in sorted(per_cat.items())) + ".", ""]
    q = _get(fetch, "quarantine", "total")
    lines += [f"Rows quarantined at fetch (invalid): {q if q is not None else NA}"
              + (f", by reason: {_get(fetch, 'quarantine', 'by_reason')}" if q else "") + ".", ""]

    # rephrasing
    lines += ["## Rephrasing", ""]
    reph = _get(aug, "rephrase", default={}) or {}
    if reph:
        lines += [f"- Rephrasings requested per item (k): {reph.get('k', NA)}; items rephrased: "
                  f"{_get(aug, 'counts', 'rephrased_items', default=NA)}; slots {reph.get('slots', NA)}, "
                  f"kept {reph.get('kept', NA)}, missing {reph.get('missing', NA)}.",
                  f"- Acceptance: {_pct(reph.get('acceptance'))} of slots filled "
                  f"(first attempt {_pct(reph.get('first_attempt_acceptance'))}; "
                  f"{_pct(reph.get('candidate_acceptance'))} of candidates accepted).",
                  f"- Rejected candidates by reason: {reph.get('rejected_by_reason') or NA}."]
    else:
        lines.append(f"- Rephrase acceptance: {NA} (no `rephrase` section in the augment manifest).")
    scen = _get(aug, "scenarios")
    if scen:
        lines.append(f"- Scenario tasks synthesized: {scen.get('kept', NA)} of {scen.get('planned', NA)} planned "
                     f"(acceptance {_pct(scen.get('acceptance'))}).")
    lines.append("")

    # dedup
    lines += ["## Deduplication", ""]
    lines += [f"Embeddings: `{_get(dedup, 'embedder', 'name', default=NA)}`; near duplicates across groups at "
              f"cosine >= {_get(dedup, 'threshold', default=NA)}, near-copies within a group at >= "
              f"{_get(dedup, 'within_group_threshold', default=NA)}, exact duplicates on normalised text; "
              f"pair search: {_get(dedup, 'method', default=NA)}. Clusters merged by union-find; keeper policy: "
              "originals over rephrasings, then richer context, then lowest id.", ""]
    by_reason = _get(dedup, "counts", "dropped_by_reason", default={}) or {}
    lines += [f"Rows in: {_get(dedup, 'counts', 'in', default=NA)}, kept: "
              f"{_get(dedup, 'counts', 'kept', default=NA)}.", "",
              _table(["reason", "rows removed"], [[k, v] for k, v in sorted(by_reason.items())]), ""]

    # split
    lines += ["## Splits, clusters and leakage", ""]
    cb = _get(clusters, "cluster_by", default=cfg.split.cluster_by)
    lines += [f"Split by group (a source item with all its rephrasings goes to one split), stratified by "
              f"scenario cluster (`cluster_by: {cb}`), ratios {list(cfg.split.ratios)}."
              + (" The test split holds originals only." if cfg.split.test_originals_only else "")
              + (" Training rows are balanced per cluster." if cfg.split.balance_train else ""), ""]
    sd = _get(split, "counts", "dropped_by_reason", default={}) or {}
    if sd:
        lines += [f"Removed at split: {', '.join(f'{k} {v}' for k, v in sorted(sd.items()))}.", ""]
    groups = _get(split, "counts", "groups", default={}) or {}
    if groups:
        lines += [f"Groups per split: {', '.join(f'{s} {groups.get(s, 0)}' for s in SPLITS)}.", ""]
    crow = []
    for c in _get(clusters, "clusters", default=[]) or []:
        crow.append([c.get("name"), c.get("source", "")] + [
            f"{_get(c, 'rows', s, default=0)} ({_pct(_get(c, 'proportion', s))})" for s in SPLITS])
    lines += [_table(["cluster", "from", *[f"{s} rows (share)" for s in SPLITS]], crow), ""]
    km = _get(clusters, "kmeans", default={}) or {}
    if km.get("silhouette"):
        lines += [f"k-means: k = {km.get('k')} chosen by silhouette {km.get('silhouette')}.", ""]
    leak = _get(split, "leakage", default={}) or {}
    lines += [f"Leakage check: largest cross-split cosine {leak.get('max_cross_split_cosine', NA)}; "
              f"cross-split pairs with cosine >= {leak.get('threshold', NA)}: "
              f"{leak.get('cross_split_pairs_above_threshold', NA)}, of which duplicates (same figures, "
              f"overlap >= {leak.get('min_number_overlap', NA)}): {leak.get('cross_split_duplicates', NA)}; "
              f"groups in two splits: {leak.get('groups_in_two_splits', NA)}.", ""]

    # tokens
    lines += ["## Token lengths", ""]
    tl = _get(summary, "token_lengths", default={}) or {}
    lines += [f"Rendered with the chat template of `{summary.get('model', NA)}`; conversations over "
              f"{summary.get('max_tokens', NA)} tokens are dropped "
              f"({_get(summary, 'counts', 'dropped_by_reason', default={}) or 'none dropped'}).", "",
              _table(["split", "n", "min", "mean", "p50", "p95", "max"],
                     [[s, *(tl.get(s, {}).get(k, "") for k in ("n", "min", "mean", "p50", "p95", "max"))]
                      for s in SPLITS if s in tl]), "",
              "![token lengths](token_lengths.png)", ""]

    # prompts and models
    lines += ["## Prompts", ""]
    prompts: dict[str, str] = {}
    ap = _get(aug, "prompts", default={})
    items = ap.items() if isinstance(ap, dict) else ((None, v) for v in (ap if isinstance(ap, list) else []))
    for k, v in items:
        if isinstance(v, dict):
            prompts[str(v.get("name", k))] = str(v.get("hash", ""))
        elif k is not None:
            prompts[str(k)] = str(v)
    for p in summary.get("prompts", []):
        prompts[p["name"]] = p["hash"]
    lines += [_table(["prompt", "sha256[:12]"], [[f"`{k}`", f"`{v}`"] for k, v in sorted(prompts.items())]), ""]
    lines += ["## Models", ""]
    usage = _get(aug, "llm_usage", default={}) or {}
    models = [f"- Embedder: `{_get(dedup, 'embedder', 'name', default=cfg.dedup.embedder.model)}`",
              f"- Chat template / tokenizer: `{summary.get('model', cfg.model.name_or_path)}`"]
    for name, u in sorted(usage.items()):
        models.append(f"- LLM `{name}`: `{_get(u, 'model', default=NA)}` "
                      f"({_get(u, 'calls', default=NA)} calls, {_get(u, 'cache_hits', default=NA)} cache hits)")
    if not usage:
        models.append(f"- LLM for rephrasing: {NA}")
    lines += models + [""]

    # usage
    lines += ["## Usage", "", "```python", "from datasets import load_dataset", "",
              'ds = load_dataset("parquet", data_dir="path/to/this/folder")',
              'ds["train"][0]["messages"]  # system, user, assistant: ready for TRL SFTTrainer', "```", "",
              "Columns: canonical fields (`id`, `group_id`, `source`, `task_type`, `category`, `scenario`, "
              "`question`, `answer`, `labels`, `is_rephrase`, `rephrase_index`), `cluster`, `context` and "
              "`metadata` as JSON strings, `messages`, `n_tokens`, `n_assistant_tokens`.", "",
              "## Provenance", "",
              _table(["stage", "config hash"], [[n, _get(m, "config_hash", default=NA)] for n, m in
                                                (("fetch", fetch), ("augment", aug), ("dedup", dedup),
                                                 ("split", split), ("format", summary))]), ""]
    return "\n".join(lines)


def write_card(cfg: Config, summary: dict[str, Any]) -> Path:
    path = cfg.paths.stage_dir("dataset") / "README.md"
    atomic_write_text(path, build_card(cfg, summary))
    return path


def card_markdown(cfg: Config) -> str:
    """The written card (for ``finsynth card`` and the flow's markdown artifact)."""
    path = cfg.paths.stage_dir("dataset") / "README.md"
    if not path.exists():
        raise FileNotFoundError(f"no dataset card at {path}; run `finsynth format` first")
    return path.read_text(encoding="utf-8")


def parse_card(text: str) -> tuple[dict[str, Any], str]:
    """(YAML metadata, body) of a card."""
    if not text.startswith("---\n"):
        raise ValueError("card has no YAML header")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body
