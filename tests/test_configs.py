"""Every YAML under configs/ composes into a valid ExperimentConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf.errors import ConfigKeyError, ValidationError

from fed_asr.config import (
    CONFIG_DIR,
    DataConfig,
    ExperimentConfig,
    FederationConfig,
    LoraSettings,
    ModelConfig,
    RegularizerConfig,
    SpectrumConfig,
    TrainConfig,
    compose_config,
    load_config,
)

GROUP_OPTIONS = sorted(
    (path.parent.name, path.stem) for path in CONFIG_DIR.glob("*/*.yaml")
)


def _required_overrides(group: str, option: str) -> list[str]:
    if (group, option) == ("data", "manifest"):
        return ["data.root=/tmp/manifest"]
    if (group, option) == ("model", "pretrained"):
        return ["model.path=/tmp/llava"]
    return []


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_compose_every_group_option_builds_experiment_config(
    group: str, option: str
) -> None:
    # Execute
    cfg = compose_config(
        "config", [f"{group}={option}", *_required_overrides(group, option)]
    )
    # Assert
    assert isinstance(cfg, ExperimentConfig)


def test_compose_default_config_gives_defaults() -> None:
    cfg = compose_config()
    assert cfg.engine.name == "simulation"
    assert cfg.method.name == "asr"
    assert cfg.output_dir == "outputs/simulation-asr-ability-s0"


def test_load_config_reads_flower_run_config_overrides() -> None:
    cfg = load_config(
        {"config-name": "config", "overrides": "method=vanilla 'data.stream=domain'"}
    )
    assert (cfg.method.name, cfg.data.stream) == ("vanilla", "domain")


def test_compose_misspelt_key_raises_naming_it() -> None:
    with pytest.raises(Exception, match="train.lrr"):
        compose_config("config", ["train.lrr=0.1"])


def test_compose_wrong_type_raises_validation_error() -> None:
    with pytest.raises(Exception, match="batch_size"):
        compose_config("config", ["train.batch_size=many"])


def test_structured_schema_rejects_unknown_key() -> None:
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(ExperimentConfig)
    with pytest.raises((ConfigKeyError, ValidationError)):
        OmegaConf.merge(schema, {"trian": {"lr": 1.0}})


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: ModelConfig(name="huge"), "model.name"),
        (lambda: ModelConfig(name="pretrained"), "model.path"),
        (lambda: ModelConfig(dtype="float8"), "model.dtype"),
        (lambda: ModelConfig(image_size=30, patch_size=4), "model.image_size"),
        (lambda: ModelConfig(prompt_template="{question}"), "prompt_template"),
        (lambda: ModelConfig(attn_capture="flash"), "attn_capture"),
        (lambda: LoraSettings(r=0), "lora.r"),
        (lambda: LoraSettings(dropout=1.5), "lora.dropout"),
        (lambda: LoraSettings(target_modules=[]), "target_modules"),
        (lambda: DataConfig(name="coco"), "data.name"),
        (lambda: DataConfig(stream="time"), "data.stream"),
        (lambda: DataConfig(name="manifest"), "data.root"),
        (lambda: DataConfig(dirichlet_alpha=0), "dirichlet_alpha"),
        (lambda: DataConfig(max_train_per_stage=0), "max_train_per_stage"),
        (lambda: RegularizerConfig(l_sel=0), "l_sel"),
        (lambda: RegularizerConfig(tau_skill=1.0), "tau_skill"),
        (lambda: RegularizerConfig(beta=-1), "beta"),
        (lambda: SpectrumConfig(blend="mix"), "spectrum.blend"),
        (lambda: SpectrumConfig(alpha=2.0), "spectrum.alpha"),
        (lambda: SpectrumConfig(trim_fraction=0.5), "trim_fraction"),
        (lambda: TrainConfig(lr=0), "train.lr"),
        (lambda: FederationConfig(num_clients=0), "num_clients"),
        (lambda: FederationConfig(fraction_train=0.0), "fraction_train"),
    ],
)
def test_post_init_rejects_bad_value_naming_field(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


def test_every_yaml_starts_with_a_purpose_comment() -> None:
    for path in Path(CONFIG_DIR).rglob("*.yaml"):
        assert path.read_text().startswith("#"), path
