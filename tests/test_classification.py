"""Classification that learns the labels (issue 28): label log-likelihood scoring in every arm, the majority
baseline, macro-F1 with clustered CIs, the collapse flag, label balancing on train only, external test sets
and the generated sentiment set."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from datagen.config import ConfigError, load_config
from datagen.io import read_json, read_jsonl, write_manifest
from datagen.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["positive", "negative", "neutral"]
WORDS = ["<pad>", "<eos>", "<end_of_turn>", "<unk>", "shares", "soared", "plunged", "held", *LABELS]
CUE = {"soared": "positive", "plunged": "negative", "held": "neutral"}


# ----------------------------------------------------------------------------- a model whose logits are set by hand
def word_tokenizer():
    """A word-level tokenizer over :data:`WORDS` (anything else is ``<unk>``) whose chat template writes
    each turn's content on its own line."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return tok


class HandSetLM:
    """A causal LM whose next-token logits at a position are the sum of a hand-set row per token read so far
    (a bag of words, causal): ``soared`` raises ``positive``, ``plunged`` ``negative``, ``held`` ``neutral``,
    and every label raises ``<end_of_turn>``. ``bias`` is added everywhere (a constant preference)."""

    def __init__(self, bias: dict[str, float] | None = None):
        import torch

        ix = {w: i for i, w in enumerate(WORDS)}
        self.table = torch.zeros(len(WORDS), len(WORDS))
        for cue, label in CUE.items():
            self.table[ix[cue], ix[label]] = 6.0
        for label in LABELS:
            self.table[ix[label], ix["<end_of_turn>"]] = 8.0
        self.bias = torch.zeros(len(WORDS))
        for w, b in (bias or {}).items():
            self.bias[ix[w]] = b
        self.device = torch.device("cpu")

    def __call__(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **kw):
        logits = self.table[input_ids].cumsum(dim=1) + self.bias
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_loglik_scoring_picks_the_gold_label_on_a_hand_set_model():
    from training.generate import score_choices
    from training.graders import pick_by_loglik

    tok, model = word_tokenizer(), HandSetLM()
    prompts = [f"shares {cue}\n" for cue in CUE] + ["no label here\n", "shares held\n"]
    prefixed = ["neutral held", "neutral"]  # one label a token prefix of the other: the end of turn decides
    scores = score_choices(model, tok, prompts, [LABELS, LABELS, LABELS, None, prefixed], batch_size=2)
    assert scores[3] is None
    assert [LABELS[pick_by_loglik(s)] for s in scores[:3]] == list(CUE.values())
    assert all(n == 1 for s in scores[:3] for _, n in s)  # the label's own token; no <end_of_turn>
    assert [n for _, n in scores[4]] == [3, 2] and prefixed[pick_by_loglik(scores[4])] == "neutral"


def test_continuations_differing_in_their_last_token_share_one_row():
    """Labels of one prompt that differ only in their last token are scored from one forward row, with the
    same figures as scoring each alone."""
    from lm.causal_lm import continuation_logprobs

    tok, model = word_tokenizer(), HandSetLM(bias={"held": 0.5})
    rows: list[int] = []
    calls = model.__call__

    class Counting:
        device = model.device

        def __call__(self, input_ids, **kw):
            rows.append(input_ids.shape[0])
            return calls(input_ids, **kw)

    pairs = [("shares soared\n", lab) for lab in LABELS] + [("shares plunged\n", "shares " + lab) for lab in LABELS]
    together = continuation_logprobs(Counting(), tok, pairs, batch_size=8, end_of_turn=False)
    assert rows == [2]  # two prompts x one shared head each: 2 rows for 6 continuations
    alone = [continuation_logprobs(model, tok, [pr], end_of_turn=False)[0] for pr in pairs]
    assert [n for _, n in together] == [1, 1, 1, 2, 2, 2]
    assert [s for s, _ in together] == pytest.approx([s for s, _ in alone])
    rows.clear()
    with_eot = continuation_logprobs(Counting(), tok, pairs[:3], batch_size=8, end_of_turn=True)
    assert rows == [3] and [n for _, n in with_eot] == [2, 2, 2]  # the label is no longer the last token


# ----------------------------------------------------------------------------- evaluation, end to end
def _row(id_, cue, answer, group):
    return {"id": id_, "group_id": group, "source": "test", "task_type": "classification", "category": "sentiment",
            "scenario": None, "question": "Sentiment?", "context": json.dumps({"text": f"shares {cue}"}),
            "answer": answer, "labels": LABELS, "metadata": "{}", "is_rephrase": False, "rephrase_index": None,
            "messages": [{"role": "user", "content": f"shares {cue}"}, {"role": "assistant", "content": answer}]}


TEST = [_row(f"t{i}", cue, lab, f"g{i // 2}") for i, (cue, lab) in enumerate(list(CUE.items()) * 2)]
TRAIN = [_row(f"tr{i}", cue, lab, f"tg{i}") for i, (cue, lab) in
         enumerate([("plunged", "negative")] * 3 + [("soared", "positive"), ("held", "neutral")])]


@pytest.fixture
def cls_cfg(tiny_cfg):
    import pandas as pd

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.evaluate.max_items = None
    cfg.evaluate.bootstrap_samples = 200
    ds = cfg.paths.stage_dir("format")
    ds.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(TEST).to_parquet(ds / "test.parquet", index=False)
    pd.DataFrame(TRAIN).to_parquet(ds / "train.parquet", index=False)
    write_manifest(ds, Manifest(stage="format"))
    adapter = cfg.paths.models_dir / cfg.train.run_name
    adapter.mkdir(parents=True, exist_ok=True)
    write_manifest(adapter, Manifest(stage="train"))
    return cfg


def test_every_arm_is_scored_by_label_loglik_and_a_constant_tuned_arm_is_flagged(cls_cfg, monkeypatch):
    """Through run_evaluate and generate_arms: the base model's generated answers name no label, but its
    label log-likelihood knows them (headline score 1.0); the tuned model prefers ``negative`` everywhere, is
    flagged as collapsed and gains 0 macro-F1 over the majority baseline (train's most frequent label)."""
    import training.generate as gen
    from flows.stages import invoke
    from training.report import classification_rows, scores_table

    tok = word_tokenizer()
    monkeypatch.setattr(gen, "load_tokenizer", lambda cfg: tok)
    monkeypatch.setattr(gen, "load_causal_lm", lambda cfg, **kw: HandSetLM())
    monkeypatch.setattr(gen, "attach_adapter", lambda model, d: HandSetLM(bias={"negative": 20.0}))
    monkeypatch.setattr(gen, "answer_prompts", lambda model, tok, prompts, **kw: ["I cannot say."] * len(prompts))
    m = invoke(cls_cfg, "evaluate")
    out = Path(m.report_json).parent
    items = {(i["id"], i["model"]): i for i in read_jsonl(out / "items.jsonl")}
    assert {i[1] for i in items} == {"base", "fewshot", "tuned", "majority"}
    for t in TEST:
        base = items[t["id"], "base"]
        assert base["detail"]["scoring"] == "loglik" and base["detail"]["generated_pred"] == "<none>"
        assert base["detail"]["pred"] == t["answer"] and base["score"] == 1.0
        assert items[t["id"], "tuned"]["detail"]["pred"] == "negative"
        assert items[t["id"], "majority"]["answer"] == "negative"
    report = read_json(out / "report.json")
    f1 = report["macro_f1"]["test/sentiment"]
    assert f1["base"]["mean"] == 1.0 and f1["collapse"]["base"] is False
    assert f1["collapse"]["tuned"] is True and f1["collapse"]["majority"] is True
    assert f1["tuned"]["mean"] == pytest.approx(f1["majority"]["mean"])
    assert f1["tuned_minus_majority"]["mean"] == 0.0 and f1["tuned_minus_majority"]["ci"] == [0.0, 0.0]
    assert f1["claims"]["tuned_minus_fewshot"]["counts"] is False
    assert f1["majority_label"] == "negative" and f1["class_prior"]["negative"] == pytest.approx(0.6)
    assert report["summary"]["test"]["categories"]["sentiment"]["base"]["mean"] == 1.0  # headline = loglik
    assert report["classification"]["test/sentiment"]["base"]["generated"]["accuracy"] == 0.0
    (row,) = classification_rows(report)
    assert row["collapsed"] == "tuned" and row["tuned_gain_counts"] is False and row["scoring"] == "loglik"
    assert m.classification_rows == [row]
    md = (out / "report.md").read_text()
    assert "## Classification: macro-F1" in md and "(no claim)" in md and "**tuned**" in md
    assert "tuned - majority" in scores_table(cls_cfg)


def test_a_constant_predictor_is_flagged_and_gains_nothing_over_majority(cls_cfg):
    from training.evaluate import decode_row, evaluate_answers

    rows = [{**decode_row(r), "split": "test"} for r in TEST]
    train = [decode_row(r) for r in TRAIN]
    answers = {"base": [r["answer"] for r in rows], "fewshot": ["neutral"] * 6, "tuned": ["Negative."] * 6}
    rep = evaluate_answers(cls_cfg, rows, answers, train_rows=train)
    f1 = rep["macro_f1"]["test/sentiment"]
    assert f1["collapse"] == {"base": False, "fewshot": True, "tuned": True, "majority": True}
    assert f1["tuned_minus_majority"] == {"mean": 0.0, "ci": [0.0, 0.0]}
    assert f1["base"]["mean"] == 1.0 and f1["tuned"]["mean"] == pytest.approx(1 / 6)  # F1 0.5 on one of 3
    assert not f1["claims"]["tuned_minus_fewshot"]["counts"]
    assert rep["classification"]["test/sentiment"]["tuned"]["collapsed"] is True
    assert rep["classification"]["test/sentiment"]["tuned"]["top_label"] == "negative"


def test_macro_f1_cis_are_clustered_and_paired():
    from training.aggregate import macro_f1_cis
    from training.graders import classification_metrics

    gold = ["a", "a", "b", "b", "c", "c"] * 3
    good = ["a", "a", "b", "c", "c", "c"] * 3
    const = ["a"] * 18
    res = macro_f1_cis(gold, {"x": good, "y": const, "z": list(const)}, [f"g{i // 3}" for i in range(18)],
                       n_boot=300, seed=5, diffs={"x_minus_y": ("x", "y"), "y_minus_z": ("y", "z")})
    assert res["x"]["mean"] == pytest.approx(classification_metrics(gold, good)["macro_f1"])
    assert res["y"]["mean"] == pytest.approx(classification_metrics(gold, const)["macro_f1"])
    assert res["y_minus_z"] == {"mean": 0.0, "ci": [0.0, 0.0]}
    lo, hi = res["x_minus_y"]["ci"]
    assert 0 < lo <= res["x_minus_y"]["mean"] <= hi
    # one group holding everything: every replicate draws the whole set, so the CI is the point
    whole = macro_f1_cis(gold, {"x": good}, ["one"] * 18, n_boot=300, seed=5)["x"]
    assert whole["ci"] == [pytest.approx(whole["mean"])] * 2


# ----------------------------------------------------------------------------- training sees every label
def test_balancing_oversamples_train_only(tiny_cfg, tmp_path):
    import hashlib

    import pandas as pd

    from training.train import load_training_data

    def rows(prefix, labels):
        return [{"id": f"{prefix}{i}", "task_type": "classification", "category": "sentiment", "answer": lab,
                 "messages": [{"role": "user", "content": f"{prefix}{i}"}, {"role": "assistant", "content": lab}]}
                for i, lab in enumerate(labels)] + [
                {"id": f"{prefix}n", "task_type": "numeric_qa", "category": "returns", "answer": "1%",
                 "messages": [{"role": "user", "content": f"{prefix}n"}, {"role": "assistant", "content": "1%"}]}]

    d = tmp_path / "dataset"
    d.mkdir()
    splits = {"train": rows("tr", ["negative"] * 5 + ["positive"] * 2 + ["neutral"]),
              "validation": rows("va", ["negative"] * 3 + ["positive"]),
              "test": rows("te", ["negative"] * 4 + ["neutral"])}
    for s, rs in splits.items():
        pd.DataFrame(rs).to_parquet(d / f"{s}.parquet", index=False)
    before = {s: hashlib.sha256((d / f"{s}.parquet").read_bytes()).hexdigest() for s in splits}
    train, val, info = load_training_data(tiny_cfg, d)
    labels = Counter(m[-1]["content"] for m in train["messages"])
    assert labels == {"negative": 5, "positive": 5, "neutral": 5, "1%": 1}
    assert info["rows_added"] == 7 and info["categories"]["sentiment"]["before"] == {
        "negative": 5, "neutral": 1, "positive": 2}
    assert [m[0]["content"] for m in val["messages"]] == [r["id"] for r in splits["validation"]]  # untouched
    assert {s: hashlib.sha256((d / f"{s}.parquet").read_bytes()).hexdigest() for s in splits} == before
    again, _, _ = load_training_data(tiny_cfg, d)
    assert again["messages"] == train["messages"]  # deterministic
    off = tiny_cfg.model_copy(deep=True)
    off.train.balance_labels = False
    plain, _, info_off = load_training_data(off, d)
    assert len(plain) == len(splits["train"]) and info_off["rows_added"] == 0


def test_balance_labels_is_on_by_default_and_the_prompt_names_the_labels():
    from datagen.dataset.chat_format import build_messages
    from datagen.prompts import load_prompt

    cfg = load_config(profile="quality")
    assert cfg.train.balance_labels is True
    msgs = build_messages({"task_type": "classification", "labels": LABELS, "question": "Sentiment?",
                           "context": {"text": "x"}, "answer": "neutral"},
                          load_prompt("system_analyst"), load_prompt("sft_user"))
    assert "positive, negative, neutral" in msgs[1]["content"]


def test_the_dataset_card_states_labels_per_split():
    from datagen.dataset.card import label_distribution
    from datagen.dataset.chat_format import dataset_stats

    recs = {s: [{"task_type": "classification", "category": "sentiment", "answer": lab, "source": "x",
                 "cluster": "c", "group_id": f"{s}{i}", "is_rephrase": False, "metadata": "{}"}
                for i, lab in enumerate(labels)]
            for s, labels in {"train": ["negative", "negative", "positive"], "validation": ["positive"],
                              "test": ["neutral", "negative"]}.items()}
    by = dataset_stats(recs)["labels_by_category"]
    assert by["train"] == {"sentiment": {"negative": 2, "positive": 1}}
    text = "\n".join(label_distribution(by))
    assert "| sentiment | negative | 2 | 0 | 1 |" in text and "| sentiment | neutral | 0 | 0 | 1 |" in text


# ----------------------------------------------------------------------------- external test sets
def _test_set_file(path: Path) -> Path:
    rows = [{"id": f"ext-{i}", "question": "Classify the sentiment of this headline.", "answer": lab,
             "labels": LABELS, "category": "sentiment", "task_type": "classification",
             "context": {"text": f"Zephyrine Corp headline number {i}"}} for i, lab in enumerate(LABELS * 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_test_set_names_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="must not be a split's name"):
        load_config(profile="tiny", root=tmp_path,
                    overrides=['evaluate.test_sets=[{"path": "x.jsonl", "name": "test"}]'])


def test_external_test_sets_are_evaluated_and_never_reach_data_or_exemplars(cls_cfg, monkeypatch):
    from flows.stages import invoke
    from flows.stages import STAGES

    ext = _test_set_file(cls_cfg.paths.root / "ext.jsonl")
    cfg = cls_cfg.model_copy(deep=True)
    cfg.evaluate.test_sets = type(cfg.evaluate).model_validate(
        {"test_sets": [{"path": str(ext), "name": "ext", "format": "jsonl"}]}).test_sets
    seen = {}

    def fake(model_cfg, adapter_dir, conversations, **kw):
        seen.update(conversations=conversations, choices=kw.get("choices"))
        return {arm: ["positive"] * len(c) for arm, c in conversations.items()}

    m = invoke(cfg, "evaluate", generator=fake)
    report = read_json(m.report_json)
    assert set(report["summary"]) == {"test", "ext"}
    assert report["summary"]["ext"]["categories"]["sentiment"]["n"] == 6
    assert report["test_sets"]["ext"]["rows"] == 6 and "ext/sentiment" in report["macro_f1"]
    items = read_jsonl(Path(m.items_jsonl))
    ext_ids = {i["id"] for i in items if i["split"] == "ext"}
    assert len(ext_ids) == 6
    assert not ext_ids & {x for i in items for x in i.get("fewshot_ids") or []}  # never an exemplar
    ext_convs = [c for c in seen["conversations"]["base"] if "Zephyrine" in c[-1]["content"]]
    assert len(ext_convs) == 6 and all("positive, negative, neutral" in c[-1]["content"] for c in ext_convs)
    assert sum(c is not None for c in seen["choices"]) == 12
    # the data stages never read the evaluate section, and fetch's output holds none of the set's rows
    assert all(not any(s.startswith("evaluate") for s in st.config_sections) for st in STAGES
               if st.name not in ("evaluate",))
    cfg.sources.market = None
    invoke(cfg, "fetch")
    fetched = " ".join(p.read_text(errors="ignore") for p in cfg.paths.stage_dir("fetch").rglob("*") if p.is_file())
    assert fetched and "Zephyrine" not in fetched and "ext-0" not in fetched


# ----------------------------------------------------------------------------- the generated sentiment set
SENTIMENT = ROOT / "data" / "raw" / "finance_sentiment.jsonl"


def test_generated_sentiment_set_is_balanced_hard_and_grouped_by_family():
    from datagen.config import SourceQAFile
    from datagen.dataset.split import split_units
    from datagen.sources.source_qa import load_source_qa

    res = load_source_qa(SourceQAFile(path=SENTIMENT, name="finsynth-sentiment", format="jsonl"))
    rows = res.samples
    assert res.quarantine == [] and len(rows) >= 600
    assert Counter(r["answer"] for r in rows) == {lab: len(rows) // 3 for lab in LABELS}
    fams = Counter(r["group_id"] for r in rows)
    assert len(fams) >= 25 and all(r["group_id"] == f"fs-{r['metadata']['family']}" for r in rows)
    for fam in fams:  # every family is balanced, so a split by family keeps labels balanced
        assert len(set(Counter(r["answer"] for r in rows if r["group_id"] == fam).values())) == 1
    constructions = Counter(r["metadata"]["construction"] for r in rows)
    assert {"numbers", "numbers_inverse", "negation", "hedging", "mixed"} <= set(constructions)
    assert {r["metadata"]["domain"] for r in rows} >= {"earnings", "guidance", "rating", "rates", "layoffs", "deals"}
    assert len({r["context"]["text"].lower() for r in rows}) == len(rows)
    units = split_units([{**r, "context": r["context"]} for r in rows])
    by_unit: dict[str, set[str]] = {}
    for r, u in zip(rows, units, strict=True):
        by_unit.setdefault(u, set()).add(r["group_id"])
    assert all(len(v) == 1 for v in by_unit.values())  # a split unit never mixes template families
    headlines = (ROOT / "data" / "raw" / "headline_sentiment.jsonl").read_text().lower()
    companies = {r["metadata"]["company"] for r in rows}
    assert len(companies) >= 20 and all(r["metadata"]["company"] in r["context"]["text"] for r in rows)
    assert not [c for c in companies if re.search(rf"\b{c.lower()}\b", headlines)]  # the external test set's names


def test_sentiment_generator_rewrites_the_same_bytes(tmp_path):
    out = tmp_path / "s.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sentiment.py"), "--out", str(out)], check=True,
                   capture_output=True)
    assert out.read_bytes() == SENTIMENT.read_bytes()


def test_quality_profile_trains_on_generated_sentences_and_tests_on_headlines():
    cfg = load_config(profile="quality")
    assert "finance_sentiment.jsonl" in [Path(s.path).name for s in cfg.sources.source_qa]
    assert "headline_sentiment.jsonl" not in [Path(s.path).name for s in cfg.sources.source_qa]
    assert [(Path(s.path).name, s.name) for s in cfg.evaluate.test_sets] == [("headline_sentiment.jsonl", "headlines")]


def test_quality_json_fields_from_a_report(cls_cfg):
    """benchmarks/bench_quality.py's figures per category: macro-F1 of every arm with CIs, tuned's paired
    gains, the collapse flags, and the overall comparison without the categories where tuned collapsed."""
    import importlib.util

    from training.evaluate import decode_row, evaluate_answers

    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{**decode_row(r), "split": "test"} for r in TEST]
    answers = {"base": ["positive"] * 6, "fewshot": [r["answer"] for r in rows], "tuned": ["negative"] * 6}
    rep = evaluate_answers(cls_cfg, rows, answers, train_rows=[decode_row(r) for r in TRAIN])
    cat = bench.point_figures(rep)["categories"]["sentiment"]
    assert set(cat["macro_f1"]) == {"base", "fewshot", "majority", "tuned"}
    assert cat["macro_f1"]["fewshot"]["mean"] == 1.0 and len(cat["macro_f1"]["tuned"]["ci"]) == 2
    assert cat["tuned_minus_majority_f1"]["ci"] == [0.0, 0.0] and cat["tuned_minus_fewshot_f1"]["mean"] < 0
    assert cat["collapse"] == {"base": True, "fewshot": False, "tuned": True, "majority": True}
    assert bench.overall_without_collapsed(rep, rep["items"], n_boot=200)["excluded_categories"] == ["sentiment"]
