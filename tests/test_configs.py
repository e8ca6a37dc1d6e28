"""Every YAML under configs/ composes into a valid ExperimentConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from fed_asr.config import (
    CONFIG_DIR,
    DataConfig,
    ExperimentConfig,
    FederationConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    RegularizerConfig,
    SpectrumConfig,
    TrainConfig,
    compose_config,
    load_config,
)
from fed_asr.methods.lwf import LwFOptions

GROUP_OPTIONS = sorted(
    (path.parent.name, path.stem) for path in CONFIG_DIR.glob("*/*.yaml")
)
# Mandatory (``???``) fields of some options, with a value to fill them.
REQUIRED_VALUES = {
    ("data", "manifest"): {"root": "/tmp/manifest"},
    ("model", "pretrained"): {"path": "/tmp/llava"},
    ("model", "paligemma"): {"path": "/tmp/paligemma"},
    ("model", "qwen2_vl"): {"path": "/tmp/qwen2-vl"},
    ("model", "idefics3"): {"path": "/tmp/idefics3"},
    ("model", "llava_onevision"): {"path": "/tmp/llava-onevision"},
}
# Groups whose option file is named after the registered choice it selects.
NAMED_BY_STEM = ("engine", "method")


def _yaml_settings(group: str, option: str) -> dict[str, Any]:
    """Top-level settings of ``configs/<group>/<option>.yaml``, without ``defaults``."""
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"))
    assert isinstance(raw, dict)
    settings = {key: value for key, value in raw.items() if key != "defaults"}
    return {**settings, **REQUIRED_VALUES.get((group, option), {})}


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_compose_every_group_option_sets_its_yaml_values(
    group: str, option: str
) -> None:
    # Prepare
    expected = _yaml_settings(group, option)
    required = REQUIRED_VALUES.get((group, option), {})
    overrides = [f"{group}={option}"]
    overrides += [f"{group}.{key}={value}" for key, value in required.items()]
    # Execute
    cfg = compose_config("config", overrides)
    # Assert
    assert isinstance(cfg, ExperimentConfig)
    section = getattr(cfg, group)
    if group in NAMED_BY_STEM:
        assert section.name == option
    for key, value in expected.items():
        assert getattr(section, key) == value, f"{group}.{key}"


def test_compose_default_config_gives_defaults() -> None:
    cfg = compose_config()
    assert cfg.engine.name == "simulation"
    assert cfg.method.name == "asr"
    assert cfg.output_dir == "outputs/simulation-asr-ability-s0"


def test_qk_shape_color_preset_sets_the_regime_and_keeps_overrides() -> None:
    # Execute
    preset = compose_config("qk_shape_color")
    vanilla = load_config(
        {"config-name": "qk_shape_color", "overrides": "method=vanilla"}
    )

    # Assert
    assert (preset.model.name, preset.model.pretrain_vision_steps) == ("tiny", 2000)
    assert preset.lora.target_modules == ["q_proj", "k_proj"]
    assert (preset.data.stream, preset.data.stage_order) == (
        "ability",
        ["shape", "color"],
    )
    assert preset.method.name == "asr" and preset.engine.name == "simulation"
    assert preset.output_dir == "outputs/simulation-asr-qk_shape_color-s0"
    assert vanilla.method.name == "vanilla"
    assert vanilla.lora.target_modules == ["q_proj", "k_proj"]


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


def test_compose_method_options_reach_the_typed_dataclass() -> None:
    # Execute
    cfg = compose_config("config", ["method=lwf", "method.options.temperature=3"])
    # Assert
    assert cfg.method.options == LwFOptions(weight=1.0, temperature=3.0)


def test_compose_unknown_method_option_raises_naming_it() -> None:
    with pytest.raises(Exception, match=r"method\.options\.bogus"):
        compose_config("config", ["method=ewc", "method.options.bogus=1"])


def test_method_config_unknown_option_raises_naming_it_and_the_options() -> None:
    with pytest.raises(
        ValueError,
        match=r"`method.options.bogus` is not an option of method 'ewc'. "
        r"Options: \['decay', 'ewc_lambda', 'fisher_batch_size'\]",
    ):
        MethodConfig(name="ewc", options={"bogus": 1})


def test_compose_method_option_out_of_range_raises_naming_it() -> None:
    with pytest.raises(ValueError, match=r"`method.options.mu` must be >= 0, got -1"):
        compose_config("config", ["method=fedprox", "method.options.mu=-1"])


def test_compose_unknown_method_name_raises_listing_choices() -> None:
    with pytest.raises(
        ValueError,
        match=r"`method.name`: Unknown method 'bogus'. Available: "
        r"\[.*'asr'.*'ewc'.*'lwf'.*'vanilla'\]",
    ):
        compose_config("config", ["method.name=bogus"])


def test_structured_schema_rejects_unknown_key() -> None:
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
        (lambda: LoraConfig(r=0), "lora.r"),
        (lambda: LoraConfig(dropout=1.5), "lora.dropout"),
        (lambda: LoraConfig(target_modules=[]), "target_modules"),
        (lambda: DataConfig(name="coco"), "data.name"),
        (lambda: DataConfig(stream="time"), "data.stream"),
        (lambda: DataConfig(name="manifest"), "data.root"),
        (lambda: DataConfig(dirichlet_alpha=0), "dirichlet_alpha"),
        (lambda: DataConfig(partition_by="client"), "data.partition_by"),
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
        (lambda: TrainConfig(torch_threads=0), "train.torch_threads"),
    ],
)
def test_post_init_rejects_bad_value_naming_field(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


def test_every_yaml_starts_with_a_purpose_comment() -> None:
    for path in Path(CONFIG_DIR).rglob("*.yaml"):
        assert path.read_text().startswith("#"), path
