from pathlib import Path

import pytest

from datagen.config import CONFIG_DIR, ConfigError, load_config

PROFILES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("profile", PROFILES)
def test_every_shipped_profile_loads(profile):
    cfg = load_config(profile=profile)
    assert cfg.profile == profile
    assert cfg.hash() == load_config(profile=profile).hash()


def test_gpu_recipe_has_reference_hyperparameters():
    t = load_config(profile="llama32-3b-gpu").train
    assert (t.lora.r, t.lora.alpha, t.lora.dropout) == (16, 32, 0.05)
    assert set(t.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"}
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.max_grad_norm) == (2e-4, "cosine", 0.03, 1.0)
    assert t.per_device_batch_size * t.gradient_accumulation_steps == 32
    assert (t.max_length, t.epochs, t.quantization) == (2048, 3, "nf4")


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"augment\.scenario\.per_clustr: unknown key"):
        load_config(_write(tmp_path, "augment:\n  scenario:\n    per_clustr: 3\n"))


def test_bad_value_names_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lora\.r: Input should be greater than or equal to 1"):
        load_config(_write(tmp_path, "train:\n  lora:\n    r: 0\n"))


def test_undefined_provider_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"augment\.provider: provider 'nope' is not defined"):
        load_config(_write(tmp_path, "augment:\n  provider: nope\n"))


def test_overrides_and_unknown_profile():
    cfg = load_config(profile="demo", overrides=["augment.k=2", "split.ratios=[0.7, 0.15, 0.15]"])
    assert cfg.augment.k == 2 and cfg.split.ratios == (0.7, 0.15, 0.15)
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_config(profile="nope")


def test_public_dump_holds_no_secret(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-123")
    cfg = load_config(profile="llama32-3b-gpu")
    assert "sk-test-secret-123" not in str(cfg.dump_public())
    assert cfg.llm.providers["teacher"].api_key_env == "OPENAI_API_KEY"


# ----------------------------------------------------------------------------- values that make no sense (issue 11)
@pytest.mark.parametrize("override, message", [
    ("sources.market.risk_vol_thresholds=[0.4,0.2]",
     r"sources\.market: risk_vol_thresholds must be ordered low < high"),
    ("augment.length_ratio=[2.0,0.5]", r"augment: length_ratio must be ordered low < high"),
    ("augment.temperature=50", r"augment\.temperature: Input should be less than or equal to 1\.2"),
    ("evaluate.temperature=3", r"evaluate\.temperature: Input should be less than or equal to 2"),
    ("train.max_steps=-5", r"train\.max_steps: Input should be greater than or equal to -1"),
    ("train.max_steps=0", r"train\.max_steps: max_steps must be positive, or -1"),
    ("llm.providers.local.backoff_base_s=60", r"llm\.providers\.local: backoff_base_s \(60\.0\) must not exceed"),
    ("sources.market.simulator.start_date=2024-13-45", r"start_date: '2024-13-45' is not a date"),
    ("sources.market.start=yesterday", r"sources\.market: start: 'yesterday' is not a date"),
    ("split.k_range=[8,2]", r"split\.k_range: k_range must be ordered"),
])
def test_nonsense_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(profile="demo", overrides=[override])


def test_unquoted_yaml_date_gets_a_hint(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sources:\n  market:\n    start: 2024-01-02\n")
    with pytest.raises(ConfigError, match=r"sources\.market\.start: .*quote it: start: '2024-01-02'"):
        load_config(f)
    f.write_text("sources:\n  market:\n    start: '2024-01-02'\n")
    assert load_config(f).sources.market.start == "2024-01-02"


def test_a_temperature_above_the_retry_cap_is_refused_not_clipped(tmp_path):
    """What the configuration validates is what is sent: augment.temperature 1.5 was sent as 1.2."""
    from datagen.config import ConfigError

    with pytest.raises(ConfigError, match="augment.temperature"):
        load_config(profile="demo", root=tmp_path, overrides=["augment.temperature=1.5"])
    with pytest.raises(ConfigError, match="augment.scenario.temperature"):
        load_config(profile="demo", root=tmp_path, overrides=["augment.scenario.temperature=1.5"])
    assert load_config(profile="demo", root=tmp_path, overrides=["augment.temperature=1.2"]).augment.temperature == 1.2
