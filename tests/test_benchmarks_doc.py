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
