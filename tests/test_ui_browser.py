"""The Prefect UI renders a finished run's artifacts: checked in a real browser (Debian's chromium, headless).

Fast tests check the artifact Markdown (card front matter as a table, report images inlined). The slow
test takes the session's finished ``tiny`` pipeline run (a real server + worker, tests/conftest.py),
starts ``finsynth ui`` on the same home and database, and opens the artifact
pages it prints in ``chromium --headless --dump-dom``: the dataset card shows its title and its metadata
as a table (not headings), the score table shows a category row under readable column names, and the
evaluation report and loss curves show their plots as ``data:`` PNG images. Screenshots (1400 px wide)
go to the test's tmp dir. chromium is installed with apt when missing; without apt the test is skipped.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datagen.io import read_json
from flows.pipeline import card_for_ui, inline_images

PNG_1PX = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5Erk"
                           "Jggg==")


def test_card_front_matter_becomes_a_table_under_the_title():
    card = ("---\npretty_name: Demo QA\nlicense: apache-2.0\ntask_categories:\n- question-answering\n---\n\n"
            "# Demo QA\n\nBody.\n")
    md = card_for_ui(card)
    assert md.startswith("# Demo QA\n\n| Hub metadata | value |")
    assert "| pretty_name | Demo QA |" in md and "| task_categories | question-answering |" in md
    assert "---\npretty_name" not in md and md.rstrip().endswith("Body.")
    assert card_for_ui("# no front matter\n") == "# no front matter\n"


def test_relative_report_images_are_inlined(tmp_path):
    (tmp_path / "scores.png").write_bytes(PNG_1PX)
    md = inline_images("a\n![scores](scores.png)\n![gone](missing.png)\n![web](https://x/y.png)\n", tmp_path)
    assert "![scores](data:image/png;base64," in md and "(scores.png)" not in md
    assert f"`{tmp_path / 'missing.png'}`" in md and "![web](https://x/y.png)" in md


# ----------------------------------------------------------------------------- slow: the real UI
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and apt-get is not available to install it")
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None:
        pytest.skip("chromium is not installed and apt-get needs root (no sudo)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run([*sudo, "apt-get", "install", "-y", "chromium"], env=env, capture_output=True, text=True)
    if r.returncode != 0:  # a stale package list: refresh it once
        subprocess.run([*sudo, "apt-get", "update"], env=env, capture_output=True, text=True)
        r = subprocess.run([*sudo, "apt-get", "install", "-y", "chromium"], env=env, capture_output=True, text=True)
    exe = shutil.which("chromium")
    assert exe, f"apt-get install chromium failed ({r.returncode}): {r.stderr[-1500:]}"
    return exe


def browse(exe: str, url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The DOM after the page's scripts ran (and a 1400 x 1100 screenshot when asked)."""
    base = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,1100",
            "--virtual-time-budget=15000", "--hide-scrollbars"]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    r = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def finished_tiny(first_run, prefect_env, project):
    """The session's finished ``tiny`` pipeline run (tests/conftest.py), its Prefect home and root."""
    assert first_run["state"] == "COMPLETED", first_run.get("message")
    return Path(prefect_env["PREFECT_HOME"]), project, first_run


@pytest.fixture(scope="module")
def ui(finished_tiny, tmp_path_factory):
    """``finsynth ui`` on the run's home: yields what it printed, parsed; stopped with Ctrl-C (SIGINT)."""
    home, _, run = finished_tiny
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # the session's server is still up on this home (with its UI off); later tests ran more flows, so name the run
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--home", str(home), "--port", "0",
                             "--flow-run", run["flow_run_id"]],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("serving until Ctrl-C"):
            break
    if not lines or not lines[-1].startswith("serving"):
        proc.kill()
        pytest.fail("finsynth ui did not start:\n" + "\n".join(lines[-30:]))
    arts = dict(re.findall(r"^\s+(\S+)\s+(http://127\.0\.0\.1:\d+/artifacts/artifact/\S+)$", "\n".join(lines), re.M))
    run_url = re.search(r"flow run .*: (http://127\.0\.0\.1:\d+/runs/flow-run/\S+)", "\n".join(lines))
    yield {"lines": lines, "artifacts": arts, "run_url": run_url.group(1) if run_url else None}
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert not (home / "ui.json").exists()  # the record of a running UI server goes with it


@pytest.mark.slow
def test_ui_shows_the_card_the_score_table_and_the_plots(finished_tiny, ui, tmp_path):
    home, root, run = finished_tiny
    exe = chromium()
    assert ui["run_url"] and run["flow_run_id"] in ui["run_url"], ui["lines"]
    arts = ui["artifacts"]
    assert {"dataset-card", "judge-scores", "evaluation-report", "loss-curves"} <= set(arts), ui["lines"]
    profile = tmp_path / "chromium-profile"

    card = (root / "data" / "processed" / "format" / "README.md").read_text(encoding="utf-8")
    title = re.search(r"^# (.+)$", card.split("\n---\n", 1)[1], re.M).group(1).strip()
    dom = browse(exe, arts["dataset-card"], profile, tmp_path / "dataset-card.png")
    assert re.search(rf"<h1[^>]*>\s*{re.escape(title)}\s*</h1>", dom), f"card title {title!r} not rendered"
    assert re.search(r"<td[^>]*>\s*pretty_name\s*</td>", dom)  # front matter as a table
    assert not re.search(r"<h\d[^>]*>\s*pretty_name:", dom)  # not as a heading per YAML line

    rows = read_json(root / "data" / "reports" / "eval" / "report.json")
    category = next(c for s in rows["summary"].values() for c in s["categories"])
    dom = browse(exe, arts["judge-scores"], profile, tmp_path / "judge-scores.png")
    assert re.search(rf">\s*{re.escape(category)}\s*<", dom), f"category row {category!r} not rendered"
    assert re.search(r">\s*tuned\s*<", dom) and "base zero-shot" in dom and "LLM judge" in dom
    assert "base_mean_lo" not in dom

    for key in ("evaluation-report", "loss-curves"):
        dom = browse(exe, arts[key], profile, tmp_path / f"{key}.png")
        assert re.search(r'<img[^>]*src="data:image/png;base64,', dom), f"{key}: no rendered PNG"
        assert 'src="scores.png"' not in dom
    for shot in ("dataset-card", "judge-scores"):
        assert (tmp_path / f"{shot}.png").stat().st_size > 10_000, f"{shot} screenshot is blank"
    print(f"screenshots in {tmp_path}")  # noqa: T201


# ----------------------------------------------------------------------------- slow: hostile strings in the real UI
HOSTILE_CAT = "banking | retail\n<script>window.pwned=1</script>"
HOSTILE_SRC = "feed|x\n<img src=x onerror=window.pwned=2>"

HOSTILE_FLOW = r'''
import json, sys
from pathlib import Path

import pandas as pd
from prefect import flow
from prefect.runtime import flow_run

from datagen.config import load_config
from datagen.io import write_manifest
from datagen.manifest import Manifest
from flows.pipeline import STAGE_FLOWS, publish_artifacts
from flows.stages import invoke

config, root = sys.argv[1], sys.argv[2]


def scripted(model_cfg, adapter_dir, conversations, **kw):
    """The tuned arm answers each headline's gold label, the base arms "neutral"."""
    ds = cfg.paths.stage_dir("format")
    rows = pd.concat([pd.read_parquet(p) for p in ds.glob("*.parquet")])
    gold = {json.loads(c)["text"]: a for c, a in zip(rows["context"], rows["answer"])}

    def label(conv):
        user = conv[-1]["content"]
        return next((a for t, a in gold.items() if t and t in user), "neutral")
    return {arm: [label(c) if arm == "tuned" else "neutral" for c in convs] for arm, convs in conversations.items()}


@flow(name="hostile-strings")
def hostile() -> str:
    for name in ("fetch", "augment", "dedup", "split", "format"):
        STAGE_FLOWS[name](None, config, None, root)
    adapter = cfg.paths.models_dir / cfg.train.run_name
    adapter.mkdir(parents=True, exist_ok=True)
    write_manifest(adapter, Manifest(stage="train"))  # evaluation's arms are scripted: no model is loaded
    publish_artifacts(cfg, "evaluate", invoke(cfg, "evaluate", generator=scripted))
    return flow_run.id


cfg = load_config(Path(config), root=Path(root))
print("FLOW_RUN", hostile())
'''


@pytest.mark.slow
def test_ui_shows_hostile_strings_as_text(tmp_path):
    """A source QA file whose category and source name hold ``|``, a newline, ``<script>`` and
    ``<img onerror>``: the data stages run for real in Prefect flows (fetch to format: the dataset card),
    the evaluation with scripted answers (no model), and the card, score table and report artifacts are
    opened in headless chromium: each table keeps its columns, the strings show as text, and no script or
    ``on*`` handler element comes from them."""
    import json

    import yaml
    from html_check import Page

    from flows.ui import links

    exe = chromium()
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    (root / "data" / "raw").symlink_to(Path(__file__).resolve().parents[1] / "data" / "raw")
    src = [json.loads(x) for x in (root / "data" / "raw" / "headline_sentiment.jsonl").read_text().splitlines()[:40]]
    for i, r in enumerate(src):
        r["category"] = HOSTILE_CAT if i % 2 else "retail"
    qa = tmp_path / "hostile.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in src))
    config = tmp_path / "hostile.yaml"
    config.write_text(yaml.safe_dump({
        "extends": "tiny", "sources": {"market": None, "source_qa": [{"path": str(qa), "name": HOSTILE_SRC}]},
        "augment": {"k": 0}, "evaluate": {"max_items": 8, "fewshot_k": 1}}))

    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    ui_proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--home", str(home), "--port", "0"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        while True:
            line = ui_proc.stdout.readline()
            if not line:
                pytest.fail("finsynth ui did not start:\n" + "\n".join(lines[-30:]))
            lines.append(line.rstrip("\n"))
            if line.startswith("serving until Ctrl-C"):
                break
        ui_url = re.search(r"Prefect UI: (\S+)", "\n".join(lines)).group(1)
        api = f"{ui_url}/api"
        run_env = {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(home)}
        r = subprocess.run([sys.executable, "-c", HOSTILE_FLOW, str(config), str(root)], env=run_env,
                           capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        flow_run_id = re.search(r"^FLOW_RUN (\S+)$", r.stdout, re.M).group(1)
        arts = {a["key"]: a["url"] for a in links(ui_url, api, flow_run_id)["artifacts"]}
        assert {"dataset-card", "judge-scores", "evaluation-report"} <= set(arts), arts

        card = (root / "data" / "processed" / "format" / "README.md").read_text(encoding="utf-8")
        assert HOSTILE_SRC.split("\n")[0] in card.replace("\\|", "|")  # the data reached the card
        shown = {"dataset-card": [" ".join(HOSTILE_CAT.split("\n")), " ".join(HOSTILE_SRC.split("\n"))],
                 "judge-scores": [" ".join(HOSTILE_CAT.split("\n"))],
                 "evaluation-report": [" ".join(HOSTILE_CAT.split("\n"))]}
        profile = tmp_path / "chromium-profile"
        for key, strings in shown.items():
            dom = browse(exe, arts[key], profile, tmp_path / f"hostile-{key}.png")
            page = Page(dom)
            assert not page.handler_elements(), (key, page.handler_elements())
            # an element made from the data would be in the DOM as markup; as text it is escaped
            assert not re.search(r"<script[^>]*>\s*window\.pwned", dom), f"{key}: a script element from the data"
            assert not re.search(r"<img[^>]*onerror", dom), f"{key}: an img[onerror] element from the data"
            body = re.sub(r"\s+", " ", "".join(page.text))
            for s in strings:
                assert s in body, f"{key}: {s!r} not shown as text"
            for i, table in enumerate(page.tables):
                widths = {n for _, n in table}
                assert len(widths) == 1, f"{key}: table {i} has rows of {sorted(widths)} cells"
            assert page.tables, f"{key}: no table rendered"
    finally:
        ui_proc.send_signal(signal.SIGINT)
        try:
            ui_proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ui_proc.kill()
