"""The one configuration model of finsynth.

A profile is a YAML file under ``configs/``. It is validated at start-up: an unknown key or a bad
value raises :class:`ConfigError` naming the key's dotted path. The CLI, the flows and the tests all
load configuration through :func:`load_config`.

Secrets never live here: a provider names the *environment variable* (or Prefect Secret block)
that holds its key, and :func:`Config.dump_public` is what gets written next to outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lm.config import ModelConfig  # noqa: F401  (the model section; lm reads it without importing datagen)

_HERE = Path(__file__).resolve().parent
_SOURCE_ROOT = _HERE.parents[1]
_CHECKOUT = (_SOURCE_ROOT / "pyproject.toml").is_file() and (_SOURCE_ROOT / "configs").is_dir()
# a source checkout is its own project root; an installed finsynth works in the current directory
PROJECT_ROOT = _SOURCE_ROOT if _CHECKOUT else Path.cwd()


def asset_dir(name: str) -> Path:
    """``configs`` or ``prompts``: the checkout's folder, or the copy a wheel installs inside datagen."""
    return _SOURCE_ROOT / name if _CHECKOUT else _HERE / f"_{name}"


CONFIG_DIR = asset_dir("configs")


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _ordered(pair: tuple[float, float], what: str, strict: bool = True) -> tuple[float, float]:
    """An ordered pair (a band, two thresholds): a reversed one would silently relabel or reject all."""
    lo, hi = pair
    if lo > hi or (strict and lo == hi):
        raise ValueError(f"{what} must be ordered low < high, got ({lo}, {hi})")
    return pair


def _date(value: str | None, what: str) -> str | None:
    """A date string that parses (YYYY-MM-DD); an unparsable one is an error, not ignored."""
    if value is None:
        return value
    import datetime as dt

    try:
        dt.date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{what}: {str(value)[:40]!r} is not a date (use YYYY-MM-DD)") from None
    return value


MAX_TEMPERATURE = 2.0  # the range OpenAI-compatible servers and Gemini accept
# retries sample hotter, up to a cap: a first temperature above the cap would be sent as the cap, so the
# configuration refuses it instead (what is validated is what is sent)
REPHRASE_MAX_TEMPERATURE = 1.2
SCENARIO_MAX_TEMPERATURE = 1.3


# ----------------------------------------------------------------------------- paths
class PathsConfig(_Strict):
    """Where stages read and write. Relative paths are resolved against ``root``."""

    root: Path = PROJECT_ROOT
    raw: Path = Path("data/raw")
    processed: Path = Path("data/processed")
    models: Path = Path("data/models")
    reports: Path = Path("data/reports")
    cache: Path = Path("data/cache")

    def resolve(self, p: Path) -> Path:
        return p if p.is_absolute() else (self.root / p)

    def stage_dir(self, stage: str) -> Path:
        """``data/processed/<stage>`` for data stages."""
        return self.resolve(self.processed) / stage

    @property
    def cache_dir(self) -> Path:
        return self.resolve(self.cache)

    @property
    def models_dir(self) -> Path:
        return self.resolve(self.models)

    @property
    def reports_dir(self) -> Path:
        return self.resolve(self.reports)


# ----------------------------------------------------------------------------- sources
class SimulatorConfig(_Strict):
    tickers: list[str] = ["ACME", "BOLT", "CRUX", "DYNA", "EONX"]
    regimes: list[Literal["calm", "rate_shock", "crash", "recovery", "fx_crisis"]] = [
        "calm", "rate_shock", "crash", "recovery", "fx_crisis"]
    days_per_regime: int = Field(60, ge=20)
    start_date: str = "2024-01-02"
    seed: int = 7

    @field_validator("start_date")
    @classmethod
    def _start(cls, v: str) -> str:
        return _date(v, "start_date")


# the market question types, in the order datagen.sources.market_qa builds them (one builder each there)
QUESTION_TYPES: tuple[str, ...] = (
    "latest_value", "period_return", "volatility", "max_drawdown", "ma_trend", "comparison", "risk_level")


class MarketConfig(_Strict):
    provider: Literal["simulator", "csv", "yfinance"] = "simulator"
    license: str | None = None  # of price files / downloaded data, for the dataset card (None: not stated)
    # csv/parquet: a file per ticker (stem = ticker) or one long table with a ticker column
    paths: list[Path] = []
    tickers: list[str] = []  # yfinance tickers, or a filter for files
    start: str | None = None
    end: str | None = None
    simulator: SimulatorConfig = SimulatorConfig()
    window_days: int = Field(10, ge=3, le=60)
    # an int for every question type, or {type: count} (a type not named gets none), e.g. a demo that
    # asks mostly price look-ups: {latest_value: 80, ma_trend: 4, ...}
    questions_per_type: int | dict[str, int] = 12
    risk_vol_thresholds: tuple[float, float] = (0.20, 0.40)  # annualised vol: low < a <= medium < b <= high
    seed: int = 11

    @model_validator(mode="after")
    def _check(self) -> MarketConfig:
        per = self.questions_per_type
        unknown = sorted(set(per) - set(QUESTION_TYPES)) if isinstance(per, dict) else []
        if unknown:
            raise ValueError(f"questions_per_type: unknown question type(s) {unknown}; known: {list(QUESTION_TYPES)}")
        if any(v < 0 for v in (per.values() if isinstance(per, dict) else [per])):
            raise ValueError(f"questions_per_type must be >= 0, got {per}")
        _ordered(self.risk_vol_thresholds, "risk_vol_thresholds")
        _date(self.start, "start")
        _date(self.end, "end")
        if self.start and self.end and self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be before end ({self.end})")
        return self

    def count(self, qtype: str) -> int:
        """How many questions of ``qtype`` to build."""
        per = self.questions_per_type
        return per.get(qtype, 0) if isinstance(per, dict) else per

    @property
    def n_questions(self) -> int:
        return sum(self.count(t) for t in QUESTION_TYPES)


class SourceQAFile(_Strict):
    path: Path
    name: str | None = None  # source name written to `source`; defaults to the file stem
    format: Literal["auto", "csv", "jsonl", "json", "parquet"] = "auto"
    # canonical field -> column name in the file (``group_id: doc_id`` names the source's own group column)
    columns: dict[str, str] = {}
    task_type: Literal["open_qa", "numeric_qa", "classification"] | None = None  # default when no column
    category: str | None = None  # default category when no column (else the source name)
    # nested records: dotted path to the list of questions inside each record (one row per item; the
    # record's other fields are shared by its items, which share a group unless group_id is mapped)
    records_path: str | None = None
    # provenance for the dataset card (None: not stated by the source)
    license: str | None = None
    annotations_creators: list[str] | None = None  # e.g. ["expert-generated"], ["crowdsourced"]
    source_datasets: list[str] | None = None  # e.g. ["original"] or ["extended|tatqa"]


class SourcesConfig(_Strict):
    market: MarketConfig | None = MarketConfig()
    source_qa: list[SourceQAFile] = []


# ----------------------------------------------------------------------------- llm
class ProviderConfig(_Strict):
    kind: Literal["openai", "gemini", "local", "llamacpp_server"]
    model: str = ""
    base_url: str | None = None
    api_key_env: str | None = None  # name of the env var; never the key itself
    api_key_secret_block: str | None = None  # name of a Prefect Secret block
    concurrency: int = Field(4, ge=1)
    rpm: int | None = Field(None, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    schema_retries: int = Field(2, ge=0)
    # local (transformers) backend; llamacpp_server: a GGUF file (default: the packaged Gemma GGUF)
    model_path: str | None = None  # "packaged:gemma3-270m" or a directory; default packaged Gemma
    context_tokens: int = Field(2048, ge=64)  # llamacpp_server: context per slot (one slot per concurrency)
    threads: int | None = Field(None, ge=1)  # llamacpp_server: CPU threads (default: all cores)
    batch_size: int = Field(8, ge=1)
    device: str = "auto"
    extra_body: dict[str, Any] = {}
    json_mode: Literal["schema", "json_object", "none"] = "schema"

    @model_validator(mode="after")
    def _backoff(self) -> ProviderConfig:
        if self.backoff_base_s > self.backoff_max_s:
            raise ValueError(f"backoff_base_s ({self.backoff_base_s}) must not exceed backoff_max_s "
                             f"({self.backoff_max_s})")
        return self


CACHE_SCHEMES = ("sqlite", "postgresql", "postgres")


def mask_url(url: str) -> str:
    """``url`` safe to print: its password (in the user part or a ``password=`` parameter) as ``***``."""
    import re

    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*):[^?#]*@", r"\1:***@", str(url))
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


class LLMConfig(_Strict):
    # a URL here may hold a password: a validation error never echoes the value
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    providers: dict[str, ProviderConfig] = {"local": ProviderConfig(kind="local")}
    cache_file: Path = Path("data/cache/llm_cache.sqlite")
    # the response cache as a URL, which wins over cache_file: ``sqlite:///relative.sqlite`` (against paths.root),
    # ``sqlite:////absolute.sqlite`` or ``postgresql://user@host:port/db`` (shared by several machines, and the
    # run lock then lives there too; docs/scale.md)
    cache: str | None = None
    # a stage fails when more than this fraction of its model calls fail (connection, timeout, HTTP
    # status; not invalid content), or all of them; an authentication error fails it at once
    max_failure_rate: float = Field(0.5, ge=0, le=1)

    @field_validator("cache")
    @classmethod
    def _cache_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme, sep, rest = v.partition("://")
        if not sep or scheme.lower() not in CACHE_SCHEMES:
            raise ValueError(f"{mask_url(v)!r} is not a cache URL: use sqlite:///path/to/cache.sqlite or "
                             "postgresql://user@host:port/database (or leave it out and set llm.cache_file)")
        if mask_url(v) != v:  # a config value is recorded with the run (Prefect parameters, run.json, cards)
            raise ValueError(f"{mask_url(v)!r} holds a password, which would be recorded with the run: leave it "
                             "out of the URL and set PGPASSWORD or a ~/.pgpass entry (libpq reads both)")
        if scheme.lower() == "sqlite" and not rest.removeprefix("/"):
            raise ValueError("a sqlite URL needs a file: sqlite:///relative/path.sqlite or "
                             "sqlite:////absolute/path.sqlite")
        return v


# ----------------------------------------------------------------------------- augment
class ScenarioSynthConfig(_Strict):
    enabled: bool = True
    provider: str = "local"
    clusters: list[str] = [
        "interest_rate_shock", "rating_downgrade_wave", "fx_crisis", "commodity_shock",
        "liquidity_squeeze", "sector_default_cluster", "real_estate_correction", "sovereign_stress"]
    per_cluster: int = Field(4, ge=0)
    max_attempts: int = Field(3, ge=1)
    temperature: float = Field(0.8, ge=0, le=SCENARIO_MAX_TEMPERATURE)
    max_tokens: int = Field(320, ge=16)
    diversity_threshold: float = Field(0.92, gt=0, le=1)  # drop if cosine to a kept one >= this
    seed: int = 5
    # chat: few-shot chat turns (instruct models, APIs); base: a few-shot document whose last instruction opens
    # with the sector and geography, stopped at the blank line after the response; auto: base on the local provider
    prompt_format: Literal["auto", "chat", "base"] = "chat"
    candidates: int = Field(1, ge=1, le=16)  # best-of-n per open slot, one request (one prefill on the local provider)


class AugmentConfig(_Strict):
    provider: str = "local"
    k: int = Field(3, ge=0)
    max_attempts: int = Field(3, ge=1)  # per missing rephrasing
    temperature: float = Field(0.7, ge=0, le=REPHRASE_MAX_TEMPERATURE)
    max_tokens: int = Field(96, ge=8)
    sim_low: float = Field(0.71, ge=-1, le=1)  # calibrated: scripts/calibrate_rephrase.py, docs/augment.md
    sim_high: float = Field(0.98, ge=-1, le=1)
    near_copy_char_ratio: float = Field(0.95, gt=0, le=1)
    length_ratio: tuple[float, float] = (0.5, 2.0)
    # content words a kept rephrasing may add / leave out (validators.check_content); null: no limit. The demo's
    # small base model needs a tight limit, chosen on hand-labelled real outputs (docs/augment.md)
    max_new_words: int | None = Field(None, ge=0)
    max_dropped_words: int | None = Field(None, ge=0)
    limit: int | None = Field(None, ge=1)  # rephrase only the first N items (demo/testing)
    # best-of-n: candidates sampled per open slot, in one request per item (one prefill); all are validated
    # and the most different valid ones are kept. 1 = one request per slot, one candidate (the old path)
    candidates: int = Field(1, ge=1, le=16)
    # "chat": few-shot chat turns (instruct models, any provider); "base": a plain few-shot document a base
    # model continues (raw text; the local provider)
    prompt_format: Literal["auto", "chat", "base"] = "chat"  # auto: base for the local provider, else chat
    # send the stop strings, so generation ends where the answer ends; false: generate to max_tokens and
    # cut afterwards (the pre-best-of-n baseline, kept for benchmarks/bench_augment.py)
    early_stop: bool = True
    scenario: ScenarioSynthConfig = ScenarioSynthConfig()

    @model_validator(mode="after")
    def _band(self) -> AugmentConfig:
        if self.sim_low >= self.sim_high:
            raise ValueError("sim_low must be < sim_high")
        _ordered(self.length_ratio, "length_ratio")
        if self.length_ratio[0] <= 0:
            raise ValueError(f"length_ratio must be positive, got {self.length_ratio}")
        return self


# ----------------------------------------------------------------------------- dedup / split / format
class EmbedderConfig(_Strict):
    model: str = "packaged:all-minilm-l6-v2"  # or a local directory
    batch_size: int = Field(64, ge=1)
    device: str = "cpu"
    max_seq_length: int = Field(128, ge=8)  # MiniLM was trained on 128 tokens; longer input is truncated
    disk_cache: bool = True  # cache vectors by text hash under paths.cache/embeddings/<model key>


class DedupConfig(_Strict):
    embedder: EmbedderConfig = EmbedderConfig()
    threshold: float = Field(0.92, gt=0, le=1)  # near-duplicate across groups
    within_group_threshold: float = Field(0.985, gt=0, le=1)  # near-copy inside one group
    method: Literal["auto", "exact", "partitioned"] = "auto"
    partition_min_rows: int = Field(50_000, ge=1)
    nlist: int | None = Field(None, ge=1)  # partitioned: k-means cells (default ~4*sqrt(n))
    nprobe: int = Field(16, ge=1)  # partitioned: cells searched per query
    context_chars: int = Field(200, ge=0)  # chars of context added to the question for split's embedding
    # two contexts are "nearly shared" when this share of the smaller one's tokens is in the larger
    # (and tables agree row for row, no figure differs); see datagen.dataset.dedup.context_similarity
    context_threshold: float = Field(0.98, gt=0, le=1)
    # bench_dedup.py's figures guard (Jaccard of the numbers in question + context); not a dedup rule
    min_number_overlap: float = Field(0.8, ge=0, le=1)


class SplitConfig(_Strict):
    # grouped: train/validation/test by group and context (open-book items, the default);
    # knowledge: closed-book facts, trained in every phrasing but one, asked in the held-out one, with
    # never-trained control facts (datagen.dataset.knowledge)
    strategy: Literal["grouped", "knowledge"] = "grouped"
    knowledge_controls: float = Field(0.2, ge=0, lt=1)  # share of facts (by entity) never trained
    knowledge_validation: float = Field(0.2, ge=0, lt=1)  # share asked in validation instead of test
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    test_originals_only: bool = True
    balance_train: bool = False
    k_range: tuple[int, int] = (2, 8)
    seed: int = 13
    cluster_by: Literal["scenario", "kmeans"] = "scenario"  # scenario/category where given, or k-means for all
    # market rows (source market:*): train / validation / test from ordered date ranges, one window apart
    walk_forward: bool = True
    # the stage fails when a group, a context or a price row (ticker, date) is in two splits, unless true
    allow_leakage: bool = False

    @field_validator("k_range")
    @classmethod
    def _k(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 1:
            raise ValueError(f"k_range must start at 1 or more, got {v}")
        return _ordered(v, "k_range", strict=False)

    @field_validator("ratios")
    @classmethod
    def _sum_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if abs(sum(v) - 1.0) > 1e-6 or min(v) < 0:
            raise ValueError("ratios must be non-negative and sum to 1")
        return v


class FormatConfig(_Strict):
    system_prompt: str = "system_analyst"  # a template name under prompts/
    max_tokens: int = Field(1024, ge=16)
    # a conversation over max_tokens: drop it, or cut the table rows / paragraphs farthest from the
    # answer's and question's figures (rows whose answer's figures are not all in the context are dropped)
    long_context: Literal["drop", "truncate"] = "drop"


# ----------------------------------------------------------------------------- model / train / eval
class LoraConfig(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # train the end-of-turn token's embedding row (one row, tied to the LM head) with the adapter: a base model's
    # row is untrained (Gemma-3-270M's <end_of_turn> sits among the unused tokens), so LoRA alone never learns to stop
    end_of_turn: bool = True


class TrainConfig(_Strict):
    quantization: Literal["auto", "none", "nf4"] = "auto"  # auto: nf4 on GPU, none on CPU
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(8, ge=1)
    max_length: int = Field(2048, ge=16)
    epochs: float = Field(3.0, gt=0)
    # each training row this many times per epoch: the exposure-matched k=0 arm of a k=3 comparison is
    # augment.k=0 with train.repeat=4 (the same steps and answer exposures, one wording)
    repeat: int = Field(1, ge=1)
    max_steps: int = Field(-1, ge=-1)  # -1: run the epochs; else a positive step count
    eval_steps: int = Field(50, ge=1)
    save_steps: int | None = None  # default: eval_steps
    early_stopping_patience: int = Field(3, ge=1)
    early_stopping_threshold: float = Field(0.0, ge=0)
    packing: bool = True
    gradient_checkpointing: bool = True
    merge: bool = False
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    seed: int = 42
    run_name: str = "adapter"
    device: str = "auto"  # auto: cuda when visible, else cpu
    logging_steps: int | None = Field(None, ge=1)  # default: min(10, eval_steps // 2), at least 1
    save_total_limit: int = Field(2, ge=1)  # checkpoints kept while training (the best one is always kept)
    keep_checkpoints: bool = False  # keep <run>/checkpoints after a finished run (else removed)
    compact_lm_head: bool = True  # CPU: score only labelled positions in TRL's fused LM head
    # classification rows of the train split oversampled (deterministically) so each label of a category
    # has as many rows as its most frequent one; validation and test are never touched
    balance_labels: bool = True

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0:
            raise ValueError("max_steps must be positive, or -1 to train for `epochs`")
        return v


class EvaluateConfig(_Strict):
    judge_provider: str = "local"
    max_items: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE)
    batch_size: int = Field(8, ge=1)
    rel_tolerance: float = Field(0.01, ge=0)
    bootstrap_samples: int = Field(2000, ge=100)
    fewshot_k: int = Field(3, ge=0)  # training exemplars in the base few-shot arm's prompts; 0: no such arm
    pairwise: bool = False
    judge_all: bool = False  # judge every item, not only open_qa
    selfcheck_samples: int = Field(20, ge=0)
    gold_file: Path | None = None
    calibration_file: Path | None = None  # JSONL: question, reference, answer, label (human pass/fail)
    judge_max_tokens: int = Field(256, ge=16)
    judge_pass_score: int = Field(4, ge=1, le=5)  # a judge pass also needs rubric score >= this
    judge_min_accuracy: float = Field(0.8, ge=0, le=1)  # self-check accuracy below this: unreliable
    judge_min_kappa: float = Field(0.4, ge=-1, le=1)  # kappa vs grader / humans below this: unreliable
    seed: int = 17
    run_name: str = "eval"
    # external test sets: source-QA files (the same fields and column mapping as sources.source_qa), evaluated
    # with every arm and reported as a split named after each (`name`, else the file stem); never trained on
    test_sets: list[SourceQAFile] = []

    @field_validator("test_sets")
    @classmethod
    def _test_set_names(cls, v: list[SourceQAFile]) -> list[SourceQAFile]:
        names = [s.name or Path(s.path).stem for s in v]
        bad = sorted({n for n in names if n in ("train", "validation", "test", "gold")})
        if bad:
            raise ValueError(f"test set names must not be a split's name: {bad} (set `name`)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"test set names must be unique: {dup} (set `name`)")
        return v


class RunConfig(_Strict):
    """Where row-parallel work runs (docs/scale.md). It never changes a stage's output, so no stage's
    config hash includes it."""

    executor: Literal["local", "ray"] = "local"
    # ray: None starts a local Ray with ``ray_workers`` CPUs; "auto" joins the cluster this machine is in;
    # "ray://host:10001" a remote one
    ray_address: str | None = None
    ray_workers: int = Field(2, ge=1)  # actors per stage (each holds its own models and providers)
    shard_rows: int = Field(256, ge=1)  # rows per shard (the unit of resume and of Ray's retries)


class PrefectConfig(_Strict):
    result_storage: Path = Path("data/cache/prefect-results")


class CardConfig(_Strict):
    dataset_name: str = "finsynth-demo"
    license: str = "apache-2.0"  # of what the pipeline generates; each source's own license is read from it
    pretty_name: str = "finsynth synthetic finance QA"


class Config(_Strict):
    profile: str = "custom"
    paths: PathsConfig = PathsConfig()
    sources: SourcesConfig = SourcesConfig()
    llm: LLMConfig = LLMConfig()
    augment: AugmentConfig = AugmentConfig()
    dedup: DedupConfig = DedupConfig()
    split: SplitConfig = SplitConfig()
    format: FormatConfig = FormatConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    prefect: PrefectConfig = PrefectConfig()
    card: CardConfig = CardConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _providers_exist(self) -> Config:
        names = set(self.llm.providers)
        for where, name in (("augment.provider", self.augment.provider),
                            ("augment.scenario.provider", self.augment.scenario.provider),
                            ("evaluate.judge_provider", self.evaluate.judge_provider)):
            if name not in names:
                raise ValueError(f"{where}: provider {name!r} is not defined in llm.providers {sorted(names)}")
        return self

    def dump_public(self) -> dict[str, Any]:
        """JSON-able config for manifests and cards (paths relative, no secrets: keys are never stored)."""
        data = self.model_dump(mode="json")
        data["paths"].pop("root", None)
        if data["llm"]["cache"] is None:  # unset: the same dump (and stage hashes) as before the key existed
            del data["llm"]["cache"]
        return data

    def section(self, dotted: str) -> Any:
        """One config section by dotted path (``dedup.embedder``), as public JSON (:meth:`dump_public`)."""
        node: Any = self.dump_public()
        for part in dotted.split("."):
            node = node[part]
        return node

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some config sections (dotted: ``dedup.embedder``): a manifest's ``config_hash``
        and the config part of a stage's key (``flows.stages.cache_inputs``)."""
        blob = json.dumps({s: self.section(s) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def hash(self) -> str:
        blob = json.dumps(self.dump_public(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _format_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"].startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
        if _is_date(e.get("input")):
            msg += f" (YAML read an unquoted date; quote it: {loc.rsplit('.', 1)[-1]}: '{e['input']}')"
        lines.append(f"{loc}: {msg}")
    return f"invalid configuration in {origin}: " + "; ".join(lines)


def _is_date(value: Any) -> bool:
    import datetime as dt

    return isinstance(value, (dt.date, dt.datetime))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_override(data: dict, dotted: str) -> None:
    key, sep, raw = dotted.partition("=")
    if not sep:
        raise ConfigError(f"override {dotted!r} must look like key.path=value")
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError):  # e.g. 2024-13-45 looks like a date to YAML and is not one
        node[parts[-1]] = raw


def profile_path(profile: str) -> Path:
    path = CONFIG_DIR / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {profile!r}; known profiles: {', '.join(known)}")
    return path


def load_config(path: str | Path | None = None, *, profile: str | None = None,
                overrides: list[str] | None = None, root: Path | None = None) -> Config:
    """Load and validate a configuration.

    ``path`` wins over ``profile``; with neither, the ``demo`` profile. A profile may name
    ``extends: <other profile>``. ``overrides`` are ``key.path=value`` strings (values parsed as YAML).
    ``root`` sets ``paths.root`` (tests point it at a temporary directory).
    """
    if path is None:
        path = profile_path(profile or "demo")
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a date-shaped value that is no date
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    seen = {path.resolve()}
    while "extends" in data:
        parent = profile_path(str(data.pop("extends")))
        if parent.resolve() in seen:
            raise ConfigError(f"config {path}: circular 'extends'")
        seen.add(parent.resolve())
        data = _deep_merge(yaml.safe_load(parent.read_text()) or {}, data)
    data.setdefault("profile", path.stem)
    for o in overrides or []:
        _apply_override(data, o)
    if root is not None:
        data.setdefault("paths", {})["root"] = str(root)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, str(path))) from None
