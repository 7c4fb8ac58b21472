"""Strings from data (categories, source names, cluster names) are untrusted: the dataset card, the
evaluation report, the model card, the sweep table and the card's UI artifact keep every table's columns
and show those strings as text, with no HTML element made from them.

Each rendered Markdown is put through a real CommonMark + GFM-table renderer (markdown-it-py, raw HTML
on, as in a browser that shows the artifact) and the HTML is checked: every row has as many cells as
its header, there is no ``script`` element and no element with an ``on*`` attribute, and the hostile
string (on one line) is in the page's text. The browser test (tests/test_ui_browser.py) checks the same
in the Prefect UI.
"""

from __future__ import annotations

import copy
import json
import re

import pytest

from datagen.dataset.card import build_card, parse_card
from datagen.io import write_json, write_manifest
from datagen.manifest import AugmentManifest, FetchManifest, FormatManifest, TrainManifest
from html_check import Page

CAT = "banking | retail\n<script>alert('cat')</script> `x`"
SRC = "evil|source\n<img src=x onerror=alert('src')>"
SCEN = "rates <b>up</b> | [click](javascript:alert(1))"


def one_line(s: str) -> str:
    return " ".join(s.split("\n"))


def render(md: str) -> Page:
    from markdown_it import MarkdownIt

    return Page(MarkdownIt("commonmark", {"html": True}).enable("table").render(md))


def assert_safe(md: str, *shown: str) -> Page:
    page = render(md)
    for i, table in enumerate(page.tables):
        widths = {n for _, n in table}
        assert len(widths) == 1, f"table {i} has rows of {sorted(widths)} cells: {table}"
    assert "script" not in [t for t, _ in page.tags], "a script element"
    assert not page.handler_elements(), f"elements with event handlers: {page.handler_elements()}"
    assert not [a for t, a in page.tags if t == "a" and "javascript:" in a.get("href", "")], "a javascript: link"
    text = re.sub(r"\s+", " ", "".join(page.text))
    for s in shown:
        assert re.sub(r"\s+", " ", s) in text, f"{s!r} not shown as text"
    return page


# ----------------------------------------------------------------------------- the dataset card
SUMMARY = {
    "stage": "format", "config_hash": "fmt123", "model": "packaged:gemma3-270m", "max_tokens": 768,
    "long_context": "drop", "fingerprint": "0123456789ab", "splits": ["train", "validation", "test"],
    "counts": {"train": 8, "validation": 1, "test": 1},
    "data": {
        "by_task_type": {"train": {"numeric_qa": 8}, "validation": {"numeric_qa": 1}, "test": {"numeric_qa": 1}},
        "by_source": {"train": {SRC: 8}, "validation": {SRC: 1}, "test": {"plain": 1}},
        "by_category": {"train": {CAT: 8}, "validation": {CAT: 1}, "test": {"returns": 1}},
        "by_cluster": {"train": {CAT: 5, SCEN: 3}, "validation": {CAT: 1}, "test": {SCEN: 1}},
        "groups": {"train": 8, "validation": 1, "test": 1},
    },
    "sources_emptied": [SRC],
}


def test_card_tables_keep_their_columns_with_hostile_names(demo_cfg):
    sd = demo_cfg.paths.stage_dir("split")
    write_json(sd / "clusters.json", {"cluster_by": "category", "clusters": [
        {"name": CAT, "source": "category"}, {"name": SCEN, "source": "scenario <i>x</i>"}]})
    write_manifest(demo_cfg.paths.stage_dir("fetch"), FetchManifest.from_json({
        "stage": "fetch", "config_hash": "f1", "counts": {"per_source": {SRC: 12, "plain": 3}},
        "quarantine": {"total": 0}}))
    write_manifest(demo_cfg.paths.stage_dir("augment"), AugmentManifest.from_json({
        "stage": "augment", "config_hash": "a1", "llm_usage": {"local|<x>": {"model": "m`1`", "calls": 1}}}))
    card = build_card(demo_cfg, FormatManifest.from_json(copy.deepcopy(SUMMARY)),
                      {n: demo_cfg.paths.stage_dir(n) for n in ("fetch", "augment", "split")})
    meta, body = parse_card(card)
    page = assert_safe(body, one_line(CAT), one_line(SRC), one_line(SCEN))
    # the sources table: header + 2 sources; the cluster table: header + 2 clusters, 5 columns each
    widths = [(len(t), t[0][1]) for t in page.tables]
    assert (3, 5) in widths and (3, 5) in widths[widths.index((3, 5)) + 1:], widths
    # front matter: the source slugged into source_datasets, and valid YAML
    assert meta["source_datasets"] == ["extended|evil-source-img-src-x-onerror-alert-src-", "extended|plain"]


def test_card_ui_artifact_front_matter_table_is_escaped():
    from flows.pipeline import card_for_ui

    card = ("---\npretty_name: " + json.dumps("A | B <script>x</script>") + "\nsource_datasets:\n- "
            + json.dumps("extended|a|b") + "\n---\n\n# Title\n\nBody.\n")
    md = card_for_ui(card)
    page = assert_safe(md.split("\n\n", 1)[1], "A | B <script>x</script>", "extended|a|b")
    assert [n for _, n in page.tables[0]] == [2, 2, 2]


# ----------------------------------------------------------------------------- the evaluation report
def _report(categories: list[str]) -> dict:
    stat = {"mean": 0.5, "ci": [0.25, 0.75], "pass_rate": 0.5, "pass_ci": [0.0, 1.0]}
    entry = {"n": 2, "n_groups": 2, **{k: dict(stat) for k in
                                       ("base", "fewshot", "tuned", "tuned_minus_base", "tuned_minus_fewshot")}}
    return {
        "run": "eval <script>run</script>", "arms": ["base", "fewshot", "tuned"],
        "models": {"base": "m|<img src=x onerror=alert(1)>", "fewshot": "m", "tuned": "m + adapter"},
        "config": {"fewshot_k": 1, "bootstrap_samples": 10, "seed": 0},
        "judge": {"used": False},
        "graders": {f"test/{c}": "numeric" for c in categories},
        "summary": {"test": {"categories": {c: copy.deepcopy(entry) for c in categories},
                             "overall": copy.deepcopy(entry), "macro": copy.deepcopy(entry)}},
        "classification": {f"test/{categories[0]}": {a: {"accuracy": 1.0, "macro_f1": 1.0,
                                                          "confusion": {"a|b": {"<c>": 1}}}
                                                      for a in ("base", "fewshot", "tuned")}},
        "pairwise": {f"test/{categories[0]}": {"n": 1, "tuned": 1, "base": 0, "tie": 0, "unparsable": 0}},
        "counts": {"unparsable_judge": 0},
    }


def test_report_tables_keep_their_columns_with_hostile_categories():
    from training.report import markdown_table, render_markdown, table_rows

    report = _report([CAT, SCEN, "returns"])
    md = render_markdown(report)
    page = assert_safe(md, one_line(CAT), one_line(SCEN), "eval <script>run</script>")
    rows = table_rows(report)
    assert len(page.tables[0]) == 1 + len(rows)  # header + one row per category and overall
    assert page.tables[1] == [("th", 6), ("td", 6)]  # pairwise
    assert_safe(markdown_table(rows), one_line(CAT))


def test_model_card_and_score_table_keep_their_columns():
    from training.model_card import build_model_card, markdown, score_table
    from training.report import table_rows

    report = _report([CAT, SRC])
    rows = table_rows(report)
    md = markdown(score_table(rows))
    page = assert_safe(md, one_line(CAT), one_line(SRC))
    assert len(page.tables[0]) == 1 + len(rows)
    card = build_model_card(title="Tuned <script>t</script>", kind="adapter", name_or_path="x|<img src=y onerror=z>",
                            license="apache-2.0", train_manifest=TrainManifest(), report=report, table_rows=rows,
                            dataset_card="../data set/README.md", dataset_name="ds|<b>x</b>", files=["a|b.bin"],
                            usage="```python\nload()\n```")
    assert_safe(card.split("\n---\n", 1)[1], one_line(CAT), "Tuned <script>t</script>", "a|b.bin")


def test_sweep_table_keeps_its_columns():
    from flows.sweep import render_markdown

    cell = {"mean": 0.5, "ci": [0.4, 0.6]}
    table = {"split": "test", "points": [{"name": "k=1 <script>", "overrides": {"augment.k": "1|2"},
                                          "executed": [], "cached": []}],
             "rows": [{"point": "k|1", "category": CAT, "n": 1, **{k: cell for k in (
                 "base", "fewshot", "tuned", "tuned_minus_base", "tuned_minus_fewshot")}}]}
    page = assert_safe(render_markdown(table), one_line(CAT), "k=1 <script>")
    assert [n for _, n in page.tables[0]] == [8, 8]


@pytest.mark.parametrize("label", ["up $\\nosuchsymbol$ 5", "a\nb"])
def test_plot_labels_with_dollars_and_newlines_render(tmp_path, label):
    from training.report import plot_scores

    plot_scores(_report([label, "returns"]), tmp_path / "scores.png")
    assert (tmp_path / "scores.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- the escaping functions
def test_render_functions_exact():
    from datagen.render import html_text, md_cell, md_code, md_table, md_text, plot_text, slug, yaml_scalar

    assert md_cell("banking | retail\r\n<b>x</b> & `y`") == "banking \\| retail &lt;b&gt;x&lt;/b&gt; &amp; \\`y\\`"
    assert md_text("0.25 [0.00, 0.50]") == "0.25 [0.00, 0.50]"  # plain brackets are left alone
    assert md_text("[click](javascript:x)") == "\\[click](javascript:x)"
    assert md_text("a\\b *c* ~d~ credit_risk") == "a\\\\b \\*c\\* \\~d\\~ credit_risk"
    assert md_code("a`b") == "``a`b``" and md_code("`x") == "`` `x ``" and md_code("a|b", in_table=True) == "`a\\|b`"
    assert md_table(["a", "b"], [["x|y", "z\nw"]]) == "| a | b |\n|---|---|\n| x\\|y | z w |"
    with pytest.raises(ValueError, match="2 columns"):
        md_table(["a", "b"], [["only one"]])
    assert html_text("<img src=x onerror=\"y\">") == "&lt;img src=x onerror=&quot;y&quot;&gt;"
    assert yaml_scalar("a: b\n- c") == "'a: b\n\n  - c'" and yaml_scalar("plain") == "plain"
    assert yaml_scalar("yes") == "'yes'" and yaml_scalar(3) == "3"
    assert plot_text("$5\n$6") == "\\$5 \\$6"
    assert slug("evil|src\n<img>") == "evil-src-img-" and slug("../../etc") == "././etc"


def test_table_artifact_cells_show_as_text():
    """The Prefect UI renders each string cell of a table artifact as Markdown (raw HTML dropped)."""
    from flows.pipeline import ui_table

    (row,) = ui_table([{"category": CAT, "n": 3, "tuned": "0.50 [0.25, 0.75]"}])
    assert row["n"] == 3 and row["tuned"] == "0.50 [0.25, 0.75]"
    assert_safe(row["category"], one_line(CAT))
