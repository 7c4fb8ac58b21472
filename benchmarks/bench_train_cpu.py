"""CPU training throughput: finsynth's trainer vs plain TRL defaults, Gemma-3-270M LoRA r16, same data, one run.

Both arms fine-tune the packaged Gemma-3-270M (fp32) with LoRA r16 / alpha 32 on the 7 projections, on the
same synthetic finance conversations (a system prompt, a question over a small price table, a short answer).

- baseline, "plain TRL": ``SFTConfig`` defaults (gradient checkpointing on, no packing, batches padded to
  their longest row, loss on the whole sequence, TRL's fused LM head scoring every position on CPU) with
  batch size 2. One default is overridden: ``bf16=False`` -- TRL's default bf16 autocast runs ~12x slower on
  this CPU (136 s/step measured), which would make the comparison meaningless and the run hours long.
- finsynth: :func:`training.train.build_trainer` with the demo profile's training settings: loss on the
  assistant tokens only, padding-free best-fit packing into rows of ``max_length``, no gradient
  checkpointing on CPU (memory is not the constraint there), and the fused LM head scoring only the
  labelled positions.

The figure is tokens/s of *real* (non-pad) tokens over the timed optimizer steps; the first step of each
arm is a warm-up and is not timed. Wall-clock tokens/s depends on what else runs on the machine (a shared
2-core box here), so tokens per CPU-second of this process (``time.process_time``, both torch threads) is
recorded too: it is what to compare when the load average changed between the two arms. The baseline
runs first, before finsynth's process-wide CPU switch for the LM head is applied.
Writes ``benchmarks/results/train_cpu.json``.

    .venv/bin/python benchmarks/bench_train_cpu.py [--steps-baseline 11] [--steps-ours 11] [--rows 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "train_cpu.json"
SYSTEM = ("You are a careful financial analyst. Answer only from the context. Give exact figures with units; "
          "for classification questions answer with one label.")


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Synthetic market QA in the shape of the format stage's ``messages`` (varied context length)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ticker = rng.choice(["ACME", "BOLT", "CRUX", "DYNA", "EONX"])
        days = rng.randint(2, 8)  # rows stay within the demo max_length (384): nothing is truncated
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


class StepClock:
    """Per-step wall time and real-token count (TRL's running ``_total_train_tokens``)."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock._t0, clock._c0 = time.perf_counter(), time.process_time()
                clock._tok0 = clock.trainer._total_train_tokens

            def on_step_end(self, args, state, control, **kw):
                clock.steps.append((time.perf_counter() - clock._t0, time.process_time() - clock._c0,
                                    clock.trainer._total_train_tokens - clock._tok0))

        self.callback = _CB()
        self.steps: list[tuple[float, float, int]] = []
        self.trainer = None

    def summary(self) -> dict:
        timed = self.steps[1:] or self.steps  # the first step warms up
        secs = sum(s for s, _, _ in timed)
        cpu = sum(c for _, c, _ in timed)
        toks = sum(t for _, _, t in timed)
        return {"steps_timed": len(timed), "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2), "tokens": toks,
                "tokens_per_s": round(toks / secs, 2), "tokens_per_cpu_s": round(toks / cpu, 2),
                "s_per_step": round(secs / len(timed), 2), "tokens_per_step": round(toks / len(timed), 1),
                "all_steps_wall_cpu_tokens": [[round(s, 2), round(c, 2), t] for s, c, t in self.steps]}


def rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps-baseline", type=int, default=11)
    ap.add_argument("--steps-ours", type=int, default=11)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import tempfile

    import torch
    import trl
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lm.causal_lm import vector_flags
    from datagen.config import load_config
    from datagen.tokenizer import load_tokenizer
    from training.models import get_peft_config, load_model
    from training.train import build_trainer

    cfg = load_config(profile="demo", overrides=["train.device=cpu"])
    tok = load_tokenizer(cfg.model)
    convs = conversations(args.rows)
    lengths = [len(tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in convs]
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    result: dict = {
        "benchmark": "train_cpu", "model": cfg.model.name_or_path, "lora": {"r": 16, "alpha": 32, "targets": 7},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(),
                    "torch": torch.__version__, "trl": trl.__version__, "load_avg_start": os.getloadavg(),
                    "cpu_flags": vector_flags(),
                    "date": time.strftime("%Y-%m-%d")},
        "data": {"rows": len(convs), "tokens_mean": round(statistics.mean(lengths), 1), "tokens_min": min(lengths),
                 "tokens_max": max(lengths)},
    }

    # --- baseline: plain TRL defaults (padded batches), fp32; pre-tokenized so that the datasets fingerprint of
    # the 262k-vocabulary tokenizer (~30 s) stays out of the run; labels = input_ids, as TRL's default
    plain_ids = [tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in convs]
    plain_ds = Dataset.from_dict({"input_ids": plain_ids})
    clock = StepClock()
    base_args = SFTConfig(output_dir=str(tmp / "plain"), per_device_train_batch_size=2, max_steps=args.steps_baseline,
                          bf16=False, use_cpu=True, report_to=[], save_strategy="no", learning_rate=2e-4,
                          disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=load_model(cfg, "cpu"), args=base_args, train_dataset=plain_ds, processing_class=tok,
                         peft_config=get_peft_config(cfg.train), callbacks=[clock.callback])
    clock.trainer = trainer
    trainer.train()
    result["plain_trl"] = {"settings": {"batch": 2, "gradient_accumulation_steps": 1,
                                        "lora_dropout": cfg.train.lora.dropout, "padding": "longest", "packing": False,
                                        "gradient_checkpointing": base_args.gradient_checkpointing,
                                        "loss_on": "all tokens", "precision": "fp32 (bf16 default overridden)"},
                           **clock.summary(), "peak_rss_gb": rss_gb()}
    del trainer
    print(json.dumps(result["plain_trl"], indent=1))

    # --- finsynth: build_trainer with the demo profile's settings
    clock = StepClock()
    ours_cfg = cfg.model_copy(deep=True)
    ours_cfg.train.max_steps = args.steps_ours
    ours_cfg.train.eval_steps = 10_000
    ds = Dataset.from_dict({"messages": convs})
    trainer = build_trainer(ours_cfg, ds, None, tmp / "ours", device="cpu", tokenizer=tok, callbacks=[clock.callback])
    trainer.args.disable_tqdm = True
    clock.trainer = trainer
    trainer.train()
    t = ours_cfg.train
    result["finsynth"] = {"settings": {"batch": t.per_device_batch_size,
                                       "gradient_accumulation_steps": t.gradient_accumulation_steps,
                                       "lora_dropout": t.lora.dropout, "max_length": t.max_length,
                                       "packing": "bfd, padding-free",
                                       "gradient_checkpointing": t.gradient_checkpointing,
                                       "loss_on": "assistant tokens", "lm_head": "labelled positions only",
                                       "precision": "fp32"},
                          **clock.summary(), "peak_rss_gb_process": rss_gb()}
    print(json.dumps(result["finsynth"], indent=1))

    ours, plain = result["finsynth"], result["plain_trl"]
    result["speedup_tokens_per_s"] = round(ours["tokens_per_s"] / plain["tokens_per_s"], 2)
    result["speedup_tokens_per_cpu_s"] = round(ours["tokens_per_cpu_s"] / plain["tokens_per_cpu_s"], 2)
    result["machine"]["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"speedup {result['speedup_tokens_per_s']}x wall, {result['speedup_tokens_per_cpu_s']}x CPU -> {args.out}")
    return result


if __name__ == "__main__":
    main()
