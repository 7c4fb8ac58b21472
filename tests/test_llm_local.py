"""The ``local`` provider: real batched generation with the packaged Gemma-3-270M."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from datagen.config import ProviderConfig
from datagen.llm import ChatRequest, make_provider, open_cache

pytestmark = pytest.mark.slow


class Answer(BaseModel):
    answer: str


@pytest.fixture(scope="module")
def gemma():
    from datagen.llm.local import load_local_model

    return load_local_model("packaged:gemma3-270m", "cpu")


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
