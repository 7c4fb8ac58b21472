"""Sentence embeddings for similarity checks (augmentation band, dedup, clustering, leakage).

``Embedder`` is the interface (a Protocol): texts in, L2-normalised float32 rows out, so a dot
product is a cosine. ``load_embedder`` gives the sentence-transformers implementation on the
configured model (default: the packaged all-MiniLM-L6-v2).

What makes it faster than a plain ``SentenceTransformer.encode`` over the same list
(``benchmarks/bench_dedup.py`` measures it):

- each distinct text is embedded once: an in-memory cache keyed by text hash, and, when a
  ``cache_dir`` is given, an on-disk cache (``<cache_dir>/<model key>/part-*.npy`` + ``.keys``) shared
  by the stages of a run and by reruns (dedup, split and the leakage check embed the same texts);
- texts are sorted by length and cut into batches by a token budget, so short texts go in large
  batches and long ones in small ones, with little padding;
- ``max_seq_length`` is cut to 128 tokens (what MiniLM was trained on) instead of 256;
- inference runs under ``torch.inference_mode``.

The model key includes the model name and ``max_seq_length`` (both change the vectors).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from datagen.config import Config, EmbedderConfig
from lm.packaged import resolve_model_path

log = logging.getLogger(__name__)


@runtime_checkable
class Embedder(Protocol):
    name: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised."""
        ...


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _short_table(table: dict[str, Any] | None) -> str:
    if not table or not table.get("columns"):
        return ""
    rows = table.get("rows") or []
    parts = [" | ".join(table["columns"])]
    if rows:
        parts.append(" | ".join(rows[0]))
    if len(rows) > 1:
        parts.append(" | ".join(rows[-1]))
    return " ; ".join(parts)


def sample_text(row: dict[str, Any], context_chars: int = 200) -> str:
    """What a row is embedded as: its question plus a short form of its context.

    The short form is the table's header with its first and last rows, then the first
    ``context_chars`` characters of the context text (whitespace collapsed). Two rows that ask the
    same question about different contexts therefore embed differently.
    """
    q = " ".join(str(row.get("question", "")).split())
    if context_chars <= 0:
        return q
    ctx = row.get("context") or {}
    short = " ".join(p for p in (_short_table(ctx.get("table")), " ".join(str(ctx.get("text", "")).split()))
                     if p)
    short = short[:context_chars]
    return f"{q}\n{short}" if short else q


class DiskCache:
    """Append-only vector cache: ``part-<id>.npy`` (float32 rows) + ``part-<id>.keys`` (one key a line).

    A part counts only when both files exist (the keys file is written last, atomically), so a
    killed run or two concurrent writers never corrupt it; duplicates across parts are harmless.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def load(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if not self.root.exists():
            return out
        for keys_file in sorted(self.root.glob("part-*.keys")):
            vec_file = keys_file.with_suffix(".npy")
            try:
                keys = keys_file.read_text().split()
                vecs = np.load(vec_file)
            except (OSError, ValueError) as e:  # a damaged part is skipped, not fatal
                log.warning("embedding cache part %s unreadable (%s); ignoring it", keys_file.name, e)
                continue
            if len(keys) != len(vecs):
                continue
            out.update(zip(keys, vecs))
        return out

    def append(self, keys: list[str], vecs: np.ndarray) -> None:
        if not keys:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        part = f"part-{uuid.uuid4().hex[:12]}"
        tmp = self.root / f".{part}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(vecs, dtype=np.float32))
        os.replace(tmp, self.root / f"{part}.npy")
        tmp = self.root / f".{part}.keys.tmp"
        tmp.write_text("\n".join(keys) + "\n")
        os.replace(tmp, self.root / f"{part}.keys")


def model_key(cfg: EmbedderConfig) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.model).strip("_")[-40:]
    h = hashlib.sha256(f"{cfg.model}|{cfg.max_seq_length}".encode()).hexdigest()[:10]
    return f"{slug}-{h}"


def token_budget_batches(lengths: list[int], batch_size: int, max_len: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most ``batch_size * max_len / 2`` padded tokens.

    Short texts go in large batches (at most ``4 * batch_size`` rows), long ones in small ones, so
    padding and peak memory stay small.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    budget = batch_size * max_len // 2
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = min(max(lengths[i], 1), max_len)  # sorted: the newest row is the longest
        if cur and (len(cur) + 1) * longest > budget or len(cur) >= 4 * batch_size:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


class SentenceTransformerEmbedder:
    def __init__(self, cfg: EmbedderConfig, cache_dir: Path | None = None, show_progress: bool = True):
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg
        self.name = cfg.model
        self.model = SentenceTransformer(str(resolve_model_path(cfg.model)), device=cfg.device)
        self.model.max_seq_length = min(cfg.max_seq_length, self.model.max_seq_length or cfg.max_seq_length)
        dim_fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_fn())
        self.show_progress = show_progress
        self.disk = DiskCache(Path(cache_dir) / model_key(cfg)) if cache_dir and cfg.disk_cache else None
        self._mem: dict[str, np.ndarray] = self.disk.load() if self.disk else {}
        self.stats = {"requested": 0, "cache_hits": 0, "encoded": 0}

    def _encode_new(self, texts: list[str]) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        tok = self.model.tokenizer
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=True, truncation=True,
                                           max_length=self.model.max_seq_length)["input_ids"]]
        batches = token_budget_batches(lengths, self.cfg.batch_size, self.model.max_seq_length)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        bar = tqdm(total=len(texts), desc="embed", unit="text",
                   disable=not self.show_progress or len(texts) < 256)
        with torch.inference_mode():
            for idx in batches:
                vecs = self.model.encode([texts[i] for i in idx], batch_size=len(idx),
                                         normalize_embeddings=True, convert_to_numpy=True,
                                         show_progress_bar=False)
                out[idx] = vecs
                bar.update(len(idx))
        bar.close()
        return out

    def encode(self, texts: list[str]) -> np.ndarray:
        keys = [text_key(t) for t in texts]
        missing: dict[str, str] = {}
        for k, t in zip(keys, texts):
            if k not in self._mem and k not in missing:
                missing[k] = t
        self.stats["requested"] += len(texts)
        self.stats["encoded"] += len(missing)
        self.stats["cache_hits"] += len(texts) - len(missing)
        if missing:
            new_keys = list(missing)
            vecs = self._encode_new([missing[k] for k in new_keys])
            self._mem.update(zip(new_keys, vecs))
            if self.disk is not None:
                self.disk.append(new_keys, vecs)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._mem[k] for k in keys]).astype(np.float32, copy=False)


def load_embedder(cfg: EmbedderConfig, cache_dir: Path | None = None) -> Embedder:
    """The configured sentence-transformers embedder; ``cache_dir`` (e.g. ``paths.cache_dir /
    "embeddings"``) turns on the on-disk cache."""
    return SentenceTransformerEmbedder(cfg, cache_dir)


def _encode_shard(embedder: Embedder, texts: list[str]) -> dict[str, Any]:
    before = dict(getattr(embedder, "stats", {}))
    vecs = embedder.encode(texts)
    return {"vectors": vecs, "stats": {k: v - before[k] for k, v in getattr(embedder, "stats", {}).items()}}


def encode_worker(cfg: EmbedderConfig, cache_dir: Path | None) -> Callable[[list[str]], dict[str, Any]]:
    """What a Ray actor holds for embedding: the model (and its on-disk cache), loaded once."""
    return functools.partial(_encode_shard, load_embedder(cfg, cache_dir))


def encode_sharded(run_cfg: Any, cfg: EmbedderConfig, cache_dir: Path | None, texts: list[str], scratch: Path,
                   embedder: Embedder | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """``encode(texts)`` on the configured executor (``run_cfg``: the config's ``run`` section): here
    with ``embedder`` (or the configured one), or in shards on Ray workers that each load the model
    once. Returns the vectors and the embedder's counts (requested, cache hits, encoded)."""
    from datagen import executor

    if run_cfg.executor == "local":
        emb = embedder or load_embedder(cfg, cache_dir)
        part = _encode_shard(emb, texts)
        return part["vectors"], part["stats"]
    if embedder is not None:
        raise ValueError("run.executor: ray loads the configured embedder on each worker; "
                         "run with run.executor: local to pass your own")
    key = f"embed|{model_key(cfg)}"
    shards = executor.plan(key, texts, run_cfg.shard_rows, run_cfg.ray_workers)
    parts = executor.map_shards(run_cfg, functools.partial(encode_worker, cfg, cache_dir), shards, scratch,
                                what="embed shards")
    stats: Counter = Counter()
    for p in parts:
        stats.update(p["stats"])
    dim = parts[0]["vectors"].shape[1] if parts else 0
    vecs = np.concatenate([p["vectors"] for p in parts]) if parts else np.zeros((0, dim), np.float32)
    executor.clear(scratch)
    return vecs.astype(np.float32, copy=False), dict(stats)


def embed_samples(cfg: Config, rows: list[dict], embedder: Embedder | None = None) -> np.ndarray:
    """Embed canonical rows (question + a short form of their context): the one text form that dedup,
    split and the leakage check compare. With no ``embedder``, the configured one with its on-disk cache
    (so the split stage's pass over rows dedup already embedded encodes nothing).
    """
    if embedder is None:
        embedder = load_embedder(cfg.dedup.embedder, cfg.paths.cache_dir / "embeddings")
    return embedder.encode([sample_text(r, cfg.dedup.context_chars) for r in rows])
