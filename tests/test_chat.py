"""``finsynth chat``: a terminal chat with the tuned model, history carried turn to turn, the same
chat template and decoding as evaluation (model and generation stubbed: the loop is what is tested)."""

from __future__ import annotations

import training.generate as g
from lm.causal_lm import Generation
from datagen.config import ModelConfig


def test_chat_carries_the_history_and_stops_on_exit(monkeypatch, tmp_path):
    class Tok:
        def apply_chat_template(self, conv, tokenize=False, add_generation_prompt=True):
            return " | ".join(f"{m['role']}:{m['content']}" for m in conv)

    seen = []
    monkeypatch.setattr(g, "load_tokenizer", lambda cfg: Tok())
    monkeypatch.setattr(g, "load_causal_lm", lambda cfg, adapter=None: "base+adapter" if adapter else "base")
    monkeypatch.setattr(g, "generate", lambda model, tok, prompts, **kw: (
        seen.append((model, prompts[0], kw)) or [Generation([f"answer {len(seen)}"], 0, 0)]))
    said = iter(["What was ACME's close?", "", "And BOLT's?", "exit", "never read"])
    out = []
    n = g.chat(ModelConfig(), tmp_path / "adapter", "Be brief.", read=lambda prompt: next(said), write=out.append)
    assert n == 2 and out == ["model> answer 1", "model> answer 2"]
    assert seen[0] == ("base+adapter", "system:Be brief. | user:What was ACME's close?", {"max_new_tokens": 160})
    assert seen[1][1].endswith("user:What was ACME's close? | assistant:answer 1 | user:And BOLT's?")


def test_chat_ends_on_eof(monkeypatch):
    monkeypatch.setattr(g, "load_tokenizer", lambda cfg: None)
    monkeypatch.setattr(g, "load_causal_lm", lambda cfg, adapter=None: "base")

    def eof(prompt):
        raise EOFError

    assert g.chat(ModelConfig(), None, None, read=eof, write=print) == 0
