"""Shared fixtures. Tests never touch the network: HF offline, only 127.0.0.1 servers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datagen.config import Config, load_config  # noqa: E402


@pytest.fixture
def tmp_root(tmp_path: Path) -> Path:
    """A throwaway project root with the repo's data/raw files linked in."""
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    repo_raw = Path(__file__).resolve().parents[1] / "data" / "raw"
    for f in repo_raw.iterdir():
        if f.is_file():
            (raw / f.name).symlink_to(f)
    return tmp_path


@pytest.fixture
def demo_cfg(tmp_root: Path) -> Config:
    return load_config(profile="demo", root=tmp_root)


@pytest.fixture
def tiny_cfg(tmp_root: Path) -> Config:
    return load_config(profile="tiny", root=tmp_root)
