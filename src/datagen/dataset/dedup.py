"""Dedup: a duplicate is the same question, over the same context, with the same answer.

Three signals are compared separately (``cfg.dedup``), because a shared context must not make distinct
questions look alike: when many questions share one long report, an embedding of question + context
is dominated by the context, and so are its figures.

- **question**: the cosine of *question-only* embeddings >= ``threshold`` (across groups) or
  ``within_group_threshold`` (inside one group), the same figures in both questions (signed: ``2018``
  is not ``2019``), and the same content words (:func:`term_difference`: "net income" vs "net sales",
  or "revenue" vs "revenue growth", is another question however close the embeddings are; typos,
  plurals, stop words and word order are not, except terms swapped around "as a percentage of" and
  the like). Questions equal after :func:`normalise_text` always match.
- **context**: identical (content hash of the normalised rendered context) or *nearly shared*
  (:func:`context_similarity` >= ``context_threshold``): tables with the same columns whose rows are
  one a sub-multiset of the other (one different cell is another record: a credit applicant who
  differs in one field is another applicant), the smaller context's tokens contained in the larger's,
  and no figure of the smaller missing from the larger.
- **answer**: :func:`answers_agree` (same label; or the signed figures of one contained in the
  other's, so ``-2.04%`` is not ``2.04%``; or the same normalised text).

Question and context match, answers agree: a duplicate (``exact_duplicate`` when question + context
are identical after normalisation, else ``near_duplicate`` across groups or ``within_group_near_copy``
inside one). Question and context match, answers disagree: both rows are quarantined as
``conflicting_answers`` (with their rephrasings), never silently dropped: one of the two answers is
wrong and nothing here can tell which. ``benchmarks/bench_dedup_calibration.py`` measures precision
and recall of this rule on a labelled set of pairs (``benchmarks/results/dedup_calibration.json``).

Duplicate pairs are merged with union-find (see :func:`dedup_rows`); each cluster keeps one row by
the keeper policy (originals over rephrasings, then richer context, then lowest id). Every drop and
quarantine is one :func:`datagen.io.drop_record` in ``drops.jsonl`` (kept id, question cosine,
context similarity) and counted by :func:`datagen.io.drop_counts` in the manifest.

Candidates are blocked: rows with one question text share a block, a vector search pairs blocks whose
questions have the same signed figures, and within a block pair only rows whose contexts can be
near-shared (an exact prefix filter on context tokens) are paired, so one question template over many
tables stays near-linear (:func:`_candidates`; the same decisions as checking every pair).
Pair search (question embeddings): an exact blocked matrix product (torch) up to
``partition_min_rows`` rows; above it a partitioned search (faiss IVF: k-means cells, then pairs within
the ``nprobe`` nearest cells of each query, as SemDeDup does). ``benchmarks/bench_dedup.py`` measures
time and pair recall of both.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datagen.config import Config
from datagen.embed import Embedder, encode_sharded
from datagen.io import (
    drop_counts,
    drop_record,
    manifest_hash,
    read_jsonl,
    sha256_text,
    write_jsonl,
    write_manifest,
)
from datagen.manifest import DedupManifest
from datagen.numbers import find_numbers, format_number
from datagen.schema import render_context
from datagen.stage import Inputs, StageSpec

log = logging.getLogger(__name__)

REASONS = ("exact_duplicate", "near_duplicate", "within_group_near_copy", "conflicting_answers")


# ----------------------------------------------------------------------------- text keys
_PUNCT = re.compile(r"(?<!\d)[^\w\s%$]|[^\w\s%$](?!\d)")


def normalise_text(text: str) -> str:
    """Case-folded, NFKC, punctuation dropped (except inside numbers: ``1.5`` stays), spaces collapsed."""
    t = (text if text.isascii() else unicodedata.normalize("NFKC", text)).casefold()  # ASCII is NFKC already
    return " ".join(_PUNCT.sub(" ", t).split())


def exact_key(row: dict[str, Any]) -> str:
    return normalise_text(row["question"]) + "\n" + normalise_text(render_context(row.get("context")))


def numbers(row: dict[str, Any]) -> frozenset[str]:
    """The figures in a row's question and context as written, unsigned and unscaled, dates' parts
    included (``3,559,000`` -> ``3559000``; ``1.50`` -> ``1.5``; ``$1.2bn`` -> ``1.2``), read by
    :func:`datagen.numbers.find_numbers`."""
    text = row["question"] + "\n" + render_context(row.get("context"))
    return frozenset(format_number(f.written) for f in find_numbers(text, skip_dates=False))


def number_overlap(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard of two figure sets (1.0 when neither has any)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def signed_numbers(text: str) -> tuple[float, ...]:
    """The figures in ``text`` with their signs, sorted, read by :func:`datagen.numbers.find_numbers`
    with dates' parts kept (``-7`` and ``(7)`` are negative; ``2017-2018`` and ``2017 - 2018`` are two
    positive years; ``1,200.50`` is ``1200.5``; scale words apply: ``$1.2bn`` is ``1200000000``)."""
    return tuple(sorted(round(f.value, 6) for f in find_numbers(str(text), skip_dates=False)))


def question_text(row: dict[str, Any]) -> str:
    """What a question is embedded as for dedup: the question alone, whitespace collapsed."""
    return " ".join(str(row["question"]).split())


def context_key(row: dict[str, Any]) -> str:
    """Content hash of the normalised rendered context; ``""`` for a row without context. Rows with one
    key share a context (the split keeps them together)."""
    text = normalise_text(render_context(row.get("context")))
    return sha256_text(text)[:16] if text else ""


# words whose change does not change what a question asks
STOP_WORDS = frozenset("""a an the of in on at to from for by and or vs versus between over during within with as
    is are was were be been being what whats which who how much many did does do done s its it this that these those
    than per into out up down please give tell me us you your our their there here if then so can could would should
    will shall may might must according based using use shown show table above below following given
    deliver delivered record recorded report reported post posted compute calculate estimate find state""".split())


def _close(a: str, b: str) -> bool:
    """One word as another's typo, plural or stem (``percent`` / ``percentage``, ``sale`` / ``sales``)."""
    if a == b:
        return True
    if min(len(a), len(b)) >= 4 and (a.startswith(b) or b.startswith(a)):
        return True
    return min(len(a), len(b)) >= 5 and difflib.SequenceMatcher(None, a, b).ratio() >= 0.8


def content_words(text: str) -> list[str]:
    """The words of ``text`` that say what it asks: normalised, without stop words and bare numbers."""
    return [w for w in normalise_text(text).split() if w not in STOP_WORDS and not w.replace(".", "").isdigit()]


def names(text: str) -> frozenset[str]:
    """Words written with a capital letter after the first word (``Norbrook``, ``ACME``): names of
    entities, normalised like :func:`content_words`."""
    words = text.split()[1:]
    return frozenset(w for raw in words if any(c.isupper() for c in raw) for w in normalise_text(raw).split())


def term_difference(qa: str, qb: str) -> tuple[list[str], list[str]]:
    """Content words of each question with no counterpart in the other (matched one to one; a typo,
    plural or stem counts as a counterpart, except for a name: :func:`names` must match exactly, since
    ``Norbrook Capital`` and ``Corbrook Capital`` are two companies). ``"... change in net income"`` vs
    ``"... change in net sales"`` gives ``(["income"], ["sales"])``; a reordering or a stop-word change
    gives ``([], [])``. Sentence embeddings see paraphrases well and one-word meaning changes badly, so a
    question that adds, drops or swaps a content word is another question, however close the embeddings are."""
    wa, wb = content_words(qa), content_words(qb)
    exact = names(qa) | names(qb)
    left = list(wb)
    only_a = []
    for w in wa:
        k = next((k for k, x in enumerate(left) if x == w), None)
        if k is None:
            k = next((k for k, x in enumerate(left) if x not in exact and w not in exact and _close(w, x)), None)
        if k is None:
            only_a.append(w)
        else:
            left.pop(k)
    return only_a, left


# a word that relates two terms: "A as a percentage of B" is not "B as a percentage of A"
PIVOTS = ("percentage", "percent", "ratio", "share", "proportion", "fraction", "multiple", "relative")


def _sides(text: str) -> tuple[frozenset[str], frozenset[str]] | None:
    words = content_words(text)
    k = next((k for k, w in enumerate(words) if any(_close(w, p) for p in PIVOTS)), None)
    return None if k is None else (frozenset(words[:k]), frozenset(words[k + 1:]))


def swapped_terms(qa: str, qb: str) -> bool:
    """The same words around a relating word (:data:`PIVOTS`) on other sides: ``cost of sales as a
    percentage of net sales`` vs ``net sales as a percentage of cost of sales``."""
    sa, sb = _sides(qa), _sides(qb)
    return sa is not None and sb is not None and all(sa) and sa != sb and sa == (sb[1], sb[0])


def question_near_copy(qa: str, qb: str, sim: float, threshold: float) -> bool:
    """The question signal: equal after normalisation, or cosine >= ``threshold`` with the same signed
    figures, the same content words (:func:`term_difference`) and no terms swapped around a relating
    word (:func:`swapped_terms`)."""
    if _normalise_short(qa) == _normalise_short(qb):
        return True
    return sim >= threshold and _same_terms(qa, qb)


# questions and table cells repeat across rows (templates, rephrasings of one original, categorical cells):
# each is normalised once, and each pair of questions' words compared once
_normalise_short = functools.lru_cache(maxsize=1 << 16)(normalise_text)


@functools.lru_cache(maxsize=1 << 16)
def _same_terms(qa: str, qb: str) -> bool:
    return (signed_numbers(qa) == signed_numbers(qb) and term_difference(qa, qb) == ([], [])
            and not swapped_terms(qa, qb))


def _table_rows(table: dict[str, Any] | None) -> tuple[tuple[str, ...], Counter] | None:
    if not table:
        return None
    cols = tuple(_normalise_short(str(c)) for c in table.get("columns") or [])
    return cols, Counter(tuple(_normalise_short(str(c)) for c in r) for r in table.get("rows") or [])


@dataclass(frozen=True)
class ContextView:
    """What :func:`context_similarity` reads from one context, worked out once per context."""

    norm: str
    table: tuple[tuple[str, ...], Counter] | None
    tokens: Counter
    figures: Counter


def context_view(row: dict[str, Any]) -> ContextView:
    ctx = row.get("context") or {}
    rendered = render_context(ctx)
    norm = normalise_text(rendered)
    return ContextView(norm, _table_rows(ctx.get("table")), Counter(norm.split()),
                       Counter(signed_numbers(rendered)))


def context_similarity(a: dict[str, Any] | ContextView, b: dict[str, Any] | ContextView) -> float:
    """How nearly two rows (or their :func:`context_view`) share their context, in [0, 1]: 1.0 for
    identical contexts (normalised); 0.0 when one has a table the other lacks, the tables' columns differ,
    neither table's rows are a sub-multiset of the other's (a changed cell is another record), or a figure
    of the smaller context is missing from the larger (other data). Otherwise the share of the smaller
    context's tokens (rendered table and text, as a multiset) found in the larger."""
    va, vb = (x if isinstance(x, ContextView) else context_view(x) for x in (a, b))
    if va.norm == vb.norm:
        return 1.0
    if not va.norm or not vb.norm:
        return 0.0
    ta, tb = va.table, vb.table
    if (ta is None) != (tb is None):
        return 0.0
    if ta is not None and tb is not None:
        if ta[0] != tb[0]:
            return 0.0
        small, big = (ta[1], tb[1]) if sum(ta[1].values()) <= sum(tb[1].values()) else (tb[1], ta[1])
        if small - big:
            return 0.0
    small_v, big_v = sorted([va, vb], key=lambda v: v.tokens.total())
    if small_v.figures - big_v.figures:
        return 0.0
    return sum((small_v.tokens & big_v.tokens).values()) / max(1, small_v.tokens.total())


def answers_agree(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The answer signal: the same ``metadata.answer_label`` where both have one; else, where either
    answer has figures, the signed figures of one contained in the other's (``5.20%`` agrees with
    ``5.20%: (105.2 / 100 - 1) x 100``; ``-2.04%`` does not agree with ``2.04%``); else the same text
    after normalisation."""
    la, lb = ((r.get("metadata") or {}).get("answer_label") for r in (a, b))
    if la is not None and lb is not None:
        return str(la).casefold() == str(lb).casefold()
    xa, xb = Counter(signed_numbers(a["answer"])), Counter(signed_numbers(b["answer"]))
    if xa or xb:
        return bool(xa and xb) and (not xa - xb or not xb - xa)
    return normalise_text(a["answer"]) == normalise_text(b["answer"])


# ----------------------------------------------------------------------------- pair search
@dataclass(frozen=True)
class Pairs:
    """Unique pairs ``i < j`` with their cosine, sorted by (i, j)."""

    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray

    def __len__(self) -> int:
        return len(self.i)

    @staticmethod
    def build(i: np.ndarray, j: np.ndarray, sim: np.ndarray) -> Pairs:
        i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
        sim = np.asarray(sim, np.float32)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        keep = lo != hi
        lo, hi, sim = lo[keep], hi[keep], sim[keep]
        if len(lo) == 0:
            return Pairs(lo, hi, sim)
        code = lo * (int(hi.max()) + 1) + hi
        _, first = np.unique(code, return_index=True)  # sorted by (lo, hi), duplicates removed
        return Pairs(lo[first], hi[first], sim[first])


def pairs_exact(x: np.ndarray, threshold: float, block: int = 2048, col_block: int = 16384) -> Pairs:
    """All pairs with cosine >= threshold by a blocked matrix product (upper triangle only)."""
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    n = len(xt)
    out_i, out_j, out_s = [], [], []
    with torch.inference_mode():
        for a in range(0, n, block):
            b = min(a + block, n)
            for c in range(a, n, col_block):
                d = min(c + col_block, n)
                s = xt[a:b] @ xt[c:d].T
                if c == a:  # the diagonal block: keep j > i only
                    s = s.masked_fill(torch.arange(c, d)[None, :] <= torch.arange(a, b)[:, None], -2.0)
                ii, jj = torch.nonzero(s >= threshold, as_tuple=True)
                if len(ii):
                    out_i.append((ii + a).numpy())
                    out_j.append((jj + c).numpy())
                    out_s.append(s[ii, jj].numpy())
    if not out_i:
        z = np.zeros(0, np.int64)
        return Pairs(z, z, np.zeros(0, np.float32))
    return Pairs.build(np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s))


def default_nlist(n: int) -> int:
    """~4 sqrt(n) k-means cells, but at least 39 training points per cell."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def pairs_partitioned(x: np.ndarray, threshold: float, nlist: int | None = None, nprobe: int = 16,
                      seed: int = 0, query_block: int = 65536, progress: bool = True) -> Pairs:
    """Pairs with cosine >= threshold via faiss IVF: k-means into ``nlist`` cells, then a range search
    of each row within its ``nprobe`` nearest cells. Approximate: a pair is missed only when neither row
    probes the other's cell."""
    import faiss
    from tqdm.auto import tqdm

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    nlist = nlist or default_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    n_train = min(n, nlist * 64)
    train = x[np.sort(rng.choice(n, n_train, replace=False))] if n_train < n else x
    index.cp.seed = seed
    index.train(train)
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    out_i, out_j, out_s = [], [], []
    for a in tqdm(range(0, n, query_block), desc="pairs", unit="block", disable=not progress or n < 2 * query_block):
        b = min(a + query_block, n)
        lims, dist, ids = index.range_search(x[a:b], float(threshold) - 1e-6)
        counts = np.diff(lims).astype(np.int64)
        qi = np.repeat(np.arange(a, b, dtype=np.int64), counts)
        keep = ids != qi
        out_i.append(qi[keep])
        out_j.append(ids[keep].astype(np.int64))
        out_s.append(dist[keep])
    return Pairs.build(np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s))


def similar_pairs(x: np.ndarray, threshold: float, method: str = "auto", partition_min_rows: int = 50_000,
                  nlist: int | None = None, nprobe: int = 16) -> tuple[Pairs, str]:
    """Pairs above ``threshold`` with the configured method; returns the pairs and the method used."""
    if method == "auto":
        method = "partitioned" if len(x) >= partition_min_rows else "exact"
    if len(x) < 2:
        z = np.zeros(0, np.int64)
        return Pairs(z, z, np.zeros(0, np.float32)), method
    if method == "partitioned":
        return pairs_partitioned(x, threshold, nlist=nlist, nprobe=nprobe), method
    return pairs_exact(x, threshold), method


# ----------------------------------------------------------------------------- clustering
class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def keeper_rank(row: dict[str, Any]) -> tuple:
    """Lower is better: originals over rephrasings, then richer context (longer rendered), then lowest id."""
    return (bool(row.get("is_rephrase")), -len(render_context(row.get("context"))), row["id"])


@dataclass
class DedupResult:
    kept: list[dict[str, Any]]
    drops: list[dict[str, Any]]  # drop records (datagen.io.drop_record), quarantines included
    counts: dict[str, int]  # drop_counts(drops)
    pairs: int  # candidate pairs examined
    method: str


# ----------------------------------------------------------------------------- candidate blocking
def context_id(row: dict[str, Any]) -> str:
    """The row's context as canonical JSON: rows with one id have one context (:func:`context_similarity`
    reads nothing else of a row)."""
    return json.dumps(row.get("context") or {}, sort_keys=True, default=str)


def context_candidates(tokens: list[list[str]], threshold: float) -> set[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of token lists that may reach :func:`context_similarity` >= ``threshold``
    (the share of the smaller list's tokens, as a multiset, found in the larger one). Exact, not
    approximate: a prefix filter (AllPairs / PPJoin). Tokens are ordered rarest first; if the larger
    list holds none of the smaller's rarest distinct tokens whose occurrences add up to more than
    ``(1 - threshold)`` of its tokens, more than that share is missing and the pair cannot reach the
    threshold. So each list probes an inverted index with its short prefix only; when contexts differ
    in a rare value (an amount, a name, a figure) the prefix is that value and the work is near-linear."""
    df: Counter = Counter(t for toks in tokens for t in set(toks))
    post: dict[str, list[int]] = {}
    for k, toks in enumerate(tokens):
        for t in set(toks):
            post.setdefault(t, []).append(k)
    out: set[tuple[int, int]] = set()
    for k, toks in enumerate(tokens):
        s = len(toks)
        if not s:
            continue
        count = Counter(toks)
        bound = (1.0 - threshold) * s + 1e-9
        acc = 0
        for t in sorted(count, key=lambda t: (df[t], t)):
            for j in post[t]:
                if j != k and len(tokens[j]) >= s:
                    out.add((k, j) if k < j else (j, k))
            acc += count[t]
            if acc > bound:
                break
    return out


def _block_pairs(rows: list[dict[str, Any]], vecs: np.ndarray, low: float, method: str, partition_min_rows: int,
                 nlist: int | None, nprobe: int) -> tuple[list[list[int]], dict[tuple[int, int], tuple[float, bool]],
                                                        str]:
    """Question blocks (rows with one question text and one vector) and the block pairs that can hold a
    candidate: ``(P, Q) -> (cosine, exact_only)``, ``P <= Q``. A block with itself; blocks whose questions
    have the same signed figures and cosine >= ``low`` (a question near-copy needs both, so the vector
    search runs within each figures bucket); blocks whose questions are equal after normalisation
    (``exact_only`` when their cosine is below ``low``: then only exact-key rows are candidates, as before).
    Returns the blocks, the pairs and the search method used."""
    index: dict[tuple[str, bytes], int] = {}
    blocks: list[list[int]] = []
    for i, r in enumerate(rows):
        k = (r["question"], np.ascontiguousarray(vecs[i]).tobytes())
        if k not in index:
            index[k] = len(blocks)
            blocks.append([])
        blocks[index[k]].append(i)
    rep = np.ascontiguousarray(vecs[[b[0] for b in blocks]], dtype=np.float32) if blocks else vecs[:0]
    qs = [rows[b[0]]["question"] for b in blocks]
    out: dict[tuple[int, int], tuple[float, bool]] = {}
    for p in range(len(blocks)):
        s = float(rep[p] @ rep[p])
        out[(p, p)] = (s, s < low)
    by_figures: dict[tuple[float, ...], list[int]] = {}
    for p, q in enumerate(qs):
        by_figures.setdefault(signed_numbers(q), []).append(p)
    methods = set()
    for members in by_figures.values():
        if len(members) < 2:
            continue
        m = method
        if m == "auto":
            m = "partitioned" if len(members) >= partition_min_rows else "exact"
        pairs, used = similar_pairs(rep[members], low, m, partition_min_rows,
                                    None if nlist is None else min(nlist, len(members)), nprobe)
        methods.add(used)
        for i, j, s in zip(pairs.i.tolist(), pairs.j.tolist(), pairs.sim.tolist()):
            out[(members[i], members[j])] = (s, False)
    by_norm: dict[str, list[int]] = {}
    for p, q in enumerate(qs):
        by_norm.setdefault(normalise_text(q), []).append(p)
    for members in by_norm.values():
        for x, p in enumerate(members):
            for q in members[x + 1:]:
                if (p, q) not in out:
                    s = float(rep[p] @ rep[q])
                    out[(p, q)] = (s, s < low)
    if method == "auto":
        method = "partitioned" if "partitioned" in methods else "exact"
    return blocks, out, method


def _candidates(rows: list[dict[str, Any]], vecs: np.ndarray, keys: list[str], cids: list[str], threshold: float,
                within_group_threshold: float, context_threshold: float, method: str, partition_min_rows: int,
                nlist: int | None, nprobe: int, direct_max: int = 4096) -> tuple[set[tuple[int, int]], str]:
    """Row pairs ``(a, b)``, ``a < b``, that can be duplicates: every pair whose questions could be near-copies
    (:func:`_block_pairs`) and whose contexts could be near-shared (identical, or a
    :func:`context_candidates` pair), plus exact-key pairs. Near-linear when one question template
    covers many rows over distinct contexts; the same pairs as comparing every question pair above the
    threshold, less those the rule would reject anyway."""
    low = min(threshold, within_group_threshold)
    blocks, bpairs, used = _block_pairs(rows, vecs, low, method, partition_min_rows, nlist, nprobe)
    cand: set[tuple[int, int]] = set()

    def add(a: int, b: int) -> None:
        if a != b:
            cand.add((a, b) if a < b else (b, a))

    for (p, q), (sim, exact_only) in bpairs.items():
        rp, rq = blocks[p], blocks[q]
        if p == q and len(rp) < 2:
            continue
        if exact_only:
            by_key: dict[str, list[int]] = {}
            for b in rq:
                by_key.setdefault(keys[b], []).append(b)
            for a in rp:
                for b in by_key.get(keys[a], ()):
                    add(a, b)
            continue
        qa, qb = rows[rp[0]]["question"], rows[rq[0]]["question"]
        if not (question_near_copy(qa, qb, sim, threshold) or question_near_copy(qa, qb, sim, within_group_threshold)):
            continue  # no pair of these blocks can match (an exact-key pair has normalised-equal questions)
        cp: dict[str, list[int]] = {}
        cq: dict[str, list[int]] = {}
        for a in rp:
            cp.setdefault(cids[a], []).append(a)
        for b in rq:
            cq.setdefault(cids[b], []).append(b)
        if len(cp) * len(cq) <= direct_max:
            ctx_pairs = [(x, y) for x in cp for y in cq]
        else:
            ids = sorted(set(cp) | set(cq))
            norm = [normalise_text(render_context(json.loads(c))) for c in ids]
            uniq = sorted(set(norm))
            at = {t: k for k, t in enumerate(uniq)}
            members: dict[int, list[str]] = {}
            for c, t in zip(ids, norm):
                members.setdefault(at[t], []).append(c)
            near = context_candidates([t.split() for t in uniq], context_threshold)
            near |= {(k, k) for k in members}
            ctx_pairs = [(x, y) for i, j in near for x in members[i] for y in members[j]]
            ctx_pairs += [(y, x) for x, y in ctx_pairs]
        for x, y in ctx_pairs:
            if x in cp and y in cq:
                for a in cp[x]:
                    for b in cq[y]:
                        add(a, b)
    by_key = {}
    for idx, k in enumerate(keys):
        by_key.setdefault(k, []).append(idx)
    for m in by_key.values():
        # every pair of a small bucket; a large one (thousands of copies) against its first row only
        for x in range(len(m) if len(m) <= 64 else 1):
            for y in m[x + 1:]:
                add(m[x], y)
    return cand, used


def _edges(rows: list[dict[str, Any]], vecs: np.ndarray, threshold: float, within_group_threshold: float,
           context_threshold: float, method: str, partition_min_rows: int, nlist: int | None,
           nprobe: int) -> tuple[list[tuple[int, int, float]], list[tuple[int, int]], int, str]:
    """(duplicate pairs with their context similarity, conflicting pairs, candidates examined, search
    method). Candidates: :func:`_candidates`."""
    keys = [exact_key(r) for r in rows]
    cids = [context_id(r) for r in rows]
    cand, used = _candidates(rows, vecs, keys, cids, threshold, within_group_threshold, context_threshold, method,
                             partition_min_rows, nlist, nprobe)
    ctx_sim: dict[tuple[str, str], float] = {}
    views: dict[str, ContextView] = {}
    dup, conflict = [], []
    for a, b in sorted(cand):
        ra, rb = rows[a], rows[b]
        thr = within_group_threshold if ra["group_id"] == rb["group_id"] else threshold
        if keys[a] == keys[b]:
            csim = 1.0
        elif not question_near_copy(ra["question"], rb["question"], float(vecs[a] @ vecs[b]), thr):
            continue
        else:
            ck = (cids[a], cids[b])
            if ck not in ctx_sim:
                for k, r in ((cids[a], ra), (cids[b], rb)):
                    if k not in views:
                        views[k] = context_view(r)
                ctx_sim[ck] = context_similarity(views[cids[a]], views[cids[b]])
            csim = ctx_sim[ck]
            if csim < context_threshold:
                continue
        if answers_agree(ra, rb):
            dup.append((a, b, csim))
        else:
            conflict.append((a, b))
    return dup, conflict, len(cand), used


def dedup_rows(rows: list[dict[str, Any]], vecs: np.ndarray, threshold: float, within_group_threshold: float,
               method: str = "auto", partition_min_rows: int = 50_000, nlist: int | None = None,
               nprobe: int = 16, context_threshold: float = 0.98) -> DedupResult:
    """Deduplicate ``rows``; ``vecs`` are the L2-normalised embeddings of their *questions*
    (:func:`question_text`), same order. The pair rule is in the module doc.

    0. Conflicts: both rows of every conflicting pair, and the rephrasings of a quarantined original
       (``metadata.rephrase_of``), are quarantined (``conflicting_answers``).
    1. Across groups, among the rest: union-find over duplicate pairs of different groups. Each
       cluster keeps its best row by :func:`keeper_rank` and, with it, the other members of the
       keeper's group; members of other groups are dropped (``exact_duplicate`` | ``near_duplicate``).
    2. Within each group, among the survivors: union-find over duplicate pairs of one group; one keeper
       per cluster by the same policy (``exact_duplicate`` | ``within_group_near_copy``).
    """
    n = len(rows)
    keys = [exact_key(r) for r in rows]
    groups = [r["group_id"] for r in rows]
    dup, conflict, n_cand, used = _edges(rows, vecs, threshold, within_group_threshold, context_threshold,
                                         method, partition_min_rows, nlist, nprobe)
    csim = {(a, b): c for a, b, c in dup}
    alive = np.ones(n, bool)
    drops: list[dict[str, Any]] = []

    # 0. conflicts
    others: dict[int, set[int]] = {}
    for a, b in conflict:
        others.setdefault(a, set()).add(b)
        others.setdefault(b, set()).add(a)
    by_id = {r["id"]: k for k, r in enumerate(rows)}
    for k, r in enumerate(rows):
        parent = by_id.get((r.get("metadata") or {}).get("rephrase_of"))
        if k not in others and parent in others:
            others[k] = {parent}
    for k in sorted(others):
        alive[k] = False
        ordered = sorted(others[k], key=lambda o: rows[o]["id"])
        with_ = [rows[o]["id"] for o in ordered]
        answers = "; ".join(f"{rows[o]['id']}: {rows[o]['answer']!r}" for o in ordered)
        drops.append(drop_record(
            "dedup", rows[k]["id"], "conflicting_answers",
            f"answer {rows[k]['answer']!r} conflicts with {answers} (same question and context)",
            group_id=groups[k], conflicts_with=with_))

    def drop(d: int, k: int, near_reason: str) -> dict[str, Any]:
        reason = "exact_duplicate" if keys[d] == keys[k] else near_reason
        c = csim.get((min(d, k), max(d, k)))
        return drop_record("dedup", rows[d]["id"], reason, f"duplicate of {rows[k]['id']}", kept_id=rows[k]["id"],
                           dropped_group=groups[d], kept_group=groups[k],
                           similarity=round(float(vecs[d] @ vecs[k]), 6),
                           context_similarity=None if c is None else round(c, 6))

    def merge(edges: list[tuple[int, int]], within: bool) -> None:
        uf = UnionFind(n)
        for a, b in edges:
            if alive[a] and alive[b] and (groups[a] == groups[b]) == within:
                uf.union(a, b)
        clusters: dict[int, list[int]] = {}
        for idx in np.flatnonzero(alive).tolist():
            clusters.setdefault(uf.find(idx), []).append(idx)
        for members in clusters.values():
            if len(members) < 2:
                continue
            keeper = min(members, key=lambda k: keeper_rank(rows[k]))
            for d in members:
                if d != keeper and (within or groups[d] != groups[keeper]):
                    drops.append(drop(d, keeper, "within_group_near_copy" if within else "near_duplicate"))
        for d in drops:
            if d["reason"] != "conflicting_answers":
                alive[by_id[d["row_id"]]] = False

    edges = [(a, b) for a, b, _ in dup]
    merge(edges, within=False)  # 1. across groups
    merge(edges, within=True)  # 2. within groups, among the survivors
    kept = sorted((rows[k] for k in np.flatnonzero(alive).tolist()), key=lambda r: r["id"])
    drops.sort(key=lambda d: (d["row_id"], d["reason"]))
    return DedupResult(kept, drops, drop_counts(drops), n_cand, used)


# ----------------------------------------------------------------------------- stage
def run_dedup(cfg: Config, inputs: Inputs, out: Path, embedder: Embedder | None = None) -> DedupManifest:
    src = inputs["augment"]
    rows = sorted(read_jsonl(src / "samples.jsonl"), key=lambda r: r["id"])
    dc = cfg.dedup
    t0 = time.perf_counter()
    vecs, embed_stats = encode_sharded(cfg.run, dc.embedder, cfg.paths.cache_dir / "embeddings",
                                       [question_text(r) for r in rows], out / ".shards", embedder)
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = dedup_rows(rows, vecs, dc.threshold, dc.within_group_threshold, dc.method, dc.partition_min_rows,
                     dc.nlist, dc.nprobe, dc.context_threshold)
    t_pairs = time.perf_counter() - t0
    write_jsonl(out / "samples.jsonl", res.kept)
    write_jsonl(out / "drops.jsonl", res.drops)
    quarantined = sum(d["reason"] == "conflicting_answers" for d in res.drops)
    log.info("dedup: %d rows in, %d kept, %s (%s search, %d candidate pairs)", len(rows), len(res.kept),
             res.counts, res.method, res.pairs)
    if quarantined:
        log.warning("dedup: %d rows quarantined as conflicting_answers (same question and context, other "
                    "answer); see %s", quarantined, out / "drops.jsonl")
    return write_manifest(out, DedupManifest(
        config_hash=STAGE.config_hash(cfg),
        upstream={"augment": manifest_hash(src)},
        embedder={"name": embedder.name if embedder else dc.embedder.model, "text": "question", **embed_stats},
        threshold=dc.threshold,
        within_group_threshold=dc.within_group_threshold,
        context_threshold=dc.context_threshold,
        method=res.method,
        counts={"in": len(rows), "kept": len(res.kept), "dropped": len(res.drops) - quarantined,
                "quarantined": quarantined, "candidate_pairs": res.pairs, **res.counts,
                "dropped_by_reason": {r: res.counts.get(f"dropped_{r}", 0) for r in REASONS},
                "kept_by_category": dict(sorted(Counter(r["category"] for r in res.kept).items())),
                "kept_rephrasings": sum(bool(r.get("is_rephrase")) for r in res.kept)},
        timing={"embed_s": round(t_embed, 3), "pairs_s": round(t_pairs, 3)},
    ))


STAGE = StageSpec("dedup", run_dedup, __name__, ("dedup",),
                  upstream=("augment",),
                  manifest=DedupManifest)
