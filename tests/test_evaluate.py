"""The evaluate stage end to end: a small test.parquet, scripted answers and judge; then the real Gemma."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from datagen.io import read_json, read_jsonl, write_manifest
from datagen.manifest import Manifest, TrainManifest
from datagen.llm.base import FunctionProvider
from datagen.prompts import load_prompt
from training.evaluate import decode_row, fewshot_exemplars, select_items
from flows.stages import invoke
from training.report import scores_table

SYSTEM = "You are a portfolio credit analyst."


def _row(id_, category, task_type, question, answer, *, values=None, labels=None, context="", group=None,
         rephrase=False):
    meta = {"answer_values": values} if values else {}
    return {
        "id": id_, "group_id": group or f"g-{id_}", "source": "test", "task_type": task_type, "category": category,
        "scenario": None, "question": question, "context": json.dumps({"text": context, "table": None}),
        "answer": answer, "labels": labels, "metadata": json.dumps(meta), "is_rephrase": rephrase,
        "rephrase_index": 0 if rephrase else None,
        "messages": [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": f"{context}\n\n{question}".strip()},
                     {"role": "assistant", "content": answer}],
    }


ROWS = [
    _row("n1", "returns", "numeric_qa", "ACME 10-day return?", "ACME returned -3.2%.",
         values=[{"name": "ret", "value": -3.2, "unit": "%"}], context="ACME closed 101.2 then 98.0."),
    _row("n2", "returns", "numeric_qa", "BOLT 10-day return?", "BOLT returned 4.1%.",
         values=[{"name": "ret", "value": 4.1, "unit": "%"}], group="g-bolt-crux"),
    _row("n3", "returns", "numeric_qa", "CRUX 10-day return?", "CRUX returned 0.5%.",
         values=[{"name": "ret", "value": 0.5, "unit": "%"}], group="g-bolt-crux"),
    _row("c1", "risk", "classification", "ACME risk level?", "high", labels=["low", "medium", "high"]),
    _row("c2", "risk", "classification", "BOLT risk level?", "low", labels=["low", "medium", "high"]),
    _row("o1", "scenario", "open_qa", "What does a rate shock do to bank NIM?",
         "Net interest margins widen at first as asset yields reprice faster than deposits."),
    _row("o2", "scenario", "open_qa", "What does a downgrade wave do to spreads?",
         "High-yield spreads widen as forced sellers exit fallen angels."),
    _row("s1", "facts", "open_qa", "Which body sets US policy rates?", "The Federal Reserve"),
]

# the train split: exemplars for few-shot prompts (never test rows)
TRAIN = [
    _row("t-ret-1", "returns", "numeric_qa", "DYNA 10-day return?", "DYNA returned 1.1%.",
         values=[{"name": "ret", "value": 1.1, "unit": "%"}]),
    _row("t-ret-1r", "returns", "numeric_qa", "Over ten days, what did DYNA return?", "DYNA returned 1.1%.",
         values=[{"name": "ret", "value": 1.1, "unit": "%"}], group="g-t-ret-1", rephrase=True),
    _row("t-ret-2", "returns", "numeric_qa", "EPIC 10-day return?", "EPIC returned -0.7%.",
         values=[{"name": "ret", "value": -0.7, "unit": "%"}]),
    _row("t-ret-3", "returns", "numeric_qa", "FLUX 10-day return?", "FLUX returned 2.0%.",
         values=[{"name": "ret", "value": 2.0, "unit": "%"}]),
    _row("t-ret-4", "returns", "numeric_qa", "GRIT 10-day return?", "GRIT returned 0.0%.",
         values=[{"name": "ret", "value": 0.0, "unit": "%"}]),
    _row("t-risk-1", "risk", "classification", "DYNA risk level?", "medium", labels=["low", "medium", "high"]),
    _row("t-risk-2", "risk", "classification", "EPIC risk level?", "low", labels=["low", "medium", "high"]),
    _row("t-scen-1", "scenario", "open_qa", "What does a flat curve do to bank NIM?", "It compresses margins."),
    _row("t-other", "other", "open_qa", "Unrelated?", "Yes."),
]

BASE = {"n1": "It went up 3.2%", "n2": "4.1%", "n3": "no idea", "c1": "Medium", "c2": "low risk",
        "o1": "It changes.", "o2": "Spreads widen as forced sellers exit fallen angels.", "s1": "The ECB"}
FEWSHOT = {"n1": "ACME returned -3.2%.", "n2": "BOLT returned 4.1%.", "n3": "no idea", "c1": "medium",
           "c2": "low", "o1": "It changes.", "o2": "It changes.", "s1": "the Federal Reserve Bank"}
TUNED = {"n1": "ACME fell 3.2%.", "n2": "BOLT returned 4.1%.", "n3": "0.5%", "c1": "High.", "c2": "Low",
         "o1": "Net interest margins widen at first as asset yields reprice faster than deposits.",
         "o2": "Spreads widen as forced sellers exit fallen angels.", "s1": "Federal Reserve."}
TABLES = {"base": BASE, "fewshot": FEWSHOT, "tuned": TUNED}


def _write_dataset(cfg, rows, train=TRAIN):
    """The format stage's layout: one Parquet file per non-empty split in the dataset folder."""
    import pandas as pd

    ds = cfg.paths.stage_dir("format")
    ds.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(ds / "test.parquet", index=False)
    if train:
        pd.DataFrame(train).to_parquet(ds / "train.parquet", index=False)
    write_manifest(ds, Manifest(stage="format"))


def _fake_adapter(cfg):
    d = cfg.paths.models_dir / cfg.train.run_name
    d.mkdir(parents=True, exist_ok=True)
    write_manifest(d, Manifest(stage="train"))
    return d


def _answer_of(conversation, table):
    user = conversation[-1]["content"]
    for r in ROWS:
        if r["question"] in user:
            return table[r["id"]]
    raise AssertionError(user)


def fake_generator(model_cfg, adapter_dir, conversations, **kw):
    """``conversations``: one list per arm; answers scripted per arm and test item."""
    assert set(conversations) <= set(TABLES)
    for convs in conversations.values():
        assert all(c[-1]["role"] == "user" for c in convs)  # assistant turn removed
    return {arm: [_answer_of(c, TABLES[arm]) for c in convs] for arm, convs in conversations.items()}


def reference_judge(messages):
    """Scripted judge: passes an answer iff its words are the reference's words."""
    t = messages[0]["content"]
    if "Answer A:" in t:
        return json.dumps({"winner": "B" if "Answer B:\nNet interest" in t else "A", "rationale": "."})
    ref = t.split("Reference answer (correct):\n")[1].split("\n\nAnswer to grade:")[0]
    ans = t.split("Answer to grade:\n")[1].split("\n\nGrade the answer")[0]
    words = lambda s: set(re.findall(r"[a-z0-9.]+", s.lower().replace("-", " ")))  # noqa: E731
    ok = len(words(ans) & words(ref)) >= 0.6 * len(words(ref))
    return json.dumps({"score": 5 if ok else 1, "pass": ok, "rationale": "."})


@pytest.fixture
def eval_cfg(tiny_cfg):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.evaluate.max_items = None
    cfg.evaluate.fewshot_k = 3  # the default (the tiny profile uses 1)
    cfg.evaluate.selfcheck_samples = 4
    cfg.evaluate.bootstrap_samples = 200
    _write_dataset(cfg, ROWS)
    _fake_adapter(cfg)
    return cfg


def test_decode_row_and_select_items():
    r = decode_row({**ROWS[0], "labels": None})
    assert r["metadata"]["answer_values"][0]["value"] == -3.2
    assert r["context"]["text"] == "ACME closed 101.2 then 98.0."
    picked = select_items([decode_row(x) for x in ROWS], 4)
    assert [p["id"] for p in picked] == ["c1", "n1", "o1", "s1"]  # one per category, round-robin


def test_run_evaluate_with_scripted_judge(eval_cfg):
    judge = FunctionProvider(reference_judge, name="scripted", model="ref-words")
    m = invoke(eval_cfg, "evaluate", judge=judge, generator=fake_generator)
    out = eval_cfg.paths.reports_dir / eval_cfg.evaluate.run_name
    for f in ("items.jsonl", "report.json", "report.md", "scores.png"):
        assert (out / f).exists() and f in m.outputs
    assert (out / "manifest.json").exists()

    items = read_jsonl(out / "items.jsonl")
    # 8 test items x 3 arms (base zero-shot, base few-shot, tuned) + the majority baseline on the 2 classification items
    assert len(items) == 26
    by = {(i["id"], i["model"]): i for i in items}
    # numeric: "went up 3.2%" has the wrong sign; "fell 3.2%" is right
    assert (by["n1", "base"]["score"], by["n1", "fewshot"]["score"], by["n1", "tuned"]["score"]) == (0.0, 1.0, 1.0)
    assert by["n1", "base"]["grader"] == "numeric"
    assert by["n2", "base"]["group_id"] == "g-bolt-crux" and by["n1", "tuned"]["group_id"] == "g-n1"
    assert by["c1", "base"]["detail"] == {"gold": "high", "pred": "medium", "scoring": "generated"}  # no loglik scores
    assert by["c1", "majority"]["answer"] == "low"  # train's risk labels tie (medium, low): the first alphabetically
    assert by["o1", "tuned"]["grader"] == "judge" and by["o1", "tuned"]["passed"] is True
    assert by["o1", "base"]["passed"] is False
    assert by["o1", "tuned"]["judge"]["judge_model"] == "scripted:ref-words"
    assert by["o1", "tuned"]["judge"]["judge_prompt"] == load_prompt("judge_rubric").ref
    assert {i["seed"] for i in items} == {eval_cfg.evaluate.seed}
    # a short span answer is graded extractively: token F1 is the score, exact match the pass
    assert {by["s1", a]["grader"] for a in TABLES} == {"extractive"}
    assert (by["s1", "tuned"]["score"], by["s1", "tuned"]["passed"]) == (1.0, True)
    assert by["s1", "fewshot"]["score"] == pytest.approx(0.8) and by["s1", "fewshot"]["passed"] is False
    assert by["s1", "base"]["score"] == 0.0
    # the few-shot arm records its exemplars: training rows of the item's category
    assert by["n1", "fewshot"]["fewshot_ids"] and set(by["n1", "fewshot"]["fewshot_ids"]) <= {r["id"] for r in TRAIN}
    assert "fewshot_ids" not in by["n1", "base"]
    assert len({by["n1", a]["prompt_hash"] for a in TABLES}) == 2  # zero-shot prompt shared by base and tuned

    report = read_json(out / "report.json")
    test = report["summary"]["test"]
    cats = test["categories"]
    r = cats["returns"]
    assert (r["n"], r["n_groups"]) == (3, 2)
    assert r["base"]["mean"] == pytest.approx(1 / 3)
    assert r["fewshot"]["mean"] == pytest.approx(2 / 3)
    assert r["tuned"]["mean"] == 1.0
    assert r["tuned_minus_base"]["mean"] == pytest.approx(2 / 3)
    assert r["tuned_minus_fewshot"]["mean"] == pytest.approx(1 / 3)
    for key in ("base", "fewshot", "tuned", "tuned_minus_base", "tuned_minus_fewshot"):
        lo, hi = r[key]["ci"]
        assert lo <= r[key]["mean"] <= hi
        assert len(test["overall"][key]["ci"]) == 2
    assert cats["risk"]["base"]["pass_rate"] == 0.5 and cats["risk"]["tuned"]["pass_rate"] == 1.0
    assert cats["scenario"]["base"]["pass_rate"] == 0.5 and cats["scenario"]["tuned"]["pass_rate"] == 1.0
    assert cats["scenario"]["fewshot"]["pass_rate"] == 0.0
    assert cats["facts"]["fewshot"]["mean"] == pytest.approx(0.8) and cats["facts"]["fewshot"]["pass_rate"] == 0.0
    assert test["overall"]["n"] == 8 and test["overall"]["tuned"]["mean"] == 1.0
    assert report["fewshot"] == {"k": 3, "split": "train"}
    assert report["classification"]["test/risk"]["base"]["accuracy"] == 0.5
    assert report["classification"]["test/risk"]["fewshot"]["accuracy"] == 0.5
    assert report["classification"]["test/risk"]["tuned"]["macro_f1"] == 1.0
    assert report["graders"]["test/facts"] == "extractive"
    assert report["rests_on_judge"] == ["test/scenario"]
    # self-check on 4 sampled items (8 cases); kappa vs the numeric grader on 4 sampled numeric answers
    j = report["judge"]
    assert j["used"] and j["selfcheck"]["n_cases"] == 8 and j["selfcheck"]["accuracy"] == 1.0
    assert j["kappas"]["numeric grader"]["n"] == 4
    assert j["reliable"] is True, j["reasons"]

    rows = m.table_rows
    assert [(r["split"], r["category"]) for r in rows] == [
        ("test", "facts"), ("test", "returns"), ("test", "risk"), ("test", "scenario"),
        ("test", "overall (micro)"), ("test", "overall (macro)")]
    ret = rows[1]
    assert (ret["n"], ret["n_groups"], ret["grader"]) == (3, 2, "numeric")
    assert ret["fewshot_mean"] == pytest.approx(0.667) and ret["tuned_minus_fewshot_mean"] == pytest.approx(0.333)
    assert ret["tuned_minus_base_lo"] <= ret["tuned_minus_base_mean"] <= ret["tuned_minus_base_hi"]
    assert rows[3]["rests_on_judge"] is True and rows[3]["judge_unreliable"] is False
    assert m.judge["reliable"] is True
    md = Path(m.report_md).read_text()
    assert md.startswith("# Evaluation report")
    assert "base few-shot" in md and "tuned - few-shot" in md

    text = scores_table(eval_cfg)
    assert "| test | returns | numeric | 3 (2) |" in text
    assert "base few-shot" in text
    assert "passed its self-check" in text
    # the terminal form (what `finsynth scores` prints): aligned columns, no Markdown pipes or escapes
    plain = scores_table(eval_cfg, fmt="text")
    lines = plain.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("category"))
    table = lines[head:lines.index("", head)]
    assert "|" not in plain and set(table[1]) == {"-", " "}
    starts = [i for i in range(1, len(table[1])) if table[1][i] == "-" and table[1][i - 1] == " "]
    for ln in table[2:-1]:  # every cell starts where its header's rule starts
        assert all(ln[i - 2:i] == "  " for i in starts), ln
    # one split: no split column; the 4 categories of < 5 items are one line under the overall rows
    assert [ln.split("  ")[0] for ln in table[2:-1]] == ["overall (micro)", "overall (macro)"]
    assert table[-1] == "4 categories with < 5 items each: see report.md"
    assert "Classification, macro-F1" in plain and "\n1 category with < 5 items: see report.md" in plain
    assert "n (groups)  zero-shot  few-shot  tuned  majority" not in plain  # no header over an empty table
    assert "passed its self-check" in plain and "`" not in plain
    rows = json.loads(scores_table(eval_cfg, fmt="json"))["scores"]
    assert {r["category"] for r in rows} >= {"returns", "overall (micro)"}


def test_the_main_commands_end_shows_tables_and_answers_side_by_side(eval_cfg, tmp_path, capsys):
    from flows.cli import main
    from flows.deploy import outcome

    invoke(eval_cfg, "evaluate", judge=FunctionProvider(reference_judge, name="scripted", model="ref-words"),
                 generator=fake_generator)
    report = eval_cfg.paths.reports_dir / eval_cfg.evaluate.run_name
    dataset = eval_cfg.paths.stage_dir("format")
    res = {"executed": ["evaluate"], "cached": [], "dataset_card": str(dataset / "README.md"),
           "adapter": str(eval_cfg.paths.models_dir / "adapter"), "report": str(report / "report.md")}
    text = outcome({"flow_run_name": "calm-fox", "state": "COMPLETED", "state_name": "Completed", "total_s": 75.0,
                    "result": res}, tmp_path)
    assert "flow run calm-fox: Completed after 1 min 15 s" in text
    assert "zero-shot  few-shot  tuned" in text and "tuned - few-shot" in text and "|" not in text
    assert max(len(ln) for ln in text.splitlines() if str(tmp_path) not in ln) <= 120  # paths may be longer
    assert "passed its self-check" in text
    # 3 questions, one per category first, where tuned beats few-shot first; reference and every arm's answer
    examples = [ln for ln in text.splitlines() if ln.startswith("[")]
    assert len(examples) == 3 and len({ln.split(" (")[0].split("] ")[1] for ln in examples}) == 3
    for arm in ("reference", "base zero-shot", "base few-shot", "tuned"):
        assert sum(ln.startswith(f"    {arm} ") for ln in text.splitlines()) == 3, arm
    assert "fell 3.2%" in text or "Net interest" in text
    for path in (dataset / "README.md", report / "report.md", tmp_path / "last-run.json"):
        assert str(path) in text
    assert json.loads((tmp_path / "last-run.json").read_text())["flow_run_name"] == "calm-fox"
    # `finsynth scores` prints the aligned table; --markdown and --json the other forms
    where = ["--profile", "tiny", "--root", str(eval_cfg.paths.root)]
    capsys.readouterr()
    assert main(["scores", *where]) == 0
    assert "Mean score per category" in (out := capsys.readouterr().out) and "|" not in out
    assert main(["scores", "--markdown", *where]) == 0
    assert "| test | returns | numeric | 3 (2) |" in capsys.readouterr().out
    assert main(["scores", "--json", *where]) == 0 and json.loads(capsys.readouterr().out)["scores"]
    failed = outcome({"flow_run_name": "x", "state": "FAILED", "state_name": "Failed", "message": "fetch: boom"},
                     tmp_path)
    assert "fetch: boom" in failed and "worker.log" in failed and "Mean score" not in failed


def test_fewshot_prompts_are_training_exemplars_of_the_same_category(eval_cfg):
    seen = {}

    def gen(model_cfg, adapter_dir, conversations, **kw):
        seen.update(conversations)
        return fake_generator(model_cfg, adapter_dir, conversations, **kw)

    invoke(eval_cfg, "evaluate", judge=FunctionProvider(reference_judge), generator=gen)
    assert set(seen) == {"base", "fewshot", "tuned"}
    assert seen["base"] == seen["tuned"]
    ids = [r["id"] for r in sorted(ROWS, key=lambda r: r["id"])]
    n1 = seen["fewshot"][ids.index("n1")]
    # [system, (user, assistant) x 3, user]: the exemplars' own chat turns, then the test item's
    assert [t["role"] for t in n1] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert n1[0] == {"role": "system", "content": SYSTEM}
    assert n1[-1] == seen["base"][ids.index("n1")][-1]
    train = {r["id"]: r for r in TRAIN}
    shots = [(n1[k]["content"], n1[k + 1]["content"]) for k in range(1, 7, 2)]
    by_user = {r["messages"][1]["content"]: r for r in TRAIN}
    picked = [by_user[u] for u, _ in shots]
    assert all(p["category"] == "returns" for p in picked)
    assert [a for _, a in shots] == [p["answer"] for p in picked]
    # originals, one per group: the rephrasing of t-ret-1 is never picked next to (or instead of) it
    assert "t-ret-1r" not in {p["id"] for p in picked} and len({p["group_id"] for p in picked}) == 3
    assert {p["id"] for p in picked} <= set(train)
    # a category with one training row gets one shot; a category with none gets a zero-shot prompt
    s = seen["fewshot"][ids.index("o1")]
    assert [t["role"] for t in s] == ["system", "user", "assistant", "user"]
    assert s[2]["content"] == "It compresses margins."
    assert seen["fewshot"][ids.index("s1")] == seen["base"][ids.index("s1")]


def test_fewshot_exemplars_are_fixed_per_category_and_never_from_the_item_group():
    train = [decode_row(r) for r in TRAIN]
    item = decode_row(ROWS[0])
    a = fewshot_exemplars(item, train, k=3, seed=17)
    assert [r["id"] for r in a] == [r["id"] for r in fewshot_exemplars(item, list(reversed(train)), k=3, seed=17)]
    assert len(a) == 3 and all(r["category"] == "returns" and not r["is_rephrase"] for r in a)
    picks = {tuple(r["id"] for r in fewshot_exemplars(item, train, k=2, seed=s)) for s in range(20)}
    assert len(picks) > 1  # the seed, not list order, chooses
    other = decode_row(ROWS[1])  # another item of the category: the same shots, so prompts share a head
    assert other["category"] == item["category"] and other["id"] != item["id"]
    assert [r["id"] for r in fewshot_exemplars(other, train, k=3, seed=17)] == [r["id"] for r in a]
    same_group = {**item, "group_id": "g-t-ret-2"}
    assert "t-ret-2" not in [r["id"] for r in fewshot_exemplars(same_group, train, k=4, seed=17)]
    # one exemplar per group: a rephrasing never joins (or replaces) its original
    got = fewshot_exemplars(item, train, k=10, seed=17)
    assert sorted(r["id"] for r in got) == ["t-ret-1", "t-ret-2", "t-ret-3", "t-ret-4"]
    assert fewshot_exemplars(item, train, k=0, seed=17) == []


def test_fewshot_k_zero_disables_the_arm(eval_cfg):
    eval_cfg.evaluate.fewshot_k = 0
    seen = {}

    def gen(model_cfg, adapter_dir, conversations, **kw):
        seen.update(conversations)
        return fake_generator(model_cfg, adapter_dir, conversations, **kw)

    m = invoke(eval_cfg, "evaluate", judge=FunctionProvider(reference_judge), generator=gen)
    assert set(seen) == {"base", "tuned"}
    report = read_json(Path(m.report_json))
    r = report["summary"]["test"]["categories"]["returns"]
    assert r["fewshot"]["n"] == 0 and r["tuned_minus_fewshot"]["ci"] is None
    assert r["tuned_minus_base"]["mean"] == pytest.approx(2 / 3)
    # the majority arm loads no model
    assert {i["model"] for i in read_jsonl(Path(m.items_jsonl))} == {"base", "tuned", "majority"}
    assert m.table_rows[1]["fewshot_mean"] is None
    assert "base few-shot" not in Path(m.report_md).read_text()


def test_evaluate_reads_no_train_file_as_no_exemplars(eval_cfg):
    _write_dataset(eval_cfg, ROWS, train=[])
    m = invoke(eval_cfg, "evaluate", judge=FunctionProvider(reference_judge), generator=fake_generator)
    report = read_json(Path(m.report_json))
    # every few-shot prompt had 0 exemplars: the arm is still reported, and equals zero-shot prompts
    assert report["summary"]["test"]["categories"]["returns"]["fewshot"]["n"] == 3


def test_run_evaluate_flags_an_unreliable_judge_and_pairwise(eval_cfg):
    eval_cfg.evaluate.pairwise = True
    yes_man = FunctionProvider(lambda m: '{"winner": "A"}' if "Answer A:" in m[0]["content"]
                               else '{"score": 5, "pass": true, "rationale": "."}', name="yes", model="man")
    m = invoke(eval_cfg, "evaluate", judge=yes_man, generator=fake_generator)
    report = read_json(Path(m.report_json))
    j = report["judge"]
    assert j["reliable"] is False
    assert j["selfcheck"]["mismatch_fail_rate"] == 0.0
    assert any(r.startswith("self-check accuracy 0.50") for r in j["reasons"])
    # the yes-man always prefers position A: every verdict flips, so all are ties
    assert report["pairwise"]["test/overall"] == {"n": 2, "tuned": 0, "base": 0, "tie": 2, "unparsable": 0,
                                                  "tuned_win_rate": 0.0, "base_win_rate": 0.0}
    assert "pairwise" in report["rests_on_judge"]
    md = Path(m.report_md).read_text()
    assert "**WARNING: the LLM judge `yes:man` is UNRELIABLE**" in md
    assert "| test | scenario | judge (!) |" in md
    assert [r["judge_unreliable"] for r in m.table_rows if r["category"] == "scenario"] == [True]


def test_gold_file_is_a_separate_split(eval_cfg, tmp_path):
    gold = tmp_path / "gold.jsonl"
    g = {k: v for k, v in ROWS[1].items() if k != "messages"}
    gold.write_text(json.dumps({**g, "id": "gold1"}) + "\n")
    eval_cfg.evaluate.gold_file = gold
    seen = []

    def gen(model_cfg, adapter_dir, conversations, **kw):
        seen.extend(conversations["base"])
        return fake_generator(model_cfg, adapter_dir, conversations, **kw)

    m = invoke(eval_cfg, "evaluate", judge=FunctionProvider(reference_judge), generator=gen)
    # a gold row without messages gets the system prompt + question
    assert seen[-1][0]["role"] == "system" and seen[-1][0]["content"] == load_prompt("system_analyst").render()
    assert seen[-1][-1] == {"role": "user", "content": "BOLT 10-day return?"}
    report = read_json(Path(m.report_json))
    assert report["summary"]["gold"]["categories"]["returns"]["tuned"]["n"] == 1
    assert ("gold", "returns") in [(r["split"], r["category"]) for r in m.table_rows]


def test_run_evaluate_requires_upstream(tiny_cfg):
    from flows.stages import execute

    with pytest.raises(FileNotFoundError, match="finsynth format"):  # the evaluate spec's upstream, checked first
        execute(tiny_cfg, "evaluate")


# ----------------------------------------------------------------------------- real packaged Gemma
def _train_tiny_adapter(cfg, rows, adapter_dir: Path) -> None:
    """A briefly tuned LoRA adapter (r=4 on q/v, 2 AdamW steps on 3 examples), saved like the trainer does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lm.packaged import resolve_model_path
    from datagen.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.name_or_path), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows[:3]]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model.train()
    for _ in range(2):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(adapter_dir))
    write_manifest(adapter_dir, TrainManifest.from_json({"stage": "train", "note": "tiny test adapter"}))


@pytest.mark.slow
def test_real_run_on_packaged_gemma(tiny_cfg):
    """Base Gemma-3-270M vs a briefly tuned adapter, judged by the local Gemma provider (the default)."""
    cfg = tiny_cfg.model_copy(deep=True)
    ev = cfg.evaluate
    ev.max_items, ev.max_new_tokens, ev.batch_size = 4, 16, 4
    ev.selfcheck_samples, ev.bootstrap_samples, ev.judge_max_tokens = 1, 200, 40
    ev.fewshot_k = 1  # the few-shot arm on the real model, kept short
    ev.judge_provider = "local"  # the profile may name another judge; this test pins the default
    cfg.llm.providers["local"].schema_retries = 0  # keep the run short (retries are the provider's tests)
    rows = [ROWS[0], ROWS[1], ROWS[3], ROWS[5]]
    _write_dataset(cfg, rows)
    adapter = cfg.paths.models_dir / cfg.train.run_name
    _train_tiny_adapter(cfg, rows, adapter)

    m = invoke(cfg, "evaluate")  # the judge is get_provider(cfg, "local"): the packaged Gemma base

    report = read_json(Path(m.report_json))
    items = read_jsonl(Path(m.items_jsonl))
    n_cls = sum(r["task_type"] == "classification" for r in rows)
    assert n_cls == 1 and len(items) == 3 * len(rows) + n_cls  # three arms, and the majority label per label item
    assert {i["model"] for i in items} == {"base", "fewshot", "tuned", "majority"}
    assert {i["grader"] for i in items if i["model"] == "majority"} == {"classification"}
    assert all(isinstance(i["answer"], str) for i in items)
    assert {i["grader"] for i in items} == {"numeric", "classification", "judge"}
    assert all(0.0 <= i["score"] <= 1.0 for i in items)
    for i in items:  # unparsable judge output is never a pass
        if i.get("unparsable"):
            assert i["passed"] is False and i["score"] == 0.0
    j = report["judge"]
    assert j["used"] and j["provider"] == "local"
    assert j["selfcheck"]["n_cases"] == 2  # one item: its reference and a same-category mismatch
    assert m.judge["reliable"] == j["reliable"]
    if j["selfcheck"]["accuracy"] < ev.judge_min_accuracy:
        assert j["reliable"] is False
    md = Path(m.report_md).read_text()
    if not j["reliable"]:  # the expected, honest outcome for a 270M base-model judge
        assert "UNRELIABLE" in md and "test/scenario" in md
    assert Path(m.scores_png).stat().st_size > 1000
    print(md)


def test_missing_judge_key_fails_before_any_generation(eval_cfg, monkeypatch):
    """Issue 11: the judge's key was resolved only after both models had generated."""
    from datagen.config import ProviderConfig
    from datagen.llm.keys import MissingKeyError

    monkeypatch.delenv("FINSYNTH_NO_SUCH_KEY", raising=False)
    cfg = eval_cfg.model_copy(deep=True)
    cfg.llm.providers["judge"] = ProviderConfig(kind="openai", model="m", base_url="http://127.0.0.1:9/v1",
                                                api_key_env="FINSYNTH_NO_SUCH_KEY")
    cfg.evaluate.judge_provider = "judge"
    generated = []

    def gen(*a, **kw):
        generated.append(1)
        return fake_generator(*a, **kw)

    with pytest.raises(MissingKeyError, match="FINSYNTH_NO_SUCH_KEY is not set"):
        invoke(cfg, "evaluate", generator=gen)
    assert generated == []


def test_scores_of_a_report_from_before_the_arms_says_to_rerun(eval_cfg):
    out = eval_cfg.paths.reports_dir / eval_cfg.evaluate.run_name
    out.mkdir(parents=True)
    old = {"run": "eval", "judge": {"used": False}, "graders": {}, "models": {"base": "b", "tuned": "t"},
           "summary": {"test": {"categories": {}, "micro": {}, "macro": {}}}}
    (out / "report.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="written before the few-shot arm.*finsynth evaluate"):
        scores_table(eval_cfg)


def test_base_arm_answers_are_cached_across_runs_tuned_never(tmp_path, monkeypatch):
    """A sweep trains several adapters on one dataset: the base arms' answers (same model, same prompts,
    greedy) come from the response cache after the first run; the tuned arm is always generated."""
    import training.generate as g
    from lm.causal_lm import Generation
    from datagen.config import ModelConfig
    from datagen.llm import open_cache

    class Tok:
        def apply_chat_template(self, conv, tokenize=False, add_generation_prompt=True):
            return " | ".join(m["content"] for m in conv)

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    generated, loads = [], []
    monkeypatch.setattr(g, "load_tokenizer", lambda cfg: Tok())
    monkeypatch.setattr(g, "load_causal_lm", lambda cfg: loads.append(1) or "base-model")
    monkeypatch.setattr(g, "attach_adapter", lambda model, d: f"{model}+{Path(d).name}")
    monkeypatch.setattr(g, "generate", lambda model, tok, prompts, **kw: (
        generated.extend((model, p) for p in prompts) or [Generation([f"{model}: {p}"], 0, 0) for p in prompts]))
    convs = {"base": [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]],
             "fewshot": [[{"role": "user", "content": "ex"}, {"role": "user", "content": "q1"}]],
             "tuned": [[{"role": "user", "content": "q1"}]]}
    cache = open_cache(tmp_path / "c.sqlite")
    first = g.generate_arms(ModelConfig(), tmp_path / "a1", convs, max_new_tokens=8, cache=cache)
    assert len(generated) == 4 and first["base"] == ["base-model: q1", "base-model: q2"]
    generated.clear()
    second = g.generate_arms(ModelConfig(), tmp_path / "a2", convs, max_new_tokens=8, cache=cache)
    assert generated == [("base-model+a2", "q1")]  # only the tuned arm, with the new adapter
    assert second["base"] == first["base"] and second["fewshot"] == first["fewshot"]
    generated.clear()
    g.generate_arms(ModelConfig(), tmp_path / "a2", convs, max_new_tokens=9, cache=cache)  # other settings
    assert len(generated) == 4


def test_small_fewshot_families_are_pooled_into_full_batches_big_ones_share_their_head():
    from training.generate import plan_batches

    head = list(range(100, 160))  # a 60-token exemplar head
    big = [head + [1, 2, i] for i in range(9)]  # one family of 9 at batch size 8: two batches sharing the head
    small = [[7] * 40 + [i] * (3 + i) for i in range(10)]  # ten families of one (the demo's few-shot arm)
    enc = big + small
    groups = ["big"] * 9 + [f"s{i}" for i in range(10)]
    batches = plan_batches(enc, 8, groups)
    assert sorted(i for b, _ in batches for i in b) == list(range(19))  # every prompt once
    shared = [(b, h) for b, h in batches if set(b) <= set(range(9))]
    assert [len(b) for b, _ in shared] == [8, 1] and all(h == 62 for _, h in shared)
    loose = [(b, h) for b, h in batches if set(b) >= {9} or set(b) & set(range(9, 19))]
    assert [len(b) for b, _ in loose] == [8, 2] and all(h == 0 for _, h in loose)  # 2 batches, not 10
    lens = [len(enc[i]) for b, _ in loose for i in b]
    assert lens == sorted(lens, reverse=True)  # longest first: least padding
    plain = plan_batches(enc, 8)  # no groups: one pool, longest first, no head
    assert [len(b) for b, _ in plain] == [8, 8, 3] and all(h == 0 for _, h in plain)


def test_the_tuned_arm_runs_merged_and_leaves_the_base_weights_as_they_were(tiny_gemma_dir):
    """``training.generate.merged``: inside, the adapter is folded into the weights (a plain forward, the base
    model's cost) with the same logits as the unmerged adapter; after it, the adapter is separate again and
    ``disable_adapter`` gives the base model's own logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.generate import merged

    base = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        plain = base(ids).logits.clone()
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False)).eval()  # random A and B: a real change
    with torch.no_grad():
        tuned = model(ids).logits.clone()
        assert not torch.allclose(tuned, plain, atol=1e-4)
        with merged(model):
            layer = model.base_model.model.model.layers[0].self_attn.q_proj
            assert layer.merged
            assert torch.allclose(model(ids).logits, tuned, atol=1e-5)
        assert not layer.merged
        assert torch.allclose(model(ids).logits, tuned, atol=1e-5)
        with model.disable_adapter():
            assert torch.allclose(model(ids).logits, plain, atol=1e-5)


def test_items_scored_by_label_loglik_are_generated_only_as_far_as_a_label_needs(tmp_path, monkeypatch):
    """A classification item is decided by its label scores; its generated answer (kept beside, in the report)
    needs a label's tokens, not ``max_new_tokens``: every arm asks ``label_budget`` new tokens for it."""
    import training.generate as g
    from lm.causal_lm import Generation
    from datagen.config import ModelConfig

    class Tok:
        def apply_chat_template(self, conv, tokenize=False, add_generation_prompt=True):
            return " | ".join(m["content"] for m in conv)

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    asked = {}

    def fake_generate(model, tok, prompts, max_new_tokens, **kw):
        asked.update(zip(prompts, max_new_tokens))
        return [Generation([f"{model}: {p}"], 0, 0) for p in prompts]

    monkeypatch.setattr(g, "load_tokenizer", lambda cfg: Tok())
    monkeypatch.setattr(g, "load_causal_lm", lambda cfg: "base-model")
    monkeypatch.setattr(g, "attach_adapter", lambda model, d: f"{model}+{Path(d).name}")
    monkeypatch.setattr(g, "generate", fake_generate)
    monkeypatch.setattr(g, "score_choices", lambda model, tok, prompts, choices, **kw: [
        [(-1.0, 1)] * len(c) for c in choices])
    convs = {arm: [[{"role": "user", "content": f"{arm} open question"}],
                   [{"role": "user", "content": f"{arm} classify this headline"}]] for arm in ("base", "tuned")}
    res = g.generate_arms(ModelConfig(), tmp_path / "a", convs, max_new_tokens=96,
                          choices=[None, ["positive", "negative", "very negative"]])
    assert asked == {"base open question": 96, "base classify this headline": 2 + 6,
                     "tuned open question": 96, "tuned classify this headline": 2 + 6}
    assert res["tuned"][1] == "base-model+a: tuned classify this headline" and res[g.LOGLIK]["base"][0] is None
    assert g.label_budget(Tok(), ["a b c d e f g h i j"], cap=12) == 12  # never past the cap
