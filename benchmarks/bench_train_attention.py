"""Training attention on CPU: SDPA per packed conversation (finsynth) vs SDPA over the whole packed row.

One process, one model, the same batch. The trainer is :func:`training.train.build_trainer` with the
demo settings: padding-free best-fit packing into rows of ``max_length``, assistant-only loss, LM head
on the labelled positions. The batch is ``per_device_batch_size`` packed rows, flattened into one
sequence by TRL's collator. Both arms time the same work, ``compute_loss`` plus ``backward``, on the
same model:

- baseline, ``sdpa``: transformers' SDPA over the whole flattened sequence, with the block-diagonal mask
  it builds from the restarting ``position_ids``;
- ``finsynth_varlen_sdpa``: :func:`lm.causal_lm.varlen_sdpa_attention`, one SDPA call per
  conversation.

The two arms alternate. The first pair is a warm-up and is not timed. The result records the median per
arm, the loss of each arm (they must agree) and the load average. Writes
``benchmarks/results/train_attention.json``.

    .venv/bin/python benchmarks/bench_train_attention.py [--reps 3] [--rows 96]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_cpu import conversations  # noqa: E402  (the same synthetic finance conversations)

RESULTS = Path(__file__).resolve().parent / "results" / "train_attention.json"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch
    from datasets import Dataset

    from lm.causal_lm import VARLEN_SDPA
    from datagen.config import load_config
    from training.train import build_trainer

    load_start = os.getloadavg()
    cfg = load_config(profile="demo", overrides=["train.device=cpu"])
    ds = Dataset.from_dict({"messages": conversations(args.rows)})
    trainer = build_trainer(cfg, ds, None, Path(tempfile.mkdtemp(prefix="bench-attn-")), device="cpu")
    bs = cfg.train.per_device_batch_size
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(bs)])
    lengths = batch["cu_seq_lens_q"].diff().tolist()
    model = trainer.model

    def step(attn: str) -> tuple[float, float]:
        model.set_attn_implementation(attn)
        t0 = time.perf_counter()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item()

    arms = {"sdpa": [], VARLEN_SDPA: []}
    losses: dict[str, float] = {}
    for rep in range(args.reps + 1):
        for attn in (arms if rep % 2 == 0 else reversed(list(arms))):
            seconds, losses[attn] = step(attn)
            if rep > 0:
                arms[attn].append(round(seconds, 3))
            print(f"rep {rep} {attn}: {seconds:.2f} s", flush=True)
    med = {a: statistics.median(s) for a, s in arms.items()}
    result = {
        "benchmark": "train_attention",
        "model": cfg.model.name_or_path,
        "batch": {"rows": bs, "max_length": cfg.train.max_length, "tokens": sum(lengths),
                  "conversations": len(lengths), "longest": max(lengths)},
        "timed": "compute_loss + backward, LoRA r16 on the demo profile",
        "seconds": arms,
        "median_s": med,
        "loss": losses,
        "speedup_varlen_vs_sdpa": round(med["sdpa"] / med[VARLEN_SDPA], 3),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_avg_start": load_start, "load_avg_end": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("batch", "median_s", "loss", "speedup_varlen_vs_sdpa")}, indent=2))
    return result


if __name__ == "__main__":
    main()
