"""The train stage: LoRA / QLoRA supervised fine-tuning with TRL's ``SFTTrainer`` and PEFT.

``train(cfg, dataset_dir) -> adapter_dir`` configures (never subclasses) ``SFTTrainer``:

- GPU: 4-bit NF4 + double quantization, bf16 compute where supported (else fp16), paged 8-bit AdamW,
  gradient checkpointing, flash attention when installed (else SDPA), Liger layer kernels when installed.
- CPU: fp32 LoRA, under bf16 autocast where the CPU has AMX-BF16 (:func:`lm.causal_lm.cpu_autocast_dtype`;
  without AMX bf16 is ~12x slower), NF4 on request (``train.quantization: nf4``).
- Both: loss on assistant tokens only (the assistant mask from the ``{% generation %}`` markers of the chat
  template, computed as TRL's ``assistant_only_loss`` does; see :func:`tokenize_conversations`; the answer's
  ``<end_of_turn>`` is inside it), the end-of-turn token's embedding row trained with the adapter
  (``train.lora.end_of_turn``, :func:`training.models.trainable_token_ids`) so the tuned model stops, padding-free
  BFD packing (``train.packing``), evaluation every ``eval_steps`` on the
  validation split, early stopping on ``eval_loss``, the best checkpoint loaded at the end, and resume
  from the last checkpoint of an interrupted run with the same configuration.

Output folder ``cfg.paths.models_dir / cfg.train.run_name``: ``adapter_config.json`` +
``adapter_model.safetensors``, the tokenizer with its chat template, ``log_history.json``, ``loss.png``,
optionally ``merged/`` (the adapter merged onto the unquantized base, safetensors) and ``manifest.json``
written last. Checkpoints live in ``<run>/checkpoints`` while training and are removed after a finished
run unless ``train.keep_checkpoints``.
"""

from __future__ import annotations

import logging
import re
import resource
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm.causal_lm import attn_implementation, compute_dtype, cpu_autocast_dtype, load_causal_lm, resolve_device
from datagen.config import Config
from datagen.llm.local import unload_models
from datagen.manifest import TrainManifest
from datagen.io import (
    atomic_write_text,
    manifest_hash,
    read_manifest,
    write_json,
    write_manifest,
)
from datagen.progress import progress_log, seconds
from datagen.stage import Inputs, StageSpec
from datagen.tokenizer import load_tokenizer
from training.models import (
    compact_lm_head_on_cpu,
    count_parameters,
    expose_lm_head_bias,
    get_peft_config,
    get_quantization_config,
    load_model,
)
from training.plots import plot_loss_curves

if TYPE_CHECKING:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CONFIG_STAMP = "config_hash.txt"
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "liger_kernel",
             "flash_attn")


# ----------------------------------------------------------------------------- data
def load_split(dataset_dir: str | Path, split: str) -> Dataset | None:
    """``<dataset_dir>/<split>.parquet`` as a ``datasets.Dataset`` with only its ``messages`` column; None if absent."""
    from datasets import Dataset

    path = Path(dataset_dir) / f"{split}.parquet"
    if not path.exists():
        return None
    ds = Dataset.from_parquet(str(path), keep_in_memory=True)
    if "messages" not in ds.column_names:
        raise ValueError(f"{path} has no 'messages' column (columns: {ds.column_names})")
    return ds.select_columns(["messages"])


def balance_labels(rows: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Oversample the classification rows of each category so every label it has in ``rows`` counts as
    many rows as its most frequent one; other rows are kept as they are.

    Deterministic: a label short of the target repeats its rows in a seeded order (``seed``, category,
    label), whole passes first, so no row is copied twice before every row of its label was copied once.
    Returns the rows (the originals in their order, then the copies) and ``{category: {"before": {label:
    n}, "after": {label: n}}}``. Meant for the *train* split only: validation and test keep their
    distribution, so their loss and scores stay comparable across runs."""
    import random
    from collections import Counter

    by: dict[str, dict[str, list[int]]] = {}
    for i, r in enumerate(rows):
        if r.get("task_type") == "classification":
            by.setdefault(str(r["category"]), {}).setdefault(str(r["answer"]).strip(), []).append(i)
    extra: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for cat in sorted(by):
        labels = by[cat]
        target = max(len(v) for v in labels.values())
        for lab in sorted(labels):
            idx = sorted(labels[lab], key=lambda i: str(rows[i].get("id", i)))
            random.Random(f"{seed}:balance_labels:{cat}:{lab}").shuffle(idx)
            need = target - len(idx)
            extra += [rows[idx[k % len(idx)]] for k in range(need)]
        after = Counter({lab: len(v) for lab, v in labels.items()})
        info[cat] = {"before": {lab: len(v) for lab, v in sorted(labels.items())},
                     "after": {lab: target for lab in sorted(after)}}
    return list(rows) + extra, info


def load_training_data(cfg: Config, dataset_dir: str | Path) -> tuple[Dataset | None, Dataset | None, dict[str, Any]]:
    """The ``train`` and ``validation`` splits as training reads them (``messages`` only), and the label
    balancing applied: with ``train.balance_labels`` the train split's classification rows are balanced per
    label (:func:`balance_labels`); the validation split is read as it is, and test is never read."""
    from datasets import Dataset

    train_ds = load_split(dataset_dir, "train")
    eval_ds = load_split(dataset_dir, "validation")
    info: dict[str, Any] = {"enabled": cfg.train.balance_labels, "categories": {}, "rows_added": 0}
    if cfg.train.balance_labels and train_ds is not None and len(train_ds):
        import pandas as pd

        df = pd.read_parquet(Path(dataset_dir) / "train.parquet")
        if {"task_type", "category", "answer"} <= set(df.columns):
            rows = df.to_dict(orient="records")
            balanced, info["categories"] = balance_labels(rows, cfg.train.seed)
            info["rows_added"] = len(balanced) - len(rows)
            if info["rows_added"]:
                train_ds = Dataset.from_dict({"messages": [[{"role": str(m["role"]), "content": str(m["content"])}
                                                            for m in r["messages"]] for r in balanced]})
    return train_ds, eval_ds, info


def tokenize_conversations(ds: Dataset, tokenizer: Any, *, desc: str = "tokenizing") -> Dataset:
    """``messages`` -> ``input_ids`` + ``assistant_masks`` (1 on assistant tokens), as TRL's own tokenization does.

    Done here rather than inside ``SFTTrainer`` because ``datasets`` fingerprints every ``map`` by pickling
    its arguments, and pickling a 262k-vocabulary tokenizer costs ~30 s per split on this machine. TRL
    builds the labels (-100 outside the assistant mask), truncates and packs the pre-tokenized rows.
    Each row goes through :func:`datagen.dataset.chat_format.render_conversation`, the path the format stage
    used for its token counts and drops, so training's loss mask is the one the dataset was filtered with.
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    from datagen.dataset.chat_format import render_conversation, training_template

    template = training_template(tokenizer)
    ids, masks = [], []
    for i, messages in enumerate(tqdm(ds["messages"], desc=desc, disable=len(ds) < 500)):
        row_ids, mask = render_conversation(tokenizer, messages, template)
        if 1 not in mask:
            raise ValueError(f"row {i} has no assistant tokens: the chat template marks no assistant turn")
        ids.append(row_ids)
        masks.append(mask)
    return Dataset.from_dict({"input_ids": ids, "assistant_masks": masks})


# ----------------------------------------------------------------------------- configuration
def logging_steps(cfg: Config) -> int:
    return cfg.train.logging_steps or max(1, min(10, cfg.train.eval_steps // 2))


def build_sft_config(cfg: Config, output_dir: str | Path, device: str, *, has_eval: bool) -> SFTConfig:
    """The ``SFTConfig`` of a run: precision, optimizer and memory by device, the rest from ``cfg.train``."""
    from trl import SFTConfig

    t = cfg.train
    cuda = device.startswith("cuda")
    # a GPU's half dtype; on a CPU with AMX-BF16, bf16 autocast over fp32 weights (Trainer's bf16 on CPU)
    half = compute_dtype(device) if cuda else cpu_autocast_dtype() if device == "cpu" else None
    save_steps = t.save_steps or t.eval_steps
    if has_eval and save_steps % t.eval_steps:
        raise ValueError(f"train.save_steps ({save_steps}) must be a multiple of train.eval_steps ({t.eval_steps}) "
                         "so that the best evaluated checkpoint exists")
    import torch

    return SFTConfig(
        output_dir=str(output_dir),
        run_name=t.run_name,
        seed=t.seed,
        data_seed=t.seed,
        # optimisation
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps (transformers 5)
        max_grad_norm=t.max_grad_norm,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        # precision and memory
        bf16=half == torch.bfloat16,
        fp16=half == torch.float16,
        use_cpu=device == "cpu",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        # data: chat messages, loss on the assistant turns, padding-free best-fit packing
        max_length=t.max_length,
        packing=t.packing,
        packing_strategy="bfd",
        # loss on assistant tokens only: the rows arrive pre-tokenized with their assistant masks (see
        # tokenize_conversations), from which TRL builds the labels; TRL's own flag only applies to raw messages
        assistant_only_loss=False,
        dataset_num_proc=None,
        # evaluation, checkpoints, early stopping
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        # logging
        logging_steps=logging_steps(cfg),
        logging_first_step=True,
        report_to=[] if t.report_to == "none" else [t.report_to],
        disable_tqdm=False,
    )


def throughput_callback() -> Any:
    """A callback that adds up wall time spent inside optimizer steps (evaluation and checkpoint saving
    excluded). Built on call so that importing this module does not import transformers."""
    from transformers import TrainerCallback

    class ThroughputCallback(TrainerCallback):
        def __init__(self) -> None:
            self.step_seconds = 0.0
            self.steps = 0
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_seconds += time.perf_counter() - self._t0
            self.steps += 1

    return ThroughputCallback()


def progress_callback() -> Any:
    """A callback that logs each logged training step (loss, seconds per step) and each validation loss on
    ``finsynth.progress`` (:mod:`datagen.progress`): the lines the main command's terminal and the run log
    show while training runs."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self._t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if not control.should_log:  # a step without a loss to show (set by the default flow callback, first)
                step = state.global_step
                progress_log.info("train step %d/%d (%s, %.1f s/step)", step, state.max_steps,
                                  seconds(time.perf_counter() - self._t0), (time.perf_counter() - self._t0) / step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            step, total = state.global_step, state.max_steps
            per_step = (time.perf_counter() - self._t0) / step if step else 0.0
            if "loss" in logs:
                progress_log.info("train step %d/%d, loss %.4f (%s, %.1f s/step)", step, total, logs["loss"],
                                  seconds(time.perf_counter() - self._t0), per_step)
            if "eval_loss" in logs:
                progress_log.info("train step %d/%d, validation loss %.4f", step, total, logs["eval_loss"])

    return ProgressCallback()


def build_trainer(cfg: Config, train_ds: Dataset, eval_ds: Dataset | None, output_dir: str | Path, *,
                  device: str | None = None, model: Any = None, tokenizer: Any = None,
                  callbacks: list | None = None) -> SFTTrainer:
    """An ``SFTTrainer`` with PEFT for ``cfg`` (the model and tokenizer are loaded from ``cfg.model`` unless given)."""
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    device = resolve_device(device or cfg.train.device)
    has_eval = eval_ds is not None and len(eval_ds) > 0
    if device == "cpu" and cfg.train.compact_lm_head:
        compact_lm_head_on_cpu()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    model = model if model is not None else load_model(cfg, device)
    callbacks = list(callbacks or [])
    if has_eval:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience,
                                               early_stopping_threshold=cfg.train.early_stopping_threshold))
    if "messages" in train_ds.column_names:
        train_ds = tokenize_conversations(train_ds, tokenizer, desc="tokenizing train")
    if has_eval and "messages" in eval_ds.column_names:
        eval_ds = tokenize_conversations(eval_ds, tokenizer, desc="tokenizing validation")
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(cfg, output_dir, device, has_eval=has_eval),
        train_dataset=train_ds,
        eval_dataset=eval_ds if has_eval else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(cfg.train, tokenizer),  # with the end-of-turn row (train.lora.end_of_turn)
        callbacks=callbacks,
    )
    expose_lm_head_bias(trainer.model)
    return trainer


# ----------------------------------------------------------------------------- checkpoints
def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` (one with its ``trainer_state.json``), or None."""
    if not ckpt_dir.is_dir():
        return None
    found = []
    for p in ckpt_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / "trainer_state.json").exists():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _prepare_checkpoints(ckpt_dir: Path, config_hash: str) -> Path | None:
    """Checkpoint to resume from; checkpoints of a different configuration are discarded."""
    stamp = ckpt_dir / CONFIG_STAMP
    if ckpt_dir.exists() and (not stamp.exists() or stamp.read_text().strip() != config_hash):
        log.warning("discarding checkpoints in %s: they belong to another configuration", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, config_hash + "\n")
    return last_checkpoint(ckpt_dir)


# ----------------------------------------------------------------------------- the stage
def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            out[name] = None
    return out


def peak_memory(device: str) -> dict[str, int | None]:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    cuda = torch.cuda.max_memory_allocated() if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"peak_rss_bytes": rss, "peak_cuda_bytes": cuda}


def _step_of(checkpoint: str | None) -> int | None:
    m = re.search(r"checkpoint-(\d+)", checkpoint or "")
    return int(m.group(1)) if m else None


def merge_adapter(cfg: Config, adapter_dir: Path, target: Path, device: str = "cpu") -> Path:
    """Merge the adapter onto the base loaded without quantization and save it (safetensors) with the tokenizer."""
    merged = load_causal_lm(cfg.model, device=device, adapter=adapter_dir).merge_and_unload()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    load_tokenizer(cfg.model).save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _count_rows(trainer) -> dict[str, int]:
    """Count the rows this process's batches carry (its share under DDP): wraps the trainer's collator."""
    seen = {"rows": 0}
    collate = trainer.data_collator

    def counting(features):
        seen["rows"] += len(features)
        return collate(features)

    trainer.data_collator = counting
    return seen


def _gather(value: int, world: int) -> list[int]:
    """``value`` of every rank, in rank order (``[value]`` in one process)."""
    if world <= 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def _backend() -> str | None:
    """The process group's backend (``gloo``, ``nccl``), None in one process."""
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None


def train(cfg: Config, dataset_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Fine-tune ``cfg.model`` on ``<dataset_dir>/{train,validation}.parquet`` into ``out_dir`` (default: the
    stage's folder, ``models/<train.run_name>``); returns the adapter folder."""
    import torch

    dataset_dir = Path(dataset_dir)
    out_dir = Path(out_dir) if out_dir is not None else STAGE.output(cfg)
    ckpt_dir = out_dir / CHECKPOINTS
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # the folder is being rewritten: not finished

    unload_models()  # the providers' copies of a model (augment's, in the same flow process) are not needed here
    train_ds, eval_ds, balance = load_training_data(cfg, dataset_dir)
    if train_ds is None or len(train_ds) == 0:
        raise FileNotFoundError(f"no training rows in {dataset_dir / 'train.parquet'}")
    if cfg.train.repeat > 1:  # exposure matching: every row `repeat` times per epoch
        from datasets import concatenate_datasets

        train_ds = concatenate_datasets([train_ds] * cfg.train.repeat)
    if eval_ds is None or len(eval_ds) == 0:
        log.warning("no validation rows: training without evaluation, early stopping or best-checkpoint selection")
        eval_ds = None

    device = resolve_device(cfg.train.device)
    config_hash = STAGE.config_hash(cfg)
    resume = _prepare_checkpoints(ckpt_dir, config_hash + ":" + str(manifest_hash(dataset_dir)))
    meter = throughput_callback()
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, train_ds, eval_ds, ckpt_dir, device=device, callbacks=[meter, progress_callback()])
    if resume:
        log.info("resuming from %s", resume)
    collate, seen = trainer.data_collator, _count_rows(trainer)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.data_collator = collate
    wall = time.perf_counter() - t0
    state = trainer.state

    world = trainer.args.world_size
    distributed = {"world_size": world, "backend": _backend(), "rows_seen_by_rank": _gather(seen["rows"], world)}
    if not trainer.is_world_process_zero():
        return out_dir
    tokenizer = trainer.processing_class
    trainer.model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    write_json(out_dir / "log_history.json", state.log_history)
    best_step = _step_of(state.best_model_checkpoint)
    plot_loss_curves(state.log_history, out_dir / "loss.png", best_step=best_step,
                     title=f"{cfg.model.name_or_path} · {cfg.train.run_name}")
    tokens = int(getattr(trainer, "_total_train_tokens", 0))
    memory = peak_memory(device)
    params = count_parameters(trainer.model)
    del trainer
    merged = None
    if cfg.train.merge:
        merged = merge_adapter(cfg, out_dir, out_dir / "merged", device)
    if not cfg.train.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    train_losses = [r["loss"] for r in state.log_history if "loss" in r]
    dtype = compute_dtype(device)
    quant = get_quantization_config(cfg.train, device)
    from datagen.prompts import load_prompt

    manifest = TrainManifest(
        config_hash=config_hash,
        config={"train": cfg.dump_public()["train"], "model": cfg.dump_public()["model"]},
        upstream={"format": manifest_hash(dataset_dir), "dataset_dir": str(dataset_dir)},
        prompts={"chat_template": load_prompt(cfg.model.chat_template).ref} if cfg.model.chat_template else {},
        libraries=library_versions(),
        device=device,
        torch_threads=torch.get_num_threads(),
        precision=("4bit-nf4+" + str(dtype).removeprefix("torch.") if quant else str(dtype).removeprefix("torch."))
        + (" (bf16 autocast: AMX)" if device == "cpu" and cpu_autocast_dtype() is not None else ""),
        attn_implementation=attn_implementation(device, dtype),
        distributed=distributed,
        counts={"train_rows": len(train_ds), "validation_rows": len(eval_ds) if eval_ds is not None else 0,
                "train_rows_added_by_balancing": balance["rows_added"]},
        balance_labels=balance,
        parameters=params,
        resumed_from=str(resume.name) if resume else None,
        steps=state.global_step,
        max_steps=state.max_steps,
        epochs=state.epoch,
        stopped_early=bool(eval_ds is not None and state.global_step < state.max_steps),
        best_eval_loss=state.best_metric,
        best_step=best_step,
        final_train_loss=train_losses[-1] if train_losses else None,
        train_loss_mean=result.training_loss,
        wall_time_s=round(wall, 2),
        train_step_time_s=round(meter.step_seconds, 2),
        train_tokens=tokens,
        tokens_per_s=round(tokens / meter.step_seconds, 2) if meter.step_seconds > 0 else None,
        memory=memory,
        merged_dir="merged" if merged else None,
    )
    write_manifest(out_dir, manifest)
    return out_dir


def run_train(cfg: Config, inputs: Inputs, out: Path) -> TrainManifest:
    """Stage entry point: train on the finished ``format`` stage's dataset; returns the written manifest
    (on a rank other than 0 of a multi-process run, which writes none: the manifest rank 0 wrote, if any)."""
    return read_manifest(train(cfg, inputs["format"], out), TrainManifest) or TrainManifest(config_hash="")


STAGE = StageSpec("train", run_train, __name__, ("train", "model"), upstream=("format",),
                  prompts=lambda c: (c.model.chat_template,), folder=lambda c: c.paths.models_dir / c.train.run_name,
                  manifest=TrainManifest)
