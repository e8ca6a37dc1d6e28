"""Typed sections of the experiment config: regularizer, spectrum, training,
federation, privacy and security (re-exported by ``fed_asr.config``).

Defaults live here; YAML files under ``configs/`` only override. No Hydra here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fed_asr.config_checks import check_privacy, check_security


def check_positive(name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` > 0."""
    if value <= 0:
        raise ValueError(f"`{name}` must be positive, got {value}.")


# `regularizer.query_tokens` (fed_asr.query_tokens.query_token_weights)
QUERY_TOKEN_MODES: tuple[str, ...] = ("function_words", "prompt", "readout")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}, got {value!r}.")


# what ASR's per-skill statistics summarise (fed_asr.descriptor_layout)
DESCRIPTOR_FEATURES = ("spectrum", "coherence")
HEAD_POOLING = ("pooled", "each")
# which prototypes a training sample is held to (fed_asr.regularizer.route_samples)
SKILL_ROUTING = ("question", "nearest", "question_or_nearest")


@dataclass
class RegularizerConfig:
    """Attention-Spectrum Regularization (DESIGN section 2 defaults).

    The defaults follow the paper's code. Named variants keep this project's earlier
    choices (``docs/methods.md``):

    - ``descriptor``: ``"paper"`` keeps DC in the angular bins and the peak search,
      normalises maps by clamping their sum and bins with ``bucketize``; ``"ours"``
      excludes DC from both and adds an epsilon to every map cell;
    - ``query_tokens``: ``"function_words"`` weights the query tokens by a
      function-word mask (uniform over the prompt when a row has none); ``"prompt"``
      weights every prompt token after the image; ``"readout"`` only the prompt's
      last token (the one that predicts the answer);
    - ``sym_kl``: ``"mean"`` is 0.5 (KL(p||q) + KL(q||p)); ``"sum"`` drops the 1/2;
    - ``geometry``: ``"paper"`` compares the batch's B x B image-text cosine
      similarities of pooled embeddings (gamma 0.02, temperature 1); ``"token"`` the
      per-sample T x P token similarities (used with gamma 0.05, temperature 0.1);
    - ``spec_loss``: ``"paper"`` pulls descriptors to the prototype mean; ``"hinge"``
      only penalises d2 / D above 1 + ``hinge_margin``; ``"moment"`` matches the
      batch's per-skill mean and variance to the prototype's;
    - ``features``: ``"spectrum"`` (the maps' power-spectral features) or
      ``"coherence"`` (their band coherences with the image's content, where the
      attention sits relative to what the image shows; ``fed_asr.coherence``);
    - ``heads``: ``"pooled"`` keeps the features' mean and variance over the captured
      layer-heads; ``"each"`` every layer-head's features (D grows with the heads).
    - ``routing``: ``"question"`` (paper) holds a sample to the prototypes of the
      skills its question has probability on; ``"nearest"`` to the prototype nearest
      its descriptor, whatever the question; ``"question_or_nearest"`` uses the
      question where it names a skill with a prototype and the nearest prototype for
      every other sample (one-hot ``skill`` labels of a manifest whose stages bring
      new skills otherwise leave L_spec at zero).
    """

    l_sel: int = 4
    n_radial: int = 8
    n_angular: int = 8
    tau_skill: float = 0.2
    cov_floor: float = 1e-4
    lambda_ang: float = 0.1
    tau_mah: float = 1.0
    beta: float = 0.5
    gamma: float = 0.02
    geo_temperature: float = 1.0
    # reference rows of L_geo cached per sample (the base model is frozen); 0 = off
    geo_cache_entries: int = 20_000
    descriptor: str = "paper"
    query_tokens: str = "function_words"
    # None = the built-in English list (fed_asr.query_tokens.FUNCTION_WORDS)
    function_words: list[str] | None = None
    sym_kl: str = "mean"
    geometry: str = "paper"
    spec_loss: str = "paper"
    hinge_margin: float = 0.0
    features: str = "spectrum"
    heads: str = "pooled"
    routing: str = "question"

    def __post_init__(self) -> None:
        for name in (
            "l_sel",
            "n_radial",
            "n_angular",
            "cov_floor",
            "tau_mah",
            "geo_temperature",
        ):
            check_positive(f"regularizer.{name}", getattr(self, name))
        if not 0.0 <= self.tau_skill < 1.0:
            raise ValueError(
                f"`regularizer.tau_skill` must be in [0, 1), got {self.tau_skill}."
            )
        for name in (
            "beta",
            "gamma",
            "lambda_ang",
            "geo_cache_entries",
            "hinge_margin",
        ):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"`regularizer.{name}` must be >= 0, got {getattr(self, name)}."
                )
        check_choice("regularizer.descriptor", self.descriptor, ("paper", "ours"))
        check_choice("regularizer.query_tokens", self.query_tokens, QUERY_TOKEN_MODES)
        check_choice("regularizer.sym_kl", self.sym_kl, ("mean", "sum"))
        check_choice("regularizer.geometry", self.geometry, ("paper", "token"))
        check_choice(
            "regularizer.spec_loss", self.spec_loss, ("paper", "hinge", "moment")
        )
        check_choice("regularizer.features", self.features, DESCRIPTOR_FEATURES)
        check_choice("regularizer.heads", self.heads, HEAD_POOLING)
        check_choice("regularizer.routing", self.routing, SKILL_ROUTING)


@dataclass
class SpectrumConfig:
    """How the global skill spectrum is merged and blended across stages."""

    strategy: str = "pooled"
    weighted: bool = True
    trim_fraction: float = 0.2
    blend: str = "ema"
    alpha: float = 0.9

    def __post_init__(self) -> None:
        check_choice("spectrum.blend", self.blend, ("ema", "count", "replace"))
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
    # Mechanism diagnostics: spectral drift, grounding share (after each stage) and
    # gradient-norm ratios of the regularizer terms (every `log_every` steps)
    diagnostics: bool = True
    # torch CPU threads of the central engine, the ServerApp and each ClientApp,
    # under every launcher: the count changes results in their last bits
    torch_threads: int = 1

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "eval_batch_size",
            "lr",
            "epochs",
            "log_every",
            "torch_threads",
        ):
            check_positive(f"train.{name}", getattr(self, name))


@dataclass
class FederationConfig:
    """Federated schedule (simulation and deployment)."""

    num_clients: int = 4
    # Rounds of a stage: `fixed` runs `rounds_per_stage`; `plateau` runs at least
    # `rounds_per_stage` and at most `max_rounds_per_stage`, stopping once the pooled
    # training loss improved by less than `plateau_rel_delta` (relative) over the
    # last `plateau_patience` rounds; a stage stopped by the cap is flagged underfit.
    schedule: str = "plateau"
    rounds_per_stage: int = 2
    max_rounds_per_stage: int = 12
    plateau_rel_delta: float = 0.03
    plateau_patience: int = 1
    # Flower strategy aggregating the adapters (server.adapter_strategies) and its
    # keyword arguments, e.g. `+federation.strategy_options.eta=0.01` for fedadam
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_available_clients: int = 2
    local_epochs: int = 1
    # Ray's CPU reservation per ClientApp under `fed-asr engine=simulation`
    client_cpus: float = 1.0
    round_timeout_s: float | None = None
    keep_checkpoints: int = 2
    # Sites (data partition, collator, method) a ClientApp process keeps; the least
    # recently used one is dropped beyond this and rebuilt identically if served again
    site_cache_size: int = 8

    def __post_init__(self) -> None:
        for name in (
            "num_clients",
            "rounds_per_stage",
            "max_rounds_per_stage",
            "plateau_patience",
            "local_epochs",
            "keep_checkpoints",
            "site_cache_size",
        ):
            check_positive(f"federation.{name}", getattr(self, name))
        check_choice("federation.schedule", self.schedule, ("fixed", "plateau"))
        if self.max_rounds_per_stage < self.rounds_per_stage:
            raise ValueError(
                "`federation.max_rounds_per_stage` must be >= "
                f"`federation.rounds_per_stage` ({self.rounds_per_stage}), got "
                f"{self.max_rounds_per_stage}."
            )
        if self.plateau_rel_delta < 0:
            raise ValueError(
                "`federation.plateau_rel_delta` must be >= 0, got "
                f"{self.plateau_rel_delta}."
            )
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
    # DP of the adapters (with `dp`): each client clips its update (the change from
    # the global adapter it received) to L2 norm `adapter_clip` and adds Gaussian
    # noise calibrated to (`adapter_epsilon`, `dp_delta`) per round; the reported
    # `num-examples` is rounded down to a multiple of `num_examples_granularity`.
    adapter_clip: float = 1.0
    adapter_epsilon: float = 8.0
    num_examples_granularity: int = 16

    def __post_init__(self) -> None:
        check_privacy(self)


@dataclass
class SecurityConfig:
    """Signing of global state and validation of client replies."""

    sign: bool = False
    signing_key: str | None = None
    verify_key: str | None = None  # clients; a node's `verify-key` config wins
    hash_checkpoints: bool = True  # SHA-256 manifest per checkpoint, checked on resume
    max_update_norm: float = 1e3
    max_num_examples: int = 10_000_000
    # Poisoning (docs/security.md): caps where the server cannot know a site's data,
    # clipping relative to the round, DP noise bound, evaluation outliers
    max_num_examples_per_site: int | None = None  # deployment; None: max_num_examples
    max_example_share: float | None = None  # weight share cap per reply; None: off
    norm_bound_factor: float | None = 5.0  # x the median update (and statistics) norm
    stats_noise_sigmas: float = 10.0  # DP noise bound of clear statistics
    eval_outlier_z: float | None = 4.0  # robust z flagging a client's accuracy
    # Secure aggregation with site identities (docs/security.md section 1): this
    # site's Ed25519 identity key and the pinned list of every site's public key;
    # a node's `identity-key` / `site-keys` config wins. The server uses only
    # `site_keys`, to drop unsigned advertisements early.
    identity_key: str | None = None
    site_keys: str | None = None

    def __post_init__(self) -> None:
        check_security(self)
        _check_poisoning_bounds(self)
        _check_site_identity(self)


def _check_site_identity(cfg: SecurityConfig) -> None:
    """Raise ``ValueError`` naming a bad site-identity field of ``security``."""
    for name in ("identity_key", "site_keys"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(
                f"`security.{name}` must be a path or null, got {value!r}."
            )
    if cfg.identity_key is not None and cfg.site_keys is None:
        raise ValueError(
            f"`security.identity_key` is set ({cfg.identity_key!r}) but "
            "`security.site_keys` is not: a site identity needs the pinned site list."
        )


def _check_poisoning_bounds(cfg: SecurityConfig) -> None:
    """Raise ``ValueError`` naming the first bad poisoning bound of ``security``."""
    for name in ("max_num_examples_per_site", "norm_bound_factor", "eval_outlier_z"):
        value = getattr(cfg, name)
        if value is not None:
            check_positive(f"security.{name}", value)
    check_positive("security.stats_noise_sigmas", cfg.stats_noise_sigmas)
    share = cfg.max_example_share
    if share is not None and not 0.0 < share <= 1.0:
        raise ValueError(
            f"`security.max_example_share` must be in (0, 1], got {share}."
        )
