"""Smoke run of the real trainer on the packaged Gemma-3-270M: a few steps, then the adapter is reloaded and used."""

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
    assert manifest.parameters["trainable"] == 3_796_992  # LoRA r16 on the 7 projections of 18 layers
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()

    tok = load_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(load_model(cfg, "cpu"), str(out)).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": ROWS[0][0]}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tok.decode(gen[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True), str)
