"""The one loader and generation function (:mod:`lm.causal_lm`) and the ``local`` provider on them:
the decode loop on a tiny random Gemma-3 (exact against ``model.generate``, with and without a LoRA
adapter), and real batched generation with the packaged Gemma-3-270M (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from lm.causal_lm import (MIN_SHARED_HEAD, cut_at_stop, decode, generate, load_causal_lm, render_prompt,
                               shared_head_len, stop_token_ids)
from datagen.config import ModelConfig, ProviderConfig
from datagen.llm import ChatRequest, make_provider, open_cache
from datagen.llm.local import load_local_model


@pytest.fixture(scope="module")
def tiny_dir(tiny_gemma_dir) -> Path:
    return tiny_gemma_dir


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_local_model(str(tiny_dir), "cpu")


PROMPTS = ["What is a bond? Explain it briefly to a new analyst on the desk.", "Define inflation.",
           "What does EBITDA stand for, and why do credit analysts adjust it for leases?"]


def _hf_greedy(model, tok, texts, max_new):
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None, top_k=None,
                         eos_token_id=[-1], pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def test_greedy_decode_equals_generate_and_finished_rows_leave_exactly(tiny):
    model, tok, _ = tiny
    texts = [tok.bos_token + p for p in PROMPTS]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert max(map(len, ids)) > 16 > min(map(len, ids))  # left padding and the sliding window both matter
    ref = _hf_greedy(model, tok, texts, 10)
    assert decode(model, ids, max_new_tokens=10, pad_id=tok.pad_token_id) == [[r] for r in ref]
    # row 0 stops after 2 tokens and leaves the batch: the others are unchanged
    calls = []
    got = decode(model, ids, max_new_tokens=10, pad_id=tok.pad_token_id,
                 stopped=lambda b, so_far: calls.append(b) or (b == 0 and len(so_far) == 2))
    assert got == [[ref[0][:2]], [ref[1]], [ref[2]]]
    assert calls.count(0) == 2 and calls.count(1) == 9  # 0 is never asked again; the 10th token is the cap
    # a stop token ends a row too (and is returned, to be counted)
    stop = ref[1][3]
    got = decode(model, ids, max_new_tokens=10, pad_id=tok.pad_token_id, stop_ids=[stop])
    assert got[1][0] == ref[1][:ref[1].index(stop) + 1]


def test_a_shared_head_is_prefilled_once_and_decodes_like_the_whole_prompt(tiny):
    """Few-shot prompts share their exemplars: the head is prefilled at batch 1, its cache repeated per
    row and kept across calls in ``heads``; greedy tokens equal those of the unshared decode."""
    model, tok, _ = tiny
    head = tok.bos_token + " ".join(PROMPTS) + " Answer each question in one line. "  # longer than the window
    tails = ["Define a coupon.", "Define a swap.", "Define a yield curve for a new analyst."]
    ids = [tok(head + t, add_special_tokens=False)["input_ids"] for t in tails]
    h = shared_head_len(ids)
    assert h >= MIN_SHARED_HEAD and h > model.config.sliding_window  # the head outlives the sliding window
    equal = ids[:2]
    assert len(equal[0]) == len(equal[1]) and shared_head_len(equal) < len(equal[0]) - 1  # tails of 2+ tokens
    plain = decode(model, equal, max_new_tokens=8, pad_id=tok.pad_token_id, shared=0)  # == model.generate (above)
    calls = []
    real_forward = model.forward

    def counting(*a, **kw):
        calls.append(kw["input_ids"].shape)
        return real_forward(*a, **kw)

    heads: dict = {}
    kw = {"max_new_tokens": 8, "pad_id": tok.pad_token_id, "shared": shared_head_len(equal), "heads": heads}
    model.forward = counting
    try:
        got = decode(model, equal, **kw)
        again = decode(model, equal, **kw)
    finally:
        del model.forward
    assert got == plain and again == plain  # tails of equal length: exactly the unshared tokens
    prefills = [c for c in calls if c[1] > 1]
    assert prefills[0] == (1, shared_head_len(equal))  # the head once, at batch 1 ...
    assert prefills[1] == (2, len(equal[0]) - shared_head_len(equal))  # ... then only the tails
    assert len(prefills) == 3  # the second call found the head in ``heads``: one tail prefill only
    # tails of different lengths: the longest row is exact, every row decodes
    mixed = decode(model, ids, max_new_tokens=8, pad_id=tok.pad_token_id, shared=h)
    longest = max(range(3), key=lambda b: len(ids[b]))
    assert mixed[longest] == decode(model, [ids[longest]], max_new_tokens=8, pad_id=tok.pad_token_id, shared=0)[0]
    assert all(len(m[0]) == 8 for m in mixed)


def test_n_candidates_share_one_prefill(tiny):
    model, tok, _ = tiny
    ids = [tok(tok.bos_token + p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    one = decode(model, ids, max_new_tokens=6, pad_id=tok.pad_token_id)
    three = decode(model, ids, max_new_tokens=6, pad_id=tok.pad_token_id, n=3)
    assert three == [c * 3 for c in one]  # greedy: the expanded cache continues exactly like one row
    a = decode(model, ids, max_new_tokens=6, temperature=1.0, n=4, pad_id=tok.pad_token_id, seed=7)
    b = decode(model, ids, max_new_tokens=6, temperature=1.0, n=4, pad_id=tok.pad_token_id, seed=7)
    assert a == b and [len(x) for x in a] == [4, 4] and len({tuple(c) for c in a[0]}) > 1


def test_provider_stops_during_generation_and_returns_n_candidates(tiny_dir, tiny, tmp_path):
    model, tok, _ = tiny
    cfg = ProviderConfig(kind="local", model_path=str(tiny_dir), device="cpu", batch_size=4, schema_retries=0)
    p = make_provider("local", cfg, open_cache(tmp_path / "c.sqlite"))
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    full = p.generate_batch([ChatRequest(messages=msgs, max_tokens=24)])[0]
    assert full.ok and full.usage["completion_tokens"] == 24 and full.candidates() == [full.text]
    # a stop string found in the greedy output ends the row where it appears, not at max_tokens
    ref = _hf_greedy(model, tok, [render_prompt(tok, msgs)], 24)[0]
    pieces = [tok.decode(ref[:j], skip_special_tokens=True) for j in range(1, 25)]
    stop = next(pieces[j][-3:] for j in range(8, 23) if pieces[j][-3:].strip())
    j = next(j for j, piece in enumerate(pieces) if stop in piece)  # the token where it first appears
    early = p.generate_batch([ChatRequest(messages=msgs, max_tokens=24, stop=(stop,))])[0]
    assert early.usage["completion_tokens"] == j + 1 and early.text == cut_at_stop(pieces[j], [stop]).strip()
    # n candidates in one request: one prompt's tokens, n continuations, cached under their own key
    req = ChatRequest(messages=msgs, max_tokens=8, temperature=1.0, seed=3, n=5)
    out = p.generate_batch([req])[0]
    assert out.ok and len(out.texts) == 5 and out.text == out.texts[0] and out.candidates() == out.texts
    assert out.usage["prompt_tokens"] == len(tok(render_prompt(tok, msgs), add_special_tokens=False)["input_ids"])
    assert out.usage["completion_tokens"] == 40
    again = p.generate_batch([req])[0]
    assert again.cached and again.texts == out.texts and again.text == out.texts[0]
    assert p.request_key(req) != p.request_key(ChatRequest(messages=msgs, max_tokens=8, temperature=1.0, seed=3))


def _old_eval_generate(model, tok, prompts, max_new):
    """What evaluation and chat ran before they used :func:`generate`: ``model.generate`` greedy, stopping at
    EOS / end of turn, cut at the first stop token."""
    stop = stop_token_ids(tok)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    seqs = model.generate(**enc, max_new_tokens=max_new, eos_token_id=stop, pad_token_id=tok.pad_token_id,
                          do_sample=False, temperature=None, top_p=None, top_k=None)
    out = []
    for ids in seqs[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((k for k, t in enumerate(ids) if t in stop), len(ids))
        out.append(tok.decode(ids[:cut], skip_special_tokens=True).strip())
    return out


def test_generate_matches_the_old_evaluation_generate_with_and_without_an_adapter(tiny_dir, tiny, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    model, tok, _ = tiny
    prompts = [render_prompt(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    gens = generate(model, tok, prompts, max_new_tokens=12)
    assert [g.texts[0] for g in gens] == _old_eval_generate(model, tok, prompts, 12)
    assert [g.prompt_tokens for g in gens] == [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    # a LoRA adapter with non-zero B, loaded the way evaluation's tuned arm and chat load it
    torch.manual_seed(0)
    peft = get_peft_model(load_causal_lm(ModelConfig(name_or_path=str(tiny_dir)), device="cpu"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft.save_pretrained(str(tmp_path / "adapter"), safe_serialization=True)
    tuned = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir)), device="cpu", adapter=tmp_path / "adapter")
    assert not tuned.training and type(tuned).__name__ == "PeftModelForCausalLM"
    got = [g.texts[0] for g in generate(tuned, tok, prompts, max_new_tokens=12)]
    assert got == _old_eval_generate(tuned, tok, prompts, 12) and got != [g.texts[0] for g in gens]


def test_sampling_defaults_and_explicit_whole_vocabulary(tiny):
    model, tok, _ = tiny
    ids = [tok(tok.bos_token + p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    kw = {"max_new_tokens": 6, "temperature": 1.0, "n": 3, "pad_id": tok.pad_token_id, "seed": 5}
    assert decode(model, ids, **kw) == decode(model, ids, top_k=64, top_p=0.95, **kw)  # the shared defaults
    whole = decode(model, ids, top_k=None, top_p=1.0, **kw)
    assert whole == decode(model, ids, top_k=None, top_p=1.0, **kw) and whole != decode(model, ids, **kw)


def test_loader_is_safetensors_only_and_trusts_remote_code_only_when_configured(monkeypatch, tiny_dir):
    from transformers import AutoModelForCausalLM

    seen = {}

    class Loaded:
        training = True

        def eval(self):
            self.training = False
            return self

    def fake(path, **kw):
        seen.update(kw, path=path)
        return Loaded()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    m = load_causal_lm(ModelConfig(name_or_path=str(tiny_dir)), device="cpu")
    assert not m.training and seen["path"] == str(tiny_dir)
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    assert seen["attn_implementation"] == "sdpa" and "quantization_config" not in seen and "device_map" not in seen
    import torch

    assert seen["dtype"] == torch.float32
    load_causal_lm(ModelConfig(name_or_path=str(tiny_dir), trust_remote_code=True, dtype="bfloat16"), device="cpu",
                   for_training=True)
    assert seen["trust_remote_code"] is True and seen["dtype"] == torch.bfloat16


def test_raw_text_turns_skip_the_chat_template(tiny):
    _, tok, _ = tiny
    assert render_prompt(tok, [{"role": "text", "content": "Q: a?\nP:"}]) == "<bos>Q: a?\nP:"
    assert render_prompt(tok, [{"role": "user", "content": "a?"}]) == (
        "<bos><start_of_turn>user\na?<end_of_turn>\n<start_of_turn>model\n")


class Answer(BaseModel):
    answer: str


@pytest.fixture(scope="module")
def gemma():
    return load_local_model("packaged:gemma3-270m", "cpu")


@pytest.mark.slow
def test_local_batched_generation_matches_single(gemma, tmp_path):
    model, tok, _ = gemma
    p = make_provider("local", ProviderConfig(kind="local", batch_size=8, device="cpu", schema_retries=0),
                      open_cache(tmp_path / "c.sqlite"))
    questions = ["What is a bond?", "Define inflation in one sentence.", "What does EBITDA stand for?",
                 "Is a stock a loan?", "What is a dividend?"]
    reqs = [ChatRequest(messages=[{"role": "system", "content": "You are a finance tutor."},
                                  {"role": "user", "content": q}], max_tokens=6) for q in questions]
    reqs.append(ChatRequest(messages=[{"role": "user", "content": 'Reply {"answer": "yes"}'}],
                            schema=Answer, max_tokens=6))
    out = p.generate_batch(reqs, desc="local")
    assert len(out) == 6 and all(r.ok for r in out[:5])
    assert all(r.text and 1 <= r.usage["completion_tokens"] <= 6 for r in out[:5])
    # the structured request either parsed or failed with the raw text and a reason
    assert out[5].attempts == 1
    assert out[5].ok or (out[5].error.startswith("schema_invalid") and out[5].text is not None)
    u = p.usage.as_dict()
    assert u["calls"] == 6 and u["schema_retries"] == 0 and u["failures"] == (not out[5].ok)
    assert u["completion_tokens"] == sum(r.usage["completion_tokens"] for r in out)

    # left-padded batch == one-by-one greedy generation (padding does not leak into the answer)
    prompt = tok.apply_chat_template(list(reqs[0].messages), tokenize=False, add_generation_prompt=True)
    assert prompt == ("<bos><start_of_turn>user\nYou are a finance tutor.\n\nWhat is a bond?<end_of_turn>\n"
                      "<start_of_turn>model\n")
    single = make_provider("local", ProviderConfig(kind="local", batch_size=1, device="cpu"), None)
    one = single.generate_batch(reqs[:1])
    assert one[0].text == out[0].text

    # rerun: all from the cache, no generation
    again = p.generate_batch(reqs[:5])
    assert all(r.cached for r in again) and [r.text for r in again] == [r.text for r in out[:5]]
    assert p.usage.calls == u["calls"] and p.usage.cache_hits == 5

    # stop strings end rows during generation; n candidates of the base-model document from one prefill
    doc = [{"role": "text", "content": "Question: What is a bond?\nParaphrase: What is meant by a bond?\n\n"
                                       "Question: What is a dividend?\nParaphrase:"}]
    cands = p.generate_batch([ChatRequest(messages=doc, max_tokens=32, temperature=0.8, seed=1, n=3,
                                          stop=("\n",))])[0]
    assert cands.ok and len(cands.texts) == 3 and not any("\n" in t for t in cands.texts)
    assert cands.usage["completion_tokens"] < 3 * 32  # at least one row stopped before its limit


def test_unload_models_lets_the_model_go(tiny_dir, tmp_path):
    """The train stage drops the providers' models before it loads its own (one flow process runs every
    stage): after :func:`unload_models` nothing keeps the model alive, and the next request loads it again."""
    import gc
    import weakref

    import shutil

    from datagen.llm import local

    own = shutil.copytree(tiny_dir, tmp_path / "model")  # a model no other test's fixture holds
    model, _, _ = load_local_model(str(own), "cpu")
    ref = weakref.ref(model)
    del model
    local.unload_models()
    gc.collect()
    assert ref() is None and not local._MODELS
    again, _, _ = load_local_model(str(own), "cpu")
    assert again is not None and len(local._MODELS) == 1


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_release_memory_hands_freed_activations_back():
    """Freed tensors of a few MB (a training step's activations) go back to the OS once a stage is over,
    so the next stage's models do not stack on top of them."""
    import torch

    from lm.causal_lm import release_memory

    release_memory()  # fixes the thresholds first, as the stage runner does when a stage starts
    before = _rss_mb()
    blocks = [torch.ones(1024, 1024) for _ in range(100)]  # 100 x 4 MB, each touched
    assert _rss_mb() - before > 300
    del blocks
    release_memory()
    assert _rss_mb() - before < 100
