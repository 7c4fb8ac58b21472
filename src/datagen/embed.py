"""Sentence embeddings for similarity checks (augmentation band, dedup, clustering, leakage).

``Embedder`` is the interface (a Protocol): texts in, L2-normalised float32 rows out, so a dot
product is a cosine. ``load_embedder`` gives the sentence-transformers implementation on the
configured model (default: the packaged all-MiniLM-L6-v2), with an on-disk cache keyed by text hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from datagen.config import EmbedderConfig
from datagen.packaged import resolve_model_path


@runtime_checkable
class Embedder(Protocol):
    name: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised."""
        ...


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class SentenceTransformerEmbedder:
    def __init__(self, cfg: EmbedderConfig, cache_dir: Path | None = None, show_progress: bool = True):
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg
        self.name = cfg.model
        self.model = SentenceTransformer(resolve_model_path(cfg.model), device=cfg.device)
        self.cache_dir = cache_dir
        self.show_progress = show_progress
        self._mem: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = sorted({t for t in texts if text_key(t) not in self._mem}, key=len)
        if missing:
            vecs = self.model.encode(missing, batch_size=self.cfg.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=self.show_progress and
                                     len(missing) > 256)
            for t, v in zip(missing, vecs):
                self._mem[text_key(t)] = v.astype(np.float32)
        dim = self.model.get_sentence_embedding_dimension()
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        return np.stack([self._mem[text_key(t)] for t in texts])


def load_embedder(cfg: EmbedderConfig, cache_dir: Path | None = None) -> Embedder:
    return SentenceTransformerEmbedder(cfg, cache_dir)
