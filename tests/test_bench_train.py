"""The training benchmarks' own logic: bench_train_cpu's three arms (tiny Gemma, 2 steps each) and the
CPU-testable helpers of bench_train_gpu (run order, median and spread, MFU, dry-run plan)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_train_cpu as cpu  # noqa: E402
import bench_train_gpu as gpu  # noqa: E402


# ----------------------------------------------------------------------------- bench_train_gpu helpers
def test_gpu_runs_interleave_and_rotate():
    order = gpu.run_order(list(gpu.ARMS), 3)
    assert len(order) == 9
    rounds = [[a for r, a in order if r == k] for k in range(3)]
    assert all(sorted(x) == sorted(gpu.ARMS) for x in rounds)  # every arm once per round
    assert [x[0] for x in rounds] == ["plain_trl", "trl_tuned", "finsynth"]  # no arm always first
    assert gpu.run_order(["finsynth"], 2) == [(0, "finsynth"), (1, "finsynth")]


def test_gpu_aggregate_median_spread_and_peak():
    runs = [{"tokens_per_s": t, "s_per_step": 1.0, "tokens_per_step": 100.0, "mfu": m, "peak_cuda_gib": p,
             "settings": {"batch": 4}} for t, m, p in ((900.0, 0.1, 5.0), (1000.0, 0.2, 5.5), (1200.0, 0.3, 5.2))]
    agg = gpu.aggregate(runs)
    assert agg["tokens_per_s"] == 1000.0 and agg["tokens_per_s_min"] == 900.0 and agg["tokens_per_s_max"] == 1200.0
    assert agg["spread"] == 0.3 and agg["mfu"] == 0.2 and agg["peak_cuda_gib"] == 5.5 and agg["runs"] == 3
    assert agg["settings"] == {"batch": 4} and len(agg["all_runs"]) == 3


def test_gpu_mfu_and_peak_table():
    assert gpu.mfu(1000.0, 4e9, 100.0) == 0.04
    assert gpu.mfu(1000.0, 4e9, None) is None
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu.peak_tflops("NVIDIA GH200 480GB", None) == 989.0
    assert gpu.peak_tflops("NVIDIA L40S", None) == 362.0  # not L4's
    assert gpu.peak_tflops("Unknown", 5.0) == 5.0 and gpu.peak_tflops("Unknown", None) is None


def test_gpu_dry_run_plans_three_arms(capsys):
    plan = gpu.main(["--dry-run", "--shape", "tiny", "--rows", "8", "--seq", "64", "--min-len", "16"])
    assert plan["arms"] == list(gpu.ARMS) and plan["runs_per_arm"] == 3 and len(plan["run_order"]) == 9
    assert plan["params"] > 0 and plan["flops_per_token"] == 4 * plan["params"]
    assert json.loads(capsys.readouterr().out)["run_order"][:3] == ["plain_trl#1", "trl_tuned#1", "finsynth#1"]
    plan = gpu.main(["--dry-run", "--shape", "tiny", "--rows", "4", "--skip-plain", "--runs", "1"])
    assert plan["arms"] == ["trl_tuned", "finsynth"]
    with pytest.raises(SystemExit):
        gpu.parse_args(["--arms", "nope"])


def test_gpu_gpu_machine_without_a_gpu_records_versions():
    m = gpu.gpu_machine()
    assert m["torch"] and m["trl"] and "gpu" in m and "cuda" in m


# ----------------------------------------------------------------------------- bench_train_cpu helpers
def test_cpu_summary_drops_the_warmup_and_times_the_head():
    steps = [(10.0, 20.0, 1000, 5.0, 1000), (4.0, 8.0, 800, 1.0, 100), (6.0, 12.0, 1200, 2.0, 100)]
    s = cpu.summarize_steps(steps)
    assert s["steps_timed"] == 2 and s["tokens"] == 2000 and s["tokens_per_s"] == 200.0
    assert s["tokens_per_cpu_s"] == 100.0 and s["s_per_step"] == 5.0
    assert s["lm_head"] == {"s_per_step": 1.5, "share_of_step": 0.3, "positions_per_step": 100.0,
                            "positions_per_real_token": 0.1, "tokens_per_s_without_head": round(2000 / 7, 2)}
    assert len(s["all_steps_wall_cpu_tokens_head_s_head_positions"]) == 3
    assert "lm_head" not in cpu.summarize_steps(steps, head_timed=False)


def test_cpu_ratios_and_verdict():
    tuned = {"tokens_per_s": 100.0, "tokens_per_cpu_s": 50.0, "s_per_step": 20.0,
             "lm_head": {"s_per_step": 12.0, "positions_per_step": 2000.0, "tokens_per_s_without_head": 250.0}}
    ours = {"tokens_per_s": 250.0, "tokens_per_cpu_s": 120.0, "s_per_step": 8.0,
            "lm_head": {"s_per_step": 0.5, "positions_per_step": 100.0, "tokens_per_s_without_head": 266.67}}
    assert cpu.ratios(ours, tuned) == {"tokens_per_s": 2.5, "tokens_per_cpu_s": 2.4}
    v = cpu.verdict({"finsynth": ours, "trl_tuned": tuned})
    assert v.startswith("finsynth is faster than TRL tuned") and "2.50x tokens/s" in v and "1.07x" in v
    slow = {**ours, "tokens_per_s": 90.0}
    assert cpu.verdict({"finsynth": slow, "trl_tuned": tuned}).startswith("finsynth is not faster")
    assert cpu.verdict({"finsynth": ours}).startswith("not compared")


def test_cpu_liger_is_off_on_cpu_with_a_reason():
    s = cpu.liger_status("cpu")
    assert s["use_liger_kernel"] is False and "Triton" in s["reason"]


def test_cpu_tuned_config_has_the_documented_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FINSYNTH_CPU_BF16", "0")
    args, settings = cpu.tuned_sft_config(tmp_path, steps=3, batch=2, accumulation=2, max_length=512)
    assert (args.packing, args.packing_strategy, args.padding_free) == (True, "bfd", True)
    assert args.assistant_only_loss is True and args.gradient_checkpointing is False
    assert args.use_liger_kernel is False and args.bf16 is False and args.max_length == 512
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_steps) == (2, 2, 3)
    for key in ("packing", "padding_free", "assistant_only_loss", "gradient_checkpointing", "use_liger_kernel",
                "bf16", "attention"):
        docs = settings[key]["docs"]
        urls = [docs] if isinstance(docs, str) else docs
        assert all(u.startswith("https://huggingface.co/docs/trl/") for u in urls)
    assert settings["use_liger_kernel"]["reason"] and settings["bf16"]["reason"]


# ----------------------------------------------------------------------------- bench_train_cpu end to end
def test_cpu_bench_runs_three_arms_on_a_tiny_gemma(tmp_path, tiny_gemma_dir):
    out = tmp_path / "train_cpu.json"
    r = cpu.main(["--steps", "2", "--rows", "8", "--model", str(tiny_gemma_dir), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert list(r["arms"]) == list(cpu.ARMS) and r["arm_order"] == list(cpu.ARMS)
    for name, arm in r["arms"].items():
        assert arm["steps_timed"] == 1 and arm["tokens_per_s"] > 0 and arm["peak_rss_gb"] > 0, name
        assert len(arm["load_avg_start"]) == 3 and arm["settings"]
    tuned, ours, plain = r["arms"]["trl_tuned"], r["arms"]["finsynth"], r["arms"]["plain_trl"]
    assert tuned["settings"]["assistant_only_loss"]["value"] is True
    assert tuned["settings"]["padding_free"]["value"] is True
    assert tuned["settings"]["gradient_checkpointing"]["value"] is False
    # the same packing and batch shape: about the same real tokens a step (which packed rows come first differs)
    assert 0.7 < tuned["tokens_per_step"] / ours["tokens_per_step"] < 1.3
    # TRL's head scores every position on CPU, finsynth's only the labelled (answer) ones
    assert tuned["lm_head"]["positions_per_real_token"] > 0.9
    assert ours["lm_head"]["positions_per_real_token"] < 0.5
    assert plain["lm_head"]["positions_per_real_token"] > 0.9
    for key in ("speedup_vs_trl_defaults", "speedup_vs_trl_tuned"):
        assert set(r[key]) == {"tokens_per_s", "tokens_per_cpu_s"}
    assert r["verdict"].startswith("finsynth is")
    assert r["machine"]["load_avg_end"] and "cpu_flags" in r["machine"] and "amx_tile" in r["machine"]
    assert 0 < r["data"]["assistant_share"] < 0.5


def test_gpu_tuned_config_and_child_command(tmp_path):
    args = gpu.parse_args(["--shape", "tiny", "--seq", "256", "--steps", "4", "--batch-ours", "2",
                           "--peak-tflops", "9"])
    sargs, settings = gpu.tuned_sft_config(tmp_path, args, use_cpu=True)  # no GPU here
    assert (sargs.packing, sargs.packing_strategy, sargs.padding_free, sargs.gradient_checkpointing) == (
        True, "bfd", True, False)
    assert sargs.bf16 is True and sargs.max_length == 256 and sargs.per_device_train_batch_size == 2
    assert sargs.use_liger_kernel is settings["use_liger_kernel"]["value"]
    cmd = gpu.child(args, ["--run-arm", "trl_tuned"])
    assert cmd[1].endswith("bench_train_gpu.py") and cmd[-2:] == ["--run-arm", "trl_tuned"]
    assert gpu.parse_args(cmd[2:]).__dict__ | {"arm_list": None} == args.__dict__ | {
        "run_arm": "trl_tuned", "arm_list": None}
