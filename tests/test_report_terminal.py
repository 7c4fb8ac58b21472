"""What a person reads in the terminal (issue 47): the printed score tables fit 120 columns, and categories
with fewer than 5 test items are one line."""

from __future__ import annotations

import random
from pathlib import Path

from training.aggregate import aggregate
from training.report import MIN_ITEMS, TERMINAL_WIDTH, examples_text, scores_text, table_rows

# the demo's shape: two large categories and nine with 1-2 items, some with long names
SIZES = {"table_lookup_close_price_last_row": 12, "sentiment_financial_phrasebank_headlines": 10,
         "credit_risk_expected_loss_given_default": 2, "market_risk_value_at_risk_historical": 1,
         "regulatory_capital_basel_iii_leverage_ratio": 2, "liquidity_coverage_ratio_stress": 1,
         "fx_crisis_scenario_emerging_markets_contagion": 1, "real_estate_correction_scenario_reit": 2,
         "commodity_shock_scenario_oil_supply_disruption": 1, "interest_rate_risk_duration_convexity": 2,
         "liquidity_squeeze_scenario_money_market_funds": 1}


def realistic_report() -> dict:
    rng = random.Random(0)
    items = []
    for cat, n in SIZES.items():
        for i in range(n):
            for arm in ("base", "fewshot", "tuned"):
                score = rng.random()
                items.append({"split": "test", "id": f"{cat}-{i}", "group_id": f"{cat}-{i // 2}", "category": cat,
                              "model": arm, "score": score, "passed": score > 0.5})
    graders = {f"test/{cat}": ("classification" if cat.startswith("sentiment") else
                               "numeric" if cat.startswith("table") else "extractive+judge") for cat in SIZES}
    f1 = {"mean": 0.41, "ci": [0.12, 0.73]}
    diff = {"mean": -0.12, "ci": [-0.45, 0.21]}
    return {"run": "demo-a-rather-long-evaluation-run-name", "arms": ["base", "fewshot", "tuned"],
            "summary": aggregate(items, n_boot=50, seed=0), "graders": graders,
            "judge": {"used": True, "reliable": False, "provider": "judge", "model": "packaged:gemma3-270m",
                      "reasons": ["self-check accuracy 0.50 < 0.80 (passes references 0.00, fails mismatches "
                                  "1.00, unparsable 0)", "kappa vs numeric grader 0.00 < 0.40 (n=12)"]},
            "rests_on_judge": [k for k, g in graders.items() if "judge" in g],
            "macro_f1": {"test/sentiment_financial_phrasebank_headlines": {
                "n": 10, "n_groups": 5, "scoring": {"base": "loglik", "fewshot": "loglik", "tuned": "loglik"},
                "base": f1, "fewshot": f1, "tuned": f1, "majority": f1, "tuned_minus_base": diff,
                "tuned_minus_fewshot": diff, "tuned_minus_majority": diff,
                "collapse": {"tuned": True}}}}


def test_printed_tables_fit_120_columns_and_fold_small_categories(tmp_path: Path):
    report = realistic_report()
    text = scores_text(tmp_path / "report.json", report)
    widest = max(text.splitlines(), key=len)
    assert len(widest) <= TERMINAL_WIDTH, widest
    small = sum(n < MIN_ITEMS for n in SIZES.values())
    assert f"{small} categories with < 5 items each: see report.md" in text
    assert "table_lo..._last_row" in text and "credit_risk" not in text  # long names cut in the middle
    assert "overall (micro)" in text and "overall (macro)" in text
    assert "UNRELIABLE" in text and "(!)" in text  # the judge's verdict and its mark survive
    # the table is all there, only shorter: every shown category's tuned - base with its CI
    row = next(r for r in table_rows(report) if r["category"] == "table_lookup_close_price_last_row")
    assert f"{row['tuned_minus_base_mean']:+.2f} [{row['tuned_minus_base_lo']:+.2f}, " in text


def test_example_answers_fit_too():
    long = "94.53 USD: the Close column of the last row (2024-09-03)." * 5
    items = [{"split": "test", "id": "q1", "model": arm, "category": "table_lookup_close_price_last_row",
              "grader": "numeric", "reference": long, "answer": long, "score": s}
             for arm, s in (("base", 0.0), ("fewshot", 0.0), ("tuned", 1.0))]
    text = examples_text(items, {"q1": "What was the close on the last row of the table? " * 6})
    assert max(map(len, text.splitlines())) <= TERMINAL_WIDTH


def test_finsynth_run_ends_with_the_scores_and_paths_not_json(tmp_path, monkeypatch, capfd):
    """``finsynth run`` ends as the deployment does (tables, answers, paths); its JSON goes to a file, and to
    stdout only with ``--json`` (the flow itself is stubbed: its ending is what is tested)."""
    import json

    import flows.cli as cli
    from datagen.io import write_json

    report_dir = tmp_path / "data" / "reports" / "demo"
    report_dir.mkdir(parents=True)
    write_json(report_dir / "report.json", realistic_report())
    result = {"profile": "demo", "executed": ["evaluate"], "cached": ["fetch"], "stages": [],
              "adapter": str(tmp_path / "adapter"), "report": str(report_dir / "report.md"),
              "dataset_card": str(tmp_path / "dataset" / "README.md")}
    monkeypatch.setattr(cli, "_run_flow", lambda args: result)
    assert cli.main(["run", "--profile", "demo", "--root", str(tmp_path)]) == 0
    out = capfd.readouterr().out
    assert "Mean score per category" in out and "Outputs:" in out and "stages run: evaluate; cached: fetch" in out
    assert not any(line.startswith(("{", "}", '  "')) for line in out.splitlines())
    assert max(len(line) for line in out.splitlines() if str(tmp_path) not in line) <= TERMINAL_WIDTH  # paths run on
    saved = next(line.split("run summary (JSON)", 1)[1].strip() for line in out.splitlines()
                 if "run summary (JSON)" in line)
    assert json.loads(Path(saved).read_text()) == result
    assert cli.main(["run", "--profile", "demo", "--root", str(tmp_path), "--json"]) == 0
    assert json.loads(capfd.readouterr().out) == result
