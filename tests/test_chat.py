"""``finsynth chat``: a terminal chat with the tuned model, history carried turn to turn, the same
chat template and decoding as evaluation (model and generation stubbed: the loop is what is tested)."""

from __future__ import annotations

import pytest

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


# ----------------------------------------------------------------------------- the real command (issue 47)
@pytest.mark.slow
def test_chat_with_piped_input_prints_only_the_prompt_and_answers(tmp_path):
    """``finsynth chat --base`` on the packaged model, stdin piped: stdout is the header, the prompts and
    the answer; no INFO line, progress bar or library warning on either stream (they go to the log file)."""
    import os
    import subprocess
    import sys
    from pathlib import Path


    pytest.importorskip("torch")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-m", "flows.cli", "chat", "--base", "--profile", "demo",
                        "--root", str(tmp_path)],
                       input="What does EBITDA stand for?\n", capture_output=True, text=True, cwd=root, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("chatting with packaged:gemma3-270m")
    assert lines[1].startswith("you> model> ") and len(lines[1]) > len("you> model> ")
    assert lines[-1] == "you> "  # the next prompt, then EOF
    for noise in ("INFO", "Loading weights", "kernels-community", "Warning", "it/s]"):
        assert noise not in p.stdout and noise not in p.stderr, noise
    assert p.stderr == ""
