"""Prompt templates: one Jinja file per prompt under ``prompts/``.

Every output that a prompt produced records the prompt's name and content hash
(:attr:`Prompt.ref`), so a changed prompt is visible in manifests and invalidates caches.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from datagen.config import asset_dir

PROMPTS_DIR = asset_dir("prompts")
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False,
                          trim_blocks=True, lstrip_blocks=True, autoescape=False)


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]

    @property
    def ref(self) -> dict[str, str]:
        return {"name": self.name, "hash": self.hash}

    def render(self, **variables: Any) -> str:
        return _ENV.from_string(self.text).render(**variables).strip()


@cache
def _load(path: Path, mtime: float) -> str:
    return path.read_text(encoding="utf-8")


def load_prompt(name: str, prompts_dir: Path | None = None) -> Prompt:
    """Load ``prompts/<name>.jinja``."""
    path = (prompts_dir or PROMPTS_DIR) / f"{name}.jinja"
    if not path.exists():
        known = sorted(p.stem for p in (prompts_dir or PROMPTS_DIR).glob("*.jinja"))
        raise FileNotFoundError(f"prompt {name!r} not found at {path}; known: {', '.join(known)}")
    return Prompt(name=name, text=_load(path, path.stat().st_mtime))


_TURN = re.compile(r"^<<(user|assistant|system)>>\s*$", re.M)


def split_turns(rendered: str) -> list[dict[str, str]]:
    """A rendered template with ``<<user>>`` / ``<<assistant>>`` marker lines -> chat messages."""
    parts = _TURN.split(rendered)
    msgs = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []  # text before a marker
    for role, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": role, "content": content.strip()})
    return msgs
