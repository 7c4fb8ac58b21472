"""Closed-book knowledge injection: do rephrasings make a fine-tuned model recall facts asked in new words?

The fact set is ``data/raw/knowledge_facts.jsonl`` (``scripts/make_facts.py``: fictional issuers, eight
facts each from three shared answer pools, so the wording of a question picks the answer). The split is
:func:`datagen.dataset.knowledge.knowledge_split`: trained facts' phrasings go to train, the test asks each
trained fact in a held-out phrasing of another template family (no 6-token run shared with any trained
phrasing), control facts are never trained, and validation asks *other* trained facts (the epoch each arm
is read at is chosen there, never on the test).

Arms (:func:`datagen.dataset.knowledge.arm_rows`), each a fresh LoRA adapter on the packaged
Gemma-3-270M with the project's chat template, assistant-only loss and trainer
(:func:`training.train.build_trainer`), the ``knowledge`` profile's settings:

- ``k0_plain``: the original question once per fact (the reference study's comparison: 1/4 of the steps);
- ``k0_matched``: the original 4 times per fact: the same steps and answer exposures as ``k3``;
- ``k3``: the original and 3 rephrasings; ``k1`` and ``k2`` with ``--arms``.

Scoring, the same for every arm and for the base model: log-likelihood ranking of the gold answer among
its 4 candidates of the same pool (:func:`training.generate.score_choices`, the rule evaluation uses for
classification labels; chance 0.25), and greedy exact match after normalisation. After every epoch the test,
validation and
control sets are scored (the learning curve). CIs are bootstraps clustered by company; arm differences are
paired per fact, with McNemar's exact test. Writes ``benchmarks/results/knowledge.json`` and
``knowledge.png``. Run it alone (~1 h on 2 cores).

    .venv/bin/python benchmarks/bench_knowledge.py [--arms k0_plain,k0_matched,k3] [--companies N] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402

from lm.causal_lm import generate, render_prompt, vector_flags  # noqa: E402
from datagen.config import load_config  # noqa: E402
from datagen.dataset.chat_format import USER_PROMPT, build_messages  # noqa: E402
from datagen.dataset.knowledge import arm_rows, knowledge_split  # noqa: E402
from datagen.io import read_jsonl  # noqa: E402
from datagen.prompts import load_prompt  # noqa: E402
from training.aggregate import bootstrap_ci  # noqa: E402
from training.generate import score_choices  # noqa: E402
from training.graders import normalise_answer, pick_by_loglik  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ARMS = {"k0_plain": (0, 1), "k0_matched": (0, 4), "k1": (1, 1), "k2": (2, 1), "k3": (3, 1)}  # name: (k, repeat)
N_BOOT, SEED = 2000, 17


# ----------------------------------------------------------------------------- scoring
class Scorer:
    """Log-likelihood and greedy exact-match scoring of one item set (prompts rendered once)."""

    def __init__(self, tok, items: list[dict], system, user, batch_size: int = 32) -> None:
        self.tok, self.items, self.batch_size = tok, items, batch_size
        self.prompts = [render_prompt(tok, build_messages(r, system, user)[:-1]) for r in items]

    def loglik(self, model) -> list[int]:
        cands = [r["metadata"]["candidates"] for r in self.items]
        scores = score_choices(model, self.tok, self.prompts, cands, batch_size=self.batch_size)
        return [int(c[pick_by_loglik(s)] == r["answer"]) for c, s, r in zip(cands, scores, self.items, strict=True)]

    def exact(self, model, max_new_tokens: int = 10) -> tuple[list[int], list[str]]:
        texts: list[str] = []
        order = sorted(range(len(self.prompts)), key=lambda i: -len(self.prompts[i]))
        by_index: dict[int, str] = {}
        for s in range(0, len(order), self.batch_size):
            batch = order[s:s + self.batch_size]
            for i, g in zip(batch, generate(model, self.tok, [self.prompts[i] for i in batch],
                                             max_new_tokens=max_new_tokens), strict=True):
                by_index[i] = g.texts[0]
        texts = [by_index[i] for i in range(len(self.prompts))]
        return [int(normalise_answer(t) == normalise_answer(r["answer"])) for t, r in zip(texts, self.items,
                                                                                          strict=True)], texts


def summary(correct: list[int], items: list[dict]) -> dict:
    if not correct:
        return {"n": 0, "acc": None, "ci": None}
    groups = [r["metadata"]["entity"] for r in items]
    return {"n": len(correct), "acc": round(float(np.mean(correct)), 4) if correct else None,
            "ci": bootstrap_ci(correct, N_BOOT, SEED, groups=groups)}


def mcnemar_p(a: list[int], b: list[int]) -> float:
    """Exact two-sided McNemar p-value of paired binary outcomes."""
    n01 = sum(x == 0 and y == 1 for x, y in zip(a, b, strict=True))
    n10 = sum(x == 1 and y == 0 for x, y in zip(a, b, strict=True))
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(n01, n10) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: list[int], b: list[int], items: list[dict]) -> dict:
    """b - a per fact: mean, CI clustered by company, McNemar's p."""
    d = [y - x for x, y in zip(a, b, strict=True)]
    return {"mean": round(float(np.mean(d)), 4), "ci": bootstrap_ci(d, N_BOOT, SEED,
                                                                      groups=[r["metadata"]["entity"] for r in items]),
            "mcnemar_p": mcnemar_p(a, b), "n": len(d)}


# ----------------------------------------------------------------------------- one arm
def epoch_callback(scorers: dict[str, Scorer], record: list[dict], score_from: int = 1):
    """Scores every epoch from ``score_from`` on (earlier epochs are trained, not scored: saves eval time)."""
    from transformers import TrainerCallback

    class EpochScores(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if round(state.epoch) < score_from:
                return
            t0 = time.perf_counter()
            was_training = model.training
            model.eval()
            row = {"epoch": round(state.epoch), "step": state.global_step}
            for name, sc in scorers.items():
                row[name] = sc.loglik(model)
            row["em_test"], _ = scorers["test"].exact(model)
            row["eval_s"] = round(time.perf_counter() - t0, 1)
            record.append(row)
            if was_training:
                model.train()
            print(f"  epoch {row['epoch']}: test {np.mean(row['test']):.3f}  validation "
                  f"{np.mean(row['validation']):.3f}  controls {np.mean(row['controls']):.3f}  "
                  f"test EM {np.mean(row['em_test']):.3f}  ({row['eval_s']} s)", flush=True)

    return EpochScores()


def run_arm(cfg, tok, system, user, train_rows: list[dict], scorers: dict[str, Scorer], score_from: int = 1) -> dict:
    from datasets import Dataset

    from training.models import load_model
    from training.train import build_trainer

    msgs = [build_messages(r, system, user) for r in train_rows]
    ds = Dataset.from_dict({"messages": msgs})
    record: list[dict] = []
    model = load_model(cfg, "cpu")
    with tempfile.TemporaryDirectory(prefix="finsynth-knowledge-") as tmp:
        trainer = build_trainer(cfg, ds, None, tmp, device="cpu", model=model, tokenizer=tok,
                                callbacks=[epoch_callback(scorers, record, score_from)])
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        state = trainer.state
        tokens = int(getattr(trainer, "_total_train_tokens", 0))
    eval_s = sum(r["eval_s"] for r in record)
    losses = [r["loss"] for r in state.log_history if "loss" in r]
    del trainer, model
    return {"rows": len(train_rows), "steps": state.global_step, "epochs": record, "wall_s": round(wall, 1),
            "train_s": round(wall - eval_s, 1), "eval_s": round(eval_s, 1), "train_tokens": tokens,
            "train_tokens_per_s": round(tokens / max(wall - eval_s, 1e-9), 1),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None}


def best_epoch(record: list[dict]) -> dict:
    """The epoch with the highest validation accuracy (the earliest at a tie); the last without validation."""
    if not record[-1]["validation"]:
        return record[-1]
    return max(record, key=lambda r: (float(np.mean(r["validation"])), -r["epoch"]))


# ----------------------------------------------------------------------------- plot
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    arms = [a for a in ARMS if a in result["arms"]]
    xs = np.arange(len(arms))
    acc = [result["arms"][a]["heldout"]["acc"] for a in arms]
    lo = [acc[i] - result["arms"][a]["heldout"]["ci"][0] for i, a in enumerate(arms)]
    hi = [result["arms"][a]["heldout"]["ci"][1] - acc[i] for i, a in enumerate(arms)]
    ax1.bar(xs, acc, yerr=[lo, hi], capsize=4, color=["#999", "#58a", "#7a5", "#8b4", "#3a3"][:len(arms)])
    ax1.axhline(0.25, ls=":", color="k", lw=1, label="chance (4 candidates)")
    ax1.axhline(result["controls"]["acc"] or 0.0, ls="--", color="r", lw=1, label="controls (never trained)")
    ax1.set_xticks(xs, [f"{a}\n({result['arms'][a]['steps']} steps)" for a in arms], fontsize=8)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("held-out phrasing accuracy (log-likelihood)")
    ax1.set_title("accuracy against rephrasings k, 95% CI")
    ax1.legend(fontsize=7, loc="upper left")
    for a in arms:
        curve = result["arms"][a]["curve"]
        ax2.plot([c["epoch"] for c in curve], [c["test"] for c in curve], marker="o", label=a)
    ax2.axhline(0.25, ls=":", color="k", lw=1)
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.set_title("learning curve: held-out test phrasings")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=Path, default=ROOT / "data/raw/knowledge_facts.jsonl")
    ap.add_argument("--arms", default="k0_plain,k0_matched,k3")
    ap.add_argument("--companies", type=int, default=None, help="use the first N companies (a smoke run)")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. train.epochs=4")
    ap.add_argument("--out", type=Path, default=RESULTS / "knowledge.json")
    ap.add_argument("--keep-earlier", action="store_true",
                    help="keep the headline figures of the JSON this run replaces under earlier_runs")
    ap.add_argument("--score-from", type=int, default=1, help="score epochs from this one on (default: every epoch)")
    a = ap.parse_args()
    import torch

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    cfg = load_config(profile="knowledge", overrides=a.set, root=ROOT)
    facts = list(read_jsonl(a.facts))
    if a.companies:
        keep = sorted({f["metadata"]["entity"] for f in facts})[:a.companies]
        facts = [f for f in facts if f["metadata"]["entity"] in keep]
    split = knowledge_split(arm_rows(facts, 3))
    trained_ids = {r["group_id"] for r in split["train"]}
    trained = [f for f in facts if f["group_id"] in trained_ids]
    test = [r for r in split["test"] if r["metadata"]["knowledge"] == "heldout"]
    controls = [r for r in split["test"] if r["metadata"]["knowledge"] == "control"]
    validation = split["validation"]

    from datagen.tokenizer import load_tokenizer
    from training.models import load_model

    tok = load_tokenizer(cfg.model)
    system, user = load_prompt(cfg.format.system_prompt), load_prompt(USER_PROMPT)
    scorers = {"test": Scorer(tok, test, system, user), "validation": Scorer(tok, validation, system, user),
               "controls": Scorer(tok, controls, system, user)}
    print(f"facts: {len(trained)} trained ({len(test)} asked in test, {len(validation)} in validation), "
          f"{len(controls)} controls; torch threads {torch.get_num_threads()}", flush=True)

    t0 = time.perf_counter()
    base = load_model(cfg, "cpu").eval()
    base_test, base_ctrl = scorers["test"].loglik(base), scorers["controls"].loglik(base)
    base_em, base_texts = scorers["test"].exact(base)
    del base
    stage_s = {"base_eval": round(time.perf_counter() - t0, 1)}
    print(f"base: test {np.mean(base_test):.3f}  controls {np.mean(base_ctrl):.3f}  EM {np.mean(base_em):.3f}",
          flush=True)

    arms: dict[str, dict] = {}
    finals: dict[str, list[int]] = {}
    ctrl_final: dict[str, list[int]] = {}
    em_finals: dict[str, list[int]] = {}
    for name in a.arms.split(","):
        k, repeat = ARMS[name]
        rows = arm_rows(trained, k, repeat=repeat)
        print(f"arm {name}: {len(rows)} training rows (k={k}, each phrasing x{repeat})", flush=True)
        r = run_arm(cfg, tok, system, user, rows, scorers, a.score_from)
        pick = best_epoch(r["epochs"])
        finals[name], ctrl_final[name], em_finals[name] = pick["test"], pick["controls"], pick["em_test"]
        arms[name] = {
            "k": k, "repeat": repeat, "rows": r["rows"], "steps": r["steps"],
            "answer_exposures_per_fact": (k + 1) * repeat * cfg.train.epochs,
            "chosen_epoch": pick["epoch"],
            "heldout": summary(pick["test"], test),
            "heldout_em": summary(pick["em_test"], test),
            "validation": summary(pick["validation"], validation),
            "controls": summary(pick["controls"], controls),
            "curve": [{"epoch": e["epoch"], "step": e["step"], "test": round(float(np.mean(e["test"])), 4),
                       "validation": round(float(np.mean(e["validation"])), 4),
                       "controls": round(float(np.mean(e["controls"])), 4),
                       "test_em": round(float(np.mean(e["em_test"])), 4)} for e in r["epochs"]],
            "last_epoch": {"heldout": summary(r["epochs"][-1]["test"], test)},
            "per_fact": {"heldout": pick["test"], "heldout_em": pick["em_test"]},  # in test_ids order: pair runs later
            **{key: r[key] for key in ("wall_s", "train_s", "eval_s", "train_tokens", "train_tokens_per_s",
                                       "first_loss", "final_loss")},
        }
        stage_s[name] = r["wall_s"]

    all_ctrl = [x for name in finals for x in ctrl_final[name]]
    result = {
        "benchmark": "closed-book knowledge injection: held-out phrasings of trained facts",
        "date": time.strftime("%Y-%m-%d"),
        "model": cfg.model.name_or_path,
        "facts": {"trained": len(trained), "test": len(test), "validation": len(validation),
                  "controls": len(controls),
                  "file": str(a.facts.relative_to(ROOT) if a.facts.is_relative_to(ROOT) else a.facts)},
        "scoring": "log-likelihood rank of the gold answer among 4 candidates of its pool (training.generate."
                   "score_choices: the answer's tokens, mean log-prob per token where candidates differ in "
                   "length); chance 0.25. "
                   "EM: greedy, normalised exact match. CIs: 95% bootstrap clustered by company.",
        "selection": "each arm is read at the epoch with the best validation accuracy (held-out phrasings of "
                     "other trained facts), the earliest at a tie; last_epoch gives the final epoch",
        "settings": {"learning_rate": cfg.train.learning_rate, "epochs": cfg.train.epochs,
                     "batch_rows": cfg.train.per_device_batch_size, "lora": cfg.train.lora.model_dump(),
                     "system_prompt": cfg.format.system_prompt, "overrides": a.set,
                     "scored_from_epoch": a.score_from},
        "base_before_training": {**summary(base_test, test), "em": summary(base_em, test)},
        "controls": summary(all_ctrl, controls * len(finals)),
        "controls_base": summary(base_ctrl, controls),
        "arms": arms,
        "test_ids": [r["id"] for r in test],
        "examples_base": [{"q": r["question"], "gold": r["answer"], "base": t} for r, t in
                          list(zip(test, base_texts, strict=True))[:3]],
        "stage_s": stage_s,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "machine": {"cpu_flags": vector_flags(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())},
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
    }
    if "k3" in finals and "k0_matched" in finals:
        result["k3_minus_k0_matched"] = paired(finals["k0_matched"], finals["k3"], test)
        result["k3_minus_k0_matched_em"] = paired(em_finals["k0_matched"], em_finals["k3"], test)
    if "k3" in finals and "k0_plain" in finals:
        result["k3_minus_k0_plain"] = paired(finals["k0_plain"], finals["k3"], test)
    if "k0_matched" in finals and "k0_plain" in finals:
        result["k0_matched_minus_k0_plain"] = paired(finals["k0_plain"], finals["k0_matched"], test)
    if a.keep_earlier and a.out.exists():  # an earlier run's headline figures, kept next to this one
        old = json.loads(a.out.read_text())
        result["earlier_runs"] = [*old.get("earlier_runs", []), {
            "date": old.get("date"), "settings": old.get("settings"),
            "arms": {n: {"steps": v["steps"], "chosen_epoch": v["chosen_epoch"], "heldout": v["heldout"]}
                     for n, v in old.get("arms", {}).items()},
            **{k: old[k] for k in ("k3_minus_k0_matched", "k3_minus_k0_plain", "k0_matched_minus_k0_plain")
               if k in old}}]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(a.out)
    plot(result, a.out.with_suffix(".png"))
    print(json.dumps({k: result.get(k) for k in ("base_before_training", "controls", "k3_minus_k0_matched",
                                                  "k3_minus_k0_plain")}, indent=1))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')} in {result['wall_s']} s")


if __name__ == "__main__":
    main()
