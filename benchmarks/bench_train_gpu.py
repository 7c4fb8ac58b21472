"""GPU QLoRA throughput: finsynth's trainer vs plain TRL defaults on a Llama-3.2-3B-shaped model, one run.

A randomly initialised Llama with Llama-3.2-3B's shape (hidden 3072, 28 layers, 24 heads, 8 KV heads,
intermediate 8192, vocabulary 128256, tied embeddings) is saved once as bf16 safetensors and loaded in 4-bit
NF4 with double quantization by both arms; LoRA r16 / alpha 32 on all seven linear projections; sequence
length 2048; the same pre-tokenized rows (lengths drawn between ``--min-len`` and 2048, the last ~30% of
each row marked as the assistant answer).

- plain TRL: ``SFTConfig`` defaults (bf16 autocast, gradient checkpointing, AdamW, padded batches of
  ``--batch-plain`` rows, no packing, SDPA attention) with ``max_length=2048``; loss on every token.
- finsynth: :func:`training.train.build_trainer` with the ``llama32-3b-gpu`` profile: padding-free BFD
  packing into rows of 2048, ``--batch-ours`` rows per step, paged 8-bit AdamW, gradient checkpointing,
  flash attention / Liger kernels when installed, loss on the assistant tokens.

Reported per arm: real (non-pad) tokens/s over the timed steps (after ``--warmup`` steps), peak CUDA memory
(``torch.cuda.max_memory_allocated``), and MFU.

MFU = tokens/s x 4N / peak dense bf16 FLOP/s of the card. N is the model's parameter count with the tied
embedding matrix counted once (it is the LM-head matmul); 4N per token = forward 2N + backward 2N, the
backward of a frozen base needing activation gradients only (LoRA's own FLOPs, <1% of N, are ignored).
Gradient-checkpointing recomputation (another 2N) and attention-score FLOPs (~4*L*s*d per token, ~11% of 2N
at s=2048) are not counted, as is usual for MFU. For the finsynth arm the LM head runs only on labelled
positions, so its true FLOPs per token are a little below 4N; both arms are credited with 4N per real token.
Peak FLOP/s: H100/H200 SXM 989e12, A100 312e12, L4 121e12 (override with ``--peak-tflops``).

    python benchmarks/bench_train_gpu.py                # on a GPU machine; writes results/train_gpu.json
    python benchmarks/bench_train_gpu.py --dry-run --shape tiny   # CPU: arguments, shapes, data, FLOP plan
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "train_gpu.json"
SHAPES = {
    "llama32-3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                       intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=128,
                       rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=True, head_dim=16,
                 max_position_embeddings=4096),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="QLoRA tokens/s and MFU: finsynth vs plain TRL (same run)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama32-3b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--min-len", type=int, default=256, help="shortest row of the synthetic data")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per arm, warm-up included")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-plain", type=int, default=8, help="TRL's default per_device_train_batch_size")
    ap.add_argument("--batch-ours", type=int, default=4, help="packed rows of --seq tokens per step")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--profile", type=Path, default=None,
                    help="write a torch.profiler table of one finsynth step (after warm-up) to this file; "
                         "the profiler slows that timed step: profile in a run of its own")
    ap.add_argument("--dry-run", action="store_true", help="no training: print shapes, data and the FLOP plan")
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def model_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)


def count_params(config) -> int:
    """Parameters of the model (tied embedding counted once), from a meta-device instance: no memory used."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in m.parameters())


def synthetic_rows(n: int, seq: int, min_len: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(min_len, seq)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        answer = max(1, int(length * 0.3))
        rows.append({"input_ids": ids, "assistant_masks": [0] * (length - answer) + [1] * answer})
    return rows


def tiny_tokenizer():
    """A stand-in tokenizer: the rows are pre-tokenized, the trainer only needs pad/eos tokens from it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    return tok


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return v
    return None


class StepClock:
    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                import torch

                torch.cuda.synchronize()
                clock._t0, clock._tok0 = time.perf_counter(), clock.trainer._total_train_tokens

            def on_step_end(self, args, state, control, **kw):
                import torch

                torch.cuda.synchronize()
                done = clock.trainer._total_train_tokens - clock._tok0
                clock.steps.append((time.perf_counter() - clock._t0, done))

        self.callback, self.steps, self.trainer = _CB(), [], None

    def summary(self, warmup: int, flops_per_token: float, peak: float | None) -> dict:
        timed = self.steps[warmup:] or self.steps
        secs, toks = sum(s for s, _ in timed), sum(t for _, t in timed)
        tps = toks / secs
        return {"steps_timed": len(timed), "tokens_per_s": round(tps, 1), "s_per_step": round(secs / len(timed), 3),
                "tokens_per_step": round(toks / len(timed), 1),
                "mfu": round(tps * flops_per_token / (peak * 1e12), 4) if peak else None}


def profile_one_step(step: int, out: Path):
    """A callback that runs ``torch.profiler`` over optimizer step ``step`` + 1 and writes the operators by
    total CUDA time to ``out`` (where the time of a step goes)."""
    import torch
    from transformers import TrainerCallback

    class ProfileStep(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == step:
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None:
                torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
                self.prof = None

    return ProfileStep()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = model_config(args.shape)
    n_params = count_params(config)
    flops_per_token = 4 * n_params
    rows = synthetic_rows(args.rows, args.seq, min(args.min_len, args.seq), config.vocab_size)
    plan = {"benchmark": "train_gpu", "shape": args.shape, "seq": args.seq, "params": n_params,
            "flops_per_token": flops_per_token, "rows": len(rows),
            "row_tokens_mean": round(sum(len(r["input_ids"]) for r in rows) / len(rows), 1),
            "steps": args.steps, "warmup": args.warmup, "batch_plain": args.batch_plain, "batch_ours": args.batch_ours,
            "lora": {"r": 16, "alpha": 32, "targets": "all linear (7 projections)"},
            "quantization": "nf4 + double quant"}
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return plan

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from datagen.config import load_config
    from training.models import get_peft_config, get_quantization_config, load_model
    from training.train import build_trainer

    assert torch.cuda.is_available(), "bench_train_gpu needs a CUDA device (use --dry-run elsewhere)"
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name, args.peak_tflops)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    model_dir = tmp / "model"
    with torch.device("cuda"):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(model_dir)
    tok = tiny_tokenizer()
    tok.save_pretrained(model_dir)
    gc.collect()
    torch.cuda.empty_cache()
    cfg = load_config(profile="llama32-3b-gpu", overrides=[
        f"model.name_or_path={model_dir}", "model.chat_template=null", f"train.max_length={args.seq}",
        f"train.per_device_batch_size={args.batch_ours}", "train.gradient_accumulation_steps=1",
        f"train.max_steps={args.steps}", "train.eval_steps=100000", "train.lora.target_modules=all-linear"])
    ds = Dataset.from_list(rows)
    result = {**plan, "device": name, "peak_tflops": peak, "torch": torch.__version__,
              "transformers": transformers.__version__, "trl": trl.__version__}

    if not args.skip_plain:
        torch.cuda.reset_peak_memory_stats()
        clock = StepClock()
        plain = load_model(cfg, "cuda", quantization_config=get_quantization_config(cfg.train, "cuda"), attn="sdpa")
        sargs = SFTConfig(output_dir=str(tmp / "plain"), max_length=args.seq, max_steps=args.steps,
                          per_device_train_batch_size=args.batch_plain, report_to=[], save_strategy="no",
                          disable_tqdm=True, learning_rate=2e-4)
        trainer = SFTTrainer(model=plain, args=sargs, train_dataset=Dataset.from_list(
            [{"input_ids": r["input_ids"]} for r in rows]), processing_class=tok,
            peft_config=get_peft_config(cfg.train), callbacks=[clock.callback])
        clock.trainer = trainer
        trainer.train()
        result["plain_trl"] = {**clock.summary(args.warmup, flops_per_token, peak),
                               "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                               "settings": {"batch": args.batch_plain, "padding": "longest", "optim": sargs.optim,
                                            "gradient_checkpointing": sargs.gradient_checkpointing, "attn": "sdpa"}}
        print(json.dumps(result["plain_trl"], indent=1))
        del trainer, plain
        gc.collect()
        torch.cuda.empty_cache()

    torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    callbacks = [clock.callback] + ([profile_one_step(args.warmup, args.profile)] if args.profile else [])
    trainer = build_trainer(cfg, ds, None, tmp / "ours", device="cuda", tokenizer=tok, callbacks=callbacks)
    trainer.args.disable_tqdm = True
    clock.trainer = trainer
    trainer.train()
    result["finsynth"] = {**clock.summary(args.warmup, flops_per_token, peak),
                          "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                          "settings": {"batch": args.batch_ours, "packing": "bfd padding-free",
                                       "optim": trainer.args.optim, "attn": trainer.model.config._attn_implementation,
                                       "gradient_checkpointing": trainer.args.gradient_checkpointing}}
    print(json.dumps(result["finsynth"], indent=1))
    if "plain_trl" in result:
        speedup = result["finsynth"]["tokens_per_s"] / result["plain_trl"]["tokens_per_s"]
        result["speedup_tokens_per_s"] = round(speedup, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
