"""The evaluation report: table rows, Markdown, the per-category bar chart, and ``finsynth scores``.

Everything here reads the report dict that :func:`training.evaluate.run_evaluate` writes to
``report.json``; nothing recomputes scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datagen.config import Config
from datagen.io import atomic_path, read_json

MODELS = ("base", "tuned")


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


def table_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per (split, category) plus overall micro and macro: what a Prefect table shows."""
    unreliable = report["judge"].get("used") and not report["judge"].get("reliable", False)
    rows = []
    for split, summ in report["summary"].items():
        groups = [(cat, summ["categories"][cat], report["graders"].get(f"{split}/{cat}", ""))
                  for cat in summ["categories"]]
        graders = {report["graders"][k] for k in report["graders"] if k.startswith(f"{split}/")}
        groups += [("overall (micro)", summ["micro"], "+".join(sorted(graders))),
                   ("overall (macro)", summ["macro"], "+".join(sorted(graders)))]
        for cat, entry, grader in groups:
            row: dict[str, Any] = {"split": split, "category": cat, "grader": grader,
                                   "n": entry["base"]["n"] or entry["tuned"]["n"]}
            for m in (*MODELS, "diff"):
                s = entry[m]
                row[f"{m}_mean"] = _r(s["mean"])
                row[f"{m}_mean_lo"], row[f"{m}_mean_hi"] = [_r(x) for x in (s["mean_ci"] or (None, None))]
                row[f"{m}_pass"] = _r(s["pass_rate"])
                row[f"{m}_pass_lo"], row[f"{m}_pass_hi"] = [_r(x) for x in (s["pass_ci"] or (None, None))]
            row["rests_on_judge"] = "judge" in grader
            row["judge_unreliable"] = bool(unreliable and "judge" in grader)
            rows.append(row)
    return rows


def _ci(row: dict[str, Any], key: str) -> list[float] | None:
    lo, hi = row[f"{key}_lo"], row[f"{key}_hi"]
    return None if lo is None else [lo, hi]


def _fmt(mean: float | None, ci: list[float] | None, signed: bool = False) -> str:
    if mean is None:
        return "-"
    m = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return f"{m} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if (ci and signed) else (f"{m} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else m)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| split | category | grader | n | base score [95% CI] | tuned score [95% CI] | "
            "tuned - base [95% CI] | base pass | tuned pass | pass diff [95% CI] |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        grader = r["grader"] + (" (!)" if r["judge_unreliable"] else "")
        lines.append(
            f"| {r['split']} | {r['category']} | {grader} | {r['n']} | "
            f"{_fmt(r['base_mean'], _ci(r, 'base_mean'))} | {_fmt(r['tuned_mean'], _ci(r, 'tuned_mean'))} | "
            f"{_fmt(r['diff_mean'], _ci(r, 'diff_mean'), signed=True)} | "
            f"{_fmt(r['base_pass'], None)} | {_fmt(r['tuned_pass'], None)} | "
            f"{_fmt(r['diff_pass'], _ci(r, 'diff_pass'), signed=True)} |")
    return "\n".join(lines)


def judge_banner(report: dict[str, Any]) -> str:
    j = report["judge"]
    if not j.get("used"):
        return "No score in this report rests on the LLM judge: every item was graded programmatically."
    rests = ", ".join(report.get("rests_on_judge") or []) or "none of the headline scores"
    who = f"`{j.get('provider')}:{j.get('model')}`"
    if j.get("reliable"):
        return f"The LLM judge {who} passed its self-check. Scores that rest on it: {rests}."
    reasons = "; ".join(j.get("reasons") or [])
    return (f"**WARNING: the LLM judge {who} is UNRELIABLE** ({reasons}). Scores that rest on it "
            f"({rests}; marked `(!)`) must not be trusted; treat them as placeholders until a stronger "
            f"judge passes the self-check.")


def render_markdown(report: dict[str, Any]) -> str:
    rows = table_rows(report)
    j = report["judge"]
    out = [f"# Evaluation report: {report.get('run', '')}", "",
           f"Base: `{report['models']['base']}`  ", f"Tuned: `{report['models']['tuned']}`", "",
           judge_banner(report), "", "## Scores", "",
           "Score is in [0, 1] (numeric: fraction of expected figures found; classification: label "
           "correct; judge: (rubric score - 1) / 4). `tuned - base` is the paired difference over the same "
           "items; an interval that excludes 0 is a difference the sample supports. 95% CIs are percentile "
           f"bootstrap over items ({report['config']['bootstrap_samples']} resamples, seed "
           f"{report['config']['seed']}); macro = unweighted mean of categories (stratified bootstrap).", "",
           markdown_table(rows), "", "![scores](scores.png)", ""]
    if report.get("classification"):
        out += ["## Classification", ""]
        for key, per_model in report["classification"].items():
            for m in MODELS:
                c = per_model[m]
                out.append(f"- **{key}** {m}: accuracy {c['accuracy']:.2f}, macro-F1 {c['macro_f1']:.2f}, "
                           f"confusion (gold -> pred) `{c['confusion']}`")
        out.append("")
    if j.get("used"):
        sc = j.get("selfcheck") or {}
        prompt = f"{j['prompt']['name']}@{j['prompt']['hash']}"
        out += ["## Judge self-check", "", f"Judge `{j.get('provider')}:{j.get('model')}`, prompt `{prompt}`.", ""]
        if sc.get("n_cases"):
            out.append(f"- On {sc['n_items']} test items it passed {sc['reference_pass_rate']:.2f} of the "
                       f"reference answers and failed {sc['mismatch_fail_rate']:.2f} of the mismatched answers "
                       f"(accuracy {sc['accuracy']:.2f}; {sc['unparsable']} unparsable verdicts).")
        for name, k in (j.get("kappas") or {}).items():
            kappa = "undefined" if k["kappa"] is None else f"{k['kappa']:.2f}"
            agree = "-" if k["agreement"] is None else f"{k['agreement']:.2f}"
            out.append(f"- Cohen's kappa vs {name}: {kappa} (agreement {agree}, n={k['n']}).")
        for note in j.get("notes") or []:
            out.append(f"- Note: {note}.")
        out.append(f"- Verdict: **{'reliable' if j.get('reliable') else 'UNRELIABLE'}** (thresholds: accuracy >= "
                   f"{j['thresholds']['min_accuracy']}, kappa >= {j['thresholds']['min_kappa']}).")
        out.append(f"- Unparsable judge outputs on graded items: {report['counts']['unparsable_judge']} "
                   "(counted as failures).")
        out.append("")
    if report.get("pairwise"):
        out += ["## Pairwise (judged in both orders; a flip counts as a tie)", "",
                "| group | n | tuned wins | base wins | ties | unparsable |", "|---|---|---|---|---|---|"]
        for key, c in report["pairwise"].items():
            out.append(f"| {key} | {c['n']} | {c['tuned']} | {c['base']} | {c['tie']} | {c['unparsable']} |")
        out.append("")
    return "\n".join(out)


def plot_scores(report: dict[str, Any], path: Path) -> None:
    """Per-category bars (mean score, 95% CI error bars), base vs tuned, one panel per split."""
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
        for k, (m, color) in enumerate((("base", "#9aa5b1"), ("tuned", "#2f6fb0"))):
            means = np.array([r[f"{m}_mean"] if r[f"{m}_mean"] is not None else np.nan for r in rs])
            lo = np.array([r[f"{m}_mean_lo"] if r[f"{m}_mean_lo"] is not None else np.nan for r in rs])
            hi = np.array([r[f"{m}_mean_hi"] if r[f"{m}_mean_hi"] is not None else np.nan for r in rs])
            err = np.vstack([np.clip(means - lo, 0, None), np.clip(hi - means, 0, None)])
            ax.bar(x + (k - 0.5) * 0.38, means, 0.38, yerr=err, capsize=3, label=m, color=color)
        labels = [r["category"] + (" (judge!)" if r["judge_unreliable"] else "") for r in rs]
        ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 1.2)
        ax.set_ylabel("mean score")
        ax.set_title(f"{split}: base vs tuned (95% bootstrap CI)")
        ax.legend(fontsize=8, ncol=2, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def find_report(cfg: Config, run: str | None = None) -> Path:
    """``report.json`` of a run: a folder, a report.json path, or a run name under ``reports_dir``."""
    candidates = []
    if run is None:
        candidates.append(cfg.paths.reports_dir / cfg.evaluate.run_name)
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


def scores_table(cfg: Config, run: str | None = None) -> str:
    """The per-category table for the terminal (``finsynth scores [RUN]``)."""
    path = find_report(cfg, run)
    report = read_json(path)
    return "\n".join([f"Evaluation {report.get('run', '')} ({path.parent})", "",
                      markdown_table(table_rows(report)), "", judge_banner(report)])
