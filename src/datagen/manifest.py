"""What each stage records about its run: one dataclass per stage, the fields its ``manifest.json`` holds.

A stage builds its manifest and hands it to :func:`datagen.io.write_manifest`, which adds the output
file hashes and writes the file last; :func:`datagen.io.read_manifest` reads one back as the stage's
class. The dataset card, the model card, the progress lines and the Prefect artifacts read these fields,
so a renamed or missing figure is a type error where it is read, not a silent ``n/a`` in a card.

Fields every stage has live on :class:`Manifest`. Sections whose keys are data (counts per category,
drop reasons, per-source rows) stay mappings. ``timing`` holds wall-clock figures: they go to
``timings.json`` beside the manifest, so a rerun that writes the same files writes the same manifest.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]


@dataclass(kw_only=True)
class Manifest:
    stage: str
    config_hash: str = ""  # StageSpec.config_hash: the config sections the stage reads
    upstream: Json = field(default_factory=dict)  # upstream stage -> content hash of what it read
    counts: Json = field(default_factory=dict)  # rows in/out, ``dropped_<reason>`` counts, per-key tallies
    outputs: dict[str, str] = field(default_factory=dict)  # file -> sha256, filled by write_manifest
    timing: Json = field(default_factory=dict)  # wall-clock seconds: written to timings.json

    def to_json(self) -> Json:
        """The ``manifest.json`` object: every field but ``timing``, ``outputs`` last."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("timing", "outputs")}
        return {**d, "outputs": self.outputs}

    @classmethod
    def from_json(cls, d: Any) -> Manifest:
        """A manifest read back; keys this class does not know (a newer or older finsynth) are left out.
        Raises ValueError when ``d`` is not an object or a field holds the wrong kind of value."""
        if not isinstance(d, dict):
            raise ValueError(f"a JSON {type(d).__name__}, not an object")
        hints = _hints(cls)
        for k, v in d.items():
            if k in hints and not _fits(v, hints[k]):
                raise ValueError(f"field {k!r} is a JSON {type(v).__name__}")
        return cls(**{k: v for k, v in d.items() if k in hints})

    def rows_out(self) -> int | None:
        """The rows the stage wrote: ``counts.samples``, ``total`` or ``rows``, else the sum of per-split
        counts, else None (train and evaluate count other things)."""
        for k in ("samples", "total", "rows"):
            if isinstance(self.counts.get(k), int):
                return self.counts[k]
        splits = self.counts.get("splits") or self.counts.get("per_split")
        if isinstance(splits, dict) and splits and all(isinstance(v, int) for v in splits.values()):
            return sum(splits.values())
        return None

    def drops(self) -> dict[str, int]:
        """``{reason: n}`` from the ``dropped_<reason>`` counts, largest first, zeros left out."""
        found = {k.removeprefix("dropped_"): v for k, v in self.counts.items()
                 if k.startswith("dropped_") and isinstance(v, int) and v}
        return dict(sorted(found.items(), key=lambda kv: (-kv[1], kv[0])))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of the kind a field's annotation says (containers by their outer type)."""
    if hint is Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    outer = typing.get_origin(hint) or hint
    if outer is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if outer is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, outer) if isinstance(outer, type) else True


@dataclass(kw_only=True)
class FetchManifest(Manifest):
    stage: str = "fetch"
    rows: Json = field(default_factory=dict)  # per source file: rows read, kept, quarantined
    quarantine: Json = field(default_factory=dict)  # total, by_reason, by_file
    source_files: Json = field(default_factory=dict)
    market: Json | None = None
    inputs: Json = field(default_factory=dict)  # file read -> sha256


@dataclass(kw_only=True)
class AugmentManifest(Manifest):
    stage: str = "augment"
    prompts: Json = field(default_factory=dict)  # name -> {name, hash, ...}
    embedder: str = ""
    rephrase: Json = field(default_factory=dict)  # k, slots, kept, acceptance, rejected_by_reason, ...
    scenarios: Json | None = None
    llm_usage: Json = field(default_factory=dict)
    llm_calls: int = 0
    llm_cache_hits: int = 0


@dataclass(kw_only=True)
class DedupManifest(Manifest):
    stage: str = "dedup"
    embedder: Json = field(default_factory=dict)  # name, text, embedding statistics
    threshold: float | None = None
    within_group_threshold: float | None = None
    context_threshold: float | None = None
    method: str = ""


@dataclass(kw_only=True)
class SplitManifest(Manifest):
    stage: str = "split"
    embedder: str = ""
    clusters: dict[str, int] = field(default_factory=dict)  # cluster -> rows
    kmeans: Json = field(default_factory=dict)
    leakage: Json = field(default_factory=dict)
    walk_forward: Json | None = None
    allow_leakage: bool = False
    test_originals_only: bool = False
    balance_train: bool = False


@dataclass(kw_only=True)
class FormatManifest(Manifest):
    stage: str = "format"
    prompts: list[Json] = field(default_factory=list)
    model: str = ""
    max_tokens: int = 0
    long_context: str = ""
    fingerprint: str = ""
    splits: list[str] = field(default_factory=list)  # the splits with a file (an empty one has none)
    empty_splits: list[str] = field(default_factory=list)
    dropped_by_source: Json = field(default_factory=dict)
    sources_emptied: list[str] = field(default_factory=list)
    data: Json = field(default_factory=dict)  # per-split tallies of the rows written (card figures)
    token_lengths: Json = field(default_factory=dict)


@dataclass(kw_only=True)
class TrainManifest(Manifest):
    stage: str = "train"
    config: Json = field(default_factory=dict)
    prompts: Json = field(default_factory=dict)
    libraries: Json = field(default_factory=dict)
    device: str = ""
    torch_threads: int = 0
    precision: str = ""
    attn_implementation: str = ""
    distributed: Json = field(default_factory=dict)
    balance_labels: Json = field(default_factory=dict)
    parameters: Json = field(default_factory=dict)
    resumed_from: str | None = None
    steps: int = 0
    max_steps: int = 0
    epochs: float = 0.0
    stopped_early: bool = False
    best_eval_loss: float | None = None
    best_step: int | None = None
    final_train_loss: float | None = None
    train_loss_mean: float | None = None
    wall_time_s: float | None = None
    train_step_time_s: float | None = None
    train_tokens: int = 0
    tokens_per_s: float | None = None
    memory: Json = field(default_factory=dict)
    merged_dir: str | None = None


@dataclass(kw_only=True)
class EvaluateManifest(Manifest):
    stage: str = "evaluate"
    prompts: list[Json] = field(default_factory=list)
    models: Json = field(default_factory=dict)
    judge: Json = field(default_factory=dict)
    rests_on_judge: Any = None
    llm_usage: Json = field(default_factory=dict)
    table_rows: list[Json] = field(default_factory=list)
    classification_rows: list[Json] = field(default_factory=list)
    report_md: str = ""
    report_json: str = ""
    scores_png: str = ""
    items_jsonl: str = ""
