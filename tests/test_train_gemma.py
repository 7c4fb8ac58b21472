"""The real trainer on the packaged Gemma-3-270M: a smoke run whose adapter is reloaded and used, and a short
training after which the tuned model ends its answers with <end_of_turn>."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from datagen.config import load_config
from datagen.io import read_manifest, write_manifest
from datagen.manifest import Manifest, TrainManifest
from datagen.tokenizer import load_tokenizer

ROWS = [
    ("Revenue rose from 120 to 150. What is the growth rate?", "Revenue grew by 25.0%."),
    ("A bond's rating was cut from A to BBB. Is this a downgrade?", "downgrade"),
    ("Closing prices were 10, 11 and 12. What is the average close?", "The average close is 11.0."),
    ("Net income was 30 on revenue of 200. What is the net margin?", "The net margin is 15.0%."),
]


def _frame(rows):
    return pd.DataFrame([{"id": f"g{i}", "messages": [
        {"role": "system", "content": "You are a careful financial analyst."},
        {"role": "user", "content": q},
        {"role": "assistant", "content": a}]} for i, (q, a) in enumerate(rows)])


@pytest.mark.slow
def test_gemma_smoke_run_saves_a_loadable_adapter(tmp_root):
    import torch
    from peft import PeftModel

    from training.models import load_model
    from flows.stages import invoke

    cfg = load_config(profile="tiny", root=tmp_root, overrides=[
        "train.device=cpu", "train.max_steps=2", "train.eval_steps=2", "train.max_length=96",
        "train.per_device_batch_size=2", "train.run_name=smoke"])
    ds_dir = cfg.paths.stage_dir("format")
    ds_dir.mkdir(parents=True)
    _frame(ROWS).to_parquet(ds_dir / "train.parquet")
    _frame(ROWS[:2]).to_parquet(ds_dir / "validation.parquet")
    write_manifest(ds_dir, Manifest(stage="format"))

    manifest = invoke(cfg, "train")
    out = cfg.paths.models_dir / "smoke"
    assert manifest == read_manifest(out, TrainManifest)
    assert manifest.steps == 2 and manifest.precision == "float32"
    assert math.isfinite(manifest.best_eval_loss) and math.isfinite(manifest.final_train_loss)
    assert manifest.parameters["trainable"] == 3_796_992 + 640  # LoRA r16 on the 7 projections of 18 layers, and
    # the <end_of_turn> row (train.lora.end_of_turn), one of 640
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()

    tok = load_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(load_model(cfg, "cpu"), str(out)).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": ROWS[0][0]}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tok.decode(gen[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True), str)


def _qa(i: int) -> tuple[str, str]:
    """A short question and its one-line answer, four kinds, numbers from ``i``."""
    a, b = 100 + 7 * i, 130 + 11 * i
    kind = i % 4
    if kind == 0:
        return f"Revenue rose from {a} to {b}. What is the growth rate?", f"Revenue grew by {100 * (b - a) / a:.1f}%."
    if kind == 1:
        return (f"Closing prices were {a}, {a + 3} and {b}. What is the last close?",
                f"The last close is {b}.00 USD.")
    if kind == 2:
        return f"Net income was {a // 4} on revenue of {b}. What is the net margin?", \
            f"The net margin is {100 * (a // 4) / b:.1f}%."
    return (f"A bond's rating was cut from A to BBB at a yield of {a / 40:.2f}%. Upgrade or downgrade?",
            "downgrade")


@pytest.mark.slow
def test_tuned_model_ends_its_answer_with_end_of_turn(tmp_root):
    """After a short training, greedy answers to held-out prompts end with <end_of_turn> before the limit.

    The base model's <end_of_turn> row is untrained, so LoRA alone does not stop (with
    ``train.lora.end_of_turn=false`` this fails); with the row trained with the adapter, it does, and the
    adapter holds that one row, not the embedding matrix."""
    import torch
    from safetensors import safe_open

    from lm.causal_lm import decode, load_causal_lm, render_prompt, stop_token_ids
    from training.train import train

    cfg = load_config(profile="tiny", root=tmp_root, overrides=[
        "train.device=cpu", "train.max_steps=12", "train.eval_steps=12", "train.max_length=128",
        "train.per_device_batch_size=4", "train.learning_rate=1e-3", "train.lora.dropout=0.0",
        "train.gradient_checkpointing=false", "train.run_name=eot"])
    ds_dir = cfg.paths.stage_dir("format")
    ds_dir.mkdir(parents=True)
    _frame([_qa(i) for i in range(48)]).to_parquet(ds_dir / "train.parquet")
    write_manifest(ds_dir, Manifest(stage="format"))
    out = train(cfg, ds_dir)

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if "lora_" not in k}
    assert list(shapes.values()) == [(1, 640)], shapes  # the one row, no copy of the 262k x 640 matrix

    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, device="cpu", adapter=out)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    held = [_qa(i) for i in range(100, 108)]
    prompts = [tok(render_prompt(tok, [{"role": "system", "content": "You are a careful financial analyst."},
                                       {"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
               for q, _ in held]
    with torch.no_grad():
        answers = [c[0] for c in decode(model, prompts, max_new_tokens=24, stop_ids=stop_token_ids(tok),
                                        pad_id=tok.pad_token_id)]
    texts = [tok.decode(a) for a in answers]
    assert sum(bool(a) and a[-1] == eot for a in answers) == len(held), texts
