"""docs/benchmarks.md is generated from benchmarks/results/*.json and must match them."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _doc_module():
    spec = importlib.util.spec_from_file_location("make_benchmarks_doc", ROOT / "scripts" / "make_benchmarks_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmarks_doc_matches_the_result_files():
    mod = _doc_module()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == mod.render(), \
        "docs/benchmarks.md is out of date: run python scripts/make_benchmarks_doc.py"


def test_a_changed_result_changes_the_doc(tmp_path):
    mod = _doc_module()
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    q = json.loads((results / "quality.json").read_text())
    q["overall"]["tuned_minus_fewshot"] = {"mean": 0.5, "ci": [0.25, 0.75]}
    (results / "quality.json").write_text(json.dumps(q))
    text = mod.render(results)
    assert "| **tuned - few-shot** | 0.500 [0.250, 0.750] |" in text
    (results / "quality.json").unlink()
    assert "Not run yet: `benchmarks/results/quality.json`" in mod.render(results)


def test_readmes_demo_figures_match_demo_json():
    """README's "What you get" figures are generated from benchmarks/results/demo.json: one host row, the
    latest run, and the price look-up gain the text states."""
    mod = _doc_module()
    text = (ROOT / "README.md").read_text()
    assert text == mod.readme(text), \
        "README.md's demo figures are out of date: run python scripts/make_benchmarks_doc.py"
    block = text[text.index(mod.BEGIN): text.index(mod.END)]
    d = json.loads((ROOT / "benchmarks" / "results" / "demo.json").read_text())
    rows = [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| host")]
    assert len(rows) == 1 and str(d["date"])[:10] in rows[0], rows
    assert f"**{d['wall_s'] / 60:.1f} min**" in rows[0]
    gain = d["categories"]["market_price_lookup"]["tuned_minus_fewshot"]
    assert f"{gain['mean']:+.3f} [{gain['ci'][0]:.3f}, {gain['ci'][1]:.3f}]" in block


def test_a_new_demo_run_replaces_the_readme_row(tmp_path):
    mod = _doc_module()
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    d = json.loads((results / "demo.json").read_text())
    d.update(wall_s=649.0, date="2027-01-02 10:00:00")
    d["categories"]["market_price_lookup"]["tuned_minus_fewshot"] = {"mean": 0.1, "ci": [-0.05, 0.25]}
    (results / "demo.json").write_text(json.dumps(d))
    block = mod.readme((ROOT / "README.md").read_text(), results)
    rows = [ln for ln in block.splitlines() if ln.startswith("| 2 cores")]
    assert len(rows) == 1 and "2027-01-02" in rows[0] and "**10.8 min**" in rows[0]
    assert "no gain shown" in block and "beats" not in block.split("What it shows")[1].split("\n")[0]
