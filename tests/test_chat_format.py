"""Chat formatting: exact messages, exact token ids and loss mask of a known example on the packaged
Gemma tokenizer, length filtering with reasons, the Parquet round-trip, and TRL SFTTrainer's view."""

from __future__ import annotations

import json
import re

import pytest

from flows.stages import invoke

from datagen.dataset.chat_format import (
    DISK_DIR,
    META_DIR,
    build_messages,
    format_rows,
    render_conversation,
    truncate_context,
)
from datagen.io import read_jsonl, write_jsonl, write_manifest
from datagen.manifest import Manifest
from datagen.prompts import Prompt, load_prompt

SYS = Prompt("sys", "Be brief.")


def _row(id_="x1", group="g1", task_type="classification", rephrase=False, question="Is ACME risky?",
         answer="high", labels=("low", "high"), context=None):
    return {"id": id_, "group_id": group, "source": "t", "task_type": task_type, "category": "risk",
            "scenario": None, "question": question,
            "context": context if context is not None else
            {"text": "Vol 45%.", "table": {"columns": ["Ticker", "Close"], "rows": [["ACME", "101.5"]]}},
            "answer": answer, "labels": list(labels) if labels else None,
            "metadata": {"cluster": "risk", "answer_values": [{"name": "vol", "value": 45.0, "unit": "%"}]},
            "is_rephrase": rephrase, "rephrase_index": 1 if rephrase else None}


def test_build_messages_classification_lists_labels():
    msgs = build_messages(_row(), SYS, load_prompt("sft_user"))
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Context:\n| Ticker | Close |\n|---|---|\n| ACME | 101.5 |\n\nVol 45%.\n\n"
                                    "Question: Is ACME risky?\nAnswer with exactly one of: low, high."},
        {"role": "assistant", "content": "high"},
    ]


def test_build_messages_open_qa_without_context_has_no_labels():
    row = _row(task_type="open_qa", question="  What is a CDS? ", answer="A credit default swap.",
               labels=("a", "b"), context={"text": "", "table": None})
    msgs = build_messages(row, load_prompt("system_analyst"), load_prompt("sft_user"))
    assert msgs[0]["content"] == load_prompt("system_analyst").text.strip()
    assert msgs[1:] == [{"role": "user", "content": "Question: What is a CDS?"},
                        {"role": "assistant", "content": "A credit default swap."}]


@pytest.fixture(scope="module")
def tokenizer():
    from datagen.config import ModelConfig
    from datagen.tokenizer import load_tokenizer

    return load_tokenizer(ModelConfig())


# Verified by decoding token by token: <bos> <start_of_turn> user \n Be ' brief' . \n\n Context : \n | ' T'
# icker ' |' ' Close' ' |' \n | ---| ---| \n | ' AC' ME ' |' ' ' 1 0 1 . 5 ' |' \n\n Vol ' ' 4 5 %. \n\n
# Question : ' Is' ' AC' ME ' risky' ? \n Answer ' with' ' exactly' ' one' ' of' : ' low' , ' high' .
# <end_of_turn> \n <start_of_turn> model \n | high <end_of_turn> \n   (| = where the loss mask starts)
EXPECTED_IDS = [2, 105, 2364, 107, 3912, 8652, 236761, 108, 3637, 236787, 107, 236909, 558, 13077, 1109, 17016,
                1109, 107, 236909, 171168, 171168, 107, 236909, 11659, 7273, 1109, 236743, 236770, 236771, 236770,
                236761, 236810, 1109, 108, 13811, 236743, 236812, 236810, 9525, 108, 14977, 236787, 2375, 11659,
                7273, 53321, 236881, 107, 7925, 607, 7121, 886, 529, 236787, 2708, 236764, 1494, 236761, 106, 107,
                105, 4368, 107, 11480, 106, 107]


@pytest.mark.slow
def test_render_known_example_exact_ids_and_mask(tokenizer):
    ids, mask = render_conversation(tokenizer, build_messages(_row(), SYS, load_prompt("sft_user")))
    assert ids == EXPECTED_IDS
    assert mask == [0] * 63 + [1, 1, 1]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "high<end_of_turn>\n"


@pytest.mark.slow
def test_format_rows_drops_too_long_with_reason(tokenizer):
    rows = [_row("short"), _row("long", question="Why? " * 200)]
    kept, drops = format_rows(rows, tokenizer, SYS, load_prompt("sft_user"), max_tokens=100)
    assert [r["id"] for r in kept] == ["short"]
    assert kept[0]["n_tokens"] == 66 and kept[0]["n_assistant_tokens"] == 3
    d = drops[0]
    assert (d["stage"], d["row_id"], d["reason"], d["source"]) == ("format", "long", "too_long", "t")
    assert d["n_tokens"] > 100 and d["max_tokens"] == 100 and d["detail"] == f"{d['n_tokens']} tokens > 100"


def _write_split(cfg, rows_by_split):
    d = cfg.paths.stage_dir("split")
    for s, rows in rows_by_split.items():
        write_jsonl(d / f"{s}.jsonl", rows)
    write_manifest(d, Manifest(stage="split"))


@pytest.mark.slow
def test_run_format_parquet_roundtrip(demo_cfg, tokenizer):
    from datasets import load_dataset

    _write_split(demo_cfg, {
        "train": [_row("a"), _row("b", group="g2", task_type="open_qa", answer="About 45%.", labels=None),
                  _row("c", group="g2", rephrase=True, question="Why? " * 400)],
        "validation": [_row("d", group="g3")],
        "test": [],  # an empty split gets no file (load_dataset rejects empty splits)
    })
    m = invoke(demo_cfg, "format", tokenizer=tokenizer)
    out = demo_cfg.paths.stage_dir("format")
    assert m.counts["train"] == 2 and m.counts["validation"] == 1 and m.counts["test"] == 0
    assert m.counts["dropped_too_long"] == 1 and m.counts["truncated"] == 0
    assert m.empty_splits == ["test"]
    assert read_jsonl(out / META_DIR / "drops.jsonl")[0]["row_id"] == "c"
    top = {k for k in m.outputs if "/" not in k}
    assert top == {"README.md", "train.parquet", "validation.parquet"} and m.splits == ["train", "validation"]
    assert {f"{META_DIR}/token_lengths.png", f"{META_DIR}/drops.jsonl", f"{DISK_DIR}/dataset_dict.json"} <= set(
        m.outputs)
    ds = load_dataset("parquet", data_dir=str(out))
    assert set(ds) == {"train", "validation"}
    assert ds["train"].features == ds["validation"].features
    r = ds["train"][0]
    assert r["id"] == "a" and r["cluster"] == "risk" and r["labels"] == ["low", "high"]
    assert [x["role"] for x in r["messages"]] == ["system", "user", "assistant"]
    assert r["messages"][2]["content"] == "high"
    assert json.loads(r["metadata"])["answer_values"][0]["value"] == 45.0
    assert json.loads(r["context"])["table"]["rows"] == [["ACME", "101.5"]]
    assert ds["train"][1]["labels"] is None
    assert (out / META_DIR / "token_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_run_format_fails_when_format_empties_a_split(demo_cfg, tokenizer):
    """Every test row too long: a one-line error naming the split, the count and the reason; nothing written."""
    long_q = "Why? " * 400
    _write_split(demo_cfg, {"train": [_row("a")], "validation": [],
                            "test": [_row(f"t{i}", group=f"t{i}", question=long_q) for i in range(3)]})
    with pytest.raises(ValueError) as e:
        invoke(demo_cfg, "format", tokenizer=tokenizer)
    assert str(e.value) == (f"format: test has 0 rows: 3 of 3 dropped as too_long (max_tokens "
                            f"{demo_cfg.format.max_tokens}); raise format.max_tokens, set format.long_context: "
                            "truncate, or shorten the context")
    assert not (demo_cfg.paths.stage_dir("format") / "manifest.json").exists()


# ----------------------------------------------------------------------------- long contexts
def _fits_chars(limit):
    from datagen.schema import render_context

    return lambda ctx: len(render_context(ctx)) <= limit


def _price_table(n):
    return {"columns": ["Date", "Close"], "rows": [[f"2024-01-{d:02d}", f"{100 + d}.25"] for d in range(1, n + 1)]}


def test_truncate_keeps_the_rows_nearest_the_answer_cells():
    ctx = {"text": "Daily closes of ACME.", "table": _price_table(20)}
    row = {"question": "What was ACME's close on 2024-01-12?", "answer": "112.25",
           "context": ctx, "metadata": {"answer_values": [{"name": "close", "value": 112.25, "unit": "USD"}]}}
    new, why = truncate_context(row, _fits_chars(200))
    assert why == ""
    kept = [r[0] for r in new["table"]["rows"]]
    assert "2024-01-12" in kept and kept == sorted(kept)  # original order
    days = [int(d[-2:]) for d in kept]
    assert max(abs(d - 12) for d in days) <= 3 and len(kept) < 20  # the far rows went first
    assert new["text"] == "Daily closes of ACME." and new["table"]["columns"] == ["Date", "Close"]
    assert _fits_chars(200)(new)


def test_truncate_refuses_answers_computed_from_the_whole_table():
    """A volatility is not in any cell: which rows it used is unknown, so the row is not truncatable."""
    row = {"question": "What is ACME's annualised volatility?", "answer": "23.41%: std of log returns x sqrt(252)",
           "context": {"text": "", "table": _price_table(20)},
           "metadata": {"answer_values": [{"name": "vol", "value": 23.41, "unit": "%"}]}}
    new, why = truncate_context(row, _fits_chars(200))
    assert new is None and why == "the answer's figures are not all in the context (23.41, 252)"
    label = {**row, "answer": "high", "metadata": {}}  # a label computed from every row
    assert truncate_context(label, _fits_chars(200)) == (None, "the answer has no figures to anchor on")


def test_truncate_trims_paragraphs_but_keeps_the_questions_figures():
    paras = [f"Paragraph {i} says revenue grew in region {i}." for i in range(10)]
    paras[2] = "Net sales were 5,829 in 2019."
    paras[7] = "Net sales were 5,735 in 2018."
    row = {"question": "What was the change in net sales from 5,735 in 2018?", "answer": "5,829 vs 5,735",
           "context": {"text": "\n\n".join(paras), "table": None}, "metadata": {}}
    new, why = truncate_context(row, _fits_chars(150))
    assert why == "" and new["table"] is None
    kept = new["text"].split("\n\n")
    assert paras[2] in kept and paras[7] in kept and len(kept) < 10
    assert truncate_context(row, _fits_chars(40)) == (None, "the context holding the question's and answer's "
                                                            "figures alone exceeds max_tokens")


@pytest.mark.slow
def test_run_format_truncate_strategy(demo_cfg, tokenizer):
    """long_context: truncate keeps a lookup over a long table (its answer cell kept) and drops a row whose
    answer is computed from the whole table; both counted in the manifest."""
    demo_cfg.format.long_context = "truncate"
    demo_cfg.format.max_tokens = 400
    lookup = _row("look", task_type="numeric_qa", labels=None, question="What was the close on 2024-01-12?",
                  answer="112.25", context={"text": "Daily closes.", "table": _price_table(31)})
    lookup["metadata"]["answer_values"] = [{"name": "close", "value": 112.25, "unit": "USD"}]
    vol = _row("vol", group="g2", task_type="numeric_qa", labels=None, question="What is the volatility?",
               answer="23.41%", context={"text": "Daily closes.", "table": _price_table(31)})
    vol["metadata"]["answer_values"] = [{"name": "vol", "value": 23.41, "unit": "%"}]
    _write_split(demo_cfg, {"train": [lookup, vol, _row("a", group="g3")], "validation": [], "test": []})
    m = invoke(demo_cfg, "format", tokenizer=tokenizer)
    assert m.long_context == "truncate"
    assert m.counts["train"] == 2 and m.counts["truncated"] == 1 and m.counts["dropped_too_long"] == 1
    out = demo_cfg.paths.stage_dir("format")
    drop = read_jsonl(out / META_DIR / "drops.jsonl")[0]
    assert drop["row_id"] == "vol" and "not all in the context" in drop["detail"]
    import pandas as pd

    df = pd.read_parquet(out / "train.parquet").set_index("id")
    ctx = json.loads(df.loc["look", "context"])
    assert ["2024-01-12", "112.25"] in ctx["table"]["rows"] and len(ctx["table"]["rows"]) < 31
    assert "| 2024-01-12 | 112.25 |" in df.loc["look", "messages"][1]["content"]
    assert json.loads(df.loc["look", "metadata"])["truncated"] == {"table_rows": [len(ctx["table"]["rows"]), 31],
                                                                  "paragraphs": [1, 1]}
    assert df.loc["look", "n_tokens"] <= 400


@pytest.mark.slow
def test_demo_profile_keeps_market_rows(demo_cfg, tokenizer):
    """The demo's market windows fit its max_tokens (single-ticker questions; comparisons hold two tables)."""
    from datagen.sources.market import load_market
    from datagen.sources.market_qa import build_market_qa

    mc = demo_cfg.sources.market
    rows = build_market_qa(load_market(mc), mc)
    kept, drops = format_rows(rows, tokenizer, load_prompt(demo_cfg.format.system_prompt), load_prompt("sft_user"),
                              demo_cfg.format.max_tokens)
    kinds = {r["metadata"]["question_type"] for r in rows}
    kept_kinds = {json.loads(r["metadata"])["question_type"] for r in kept}
    assert kinds - kept_kinds <= {"comparison"}, sorted(kinds - kept_kinds)


@pytest.mark.slow
def test_trl_sft_trainer_takes_the_dataset_as_is(demo_cfg, tokenizer, tmp_path):
    """SFTTrainer tokenizes the `messages` column itself; its assistant mask equals ours."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lm.packaged import resolve_model_path

    _write_split(demo_cfg, {"train": [_row("a"), _row("b", group="g2")], "validation": [], "test": []})
    invoke(demo_cfg, "format", tokenizer=tokenizer)
    ds = load_dataset("parquet", data_dir=str(demo_cfg.paths.stage_dir("format")))
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_path("packaged:gemma3-270m")),
                                                 dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path / "o"), assistant_only_loss=True, max_length=256, max_steps=1,
                     report_to="none", per_device_train_batch_size=1, packing=False, bf16=False,
                     use_cpu=True, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds["train"], processing_class=tokenizer)
    first = trainer.train_dataset[0]
    ids, mask = render_conversation(tokenizer, ds["train"][0]["messages"])
    assert first["input_ids"] == ids and first["assistant_masks"] == mask
    assert sum(mask) == ds["train"][0]["n_assistant_tokens"] == 3
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "high<end_of_turn>\n"


@pytest.mark.slow
def test_format_and_training_share_one_mask_path(tokenizer):
    """The format stage's (ids, mask) of a conversation are exactly what training tokenizes."""
    from datasets import Dataset

    from training.train import tokenize_conversations

    rows = [_row(), _row("x2", task_type="open_qa", answer="Volatility is 45%.", labels=None, context={})]
    msgs = [build_messages(r, SYS, load_prompt("sft_user")) for r in rows]
    trained = tokenize_conversations(Dataset.from_dict({"messages": msgs}), tokenizer)
    for m, ids, mask in zip(msgs, trained["input_ids"], trained["assistant_masks"], strict=True):
        assert (ids, mask) == render_conversation(tokenizer, m)
    kept, drops = format_rows(rows, tokenizer, SYS, load_prompt("sft_user"), max_tokens=512)
    assert [k["n_tokens"] for k in kept] == [len(x) for x in trained["input_ids"]]
    assert [k["n_assistant_tokens"] for k in kept] == [sum(x) for x in trained["assistant_masks"]]


@pytest.mark.slow
def test_a_template_without_generation_markers_fails_format_and_training_alike(tokenizer):
    """Format used the tokenizer's own template and dropped every row of a marker-less template as
    no_assistant_tokens, while training swapped in a training variant: now both take one path, and a
    template TRL cannot patch is refused by both with the config key to change."""
    import copy

    from datasets import Dataset

    from training.train import tokenize_conversations

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", tokenizer.chat_template)
    assert not re.search(r"\{%-?\s*(end)?generation", plain.chat_template)
    with pytest.raises(ValueError, match="model.chat_template"):
        format_rows([_row()], plain, SYS, load_prompt("sft_user"), max_tokens=512)
    msgs = [build_messages(_row(), SYS, load_prompt("sft_user"))]
    with pytest.raises(ValueError, match="model.chat_template"):
        tokenize_conversations(Dataset.from_dict({"messages": msgs}), plain)
