"""CPU training throughput: finsynth's trainer against TRL with its defaults and TRL tuned per its own docs.

Three arms fine-tune the packaged Gemma-3-270M (fp32) with LoRA r16 / alpha 32 on the 7 projections (the demo
profile's LoRA), on the same synthetic finance conversations (a system prompt, a question over a small price
table, a short answer), each in a Python process of its own.

- ``plain_trl``, "TRL, defaults": ``SFTConfig`` defaults (gradient checkpointing on, no packing, batches padded
  to their longest row, loss on the whole sequence) with batch size 2, SDPA attention. One default is
  overridden: ``bf16=False`` -- bf16 autocast runs ~12x slower than fp32 on a CPU without AMX.
- ``trl_tuned``, "TRL, tuned": ``SFTConfig`` as TRL's documentation recommends for speed, with the demo
  profile's batch shape (2 packed rows a pass, 2 passes a step, rows of ``max_length`` 512):

  - ``packing=True, packing_strategy="bfd", padding_free=True``: best-fit-decreasing packing, the batch
    flattened without padding (https://huggingface.co/docs/trl/reducing_memory_usage#packing,
    https://huggingface.co/docs/trl/reducing_memory_usage#padding-free,
    https://huggingface.co/docs/trl/sft_trainer#packing);
  - ``assistant_only_loss=True`` on the ``messages`` rows; the tokenizer's template,
    ``prompts/gemma_chat.jinja``, has the ``{% generation %}`` markers it needs
    (https://huggingface.co/docs/trl/sft_trainer#train-on-assistant-messages-only);
  - ``gradient_checkpointing=False``: on by default in TRL, off where memory allows
    (https://huggingface.co/docs/trl/reducing_memory_usage#gradient-checkpointing);
  - ``use_liger_kernel=True`` only where Liger works: its kernels are Triton kernels for CUDA/ROCm/XPU
    devices, so on a CPU it stays off and the result says why
    (https://huggingface.co/docs/trl/speeding_up_training#liger-kernel-for-memory-optimization,
    https://huggingface.co/docs/trl/liger_kernel_integration);
  - ``bf16=True`` only on a CPU with AMX (``torch.cpu._is_amx_tile_supported()``), else fp32
    (https://huggingface.co/docs/trl/speeding_up_training#mixed-precision-training);
  - attention: SDPA. The docs' optimized attention (flash-attention kernels,
    https://huggingface.co/docs/trl/speeding_up_training#optimized-attention-implementations) is GPU-only;
    transformers' SDPA keeps packed conversations apart with a block-diagonal mask built from the restarting
    ``position_ids``.
- ``finsynth``: :func:`training.train.build_trainer` with the demo profile's settings: the same packing,
  assistant-only loss, no gradient checkpointing on CPU and fp32 without AMX, plus two things of its own: the
  fused LM head scores only the labelled positions (:func:`training.models.compact_lm_head_on_cpu`; TRL's
  fused head scores every position on devices without Triton), and SDPA runs per packed conversation
  (:func:`lm.causal_lm.varlen_sdpa_attention`) instead of over the whole row under a block-diagonal mask.

Each arm runs in a subprocess of its own: finsynth's LM-head switch is process-wide, and peak RSS is then the
arm's own. The figure is tokens/s of *real* (non-pad) tokens over the timed optimizer steps; the first step of
each arm is a warm-up and is not timed. Wall-clock tokens/s depends on what else runs on the machine, so
tokens per CPU-second of the arm's process (``time.process_time``, all torch threads) is recorded too: it is
what to compare when the load average changed between arms. Where the time of a step goes: TRL's chunked
LM-head function (forward and backward) is timed around each call, with the number of positions it scored,
so each arm reports its LM-head seconds and positions per step and its tokens/s without the LM head.

Writes ``benchmarks/results/train_cpu.json``: ``arms.<name>`` (settings with their doc pages, figures, peak
RSS, load average), ``speedup_vs_trl_defaults`` and ``speedup_vs_trl_tuned`` (finsynth over each TRL arm, in
tokens/s and tokens per CPU-second), ``verdict``, the CPU flags and the load average at start and end.

    .venv/bin/python benchmarks/bench_train_cpu.py [--steps 11] [--rows 64] [--arms plain_trl,trl_tuned,finsynth]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import resource
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

RESULTS = Path(__file__).resolve().parent / "results" / "train_cpu.json"
ARMS = ("plain_trl", "trl_tuned", "finsynth")
LABELS = {"plain_trl": "TRL, defaults", "trl_tuned": "TRL, tuned", "finsynth": "finsynth"}
DOCS = {
    "packing": "https://huggingface.co/docs/trl/reducing_memory_usage#packing",
    "padding_free": "https://huggingface.co/docs/trl/reducing_memory_usage#padding-free",
    "sft_packing": "https://huggingface.co/docs/trl/sft_trainer#packing",
    "assistant_only_loss": "https://huggingface.co/docs/trl/sft_trainer#train-on-assistant-messages-only",
    "gradient_checkpointing": "https://huggingface.co/docs/trl/reducing_memory_usage#gradient-checkpointing",
    "liger": "https://huggingface.co/docs/trl/speeding_up_training#liger-kernel-for-memory-optimization",
    "liger_integration": "https://huggingface.co/docs/trl/liger_kernel_integration",
    "mixed_precision": "https://huggingface.co/docs/trl/speeding_up_training#mixed-precision-training",
    "attention": "https://huggingface.co/docs/trl/speeding_up_training#optimized-attention-implementations",
    "truncation": "https://huggingface.co/docs/trl/reducing_memory_usage#truncation",
}
SYSTEM = ("You are a careful financial analyst. Answer only from the context. Give exact figures with units; "
          "for classification questions answer with one label.")


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Synthetic market QA in the shape of the format stage's ``messages`` (varied context length)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ticker = rng.choice(["ACME", "BOLT", "CRUX", "DYNA", "EONX"])
        days = rng.randint(2, 8)  # rows stay within the demo max_length (512): nothing is truncated
        price = rng.uniform(20, 200)
        rows = []
        for d in range(days):
            price *= 1 + rng.gauss(0, 0.02)
            rows.append(f"| 2024-03-{d + 1:02d} | {price:.2f} | {rng.randint(10_000, 900_000)} |")
        table = "| date | close | volume |\n|---|---|---|\n" + "\n".join(rows)
        first, last = float(rows[0].split("|")[2]), float(rows[-1].split("|")[2])
        ret = (last / first - 1) * 100
        kind = i % 3
        if kind == 0:
            q, a = f"What was {ticker}'s total return over the window?", f"The total return was {ret:.2f}%."
        elif kind == 1:
            q = f"Classify {ticker}'s trend over the window as up, down or flat."
            a = "up" if ret > 1 else "down" if ret < -1 else "flat"
        else:
            q = f"What was {ticker}'s highest close, and on which date?"
            best = max(rows, key=lambda r: float(r.split("|")[2]))
            a = f"The highest close was {float(best.split('|')[2]):.2f} USD on {best.split('|')[1].strip()}."
        out.append([{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Context ({ticker} daily prices):\n{table}\n\nQuestion: {q}"},
                    {"role": "assistant", "content": a}])
    return out


# ----------------------------------------------------------------------------- measurement
class LMHeadTimer:
    """Wall seconds inside TRL's chunked LM-head function (forward and backward) and the positions it scored.

    TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``) runs every projection through
    ``trl.kernels.ChunkedLogProbFunction``; its static ``forward`` / ``backward`` are wrapped here (autograd
    looks both up at call time). CPU ops are synchronous, so the wall time around a call is its compute.
    """

    def __init__(self):
        self.seconds = 0.0
        self.positions = 0
        self.calls = 0
        self.active = False

    def install(self) -> bool:
        try:
            from trl.kernels import ChunkedLogProbFunction as fn
        except ImportError:
            return False
        fwd, bwd, timer = fn.forward, fn.backward, self

        def forward(ctx, hidden, *args, **kwargs):
            t0 = time.perf_counter()
            out = fwd(ctx, hidden, *args, **kwargs)
            timer.seconds += time.perf_counter() - t0
            timer.positions += int(hidden.shape[0])
            timer.calls += 1
            return out

        def backward(ctx, *grads):
            t0 = time.perf_counter()
            out = bwd(ctx, *grads)
            timer.seconds += time.perf_counter() - t0
            return out

        fn.forward, fn.backward = staticmethod(forward), staticmethod(backward)
        self.active = True
        return True


class StepClock:
    """Per-step wall time, CPU time, real-token count (TRL's running ``_total_train_tokens``) and LM-head
    seconds / positions (:class:`LMHeadTimer`)."""

    def __init__(self, head: LMHeadTimer | None = None):
        from transformers import TrainerCallback

        clock = self
        self.head = head or LMHeadTimer()

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock._t0, clock._c0 = time.perf_counter(), time.process_time()
                clock._tok0 = clock.trainer._total_train_tokens
                clock._h0, clock._p0 = clock.head.seconds, clock.head.positions

            def on_step_end(self, args, state, control, **kw):
                clock.steps.append((time.perf_counter() - clock._t0, time.process_time() - clock._c0,
                                    clock.trainer._total_train_tokens - clock._tok0,
                                    clock.head.seconds - clock._h0, clock.head.positions - clock._p0))

        self.callback = _CB()
        self.steps: list[tuple[float, float, int, float, int]] = []
        self.trainer = None

    def summary(self) -> dict:
        return summarize_steps(self.steps, head_timed=self.head.active)


def summarize_steps(steps: list[tuple[float, float, int, float, int]], *, head_timed: bool = True) -> dict:
    """Figures over the timed steps (all but the first, the warm-up)."""
    timed = steps[1:] or steps
    secs = sum(s[0] for s in timed)
    cpu = sum(s[1] for s in timed)
    toks = sum(s[2] for s in timed)
    head_s = sum(s[3] for s in timed)
    head_pos = sum(s[4] for s in timed)
    n = len(timed)
    out = {"steps_timed": n, "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2), "tokens": toks,
           "tokens_per_s": round(toks / secs, 2), "tokens_per_cpu_s": round(toks / cpu, 2),
           "s_per_step": round(secs / n, 2), "tokens_per_step": round(toks / n, 1)}
    if head_timed:
        out["lm_head"] = {"s_per_step": round(head_s / n, 2), "share_of_step": round(head_s / secs, 3),
                          "positions_per_step": round(head_pos / n, 1),
                          "positions_per_real_token": round(head_pos / toks, 3) if toks else None,
                          "tokens_per_s_without_head": round(toks / (secs - head_s), 2) if secs > head_s else None}
    out["all_steps_wall_cpu_tokens_head_s_head_positions"] = [
        [round(s[0], 2), round(s[1], 2), s[2], round(s[3], 2), s[4]] for s in steps]
    return out


def rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def amx_tile() -> bool:
    import torch

    fn = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(fn()) if fn else False


def liger_status(device: str = "cpu") -> dict[str, Any]:
    """Whether ``use_liger_kernel=True`` can work here, and why not where it cannot."""
    import torch

    installed = importlib.util.find_spec("liger_kernel") is not None
    triton = importlib.util.find_spec("triton") is not None
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    reasons = []
    if device == "cpu" or not gpu:
        reasons.append("Liger's kernels are Triton kernels for CUDA/ROCm/XPU devices; this arm trains on the CPU"
                       + ("" if gpu else ", and this machine has no such device"))
    if not installed:
        reasons.append("liger_kernel is not installed")
    if not triton:
        reasons.append("triton is not installed")
    return {"use_liger_kernel": not reasons, "liger_kernel_installed": installed, "triton_installed": triton,
            "reason": "; ".join(reasons) or None}


def tuned_sft_config(output_dir: str | Path, *, steps: int, batch: int, accumulation: int, max_length: int,
                     learning_rate: float = 2e-4, device: str = "cpu"):
    """``SFTConfig`` with the settings TRL's docs recommend for speed (see the module docstring), and the
    ``settings`` record of them, each with its doc page."""
    import torch
    from trl import SFTConfig

    from lm.causal_lm import cpu_autocast_dtype

    liger = liger_status(device)
    bf16 = cpu_autocast_dtype() == torch.bfloat16 if device == "cpu" else True
    args = SFTConfig(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accumulation, max_length=max_length,
                     packing=True, packing_strategy="bfd", padding_free=True, assistant_only_loss=True,
                     gradient_checkpointing=False, use_liger_kernel=liger["use_liger_kernel"], bf16=bf16,
                     use_cpu=device == "cpu", report_to=[], save_strategy="no", learning_rate=learning_rate,
                     disable_tqdm=True, seed=0)
    settings = {
        "batch": batch, "gradient_accumulation_steps": accumulation,
        "max_length": {"value": max_length, "docs": DOCS["truncation"]},
        "packing": {"value": args.packing, "packing_strategy": args.packing_strategy,
                    "docs": [DOCS["packing"], DOCS["sft_packing"]]},
        "padding_free": {"value": args.padding_free, "docs": DOCS["padding_free"]},
        "assistant_only_loss": {"value": args.assistant_only_loss, "docs": DOCS["assistant_only_loss"],
                                "template": "prompts/gemma_chat.jinja ({% generation %} markers)"},
        "gradient_checkpointing": {"value": args.gradient_checkpointing, "docs": DOCS["gradient_checkpointing"]},
        "use_liger_kernel": {"value": args.use_liger_kernel, "docs": [DOCS["liger"], DOCS["liger_integration"]],
                             **{k: v for k, v in liger.items() if k != "use_liger_kernel"}},
        "bf16": {"value": args.bf16, "docs": DOCS["mixed_precision"], "amx_tile": amx_tile(),
                 "reason": None if args.bf16 else "no AMX on this CPU: bf16 autocast is ~12x slower than fp32"},
        "attention": {"value": "sdpa", "docs": DOCS["attention"],
                      "reason": "the docs' flash-attention kernels need a GPU"},
        "loss_on": "assistant tokens", "lm_head": "TRL's fused head: every position on a device without Triton",
    }
    return args, settings


# ----------------------------------------------------------------------------- one arm (its own process)
def run_arm(name: str, steps: int, rows: int, model: str | None, out_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from datagen.config import load_config
    from datagen.tokenizer import load_tokenizer
    from training.models import get_peft_config, load_model
    from training.train import build_trainer

    overrides = ["train.device=cpu"] + ([f"model.name_or_path={model}"] if model else [])
    cfg = load_config(profile="demo", overrides=overrides)
    t = cfg.train
    tok = load_tokenizer(cfg.model)
    convs = conversations(rows)
    head = LMHeadTimer()
    head.install()
    clock = StepClock(head)
    load_start = os.getloadavg()
    if name == "plain_trl":
        # pre-tokenized so that the datasets fingerprint of the 262k-vocabulary tokenizer (~30 s) stays out of
        # the run; labels = input_ids, as TRL's default
        ids = [tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in convs]
        sargs = SFTConfig(output_dir=str(out_dir), per_device_train_batch_size=2, max_steps=steps, bf16=False,
                          use_cpu=True, report_to=[], save_strategy="no", learning_rate=2e-4, disable_tqdm=True,
                          seed=0)
        trainer = SFTTrainer(model=load_model(cfg, "cpu", attn="sdpa"), args=sargs,
                             train_dataset=Dataset.from_dict({"input_ids": ids}), processing_class=tok,
                             peft_config=get_peft_config(t), callbacks=[clock.callback])
        settings = {"batch": 2, "gradient_accumulation_steps": 1, "lora_dropout": t.lora.dropout,
                    "padding": "longest", "packing": False, "gradient_checkpointing": sargs.gradient_checkpointing,
                    "loss_on": "all tokens", "attention": "sdpa", "precision": "fp32 (bf16 default overridden)",
                    "lm_head": "TRL's fused head: every position"}
    elif name == "trl_tuned":
        sargs, settings = tuned_sft_config(out_dir, steps=steps, batch=t.per_device_batch_size,
                                           accumulation=t.gradient_accumulation_steps, max_length=t.max_length)
        settings["lora_dropout"] = t.lora.dropout
        trainer = SFTTrainer(model=load_model(cfg, "cpu", attn="sdpa"), args=sargs,
                             train_dataset=Dataset.from_dict({"messages": convs}), processing_class=tok,
                             peft_config=get_peft_config(t), callbacks=[clock.callback])
    elif name == "finsynth":
        ours = cfg.model_copy(deep=True)
        ours.train.max_steps = steps
        ours.train.eval_steps = 10_000
        trainer = build_trainer(ours, Dataset.from_dict({"messages": convs}), None, out_dir, device="cpu",
                                tokenizer=tok, callbacks=[clock.callback])
        trainer.args.disable_tqdm = True
        settings = {"batch": t.per_device_batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
                    "lora_dropout": t.lora.dropout, "max_length": t.max_length, "packing": "bfd, padding-free",
                    "gradient_checkpointing": trainer.args.gradient_checkpointing, "loss_on": "assistant tokens",
                    "attention": trainer.model.config._attn_implementation,
                    "lm_head": "labelled positions only (compact_lm_head_on_cpu)",
                    "precision": "bf16 autocast (AMX)" if trainer.args.bf16 else "fp32",
                    "trainable_token_indices": getattr(next(iter(getattr(trainer.model, "peft_config", {}).values()),
                                                            None), "trainable_token_indices", None)}
    else:
        raise ValueError(f"unknown arm {name!r}; one of {ARMS}")
    clock.trainer = trainer
    trainer.train()
    return {"label": LABELS[name], "settings": settings, **clock.summary(), "peak_rss_gb": rss_gb(),
            "torch_threads": torch.get_num_threads(), "load_avg_start": load_start, "load_avg_end": os.getloadavg()}


# ----------------------------------------------------------------------------- comparison
def ratios(ours: dict, base: dict) -> dict:
    return {"tokens_per_s": round(ours["tokens_per_s"] / base["tokens_per_s"], 2),
            "tokens_per_cpu_s": round(ours["tokens_per_cpu_s"] / base["tokens_per_cpu_s"], 2)}


def verdict(arms: dict) -> str:
    """One sentence: is finsynth faster than tuned TRL (both measures), and where the time of a step goes."""
    if "finsynth" not in arms or "trl_tuned" not in arms:
        return "not compared: finsynth or trl_tuned was not run"
    ours, tuned = arms["finsynth"], arms["trl_tuned"]
    r = ratios(ours, tuned)
    faster = r["tokens_per_s"] > 1 and r["tokens_per_cpu_s"] > 1
    text = (f"finsynth is {'faster' if faster else 'not faster'} than TRL tuned per its docs: "
            f"{r['tokens_per_s']:.2f}x tokens/s, {r['tokens_per_cpu_s']:.2f}x tokens per CPU-second.")
    oh, th = ours.get("lm_head"), tuned.get("lm_head")
    if oh and th:
        text += (f" LM head: TRL tuned {th['s_per_step']:.2f} s of {tuned['s_per_step']:.2f} s a step over "
                 f"{th['positions_per_step']:.0f} positions (every real token), finsynth {oh['s_per_step']:.2f} s of "
                 f"{ours['s_per_step']:.2f} s over {oh['positions_per_step']:.0f} (labelled tokens only).")
        if oh.get("tokens_per_s_without_head") and th.get("tokens_per_s_without_head"):
            rest = oh["tokens_per_s_without_head"] / th["tokens_per_s_without_head"]
            text += f" Without the LM head, finsynth's step runs {rest:.2f}x TRL tuned's tokens/s."
    return text


def data_stats(rows: int, model: str | None) -> dict:
    from datagen.config import load_config
    from datagen.dataset.chat_format import render_conversation
    from datagen.tokenizer import load_tokenizer

    cfg = load_config(profile="demo", overrides=[f"model.name_or_path={model}"] if model else [])
    tok = load_tokenizer(cfg.model)
    rendered = [render_conversation(tok, c) for c in conversations(rows)]
    lengths = [len(ids) for ids, _ in rendered]
    answers = [sum(m) for _, m in rendered]
    return {"rows": rows, "tokens_mean": round(statistics.mean(lengths), 1), "tokens_min": min(lengths),
            "tokens_max": max(lengths), "assistant_tokens_mean": round(statistics.mean(answers), 1),
            "assistant_share": round(sum(answers) / sum(lengths), 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=11, help="optimizer steps per arm, the first a warm-up")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated, run in this order")
    ap.add_argument("--model", default=None, help="model.name_or_path override (tests use a tiny Gemma)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", default=None, help="a note on the run's conditions, kept in the result (``note``)")
    ap.add_argument("--run-arm", choices=ARMS, default=None, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)

    if args.run_arm:
        with tempfile.TemporaryDirectory(prefix=f"bench-train-{args.run_arm}-") as tmp:
            res = run_arm(args.run_arm, args.steps, args.rows, args.model, Path(tmp))
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        return res

    import torch
    import transformers
    import peft
    import trl

    from lm.causal_lm import vector_flags

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(arms) - set(ARMS)
    if unknown:
        ap.error(f"unknown arms {sorted(unknown)}; choose from {ARMS}")
    result: dict = {
        "benchmark": "train_cpu", "model": args.model or "packaged:gemma3-270m",
        "lora": {"r": 16, "alpha": 32, "targets": 7},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__,
                    "cpu_flags": vector_flags(), "amx_tile": amx_tile(), "load_avg_start": os.getloadavg(),
                    "date": time.strftime("%Y-%m-%d %H:%M")},
        "data": data_stats(args.rows, args.model), "steps_per_arm": args.steps, "arm_order": arms,
        "subprocess_per_arm": True, "arms": {},
    }
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + (os.pathsep + os.environ["PYTHONPATH"] if "PYTHONPATH" in os.environ
                                              else "")}
    with tempfile.TemporaryDirectory(prefix="bench-train-cpu-") as tmp:
        for name in arms:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-arm", name, "--steps", str(args.steps),
                   "--rows", str(args.rows), "--out", str(out)] + (["--model", args.model] if args.model else [])
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True, env=env)
            result["arms"][name] = json.loads(out.read_text())
            print(json.dumps({k: v for k, v in result["arms"][name].items()
                              if not k.startswith("all_steps")}, indent=1), flush=True)
    a = result["arms"]
    if "finsynth" in a and "plain_trl" in a:
        result["speedup_vs_trl_defaults"] = ratios(a["finsynth"], a["plain_trl"])
    if "finsynth" in a and "trl_tuned" in a:
        result["speedup_vs_trl_tuned"] = ratios(a["finsynth"], a["trl_tuned"])
    if "trl_tuned" in a and "plain_trl" in a:
        result["trl_tuned_vs_trl_defaults"] = ratios(a["trl_tuned"], a["plain_trl"])
    result["verdict"] = verdict(a)
    if args.note:
        result["note"] = args.note
    result["machine"]["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["verdict"])
    print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
