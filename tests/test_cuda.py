"""The GPU path end to end: QLoRA load (NF4, double quantization, bf16 compute), training steps, adapter save and
reload, merge onto the unquantized base, generation. Runs wherever CUDA is present (the device machine:
``scripts/gpu_check.sh``) and is skipped elsewhere; ``FINSYNTH_TEST_DEVICE=cpu`` runs the same steps on the CPU
(bitsandbytes' NF4 works there too, in fp32) to check the test itself.

The model is a random 2-layer Llama saved as bf16 safetensors (no weights can be downloaded there), the rows are
pre-tokenized (the benchmark's stand-in tokenizer), so only finsynth's loader, trainer and merge are under test.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

DEVICE = os.environ.get("FINSYNTH_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or FINSYNTH_TEST_DEVICE=cpu)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from bench_train_gpu import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    mc = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(mc).to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_qlora_trains_saves_reloads_merges_and_generates(tmp_path, model_dir):
    import bitsandbytes as bnb
    from bench_train_gpu import synthetic_rows, tiny_tokenizer
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lm.causal_lm import load_causal_lm
    from datagen.config import load_config
    from training.models import load_model
    from training.train import build_trainer, merge_adapter

    cfg = load_config(profile="llama32-3b-gpu", root=tmp_path, overrides=[
        f"model.name_or_path={model_dir}", "model.chat_template=null", "train.quantization=nf4",
        "train.max_length=128", "train.per_device_batch_size=4", "train.gradient_accumulation_steps=1",
        "train.max_steps=40", "train.learning_rate=0.003", "train.warmup_ratio=0", "train.eval_steps=100000",
        "train.logging_steps=1", "train.lora.target_modules=all-linear"])
    model = load_model(cfg, DEVICE)
    q = model.model.layers[0].mlp.down_proj
    assert getattr(model, "is_loaded_in_4bit", False)
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4" and q.weight.device.type == DEVICE
    if DEVICE == "cuda":
        assert q.compute_dtype == torch.bfloat16
    packed = q.weight.detach().clone()

    rows = synthetic_rows(8, 96, 64, 512, seed=1) * 4  # the same 8 rows again and again: the loss must fall
    trainer = build_trainer(cfg, Dataset.from_list(rows), None, tmp_path / "ck", device=DEVICE, model=model,
                            tokenizer=tiny_tokenizer())
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora_b
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) >= 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    now = dict(trainer.model.named_parameters())
    assert all(not torch.equal(v, now[n]) for n, v in lora_b.items())  # LoRA learned
    base_now = trainer.model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
    assert torch.equal(packed.contiguous().view(torch.uint8), base_now.detach().contiguous().view(torch.uint8))

    adapter = tmp_path / "adapter"
    trainer.model.save_pretrained(adapter)
    ids = torch.tensor([rows[0]["input_ids"][:48]], device=DEVICE)
    trainer.model.eval()
    with torch.no_grad():
        ref = trainer.model(input_ids=ids).logits.float()
    again = PeftModel.from_pretrained(load_model(cfg, DEVICE), adapter).eval()  # a fresh 4-bit base + the file
    with torch.no_grad():
        out = again(input_ids=ids).logits.float()
    # the same model up to bf16 rounding (the trainer's copy ran under autocast)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95

    merged_dir = merge_adapter(cfg, adapter, tmp_path / "merged", device=DEVICE)  # onto the bf16 base
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).to(DEVICE).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    with torch.no_grad():
        m = merged(input_ids=ids).logits.float()
    unmerged = load_causal_lm(cfg.model, device=DEVICE, adapter=adapter).eval()  # bf16 base + adapter, unmerged
    with torch.no_grad():
        u = unmerged(input_ids=ids).logits.float()
    assert (m - u).abs().max() <= 0.05 * u.abs().max() and (m.argmax(-1) == u.argmax(-1)).float().mean() >= 0.9
    # the 4-bit model it was trained as differs by NF4's rounding only
    assert torch.nn.functional.cosine_similarity(m.flatten(), ref.flatten(), dim=0) > 0.9
    gen = merged.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert gen.shape[1] > ids.shape[1] and torch.equal(gen[0, :ids.shape[1]], ids[0])


@pytest.mark.skipif(DEVICE != "cuda", reason="the fused varlen kernel is CUDA's")
@pytest.mark.parametrize("window", [None, 24])
def test_packed_attention_is_one_varlen_call_and_equals_per_conversation_sdpa(window):
    """On CUDA the packed row's conversations go through one flash-attention varlen call; the result equals
    scoring each conversation alone with SDPA (causal, within the sliding window), GQA included."""
    from types import SimpleNamespace

    from lm.causal_lm import flash_varlen, varlen_sdpa_attention

    torch.manual_seed(0)
    lens = [40, 7, 64, 1, 33]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")
    t, h, kvh, d = sum(lens), 8, 2, 64
    q = torch.randn(1, h, t, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kvh, t, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, kvh, t, d, device="cuda", dtype=torch.bfloat16)
    module = SimpleNamespace(num_key_value_groups=h // kvh)
    kr, vr = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
    if window is not None and flash_varlen(q, kr, vr, cu, 0.0, None, window) is None:
        pytest.skip("this torch's varlen kernel takes no window")
    out, _ = varlen_sdpa_attention(module, q, k, v, None, scaling=d ** -0.5, sliding_window=window, cu_seq_lens_q=cu)
    assert flash_varlen(q, kr, vr, cu, 0.0, d ** -0.5, window) is not None  # the fused path ran
    ref = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n = b - a
        i = torch.arange(n, device="cuda")
        mask = (i[None, :] <= i[:, None]) & ((i[None, :] > i[:, None] - window) if window else True)
        ref.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b].float(), kr[:, :, a:b].float(), vr[:, :, a:b].float(), attn_mask=mask, scale=d ** -0.5))
    ref = torch.cat(ref, dim=2).transpose(1, 2)
    assert out.shape == ref.shape
    assert (out.float() - ref).abs().max() < 2e-2
