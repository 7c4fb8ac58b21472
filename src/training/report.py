"""The evaluation report: table rows, Markdown, the per-category bar chart, and ``finsynth scores``.

Three arms (base zero-shot, base few-shot, tuned) and two paired differences (tuned - base,
tuned - few-shot) per category; a report without the few-shot arm (``evaluate.fewshot_k: 0``) shows
neither its column nor ``tuned - few-shot``.

Everything here reads the report dict that :func:`training.evaluate.run_evaluate` writes to
``report.json``; nothing recomputes scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datagen.config import Config
from datagen.io import atomic_path, read_json
from datagen.render import md_cell, md_code, md_text, one_line, plot_text, text_table
from training.aggregate import ARMS, DIFFS, F1_ARMS, F1_DIFFS, MAJORITY

ARM_LABELS = {"base": "base zero-shot", "fewshot": "base few-shot", "tuned": "tuned"}
DIFF_LABELS = {"tuned_minus_base": "tuned - base", "tuned_minus_fewshot": "tuned - few-shot"}


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def _arms(report: dict[str, Any]) -> list[str]:
    return [a for a in ARMS if a in report.get("arms", ARMS)]


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per (split, category) plus overall micro and macro: what a Prefect table shows.

    Per arm (``base``, ``fewshot``, ``tuned``) and paired difference (``tuned_minus_base``,
    ``tuned_minus_fewshot``): ``<key>_mean``, ``<key>_lo``, ``<key>_hi`` (95% CI) and ``<key>_pass``;
    the differences also ``<key>_pass_lo`` / ``<key>_pass_hi``. An arm not evaluated has ``None``.
    """
    unreliable = report["judge"].get("used") and not report["judge"].get("reliable", False)
    rows = []
    for split, summ in report["summary"].items():
        groups = [(cat, summ["categories"][cat], report["graders"].get(f"{split}/{cat}", ""))
                  for cat in summ["categories"]]
        graders = {g for k, v in report["graders"].items() if k.startswith(f"{split}/") for g in v.split("+")}
        groups += [("overall (micro)", summ["overall"], "+".join(sorted(graders))),
                   ("overall (macro)", {**summ["macro"], "n": summ["overall"]["n"],
                                        "n_groups": summ["overall"]["n_groups"]}, "+".join(sorted(graders)))]
        for cat, entry, grader in groups:
            row: dict[str, Any] = {"split": split, "category": cat, "grader": grader,
                                   "n": entry["n"], "n_groups": entry["n_groups"]}
            for key in (*ARMS, *DIFFS):
                st = entry[key]
                row[f"{key}_mean"] = _r(st["mean"])
                row[f"{key}_lo"], row[f"{key}_hi"] = [_r(x) for x in (st["ci"] or (None, None))]
                row[f"{key}_pass"] = _r(st["pass_rate"])
                if key in DIFFS:
                    row[f"{key}_pass_lo"], row[f"{key}_pass_hi"] = [_r(x) for x in (st["pass_ci"] or (None, None))]
            row["rests_on_judge"] = "judge" in grader
            row["judge_unreliable"] = bool(unreliable and "judge" in grader)
            flags = ((report.get("macro_f1") or {}).get(f"{split}/{cat}") or {}).get("collapse") or {}
            row["collapsed"] = ", ".join(m for m in ARMS if flags.get(m))  # classification: see classification_rows
            rows.append(row)
    return rows


def _fmt(mean: float | None, lo: float | None = None, hi: float | None = None, signed: bool = False) -> str:
    if mean is None:
        return "-"
    f = "{:+.2f}" if signed else "{:.2f}"
    return f.format(mean) + (f" [{f.format(lo)}, {f.format(hi)}]" if lo is not None else "")


def _score_grid(rows: list[dict[str, Any]], arms: list[str] | tuple[str, ...], cell: Any, *,
                with_pass: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the score table; ``cell`` renders a string from data (Markdown or terminal)."""
    diffs = [d for d, (_, other) in DIFFS.items() if other in arms]
    head = (["split", "category", "grader", "n (groups)"] + [f"{ARM_LABELS[a]} [95% CI]" for a in arms]
            + [f"{DIFF_LABELS[d]} [95% CI]" for d in diffs]
            + ([f"pass: {' / '.join(ARM_LABELS[a] for a in arms)}"] if with_pass else []))
    body = []
    for r in rows:
        grader = cell(r["grader"]) + (" (!)" if r["judge_unreliable"] else "")
        cells = [cell(r["split"]), cell(r["category"]), grader, f"{r['n']} ({r['n_groups']})"]
        cells += [_fmt(r[f"{a}_mean"], r[f"{a}_lo"], r[f"{a}_hi"]) for a in arms]
        cells += [_fmt(r[f"{d}_mean"], r[f"{d}_lo"], r[f"{d}_hi"], signed=True) for d in diffs]
        if with_pass:
            cells.append(" / ".join(_fmt(r[f"{a}_pass"]) for a in arms))
        body.append(cells)
    return head, body


def markdown_table(rows: list[dict[str, Any]], arms: list[str] | tuple[str, ...] = ARMS) -> str:
    head, body = _score_grid(rows, arms, md_cell)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


TERMINAL_WIDTH = 120  # what the printed tables fit
MIN_ITEMS = 5  # a category with fewer test items is one of the folded line's count in a terminal table
SHORT_ARM = {"base": "zero-shot", "fewshot": "few-shot", "tuned": "tuned", MAJORITY: "majority"}
OVERALL = ("overall (micro)", "overall (macro)")


def _fold(rows: list[dict[str, Any]], min_n: int) -> tuple[list[dict[str, Any]], str]:
    """The rows a terminal table shows (overall rows and categories with >= ``min_n`` items) and the line
    that counts the rest (\"\" when none is folded)."""
    keep = [r for r in rows if r["category"] in OVERALL or r["n"] >= min_n]
    folded = len(rows) - len(keep)
    if not folded:
        return keep, ""
    what = "category" if folded == 1 else "categories"
    each = "" if folded == 1 else " each"
    return keep, f"{folded} {what} with < {min_n} items{each}: see report.md"


def _fit(head: list[str], body: list[list[str]], width: int, shrink: int, right: tuple[int, ...]) -> str:
    """:func:`text_table` with column ``shrink`` (the category) cut in the middle (``...``) until the table is at most
    ``width`` columns wide (to 12 characters at the least)."""
    table = text_table(head, body, right=right)
    over = max(map(len, table.splitlines())) - width
    if over > 0:
        widest = max(len(one_line(r[shrink])) for r in [head, *body])
        cap = max(12, widest - over)
        head_n = (cap - 3) // 2  # cut in the middle: names that share a start keep their different ends
        body = [[(c if len(c) <= cap else c[:head_n] + "..." + c[len(c) - (cap - 3 - head_n):]) if i == shrink else c
                 for i, c in enumerate(map(one_line, r))] for r in body]
        table = text_table(head, body, right=right)
    return table


def text_score_table(rows: list[dict[str, Any]], arms: list[str] | tuple[str, ...] = ARMS, *,
                     width: int = TERMINAL_WIDTH, min_n: int = MIN_ITEMS) -> str:
    """The score table for a terminal, at most ``width`` columns: each arm's mean, the paired differences
    with their 95% CIs (each arm's CI and the pass rates: report.md, ``finsynth scores --markdown``). The split
    column only when there are several; categories with fewer than ``min_n`` items folded into one line
    under the table; category names cut to fit. ``(!)`` marks a grader that rests on a judge that failed its
    self-check."""
    shown, folded = _fold(rows, min_n)
    splits = len({r["split"] for r in rows}) > 1
    diffs = [d for d, (_, other) in DIFFS.items() if other in arms]
    head = (["split"] if splits else []) + ["category", "grader", "n (groups)"] + [SHORT_ARM[a] for a in arms]
    head += [DIFF_LABELS[d] for d in diffs]  # with their 95% CIs (the heading says so)
    body = []
    for r in shown:
        grader = "all" if r["category"] in OVERALL else one_line(r["grader"])
        cells = ([one_line(r["split"])] if splits else []) + [
            one_line(r["category"]), grader + (" (!)" if r["judge_unreliable"] else ""), f"{r['n']} ({r['n_groups']})"]
        cells += [_fmt(r[f"{a}_mean"]) for a in arms]
        cells += [_fmt(r[f"{d}_mean"], r[f"{d}_lo"], r[f"{d}_hi"], signed=True) for d in diffs]
        body.append(cells)
    first = int(splits)
    table = _fit(head, body, width, first, tuple(range(first + 2, len(head))))
    return table + (f"\n{folded}" if folded else "")


def judge_banner(report: dict[str, Any], *, markdown: bool = True) -> str:
    """Whether scores rest on the LLM judge and whether it passed its self-check (Markdown, or plain text
    for a terminal)."""
    j = report["judge"]
    if not j.get("used"):
        return "No score in this report rests on the LLM judge: every item was graded programmatically."
    text, code = (md_text, md_code) if markdown else (one_line, one_line)
    named = report.get("rests_on_judge") or []
    rests = ", ".join(text(x) for x in named) or "none of the headline scores"
    if not markdown and len(named) > 3:  # a terminal names a few; report.md names them all
        rests = f"{len(named)} groups, listed in report.md"
    who = code(f"{j.get('provider')}:{j.get('model')}")
    if j.get("reliable"):
        return f"The LLM judge {who} passed its self-check. Scores that rest on it: {rests}."
    reasons = "; ".join(text(x) for x in j.get("reasons") or [])
    strong, mark = ("**", "`(!)`") if markdown else ("", "(!)")
    return (f"{strong}WARNING: the LLM judge {who} is UNRELIABLE{strong} ({reasons}). Scores that rest on it "
            f"({rests}; marked {mark}) must not be trusted; treat them as placeholders until a stronger "
            f"judge passes the self-check.")


def render_markdown(report: dict[str, Any]) -> str:
    rows = table_rows(report)
    arms = _arms(report)
    j = report["judge"]
    cfg = report["config"]
    models = [f"{ARM_LABELS[a].capitalize()}: {md_code(report['models'][a])}  " for a in arms]
    fewshot = (f" Base few-shot puts {cfg.get('fewshot_k')} training exemplars of the item's category (train split, "
               "one per group, chosen by a seeded hash of ids) before the item as earlier chat turns; "
               "`tuned - few-shot` is the gain over that baseline." if "fewshot" in arms else "")
    out = [f"# Evaluation report: {md_text(report.get('run', ''))}", "", *models, "",
           judge_banner(report), "", "## Scores", "",
           "Score is in [0, 1] (numeric: fraction of expected figures found; classification: label "
           "correct; extractive: token F1 after normalisation, pass = exact match; judge: (rubric score - 1) / 4). "
           "`tuned - base` is the paired difference over the same items; an interval that excludes 0 is a "
           "difference the sample supports." + fewshot + " 95% CIs are percentile bootstrap intervals that "
           f"resample groups (`group_id`: an item with its rephrasings, questions over one document), "
           f"{cfg['bootstrap_samples']} resamples, seed {cfg['seed']}; n (groups) counts items (groups); "
           "macro = unweighted mean of categories (stratified bootstrap).", "",
           markdown_table(rows, arms), "", "![scores](scores.png)", ""]
    out += classification_section(report)
    if report.get("classification"):
        out += ["## Classification", ""]
        for key, per_model in report["classification"].items():
            for m in arms:
                c = per_model[m]
                out.append(f"- **{md_text(key)}** {ARM_LABELS[m]}: accuracy {c['accuracy']:.2f}, "
                           f"macro-F1 {c['macro_f1']:.2f}, "
                           f"confusion (gold -> pred) {md_code(c['confusion'])}")
        out.append("")
    if j.get("used"):
        sc = j.get("selfcheck") or {}
        prompt = f"{j['prompt']['name']}@{j['prompt']['hash']}"
        who = md_code(f"{j.get('provider')}:{j.get('model')}")
        out += ["## Judge self-check", "", f"Judge {who}, prompt {md_code(prompt)}.", ""]
        if sc.get("n_cases"):
            out.append(f"- On {sc['n_items']} test items it passed {sc['reference_pass_rate']:.2f} of the "
                       f"reference answers and failed {sc['mismatch_fail_rate']:.2f} of the mismatched answers "
                       f"(accuracy {sc['accuracy']:.2f}; {sc['unparsable']} unparsable verdicts).")
        for name, k in (j.get("kappas") or {}).items():
            kappa = "undefined" if k["kappa"] is None else f"{k['kappa']:.2f}"
            agree = "-" if k["agreement"] is None else f"{k['agreement']:.2f}"
            out.append(f"- Cohen's kappa vs {md_text(name)}: {kappa} (agreement {agree}, n={k['n']}).")
        for note in j.get("notes") or []:
            out.append(f"- Note: {md_text(note)}.")
        out.append(f"- Verdict: **{'reliable' if j.get('reliable') else 'UNRELIABLE'}** (thresholds: accuracy >= "
                   f"{j['thresholds']['min_accuracy']}, kappa >= {j['thresholds']['min_kappa']}).")
        out.append(f"- Unparsable judge outputs on graded items: {report['counts']['unparsable_judge']} "
                   "(counted as failures).")
        out.append("")
    if report.get("pairwise"):
        out += ["## Pairwise (judged in both orders; a flip counts as a tie)", "",
                "| group | n | tuned wins | base wins | ties | unparsable |", "|---|---|---|---|---|---|"]
        for key, c in report["pairwise"].items():
            out.append(f"| {md_cell(key)} | {c['n']} | {c['tuned']} | {c['base']} | {c['tie']} | {c['unparsable']} |")
        out.append("")
    return "\n".join(out)


def plot_scores(report: dict[str, Any], path: Path) -> None:
    """Per-category bars (mean score, 95% CI error bars), one per arm, one panel per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in table_rows(report) if r["category"] != "overall (macro)"]
    splits = sorted({r["split"] for r in rows}, key=lambda s: (s != "test", s))
    fig, axes = plt.subplots(len(splits), 1, figsize=(max(6, 1.3 * max(
        sum(r["split"] == s for r in rows) for s in splits) + 2), 3.6 * len(splits)), squeeze=False)
    for ax, split in zip(axes[:, 0], splits, strict=True):
        rs = [r for r in rows if r["split"] == split]
        x = np.arange(len(rs))
        arms = _arms(report)
        width = 0.8 / len(arms)
        colors = {"base": "#9aa5b1", "fewshot": "#e0a458", "tuned": "#2f6fb0"}
        for k, m in enumerate(arms):
            def col(key: str, rs=rs) -> np.ndarray:
                return np.array([r[key] if r[key] is not None else np.nan for r in rs], dtype=float)

            means, lo, hi = col(f"{m}_mean"), col(f"{m}_lo"), col(f"{m}_hi")
            err = np.vstack([np.clip(means - lo, 0, None), np.clip(hi - means, 0, None)])
            ax.bar(x + (k - (len(arms) - 1) / 2) * width, means, width, yerr=err, capsize=3, label=ARM_LABELS[m],
                   color=colors[m])
        labels = [plot_text(r["category"]) + (" (judge!)" if r["judge_unreliable"] else "") for r in rs]
        ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 1.2)
        ax.set_ylabel("mean score")
        ax.set_title(f"{split}: {' vs '.join(ARM_LABELS[a] for a in arms)} (95% clustered bootstrap CI)")
        ax.legend(fontsize=8, ncol=len(arms), loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def report_dir(cfg: Config) -> Path:
    """The folder the evaluate stage writes (its spec's ``folder``): ``reports_dir/<evaluate.run_name>``."""
    return cfg.paths.reports_dir / cfg.evaluate.run_name


def find_report(cfg: Config, run: str | None = None) -> Path:
    """``report.json`` of a run: a folder, a report.json path, or a run name under ``reports_dir``."""
    candidates = []
    if run is None:
        candidates.append(report_dir(cfg))
    else:
        p = Path(run)
        candidates += [p, cfg.paths.reports_dir / run]
    for c in candidates:
        if c.is_file() and c.name.endswith(".json"):
            return c
        if (c / "report.json").exists():
            return c / "report.json"
    raise FileNotFoundError(f"no evaluation report found for {run or cfg.evaluate.run_name!r} "
                            f"(looked in {', '.join(map(str, candidates))}); run `finsynth evaluate` first")


def load_report(cfg: Config, run: str | None = None) -> tuple[Path, dict[str, Any]]:
    """``(path, report)`` of a run's ``report.json`` (:func:`find_report`); one that predates the summary
    this module reads is an error naming the command that rebuilds it."""
    path = find_report(cfg, run)
    report = read_json(path)
    if any("overall" not in summ for summ in report.get("summary", {}).values()):
        raise ValueError(f"{path} was written before the few-shot arm and clustered CIs (no 'overall' "
                         "summary); rerun `finsynth evaluate` to rebuild it")
    return path, report


def scores_table(cfg: Config, run: str | None = None, fmt: str = "markdown") -> str:
    """The per-category tables of a run (``finsynth scores [RUN]``): ``text`` (aligned for a terminal,
    what the command prints), ``markdown`` (as in report.md, with pass rates) or ``json`` (the rows)."""
    path, report = load_report(cfg, run)
    if fmt == "json":
        import json

        judge = {k: report["judge"].get(k) for k in ("used", "reliable", "reasons", "provider", "model")}
        return json.dumps({"report": str(path), "run": report.get("run"), "judge": judge,
                           "scores": table_rows(report), "classification": classification_rows(report)}, indent=2)
    if fmt == "text":
        return scores_text(path, report)
    if fmt != "markdown":
        raise ValueError(f"unknown format {fmt!r}: text, markdown or json")
    return "\n".join([f"Evaluation {report.get('run', '')} ({path.parent})", "",
                      markdown_table(table_rows(report), _arms(report)), "",
                      *([classification_table(report), ""] if report.get("macro_f1") else []), judge_banner(report)])


def _wrap(text: str, width: int = TERMINAL_WIDTH) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)) or text


def scores_text(path: Path, report: dict[str, Any]) -> str:
    """The tables of a report for a terminal (at most :data:`TERMINAL_WIDTH` columns), with the judge's
    verdict."""
    return "\n".join([_wrap(f"Evaluation {one_line(report.get('run', ''))} ({path.parent})"), "",
                      _wrap("Mean score per category; the differences are paired, with 95% clustered bootstrap "
                            "CIs (each arm's CI and pass rate: report.md):"), "",
                      text_score_table(table_rows(report), _arms(report)), "",
                      *(["Classification, macro-F1 (differences with 95% CIs):", "",
                         text_classification_table(report), ""] if report.get("macro_f1") else []),
                      _wrap(judge_banner(report, markdown=False))])


def pick_examples(items: list[dict[str, Any]], n: int = 3) -> list[dict[str, dict[str, Any]]]:
    """Up to ``n`` test items to show with each arm's answer (``items.jsonl`` records, by arm): first where
    tuned scored above base few-shot (else base zero-shot), then where their answers differ, then any;
    one per category while there are other categories; in id order within each kind."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in items:
        if r.get("split", "test") == "test" and r.get("model") in ARMS:
            by.setdefault(r["id"], {})[r["model"]] = r
    full = [arms for _, arms in sorted(by.items()) if "tuned" in arms and len(arms) > 1]

    def kind(arms: dict[str, dict[str, Any]]) -> int:
        other = arms.get("fewshot") or arms.get("base")
        if (arms["tuned"].get("score") or 0) > (other.get("score") or 0):
            return 0
        return 1 if one_line(arms["tuned"].get("answer")) != one_line(other.get("answer")) else 2

    ranked = sorted(full, key=kind)
    picked: list[dict[str, dict[str, Any]]] = []
    for pass_ in range(2):  # first one per category, then fill up
        for arms in ranked:
            if len(picked) >= n:
                break
            cat = arms["tuned"].get("category")
            if arms not in picked and (pass_ or cat not in {p["tuned"].get("category") for p in picked}):
                picked.append(arms)
    return picked


def examples_text(items: list[dict[str, Any]], questions: dict[str, str], n: int = 3,
                  width: int = TERMINAL_WIDTH) -> str:
    """``n`` test questions (:func:`pick_examples`) with the reference and each arm's answer and score,
    one line each, at most ``width`` characters (answers and questions clipped)."""
    def clip(text: Any, room: int = width - 27) -> str:  # 27: the indent, the widest arm label, the score
        t = one_line(text).strip()
        return t if len(t) <= room else t[:room - 3] + "..."

    out = []
    for k, arms in enumerate(pick_examples(items, n), start=1):
        t = arms["tuned"]
        lead = f"[{k}] {one_line(t.get('category'))} ({one_line(t.get('grader'))}): "
        out.append(lead + clip(questions.get(t['id'], t['id']), max(width - len(lead), 20)))
        labels = ["reference", *(ARM_LABELS[a] for a in ARMS if a in arms)]
        w = max(len(x) for x in labels)
        out.append(f"    {'reference'.ljust(w)}  {'':5}  {clip(t.get('reference'))}")
        for a in ARMS:
            if a in arms:
                score = arms[a].get("score")
                mark = "  -  " if score is None else f"{score:5.2f}"
                out.append(f"    {ARM_LABELS[a].ljust(w)}  {mark}  {clip(arms[a].get('answer')) or '(empty)'}")
        out.append("")
    return "\n".join(out).rstrip("\n")


def run_summary_text(report_dir: Path, dataset_dir: Path | None = None, examples: int = 3) -> str:
    """What the main command prints at the end: the aligned score tables, the judge's verdict, and a
    few test questions with base and tuned answers (questions from ``<dataset_dir>/test.parquet``)."""
    path = report_dir / "report.json"
    report = read_json(path)
    parts = [scores_text(path, report)]
    items_path = report_dir / "items.jsonl"
    if examples and items_path.exists():
        from datagen.io import read_jsonl

        questions: dict[str, str] = {}
        test = dataset_dir / "test.parquet" if dataset_dir is not None else None
        if test is not None and test.exists():
            import pandas as pd

            df = pd.read_parquet(test, columns=["id", "question"])
            questions = dict(zip(df["id"].astype(str), df["question"].astype(str)))
        text = examples_text(read_jsonl(items_path), questions, examples)
        if text:
            parts += ["", _wrap(f"Test questions with each arm's answer and score (all items: {items_path}):"), "",
                      text]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- classification: macro-F1
F1_LABELS = {**ARM_LABELS, MAJORITY: "majority"}
F1_DIFF_LABELS = {**DIFF_LABELS, "tuned_minus_majority": "tuned - majority"}


def classification_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per (split, category) of classification items (``report["macro_f1"]``): ``n``,
    ``n_groups``, ``scoring`` (``loglik`` when every model arm was scored by label log-likelihood), per arm
    (``base``, ``fewshot``, ``tuned``, ``majority``) and difference (``tuned_minus_{base,fewshot,majority}``)
    ``<key>_f1``, ``<key>_f1_lo``, ``<key>_f1_hi``; ``collapsed`` (the flagged model arms, comma-joined;
    the majority baseline is constant by construction and not listed) and ``tuned_gain_counts`` (False
    when tuned collapsed: its gains count toward no claim)."""
    rows = []
    for key, e in (report.get("macro_f1") or {}).items():
        split, cat = key.split("/", 1)
        scoring = {v for m, v in (e.get("scoring") or {}).items() if m != MAJORITY}
        row: dict[str, Any] = {"split": split, "category": cat, "n": e["n"], "n_groups": e["n_groups"],
                               "scoring": "+".join(sorted(scoring)) or "-"}
        for k in (*F1_ARMS, *F1_DIFFS):
            st = e.get(k) or {}
            row[f"{k}_f1"] = _r(st.get("mean"))
            row[f"{k}_f1_lo"], row[f"{k}_f1_hi"] = [_r(x) for x in (st.get("ci") or (None, None))]
        row["collapsed"] = ", ".join(m for m in ARMS if (e.get("collapse") or {}).get(m))
        row["tuned_gain_counts"] = not (e.get("collapse") or {}).get("tuned", False)
        rows.append(row)
    return rows


def _classification_grid(report: dict[str, Any], cell: Any, strong: str) -> tuple[list[str], list[list[str]]]:
    rows = classification_rows(report)
    arms = [a for a in F1_ARMS if any(r[f"{a}_f1"] is not None for r in rows)]
    diffs = [d for d, (_, b) in F1_DIFFS.items() if b in arms]
    head = (["split", "category", "n (groups)", "scoring"] + [f"{F1_LABELS[a]} [95% CI]" for a in arms]
            + [f"{F1_DIFF_LABELS[d]} [95% CI]" for d in diffs] + ["collapsed (> 80% one label)"])
    body = []
    for r in rows:
        cells = [cell(r["split"]), cell(r["category"]), f"{r['n']} ({r['n_groups']})", r["scoring"]]
        cells += [_fmt(r[f"{a}_f1"], r[f"{a}_f1_lo"], r[f"{a}_f1_hi"]) for a in arms]
        cells += [_fmt(r[f"{d}_f1"], r[f"{d}_f1_lo"], r[f"{d}_f1_hi"], signed=True)
                  + ("" if r["tuned_gain_counts"] else " (no claim)") for d in diffs]
        cells.append(f"{strong}{r['collapsed']}{strong}" if r["collapsed"] else "-")
        body.append(cells)
    return head, body


def classification_table(report: dict[str, Any]) -> str:
    """Macro-F1 per classification category, every arm with its 95% CI, the tuned gains, and the
    collapse flags, as Markdown ("" without classification items)."""
    if not classification_rows(report):
        return ""
    head, body = _classification_grid(report, md_cell, "**")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def text_classification_table(report: dict[str, Any], *, width: int = TERMINAL_WIDTH, min_n: int = MIN_ITEMS) -> str:
    """Macro-F1 per classification category for a terminal ("" without classification items), at most
    ``width`` columns: each arm's macro-F1, ``tuned - base`` and ``tuned - few-shot`` with their 95% CIs,
    a ``*`` on a collapsed category with a line under the table (every CI and ``tuned - majority``: report.md).
    Categories with fewer than ``min_n`` items folded into one line, as in :func:`text_score_table`."""
    rows = classification_rows(report)
    if not rows:
        return ""
    shown, folded = _fold(rows, min_n)
    splits = len({r["split"] for r in rows}) > 1
    arms = [a for a in F1_ARMS if any(r[f"{a}_f1"] is not None for r in rows)]
    diffs = [d for d, (_, b) in DIFFS.items() if b in arms]
    scoring = {r["scoring"] for r in rows}
    head = (["split"] if splits else []) + ["category", "n (groups)"] + (["scoring"] if len(scoring) > 1 else [])
    head += [SHORT_ARM[a] for a in arms] + [F1_DIFF_LABELS[d] for d in diffs]
    body, collapsed = [], []
    for r in shown:
        mark = " *" if r["collapsed"] else ""
        cells = ([one_line(r["split"])] if splits else []) + [one_line(r["category"]) + mark,
                                                              f"{r['n']} ({r['n_groups']})"]
        cells += [r["scoring"]] if len(scoring) > 1 else []
        cells += [_fmt(r[f"{a}_f1"]) for a in arms]
        cells += [_fmt(r[f"{d}_f1"], r[f"{d}_f1_lo"], r[f"{d}_f1_hi"], signed=True) for d in diffs]
        body.append(cells)
        if r["collapsed"]:
            collapsed.append(f"{one_line(r['category'])}: {r['collapsed']}"
                             + ("" if r["tuned_gain_counts"] else " (tuned's gains: no claim)"))
    first = int(splits)
    # every category folded: the line that says so, without an empty table's header
    table = _fit(head, body, width, first, tuple(range(first + 1, len(head)))) if body else ""
    notes = [folded, f"scoring: {scoring.pop()}" if len(scoring) == 1 else ""]
    notes += [f"* collapsed (> 80% one label): {c}" for c in collapsed]
    return "\n".join([table] * bool(table) + [_wrap(x, width) for x in notes if x])


def classification_section(report: dict[str, Any]) -> list[str]:
    """The report's macro-F1 section (Markdown lines; none without classification items)."""
    table = classification_table(report)
    if not table:
        return []
    return ["## Classification: macro-F1", "",
            "Each arm's label on a classification item is the one whose continuation it finds most likely "
            "among the item's labels (`scoring: loglik`; mean log-probability per token where the labels differ "
            "in token count), so an answer in another format is not a miss; the generated answer's label is "
            "kept in `items.jsonl` (`generated_pred`) and in `report.json` "
            "(`classification.<key>.<arm>.generated`). `majority` answers the train split's most "
            "frequent label of the category on every item. Macro-F1 averages per-label F1; CIs resample "
            "groups, and the differences are paired (the same draws for both arms). An arm that puts more than "
            "80% of a category's predictions on one label (with at least 2 gold labels) is flagged as "
            "**collapsed**; a collapsed tuned arm's gains count toward no claim (`no claim`).", "", table, ""]
