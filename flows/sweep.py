"""``finsynth sweep``: the pipeline once per grid point, and one comparison table across the points.

    finsynth sweep --profile quality --grid augment.k=0,3
    finsynth sweep --profile quality --grid train.lora.r=8,16 --grid train.learning_rate=1e-4,2e-4
    finsynth sweep --profile knowledge --set split.strategy=knowledge --grid augment.k=0,3 \
        --point augment.k=0,train.repeat=4     # + the exposure-matched k=0 arm

Each point is the profile plus the point's overrides, with its own ``train.run_name`` and
``evaluate.run_name`` (``<base>-<point>``), so adapters and reports of all points stay side by side.
The data stages share the root's folders: a stage the point does not change is served from Prefect's
cache (its key is the same), one it changes reruns (for the LLM calls, the response cache answers what
another point already asked). The comparison (``data/reports/sweep-<name>/comparison.{json,md,png}``)
reads each point's evaluation report: per category and overall, n, base zero-shot, base few-shot and
tuned with 95% CIs, and the paired differences tuned - base and tuned - few-shot.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from datagen.config import Config, ConfigError, load_config
from datagen.io import atomic_write_text, read_json, write_json
from datagen.render import md_cell, md_text, plot_text
from flows.pipeline import pipeline
from flows.stages import get_stage

ARMS = ("base", "fewshot", "tuned")
DIFFS = ("tuned_minus_base", "tuned_minus_fewshot")


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["augment.k=0,3"]`` -> ``[("augment.k", ["0", "3"])]``: the keys and their values, in order."""
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ConfigError(f"--grid {spec!r} must look like key.path=v1,v2")
        grid.append((key.strip(), vals))
    return grid


def parse_point(spec: str) -> dict[str, str]:
    """``"augment.k=0,train.repeat=4"`` -> ``{"augment.k": "0", "train.repeat": "4"}``: one point."""
    point = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--point {spec!r} must look like key.path=v,other.key=w")
        point[key.strip()] = value.strip()
    return point


def grid_points(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every combination, first key slowest."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]


def point_name(point: dict[str, str]) -> str:
    """A folder-safe name: ``{"augment.k": "3"}`` -> ``k3``; several keys joined with ``_``."""
    parts = [re.sub(r"[^A-Za-z0-9._]+", "", k.rsplit(".", 1)[-1]) + re.sub(r"[^A-Za-z0-9.+-]+", "", v)
             for k, v in point.items()]
    return "_".join(parts) or "base"


def point_overrides(cfg: Config, point: dict[str, str]) -> list[str]:
    name = point_name(point)
    return [f"{k}={v}" for k, v in point.items()] + [f"train.run_name={cfg.train.run_name}-{name}",
                                                     f"evaluate.run_name={cfg.evaluate.run_name}-{name}"]


def _cell(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    lo, hi = stat["ci"]
    return f"{stat['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def compare(points: list[dict[str, Any]], split: str = "test") -> dict[str, Any]:
    """The comparison across points, from each point's ``report.json`` summary of ``split``."""
    rows = []
    for p in points:
        summary = (p["report"].get("summary") or {}).get(split) or {}
        blocks = {"overall": summary.get("overall") or {}, **(summary.get("categories") or {})}
        for cat, block in blocks.items():
            rows.append({"point": p["name"], "overrides": p["point"], "category": cat, "n": block.get("n"),
                         **{k: {"mean": (block.get(k) or {}).get("mean"), "ci": (block.get(k) or {}).get("ci")}
                            for k in (*ARMS, *DIFFS)}})
    return {"split": split, "points": [{"name": p["name"], "overrides": p["point"], "report": p["report_path"],
                                        "executed": p["executed"], "cached": p["cached"]} for p in points],
            "rows": rows}


def render_markdown(table: dict[str, Any]) -> str:
    lines = [f"# Sweep comparison ({table['split']} split)", "",
             "Mean score with its 95% clustered bootstrap CI; differences are paired by item.", "",
             "| point | category | n | base zero-shot | base few-shot | tuned | tuned - base | tuned - few-shot |",
             "|---|---|---:|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {md_cell(r['point'])} | {md_cell(r['category'])} | {r['n']} | " + " | ".join(
            _cell(r[k]) for k in (*ARMS, *DIFFS)) + " |")
    lines += ["", "Stages per point (executed / served from cache):", ""]
    for p in table["points"]:
        over = ", ".join(md_text(f"{k}={v}") for k, v in p["overrides"].items())
        lines.append(f"- {md_text(p['name'])} ({over}): executed {', '.join(p['executed']) or 'none'}; "
                     f"cached {', '.join(p['cached']) or 'none'}")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: Path) -> None:
    """Tuned - few-shot (or tuned - base) per category, one bar per point, with CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(dict.fromkeys(r["category"] for r in table["rows"]))
    names = [p["name"] for p in table["points"]]
    key = "tuned_minus_fewshot" if any(r["tuned_minus_fewshot"]["mean"] is not None for r in table["rows"]) \
        else "tuned_minus_base"
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cats) * max(1, len(names)) / 2 + 2), 4))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        got = {r["category"]: r[key] for r in table["rows"] if r["point"] == name}
        xs, ys, err = [], [], [[], []]
        for i, c in enumerate(cats):
            s = got.get(c) or {}
            if s.get("mean") is None:
                continue
            xs.append(i + j * width)
            ys.append(s["mean"])
            err[0].append(s["mean"] - s["ci"][0])
            err[1].append(s["ci"][1] - s["mean"])
        ax.bar(xs, ys, width=width, yerr=err, capsize=3, label=plot_text(name))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(cats))], [plot_text(c) for c in cats],
                  rotation=30, ha="right")
    ax.set_ylabel(key.replace("_", " "))
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@flow(name="finsynth-sweep", persist_result=True, result_serializer="json")
def sweep(profile: str | None = "quality", config_path: str | None = None, overrides: list[str] | None = None,
          root: str | None = None, grid: list[str] | None = None, name: str = "sweep",
          refresh: bool = False, points: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline once per grid point (and per ``points`` entry); write and return the comparison."""
    overrides = list(overrides or [])
    cfg = load_config(config_path, profile=profile, overrides=overrides, root=Path(root) if root else None)
    todo = (grid_points(parse_grid(grid)) if grid else []) + [parse_point(p) for p in points or []]
    if not todo:
        raise ConfigError("sweep needs --grid or --point")
    points = []
    for point in todo:
        over = overrides + point_overrides(cfg, point)
        summary = pipeline(profile=profile, config_path=config_path, overrides=over, root=root, refresh=refresh)
        pcfg = load_config(config_path, profile=profile, overrides=over, root=Path(root) if root else None)
        report_path = get_stage("evaluate").output(pcfg) / "report.json"
        points.append({"name": point_name(point), "point": point, "report_path": str(report_path),
                       "report": read_json(report_path), "executed": summary["executed"],
                       "cached": summary["cached"], "stages": summary["stages"]})
    table = compare(points)
    table["stage_seconds"] = {p["name"]: {s["stage"]: s.get("seconds") for s in p["stages"]} for p in points}
    out = cfg.paths.reports_dir / f"sweep-{name}"
    write_json(out / "comparison.json", table)
    md = render_markdown(table)
    atomic_write_text(out / "comparison.md", md)
    plot(table, out / "comparison.png")
    create_markdown_artifact(markdown=md, key=f"sweep-{re.sub(r'[^a-z0-9-]+', '-', name.lower())}",
                             description="sweep comparison across grid points")
    return {"comparison": str(out / "comparison.json"), "points": [p["name"] for p in points],
            "executed": {p["name"]: p["executed"] for p in points}, "cached": {p["name"]: p["cached"] for p in points}}
