"""Teacher-model synthesis of credit-risk analyst tasks per scenario cluster.

For every configured cluster (``cfg.augment.scenario.clusters``) a teacher model writes
``per_cluster`` instruction -> response pairs, each for a (sector, geography) drawn evenly and seeded
from :data:`SECTORS` and :data:`GEOGRAPHIES`. Outputs are kept only if they parse ("Instruction: ...",
"Response: ..."), carry >= 2 explicit numeric metrics with units, whose written-out arithmetic holds
(a product ``a x b = c`` within 5%, a move ``widens from a to b`` in its verb's direction: the
teacher's numbers are checked by code, as the market answers are computed by it), are not repetitive (3-gram
repetition inside the text), do not copy a few-shot example, and are not too close to an already kept
task (embedding cosine >= ``diversity_threshold``). Missing tasks are retried (other seed, hotter)
up to ``max_attempts`` rounds; one ``generate_batch`` per round.

The instruction must read as a task (a question or a task verb) and the response must use at least two
credit-risk terms (PD, LGD, spread, rating, downgrade, default, exposure, ...).

Two prompt formats (``prompt_format``): ``chat`` (``prompts/scenario_synthesis.jinja``, few-shot chat turns,
for instruct models and APIs) and ``base`` (``prompts/scenario_synthesis_base.jinja``, a few-shot document
for a base model to continue). The base document ends inside the next instruction, whose opening names
the sector and geography ("A borrower in the utilities sector in Japan,"), and generation stops at the
blank line after the response; ``candidates`` asks for best-of-n per slot in one request. On the packaged
Gemma-3-270M base and the demo's 8 tasks, the chat format kept 0 or 1 (mostly ``off_topic``: the model
wrote about another sector or country, then ran to ``max_tokens``), the base format with 4 candidates 7,
with the same checks (docs/augment.md). What a tiny model writes has the right shape more often than the
right numbers (``inconsistent_numbers`` is its commonest rejection); the counts per reason go to the
manifest so that is visible, not hidden.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datagen.augmentation.validators import char_ratio, is_question
from datagen.config import SCENARIO_MAX_TEMPERATURE, ScenarioSynthConfig
from datagen.embed import Embedder
from datagen.llm.base import LLMProvider, LLMResult, Message
from datagen.llm.tasks import Reject, Task, Turn, llm_error, resolve_prompt_format, run_task
from datagen.numbers import Figure, find_numbers
from datagen.prompts import load_prompt, split_turns
from datagen.schema import SCENARIO_SOURCE as SOURCE
from datagen.schema import stable_id

PROMPT = "scenario_synthesis"
PROMPT_BASE = "scenario_synthesis_base"
STOP_BASE = ("\n\n", "\nScenario:")  # the blank line after the response; the next task's header
CATEGORY = "credit_scenario"

SECTORS = ("airlines", "autos", "chemicals", "commercial real estate", "consumer retail", "homebuilders",
           "metals and mining", "oil and gas", "regional banks", "shipping", "technology hardware",
           "telecoms", "utilities", "agriculture")
GEOGRAPHIES = ("United States", "Euro area", "United Kingdom", "Japan", "China", "India", "Brazil",
               "Mexico", "Turkey", "South Africa", "Indonesia", "Australia")

_ALIASES = {"United States": ("us", "u.s.", "american", "america"), "United Kingdom": ("uk", "british", "britain"),
            "Euro area": ("euro", "europe", "european", "eurozone"), "China": ("chinese",), "Japan": ("japanese",),
            "India": ("indian",), "Brazil": ("brazilian",), "Mexico": ("mexican",), "Turkey": ("turkish", "lira"),
            "South Africa": ("south african",), "Indonesia": ("indonesian",), "Australia": ("australian",)}
_FIELD = re.compile(r"^\s*\**\s*(instruction|response)\s*\**\s*:\s*\**\s*(.*)$", re.I)


def cluster_title(cluster: str) -> str:
    """``fx_crisis`` -> ``FX crisis``; ``interest_rate_shock`` -> ``interest rate shock``."""
    words = cluster.split("_")
    return " ".join(w.upper() if w in {"fx", "cre", "em", "us", "eu"} else w for w in words)


# ----------------------------------------------------------------------------- pure parts
def plan_tasks(cfg: ScenarioSynthConfig) -> list[dict[str, Any]]:
    """``per_cluster`` (cluster, sector, geography) slots per cluster; sectors and geographies
    cycled from a seeded permutation so that each appears about equally often overall."""
    rng = random.Random(cfg.seed)
    sectors, geos = list(SECTORS), list(GEOGRAPHIES)
    rng.shuffle(sectors)
    rng.shuffle(geos)
    tasks, n = [], 0
    for cluster in cfg.clusters:
        for slot in range(1, cfg.per_cluster + 1):
            tasks.append({"cluster": cluster, "slot": slot, "sector": sectors[n % len(sectors)],
                          "geography": geos[(n * 5) % len(geos)]})
            n += 1
    return tasks


def where(geography: str) -> str:
    """The geography as a phrase: ``the United States``, ``the Euro area``, ``Japan``."""
    return f"the {geography}" if geography in ("United States", "United Kingdom", "Euro area") else geography


def opening(task: dict[str, Any]) -> str:
    """How the base document's last instruction begins (the model continues it)."""
    return f"A borrower in the {task['sector']} sector in {where(task['geography'])},"


def format_input(task: dict[str, Any], attempt: int = 0, prompt_format: str = "chat") -> list[Message]:
    """``chat``: few-shot chat turns; ``base``: one ``{"role": "text"}`` message, the few-shot document
    ending in the task's :func:`opening`."""
    variables = {"scenario": cluster_title(task["cluster"]), "sector": task["sector"], "geography": task["geography"]}
    if prompt_format == "base":
        text = load_prompt(PROMPT_BASE).render(**variables, where=where(task["geography"]))
        return [{"role": "text", "content": text}]
    return split_turns(load_prompt(PROMPT).render(**variables))


def continued(text: str | None, task: dict[str, Any]) -> str | None:
    """A base-format answer as a whole task: ``Instruction:`` and the :func:`opening` the model continued."""
    if text is None or not text.strip():
        return text
    sep = "" if text[0] in ",.;:)" else " "
    return f"Instruction: {opening(task)}{sep}{text}"


def count_metrics(text: str) -> list[str]:
    """Distinct explicit numeric metrics with units in ``text`` ("310bp", "2.4%", "EUR 50m", "1.6x")."""
    seen: list[str] = []
    for f in find_numbers(text or ""):
        tok = re.sub(r"\s+", "", f.text.lower())
        if f.unit and tok not in seen:
            seen.append(tok)
    return seen


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram (0 = none, -> 1 = looping)."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def format_output(text: str | None, task: dict[str, Any]) -> dict[str, Any]:
    """Model text -> ``{"instruction", "response", "error"}`` (error None when well formed)."""
    bad = {"instruction": None, "response": None}
    if text is None or not text.strip():
        return {**bad, "error": "empty_output"}
    fields: dict[str, list[str]] = {}
    current = None
    for line in text.replace("<end_of_turn>", "\n").splitlines():
        m = _FIELD.match(line)
        if m:
            current = m.group(1).lower()
            if current in fields:  # a second task begins: stop at the first one
                break
            fields[current] = [m.group(2).strip()]
        elif current and line.strip():
            if re.match(r"^\s*(scenario|sector|geography)\s*:", line, re.I):
                break
            fields[current].append(line.strip())
    instruction = " ".join(fields.get("instruction", [])).strip()
    response = " ".join(fields.get("response", [])).strip()
    if "response" in fields and "instruction" not in fields:
        # the model skipped the "Instruction:" label and began with the instruction itself
        head = text.split("Response", 1)[0].strip() if "Response" in text else ""
        instruction = head if not _FIELD.match(head or "x") else ""
    if not instruction or not response:
        return {**bad, "error": "malformed_output"}
    if len(instruction) < 30 or len(response) < 40:
        return {**bad, "error": "too_short"}
    return {"instruction": instruction, "response": response, "error": None}


def on_topic(text: str, task: dict[str, Any]) -> bool:
    """The task mentions its sector or its geography (a word of either, or a common alias)."""
    low = f" {text.lower()} "
    words = [w for w in re.findall(r"[a-z]+", f"{task['sector']} {task['geography']}".lower())
             if len(w) >= 4 and w not in {"and", "area", "real", "united", "south", "consumer", "technology"}]
    words += list(_ALIASES.get(task["geography"], ()))
    # a word's first 6 letters: "utilities" ~ "utility", "airlines" ~ "airline", "chemicals" ~ "chemical"
    return any(re.search(rf"(?<![a-z]){re.escape(w[:6])}", low) for w in words)


_CREDIT_WORDS = re.compile(
    r"(?<![a-z])(?:pd|lgd|ead|cds|spreads?|rat(?:ed|ing|ings)|downgrade[sd]?|default(?:s|ed)?|expected loss|"
    r"exposures?|coverage|leverage|recovery|covenants?|refinanc\w*)(?![a-z])", re.I)
_RATINGS = re.compile(r"(?<![A-Za-z])(?:AAA|AA|A|BBB|BB|B|CCC|Aaa|Aa|Baa|Ba|Caa)(?:[+-]|[123])?(?![A-Za-z])")


def credit_terms(text: str) -> set[str]:
    """Distinct credit-risk terms (PD, LGD, spread, rating, BB+, default, ...) in ``text``."""
    words = {m.group(0).lower()[:6] for m in _CREDIT_WORDS.finditer(text)}  # spreads ~ spread
    return words | {m.group(0) for m in _RATINGS.finditer(text)}


_TIMES = re.compile(r"\s*[x×*]\s*")
_EQUALS = re.compile(r"\s*=\s*")
_TO = re.compile(r"\s+to\s+")
_UP = re.compile(r"(?<![a-z])(?:widen\w*|ris(?:e|es|ing)|rose|climb\w*|increas\w*|jump\w*|grow\w*|up)(?![a-z])"
                 r"[^.;]{0,25}\bfrom\s+$", re.I)
_DOWN = re.compile(r"(?<![a-z])(?:fall\w*|fell|drop\w*|declin\w*|narrow\w*|tighten\w*|decreas\w*|shrink\w*|down)"
                   r"(?![a-z])[^.;]{0,25}\bfrom\s+$", re.I)


def _plain(f: Figure) -> float:
    """A figure as a plain number: 2.4% -> 0.024, 310bp -> 0.031, EUR 50m -> 5e7, 1.6x -> 1.6."""
    return f.value / 100 if f.is_percent else f.value / 10_000 if f.unit == "bp" else f.value


def inconsistent_numbers(text: str, rel_tol: float = 0.05) -> list[str]:
    """The figures in ``text`` that contradict themselves: a product written out (``2.4% x 60% x EUR 50m =
    EUR 0.72m``) whose result is off by more than ``rel_tol``, and a move (``widens from 400bp to 175bp``)
    whose direction contradicts its verb. Each as the text that shows it; [] when none (or none written)."""
    figs = find_numbers(text)
    gap = [text[a.end:b.start] for a, b in zip(figs, figs[1:])]  # what lies between figure i and i + 1
    bad: list[str] = []
    i = 0
    while i < len(figs) - 1:
        j = i
        while j < len(gap) and _TIMES.fullmatch(gap[j]):
            j += 1
        if j > i and j < len(gap) and _EQUALS.fullmatch(gap[j]):  # figs[i..j] multiplied, = figs[j + 1]
            want, got = math.prod(_plain(f) for f in figs[i:j + 1]), _plain(figs[j + 1])
            if not math.isclose(want, got, rel_tol=rel_tol):
                bad.append(text[figs[i].start:figs[j + 1].end])
            i = j + 1
            continue
        a, b = figs[i], figs[i + 1]
        if _TO.fullmatch(gap[i]) and a.unit == b.unit and a.value != b.value:
            before = text[max(0, a.start - 40):a.start]
            if (b.value < a.value and _UP.search(before)) or (b.value > a.value and _DOWN.search(before)):
                clause = max(max(text.rfind(c, 0, a.start) for c in ".;\n") + 1, a.start - 80)
                bad.append(text[clause:b.end].strip())
        i += 1
    return bad


def check_task(parsed: dict[str, Any], examples: list[str], max_repetition: float = 0.25,
               task: dict[str, Any] | None = None) -> str | None:
    """A reason to drop a parsed task, or None. (Diversity against kept tasks is checked separately.)"""
    response = parsed["response"]
    if len(count_metrics(response)) < 2:
        return "missing_metrics"
    if inconsistent_numbers(parsed["instruction"]) or inconsistent_numbers(response):
        return "inconsistent_numbers"
    if not is_question(parsed["instruction"]):
        return "not_a_task"
    if len(credit_terms(response)) < 2:
        return "not_credit_analysis"
    if max(repetition_ratio(parsed["instruction"]), repetition_ratio(response)) > max_repetition:
        return "repetitive"
    whole = parsed["instruction"] + " " + response
    for ex in examples:
        if char_ratio(ex, whole) >= 0.8:
            return "copies_example"
    if task is not None and not on_topic(whole, task):
        return "off_topic"
    return None


def few_shot_texts() -> list[str]:
    """The few-shot tasks of both prompts, as "instruction response" strings (a copy of any is dropped)."""
    variables = {"scenario": "x", "sector": "x", "geography": "x", "where": "x"}
    chat = [m["content"] for m in split_turns(load_prompt(PROMPT).render(**variables)) if m["role"] == "assistant"]
    base = [b for b in load_prompt(PROMPT_BASE).render(**variables).split("\n\n") if "\nResponse:" in b]
    out = []
    for text in chat + base:
        p = format_output(text, {})
        out.append(f"{p['instruction']} {p['response']}")
    return out


def make_row(task: dict[str, Any], parsed: dict[str, Any], prompt_ref: dict[str, str], teacher: str,
             attempt: int) -> dict[str, Any]:
    rid = stable_id(SOURCE, task["cluster"], task["slot"])
    return {
        "id": rid, "group_id": f"scn-{rid}", "source": SOURCE, "task_type": "open_qa", "category": CATEGORY,
        "scenario": task["cluster"], "question": parsed["instruction"], "context": {"text": "", "table": None},
        "answer": parsed["response"], "labels": None,
        "metadata": {"prompt": prompt_ref, "teacher": teacher, "sector": task["sector"],
                     "geography": task["geography"], "metrics": count_metrics(parsed["response"]),
                     "synth_attempt": attempt},
        "is_rephrase": False, "rephrase_index": None,
    }


# ----------------------------------------------------------------------------- the task
@dataclass
class ScenarioResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    planned: int = 0
    rejected_reasons: Counter = field(default_factory=Counter)
    missing_reasons: Counter = field(default_factory=Counter)
    by_cluster: dict[str, dict[str, int]] = field(default_factory=dict)
    requests: int = 0
    prompt: dict[str, str] = field(default_factory=dict)


def synthesize_scenarios(cfg: ScenarioSynthConfig, provider: LLMProvider,
                         embedder: Embedder | None) -> ScenarioResult:
    fmt = resolve_prompt_format(cfg.prompt_format, provider, "augment.scenario.prompt_format")
    prompt = load_prompt(PROMPT_BASE if fmt == "base" else PROMPT)
    tasks = plan_tasks(cfg)
    examples = few_shot_texts()
    kept_vecs: list[np.ndarray] = []

    def parse(result: LLMResult, task: dict[str, Any]) -> dict[str, Any] | Reject:
        if not result.ok:
            return llm_error(result)
        p = format_output(continued(result.text, task) if fmt == "base" else result.text, task)
        why = p["error"] or check_task(p, examples, task=task)
        return Reject(why) if why else p

    def diverse(turns: list[Turn]) -> None:
        """Drop a task too close to a kept one or to an earlier one of this round, in task order."""
        ok = [a for t in turns for a in t.answers if not isinstance(a.value, Reject)]
        if embedder is None or not ok:
            return
        for a, v in zip(ok, embedder.encode([f"{a.value['instruction']} {a.value['response']}" for a in ok])):
            if kept_vecs and float(np.max(np.stack(kept_vecs) @ v)) >= cfg.diversity_threshold:
                a.value = Reject("not_diverse")
            else:
                kept_vecs.append(v)

    def record(task: dict[str, Any], pos: int, attempt: int) -> dict[str, Any]:
        return {"kind": "scenario", "group_id": f"scn-{stable_id(SOURCE, task['cluster'], task['slot'])}",
                "source_id": None, "category": CATEGORY, "scenario": task["cluster"], "sector": task["sector"],
                "geography": task["geography"], "rephrase_index": None, "prompt": prompt.ref}

    spec = Task(name="scenarios", format_input=lambda t, a: format_input(t, a, fmt), format_output=parse,
                temperature=cfg.temperature, heat=0.15, max_temperature=SCENARIO_MAX_TEMPERATURE,
                seed_by=lambda t: (cfg.seed, t["cluster"], t["slot"]), max_tokens=cfg.max_tokens,
                stop=STOP_BASE if fmt == "base" else (), candidates=cfg.candidates,
                key=lambda t, a, _: f"{t['cluster']}#{t['slot']}@{a}", record=record, review=diverse)
    run = run_task(provider, tasks, spec, max_attempts=cfg.max_attempts)

    teacher = f"{provider.name}:{provider.model}"
    res = ScenarioResult(rows=[make_row(t, value, prompt.ref, teacher, attempt)
                               for t, outs in zip(tasks, run.outputs) for attempt, value in outs],
                         rejections=run.rejections, planned=len(tasks), rejected_reasons=run.rejected,
                         missing_reasons=run.missing, requests=run.requests, prompt=prompt.ref)
    per: dict[str, dict[str, int]] = defaultdict(lambda: {"planned": 0, "kept": 0})
    for t in tasks:
        per[t["cluster"]]["planned"] += 1
    for row in res.rows:
        per[row["scenario"]]["kept"] += 1
    res.by_cluster = dict(sorted(per.items()))
    res.rows.sort(key=lambda x: x["id"])
    return res
