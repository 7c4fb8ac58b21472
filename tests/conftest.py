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


# ----------------------------------------------------------------------------- one real Prefect run per session
# A local server + process worker and one finished ``tiny`` pipeline run through the ``pipeline``
# deployment, shared by tests/test_flows.py and the UI's browser test (a tiny run costs minutes).
@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory):
    from flows.deploy import local_prefect

    with local_prefect(tmp_path_factory.mktemp("prefect-home")) as env:
        yield env


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    (root / "data").mkdir()
    (root / "data" / "raw").symlink_to(Path(__file__).resolve().parents[1] / "data" / "raw")
    return root


@pytest.fixture(scope="session")
def first_run(prefect_env, project) -> dict:
    from flows.deploy import run_deployment_in

    return run_deployment_in(prefect_env, "finsynth-pipeline/pipeline",
                             {"profile": "tiny", "root": str(project)}, timeout_s=1500)




@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory) -> Path:
    """A random 2-layer Gemma-3 text model (safetensors) next to the packaged Gemma tokenizer with the
    training chat template: a real architecture that loads and trains in seconds."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from datagen.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("tiny-gemma")
    tok = load_tokenizer(load_config(profile="demo").model)
    torch.manual_seed(0)
    mc = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)
    Gemma3ForCausalLM(mc).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d
