"""scripts/setup.sh: an install with more extras covers a later call with fewer (tests, then the demo)."""

import subprocess
import sys
from pathlib import Path

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"


def covered(tmp_path: Path, stamps: list[str], extras: str) -> bool:
    """Run setup.sh's own ``covered`` function against fake stamp files in ``tmp_path/.venv``."""
    (tmp_path / ".venv").mkdir(parents=True, exist_ok=True)
    for s in stamps:
        (tmp_path / ".venv" / f".finsynth-installed-abc123-{s}").touch()
    script = f"""
EXTRAS={extras}
stamp=".venv/.finsynth-installed-abc123-${{EXTRAS//,/_}}"
eval "$(sed -n '/^covered() {{/,/^}}/p' {SETUP})"
covered
"""
    return subprocess.run(["bash", "-c", script], cwd=tmp_path).returncode == 0


def test_a_superset_install_covers_fewer_extras(tmp_path):
    assert covered(tmp_path, ["dev_llamacpp"], "dev")
    assert covered(tmp_path, ["dev_llamacpp"], "llamacpp")
    assert covered(tmp_path, ["dev_llamacpp"], "dev,llamacpp")


def test_missing_extras_or_another_hash_install_again(tmp_path):
    assert not covered(tmp_path / "a", ["dev_llamacpp"], "dev,gpu")
    assert not covered(tmp_path / "b", [], "dev")
    other = tmp_path / "c" / ".venv"
    other.mkdir(parents=True)
    (other / ".finsynth-installed-fff999-dev_llamacpp").touch()  # from another pyproject/setup.sh
    assert not covered(tmp_path / "c", [], "dev")


# ----------------------------------------------------------------------------- quiet output, on a fake Python and pip
FAKE_PIP = """#!/usr/bin/env bash
# a pip that talks a lot, records its calls, fails when FAIL_ON matches its arguments, and builds fake wheels
echo "pip $*" >> "$CALLS"
for i in $(seq 1 200); do echo "WARNING: Retrying (Retry(total=4)) after connection broken: line $i"; done
echo "progress bar noise" >&2
if [ -n "${FAIL_ON:-}" ] && [[ "$*" == *"$FAIL_ON"* ]]; then
  echo "ERROR: No matching distribution found for $FAIL_ON"; exit 1
fi
if [ "$1 $2" = "install uv>=0.5,<1" ] && [ -n "${FAKE_UV:-}" ]; then cp "$FAKE_UV" "$(dirname "$0")/uv"; fi
if [ "$1" = wheel ]; then
  while [ $# -gt 0 ]; do
    if [ "$1" = -w ]; then mkdir -p "$2"; touch "$2/llama_cpp_python-0.3.36-cp311-linux_x86_64.whl"; fi
    shift
  done
fi
exit 0
"""

FAKE_PY = """#!/usr/bin/env bash
# a python3 whose -c is the real one, and whose -m venv makes a .venv holding the fake pip
if [ "$1" = -c ]; then exec "$REAL_PY" "$@"; fi
if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"; cp "$FAKE_PIP" "$3/bin/pip"; ln -s "$0" "$3/bin/python"; fi
exit 0
"""


def _fake_project(tmp_path: Path) -> tuple[Path, dict]:
    import os
    import shutil

    proj = tmp_path / "proj"
    (proj / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, proj / "scripts" / "setup.sh")
    (proj / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    for name, text in (("pip", FAKE_PIP), ("python3", FAKE_PY)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PYTHON": str(tmp_path / "python3"), "FAKE_PIP": str(tmp_path / "pip"),
           "CALLS": str(tmp_path / "calls"), "FINSYNTH_WHEEL_CACHE": str(tmp_path / "wheels"),
           "REAL_PY": sys.executable}
    return proj, env


def _setup(proj: Path, env: dict, extras: str = "dev", **more: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/setup.sh", extras], cwd=proj, env={**env, **more}, capture_output=True,
                          text=True, timeout=120)


def test_setup_prints_one_timed_line_per_step_and_logs_pip(tmp_path):
    proj, env = _fake_project(tmp_path)
    r = _setup(proj, env, "dev,llamacpp")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) <= 30 and r.stderr == "", r.stdout + r.stderr
    assert "Retrying" not in r.stdout
    import re

    steps = [ln for ln in lines if " ... " in ln]
    assert [re.sub(r" \.\.\. \d+ s$", "", s) for s in steps] == [
        "setup: creating .venv (Python {}.{})".format(*sys.version_info[:2]),
        "setup: upgrading pip", "setup: installing torch 2.13.0 (CPU wheels)",
        "setup: building llama-cpp-python 0.3.36 with portable flags (~10 min once on 2 cores)",
        f"setup: installing llama-cpp-python[server] 0.3.36 from {steps[4].split(' from ')[1].split(' ... ')[0]}",
        "setup: installing finsynth[dev,llamacpp] and its dependencies"]
    assert all(re.search(r" \.\.\. \d+ s$", s) for s in steps)
    log = (proj / ".cache" / "setup.log").read_text()
    assert log.count("Retrying") == 200 * 6 and "progress bar noise" in log  # 6 pip calls (one installs uv)
    calls = (tmp_path / "calls").read_text()
    assert "-DGGML_NATIVE=OFF" not in calls and "wheel --no-cache-dir --no-deps" in calls  # flags via CMAKE_ARGS
    # idempotent: a second call installs nothing and says so in one line
    again = _setup(proj, env, "dev")
    assert again.returncode == 0 and again.stdout.splitlines() == [
        "setup: .venv already has finsynth[dev] for this pyproject.toml (nothing to install)"]
    assert (tmp_path / "calls").read_text() == calls


def test_a_failing_step_shows_the_logs_tail_and_path(tmp_path):
    proj, env = _fake_project(tmp_path)
    r = _setup(proj, env, "dev", FAIL_ON="torch==")
    assert r.returncode == 1
    assert r.stdout.splitlines()[-1].startswith("setup: installing torch 2.13.0 (CPU wheels) ... FAILED after ")
    assert "ERROR: No matching distribution found for torch==" in r.stderr
    assert f"setup: the whole log: {proj / '.cache' / 'setup.log'}" in r.stderr and len(r.stderr.splitlines()) <= 30
    assert not list((proj / ".venv").glob(".finsynth-installed-*"))  # not marked installed


def test_the_main_job_installs_no_extras_and_a_later_test_setup_adds_them(tmp_path):
    """``setup.sh ''`` (the demo's call) installs finsynth alone: Ray, psycopg, pytest and ruff are for the
    tests and scale-out. Any install covers it; a later ``dev`` call installs the extras."""
    proj, env = _fake_project(tmp_path)
    r = _setup(proj, env, "")
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[-1] == "pip install -e ." and "installing finsynth and its dependencies" in r.stdout
    assert "nothing to install" in _setup(proj, env, "").stdout
    r = _setup(proj, env, "dev")
    assert (tmp_path / "calls").read_text().splitlines()[-1] == "pip install -e .[dev]", r.stdout
    assert covered(tmp_path / "d", ["dev_llamacpp"], "''")


FAKE_UV = """#!/usr/bin/env bash
# a uv that records its calls and fails when UV_FAILS is set
echo "uv $*" >> "$CALLS"
[ -z "${UV_FAILS:-}" ] || { echo "error: Failed to fetch: https://pypi.org/simple/x/"; exit 2; }
"""


def test_dependencies_install_with_uv_keeping_the_cpu_torch_and_fall_back_to_pip(tmp_path):
    """Where uv installs (from PyPI), it installs finsynth's dependencies with the torch build that pip put
    there pinned; where it cannot, pip does, and the terminal shows the same one line."""
    proj, env = _fake_project(tmp_path)
    (tmp_path / "uv").write_text(FAKE_UV)
    (tmp_path / "uv").chmod(0o755)
    r = _setup(proj, env, "", FAKE_UV=str(tmp_path / "uv"))
    assert r.returncode == 0 and len(r.stdout.splitlines()) <= 30, r.stdout + r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    pin = proj / ".venv" / "finsynth-constraints.txt"
    assert calls[-2:] == ["pip install uv>=0.5,<1",
                          "uv pip install --python .venv/bin/python --constraint .venv/finsynth-constraints.txt -e ."]
    import importlib.metadata

    assert pin.read_text().strip() == "torch==" + importlib.metadata.version("torch")

    proj2, env2 = _fake_project(tmp_path / "b")
    r = _setup(proj2, env2, "", FAKE_UV=str(tmp_path / "uv"), UV_FAILS="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "b" / "calls").read_text().splitlines()[-1] == "pip install -e ."
    assert "uv failed" in (proj2 / ".cache" / "setup.log").read_text()
    assert "installing finsynth and its dependencies ... " in r.stdout
