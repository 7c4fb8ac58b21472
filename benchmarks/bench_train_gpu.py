"""GPU QLoRA throughput: finsynth's trainer against TRL with its defaults and TRL tuned per its own docs.

A randomly initialised Llama with Llama-3.2-3B's shape (hidden 3072, 28 layers, 24 heads, 8 KV heads,
intermediate 8192, vocabulary 128256, tied embeddings) is saved once as bf16 safetensors and loaded in 4-bit
NF4 with double quantization by every arm; LoRA r16 / alpha 32 on all seven linear projections; sequence
length 2048; the same pre-tokenized rows (lengths drawn between ``--min-len`` and 2048, the last ~30% of
each row marked as the assistant answer).

- ``plain_trl``, "TRL, defaults": ``SFTConfig`` defaults (bf16 autocast, gradient checkpointing, AdamW,
  padded batches of ``--batch-plain`` rows, no packing, SDPA attention) with ``max_length=2048``; loss on
  every token.
- ``trl_tuned``, "TRL, tuned": ``SFTConfig`` as TRL's docs recommend for speed (the pages are in
  ``bench_train_cpu.DOCS``): BFD packing with padding-free batches of ``--batch-ours`` rows
  (``packing=True, packing_strategy="bfd", padding_free=True``), no gradient checkpointing, Liger kernels
  (``use_liger_kernel=True``) where ``liger_kernel`` and Triton are installed, bf16, flash attention when
  ``flash_attn`` is installed (else SDPA; the docs' Hub kernels need the network). Loss on the assistant
  tokens: the rows are pre-tokenized, so TRL folds their ``assistant_masks`` into the labels
  (``assistant_only_loss`` itself applies to ``messages`` rows only).
- ``finsynth``: :func:`training.train.build_trainer` with the ``llama32-3b-gpu`` profile: padding-free BFD
  packing into rows of 2048, ``--batch-ours`` rows per step, paged 8-bit AdamW, gradient checkpointing,
  flash attention (varlen) / Liger kernels when installed, loss on the assistant tokens.

Every run is a subprocess of its own (clean CUDA memory statistics, no allocator state carried over);
``--runs`` runs per arm, interleaved, the arm order rotating each round. Reported per arm: the median,
minimum and maximum over runs of real (non-pad) tokens/s over the timed steps (after ``--warmup`` steps), the
spread ((max - min) / median), peak CUDA memory (``torch.cuda.max_memory_allocated``, the largest run) and
MFU; with the GPU's name, memory, driver, torch / CUDA / transformers / TRL versions.

MFU = tokens/s x 4N / peak dense bf16 FLOP/s of the card. N is the model's parameter count with the tied
embedding matrix counted once (it is the LM-head matmul); 4N per token = forward 2N + backward 2N, the
backward of a frozen base needing activation gradients only (LoRA's own FLOPs, <1% of N, are ignored).
Gradient-checkpointing recomputation (another 2N) and attention-score FLOPs (~4*L*s*d per token, ~11% of 2N
at s=2048) are not counted, as is usual for MFU. Where the LM head runs only on labelled positions, the true
FLOPs per token are a little below 4N; every arm is credited with 4N per real token.
Peak FLOP/s: H100/H200 SXM 989e12, A100 312e12, L4 121e12 (override with ``--peak-tflops``).

    python benchmarks/bench_train_gpu.py                # on a GPU machine; writes results/train_gpu.json
    python benchmarks/bench_train_gpu.py --dry-run --shape tiny   # CPU: arguments, shapes, data, FLOP plan, run order
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train_cpu (the TRL doc pages, liger_status)

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


ARMS = ("plain_trl", "trl_tuned", "finsynth")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="QLoRA tokens/s and MFU: finsynth vs TRL defaults vs TRL tuned")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama32-3b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--min-len", type=int, default=256, help="shortest row of the synthetic data")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="runs per arm, interleaved across arms")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    ap.add_argument("--batch-plain", type=int, default=8, help="TRL's default per_device_train_batch_size")
    ap.add_argument("--batch-ours", type=int, default=4, help="packed rows of --seq tokens per step")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--skip-plain", action="store_true", help="leave out plain_trl (same as --arms without it)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="write a torch.profiler table of one finsynth step (after warm-up) to this file; "
                         "the profiler slows that timed step: profile in a run of its own")
    ap.add_argument("--dry-run", action="store_true", help="no training: print shapes, data, FLOP plan, run order")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--run-arm", choices=ARMS, default=None, help=argparse.SUPPRESS)  # a child: one run
    ap.add_argument("--make-model", action="store_true", help=argparse.SUPPRESS)  # a child: save the model
    ap.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.arm_list = [a for a in arms if not (args.skip_plain and a == "plain_trl")]
    unknown = set(args.arm_list) - set(ARMS)
    if unknown:
        ap.error(f"unknown arms {sorted(unknown)}; choose from {ARMS}")
    return args


def run_order(arms: list[str], runs: int) -> list[tuple[int, str]]:
    """``(run, arm)`` pairs: every arm once per round, the order rotating by one arm each round, so that no arm
    always runs first (on a cold clock) or last."""
    order = []
    for r in range(runs):
        k = r % len(arms) if arms else 0
        order += [(r, a) for a in arms[k:] + arms[:k]]
    return order


def aggregate(runs: list[dict]) -> dict:
    """Median, minimum, maximum and spread over one arm's runs; peak memory of the largest run."""
    tps = [r["tokens_per_s"] for r in runs]
    med = statistics.median(tps)
    mfus = [r["mfu"] for r in runs if r.get("mfu") is not None]
    peaks = [r["peak_cuda_gib"] for r in runs if r.get("peak_cuda_gib") is not None]
    return {"runs": len(runs), "tokens_per_s": round(med, 1), "tokens_per_s_min": round(min(tps), 1),
            "tokens_per_s_max": round(max(tps), 1), "spread": round((max(tps) - min(tps)) / med, 3) if med else None,
            "s_per_step": round(statistics.median(r["s_per_step"] for r in runs), 3),
            "tokens_per_step": round(statistics.median(r["tokens_per_step"] for r in runs), 1),
            "mfu": round(statistics.median(mfus), 4) if mfus else None,
            "peak_cuda_gib": max(peaks) if peaks else None,
            "settings": runs[0].get("settings"), "all_runs": runs}


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    return round(tokens_per_s * flops_per_token / (peak * 1e12), 4) if peak else None


def gpu_machine() -> dict[str, Any]:
    """The GPU (name, memory, driver from ``nvidia-smi``) and the software versions; ``gpu`` is None without one."""
    import torch

    out: dict[str, Any] = {"gpu": None, "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("transformers", "trl", "peft", "bitsandbytes", "accelerate", "liger_kernel", "flash_attn"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - not installed (or broken): recorded as absent
            out[mod] = None
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30, check=True).stdout.strip().splitlines()[0]
        name, mem, driver = (x.strip() for x in q.split(","))
        out.update(gpu=f"{name}, {mem}, driver {driver}", gpu_name=name, driver=driver)
    except Exception:  # noqa: BLE001 - no nvidia-smi: torch's name only
        if torch.cuda.is_available():
            out.update(gpu=torch.cuda.get_device_name(), gpu_name=torch.cuda.get_device_name(), driver=None)
    return out


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
                "mfu": mfu(tps, flops_per_token, peak)}


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


def tuned_sft_config(output_dir: Path, args: argparse.Namespace, *, use_cpu: bool = False):
    """The ``trl_tuned`` arm's ``SFTConfig`` and its settings record (see the module docstring); ``use_cpu`` only
    lets a test build it on a machine without a GPU."""
    from trl import SFTConfig

    from bench_train_cpu import DOCS, liger_status

    liger = liger_status("cuda")
    sargs = SFTConfig(output_dir=str(output_dir), max_length=args.seq, max_steps=args.steps,
                      per_device_train_batch_size=args.batch_ours, packing=True, packing_strategy="bfd",
                      padding_free=True, gradient_checkpointing=False, use_liger_kernel=liger["use_liger_kernel"],
                      bf16=True, use_cpu=use_cpu, report_to=[], save_strategy="no", disable_tqdm=True,
                      learning_rate=2e-4)
    settings = {"batch": args.batch_ours, "max_length": args.seq,
                "packing": {"value": True, "packing_strategy": "bfd", "docs": [DOCS["packing"], DOCS["sft_packing"]]},
                "padding_free": {"value": True, "docs": DOCS["padding_free"]},
                "gradient_checkpointing": {"value": False, "docs": DOCS["gradient_checkpointing"]},
                "use_liger_kernel": {"value": sargs.use_liger_kernel,
                                     "docs": [DOCS["liger"], DOCS["liger_integration"]],
                                     **{k: v for k, v in liger.items() if k != "use_liger_kernel"}},
                "bf16": {"value": True, "docs": DOCS["mixed_precision"]},
                "loss_on": "assistant tokens (pre-tokenized assistant_masks folded into the labels)",
                "optim": sargs.optim}
    return sargs, settings


def run_arm(name: str, args: argparse.Namespace, model_dir: Path, out_dir: Path) -> dict:
    """One run of one arm, in this process (a child of :func:`main`)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lm.causal_lm import is_installed
    from datagen.config import load_config
    from training.models import get_peft_config, get_quantization_config, load_model
    from training.train import build_trainer

    assert torch.cuda.is_available(), "bench_train_gpu needs a CUDA device (use --dry-run elsewhere)"
    config = model_config(args.shape)
    flops_per_token = 4 * count_params(config)
    peak = peak_tflops(torch.cuda.get_device_name(), args.peak_tflops)
    rows = synthetic_rows(args.rows, args.seq, min(args.min_len, args.seq), config.vocab_size)
    tok = tiny_tokenizer()
    cfg = load_config(profile="llama32-3b-gpu", overrides=[
        f"model.name_or_path={model_dir}", "model.chat_template=null", f"train.max_length={args.seq}",
        f"train.per_device_batch_size={args.batch_ours}", "train.gradient_accumulation_steps=1",
        f"train.max_steps={args.steps}", "train.eval_steps=100000", "train.lora.target_modules=all-linear"])
    quant = get_quantization_config(cfg.train, "cuda")
    torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    if name == "plain_trl":
        model = load_model(cfg, "cuda", quantization_config=quant, attn="sdpa")
        sargs = SFTConfig(output_dir=str(out_dir), max_length=args.seq, max_steps=args.steps,
                          per_device_train_batch_size=args.batch_plain, report_to=[], save_strategy="no",
                          disable_tqdm=True, learning_rate=2e-4)
        trainer = SFTTrainer(model=model, args=sargs, train_dataset=Dataset.from_list(
            [{"input_ids": r["input_ids"]} for r in rows]), processing_class=tok,
            peft_config=get_peft_config(cfg.train), callbacks=[clock.callback])
        settings = {"batch": args.batch_plain, "padding": "longest", "optim": sargs.optim,
                    "gradient_checkpointing": sargs.gradient_checkpointing, "attn": "sdpa", "loss_on": "all tokens"}
    elif name == "trl_tuned":
        attn = "flash_attention_2" if is_installed("flash_attn") else "sdpa"
        model = load_model(cfg, "cuda", quantization_config=quant, attn=attn)
        sargs, settings = tuned_sft_config(out_dir, args)
        settings["attn"] = attn
        trainer = SFTTrainer(model=model, args=sargs, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=get_peft_config(cfg.train), callbacks=[clock.callback])
    else:
        callbacks = [clock.callback] + ([profile_one_step(args.warmup, args.profile)] if args.profile else [])
        trainer = build_trainer(cfg, Dataset.from_list(rows), None, out_dir, device="cuda", tokenizer=tok,
                                callbacks=callbacks)
        trainer.args.disable_tqdm = True
        settings = {"batch": args.batch_ours, "packing": "bfd padding-free", "optim": trainer.args.optim,
                    "attn": trainer.model.config._attn_implementation,
                    "gradient_checkpointing": trainer.args.gradient_checkpointing, "loss_on": "assistant tokens"}
    clock.trainer = trainer
    trainer.train()
    return {**clock.summary(args.warmup, flops_per_token, peak),
            "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "settings": settings}


def make_model(shape: str, model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(model_config(shape), dtype=torch.bfloat16).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)


def child(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The command line of a child process of this script (same arguments, plus ``extra``)."""
    keep = ["--shape", args.shape, "--seq", str(args.seq), "--min-len", str(args.min_len), "--rows", str(args.rows),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-plain", str(args.batch_plain),
            "--batch-ours", str(args.batch_ours)]
    if args.peak_tflops:
        keep += ["--peak-tflops", str(args.peak_tflops)]
    return [sys.executable, str(Path(__file__).resolve()), *keep, *extra]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.make_model:
        make_model(args.shape, args.model_dir)
        return {}
    if args.run_arm:
        with tempfile.TemporaryDirectory(prefix=f"bench-gpu-{args.run_arm}-") as tmp:
            res = run_arm(args.run_arm, args, args.model_dir, Path(tmp))
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        return res

    config = model_config(args.shape)
    n_params = count_params(config)
    flops_per_token = 4 * n_params
    rows = synthetic_rows(args.rows, args.seq, min(args.min_len, args.seq), config.vocab_size)
    order = run_order(args.arm_list, args.runs)
    plan = {"benchmark": "train_gpu", "shape": args.shape, "seq": args.seq, "params": n_params,
            "flops_per_token": flops_per_token, "rows": len(rows),
            "row_tokens_mean": round(sum(len(r["input_ids"]) for r in rows) / len(rows), 1),
            "steps": args.steps, "warmup": args.warmup, "runs_per_arm": args.runs, "arms": args.arm_list,
            "run_order": [f"{a}#{r + 1}" for r, a in order], "batch_plain": args.batch_plain,
            "batch_ours": args.batch_ours, "lora": {"r": 16, "alpha": 32, "targets": "all linear (7 projections)"},
            "quantization": "nf4 + double quant",
            "mfu_flops_per_token": "4N (forward 2N + backward 2N; frozen base, no recompute counted)"}
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return plan

    import torch

    assert torch.cuda.is_available(), "bench_train_gpu needs a CUDA device (use --dry-run elsewhere)"
    machine = gpu_machine()
    name = machine.get("gpu_name") or torch.cuda.get_device_name()
    result = {**plan, "device": name, "peak_tflops": peak_tflops(name, args.peak_tflops),
              "date": time.strftime("%Y-%m-%d"), "machine": machine}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    runs: dict[str, list[dict]] = {a: [] for a in args.arm_list}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        model_dir = Path(tmp) / "model"
        subprocess.run(child(args, ["--make-model", "--model-dir", str(model_dir)]), check=True, env=env)
        for r, arm in order:
            out = Path(tmp) / f"{arm}-{r}.json"
            extra = ["--run-arm", arm, "--model-dir", str(model_dir), "--out", str(out)]
            if arm == "finsynth" and args.profile and r == 0:
                extra += ["--profile", str(args.profile)]
            print(f"== {arm} run {r + 1}/{args.runs}", flush=True)
            subprocess.run(child(args, extra), check=True, env=env)
            runs[arm].append(json.loads(out.read_text()))
            print(json.dumps({k: v for k, v in runs[arm][-1].items() if k != "settings"}), flush=True)
    for arm in args.arm_list:
        result[arm] = aggregate(runs[arm])
    result["peak_gib"] = {arm: result[arm]["peak_cuda_gib"] for arm in args.arm_list}
    ours = result.get("finsynth")
    for base, key in (("plain_trl", "speedup_vs_trl_defaults"), ("trl_tuned", "speedup_vs_trl_tuned")):
        if ours and base in result:
            result[key] = round(ours["tokens_per_s"] / result[base]["tokens_per_s"], 2)
    if "speedup_vs_trl_defaults" in result:
        result["speedup_tokens_per_s"] = result["speedup_vs_trl_defaults"]
    if "speedup_vs_trl_tuned" in result:
        faster = result["speedup_vs_trl_tuned"] > 1
        result["verdict"] = (f"finsynth is {'faster' if faster else 'not faster'} than TRL tuned per its docs: "
                             f"{result['speedup_vs_trl_tuned']:.2f}x median tokens/s over {args.runs} runs each")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
