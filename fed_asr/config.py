"""Typed experiment configuration and the single Hydra boundary.

Every setting has its default here; YAML files under ``configs/`` only override.
Library code below this module takes the narrowest dataclass it needs and never a
``DictConfig``. This is the only module of ``fed_asr`` that imports Hydra.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SCHEMA_NAME = "fed_asr_schema"

_DTYPES = ("float32", "bfloat16", "float16")


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"`{name}` must be positive, got {value}.")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}, got {value!r}.")


@dataclass
class EngineConfig:
    """Where the run executes: one site (``central``) or Flower's simulation."""

    name: str = "simulation"

    def __post_init__(self) -> None:
        _check_choice("engine.name", self.name, ("central", "simulation"))


@dataclass
class MethodConfig:
    """Continual-learning method (see ``fed_asr.methods`` for the registry)."""

    name: str = "asr"
    fedprox_mu: float = 0.01
    lwf_weight: float = 1.0
    lwf_temperature: float = 2.0
    ewc_lambda: float = 100.0
    # EWC: Fisher accumulation across stages, F <- ewc_decay * F + F_new (1 = sum)
    ewc_decay: float = 1.0
    # EWC: samples per gradient when estimating the Fisher (1 = empirical Fisher)
    ewc_fisher_batch_size: int = 1


@dataclass
class ModelConfig:
    """Base MLLM: the built-in tiny LLaVA or a local LLaVA-family checkpoint."""

    name: str = "tiny"
    path: str | None = None
    cache_dir: str = "~/.cache/fed_asr"
    # tiny model architecture (ignored for `pretrained`)
    image_size: int = 32
    patch_size: int = 4
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden_size: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate_size: int = 256
    # runtime
    dtype: str = "float32"
    device: str = "auto"
    attn_capture: str = "selective"
    prompt_template: str = "{image} {question} answer :"
    # base-model preparation (tiny model only): caption pre-training
    pretrain_steps: int = 300
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3

    def __post_init__(self) -> None:
        _check_choice("model.name", self.name, ("tiny", "pretrained"))
        if self.name == "pretrained" and not self.path:
            raise ValueError("`model.path` is required when `model=pretrained`.")
        _check_choice("model.dtype", self.dtype, _DTYPES)
        _check_choice("model.attn_capture", self.attn_capture, ("selective", "eager"))
        if self.image_size % self.patch_size:
            raise ValueError(
                f"`model.image_size` ({self.image_size}) must be a multiple of "
                f"`model.patch_size` ({self.patch_size})."
            )
        if "{question}" not in self.prompt_template or (
            "{image}" not in self.prompt_template
        ):
            raise ValueError(
                "`model.prompt_template` must contain `{image}` and `{question}`, "
                f"got {self.prompt_template!r}."
            )


@dataclass
class LoraSettings:
    """LoRA adapter shape (peft) and how the server aggregates it."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    aggregation: str = "fedavg"

    def __post_init__(self) -> None:
        _check_positive("lora.r", self.r)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`lora.dropout` must be in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise ValueError("`lora.target_modules` must name at least one module.")


@dataclass
class DataConfig:
    """Continual stream: easy-VQA (``ability``/``domain``) or a JSONL manifest."""

    name: str = "easyvqa"
    root: str | None = None
    stream: str = "ability"
    stage_order: list[str] | None = None
    skills: list[str] | None = None
    max_train_per_stage: int | None = 1600
    max_test_per_stage: int | None = 300
    dirichlet_alpha: float = 0.5

    def __post_init__(self) -> None:
        _check_choice("data.name", self.name, ("easyvqa", "manifest"))
        _check_choice("data.stream", self.stream, ("ability", "domain"))
        if self.name == "manifest" and not self.root:
            raise ValueError("`data.root` is required when `data=manifest`.")
        _check_positive("data.dirichlet_alpha", self.dirichlet_alpha)
        for name in ("max_train_per_stage", "max_test_per_stage"):
            value = getattr(self, name)
            if value is not None:
                _check_positive(f"data.{name}", value)


@dataclass
class RegularizerConfig:
    """Attention-Spectrum Regularization (DESIGN section 2 defaults)."""

    l_sel: int = 4
    n_radial: int = 8
    n_angular: int = 8
    tau_skill: float = 0.2
    cov_floor: float = 1e-4
    lambda_ang: float = 0.1
    tau_mah: float = 1.0
    beta: float = 0.5
    gamma: float = 0.05
    geo_temperature: float = 0.1
    # reference rows of L_geo cached per sample (the base model is frozen); 0 = off
    geo_cache_entries: int = 20_000

    def __post_init__(self) -> None:
        for name in ("l_sel", "n_radial", "n_angular", "cov_floor", "tau_mah"):
            _check_positive(f"regularizer.{name}", getattr(self, name))
        if not 0.0 <= self.tau_skill < 1.0:
            raise ValueError(
                f"`regularizer.tau_skill` must be in [0, 1), got {self.tau_skill}."
            )
        for name in ("beta", "gamma", "lambda_ang", "geo_cache_entries"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"`regularizer.{name}` must be >= 0, got {getattr(self, name)}."
                )


@dataclass
class SpectrumConfig:
    """How the global skill spectrum is merged and blended across stages."""

    strategy: str = "pooled"
    weighted: bool = True
    trim_fraction: float = 0.2
    blend: str = "ema"
    alpha: float = 0.9

    def __post_init__(self) -> None:
        _check_choice("spectrum.blend", self.blend, ("ema", "count", "replace"))
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"`spectrum.alpha` must be in [0, 1], got {self.alpha}.")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(
                "`spectrum.trim_fraction` must be in [0, 0.5), "
                f"got {self.trim_fraction}."
            )


@dataclass
class TrainConfig:
    """Local optimisation of one stage."""

    batch_size: int = 32
    eval_batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    epochs: int = 2
    max_steps_per_stage: int | None = None
    grad_clip: float = 1.0
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "lr", "epochs", "log_every"):
            _check_positive(f"train.{name}", getattr(self, name))


@dataclass
class FederationConfig:
    """Federated schedule (simulation and deployment)."""

    num_clients: int = 4
    rounds_per_stage: int = 2
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_available_clients: int = 2
    local_epochs: int = 1
    client_cpus: float = 1.0
    round_timeout_s: float | None = None
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for name in (
            "num_clients",
            "rounds_per_stage",
            "local_epochs",
            "keep_checkpoints",
        ):
            _check_positive(f"federation.{name}", getattr(self, name))
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"`federation.{name}` must be in (0, 1], got {value}.")


@dataclass
class PrivacyConfig:
    """Secure aggregation and differential privacy of the spectrum statistics."""

    secure_spectrum: bool = False
    secagg_bits: int = 62
    secagg_scale: float = 2.0**24
    secagg_threshold: float = 0.6
    dp: bool = False
    dp_epsilon: float = 8.0
    dp_delta: float = 1e-5
    dp_clip: float = 10.0
    # Seed of the DP noise (reproducible experiments); None draws it from the OS,
    # as a deployment must: anyone who knows the seed can subtract the noise.
    dp_seed: int | None = None


@dataclass
class SecurityConfig:
    """Signing of global state and validation of client replies."""

    sign: bool = False
    signing_key: str | None = None
    verify_key: str | None = None  # clients; a node's `verify-key` config wins
    hash_checkpoints: bool = True  # SHA-256 manifest per checkpoint, checked on resume
    max_update_norm: float = 1e3
    max_num_examples: int = 10_000_000


@dataclass
class ExperimentConfig:
    """Everything a run needs; composed by Hydra from ``configs/``."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    spectrum: SpectrumConfig = field(default_factory=SpectrumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    seed: int = 0
    output_dir: str = "outputs/${engine.name}-${method.name}-${data.stream}-s${seed}"
    resume: bool = False
    progress: bool = True


def compose_config(
    config_name: str = "config", overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra overrides into a typed config.

    Parameters
    ----------
    config_name : str
        Name of the primary config under ``configs/``.
    overrides : Sequence[str]
        Hydra override strings, e.g. ``["method=vanilla", "data.stream=domain"]``.

    Returns
    -------
    ExperimentConfig
        The validated configuration (``__post_init__`` checks have run).

    Raises
    ------
    omegaconf.errors.ConfigKeyError
        A misspelt key.
    omegaconf.errors.ValidationError
        A value of the wrong type.
    ValueError
        A value outside its allowed range.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    # The typed schema is the base of configs/config.yaml, so every dataclass field
    # can be overridden and a misspelt one is refused at composition.
    ConfigStore.instance().store(name=SCHEMA_NAME, node=ExperimentConfig)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name, overrides=list(overrides))
    return to_experiment_config(cfg)


def to_experiment_config(cfg: Any) -> ExperimentConfig:
    """Merge a composed ``DictConfig`` onto the schema and build the dataclasses."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), cfg)
    result = OmegaConf.to_object(merged)
    assert isinstance(result, ExperimentConfig)
    return result


def load_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """Build the config from a Flower run config (``config-name`` and ``overrides``).

    Parameters
    ----------
    run_config : Mapping[str, Any]
        Flower's ``context.run_config``; ``overrides`` is one shell-quoted string.

    Returns
    -------
    ExperimentConfig
        The validated configuration.
    """
    name = str(run_config.get("config-name", "config"))
    overrides = shlex.split(str(run_config.get("overrides", "")))
    return compose_config(name, overrides)


def to_yaml(cfg: ExperimentConfig) -> str:
    """Render a config as YAML (saved next to every checkpoint)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
