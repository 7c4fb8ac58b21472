"""Programmatic graders: figure extraction, numeric grading, label normalisation, classification metrics."""

from __future__ import annotations

import pytest

from training import graders
from training.graders import (
    NONE_LABEL,
    SPAN_MAX_TOKENS,
    classification_metrics,
    expected_values,
    extract_figures,
    grade_classification,
    grade_extractive,
    grade_numeric,
    normalise_answer,
    normalise_label,
    span_answers,
    token_f1,
)


@pytest.mark.parametrize("text, expected", [
    ("Return was -3.2% over the window", [(-3.2, "%")]),
    ("ACME fell 3.2% over ten days", [(-3.2, "%")]),
    ("a decline of about 4.1 pct", [(-4.1, "%")]),
    ("(3.2%)", [(-3.2, "%")]),
    ("\u22121.5%", [(-1.5, "%")]),
    ("+2.5%", [(2.5, "%")]),
    ("12.5 percent", [(12.5, "%")]),
    ("up 40 basis points", [(40.0, "bp")]),
    ("125 bps", [(125.0, "bp")]),
    ("revenue of $1.5bn", [(1.5e9, "USD")]),
    ("1,234,567.5 USD", [(1234567.5, "USD")]),
    ("US$ 45", [(45.0, "USD")]),
    ("EUR 2.3m", [(2.3e6, "CUR")]),
    ("250k shares", [(250000.0, "")]),
    ("3x leverage", [(3.0, "x")]),
    ("close 101.25 on day 10", [(101.25, ""), (10.0, "")]),
])
def test_extract_figures(text, expected):
    got = extract_figures(text)
    assert [f.unit for f in got] == [u for _, u in expected]
    assert [f.value for f in got] == pytest.approx([v for v, _ in expected])


def test_extract_figures_dates_do_not_make_negatives():
    # "2024-01-02": the hyphens are separators, not minus signs
    assert [f.value for f in extract_figures("on 2024-01-02")] == [2024.0, 1.0, 2.0]


def test_grade_numeric_signs_units_and_tolerance():
    exp = [{"name": "return", "value": -3.2, "unit": "%"}, {"name": "close", "value": 101.25, "unit": "USD"}]
    g = grade_numeric("It fell 3.2% to $101.25.", exp, rel_tol=0.01)
    assert (g.score, g.passed, g.grader) == (1.0, True, "numeric")
    assert [m["found"] for m in g.detail["matches"]] == ["3.2%", "$101.25"]
    # sign wrong: the return is not matched, the close is
    g = grade_numeric("It rose 3.2% to 101.25", exp, rel_tol=0.01)
    assert (g.score, g.passed) == (0.5, False)
    # within 1% relative (101.9 vs 101.25 is 0.64%); 102.5 is 1.2% off
    assert grade_numeric("-3.2%, 101.9", exp, rel_tol=0.01).score == 1.0
    assert grade_numeric("-3.2%, 102.5", exp, rel_tol=0.01).score == 0.5
    assert grade_numeric("-3.2%, 102.5", exp, rel_tol=0.02).score == 1.0


def test_grade_numeric_does_not_credit_an_answer_that_lists_the_table(monkeypatch):
    """A base model that copies the price table states every cell, the asked one among them: that is not a
    look-up. Only the figures an answer states first (as many as expected, plus two for its reasoning) and
    last count; dates are not figures here. Found in the demo: base few-shot answers that were the table
    passed their look-ups."""
    table = ("| Date | Open | High | Low | Close | Volume |\n|---|---|---|---|---|---|\n"
             "| 2024-08-27 | 100.40 | 101.02 | 99.91 | 100.35 | 2113570 |\n"
             "| 2024-08-28 | 100.00 | 100.17 | 99.82 | 100.05 | 2605678 |\n| 2024-")
    low = [{"name": "low", "value": 99.82, "unit": "USD"}]
    g = grade_numeric(table, low, rel_tol=0.0001)
    assert not g.passed and g.detail["n_figures_in_answer"] > g.detail["n_figures_graded"]
    # the same figure stated first, with its date and reasoning, passes; so does a result stated last
    for answer in ("99.82 USD: the Low column of the last row (2024-08-28).",
                   "On 2024-08-28 the low was 99.82 USD, against a high of 100.17 and a close of 100.05.",
                   "Open 100.00, high 100.17, close 100.05; the low was 99.82"):
        assert grade_numeric(answer, low, rel_tol=0.0001).passed, answer
    # the market references (every numeric type) score what they scored when every figure counted
    from datagen.config import MarketConfig
    from datagen.sources.market import simulate
    from datagen.sources.market_qa import build_market_qa

    mc = MarketConfig(questions_per_type=8)
    rows = [r for r in build_market_qa(simulate(mc.simulator), mc) if r["task_type"] == "numeric_qa"]
    assert len({r["category"] for r in rows}) == 6
    for r in rows:
        meta = r["metadata"]
        label = (meta["answer_label"], meta["answer_choices"]) if meta.get("answer_label") else None
        now = grade_numeric(r["answer"], meta["answer_values"], 0.01, label=label).score
        with monkeypatch.context() as m:
            m.setattr(graders, "STATED_SLACK", 1000)
            assert now == grade_numeric(r["answer"], meta["answer_values"], 0.01, label=label).score, r["answer"]


def test_a_copied_figure_is_graded_exactly():
    """A look-up's answer is a cell of the table, shown to the cent: a neighbouring cell within the 1%
    tolerance (the high for the low on a calm day) is a wrong answer. The market generator marks such
    values ``exact``; computed figures keep the relative tolerance."""
    from datagen.config import MarketConfig
    from datagen.sources.market import simulate
    from datagen.sources.market_qa import build_market_qa

    mc = MarketConfig(questions_per_type={"latest_value": 8, "period_return": 2}, window_days=5)
    rows = build_market_qa(simulate(mc.simulator), mc)
    for r in rows:
        (v,) = r["metadata"]["answer_values"]
        shown = r["answer"].split(" ")[0]
        if r["category"] == "market_price_lookup":
            assert v["exact"] and float(shown) == v["value"], r["answer"]
            assert grade_numeric(shown, [v], 0.01).passed
            off = float(shown) * 1.004 if v["unit"] != "shares" else float(shown) + 1
            assert not grade_numeric(f"{off:.2f}", [v], 0.01).passed, (shown, off)
        else:
            assert "exact" not in v and grade_numeric(f"{v['value'] * 1.005:.4f}%", [v], 0.01).passed


def test_grade_numeric_percent_forms():
    exp = [{"name": "vol", "value": 12.5, "unit": "%"}]
    for answer in ("12.5%", "12.5 percent", "1250 bp", "0.125", "12.50"):
        assert grade_numeric(answer, exp, 0.001).passed, answer
    for answer in ("12.5 bp", "$12.5", "13%", "no figure"):
        assert not grade_numeric(answer, exp, 0.001).passed, answer


def test_grade_numeric_scaled_currency_and_zero():
    exp = [{"name": "rev", "value": 1.5e9, "unit": "USD"}]
    assert grade_numeric("$1.5bn", exp, 0.01).passed
    assert grade_numeric("1,500,000,000 dollars", exp, 0.01).passed
    assert grade_numeric("1.5 billion", exp, 0.01).passed
    assert not grade_numeric("$1.5m", exp, 0.01).passed
    zero = [{"name": "chg", "value": 0.0, "unit": "%"}]
    assert grade_numeric("unchanged at 0.0%", zero, 0.01).passed
    assert not grade_numeric("0.1%", zero, 0.01).passed


def test_grade_numeric_three_values_partial_score():
    exp = [{"name": "a", "value": 1.0, "unit": ""}, {"name": "b", "value": 2.0, "unit": ""},
           {"name": "c", "value": 3.0, "unit": ""}]
    g = grade_numeric("a=1, c=3", exp, 0.0)
    assert g.score == pytest.approx(2 / 3)
    assert not g.passed
    assert grade_numeric("", exp, 0.0).score == 0.0
    assert grade_numeric("anything", [], 0.01).passed is False


def test_expected_values_falls_back_to_reference_figures():
    row = {"answer": "The drawdown was -12.4% and the close $88.10.", "metadata": {}}
    assert expected_values(row) == [{"name": "ref0", "value": -12.4, "unit": "%"},
                                    {"name": "ref1", "value": 88.1, "unit": "USD"}]
    row = {"answer": "x", "metadata": {"answer_values": [{"name": "r", "value": 1.0, "unit": "%"}]}}
    assert expected_values(row) == [{"name": "r", "value": 1.0, "unit": "%"}]


@pytest.mark.parametrize("answer, expected", [
    ("Positive", "positive"),
    ("positive.", "positive"),
    ("  NEGATIVE!! ", "negative"),
    ("Bullish", "positive"),
    ("The outlook is bearish given the drawdown", "negative"),
    ("Sentiment: neutral; not positive", "neutral"),
    ("I cannot tell", None),
])
def test_normalise_label_sentiment(answer, expected):
    assert normalise_label(answer, ["positive", "negative", "neutral"]) == expected


def test_normalise_label_prefers_longest_at_same_position():
    labels = ["low", "high", "very high"]
    assert normalise_label("Very high risk.", labels) == "very high"
    assert normalise_label("Risk: high", labels) == "high"
    assert normalise_label("elevated", ["low", "medium", "high"]) == "high"
    assert normalise_label("Bullish", ["buy", "sell"]) is None  # synonym target not an allowed label


def test_grade_classification():
    g = grade_classification("Medium risk.", "medium", ["low", "medium", "high"])
    assert (g.score, g.passed, g.detail) == (1.0, True, {"gold": "medium", "pred": "medium"})
    g = grade_classification("no idea", "medium", ["low", "medium", "high"])
    assert (g.score, g.passed, g.detail["pred"]) == (0.0, False, NONE_LABEL)
    g = grade_classification("Low", "medium", None)  # no label set: only the reference is allowed
    assert g.passed is False


def test_classification_metrics_exact():
    gold = ["pos", "pos", "pos", "neg", "neg", "neu"]
    pred = ["pos", "pos", "neg", "neg", None, "pos"]
    m = classification_metrics(gold, pred)
    # pos: tp2 fp1 fn1 -> p=r=f1=2/3; neg: tp1 fp1 fn1 -> 1/2; neu: tp0 -> 0
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["per_class"]["pos"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["neg"]["f1"] == pytest.approx(0.5)
    assert m["per_class"]["neu"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert m["confusion"] == {"neg": {"<none>": 1, "neg": 1}, "neu": {"pos": 1}, "pos": {"neg": 1, "pos": 2}}
    sk = pytest.importorskip("sklearn.metrics")
    assert m["macro_f1"] == pytest.approx(sk.f1_score(gold, [p or "<none>" for p in pred],
                                                      labels=["neg", "neu", "pos"], average="macro"))


# ----------------------------------------------------------------------------- extractive (SQuAD / TAT-QA)
@pytest.mark.parametrize("text, expected", [
    ("The Federal Reserve.", "federal reserve"),
    ("  an   Apple, Inc. ", "apple inc"),
    ("A-shares", "ashares"),
    ("THE end", "end"),
    ("", ""),
])
def test_normalise_answer_squad_style(text, expected):
    assert normalise_answer(text) == expected


def test_token_f1_exact_values():
    assert token_f1("the Federal Reserve", "Federal Reserve") == 1.0
    # pred tokens {federal, reserve, bank}, gold {federal, reserve}: p = 2/3, r = 1 -> f1 = 0.8
    assert token_f1("Federal Reserve Bank", "federal reserve") == pytest.approx(0.8)
    assert token_f1("European Central Bank", "federal reserve") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # repeated tokens count once each (multiset overlap, as SQuAD)
    assert token_f1("bank bank", "bank") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_grade_extractive_single_span():
    g = grade_extractive("The Federal Reserve.", ["Federal Reserve"])
    assert (g.score, g.passed, g.grader) == (1.0, True, "extractive")
    assert g.detail["em"] is True and g.detail["f1"] == 1.0
    g = grade_extractive("It was the Federal Reserve Bank", ["Federal Reserve"])
    assert g.passed is False and g.detail["em"] is False
    # pred {it, was, federal, reserve, bank}: p = 2/5, r = 1 -> f1 = 4/7
    assert g.score == pytest.approx(4 / 7)
    assert grade_extractive("", ["Federal Reserve"]).score == 0.0


def test_grade_extractive_list_answer_aligns_spans():
    gold = ["credit risk", "market risk"]
    g = grade_extractive("Market risk; credit risk", gold)
    assert (g.score, g.passed) == (1.0, True)
    g = grade_extractive("credit risk and market risk", gold)
    assert (g.score, g.passed) == (1.0, True)
    # one of two spans right, nothing else: mean over max(2 gold, 1 pred) aligned spans = 1/2
    g = grade_extractive("credit risk", gold)
    assert (g.score, g.passed) == (0.5, False)
    # a wrong extra span costs: 2 right of 3 predicted -> 2/3
    g = grade_extractive("credit risk, market risk, liquidity", gold)
    assert g.score == pytest.approx(2 / 3) and g.passed is False
    # partial spans: "credit" vs "credit risk" f1 = 2/3, "market risk" exact -> (2/3 + 1) / 2
    g = grade_extractive("credit; market risk", gold)
    assert g.score == pytest.approx((2 / 3 + 1) / 2)
    assert g.detail["pred_spans"] == ["credit", "market risk"]


def test_span_answers_decides_when_the_extractive_grader_applies():
    def row(answer, task_type="open_qa", **meta):
        return {"task_type": task_type, "answer": answer, "metadata": meta}

    assert span_answers(row("Federal Reserve")) == ["Federal Reserve"]
    assert span_answers(row("2019; 2021", answer_spans=["2019", "2021"])) == ["2019", "2021"]
    assert span_answers(row("x", answer_spans=["credit risk", "market risk"])) == ["credit risk", "market risk"]
    long = "Net interest margins widen at first as asset yields reprice faster than deposits."
    assert span_answers(row(long)) is None  # a long open answer stays with the judge
    assert span_answers(row(" ".join(["w"] * SPAN_MAX_TOKENS))) is not None
    assert span_answers(row(" ".join(["w"] * (SPAN_MAX_TOKENS + 1)))) is None
    assert span_answers(row("-3.2%")) is None  # a figure: extractive normalisation would drop its sign
    assert span_answers(row("$1.5bn")) is None and span_answers(row("x", answer_spans=["1", "-2%"])) is None
    assert span_answers(row("2019")) == ["2019"]  # bare digits survive normalisation as they are
    assert span_answers(row("high", task_type="classification")) is None
    assert span_answers(row("")) is None


def test_numeric_grader_reads_figures_with_the_one_number_parser():
    from datagen.numbers import find_numbers

    text = "Revenue rose to ¥500 while EUR 2.3m was lost and margins fell 3.2 pp; close $88.10 on 2024-01-02."
    got = extract_figures(text)
    ref = find_numbers(text, directional=True, skip_dates=False)
    assert [f.value for f in got] == pytest.approx([float(f.value) for f in ref])
    assert [f.unit for f in got] == ["CUR", "CUR", "%", "USD", "", "", ""]
    # a yen figure is not a dollar figure (the grader's own regex read "¥500" as a plain 500)
    assert not grade_numeric("¥500", [{"name": "px", "value": 500.0, "unit": "USD"}], 0.01).passed
    assert grade_numeric("$500", [{"name": "px", "value": 500.0, "unit": "USD"}], 0.01).passed


def _trend_row(label: str) -> dict:
    return {"task_type": "numeric_qa", "answer": f"{label.capitalize()}: ...", "labels": None,
            "metadata": {"answer_label": label, "answer_choices": ["above", "below", "equal to"],
                         "answer_values": [{"name": "latest_close", "value": 104.5, "unit": "USD"},
                                           {"name": "sma_5", "value": 103.2, "unit": "USD"}]}}


def test_numeric_items_with_a_label_grade_the_label_too():
    """An above/below (or which-ticker) question answered with the wrong side is not right because its
    figures are: the label counts as one more expected element."""
    from training.evaluate import grade_programmatic

    row = _trend_row("above")
    right = grade_programmatic(row, "Above: the latest close 104.50 is above the SMA, 103.20.", 0.01)
    wrong = grade_programmatic(row, "Below: the latest close 104.50 is below the SMA, 103.20.", 0.01)
    assert right.passed and right.score == 1.0
    assert not wrong.passed and wrong.score == pytest.approx(2 / 3)
    assert wrong.detail["label"] == {"gold": "above", "pred": "below"}
    only_label = grade_programmatic(row, "Above.", 0.01)
    assert only_label.score == pytest.approx(1 / 3) and not only_label.passed
    tie = {"task_type": "numeric_qa", "answer": "Neither: ...",
           "metadata": {"answer_label": "tie", "answer_choices": ["AAA", "BBB", "tie"],
                        "answer_values": [{"name": "difference", "value": 0.0, "unit": "pp"}]}}
    assert grade_programmatic(tie, "Neither: a difference of 0 percentage points.", 0.01).passed
    assert not grade_programmatic(tie, "AAA, by 0 percentage points.", 0.01).passed


def test_market_trend_and_comparison_rows_name_their_answer_choices():
    from datagen.config import MarketConfig
    from datagen.sources.market import simulate
    from datagen.sources.market_qa import build_market_qa

    mc = MarketConfig(questions_per_type=4)
    rows = build_market_qa(simulate(mc.simulator), mc)
    seen = set()
    for r in rows:
        m = r["metadata"]
        if m["question_type"] == "ma_trend":
            assert m["answer_choices"] == ["above", "below", "equal to"] and m["answer_label"] in m["answer_choices"]
            seen.add("trend")
        if m["question_type"] == "comparison":
            assert m["answer_choices"] == [*m["window"]["tickers"], "tie"] and m["answer_label"] in m["answer_choices"]
            seen.add("cmp")
    assert seen == {"trend", "cmp"}
