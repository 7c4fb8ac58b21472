"""scripts/setup.sh: an install with more extras covers a later call with fewer (tests, then the demo)."""

import subprocess
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
