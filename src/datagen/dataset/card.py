"""The dataset card: ``README.md`` in the dataset folder, a Hugging Face card built from the manifests.

The YAML header is valid Hub metadata: ``configs`` (one config named after this run's content, whose
``data_files`` are the Parquet splits only), ``size_categories``, ``task_categories``, ``license``,
``annotations_creators``, ``language_creators``, ``source_datasets``, ``language``, ``pretty_name``.

What the card states is true of the data it describes:

- every count of rows, sources, clusters, groups, task types and rephrasings comes from the final
  data (the format stage's ``data`` summary, after the length filter); upstream manifests supply only
  the history (rows fetched, dedup removals, rephrase slots) and say so;
- license and creators come from the sources present in the data: a source QA file may declare
  ``license``, ``annotations_creators``, ``language_creators`` and ``source_datasets`` (read with
  defaults: ``unknown`` license, ``found`` annotations); ``machine-generated`` is stated only for what
  the pipeline generated (market QA computed by code, scenario tasks, rephrasings), under
  ``card.license``;
- a figure that was not recorded is left out or reported as "not recorded", never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from datagen.config import Config
from datagen.io import atomic_write_text, read_json, read_manifest
from datagen.manifest import AugmentManifest, DedupManifest, FetchManifest, FormatManifest, SplitManifest
from datagen.render import md_code, md_table, md_text, slug
from datagen.schema import SCENARIO_SOURCE, SPLITS

# the dataset folder's layout, besides the split files (datasets skips folders that start with "__")
META_DIR = "__meta__"  # drops.jsonl, token_lengths.png: not data
DISK_DIR = "__arrow__"  # DatasetDict.save_to_disk copy, for datasets.load_from_disk

NA = "not recorded"


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d or d[k] is None:
            return default
        d = d[k]
    return d


def _na(v: Any) -> Any:
    return NA if v is None else v


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "10M<n<100M"


def _table(header: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    """A Markdown table; every cell escaped (:func:`datagen.render.md_cell`) unless ``raw`` (cells
    already rendered, e.g. as code spans)."""
    if not rows:
        return f"_{NA}_"
    return md_table(header, rows, raw=raw)


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else NA


def _reasons(counts: Any) -> dict[str, int]:
    """Drops by reason from a manifest's counts: ``dropped_<reason>`` keys, or a ``dropped_by_reason`` dict."""
    if not isinstance(counts, dict):
        return {}
    out = dict(counts.get("dropped_by_reason") or {})
    out.update({k[len("dropped_"):]: v for k, v in counts.items()
                if k.startswith("dropped_") and k != "dropped_by_reason" and isinstance(v, int)})
    return dict(sorted(out.items()))


def _slug(name: str) -> str:
    return slug(name)


def source_info(spec: Any, generated: bool, own_license: str, name: str | None = None) -> dict[str, Any]:
    """License, creators and origin of one source, from what its config declares.

    ``generated``: the pipeline wrote its questions and answers (market QA, scenario tasks), so it is
    machine-generated original data under ``own_license`` unless the source sets a license.
    Otherwise the source's own declarations, defaulting to an ``unknown`` license and ``found``
    annotations (never machine-generated: the pipeline did not write them)."""
    lic = getattr(spec, "license", None)
    if generated:
        return {"license": lic or own_license, "annotations_creators": ["machine-generated"],
                "language_creators": ["machine-generated"], "source_datasets": ["original"]}
    name = name or getattr(spec, "name", None) or Path(str(getattr(spec, "path", "") or "unknown")).stem
    return {"license": lic or "unknown",
            "annotations_creators": list(getattr(spec, "annotations_creators", None) or ["found"]),
            "language_creators": list(getattr(spec, "language_creators", None) or ["found"]),
            "source_datasets": list(getattr(spec, "source_datasets", None) or [f"extended|{_slug(name)}"])}


def sources_info(cfg: Config, names: list[str]) -> dict[str, dict[str, Any]]:
    """:func:`source_info` of every source name found in the data."""

    files = {f.name or Path(f.path).stem: f for f in cfg.sources.source_qa}
    mc = cfg.sources.market
    out = {}
    for n in names:
        if n.startswith("market:"):
            own = cfg.card.license if n == "market:simulator" else "unknown"  # real prices: their vendor's terms
            out[n] = source_info(mc, True, own)
        elif n == SCENARIO_SOURCE:
            out[n] = source_info(None, True, cfg.card.license)
        else:
            out[n] = source_info(files.get(n), False, cfg.card.license, name=n)
    return out


def _sum(per_split: Any) -> dict[str, int]:
    """Per-split ``{split: {key: n}}`` summed over splits."""
    out: dict[str, int] = {}
    for s in SPLITS:
        for k, v in ((per_split or {}).get(s) or {}).items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def metadata(cfg: Config, summary: FormatManifest) -> dict[str, Any]:
    total = sum(summary.counts.get(s) or 0 for s in SPLITS)
    data = summary.data
    infos = sources_info(cfg, list(_sum(data.get("by_source"))))
    task_types = set(_sum(data.get("by_task_type")))
    cats = ["question-answering", "text-generation"]
    if "classification" in task_types:
        cats.append("text-classification")
    licenses = sorted({i["license"] for i in infos.values()}) or ["unknown"]
    union = lambda key: sorted({x for i in infos.values() for x in i[key]})  # noqa: E731
    language = set(union("language_creators"))
    if sum((data.get("rephrasings") or {}).values()):
        language.add("machine-generated")
    generated = any("machine-generated" in i["annotations_creators"] for i in infos.values())
    fp = summary.fingerprint
    return {
        "pretty_name": cfg.card.pretty_name,
        "license": licenses[0] if len(licenses) == 1 else licenses,
        "language": ["en"],
        "language_creators": sorted(language),
        "annotations_creators": union("annotations_creators"),
        "multilinguality": ["monolingual"],
        "size_categories": [size_category(total)],
        "source_datasets": union("source_datasets"),
        "task_categories": cats,
        "tags": ["finance", *(["synthetic"] if generated else []), "sft", "chat"],
        # a config named after the content: the datasets cache never serves another run's rows
        "configs": [{"config_name": f"{cfg.card.dataset_name}-{fp}" if fp else cfg.card.dataset_name,
                     "default": True,
                     "data_files": [{"split": s, "path": f"{s}.parquet"} for s in summary.splits]}],
    }


def label_distribution(by_split: dict[str, dict[str, dict[str, int]]]) -> list[str]:
    """The card's lines on classification labels: per category and label, rows in each split (what the
    files hold; ``train.balance_labels`` oversamples train's rarer labels only when training reads them)."""
    cats = sorted({c for per in by_split.values() for c in per})
    if not cats:
        return []
    rows = []
    for c in cats:
        labels = sorted({lab for s in SPLITS for lab in (by_split.get(s) or {}).get(c, {})})
        rows += [[c, lab, *[(by_split.get(s) or {}).get(c, {}).get(lab, 0) for s in SPLITS]] for lab in labels]
    note = ("With `train.balance_labels` (on by default) finsynth's training oversamples each category's rarer "
            "labels of the train split to the most frequent one's count; validation and test are evaluated with "
            "the counts above.")
    return ["Classification labels per split (rows):", "", _table(["category", "label", *SPLITS], rows), "",
            note, ""]


def build_card(cfg: Config, summary: FormatManifest, inputs: Mapping[str, Path] | None = None) -> str:
    """The card's Markdown text (YAML header + body) from the format summary and the manifests of the
    upstream folders in ``inputs`` (``fetch``, ``augment``, ``dedup``, ``split``; one left out is a
    stage the card has nothing to say about)."""
    inputs = inputs or {}
    fetch, aug, dedup, split = (read_manifest(inputs[n], kind) if n in inputs else None for n, kind in (
        ("fetch", FetchManifest), ("augment", AugmentManifest), ("dedup", DedupManifest), ("split", SplitManifest)))
    clusters_path = inputs["split"] / "clusters.json" if "split" in inputs else None
    clusters = read_json(clusters_path) if clusters_path and clusters_path.exists() else None
    data = summary.data
    meta = metadata(cfg, summary)
    counts = {s: summary.counts.get(s) or 0 for s in SPLITS}
    lines: list[str] = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
                        f"# {md_text(cfg.card.pretty_name)}", ""]

    present = _sum(data.get("by_source"))
    made = [what for what, there in (
        ("grounded QA computed by code from market data", any(k.startswith("market:") for k in present)),
        ("source QA files", any(not k.startswith("market:") and k != SCENARIO_SOURCE for k in present)),
        ("LLM-written scenario tasks", SCENARIO_SOURCE in present),
        ("validated LLM rephrasings", sum((data.get("rephrasings") or {}).values()) > 0)) if there]
    lines += [f"Finance question answering for supervised fine-tuning ({md_code(cfg.card.dataset_name)}), built by "
              f"the finsynth pipeline (profile {md_code(cfg.profile)})" + (f" from {', '.join(made)}" if made else "")
              + ", with embedding dedup, a group-aware split stratified by scenario cluster, and chat "
              "formatting with loss on the assistant turn only. Every figure below is counted on the rows in "
              "this folder unless it says otherwise.", "",
              _table(["split", "rows"], [[s, counts[s]] for s in SPLITS] + [["total", sum(counts.values())]]), ""]
    for s in summary.empty_splits:
        lines += [f"The split stage left {md_code(s)} empty: it has no file.", ""]

    # sources
    lines += ["## Sources", ""]
    in_data = _sum(data.get("by_source"))
    fetched = (fetch.counts.get("per_source") if fetch else None) or {}
    infos = sources_info(cfg, sorted(set(in_data) | set(fetched)))
    lines += [_table(["source", "rows in dataset", "rows fetched", "license", "annotations"],
                     [[k, in_data.get(k, 0), fetched.get(k, NA), infos[k]["license"],
                       ", ".join(infos[k]["annotations_creators"])] for k in sorted(infos)]), ""]
    per_cat = _sum(data.get("by_category"))
    if per_cat:
        lines += ["Categories: " + ", ".join(f"{md_text(k)} ({v})" for k, v in per_cat.items()) + ".", ""]
    lines += label_distribution(data.get("labels_by_category") or {})
    q = fetch.quarantine.get("total") if fetch else None
    if q is not None:
        fd = _reasons(fetch.counts) or fetch.quarantine.get("by_reason") or {}
        lines += [f"Rows quarantined at fetch (invalid): {q}"
                  + (f", by reason: {', '.join(f'{md_text(r)} {n}' for r, n in fd.items())}" if q and fd else "")
                  + ".", ""]

    # rephrasing
    lines += ["## Rephrasing", ""]
    reph = (aug.rephrase if aug else None) or {}
    k = reph.get("k")
    if aug is None:
        lines.append(f"- Rephrasing: {NA} (no augment manifest).")
    elif not k or not reph.get("slots"):
        lines.append(f"- Rephrasing off (`augment.k: {k if k is not None else NA}`): items rephrased: 0.")
    else:
        lines.append(f"- Rephrasings requested per item (k): {k}, for "
                     f"{aug.counts.get('rephrased_items', NA)} items; slots {reph['slots']}, "
                     f"kept {reph.get('kept', NA)}, missing {reph.get('missing', NA)}.")
        if reph.get("acceptance") is not None:
            extra = [f"first attempt {_pct(reph['first_attempt_acceptance'])}"
                     if reph.get("first_attempt_acceptance") is not None else "",
                     f"{_pct(reph['candidate_acceptance'])} of candidates accepted"
                     if reph.get("candidate_acceptance") is not None else ""]
            extra = [e for e in extra if e]
            lines.append(f"- Acceptance: {_pct(reph['acceptance'])} of slots filled"
                         + (f" ({'; '.join(extra)})" if extra else "") + ".")
        if reph.get("rejected_by_reason"):
            lines.append(f"- Rejected candidates by reason: {md_text(reph['rejected_by_reason'])}.")
        mp = reph.get("measured_precision") or {}
        if mp.get("measured"):
            ci = mp.get("ci") or [None, None]
            lines.append(f"- Precision of kept rephrasings, measured on {mp.get('labelled_kept', NA)} hand-labelled "
                         f"real outputs of this model and prompt: {_pct(mp['precision'])} (95% CI "
                         f"{_pct(ci[0])} to {_pct(ci[1])}) at a keep rate of {_pct(mp.get('keep_rate'))} "
                         f"(`{md_text(mp.get('source', ''))}`).")
        elif mp:
            lines.append(f"- Precision of kept rephrasings: not measured for this model and prompt "
                         f"({md_text(mp.get('why', ''))}).")
    ad = _reasons(aug.counts if aug else None)
    if ad:
        lines.append("- Dropped at augment (every rejected candidate, rephrasings and scenario tasks): "
                     + ", ".join(f"{md_text(r)} {n}" for r, n in ad.items()) + ".")
    if data:
        lines.append(f"- In this dataset: {sum((data.get('rephrasings') or {}).values())} rephrasings of "
                     f"{sum((data.get('rephrased_groups') or {}).values())} items.")
    scen = aug.scenarios if aug else None
    if scen:
        acc = f" (acceptance {_pct(scen['acceptance'])})" if scen.get("acceptance") is not None else ""
        lines.append(f"- Scenario tasks synthesized: {scen.get('kept', NA)} of {scen.get('planned', NA)} "
                     f"planned{acc}.")
    lines.append("")

    # dedup
    lines += ["## Deduplication", ""]
    dd = dedup or DedupManifest(config_hash=NA, method=NA)
    lines += [f"Embeddings: {md_code(dd.embedder.get('name', NA))}; near duplicates across groups at "
              f"cosine >= {_na(dd.threshold)}, near-copies within a group at >= "
              f"{_na(dd.within_group_threshold)}, exact duplicates on normalised text; "
              f"pair search: {md_text(dd.method)}. Clusters merged by union-find; "
              "keeper policy: originals over rephrasings, then richer context, then lowest id.", ""]
    lines += [f"At dedup: rows in {dd.counts.get('in', NA)}, kept {dd.counts.get('kept', NA)}.", "",
              _table(["reason", "rows removed"], [[r, n] for r, n in _reasons(dd.counts).items()]), ""]

    # split
    lines += ["## Splits, clusters and leakage", ""]
    cb = _get(clusters, "cluster_by", default=cfg.split.cluster_by)
    lines += [f"Split by group (a source item with all its rephrasings goes to one split), stratified by "
              f"scenario cluster ({md_code(f'cluster_by: {cb}')}), ratios {list(cfg.split.ratios)}."
              + (" The test split holds originals only." if cfg.split.test_originals_only else "")
              + (" Training rows are balanced per cluster." if cfg.split.balance_train else ""), ""]
    sd = _reasons(split.counts if split else None)
    if sd:
        lines += [f"Removed at split: {', '.join(f'{md_text(r)} {n}' for r, n in sd.items())}.", ""]
    groups = data.get("groups") or {}
    if groups:
        lines += [f"Groups per split: {', '.join(f'{s} {groups.get(s, 0)}' for s in SPLITS)}.", ""]
    origin = {c.get("name"): c.get("source", "") for c in _get(clusters, "clusters", default=[]) or []}
    by_cluster = data.get("by_cluster") or {}
    crow = []
    for c in _sum(by_cluster):
        cells = []
        for s in SPLITS:
            n = (by_cluster.get(s) or {}).get(c, 0)
            cells.append(f"{n} ({_pct(n / counts[s]) if counts[s] else '-'})")
        crow.append([c, origin.get(c, "kmeans" if c.startswith("kmeans:") else NA), *cells])
    lines += [_table(["cluster", "from", *[f"{s} rows (share)" for s in SPLITS]], crow), ""]
    km = _get(clusters, "kmeans", default={}) or {}
    if km.get("silhouette"):
        lines += [f"k-means: k = {km.get('k')} chosen by silhouette {km.get('silhouette')}.", ""]
    leak = (split.leakage if split else None) or {}
    if leak:
        known = ("max_cross_split_cosine", "threshold", "cross_split_pairs_above_threshold",
                 "cross_split_duplicates", "min_number_overlap", "groups_in_two_splits")
        line = (f"Leakage check (at split; the length filter only removes rows): largest cross-split cosine "
                f"{leak.get('max_cross_split_cosine', NA)}; cross-split pairs with cosine >= "
                f"{leak.get('threshold', NA)}: {leak.get('cross_split_pairs_above_threshold', NA)}, of which "
                f"duplicates (same figures, overlap >= {leak.get('min_number_overlap', NA)}): "
                f"{leak.get('cross_split_duplicates', NA)}; groups in two splits: "
                f"{leak.get('groups_in_two_splits', NA)}.")
        more = [f"{k_} {v}" for k_, v in sorted(leak.items())
                if k_ not in known and isinstance(v, (int, float, str, bool))]
        lines += [line + (f" Also: {', '.join(more)}." if more else ""), ""]
    else:
        lines += [f"Leakage check: {NA}.", ""]

    # tokens
    lines += ["## Token lengths", ""]
    tl = summary.token_lengths
    fmt_drops = _reasons(summary.counts)
    policy = ("truncated where the answer's figures stay in the kept table rows and paragraphs, else dropped"
              if summary.long_context == "truncate" else "dropped")
    lines += [f"Rendered with the chat template of {md_code(summary.model or NA)}; conversations over "
              f"{summary.max_tokens or NA} tokens are {policy}. Dropped at format: "
              + (", ".join(f"{r} {n}" for r, n in fmt_drops.items()) or "none")
              + f"; truncated: {summary.counts.get('truncated') or 0}.", ""]
    lost = summary.sources_emptied
    if lost:
        lines += [f"Every row of {', '.join(md_code(x) for x in lost)} was dropped at format.", ""]
    lines += [_table(["split", "n", "min", "mean", "p50", "p95", "max"],
                     [[s, *(tl.get(s, {}).get(k_, "") for k_ in ("n", "min", "mean", "p50", "p95", "max"))]
                      for s in SPLITS if tl.get(s, {}).get("n")]), "",
              f"![token lengths]({META_DIR}/token_lengths.png)", ""]

    # prompts and models
    lines += ["## Prompts", ""]
    prompts: dict[str, str] = {}
    for k_, v in (aug.prompts if aug else {}).items():
        prompts[str(v.get("name", k_))] = str(v.get("hash", ""))
    for p in summary.prompts:
        prompts[p["name"]] = p["hash"]
    lines += [_table(["prompt", "sha256[:12]"], [[md_code(k_, in_table=True), md_code(v, in_table=True)]
                                                 for k_, v in sorted(prompts.items())], raw=True), ""]
    lines += ["## Models", ""]
    usage = aug.llm_usage if aug else {}
    models = [f"- Embedder: {md_code(dd.embedder.get('name', cfg.dedup.embedder.model))}",
              f"- Chat template / tokenizer: {md_code(summary.model or cfg.model.name_or_path)}"]
    for name, u in sorted(usage.items()):
        models.append(f"- LLM {md_code(name)}: {md_code(u.get('model') or NA)} "
                      f"({u.get('calls', NA)} calls, {u.get('cache_hits', NA)} cache hits)")
    if not usage:
        models.append(f"- LLM for rephrasing: {NA}")
    lines += models + [""]

    # usage
    config_name = meta["configs"][0]["config_name"]
    lines += ["## Usage", "", "```python", "from datasets import load_dataset, load_from_disk", "",
              'ds = load_dataset("path/to/this/folder")  # reads the configs above: the Parquet splits only',
              f'ds = load_from_disk("path/to/this/folder/{DISK_DIR}")  # the same DatasetDict, saved to disk',
              'ds["train"][0]["messages"]  # system, user, assistant: ready for TRL SFTTrainer', "```", "",
              f"The config is named {md_code(config_name)} after the content of the Parquet files, so the `datasets` "
              f"cache never serves another run's rows. `{META_DIR}/` holds `drops.jsonl` (every row dropped at "
              "format, with its reason) and the token-length plot; `datasets` skips folders starting with `__`.",
              "",
              "Columns: canonical fields (`id`, `group_id`, `source`, `task_type`, `category`, `scenario`, "
              "`question`, `answer`, `labels`, `is_rephrase`, `rephrase_index`), `cluster`, `context` and "
              "`metadata` as JSON strings, `messages`, `n_tokens`, `n_assistant_tokens`.", "",
              "## Provenance", "",
              _table(["stage", "config hash"], [[n, m.config_hash if m else NA] for n, m in
                                                (("fetch", fetch), ("augment", aug), ("dedup", dedup),
                                                 ("split", split), ("format", summary))]), ""]
    return "\n".join(lines)


def write_card(path: Path, card: str) -> Path:
    atomic_write_text(path, card)
    return path


def parse_card(text: str) -> tuple[dict[str, Any], str]:
    """(YAML metadata, body) of a card."""
    if not text.startswith("---\n"):
        raise ValueError("card has no YAML header")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body
