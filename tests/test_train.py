"""Trainer tests on a tiny random Gemma-3 (2 layers, hidden 32) with the packaged Gemma tokenizer and template."""

from __future__ import annotations

import json
import os
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from datagen.config import load_config
from datagen.io import read_manifest, write_manifest
from datagen.manifest import Manifest, TrainManifest
from datagen.tokenizer import load_tokenizer
from training.models import expose_lm_head_bias, get_peft_config, get_quantization_config, load_model
from training.plots import loss_series, plot_loss_curves
from training.train import build_sft_config, build_trainer, load_split, train

SYSTEM = "You are a careful financial analyst. Answer from the context."


def _rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        q = f"Revenue was {100 + i} and costs were {60 + i}. What is the operating profit?"
        rows.append({"id": f"r{i}", "category": "ratio", "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": q},
            {"role": "assistant", "content": f"The operating profit is {40} (revenue {100 + i} minus costs {60 + i})."},
        ]})
    return rows


def write_dataset(d: Path, n_train: int = 12, n_val: int = 4) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(_rows(n_train)).to_parquet(d / "train.parquet")
    pd.DataFrame(_rows(n_val, offset=1000)).to_parquet(d / "validation.parquet")
    write_manifest(d, Manifest(stage="format"))
    return d


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_gemma_dir) -> Path:
    return tiny_gemma_dir


def tiny_cfg(root: Path, model_dir: Path, *overrides: str):
    return load_config(profile="tiny", root=root, overrides=[
        f"model.name_or_path={model_dir}", "train.device=cpu", "train.max_length=128",
        "train.per_device_batch_size=2", "train.learning_rate=0.01", "train.lora.r=4", "train.lora.alpha=8",
        "train.lora.dropout=0.0", *overrides])


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(load_config(profile="demo", overrides=[f"model.name_or_path={tiny_model_dir}"]).model)


# ----------------------------------------------------------------------------- factories
def test_quantization_config_by_device(monkeypatch):
    cfg = load_config(profile="demo")
    assert get_quantization_config(cfg.train.model_copy(update={"quantization": "auto"}), "cpu") is None
    assert get_quantization_config(cfg.train.model_copy(update={"quantization": "none"}), "cuda") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    q = get_quantization_config(cfg.train.model_copy(update={"quantization": "auto"}), "cuda")
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    q = get_quantization_config(cfg.train.model_copy(update={"quantization": "auto"}), "cuda")
    assert q.bnb_4bit_compute_dtype == torch.float16
    q = get_quantization_config(cfg.train.model_copy(update={"quantization": "nf4"}), "cpu")
    assert q.bnb_4bit_compute_dtype == torch.float32


def test_peft_config_from_train_section():
    cfg = load_config(profile="demo", overrides=["train.lora.r=8", "train.lora.alpha=16", "train.lora.dropout=0.1"])
    p = get_peft_config(cfg.train)
    assert (p.r, p.lora_alpha, p.lora_dropout, p.bias, p.task_type) == (8, 16, 0.1, "none", "CAUSAL_LM")
    assert p.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    p = get_peft_config(load_config(profile="demo", overrides=["train.lora.target_modules=all-linear"]).train)
    assert p.target_modules == "all-linear"


def test_peft_config_trains_the_end_of_turn_row(tok):
    """With a tokenizer, the end-of-turn token's row (Gemma's <end_of_turn>, id 106) is trained with the adapter."""
    assert tok.convert_tokens_to_ids("<end_of_turn>") == 106
    assert get_peft_config(load_config(profile="demo").train, tok).trainable_token_indices == [106]
    assert get_peft_config(load_config(profile="demo").train).trainable_token_indices is None  # no tokenizer
    off = load_config(profile="demo", overrides=["train.lora.end_of_turn=false"]).train
    assert get_peft_config(off, tok).trainable_token_indices is None


@pytest.mark.slow
def test_end_of_turn_row_learns_on_the_output_side(tmp_path, tiny_model_dir, tok):
    """The tied LM head's end-of-turn row gets a gradient through TRL's fused LM head (which reads the head's
    weight and bias): a label of 106 with no 106 in the input moves the one-row delta."""
    cfg = tiny_cfg(tmp_path, tiny_model_dir)
    d = write_dataset(tmp_path / "ds", 4, 0)
    trainer = build_trainer(cfg, load_split(d, "train"), None, tmp_path / "ck", tokenizer=tok)
    deltas = {n: p for n, p in trainer.model.named_parameters() if "trainable_tokens_delta" in n}
    assert [tuple(p.shape) for p in deltas.values()] == [(1, 32)]  # one row, shared by embeddings and LM head
    assert not expose_lm_head_bias(trainer.model)  # applied once by build_trainer
    head = trainer.model.get_output_embeddings()
    assert head.bias is None and head.weight.grad_fn is not None  # the effective weight, trained row included
    ids = torch.tensor([[2, 100, 200, 300, 400]])
    labels = torch.tensor([[-100, -100, -100, -100, 106]])
    trainer.model.train()
    trainer.model(input_ids=ids, labels=labels, fused_lm_head=True).loss.backward()
    (delta,) = deltas.values()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_save_steps_that_do_not_line_up_with_eval_steps_are_refused(tmp_path):
    """The best checkpoint is chosen at evaluation steps, so a save step must be one of them: refused up
    front, naming the keys (what the trainer does with the settings is pinned by the real training runs
    below: steps, best eval loss, resume)."""
    with pytest.raises(ValueError, match="multiple of train.eval_steps"):
        build_sft_config(load_config(profile="demo", overrides=["train.save_steps=5"]), tmp_path, "cpu",
                         has_eval=True)


def test_load_split_keeps_messages_only(tmp_path):
    d = write_dataset(tmp_path / "ds", 3, 2)
    ds = load_split(d, "train")
    assert ds.column_names == ["messages"] and len(ds) == 3
    assert ds[0]["messages"][2] == {"role": "assistant", "content": _rows(1)[0]["messages"][2]["content"]}
    assert load_split(d, "test") is None


# ----------------------------------------------------------------------------- masks and packing
@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_prompt_tokens_are_masked(tmp_path, tiny_model_dir, tok, packing):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, f"train.packing={str(packing).lower()}")
    ds = load_split(write_dataset(tmp_path / "ds", 2, 0), "train")
    trainer = build_trainer(cfg, ds, None, tmp_path / "ck", tokenizer=tok)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    ids, labels = batch["input_ids"].flatten(), batch["labels"].flatten()
    rows = _rows(2)
    # only the assistant answers (with their end-of-turn) carry labels; everything else is -100
    trained = tok.decode(ids[labels != -100])
    answers = [r["messages"][2]["content"] + "<end_of_turn>\n" for r in rows]
    assert sorted(trained.split("<end_of_turn>\n")[:-1]) == sorted(a.removesuffix("<end_of_turn>\n") for a in answers)
    assert trained.count("<end_of_turn>\n") == 2
    # per conversation: the first labelled token is the first answer token, after the whole prompt
    prompt_ids = tok.apply_chat_template(rows[0]["messages"][:2], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    one = trainer.train_dataset[0] if not packing else None
    if one is not None:
        n_prompt = len(prompt_ids) if ids[: len(prompt_ids)].tolist() == prompt_ids else None
        assert n_prompt is not None
        assert (torch.tensor(one["labels"][:n_prompt]) == -100).all()
        assert one["labels"][n_prompt] == one["input_ids"][n_prompt] != -100
        assert "attention_mask" in batch
    else:
        assert "position_ids" in batch and "attention_mask" not in batch  # padding-free
        assert int((batch["position_ids"][0] == 0).sum()) == 2


@pytest.mark.slow
def test_packed_loss_equals_separate_sequences(tmp_path, tiny_model_dir, tok):
    """Padding-free packing on CPU/SDPA keeps conversations apart: same loss as scoring each one alone."""
    cfg = tiny_cfg(tmp_path, tiny_model_dir, "train.packing=true")
    ds = load_split(write_dataset(tmp_path / "ds", 3, 0), "train")
    trainer = build_trainer(cfg, ds, None, tmp_path / "ck", tokenizer=tok)
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert int((batch["position_ids"][0] == 0).sum()) == 3
    with torch.no_grad():
        packed = trainer.compute_loss(model, dict(batch)).item()
        nll, n = 0.0, 0
        for row in ds:
            enc = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            ids = torch.tensor([enc["input_ids"]])
            labels = torch.tensor(enc["input_ids"])
            labels[torch.tensor(enc["assistant_masks"]) == 0] = -100
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum").item()
            n += int((labels[1:] != -100).sum())
    assert packed == pytest.approx(nll / n, rel=1e-5)


def test_cpu_training_scores_each_packed_conversation_alone(tmp_path, tiny_model_dir, tok, monkeypatch):
    """On CPU the trainer's attention is SDPA one packed conversation at a time: the same loss and LoRA
    gradients as transformers' SDPA over the block-diagonal mask (conversations longer than the tiny model's
    16-token sliding window included), from one SDPA call per conversation and layer instead of one per layer
    over the whole row."""
    from lm.causal_lm import VARLEN_SDPA

    cfg = tiny_cfg(tmp_path, tiny_model_dir, "train.packing=true")
    ds = load_split(write_dataset(tmp_path / "ds", 3, 0), "train")
    trainer = build_trainer(cfg, ds, None, tmp_path / "ck", tokenizer=tok)
    assert trainer.model.config._attn_implementation == VARLEN_SDPA
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    lengths = batch["cu_seq_lens_q"].diff().tolist()
    assert len(lengths) == 3 and min(lengths) > 16  # longer than the sliding window

    calls: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: calls.append(q.shape[2]) or sdpa(q, *a, **k))

    def loss_and_grads(attn: str) -> tuple[float, dict[str, torch.Tensor]]:
        trainer.model.set_attn_implementation(attn)
        calls.clear()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.model.zero_grad(set_to_none=True)
        return loss.item(), grads

    loss, grads = loss_and_grads(VARLEN_SDPA)
    assert sorted(calls) == sorted(lengths * 2)  # 2 layers, one call per conversation
    ref_loss, ref_grads = loss_and_grads("sdpa")
    assert calls == [sum(lengths)] * 2
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), name


# ----------------------------------------------------------------------------- training
@pytest.mark.slow
def test_lora_trains_and_base_is_frozen(tmp_path, tiny_model_dir, tok):
    cfg = tiny_cfg(tmp_path, tiny_model_dir, "train.max_steps=3", "train.eval_steps=3")
    d = write_dataset(tmp_path / "ds", 8, 2)
    trainer = build_trainer(cfg, load_split(d, "train"), load_split(d, "validation"), tmp_path / "ck", tokenizer=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    row = [n for n in before if "trainable_tokens_delta" in n]  # the end-of-turn row (train.lora.end_of_turn)
    base = [n for n in before if "lora_" not in n and n not in row]
    assert lora and base and len(row) == 1
    assert all(not after[n].requires_grad for n in base)
    assert all(torch.equal(before[n], after[n]) for n in base)
    assert all(not torch.equal(before[n], after[n]) for n in lora + row if "lora_A" not in n)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert any("eval_loss" in r for r in trainer.state.log_history)


@pytest.mark.slow
def test_nf4_on_cpu(tmp_path, tiny_model_dir, tok):
    import bitsandbytes as bnb

    cfg = tiny_cfg(tmp_path, tiny_model_dir, "train.quantization=nf4", "train.max_steps=2", "train.packing=false")
    model = load_model(cfg, "cpu")
    assert getattr(model, "is_loaded_in_4bit", False)
    q = model.model.layers[0].mlp.down_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4"
    packed = q.weight.detach().clone()
    d = write_dataset(tmp_path / "ds", 4, 0)
    trainer = build_trainer(cfg, load_split(d, "train"), None, tmp_path / "ck", model=model, tokenizer=tok)
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    now = dict(trainer.model.named_parameters())
    assert all(not torch.equal(v, now[n]) for n, v in lora_b.items())
    assert torch.equal(packed, trainer.model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight)
    assert all(math.isfinite(r["loss"]) for r in trainer.state.log_history if "loss" in r)


@pytest.mark.slow
def test_train_stage_outputs_and_resume(tmp_path, tiny_model_dir):
    """train() writes adapter, tokenizer, plot and manifest; an interrupted run resumes from its checkpoint."""
    from peft import PeftModel

    cfg = tiny_cfg(tmp_path, tiny_model_dir, "train.max_steps=4", "train.eval_steps=2",
                   "train.keep_checkpoints=true", "train.run_name=tiny", "train.merge=true")
    d = write_dataset(tmp_path / "ds", 16, 4)
    out = train(cfg, d)
    assert out == cfg.paths.models_dir / "tiny"
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
              "loss.png", "log_history.json", "manifest.json"):
        assert (out / f).exists(), f
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    m = read_manifest(out, TrainManifest)
    assert m.stage == "train" and m.steps == 4 and m.resumed_from is None
    assert m.upstream["format"] and m.best_eval_loss == min(
        r["eval_loss"] for r in json.loads((out / "log_history.json").read_text()) if "eval_loss" in r)
    assert m.tokens_per_s > 0 and m.train_tokens > 0 and m.memory["peak_rss_bytes"] > 0
    assert m.libraries["trl"] and m.config["train"]["max_steps"] == 4
    assert "adapter_model.safetensors" in m.outputs
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert m.merged_dir == "merged" and (out / "merged" / "model.safetensors").exists()
    adapter = PeftModel.from_pretrained(load_model(cfg, "cpu"), str(out)).eval()
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in adapter.named_parameters())
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.tensor([[2, 105, 2364, 107, 818]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-4)

    # interrupted after the step-2 checkpoint: the rerun resumes there and finishes at step 4
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    (out / "manifest.json").unlink()
    m2 = read_manifest(train(cfg, d), TrainManifest)
    assert m2.resumed_from == "checkpoint-2" and m2.steps == 4


def test_loss_series_and_plot(tmp_path):
    hist = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}, {"eval_loss": 1.7, "step": 2},
            {"train_runtime": 3.0, "step": 2}]
    assert loss_series(hist) == {"train": [(1, 2.0), (2, 1.5)], "eval": [(2, 1.7)]}
    p = plot_loss_curves(hist, tmp_path / "loss.png", best_step=2)
    assert p.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_two_processes_with_torchrun_match_one(tmp_path, tiny_model_dir):
    """Issue 30.5: ``torchrun --standalone --nproc_per_node 2 -m flows.cli train`` on CPU (gloo): world size 2,
    each rank collates half of the rows, rank 0 alone writes (one summary, one manifest), and the loss of each
    step matches one process with the same global batch (4 rows: 2 per rank vs 4 in one)."""
    import subprocess
    import sys

    def run(root: Path, launcher: list[str], per_device: int) -> dict:
        write_dataset(root / "data" / "processed" / "format", 16, 4)
        args = ["train", "--profile", "tiny", "--root", str(root), "--set", f"model.name_or_path={tiny_model_dir}",
                "--set", "train.device=cpu", "--set", "train.max_length=128", "--set", "train.packing=false",
                "--set", f"train.per_device_batch_size={per_device}", "--set", "train.gradient_accumulation_steps=1",
                "--set", "train.max_steps=4", "--set", "train.eval_steps=1000", "--set", "train.learning_rate=0.01",
                "--set", "train.lora.dropout=0.0", "--set", "train.run_name=ddp", "--set", "train.logging_steps=1"]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, *launcher, "-m", "flows.cli", *args], env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count('"stage": "train"') == 1, r.stdout  # one summary: rank 0's
        out = root / "data" / "models" / "ddp"
        m = read_manifest(out, TrainManifest)
        assert m is not None
        log_history = json.loads((out / "log_history.json").read_text())
        return {**m.to_json(), "losses": [r["loss"] for r in log_history if "loss" in r]}

    two = run(tmp_path / "two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], 2)
    one = run(tmp_path / "one", [], 4)
    assert two["distributed"]["world_size"] == 2 and one["distributed"]["world_size"] == 1
    assert two["distributed"]["backend"] == "gloo"
    assert two["steps"] == one["steps"] == 4
    seen = two["distributed"]["rows_seen_by_rank"]
    assert len(seen) == 2 and seen[0] == seen[1] and sum(seen) == one["distributed"]["rows_seen_by_rank"][0]
    l1, l2 = one["losses"], two["losses"]
    assert len(l1) == len(l2) >= 2
    assert all(abs(a - b) <= 0.02 * abs(a) for a, b in zip(l1, l2)), (l1, l2)
