"""A non-editable install works: the wheel carries every package, the profiles and the prompts, and
``finsynth config --profile demo`` runs from another directory with no checkout in sight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(wheels)], check=True, capture_output=True, cwd=tmp_path)
    (whl,) = wheels.glob("finsynth-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    assert {"datagen/llm/engine.py", "datagen/_configs/demo.yaml", "datagen/_prompts/sft_user.jinja",
            "training/train.py", "flows/cli.py", "lm/causal_lm.py"} <= names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(whl)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import datagen, json, sys; from flows.cli import main; "
            "assert datagen.__file__.startswith(sys.argv[1]), datagen.__file__; sys.exit(main(sys.argv[2:]))")
    r = subprocess.run([sys.executable, "-c", code, str(target), "config", "--profile", "demo"], env=env,
                       cwd=elsewhere, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["profile"] == "demo"
    r = subprocess.run([sys.executable, "-c", "from datagen.prompts import load_prompt; "
                        "print(load_prompt('sft_user').hash)"], env=env, cwd=elsewhere, capture_output=True, text=True)
    assert r.returncode == 0 and len(r.stdout.strip()) == 12, r.stderr[-2000:]
