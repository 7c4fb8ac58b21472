"""Export: score tables and model cards from plain data (fast), and a GGUF export that llama.cpp serves
with the same greedy answer as transformers (slow: the packaged Gemma-3-270M, a LoRA adapter, llama.cpp's
converter from the llama-cpp-python sdist, the llama-cpp-python server on 127.0.0.1)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml

from datagen.config import load_config
from datagen.io import write_json, write_manifest
from datagen.manifest import TrainManifest
from training.export import (
    _strip_generation_markers,
    adapter_dir,
    export,
    modelfile,
    template_family,
)
from training.model_card import arms, build_model_card, card_metadata, parse_metadata, score_table

ROW = {"split": "test", "category": "liquidity", "grader": "numeric", "n": 4,
       "base_mean": 0.25, "base_mean_lo": 0.0, "base_mean_hi": 0.5, "base_pass": 0.25,
       "tuned_mean": 0.5, "tuned_mean_lo": 0.25, "tuned_mean_hi": 0.75, "tuned_pass": 0.5,
       "diff_mean": 0.25, "diff_mean_lo": -0.25, "diff_mean_hi": 0.5, "diff_pass": 0.25,
       "rests_on_judge": False, "judge_unreliable": False}


def test_score_table_has_readable_columns_with_cis_and_the_judge_flag():
    judged = {**ROW, "category": "credit_risk", "grader": "judge", "rests_on_judge": True, "judge_unreliable": True}
    t = score_table([ROW, judged])
    assert list(t[0]) == ["category", "grader", "n", "base zero-shot [95% CI]", "tuned [95% CI]",
                          "tuned - base [95% CI]", "LLM judge"]
    assert t[0]["base zero-shot [95% CI]"] == "0.25 [0.00, 0.50]"
    assert t[0]["tuned - base [95% CI]"] == "+0.25 [-0.25, +0.50]"
    assert [r["LLM judge"] for r in t] == ["not used", "UNRELIABLE"]
    # the Prefect UI gets two narrow tables: arms (no grader) and differences
    assert list(score_table([ROW], part="scores", ci_in_header=False)[0]) == [
        "category", "n", "base zero-shot", "tuned", "LLM judge"]
    assert list(score_table([ROW], part="differences", ci_in_header=False)[0]) == [
        "category", "grader", "n", "tuned - base", "LLM judge"]


def test_score_table_shows_the_arms_that_exist_few_shot_included():
    row = {**ROW, "fewshot_mean": 0.4, "fewshot_lo": 0.1, "fewshot_hi": 0.7,  # <arm>_lo / _hi: the newer names
           "tuned_minus_fewshot_mean": 0.1, "tuned_minus_fewshot_lo": -0.2, "tuned_minus_fewshot_hi": 0.3,
           "new_arm_mean": None}
    assert arms([row]) == ["base", "fewshot", "tuned", "diff", "tuned_minus_fewshot"]  # new_arm: no values
    cols = list(score_table([row, {**row, "split": "gold"}])[0])
    assert cols[:2] == ["split", "category"]
    assert "base few-shot [95% CI]" in cols and "tuned - few-shot [95% CI]" in cols
    t = score_table([row])[0]
    assert t["base few-shot [95% CI]"] == "0.40 [0.10, 0.70]"
    assert t["tuned - few-shot [95% CI]"] == "+0.10 [-0.20, +0.30]"


def test_model_card_metadata_is_valid_hub_metadata():
    rows = [ROW]
    report = {"judge": {"used": False}, "config": {"bootstrap_samples": 200}}
    manifest = TrainManifest(config={"train": {"lora": {"r": 8, "alpha": 16, "dropout": 0.05,
                                                        "target_modules": ["q_proj"]},
                                               "learning_rate": 2e-4, "seed": 42}},
                             steps=2, max_steps=2, precision="float32", device="cpu", counts={"train_rows": 10})
    text = build_model_card(title="t", kind="merged", name_or_path="packaged:gemma3-270m", license="apache-2.0",
                            train_manifest=manifest, report=report, table_rows=rows,
                            dataset_card="../dataset/README.md", dataset_name="finsynth-demo",
                            files=["model.safetensors"], usage="...")
    meta = parse_metadata(text)
    assert meta["base_model"] == "google/gemma-3-270m" and meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0" and "finsynth" in meta["tags"] and meta["datasets"] == ["finsynth-demo"]
    assert "| liquidity | numeric | 4 | 0.25 [0.00, 0.50] | 0.50 [0.25, 0.75] | +0.25 [-0.25, +0.50] |" in text
    assert "[../dataset/README.md](../dataset/README.md)" in text and "## Intended use and limits" in text
    assert card_metadata(name_or_path="/some/local/dir", kind="adapter", license="mit",
                         dataset_name=None)["library_name"] == "peft"
    assert "base_model" not in card_metadata(name_or_path="/some/local/dir", kind="adapter", license="mit",
                                             dataset_name=None)


def test_modelfile_carries_the_gemma_turns_stop_token_and_system_prompt():
    jinja = Path(__file__).resolve().parents[1].joinpath("prompts", "gemma_chat.jinja").read_text()
    assert template_family(jinja) == "gemma"
    plain = _strip_generation_markers(jinja)
    assert "{%- generation -%}" in jinja and "generation -%}" not in plain and "endgeneration" not in plain
    mf = modelfile("adapter-q8_0.gguf", jinja, "Be brief.", num_ctx=256)
    assert mf.splitlines()[1] == "FROM ./adapter-q8_0.gguf"
    assert 'PARAMETER stop "<end_of_turn>"' in mf and 'SYSTEM """Be brief."""' in mf
    assert "<start_of_turn>user" in mf and "<start_of_turn>model" in mf and "PARAMETER num_ctx 256" in mf
    assert "TEMPLATE" not in modelfile("x.gguf", "{{ messages }}")


def test_export_without_a_finished_adapter_says_what_to_run(tiny_cfg):
    with pytest.raises(FileNotFoundError, match="finsynth train"):
        adapter_dir(tiny_cfg)


# ----------------------------------------------------------------------------- slow: GGUF through llama.cpp
PROMPT = [{"role": "user", "content": "Context: ACME reported total assets of 1,200 and total liabilities of 800."
                                      "\n\nQuestion: What is ACME's equity (assets minus liabilities)?"}]
MARGIN = 1.0  # logits: a step where transformers' top two are closer than this may go either way in 8 bits
N_TOKENS = 8  # greedy tokens compared


def _lora_adapter(cfg, out: Path) -> Path:
    """A LoRA adapter on the packaged Gemma with small non-zero B (seeded): merged, it changes the answer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from datagen.tokenizer import load_tokenizer
    from training.models import load_model

    base = load_model(cfg, "cpu", quantization_config=None)
    torch.manual_seed(0)  # lora_A's init
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(cfg.model).save_pretrained(str(out))
    write_json(out / "log_history.json", [])
    write_manifest(out, TrainManifest(config={"train": cfg.dump_public()["train"]}, device="cpu", precision="float32"))
    return out


def _hf_greedy(model_dir: Path, n: int) -> tuple[str, list[int], list[float]]:
    """Greedy tokens of the merged model and, per step, the gap between its top two logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    ids = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
    margins = [float(v[0] - v[1]) for v in (s[0].topk(2).values for s in out.scores)]
    return tok.decode(ids, skip_special_tokens=True), ids, margins


@pytest.mark.slow
def test_gguf_export_serves_the_transformers_greedy_answer(tmp_root, tmp_path):
    from transformers import AutoTokenizer

    from datagen.llm.llamacpp_server import LlamaCppServer, llama_cpp_available

    if not llama_cpp_available():
        pytest.skip("llama-cpp-python[server] not installed (the llamacpp extra; scripts/test.sh installs it)")
    cfg = load_config(profile="tiny", root=tmp_root)
    adapter = _lora_adapter(cfg, cfg.paths.models_dir / cfg.train.run_name)

    merged = export(cfg, "merged")
    merged_dir = Path(merged["path"])
    assert not (merged_dir / "adapter_config.json").exists()  # a plain checkpoint: no PEFT to load it
    assert any(merged_dir.glob("*.safetensors")) and not any(merged_dir.glob("*.bin"))
    assert parse_metadata((merged_dir / "README.md").read_text())["library_name"] == "transformers"
    from safetensors import safe_open

    from lm.packaged import resolve_model_path

    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(next(merged_dir.glob("*.safetensors"))), "pt") as m, \
            safe_open(str(Path(resolve_model_path(cfg.model.name_or_path)) / "model.safetensors"), "pt") as b:
        assert not (m.get_tensor(name) == b.get_tensor(name)).all()  # the adapter is in the weights
    hf_text, hf_ids, margins = _hf_greedy(merged_dir, N_TOKENS)

    t0 = time.perf_counter()
    res = export(cfg, "gguf")
    gguf = Path(res["path"])
    print(f"gguf export: {time.perf_counter() - t0:.0f} s, {gguf.stat().st_size / 1e6:.0f} MB")  # noqa: T201
    assert gguf.suffix == ".gguf" and gguf.read_bytes()[:4] == b"GGUF"
    assert (gguf.parent / "Modelfile").read_text().startswith("# Ollama")
    meta = yaml.safe_load((gguf.parent / "README.md").read_text().split("---\n")[1])
    assert meta["library_name"] == "gguf" and meta["base_model"] == "google/gemma-3-270m"
    assert (adapter / "manifest.json").exists()  # the train stage's folder is untouched

    tok = AutoTokenizer.from_pretrained(str(merged_dir))
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    prompt = prompt.removeprefix(tok.bos_token)  # llama.cpp adds BOS itself
    with LlamaCppServer(model_path=gguf, log_path=tmp_path / "llama.log", n_ctx=512) as srv:
        r = httpx.post(f"{srv.base_url}/completions", timeout=120,
                       json={"model": srv.model, "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0.0})
    r.raise_for_status()
    gguf_text = r.json()["choices"][0]["text"]
    gguf_ids = tok(gguf_text, add_special_tokens=False)["input_ids"]
    assert gguf_text.strip(), "llama.cpp answered nothing"
    print(f"transformers: {hf_text!r}; llama.cpp: {gguf_text!r}; margins {margins}")  # noqa: T201
    # every token transformers picked by a clear margin, up to its first near-tie, llama.cpp picks too
    firm = next((i for i, m in enumerate(margins) if m < MARGIN), len(margins))
    assert firm >= 4, f"the probe prompt is a near-tie after {firm} tokens: pick another ({margins})"
    assert gguf_ids[:firm] == hf_ids[:firm], (gguf_text, hf_text, margins)
