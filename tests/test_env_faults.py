"""Faults of the machine, each a real fault where this machine can make one: a full disk and a
read-only root (a small tmpfs mounted for the test, root only), a corrupt and a locked response cache,
a missing model file. Each exits non-zero with one line naming the stage, the path and what to do,
no traceback (``--debug`` keeps it), and no finished manifest; a corrupt cache is left where it is,
byte for byte (docs/providers.md)."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from datagen.faults import CacheFault, EnvironmentFault, explain, find
from datagen.llm.cache import ResponseCache

REPO_RAW = Path(__file__).resolve().parents[1] / "data" / "raw"


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "finsynth"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, check=False)


def _one_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("finsynth:")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (root and a working ``mount`` only): yields its mount point; unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _project(where: Path) -> Path:
    root = where / "proj"
    (root / "data").mkdir(parents=True)
    (root / "data" / "raw").symlink_to(REPO_RAW)
    return root


def test_full_disk_fetch_one_line_no_manifest(small_fs):
    root = _project(small_fs)
    st = os.statvfs(small_fs)
    with open(small_fs / "filler", "wb") as f:  # leave 8 KiB: fetch's files do not fit
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 8192))
    line = _one_line(_cli("fetch", "--profile", "tiny", "--root", str(root)))
    assert line.startswith("finsynth: error: fetch: no space left on the device holding "), line
    assert str(root) in line and "free space" in line and "--root" in line
    assert not (root / "data" / "processed" / "fetch" / "manifest.json").exists()


def test_read_only_root_one_line(small_fs):
    root = _project(small_fs)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    p = _cli("fetch", "--profile", "tiny", "--root", str(root))
    line = _one_line(p)
    assert line.startswith("finsynth: error: fetch: "), line
    assert "read-only file system" in line and str(root) in line and "--root" in line
    assert not (root / "data" / "processed").exists()
    from flows.cli import main

    with pytest.raises((OSError, EnvironmentFault)):  # --debug keeps the traceback
        main(["fetch", "--profile", "tiny", "--root", str(root), "--debug"])


def test_permission_denied_is_explained_with_its_path():
    # root ignores file modes, so this one is the error value itself, as open() raises it
    fault = explain(PermissionError(errno.EACCES, "Permission denied", "/srv/p/data"), stage="dedup")
    assert str(fault) == ("dedup: permission denied on /srv/p/data: give this user write access to it or "
                          "choose another --root, then rerun `finsynth dedup`")
    assert explain(OSError(errno.ENOSPC, "No space left on device"), stage="fetch", path="/r/data").what == \
        "no space left on the device holding /r/data"
    assert explain(ValueError("x")) is None and explain(OSError(errno.ECONNREFUSED, "refused")) is None


# ----------------------------------------------------------------------------- the response cache
def test_corrupt_cache_refuses_with_one_line_and_is_kept(tiny_cfg, tmp_root):
    p = _cli("fetch", "--profile", "tiny", "--root", str(tmp_root))
    assert p.returncode == 0, p.stderr[-2000:]
    cache = tiny_cfg.paths.resolve(tiny_cfg.llm.cache_file)
    cache.parent.mkdir(parents=True, exist_ok=True)
    junk = b"these bytes are not SQLite\n" * 200
    cache.write_bytes(junk)
    line = _one_line(_cli("augment", "--profile", "tiny", "--root", str(tmp_root)))
    assert line.startswith("finsynth: error: augment: the response cache "), line
    assert str(cache) in line and "corrupt" in line and f"mv '{cache}' '{cache}.corrupt'" in line
    assert "finsynth augment" in line
    assert cache.read_bytes() == junk  # never deleted, never replaced
    assert sorted(f.name for f in cache.parent.iterdir()) == [cache.name]
    assert not (tmp_root / "data" / "processed" / "augment" / "manifest.json").exists()


def test_corrupt_cache_raises_cache_fault(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(CacheFault, match="is corrupt .*file is not a database.*move it aside"):
        ResponseCache(path)
    assert path.read_bytes() == b"\x00garbage" * 1000


def test_locked_cache_says_so_after_its_timeout(tmp_path):
    path = tmp_path / "c.sqlite"
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(CacheFault) as e:
            ResponseCache(path, timeout_s=0.3)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "stayed locked for 0.3 s" in str(e.value) and str(path) in str(e.value)
    assert "another process holds it" in str(e.value)
    ResponseCache(path, timeout_s=1).put("k", provider="p", model="m", text="t")  # free again: works


def test_cache_shared_rows_still_work(tmp_path):
    c = ResponseCache(tmp_path / "ok.sqlite")
    c.put("k", provider="p", model="m", text="hello")
    assert c.get("k")["text"] == "hello" and len(c) == 1


# ----------------------------------------------------------------------------- model files
def test_missing_model_folder_is_named():
    from lm.packaged import ModelFilesError, resolve_model_path

    missing = f"/nonexistent-{uuid.uuid4().hex}/model"
    with pytest.raises(ModelFilesError) as e:
        resolve_model_path(missing)
    fault = find(e.value, stage="train")  # what execute() and the CLI print: one line, with the stage
    assert isinstance(fault, EnvironmentFault)
    assert str(fault).startswith(f"train: the model folder {missing} does not exist: set model.name_or_path")
    assert resolve_model_path("google/gemma-3-270m") == "google/gemma-3-270m"  # a Hub id is left alone


def test_converted_gemma_with_a_file_gone_says_how_to_rebuild(tmp_path, monkeypatch):
    from lm import packaged

    monkeypatch.setenv("FINSYNTH_MODEL_CACHE", str(tmp_path))
    target = tmp_path / "gemma3-270m-safetensors"
    target.mkdir()
    (target / ".complete").write_text("ok\n")
    (target / "config.json").write_text("{}")
    (target / "tokenizer_config.json").write_text("{}")
    with pytest.raises(packaged.ModelFilesError) as e:
        packaged.gemma_path()
    assert str(find(e.value)) == (f"the converted packaged Gemma in {target} is missing model.safetensors: delete that "
                            f"folder (rm -r '{target}'); the next run rebuilds it from the packaged GGUF (~75 s)")
