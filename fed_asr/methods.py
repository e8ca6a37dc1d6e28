"""Continual-learning methods: a registry of training-loss add-ons.

A method is a small object the local training loop asks for extra loss terms at every
step (``penalties``) and tells about stage boundaries. ``vanilla`` adds nothing; ``asr``
adds ``beta * L_spec + gamma * L_geo`` (DESIGN section 2). The baselines (``fedprox``,
``lwf``, ``ewc``, ``asr_local``, ``joint``) live in ``fed_asr.baselines`` and register
themselves here; ``docs/methods.md`` describes every method and what it sends.

Class flags tell the engines what a method needs:

- ``needs_attention`` / ``needs_hidden``: the step captures attention / hidden states;
- ``uses_spectrum``: the method regularises against a skill spectrum;
- ``shares_spectrum``: clients send stage-end statistics and receive the global one;
- ``keeps_local_spectrum``: each client keeps its own spectrum (never sent);
- ``needs_previous_adapter``: the global adapter at the end of the previous stage;
- ``needs_fisher``: a diagonal Fisher of the adapter, aggregated at stage ends;
- ``cumulative_data``: stage t trains on the union of stages 0..t.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fed_asr.config import MethodConfig, ModelConfig, RegularizerConfig
from fed_asr.data import Stage, VQASample
from fed_asr.reference_cache import ReferenceCache
from fed_asr.regularizer import (
    ASRRegularizer,
    geometry_loss_from_reference,
    reference_log_similarity,
)
from fed_asr.spectral import describe
from fed_asr.spectrum import SkillSpectrum


@contextmanager
def preserve_requires_grad(model: Any) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` flag on exit.

    peft's ``disable_adapter`` and ``set_adapter`` re-enable gradients of the active
    adapter on exit, which would unfreeze the A matrices of FFA-LoRA.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


@dataclass
class StepContext:
    """What one training step knows when a method computes its penalties."""

    model: Any
    batch: dict[str, Tensor]
    capture: Any | None
    skill_probs: Tensor
    forward: Callable[..., Any]
    sample_keys: Sequence[Hashable] = ()
    outputs: Any | None = None

    @property
    def logits(self) -> Tensor:
        """(B, S, V) logits of the step's (student) forward pass."""
        source = self.capture if self.capture is not None else self.outputs
        if source is None:
            raise ValueError("This step has neither a capture nor model outputs.")
        return source.logits


@dataclass
class StageMemory:
    """What a method remembers of earlier stages (adapter-state keys -> tensors).

    Attributes
    ----------
    previous : dict[str, Tensor] | None
        Global adapter at the end of the previous stage (LwF teacher, EWC anchor).
    fisher : dict[str, Tensor] | None
        Accumulated diagonal Fisher of the trainable adapter weights (EWC).
    """

    previous: dict[str, Tensor] | None = None
    fisher: dict[str, Tensor] | None = None


class ContinualMethod:
    """Base method (plain fine-tuning): no penalties.

    Subclasses set the class flags the engines read and override the hooks they
    need. Hooks, in the order an engine calls them for one stage (or round):
    ``configure_stage``, ``set_memory``, ``training_samples``, then ``train_stage``
    calls ``before_training`` once and ``penalties`` at every step.
    """

    needs_attention: ClassVar[bool] = False
    needs_hidden: ClassVar[bool] = False
    uses_spectrum: ClassVar[bool] = False
    shares_spectrum: ClassVar[bool] = False
    keeps_local_spectrum: ClassVar[bool] = False
    needs_previous_adapter: ClassVar[bool] = False
    needs_fisher: ClassVar[bool] = False
    cumulative_data: ClassVar[bool] = False

    def __init__(
        self, method: MethodConfig, regularizer: RegularizerConfig, model: ModelConfig
    ) -> None:
        self.method_cfg = method
        self.reg_cfg = regularizer
        self.model_cfg = model

    def configure_stage(
        self, spectrum: SkillSpectrum | None, beta: float | None, gamma: float | None
    ) -> None:
        """Set the spectrum and loss weights for the coming local training."""

    def set_memory(self, model: Any, memory: StageMemory) -> None:
        """Receive what is kept of earlier stages (empty in the first stage)."""

    def before_training(self, model: Any) -> None:
        """Called by ``train_stage`` with the received weights loaded, before step 1."""

    def training_samples(self, stages: Sequence[Stage], stage: int) -> list[VQASample]:
        """Training data of ``stage`` (the stage's own split; ``joint``: the union)."""
        return list(stages[stage].train)

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """Named, already weighted loss terms added to the task loss."""
        return {}

    @classmethod
    def stage_end_round(cls, stage: int, num_stages: int) -> bool:
        """Whether clients are queried at the end of ``stage`` (0-based).

        Always for methods that share the spectrum (the final spectrum is an output);
        before the last stage for methods that keep a local spectrum or need a Fisher.
        """
        if cls.shares_spectrum:
            return True
        return stage < num_stages - 1 and (cls.keeps_local_spectrum or cls.needs_fisher)


class Vanilla(ContinualMethod):
    """LoRA fine-tuning with the task loss only (the forgetting baseline)."""


class ASR(ContinualMethod):
    """Attention-Spectrum Regularization against a (global) skill spectrum."""

    needs_attention = True
    needs_hidden = True
    uses_spectrum = True
    shares_spectrum = True

    def __init__(
        self, method: MethodConfig, regularizer: RegularizerConfig, model: ModelConfig
    ) -> None:
        super().__init__(method, regularizer, model)
        self.regularizer = ASRRegularizer(regularizer, None)
        self.beta = regularizer.beta
        self.gamma = regularizer.gamma
        self.reference_cache = ReferenceCache(regularizer.geo_cache_entries)

    def configure_stage(
        self, spectrum: SkillSpectrum | None, beta: float | None, gamma: float | None
    ) -> None:
        """Use ``spectrum`` as prototypes; beta is forced to 0 while none exists."""
        self.regularizer.set_spectrum(spectrum)
        self.beta = self.reg_cfg.beta if beta is None else beta
        self.gamma = self.reg_cfg.gamma if gamma is None else gamma
        if spectrum is None or not bool(spectrum.present.any()):
            self.beta = 0.0

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """``spec``: beta * L_spec; ``geo``: gamma * L_geo (reference: adapters off)."""
        capture = ctx.capture
        assert capture is not None, "ASR needs the captured attention"
        terms: dict[str, Tensor] = {}
        if self.beta > 0:
            desc = describe(
                capture.attn,
                capture.grid,
                token_weights=capture.query_mask.to(capture.attn.dtype),
                n_radial=self.reg_cfg.n_radial,
                n_angular=self.reg_cfg.n_angular,
            )
            terms["spec"] = self.beta * self.regularizer(desc, ctx.skill_probs).loss
        if self.gamma > 0:
            terms["geo"] = self.gamma * geometry_loss_from_reference(
                capture.image_hidden,
                capture.text_hidden,
                self._reference(ctx),
                capture.query_mask,
                self.reg_cfg.geo_temperature,
            )
        return terms

    def _reference(self, ctx: StepContext) -> Tensor:
        """Reference log-similarities (B, T, P): cached per sample, else computed."""
        capture = ctx.capture
        mask = capture.query_mask.bool()
        keys = list(ctx.sample_keys)
        num_image = capture.image_hidden.shape[1]
        if len(keys) == mask.shape[0]:
            cached = self.reference_cache.lookup(keys, mask, num_image)
            if cached is not None:
                return cached
        with (
            torch.no_grad(),
            preserve_requires_grad(ctx.model),
            ctx.model.disable_adapter(),
        ):
            reference = ctx.forward(hidden=True)
            log_ref = reference_log_similarity(
                reference.image_hidden,
                reference.text_hidden,
                self.reg_cfg.geo_temperature,
            )
        if len(keys) == mask.shape[0]:
            self.reference_cache.store(keys, log_ref, mask)
        return log_ref


METHODS: dict[str, type[ContinualMethod]] = {}


def register_method(name: str, cls: type[ContinualMethod]) -> None:
    """Register a method class under a unique snake_case name."""
    if name in METHODS:
        raise KeyError(f"Method {name!r} is already registered.")
    METHODS[name] = cls


def build_method(
    method: MethodConfig, regularizer: RegularizerConfig, model: ModelConfig
) -> ContinualMethod:
    """Instantiate the method named by ``method.name``.

    Raises
    ------
    KeyError
        If the name is not registered; the message lists the choices.
    """
    if method.name not in METHODS:
        raise KeyError(f"Unknown method {method.name!r}. Available: {sorted(METHODS)}.")
    return METHODS[method.name](method, regularizer, model)


register_method("vanilla", Vanilla)
register_method("asr", ASR)

# The baselines register themselves on import (they subclass the classes above).
from fed_asr import baselines as _baselines  # noqa: E402, F401
