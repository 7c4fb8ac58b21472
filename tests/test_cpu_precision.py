"""bf16 autocast on a CPU only where it has AMX-BF16 (lm.causal_lm.cpu_autocast_dtype): the selection
on faked probes, the override, and what training and generation get from it. No model is loaded."""

from __future__ import annotations

import pytest
import torch

from lm import causal_lm
from lm.causal_lm import autocast_for, cpu_autocast_dtype, has_amx_bf16


@pytest.fixture
def cpu(monkeypatch):
    """Set what the probes say: ``cpu(tiles, flags)``; ``tiles=None`` removes torch's private probe."""
    monkeypatch.delenv("FINSYNTH_CPU_BF16", raising=False)

    def set_(tiles: bool | None, flags: set[str]) -> None:
        if tiles is None:
            monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
        else:
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: tiles, raising=False)
        monkeypatch.setattr(causal_lm, "cpu_flags", lambda: set(flags))
    return set_


AMX = {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}


def test_bf16_only_where_the_cpu_has_amx_bf16(cpu):
    cpu(True, AMX)
    assert has_amx_bf16() and cpu_autocast_dtype() is torch.bfloat16
    cpu(False, {"avx2", "fma"})  # this kind of host (AVX2, no AMX): fp32
    assert not has_amx_bf16() and cpu_autocast_dtype() is None
    cpu(True, {"avx512f", "amx_tile", "amx_int8"})  # tiles but no bf16 in them
    assert cpu_autocast_dtype() is None
    cpu(True, set())  # no /proc/cpuinfo: torch's probe decides
    assert cpu_autocast_dtype() is torch.bfloat16
    cpu(None, AMX)  # a torch without the private probe: the flags decide
    assert cpu_autocast_dtype() is torch.bfloat16
    cpu(None, set())
    assert cpu_autocast_dtype() is None


def test_the_override_wins_both_ways(cpu, monkeypatch):
    cpu(True, AMX)
    monkeypatch.setenv("FINSYNTH_CPU_BF16", "0")
    assert cpu_autocast_dtype() is None
    cpu(False, set())
    monkeypatch.setenv("FINSYNTH_CPU_BF16", "1")
    assert cpu_autocast_dtype() is torch.bfloat16


def test_generation_autocasts_an_fp32_model_on_an_amx_cpu_only(cpu):
    cpu(True, AMX)
    with autocast_for(torch.device("cpu"), torch.float32):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with autocast_for("cpu", torch.bfloat16):  # a model already in half precision: left alone
        assert not torch.is_autocast_enabled("cpu")
    with autocast_for("cuda:0", torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    cpu(False, {"avx2"})
    with autocast_for("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")


def test_this_host_keeps_fp32_unless_it_has_amx():
    """On the host the tests run on: bf16 exactly when torch and the flags both see AMX-BF16."""
    flags = causal_lm.cpu_flags()
    probe = getattr(torch.cpu, "_is_amx_tile_supported", lambda: "amx_bf16" in flags)()
    expected = torch.bfloat16 if probe and (not flags or "amx_bf16" in flags) else None
    assert cpu_autocast_dtype() is expected


def test_training_asks_the_trainer_for_bf16_on_an_amx_cpu_only(cpu, tiny_cfg, tmp_path):
    from training.train import build_sft_config

    cpu(True, AMX)
    args = build_sft_config(tiny_cfg, tmp_path, "cpu", has_eval=False)
    assert args.bf16 and not args.fp16 and args.use_cpu
    cpu(False, {"avx2"})
    args = build_sft_config(tiny_cfg, tmp_path, "cpu", has_eval=False)
    assert not args.bf16 and not args.fp16
