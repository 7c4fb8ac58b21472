"""The one number parser: scale words, units, accounting negatives, lists of spans."""

from __future__ import annotations

import pytest

from datagen.numbers import answer_values, find_numbers, format_number, number_keys, parse_number


@pytest.mark.parametrize("text, value, unit", [
    ("14.16 percent", 14.16, "%"),
    ("14.16 per cent", 14.16, "%"),
    ("12%", 12.0, "%"),
    ("12.5 %.", 12.5, "%"),
    ("-7 million", -7_000_000.0, ""),
    ("$1.2bn", 1_200_000_000.0, "USD"),
    ("US$ 5 million", 5_000_000.0, "USD"),
    ("EUR 3.5bn", 3_500_000_000.0, "EUR"),
    ("5 million dollars", 5_000_000.0, "USD"),
    ("1.2 billion USD", 1_200_000_000.0, "USD"),
    ("(3.4)", -3.4, ""),
    ("(3.4%)", -3.4, "%"),
    ("$(3.4) million", -3_400_000.0, "USD"),
    ("1,234.5", 1234.5, ""),
    ("-$5", -5.0, "USD"),
    ("\u22122.5 pp", -2.5, "pp"),
    ("2.5 percentage points", 2.5, "pp"),
    ("25 basis points", 25.0, "bp"),
    ("about 5.2x", 5.2, "x"),
    ("0.5", 0.5, ""),
    ("45", 45.0, ""),
    ("Rs. 500 crore", 5_000_000_000.0, "INR"),
    ("\u20ac12k", 12_000.0, "EUR"),
])
def test_parse_number(text, value, unit):
    f = parse_number(text)
    assert f is not None, text
    assert (f.value, f.unit) == (value, unit)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "inf", "1,23", "(3.4", "3 months", "positive", "", "12 and 13",
                                  "2024-01-02", "USD"])
def test_not_one_number(text):
    assert parse_number(text) is None


def test_numbers_pass_through_and_non_finite_does_not():
    assert parse_number(45).value == 45.0 and parse_number(2.5).value == 2.5
    assert parse_number(float("nan")) is None and parse_number(float("inf")) is None and parse_number(True) is None


def test_answer_values_single_and_list():
    assert answer_values("14.16 percent") == [{"name": "answer", "value": 14.16, "unit": "%"}]
    assert answer_values(["-7 million", "(3.4)"]) == [
        {"name": "answer_1", "value": -7e6, "unit": ""}, {"name": "answer_2", "value": -3.4, "unit": ""}]
    assert answer_values(["12%"]) == [{"name": "answer", "value": 12.0, "unit": "%"}]
    assert answer_values(["12%", "Revenue"]) is None and answer_values([]) is None
    assert answer_values("It rose sharply.") is None


def test_find_numbers_in_text():
    text = "On 2024-01-02 revenue rose 12% to $1.2bn, and costs fell by 3.4 million (note 5)."
    assert [(f.value, f.unit) for f in find_numbers(text)] == [
        (12.0, "%"), (1.2e9, "USD"), (3.4e6, ""), (5.0, "")]
    assert [f.value for f in find_numbers(text, directional=True)][2] == -3.4e6
    assert [f.text for f in find_numbers("a loss of (3.4) and 1,234.5 units")] == ["(3.4)", "1,234.5"]
    # dates are not figures unless asked
    assert [f.value for f in find_numbers("2024-01-02", skip_dates=False)][0] == 2024.0


def test_number_keys_canonical():
    assert number_keys("$1.2bn vs 1,200,000,000 USD vs 12.50%") == ["1200000000USD", "1200000000USD", "12.5%"]
    assert format_number(1200.0) == "1200" and format_number(12.5) == "12.5"


def test_figures_say_how_they_were_written():
    text = "Revenue fell (3.4%) to -$1.2bn, up +5bp, and 12 pp; TRY 5bn, BRL 50m, 7 US dollar; try 5 times"
    got = [(f.value, f.unit, f.sign, f.written, f.scale, f.currency, f.is_percent, f.negative)
           for f in find_numbers(text)]
    assert got == [(-3.4, "%", "()", 3.4, 1, "", True, True),
                   (-1.2e9, "USD", "-", 1.2, 10**9, "USD", False, True),
                   (5.0, "bp", "+", 5.0, 1, "", False, False),
                   (12.0, "pp", "", 12.0, 1, "", True, False),
                   (5e9, "TRY", "", 5.0, 10**9, "TRY", False, False),
                   (5e7, "BRL", "", 50.0, 10**6, "BRL", False, False),
                   (7.0, "USD", "", 7.0, 1, "USD", False, False),
                   (5.0, "", "", 5.0, 1, "", False, False)]  # "try" in lower case is a word, not TRY
    assert all(text[f.start:f.end] == f.text for f in find_numbers(text))
    assert [f.sign for f in find_numbers("sales fell 3% and rose 2%", directional=True)] == ["down", ""]
    assert parse_number(-5).sign == "-" and parse_number(-5).written == 5.0


@pytest.mark.parametrize("text, values", [
    ("100% - 40% - 30%", [100.0, 40.0, 30.0]),  # arithmetic
    ("12 - 5 = 7", [12.0, 5.0, 7.0]),
    ("from 2017 \u2013 2018", [2017.0, 2018.0]),  # a range
    ("(12) - 5", [-12.0, 5.0]),
    ("a change of - 3.2%", [-3.2]),  # a sign: no figure before it
    ("2.9% -1.2%", [2.9, -1.2]),  # attached: a sign
])
def test_a_spaced_minus_after_a_figure_is_an_operator(text, values):
    assert [f.value for f in find_numbers(text)] == values


def test_figure_search_near_digits_finds_what_trying_every_position_finds():
    """find_numbers starts its regex search just before each digit instead of at every position; on
    random text built from what figures are made of (parentheses, signs, currency codes and symbols,
    scale words, long runs of spaces, dates) it must return the same matches as ``finditer``."""
    import random

    from datagen import numbers as N

    parts = list("0123456789 ()-−–+$€£¥₹.,%xkmb\n\t\xa0ae") + [
        "US$", "USD", "usd", "Rs.", "Rs", "EUR", "BRL", "TRY", "try", "million", "bn", "percentage points",
        "per cent", "dollars", "2024-01-02", "1/2/2024", " - ", "down ", "fell by ", "     ", "abc", "x7"]
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 25)))
        want = [(m.span(), m.groupdict()) for m in N._FIGURE.finditer(text)]
        assert [(m.span(), m.groupdict()) for m in N._figure_matches(text)] == want, repr(text)
