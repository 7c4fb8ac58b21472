"""Chat formatting: exact messages, exact token ids and loss mask of a known example on the packaged
Gemma tokenizer, length filtering with reasons, the Parquet round-trip, and TRL SFTTrainer's view."""

from __future__ import annotations

import json

import pytest

from datagen.chat_format import build_messages, format_rows, render_conversation, run_format
from datagen.io import read_jsonl, write_jsonl, write_manifest
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
    assert drops[0]["id"] == "long" and drops[0]["reason"] == "too_long" and drops[0]["n_tokens"] > 100


def _write_split(cfg, rows_by_split):
    d = cfg.paths.stage_dir("split")
    for s, rows in rows_by_split.items():
        write_jsonl(d / f"{s}.jsonl", rows)
    write_manifest(d, {"stage": "split"})


@pytest.mark.slow
def test_run_format_parquet_roundtrip(demo_cfg, tokenizer):
    from datasets import load_dataset

    _write_split(demo_cfg, {
        "train": [_row("a"), _row("b", group="g2", task_type="open_qa", answer="About 45%.", labels=None),
                  _row("c", group="g2", rephrase=True, question="Why? " * 400)],
        "validation": [_row("d", group="g3")],
        "test": [],  # an empty split gets no file (load_dataset rejects empty splits)
    })
    m = run_format(demo_cfg, tokenizer=tokenizer)
    out = demo_cfg.paths.stage_dir("dataset")
    assert m["counts"]["train"] == 2 and m["counts"]["validation"] == 1 and m["counts"]["test"] == 0
    assert m["counts"]["dropped_by_reason"] == {"too_long": 1}
    assert read_jsonl(out / "drops.jsonl")[0]["id"] == "c"
    assert {"README.md", "token_lengths.png", "train.parquet", "validation.parquet",
            "drops.jsonl"} == set(m["outputs"]) and m["splits"] == ["train", "validation"]
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
    assert (out / "token_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_trl_sft_trainer_takes_the_dataset_as_is(demo_cfg, tokenizer, tmp_path):
    """SFTTrainer tokenizes the `messages` column itself; its assistant mask equals ours."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from datagen.packaged import resolve_model_path

    _write_split(demo_cfg, {"train": [_row("a"), _row("b", group="g2")], "validation": [], "test": []})
    run_format(demo_cfg, tokenizer=tokenizer)
    ds = load_dataset("parquet", data_dir=str(demo_cfg.paths.stage_dir("dataset")))
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
