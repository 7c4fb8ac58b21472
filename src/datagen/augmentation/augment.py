"""Stage ``augment``: scenario synthesis, then k validated rephrasings per question.

Reads ``inputs["fetch"]/samples.jsonl``; writes its output folder:

- ``samples.jsonl``: every fetched original, the synthesized scenario tasks, and the kept rephrasings,
  sorted by (group_id, rephrase_index);
- ``rejections.jsonl``: every rejected candidate (rephrasings and scenario tasks), one
  :func:`datagen.io.drop_record` each (:func:`rejection_drop`): ``stage``, ``row_id`` (the id the
  candidate would have had), ``reason``, ``detail``, plus what the rephrase / scenario loop recorded
  (``kind``, ``source_id``, ``attempt``, ...); ``final: true`` marks the reason recorded for a slot that
  stayed empty;
- ``manifest.json`` (last): config hash, upstream fetch manifest hash, prompt refs and hashes,
  counts (``dropped_<reason>`` over ``rejections.jsonl``, by :func:`datagen.io.drop_counts`),
  acceptance per reason / category, and the LLM usage of this run.

Rerunning with nothing changed makes no model calls: the providers' response cache answers every
request. (Marking later stages stale is the orchestration's job: ``flows.stages.execute``.)
"""

from __future__ import annotations

import functools
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datagen import executor
from datagen.augmentation.rephrase import (PROMPT_BASE, PROMPT_FIRST, measured_precision, merge_results, rephrase_id,
                                           rephrase_rows)
from datagen.augmentation.scenarios import synthesize_scenarios
from datagen.augmentation.validators import RephraseChecks
from datagen.config import Config
from datagen.embed import Embedder
from datagen.io import drop_counts, drop_record, manifest_hash, read_jsonl, write_jsonl, write_manifest
from datagen.manifest import AugmentManifest
from datagen.llm.base import LLMProvider, check_failure_rate
from datagen.schema import Sample
from datagen.stage import Inputs, StageSpec

log = logging.getLogger(__name__)


def select_for_rephrasing(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """Originals in a deterministic order that interleaves categories (so ``limit`` covers all of
    them): category-sorted round-robin, rows within a category sorted by id. ``limit`` keeps the first N."""
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if not r.get("is_rephrase"):
            by_cat[str(r.get("category"))].append(r)
    queues = [sorted(v, key=lambda r: r["id"]) for _, v in sorted(by_cat.items())]
    order: list[dict[str, Any]] = []
    i = 0
    while any(i < len(q) for q in queues):
        order.extend(q[i] for q in queues if i < len(q))
        i += 1
    return order if limit is None else order[:limit]


def _usage_delta(provider: LLMProvider, before: dict[str, int]) -> dict[str, Any]:
    after = provider.usage.as_dict()
    return {"provider": provider.name, "model": provider.model,
            **{k: after[k] - before.get(k, 0) for k in after}}


def _add_usage(usage: dict[str, dict[str, Any]], delta: dict[str, Any]) -> None:
    """Sum a provider's usage over the stage's parts (scenario synthesis, each rephrase shard)."""
    have = usage.setdefault(delta["provider"], {"provider": delta["provider"], "model": delta["model"]})
    for k, v in delta.items():
        if k not in ("provider", "model"):
            have[k] = have.get(k, 0) + v


def rejection_drop(rec: dict[str, Any]) -> dict[str, Any]:
    """A rejected candidate, as the rephrase or scenario loop recorded it, as the one drop record of
    every stage: ``row_id`` is the id the candidate would have had (the rephrasing's id for its slot,
    the scenario task's id), so a slot filled at a later attempt has earlier drops under its kept row's
    id; every field the loop recorded stays beside the four keys."""
    if rec["kind"] == "rephrase":
        row_id = rephrase_id(rec["source_id"], rec["rephrase_index"])
    else:  # a scenario task's row is ``{"id": rid, "group_id": f"scn-{rid}"}`` (scenarios.make_row)
        row_id = rec["group_id"].removeprefix("scn-")
    extra = {k: v for k, v in rec.items() if k not in ("stage", "row_id", "reason", "detail")}
    return drop_record("augment", row_id, rec["reason"], rec.get("detail") or "", **extra)


def _sort_key(r: dict[str, Any]) -> tuple:
    return (r["group_id"], -1 if r.get("rephrase_index") is None else r["rephrase_index"], r["id"])


def rephrase_shard(cfg: Config, slots: int, provider: LLMProvider, embedder: Embedder | None,
                   rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One shard of the rephrasing: :func:`rephrase_rows` over ``rows`` as plain data, with the provider's
    usage for it (a shard that mostly failed to reach its model raises, as the stage would)."""
    aug = cfg.augment
    before = provider.usage.snapshot()
    res = rephrase_rows(rows, provider, embedder, k=slots, max_attempts=aug.max_attempts,
                        temperature=aug.temperature, max_tokens=aug.max_tokens,
                        checks=RephraseChecks.from_config(aug), candidates=aug.candidates,
                        prompt_format=aug.prompt_format, early_stop=aug.early_stop)
    check_failure_rate("augment (rephrase)", provider, before, cfg.llm.max_failure_rate)
    return {"result": res.as_dict(), "usage": _usage_delta(provider, before)}


def rephrase_worker(cfg: Config, slots: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """What a Ray actor holds for the rephrasing: the provider and the embedder, loaded once."""
    from datagen.embed import load_embedder
    from datagen.llm import get_provider

    return functools.partial(rephrase_shard, cfg, slots, get_provider(cfg, cfg.augment.provider),
                             load_embedder(cfg.dedup.embedder))


def run_augment(cfg: Config, inputs: Inputs, out_dir: Path, provider: LLMProvider | None = None,
                scenario_provider: LLMProvider | None = None, embedder: Embedder | None = None) -> AugmentManifest:
    """``provider`` / ``embedder`` replace the configured ones (tests); on Ray, each worker loads the
    configured ones itself."""
    aug = cfg.augment
    fetch_dir = inputs["fetch"]
    originals = read_jsonl(fetch_dir / "samples.jsonl")
    on_ray = cfg.run.executor == "ray"
    if on_ray and (provider is not None or embedder is not None):
        raise ValueError("run.executor: ray loads the configured provider and embedder on each worker; "
                         "run with run.executor: local to pass your own")

    def the_provider(name: str) -> LLMProvider:
        from datagen.llm import get_provider

        return provider if provider is not None and name == aug.provider else get_provider(cfg, name)

    def the_embedder() -> Embedder:
        nonlocal embedder
        if embedder is None:
            from datagen.embed import load_embedder

            embedder = load_embedder(cfg.dedup.embedder)
        return embedder

    usage: dict[str, dict[str, Any]] = {}

    # 1. scenario tasks (new originals, rephrased like the rest), here: one request per cluster slot
    scen = None
    scenario_rows: list[dict[str, Any]] = []
    if aug.scenario.enabled and aug.scenario.clusters and aug.scenario.per_cluster:
        sp = scenario_provider or the_provider(aug.scenario.provider)
        before = sp.usage.snapshot()
        scen = synthesize_scenarios(aug.scenario, sp, the_embedder())
        scenario_rows = scen.rows
        check_failure_rate("augment (scenario synthesis)", sp, before, cfg.llm.max_failure_rate)
        _add_usage(usage, _usage_delta(sp, before))
        log.info("augment: %d/%d scenario tasks kept", len(scen.rows), scen.planned)

    # 2. rephrasings of the first `limit` originals (deterministic order), shard by shard
    pool = originals + scenario_rows
    chosen = select_for_rephrasing(pool, aug.limit)
    # a knowledge split asks each trained fact in one rephrasing kept out of train: one slot more
    slots = aug.k + (1 if aug.k > 0 and cfg.split.strategy == "knowledge" else 0)
    key = f"augment|{STAGE.config_hash(cfg)}|{manifest_hash(fetch_dir)}"
    shards = executor.plan(key, chosen, cfg.run.shard_rows, cfg.run.ray_workers if on_ray else 1)
    if on_ray:
        make = functools.partial(rephrase_worker, cfg, slots)
    else:
        prov, emb = the_provider(aug.provider), the_embedder()
        make = lambda: functools.partial(rephrase_shard, cfg, slots, prov, emb)  # noqa: E731
    pcfg = cfg.llm.providers[aug.provider]
    parts = executor.map_shards(cfg.run, make, shards, out_dir / ".shards", what="augment: rephrase shards",
                                rpm={aug.provider: pcfg.rpm} if pcfg.rpm else None)
    for p in parts:
        _add_usage(usage, p["usage"])
    reph = merge_results([p["result"] for p in parts], chosen, slots)
    log.info("augment: %d/%d rephrasings kept for %d items", len(reph.kept), reph.slots, len(chosen))

    rows = sorted(pool + reph.kept, key=_sort_key)
    for r in rows:  # the contract with downstream stages: every row is a valid Sample
        Sample.model_validate(r)
    rejections = [rejection_drop(r) for r in (scen.rejections if scen else []) + reph.rejections]
    rejections.sort(key=lambda r: (r["kind"], r["group_id"], r["rephrase_index"] or 0, r["attempt"]))

    write_jsonl(out_dir / "samples.jsonl", rows)
    write_jsonl(out_dir / "rejections.jsonl", rejections)

    prompts = dict(reph.prompts)
    if scen:
        prompts[scen.prompt["name"]] = scen.prompt
    kept_first = sum(1 for r in reph.kept if r["metadata"]["rephrase_attempt"] == 0)
    manifest = AugmentManifest(
        config_hash=STAGE.config_hash(cfg),
        upstream={"fetch": manifest_hash(fetch_dir)},
        prompts=dict(sorted(prompts.items())),
        embedder=getattr(embedder, "name", type(embedder).__name__) if embedder else cfg.dedup.embedder.model,
        counts={
            "originals": len(originals),
            "scenario_tasks": len(scenario_rows),
            "rephrased_items": len(chosen),
            "passthrough_items": len(pool) - len(chosen),
            "rephrasings": len(reph.kept),
            "rows": len(rows),
            "rejections": len(rejections),
            **drop_counts(rejections),
            "per_category": dict(sorted(Counter(r["category"] for r in rows).items())),
        },
        rephrase={
            "k": aug.k,
            "heldout_slot": slots > aug.k,  # split.strategy: knowledge
            "max_attempts": aug.max_attempts,
            "slots": reph.slots,
            "kept": len(reph.kept),
            "missing": reph.slots - len(reph.kept),
            "requests": reph.requests,
            "candidates_per_request": aug.candidates,
            "prompt_format": aug.prompt_format,
            "candidates": reph.candidates,
            "valid_surplus": reph.surplus,
            "rounds": reph.rounds,
            "acceptance": round(len(reph.kept) / reph.slots, 4) if reph.slots else None,
            "first_attempt_acceptance": round(kept_first / reph.slots, 4) if reph.slots else None,
            "candidate_acceptance": round(len(reph.kept) / reph.requests, 4) if reph.requests else None,
            "rejected_by_reason": dict(sorted(reph.rejected_reasons.items())),
            "missing_by_reason": dict(sorted(reph.missing_reasons.items())),
            "by_category": reph.by_category,
            # the precision measured on hand-labelled outputs of this model and first prompt, if any
            "measured_precision": measured_precision(
                pcfg.model_path or pcfg.model,
                (reph.prompts.get(PROMPT_BASE) or reph.prompts.get(PROMPT_FIRST) or {}).get("hash")),
        },
        scenarios=None if scen is None else {
            "planned": scen.planned,
            "kept": len(scen.rows),
            "requests": scen.requests,
            "acceptance": round(len(scen.rows) / scen.planned, 4) if scen.planned else None,
            "rejected_by_reason": dict(sorted(scen.rejected_reasons.items())),
            "missing_by_reason": dict(sorted(scen.missing_reasons.items())),
            "by_cluster": scen.by_cluster,
        },
        llm_usage=usage,
        llm_calls=sum(u["calls"] for u in usage.values()),
        llm_cache_hits=sum(u["cache_hits"] for u in usage.values()),
    )
    executor.clear(out_dir / ".shards")  # the stage's output is written: its shards are done with
    return write_manifest(out_dir, manifest)


def _prompts(c: Config) -> tuple[str, ...]:
    rephrase = ("rephrase", "rephrase_retry", "rephrase_base", "schema_retry") if c.augment.k > 0 else ()
    return rephrase + (("scenario_synthesis",) if c.augment.scenario.enabled else ())


def _providers(c: Config) -> tuple[str, ...]:
    names = [c.augment.provider] if c.augment.k > 0 else []
    if c.augment.scenario.enabled and c.augment.scenario.per_cluster and c.augment.scenario.clusters:
        names.append(c.augment.scenario.provider)
    return tuple(dict.fromkeys(names))


STAGE = StageSpec("augment", run_augment, __name__,
                  ("augment", "llm", "dedup.embedder", "split.strategy"), upstream=("fetch",), prompts=_prompts,
                  providers=_providers,
                  manifest=AugmentManifest)
