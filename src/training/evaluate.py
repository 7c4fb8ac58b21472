"""The evaluate stage: three arms on the test split (and an optional gold-task file).

Arms: ``base`` (the base model, zero-shot), ``fewshot`` (the base model with ``evaluate.fewshot_k``
exemplars of the item's category from the *train* split as earlier chat turns; off at 0) and
``tuned`` (base + adapter, zero-shot). ``run_evaluate(cfg, inputs, out)`` reads the format stage's
``test.parquet`` (and ``train.parquet`` for exemplars) and the train stage's adapter, generates every
arm's answers, grades them (numeric figures, classification labels,
extractive exact match / token F1 for short span answers, the LLM judge for the other ``open_qa`` or for
everything with ``judge_all``), self-checks the judge, aggregates per category with clustered
(group) bootstrap CIs and the paired differences tuned - base and tuned - few-shot, and writes
``items.jsonl``, ``report.json``, ``report.md``, ``scores.png`` and ``manifest.json`` (last) to ``out``
(``reports_dir / evaluate.run_name``).

The pieces are plain functions over rows and answer lists (:func:`evaluate_answers`), so they are
tested with a scripted judge and without a model.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datagen import executor
from datagen.config import Config
from datagen.manifest import EvaluateManifest
from datagen.io import (
    atomic_write_text,
    dumps,
    manifest_hash,
    read_jsonl,
    sha256_text,
    write_json,
    write_jsonl,
    write_manifest,
)
from datagen.llm.base import LLMProvider, check_failure_rate
from datagen.prompts import load_prompt
from datagen.stage import Inputs, StageSpec
from training.aggregate import ARMS, F1_ARMS, F1_DIFFS, MAJORITY, aggregate, group_seed, macro_f1_cis
from training.graders import (
    Grade,
    answer_label,
    classification_metrics,
    collapse,
    expected_values,
    grade_classification,
    grade_extractive,
    grade_numeric,
    majority_labels,
    pick_by_loglik,
    span_answers,
)
from training.judge import (
    PAIRWISE_PROMPT,
    RUBRIC_PROMPT,
    JudgeItem,
    agreement,
    judge_answers,
    judge_pairwise,
    reliability,
    selfcheck,
)
from training.report import report_dir

log = logging.getLogger(__name__)

Generator = Callable[..., dict[str, list[str]]]  # (model_cfg, adapter_dir, {arm: conversations}, **kw)


# ----------------------------------------------------------------------------- inputs
def _plain(v: Any) -> Any:
    """Parquet values (numpy arrays and scalars) as plain Python."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return v


def decode_row(rec: dict[str, Any]) -> dict[str, Any]:
    """A dataset row with JSON-string fields (metadata, context) decoded and arrays as lists."""
    row = {k: _plain(v) for k, v in rec.items()}
    for key in ("metadata", "context"):
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key]) if row[key].strip() else {}
    if isinstance(row.get("messages"), str):
        row["messages"] = json.loads(row["messages"])
    if isinstance(row.get("labels"), str):
        row["labels"] = json.loads(row["labels"])
    row["metadata"] = row.get("metadata") or {}
    return row


def load_split_rows(dataset_dir: Path, split: str) -> list[dict[str, Any]]:
    """The decoded rows of ``<dataset_dir>/<split>.parquet``; none when format wrote no file (empty split)."""
    import pandas as pd

    path = Path(dataset_dir) / f"{split}.parquet"
    return [decode_row(r) for r in pd.read_parquet(path).to_dict(orient="records")] if path.exists() else []


def fewshot_exemplars(row: dict[str, Any], train: Sequence[dict[str, Any]], k: int, seed: int
                      ) -> list[dict[str, Any]]:
    """Up to ``k`` training rows of ``row``'s category, one per group, never of ``row``'s own group.

    Chosen per category, deterministically: originals before rephrasings, then by
    ``sha256(f"{seed}:{category}:{train id}")``; the input order does not matter. Every item of a
    category gets the same shots (as MMLU's fixed dev-set exemplars per subject), so the few-shot
    prompts of a category share one head, which generation prefills once (:func:`lm.causal_lm.decode`).
    """
    if k <= 0:
        return []
    ranked = sorted((t for t in train if t["category"] == row["category"] and t["group_id"] != row.get("group_id")),
                    key=lambda t: (bool(t.get("is_rephrase")), sha256_text(f"{seed}:{row['category']}:{t['id']}")))
    out: list[dict[str, Any]] = []
    groups: set[str] = set()
    for t in ranked:
        if t["group_id"] not in groups and len(out) < k:
            groups.add(t["group_id"])
            out.append(t)
    return out


def load_gold(path: Path) -> list[dict[str, Any]]:
    """Gold tasks: canonical rows (JSONL), optionally with ``messages``."""
    return [decode_row(r) for r in read_jsonl(path)]


RESERVED_SPLITS = ("train", "validation", "test", "gold")


def test_set_name(spec: Any) -> str:
    """The split name an external test set is reported under: its ``name``, else the file stem."""
    return spec.name or Path(spec.path).stem


def load_test_set(cfg: Config, spec: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """An ``evaluate.test_sets`` entry read and validated like a ``sources.source_qa`` file
    (:func:`datagen.sources.source_qa.load_source_qa`, the same column mapping), each row rendered into
    the chat the training rows had (system prompt + ``sft_user``, labels listed) and tagged with the set's
    name as its ``split``. Returns the rows and ``{file, rows, quarantined}``; a file with no valid row
    fails. Evaluation only: nothing here is written where the data stages, training or few-shot
    exemplars read."""
    from datagen.dataset.chat_format import USER_PROMPT, build_messages
    from datagen.sources.source_qa import load_source_qa

    name = test_set_name(spec)
    path = cfg.paths.resolve(spec.path)
    res = load_source_qa(spec.model_copy(update={"path": path}), path)
    if not res.samples:
        raise ValueError(f"evaluate.test_sets: {path} has no valid row ({len(res.quarantine)} quarantined)")
    system, user = load_prompt(cfg.format.system_prompt), load_prompt(USER_PROMPT)
    rows = []
    for s in res.samples:
        row = decode_row(dict(s))
        row["messages"] = build_messages(row, system, user)
        rows.append({**row, "split": name})
    rows.sort(key=lambda r: r["id"])
    if res.quarantine:
        log.warning("evaluate.test_sets %s: %d rows quarantined (invalid)", name, len(res.quarantine))
    return rows, {"file": str(path), "rows": len(rows), "quarantined": len(res.quarantine)}


def select_items(rows: Sequence[dict[str, Any]], max_items: int | None) -> list[dict[str, Any]]:
    """Rows sorted by id; with ``max_items``, taken round-robin over categories so each is represented."""
    rows = sorted(rows, key=lambda r: r["id"])
    if max_items is None or len(rows) <= max_items:
        return rows
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    picked: list[dict[str, Any]] = []
    k = 0
    while len(picked) < max_items:
        for cat in sorted(by_cat):
            if k < len(by_cat[cat]) and len(picked) < max_items:
                picked.append(by_cat[cat][k])
        k += 1
    return sorted(picked, key=lambda r: r["id"])


# ----------------------------------------------------------------------------- grading
def primary_grader(row: dict[str, Any]) -> str:
    """``numeric`` / ``classification`` / ``extractive`` / ``judge``: which grader decides an item's score."""
    if row["task_type"] == "numeric_qa" and expected_values(row):
        return "numeric"
    if row["task_type"] == "classification":
        return "classification"
    if span_answers(row):
        return "extractive"
    return "judge"


def grade_programmatic(row: dict[str, Any], answer: str, rel_tol: float) -> Grade:
    g = primary_grader(row)
    if g == "numeric":
        return grade_numeric(answer, expected_values(row), rel_tol, label=answer_label(row))
    if g == "extractive":
        return grade_extractive(answer, span_answers(row) or [])
    return grade_classification(answer, row["answer"], row.get("labels"))


def grade_by_loglik(row: dict[str, Any], scores: Sequence[tuple[float, int]], generated: Grade) -> Grade:
    """A classification item graded by label log-likelihood: the label among ``row["labels"]`` whose
    continuation the model finds most likely (:func:`training.graders.pick_by_loglik`, mean log-probability
    per token where the labels differ in token count) is the prediction; ``generated`` (the grade of the
    generated answer) is kept in the detail as ``generated_pred`` / ``generated_passed``."""
    labels = [str(x) for x in row["labels"]]
    if len(scores) != len(labels):
        raise ValueError(f"{row['id']}: {len(scores)} scores for {len(labels)} labels")
    pred = labels[pick_by_loglik(scores, normalise=True)]
    gold = generated.detail["gold"]
    ok = pred == gold
    return Grade(score=1.0 if ok else 0.0, passed=ok, grader="classification",
                 detail={"gold": gold, "pred": pred, "scoring": "loglik",
                         "normalised": len({n for _, n in scores}) > 1,
                         "loglik": [[round(float(x), 4), int(n)] for x, n in scores],
                         "generated_pred": generated.detail["pred"], "generated_passed": generated.passed})


def _pick(seq: Sequence[Any], n: int, seed: int) -> list[Any]:
    idx = sorted(random.Random(seed).sample(range(len(seq)), min(n, len(seq))))
    return [seq[i] for i in idx]


def evaluate_answers(cfg: Config, rows: Sequence[dict[str, Any]], answers: dict[str, list[str]],
                     judge: LLMProvider | None = None, *, model_refs: dict[str, str] | None = None,
                     judge_factory: Callable[[], LLMProvider] | None = None,
                     conversations: dict[str, Sequence[Any]] | None = None,
                     fewshot_ids: Sequence[list[str]] | None = None,
                     loglik: dict[str, Sequence[Any]] | None = None,
                     train_rows: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Grade every arm's answers (``answers[arm][i]`` for ``rows[i]``, each row with a ``split``) and
    build the report dict.

    ``loglik[arm][i]``: the label scores of a classification item (``generate_arms``' ``loglik``); where
    given, the item's score is the log-likelihood choice (:func:`grade_by_loglik`) and the generated
    answer's grade stays in its detail. ``train_rows``: the training split, for the ``majority`` arm (the
    most frequent training label of the item's category, on every classification item) and the class prior.

    ``conversations[arm][i]`` is the prompt an arm saw (hashed into ``prompt_hash``; default the row's
    messages) and ``fewshot_ids[i]`` the exemplars of the few-shot arm. ``judge`` is used when some
    score rests on it (open_qa, judge_all, pairwise); ``judge_factory`` creates one lazily when ``judge``
    is None.
    """
    ev = cfg.evaluate
    arms = [a for a in ARMS if a in answers]
    model_refs = model_refs or {a: a for a in arms}
    rubric = load_prompt(RUBRIC_PROMPT)
    records: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        g = primary_grader(row)
        for m in arms:
            prompt = conversations[m][i] if conversations else (row.get("messages") or [row["question"]])
            rec = {"split": row.get("split", "test"), "id": row["id"], "group_id": row.get("group_id") or row["id"],
                   "category": row["category"], "task_type": row["task_type"], "model": m,
                   "model_ref": model_refs[m], "grader": g, "answer": answers[m][i], "reference": row["answer"],
                   "prompt_hash": sha256_text(dumps(prompt))[:12],
                   "seed": ev.seed, "temperature": ev.temperature, "max_new_tokens": ev.max_new_tokens,
                   "judge": None, "_row": row}
            if m == "fewshot" and fewshot_ids is not None:
                rec["fewshot_ids"] = list(fewshot_ids[i])
            if g != "judge":
                grade = grade_programmatic(row, answers[m][i], ev.rel_tolerance)
                scores = (loglik or {}).get(m)
                if g == "classification" and scores is not None and scores[i] and row.get("labels"):
                    grade = grade_by_loglik(row, scores[i], grade)
                elif g == "classification":
                    grade = Grade(grade.score, grade.passed, grade.grader, {**grade.detail, "scoring": "generated"})
                rec.update(score=grade.score, passed=grade.passed, unparsable=False, detail=grade.detail)
            records.append(rec)

    to_judge = [r for r in records if r["grader"] == "judge" or ev.judge_all]
    numeric_recs = [r for r in records if r["grader"] == "numeric"]
    judged_ids = {id(r) for r in to_judge}
    kappa_recs = ([r for r in numeric_recs if id(r) in judged_ids]
                  or _pick(numeric_recs, ev.selfcheck_samples, ev.seed))
    needs_judge = bool(to_judge) or ev.pairwise
    judge_info: dict[str, Any] = {"used": needs_judge}
    pairwise_rows: list[dict[str, Any]] = []
    if needs_judge:
        judge = judge or (judge_factory() if judge_factory else None)
        if judge is None:
            raise ValueError("evaluation needs an LLM judge but none was given")
        before = judge.usage.snapshot() if hasattr(judge.usage, "snapshot") else None
        kw = {"seed": ev.seed, "max_tokens": ev.judge_max_tokens, "pass_score": ev.judge_pass_score}
        extra = [r for r in kappa_recs if id(r) not in judged_ids]
        batch = to_judge + extra
        grades = judge_answers(judge, [JudgeItem.from_row(r["_row"], r["answer"], key=f"{r['id']}:{r['model']}")
                                       for r in batch], prompt=rubric, desc="judge answers", **kw)
        if before is not None:  # a dead judge is a failed evaluation, not a column of zeros
            check_failure_rate("evaluate (judge)", judge, before, cfg.llm.max_failure_rate)
        for r, gr in zip(batch, grades, strict=True):
            r["judge"] = {"score": gr.score, "passed": gr.passed, "unparsable": gr.unparsable, **gr.detail}
            if r["grader"] == "judge":
                r.update(score=gr.score, passed=gr.passed, unparsable=gr.unparsable, detail={})
        test_rows = [r for r in rows if r.get("split", "test") == "test"]
        check = selfcheck(judge, test_rows, n=ev.selfcheck_samples, seed=ev.seed, prompt=rubric,
                          max_tokens=ev.judge_max_tokens, pass_score=ev.judge_pass_score)
        kappas = {"numeric grader": agreement([r["judge"]["passed"] for r in kappa_recs],
                                              [r["passed"] for r in kappa_recs])}
        if ev.calibration_file:
            kappas["human labels"] = _calibration(cfg, judge, rubric)
        judge_info.update(provider=judge.name, model=judge.model, prompt=rubric.ref, selfcheck=check,
                          kappas=kappas, **reliability(check, kappas, min_accuracy=ev.judge_min_accuracy,
                                                       min_kappa=ev.judge_min_kappa))
        if ev.pairwise:
            pairwise_rows = _pairwise(cfg, judge, rows, answers, judge_all=ev.judge_all)
            judge_info["pairwise_prompt"] = load_prompt(PAIRWISE_PROMPT).ref
        judge_info["usage"] = judge.usage.as_dict()

    majority = majority_labels(train_rows or [])
    for r in [r for r in records if r["grader"] == "classification" and r["model"] == arms[0]]:
        row = r["_row"]
        if row["category"] not in majority:
            continue
        label = majority[row["category"]]["majority"]
        grade = grade_classification(label, row["answer"], row.get("labels"))
        records.append({**{k: r[k] for k in ("split", "id", "group_id", "category", "task_type", "grader", "reference",
                                             "seed", "_row")},
                        "model": MAJORITY, "model_ref": "majority label of the train split", "answer": label,
                        "prompt_hash": None, "judge": None, "score": grade.score, "passed": grade.passed,
                        "unparsable": False, "detail": {**grade.detail, "scoring": "constant"}})
    for r in records:
        r.pop("_row")
    records.sort(key=lambda r: (r["split"], r["category"], r["id"], r["model"]))
    summary = aggregate(records, n_boot=ev.bootstrap_samples, seed=ev.seed)
    judged_cats = sorted({(r["split"], r["category"]) for r in records if r["grader"] == "judge"})
    graders: dict[str, set[str]] = {}
    for r in records:
        graders.setdefault(f"{r['split']}/{r['category']}", set()).add(r["grader"])
    return {
        "models": model_refs,
        "arms": arms,
        "counts": _counts(records),
        "summary": summary,
        "graders": {k: "+".join(sorted(v)) for k, v in sorted(graders.items())},
        "classification": _classification(records, [*arms, MAJORITY]),
        "macro_f1": macro_f1_report(records, n_boot=ev.bootstrap_samples, seed=ev.seed, prior=majority),
        "judge": judge_info,
        "rests_on_judge": [f"{s}/{c}" for s, c in judged_cats] + (["pairwise"] if pairwise_rows else []),
        "pairwise": _pairwise_summary(pairwise_rows) if pairwise_rows else None,
        "pairwise_items": pairwise_rows,
        "items": records,
    }


def _counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in records:
        if r["model"] != "base":
            continue
        out.setdefault(r["split"], {}).setdefault(r["category"], 0)
        out[r["split"]][r["category"]] += 1
    unparsable = sum(bool(r.get("unparsable")) for r in records)
    return {"items": out, "unparsable_judge": unparsable}


def _classification(records: list[dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Per ``split/category`` and arm: accuracy, macro-F1, confusion matrix and the collapse flag of the
    headline predictions (log-likelihood where scored), and under ``generated`` the same for the
    generated answers."""
    out: dict[str, Any] = {}
    for key in sorted({(r["split"], r["category"]) for r in records if r["grader"] == "classification"}):
        for m in arms:
            rs = [r for r in records if (r["split"], r["category"]) == key and r["model"] == m]
            if not rs:
                continue
            gold = [r["detail"]["gold"] for r in rs]
            pred = [r["detail"]["pred"] for r in rs]
            met = {**classification_metrics(gold, pred), **collapse(pred, gold),
                   "scoring": rs[0]["detail"].get("scoring", "generated")}
            if any("generated_pred" in r["detail"] for r in rs):
                gen = [r["detail"].get("generated_pred", r["detail"]["pred"]) for r in rs]
                met["generated"] = {**classification_metrics(gold, gen), **collapse(gen, gold)}
            out.setdefault(f"{key[0]}/{key[1]}", {})[m] = met
    return out


def macro_f1_report(records: Sequence[dict[str, Any]], *, n_boot: int, seed: int,
                    prior: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per ``split/category`` of classification items: macro-F1 of every arm (``base``, ``fewshot``,
    ``tuned``, ``majority``) with a clustered (``group_id``) bootstrap 95% CI, the paired differences
    ``tuned_minus_{base,fewshot,majority}``, the collapse flag per arm, and ``claims``: whether each of
    tuned's gains may count (never when tuned collapsed) and is supported (CI above 0).

    An arm missing from the records has ``mean``/``ci`` None; ``prior`` (:func:`training.graders.majority_labels`)
    adds the category's class prior and majority label from the train split."""
    out: dict[str, Any] = {}
    for split, cat in sorted({(r["split"], r["category"]) for r in records if r["grader"] == "classification"}):
        rs = [r for r in records if (r["split"], r["category"]) == (split, cat) and r["grader"] == "classification"]
        by = {m: {r["id"]: r for r in rs if r["model"] == m} for m in F1_ARMS}
        present = [m for m in F1_ARMS if by[m]]
        ids = sorted(set.intersection(*(set(by[m]) for m in present)))
        first = by[present[0]]
        gold = [first[i]["detail"]["gold"] for i in ids]
        groups = [str(first[i].get("group_id") or i) for i in ids]
        preds = {m: [by[m][i]["detail"]["pred"] for i in ids] for m in present}
        f1 = macro_f1_cis(gold, preds, groups, n_boot=n_boot, seed=group_seed(seed, split, cat, "macro_f1"),
                          diffs=F1_DIFFS)
        flags = {m: collapse(preds[m], gold)["collapsed"] for m in present}
        entry: dict[str, Any] = {
            "n": len(ids), "n_groups": len(set(groups)), "labels": sorted(set(gold)),
            "scoring": {m: by[m][ids[0]]["detail"].get("scoring", "generated") for m in present} if ids else {},
            **{m: f1.get(m, {"mean": None, "ci": None}) for m in F1_ARMS},
            **{d: f1[d] for d in F1_DIFFS},
            "collapse": {m: flags.get(m) for m in F1_ARMS},
            "majority_label": (prior or {}).get(cat, {}).get("majority"),
            "class_prior": (prior or {}).get(cat, {}).get("prior"),
        }
        entry["claims"] = {d: {"counts": not flags.get("tuned", False),
                               "supported": bool(not flags.get("tuned", False) and f1[d]["ci"] is not None
                                                 and f1[d]["ci"][0] > 0)} for d in F1_DIFFS}
        out[f"{split}/{cat}"] = entry
    return out


def _calibration(cfg: Config, judge: LLMProvider, rubric) -> dict[str, Any]:
    path = cfg.paths.resolve(cfg.evaluate.calibration_file)
    rows = read_jsonl(path)
    items = [JudgeItem(question=r["question"], reference=r.get("reference", r.get("reference_answer", "")),
                       answer=r["answer"], context=r.get("context", "") if isinstance(r.get("context"), str)
                       else "", key=f"calibration:{i}") for i, r in enumerate(rows)]
    grades = judge_answers(judge, items, prompt=rubric, seed=cfg.evaluate.seed,
                           max_tokens=cfg.evaluate.judge_max_tokens, pass_score=cfg.evaluate.judge_pass_score,
                           desc="judge calibration")
    human = [bool(r.get("label", r.get("pass"))) for r in rows]
    return agreement([g.passed for g in grades], human)


def _pairwise(cfg: Config, judge: LLMProvider, rows: Sequence[dict[str, Any]], answers: dict[str, list[str]],
              judge_all: bool) -> list[dict[str, Any]]:
    idx = [i for i, r in enumerate(rows) if judge_all or primary_grader(r) == "judge"]
    items = [JudgeItem.from_row(rows[i], "", key=rows[i]["id"]) for i in idx]
    res = judge_pairwise(judge, items, [answers["base"][i] for i in idx], [answers["tuned"][i] for i in idx],
                         seed=cfg.evaluate.seed, max_tokens=cfg.evaluate.judge_max_tokens)
    for i, r in zip(idx, res, strict=True):
        r.update(split=rows[i].get("split", "test"), id=rows[i]["id"], category=rows[i]["category"])
    return res


def _pairwise_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in rows:
        for key in (f"{r['split']}/{r['category']}", f"{r['split']}/overall"):
            c = out.setdefault(key, {"n": 0, "tuned": 0, "base": 0, "tie": 0, "unparsable": 0})
            c["n"] += 1
            c[r["outcome"]] += 1
    for c in out.values():
        c["tuned_win_rate"] = c["tuned"] / c["n"]
        c["base_win_rate"] = c["base"] / c["n"]
    return out


# ----------------------------------------------------------------------------- the stage
def run_evaluate(cfg: Config, inputs: Inputs, out: Path, judge: LLMProvider | None = None, *,
                 generator: Generator | None = None) -> EvaluateManifest:
    """Evaluate base zero-shot, base few-shot and the trained adapter; returns the manifest (with
    ``table_rows`` and report paths)."""
    from training.generate import LOGLIK, fewshot_messages, generate_arms, prompt_messages
    from training.report import classification_rows, plot_scores, render_markdown, table_rows

    ev = cfg.evaluate
    rows, ds_hash = load_split_rows(inputs["format"], "test"), manifest_hash(inputs["format"])
    rows = [{**r, "split": "test"} for r in select_items(rows, ev.max_items)]
    if ev.gold_file:
        rows += [{**r, "split": "gold"} for r in sorted(load_gold(cfg.paths.resolve(ev.gold_file)),
                                                         key=lambda r: r["id"])]
    if not rows:
        raise ValueError(f"no test items in {inputs['format'] / 'test.parquet'}")
    test_set_counts: dict[str, Any] = {}
    for spec in ev.test_sets:
        ext, test_set_counts[test_set_name(spec)] = load_test_set(cfg, spec)
        rows += ext
    adapter_dir = inputs["train"]
    system = load_prompt(cfg.format.system_prompt).render() if cfg.format.system_prompt else None
    zero_shot = [prompt_messages(r, system) for r in rows]
    conversations: dict[str, list[Any]] = {"base": zero_shot}
    shots: list[list[str]] | None = None
    # exemplars and the majority label come from train only, never from test
    train = load_split_rows(inputs["format"], "train")
    if ev.fewshot_k > 0:
        picked = [fewshot_exemplars(r, train, ev.fewshot_k, ev.seed) for r in rows]
        shots = [[t["id"] for t in p] for p in picked]
        conversations["fewshot"] = [fewshot_messages(r, p, system) for r, p in zip(rows, picked, strict=True)]
    conversations["tuned"] = zero_shot
    log.info("evaluate: %d items (%s), arms %s: base %s, adapter %s", len(rows),
             ", ".join(f"{s}={sum(r['split'] == s for r in rows)}" for s in dict.fromkeys(r["split"] for r in rows)),
             "/".join(conversations), cfg.model.name_or_path, adapter_dir)
    if judge is None and (ev.judge_all or ev.pairwise or any(r.get("task_type") == "open_qa" for r in rows)):
        from datagen.llm import probe_provider

        judge = probe_provider(cfg, ev.judge_provider)  # a missing key or dead judge fails before generation
    from datagen.llm import configured_cache

    # classification items are also scored by label log-likelihood, in every arm
    choices = [list(r["labels"]) if r.get("task_type") == "classification" and r.get("labels") else None
               for r in rows]
    adapter_hash = manifest_hash(adapter_dir)
    answers = dict((generator or generate_arms)(
        cfg.model, adapter_dir, conversations, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
        batch_size=ev.batch_size, seed=ev.seed, cache=configured_cache(cfg),
        choices=choices if any(choices) else None, run_cfg=cfg.run, scratch=out / ".shards",
        key=f"{ds_hash}|{adapter_hash}"))
    loglik = answers.pop(LOGLIK, None)
    refs = {"base": cfg.model.name_or_path, "fewshot": f"{cfg.model.name_or_path} ({ev.fewshot_k}-shot)",
            "tuned": f"{cfg.model.name_or_path}+{adapter_dir.name}"}
    refs = {a: refs[a] for a in conversations}

    def factory() -> LLMProvider:
        from datagen.llm import get_provider

        return get_provider(cfg, ev.judge_provider)

    result = evaluate_answers(cfg, rows, answers, judge, model_refs=refs, judge_factory=factory,
                              conversations=conversations, fewshot_ids=shots, loglik=loglik, train_rows=train)
    result["fewshot"] = {"k": ev.fewshot_k, "split": "train"}
    result["test_sets"] = test_set_counts

    out.mkdir(parents=True, exist_ok=True)
    items = result.pop("items")
    write_jsonl(out / "items.jsonl", items)
    report = {"run": ev.run_name, "config": cfg.dump_public()["evaluate"], **result}
    rows_t = table_rows(report)
    write_json(out / "report.json", report)
    plot_scores(report, out / "scores.png")
    atomic_write_text(out / "report.md", render_markdown(report))
    judge_info = result["judge"]
    prompts = [load_prompt(RUBRIC_PROMPT).ref] if judge_info["used"] else []
    if result["pairwise"]:
        prompts.append(load_prompt(PAIRWISE_PROMPT).ref)
    manifest = EvaluateManifest(
        config_hash=STAGE.config_hash(cfg),
        upstream={"format": ds_hash, "train": adapter_hash},
        prompts=prompts,
        counts=result["counts"],
        models=refs,
        judge={k: judge_info.get(k) for k in ("used", "provider", "model", "reliable", "reasons")},
        rests_on_judge=result["rests_on_judge"],
        llm_usage=judge_info.get("usage", {}),
        table_rows=rows_t,
        classification_rows=classification_rows(report),
        report_md=str(out / "report.md"),
        report_json=str(out / "report.json"),
        scores_png=str(out / "scores.png"),
        items_jsonl=str(out / "items.jsonl"),
    )
    executor.clear(out / ".shards")  # the report is written: its shards are done with
    return write_manifest(out, manifest)


STAGE = StageSpec("evaluate", run_evaluate, __name__, ("evaluate", "llm", "model", "format.system_prompt"),
                  upstream=("format", "train"),
                  prompts=lambda c: ("judge_rubric", "judge_pairwise", "sft_user", c.format.system_prompt),
                  providers=lambda c: (c.evaluate.judge_provider,),
                  input_files=lambda c: tuple(p for p in (c.evaluate.gold_file, c.evaluate.calibration_file) if p)
                  + tuple(s.path for s in c.evaluate.test_sets),
                  folder=report_dir,
                  manifest=EvaluateManifest)
