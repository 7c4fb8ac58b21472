"""The hand-labelled real rephrasings and the precision benchmark over them.

``tests/data/rephrase_real.jsonl`` (test) and ``tests/data/rephrase_real_calibration.jsonl`` (what prompt and
validators were chosen on) hold the packaged model's real candidates (``scripts/collect_rephrasings.py``),
labelled by hand. The benchmark replays them through the augment loop; its committed result must be what
today's validators give on that data, and every candidate today's validators keep must carry a label.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT / "tests/data/rephrase_real.jsonl"
CALIB = ROOT / "tests/data/rephrase_real_calibration.jsonl"
DRIFT = {"none", "appended_question", "added_condition", "swapped_term", "dropped_part", "presupposes_label",
         "changed_fact", "answers_question", "garbled", "other_meaning"}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_labelled_sets_are_real_outputs_with_labels_and_disjoint_questions():
    test, calib = _read(TEST), _read(CALIB)
    for recs in (test, calib):
        for r in recs:
            assert r["model"] == "packaged:gemma3-270m" and r["source_kind"] and r["source_file"]
            if r.get("faithful") is not None:
                assert isinstance(r["faithful"], bool) and r["drift"] in DRIFT
                assert (r["drift"] == "none") == r["faithful"], r
    # what the issue asks of the test set: >= 100 labelled candidates the validators without the drift checks
    # keep, >= 50 labelled ones they reject, every kind of source
    labelled = [r for r in test if r.get("faithful") is not None]
    assert sum(r["verdict_without_drift_checks"] == "kept" for r in labelled) >= 100
    assert sum(r["verdict_without_drift_checks"] != "kept" for r in labelled) >= 50
    assert {r["source_kind"] for r in labelled} == {"market", "source_qa", "knowledge", "classification"}
    # tuning data never shares a question with the test data
    assert not {r["original"] for r in test} & {r["original"] for r in calib}


@pytest.mark.slow
def test_benchmark_result_is_what_todays_validators_give(tmp_path):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks/bench_rephrase_precision.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--out", str(tmp_path / "r.json")])  # exits naming any kept candidate without a label
    committed = json.loads((ROOT / "benchmarks/results/rephrase_precision.json").read_text())
    for arm in ("validators", "without_drift_checks"):
        got, want = res["arms"][arm]["overall"], committed["arms"][arm]["overall"]
        assert {k: got[k] for k in ("kept", "faithful", "precision", "keep_rate")} == \
               {k: want[k] for k in ("kept", "faithful", "precision", "keep_rate")}
