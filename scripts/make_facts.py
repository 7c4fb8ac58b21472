"""Write the closed-book knowledge benchmark's fact set (code, no LLM): ``data/raw/knowledge_facts.jsonl``.

Fictional finance issuers, each with eight facts whose short answers come from three closed pools, so
that **the question's wording, not the company name, picks the answer**: four city relations
(headquarters, primary listing, founding city, largest operations centre: four different cities per
company), two person relations (chief executive, chief financial officer) and two firm relations
(auditor, lead bond underwriter). A fact's four answer candidates are its gold answer and three others of
the same pool, the company's other answers of that pool first, so knowing the company is not enough.

Each fact comes with phrasings from two template families that share no 6-token run:

- ``question`` and ``metadata.train_phrasings``: the original question and three rephrasings (the family
  a teacher would write; the benchmark's ``k`` takes the first ``k``);
- ``metadata.heldout_question``: a phrasing of another family, never trained: the benchmark asks it.

Companies are ``trained`` or ``control`` (never trained: their accuracy must stay at chance), and trained
companies are ``test`` or ``validation`` (hyperparameters are chosen on the validation companies'
held-out phrasings only). Rows are source-QA rows (closed-book: no context), one per fact, grouped by fact.

    python scripts/make_facts.py [--companies 24] [--controls 6] [--validation 4] [--out data/raw/knowledge_facts.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from datagen.dataset.knowledge import NGRAM, shares_ngram  # noqa: E402  (the held-out phrasing rule)

SEED = 20261203
CITIES = ["Lisbon", "Oslo", "Zurich", "Dublin", "Madrid", "Vienna", "Prague", "Warsaw", "Helsinki", "Athens",
          "Lyon", "Milan", "Porto", "Geneva", "Munich", "Seville"]
PEOPLE = ["Maria Okafor", "Daniel Reyes", "Ingrid Holm", "Tomasz Wrona", "Aiko Tanaka", "Samuel Adeyemi",
          "Clara Novak", "Luca Bianchi", "Priya Raman", "Jonas Berg", "Elena Petrova", "Hugo Martin"]
FIRMS = ["Ashgrove Audit", "Belford & Lane", "Corvane Partners", "Dunmore LLP", "Eastwick Assurance",
         "Fairhill & Co", "Granton Advisory", "Holloway Reid"]
POOLS = {"city": CITIES, "person": PEOPLE, "firm": FIRMS}

# relation -> (pool, original question, three trained rephrasings, held-out phrasing). {c} is the company.
RELATIONS: dict[str, tuple[str, str, tuple[str, str, str], str]] = {
    "headquarters": ("city", "In which city is {c} headquartered?", (
        "Where are the headquarters of {c} located?",
        "{c} has its head office in which city?",
        "Name the city that hosts the corporate headquarters of {c}.",
    ), "Someone visiting the main office of {c} would travel to what city?"),
    "listing": ("city", "On which city's stock exchange does {c} have its primary listing?", (
        "Which city's exchange is the primary listing venue for {c} shares?",
        "The shares of {c} trade mainly on the exchange of which city?",
        "Name the city whose bourse holds the main listing of {c}.",
    ), "To buy {c} stock at its home market, an investor would place orders in what city?"),
    "founded": ("city", "In which city was {c} founded?", (
        "Where was {c} originally established?",
        "{c} was set up in which city?",
        "Name the city in which {c} began operating.",
    ), "The company {c} started out in what city?"),
    "operations": ("city", "Which city hosts the largest operations centre of {c}?", (
        "Where is the biggest operations hub of {c}?",
        "{c} runs its largest back-office site in which city?",
        "Name the city with the main processing centre of {c}.",
    ), "Most back-office staff of {c} work in what city?"),
    "ceo": ("person", "Who is the chief executive of {c}?", (
        "Who runs {c} as its CEO?",
        "Name the person who leads {c} as chief executive officer.",
        "{c} is headed by which CEO?",
    ), "The top executive in charge at {c} is whom?"),
    "cfo": ("person", "Who is the chief financial officer of {c}?", (
        "Who serves as CFO of {c}?",
        "Name the person in charge of finance at {c} as its CFO.",
        "{c} has which executive as its finance chief?",
    ), "The person who signs off the accounts of {c} as finance head is whom?"),
    "auditor": ("firm", "Which firm audits the accounts of {c}?", (
        "Who is the external auditor of {c}?",
        "Name the audit firm that reviews the financial statements of {c}.",
        "{c} has its books audited by which firm?",
    ), "The yearly audit opinion on {c} is signed by what firm?"),
    "underwriter": ("firm", "Which firm was the lead underwriter of the bond issue of {c}?", (
        "Who led the underwriting of the bonds of {c}?",
        "Name the firm that arranged the bond sale for {c} as lead manager.",
        "{c} placed its bonds through which lead underwriter?",
    ), "The bank chosen to run the debt offering of {c} as bookrunner was what firm?"),
}

PREFIX = ["Ard", "Bel", "Cor", "Dun", "Elm", "Fal", "Gar", "Hal", "Ist", "Jor", "Kel", "Lor", "Mar", "Nor",
          "Orv", "Pel", "Quin", "Ros", "Sel", "Tor", "Ul", "Val", "Wes", "Yar"]
SUFFIX = ["brook", "crest", "dale", "field", "gate", "haven", "more", "ridge", "stone", "wick", "worth", "ton"]
KIND = ["Capital", "Bancorp", "Holdings", "Financial", "Insurance", "Credit"]

def companies(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` distinct (name, ticker) pairs."""
    names: dict[str, str] = {}
    while len(names) < n:
        stem = rng.choice(PREFIX) + rng.choice(SUFFIX)
        name = f"{stem} {rng.choice(KIND)}"
        ticker = (stem[:3] + rng.choice("KLMNPRSTVX")).upper()
        if name not in names and ticker not in names.values():
            names[name] = ticker
    return sorted(names.items())


def assign(pool: list[str], k: int, rng: random.Random, counts: dict[str, int]) -> list[str]:
    """``k`` distinct values of ``pool``, the least used first (ties at random), so every value is a gold
    answer about equally often and a prior over the pool cannot beat chance."""
    order = sorted(pool, key=lambda v: (counts[v], rng.random()))
    picked = order[:k]
    for v in picked:
        counts[v] += 1
    return picked


def make_facts(n_companies: int = 24, n_controls: int = 6, n_validation: int = 4, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    cos = companies(n_companies + n_controls, rng)
    roles = ["control"] * n_controls + ["validation"] * n_validation + ["test"] * (n_companies - n_validation)
    rng.shuffle(roles)
    by_pool: dict[str, list[str]] = {}
    for rel, (pool, *_rest) in RELATIONS.items():
        by_pool.setdefault(pool, []).append(rel)
    counts = {p: {v: 0 for v in values} for p, values in POOLS.items()}
    rows = []
    for (name, ticker), role in zip(cos, roles, strict=True):
        answers: dict[str, str] = {}
        for pool, rels in by_pool.items():
            answers.update(zip(rels, assign(POOLS[pool], len(rels), rng, counts[pool]), strict=True))
        for rel, (pool, original, rephrasings, heldout) in RELATIONS.items():
            gold = answers[rel]
            siblings = [answers[r] for r in by_pool[pool] if r != rel]
            others = [v for v in POOLS[pool] if v != gold and v not in siblings]
            rng.shuffle(others)
            distractors = (siblings + others)[:3]
            candidates = sorted([gold, *distractors])
            train = [original.format(c=name)] + [t.format(c=name) for t in rephrasings]
            held = heldout.format(c=name)
            if shares_ngram(held, train):
                raise ValueError(f"held-out phrasing shares a {NGRAM}-gram with a trained one: {held!r}")
            fid = f"fact-{ticker.lower()}-{rel}"
            rows.append({
                "id": fid, "group_id": fid, "question": train[0], "answer": gold,
                "task_type": "open_qa", "category": f"knowledge_{pool}", "scenario": rel,
                "metadata": {"entity": name, "ticker": ticker, "relation": rel, "role": role,
                             "candidates": candidates, "train_phrasings": train, "heldout_question": held},
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--companies", type=int, default=24, help="trained companies (test + validation)")
    ap.add_argument("--controls", type=int, default=6, help="control companies, never trained")
    ap.add_argument("--validation", type=int, default=4,
                    help="trained companies whose held-out phrasings choose hyperparameters")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data/raw/knowledge_facts.jsonl")
    a = ap.parse_args()
    rows = make_facts(a.companies, a.controls, a.validation)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(a.out)
    print(f"wrote {len(rows)} facts ({len(RELATIONS)} per company) to {a.out}")


if __name__ == "__main__":
    main()
