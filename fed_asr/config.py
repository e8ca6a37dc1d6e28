"""Typed experiment configuration and the single Hydra boundary.

Every setting has its default here; YAML files under ``configs/`` only override.
Library code below this module takes the narrowest dataclass it needs and never a
``DictConfig``. This is the only module of ``fed_asr`` that imports Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_asr.config_sections import (
    FederationConfig,
    PrivacyConfig,
    RegularizerConfig,
    SecurityConfig,
    SpectrumConfig,
    TrainConfig,
    check_choice,
    check_positive,
)
from fed_asr.tracking import TrackingConfig

__all__ = [
    "DataConfig",
    "EngineConfig",
    "ExperimentConfig",
    "FederationConfig",
    "LoraConfig",
    "MethodConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RegularizerConfig",
    "SecurityConfig",
    "SpectrumConfig",
    "TrackingConfig",
    "TrainConfig",
    "compose_config",
    "load_config",
    "to_experiment_config",
    "to_yaml",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SCHEMA_NAME = "fed_asr_schema"

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EngineConfig:
    """Where the run executes: one site (``central``) or Flower's simulation."""

    name: str = "simulation"

    def __post_init__(self) -> None:
        check_choice("engine.name", self.name, ("central", "simulation"))


@dataclass
class MethodConfig:
    """Continual-learning method and its own typed options.

    ``name`` picks a registered method (``fed_asr.methods``); ``options`` is that
    method's options dataclass (``configs/method/<name>.yaml`` selects it, so
    ``method.options.<field>=...`` overrides are checked against it).
    """

    name: str = "asr"
    options: Any = None

    def __post_init__(self) -> None:
        from fed_asr.methods import method_options

        try:  # checked here; kept as given (the schema's default must stay untyped)
            method_options(self.name, self.options)
        except KeyError as err:
            raise ValueError(f"`method.name`: {err.args[0]}") from None


# Images of the vision tower preparation (`ModelConfig.pretrain_vision_styles`)
VISION_STYLES: tuple[str, ...] = ("all", "base")


@dataclass
class ModelConfig:
    """Base MLLM: the built-in tiny LLaVA or a local checkpoint of a model family."""

    name: str = "tiny"
    path: str | None = None
    # registered model family (`fed_asr.models.family`); None = infer from the
    # checkpoint's config `model_type` (the tiny model is a `llava`)
    family: str | None = None
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
    # load the base weights in 4 bits (NF4, bitsandbytes; CUDA only)
    load_in_4bit: bool = False
    prompt_template: str = "{image} {question} answer :"
    # base-model preparation (tiny model only; `fed_asr.models.pretrain`):
    # "easyvqa" captions, "stream" = the stream's own caption/QA set (e.g. scenes),
    # "manifest" = the JSONL rows of `pretrain_manifest`
    pretrain_data: str = "easyvqa"
    pretrain_manifest: str | None = None
    pretrain_size: int = 2000
    pretrain_steps: int = 300
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    # multiplier of the initial query/key projection weights of both towers before
    # preparation (1 = the default init); > 1 sharpens the initial attention and gets
    # small models off the uniform-attention plateau sooner (`model=scenes_cpu`)
    pretrain_qk_init: float = 1.0
    # vision tower preparation before the above (`fed_asr.models.vision_pretrain`): the
    # tower learns to tell the attributes (colour, shape) of the labelled objects of
    # `pretrain_vision_size` stream images (`fed_asr.data.stream_objects`), the CPU
    # stand-in for a pre-trained vision encoder; it stays frozen afterwards, as LLaVA
    # keeps its CLIP frozen. 0 steps = none (the tower learns with everything else).
    pretrain_vision_steps: int = 0
    pretrain_vision_size: int = 4000
    pretrain_vision_lr: float = 1e-3
    # its images: "all" visual conditions of the stream (its stages' too, as a
    # pre-trained encoder has seen varied images) or "base", the preparation set's own
    # neutral conditions only (every stage's visual shift is then new to the tower)
    pretrain_vision_styles: str = "all"
    # seed of the whole tiny-base preparation (initial weights, the preparation sets'
    # subsets and order). Every run seed shares the base of one `pretrain_seed`, as
    # runs share one checkpoint; change it to repeat a study on other bases
    # (`base_fingerprint` in metrics.json tells the bases apart).
    pretrain_seed: int = 0

    def __post_init__(self) -> None:
        check_choice("model.name", self.name, ("tiny", "pretrained"))
        if self.name == "pretrained" and not self.path:
            raise ValueError("`model.path` is required when `model=pretrained`.")
        if self.family is not None:
            # Deferred: `fed_asr.models` imports this module.
            from fed_asr.models.family import model_family_names

            check_choice("model.family", self.family, model_family_names())
        check_choice("model.dtype", self.dtype, _DTYPES)
        check_choice("model.attn_capture", self.attn_capture, ("selective", "eager"))
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
        check_choice(
            "model.pretrain_data", self.pretrain_data, ("easyvqa", "manifest", "stream")
        )
        if self.pretrain_data == "manifest" and not self.pretrain_manifest:
            raise ValueError(
                "`model.pretrain_manifest` is required when "
                "`model.pretrain_data='manifest'`."
            )
        if self.pretrain_data != "manifest" and self.pretrain_manifest:
            import warnings

            warnings.warn(
                "`model.pretrain_manifest` specified but will be ignored when "
                f"`model.pretrain_data={self.pretrain_data!r}`.",
                stacklevel=2,
            )
        for name in (
            "pretrain_size",
            "pretrain_batch_size",
            "pretrain_lr",
            "pretrain_qk_init",
            "pretrain_vision_size",
            "pretrain_vision_lr",
        ):
            check_positive(f"model.{name}", getattr(self, name))
        check_choice(
            "model.pretrain_vision_styles", self.pretrain_vision_styles, VISION_STYLES
        )
        if self.name == "pretrained" and self.pretrain_vision_steps:
            raise ValueError(
                "`model.pretrain_vision_steps` prepares the built-in tiny model's "
                "vision tower; a pre-trained checkpoint's encoder is used as it is: "
                "set it to 0."
            )
        if self.name == "pretrained" and self.pretrain_seed:
            raise ValueError(
                "`model.pretrain_seed` seeds the built-in tiny model's preparation; "
                "a pre-trained checkpoint is loaded as it is: set it to 0."
            )
        for name in ("pretrain_steps", "pretrain_vision_steps", "pretrain_seed"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"`model.{name}` must be >= 0, got {getattr(self, name)}."
                )


# Where `lora.target_modules` are matched (fed_asr.models.lora.lora_target_modules)
LORA_SCOPES: tuple[str, ...] = ("language_model", "all")


@dataclass
class LoraConfig:
    """LoRA adapter shape (peft) and how the server aggregates it."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    aggregation: str = "fedavg"
    # Where target_modules are matched: `language_model` (its decoder layers only) or
    # `all` (the vision tower's identically named projections too)
    scope: str = "language_model"

    def __post_init__(self) -> None:
        check_positive("lora.r", self.r)
        check_choice("lora.scope", self.scope, LORA_SCOPES)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`lora.dropout` must be in [0, 1), got {self.dropout}.")
        if not self.target_modules:
            raise ValueError("`lora.target_modules` must name at least one module.")


@dataclass
class DataConfig:
    """Continual stream, picked by name from the registry (``fed_asr.data.streams``).

    ``stream`` is a registered stream (``ability``, ``domain``, ``manifest``,
    ``scenes``, or a plug-in). ``name`` is its data source (``easyvqa`` for
    ``ability``/``domain``) and follows the stream, except that naming a source of a
    single stream (``name=manifest``, ``name=scenes``) selects that stream, as
    ``name=manifest`` always did.
    """

    name: str = "easyvqa"
    root: str | None = None
    stream: str = "ability"
    stage_order: list[str] | None = None
    skills: list[str] | None = None
    max_train_per_stage: int | None = 1600
    max_test_per_stage: int | None = 300
    dirichlet_alpha: float = 0.5
    # what client shares are non-IID by: `answer` (label skew) or `skill` (a skill of a
    # stage sits mostly at a few clients; small alpha leaves some without it)
    partition_by: str = "answer"
    # generated streams (scenes) render their images under <cache_dir>/<stream>/
    cache_dir: str = "~/.cache/fed_asr"

    def __post_init__(self) -> None:
        # Deferred: the registry's modules import this one.
        from fed_asr.data.partition import check_partition_label
        from fed_asr.data.streams import STREAMS, stream_sources

        if self.stream not in STREAMS:
            raise ValueError(
                f"`data.stream` must be a registered stream, got {self.stream!r}. "
                f"Available: {sorted(STREAMS)}."
            )
        check_choice("data.name", self.name, stream_sources())
        of_name = [n for n, e in STREAMS.items() if e.source == self.name]
        if STREAMS[self.stream].source != self.name:
            if len(of_name) == 1:
                self.stream = of_name[0]
            else:
                self.name = STREAMS[self.stream].source
        if STREAMS[self.stream].needs_root and not self.root:
            raise ValueError(f"`data.root` is required when `data={self.stream}`.")
        check_positive("data.dirichlet_alpha", self.dirichlet_alpha)
        check_partition_label(self.partition_by)
        for name in ("max_train_per_stage", "max_test_per_stage"):
            value = getattr(self, name)
            if value is not None:
                check_positive(f"data.{name}", value)


def check_clear_statistics(method_name: str, privacy: PrivacyConfig) -> None:
    """Refuse a method whose stage-end statistics travel in clear text when the run
    asks for DP or secure aggregation: those protect only the skill spectrum, so the
    promise would not hold for the method's own statistics (e.g. EWC's Fisher)."""
    from fed_asr.methods import method_entry

    try:
        plan = method_entry(method_name).method_class.stage_end
    except KeyError:
        return  # `method.name` reports it
    for flag in ("dp", "secure_spectrum"):
        if plan.shared_statistics and getattr(privacy, flag):
            raise ValueError(
                f"`privacy.{flag}=true` protects only the skill spectrum, but "
                f"`method={method_name}` also sends stage-end statistics "
                f"{list(plan.shared_statistics)} in clear text; pick another method or "
                f"set `privacy.{flag}=false`."
            )


@dataclass
class ExperimentConfig:
    """Everything a run needs; composed by Hydra from ``configs/``."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    spectrum: SpectrumConfig = field(default_factory=SpectrumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    output_dir: str = "outputs/${engine.name}-${method.name}-${data.stream}-s${seed}"
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_clear_statistics(self.method.name, self.privacy)


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
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=ExperimentConfig)
    from fed_asr.methods import METHODS

    for name, entry in METHODS.items():  # typed `method.options` per method
        store.store(group="method/options", name=name, node=entry.options_class)
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
    """Build the config from a Flower run config (``config-name``, keys, ``overrides``).

    Parameters
    ----------
    run_config : Mapping[str, Any]
        Flower's ``context.run_config``: the common settings as run-config keys
        (``fed_asr.run_config.RUN_CONFIG_KEYS``) and ``overrides``, one shell-quoted
        string of Hydra overrides.

    Returns
    -------
    ExperimentConfig
        The validated configuration.
    """
    from fed_asr.run_config import run_config_overrides

    name = str(run_config.get("config-name", "config"))
    return compose_config(name, run_config_overrides(run_config))


def to_yaml(cfg: ExperimentConfig) -> str:
    """Render a config as YAML (saved next to every checkpoint)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
