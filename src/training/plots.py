"""Loss curves of a training run (train and eval loss against the optimizer step) as a PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datagen.io import atomic_path


def loss_series(log_history: Sequence[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(step, loss)], "eval": [(step, eval_loss)]}`` from a Trainer ``log_history``."""
    train, evals = [], []
    for row in log_history:
        step = int(row.get("step", 0))
        if "loss" in row:
            train.append((step, float(row["loss"])))
        if "eval_loss" in row:
            evals.append((step, float(row["eval_loss"])))
    return {"train": train, "eval": evals}


def plot_loss_curves(log_history: Sequence[dict[str, Any]], path: str | Path, *, title: str = "",
                     best_step: int | None = None) -> Path:
    """Write the train/eval loss curves to ``path`` (PNG, atomically) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = loss_series(log_history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, style in (("train", "-"), ("eval", "o-")):
        pts = series[name]
        if pts:
            ax.plot([s for s, _ in pts], [v for _, v in pts], style, label=f"{name} loss", markersize=4)
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle=":", label=f"best checkpoint (step {best_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    if series["train"] or series["eval"]:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
