"""Continual-learning methods: a registry of training-loss add-ons.

A method is a small object the local training loop asks for extra loss terms at every
step (``penalties``) and tells about stage boundaries. ``vanilla`` adds nothing; ``asr``
adds ``beta * L_spec + gamma * L_geo`` (DESIGN section 2).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fed_asr.config import MethodConfig, ModelConfig, RegularizerConfig
from fed_asr.reference_cache import ReferenceCache
from fed_asr.regularizer import (
    ASRRegularizer,
    geometry_loss_from_reference,
    reference_log_similarity,
)
from fed_asr.spectral import describe
from fed_asr.spectrum import SkillSpectrum


@dataclass
class StepContext:
    """What one training step knows when a method computes its penalties."""

    model: Any
    batch: dict[str, Tensor]
    capture: Any | None
    skill_probs: Tensor
    forward: Callable[..., Any]
    sample_keys: Sequence[Hashable] = ()


class ContinualMethod:
    """Base method (plain fine-tuning): no penalties.

    Subclasses set the class flags the training loop reads and override the hooks
    they need.
    """

    needs_attention: bool = False
    needs_hidden: bool = False
    uses_spectrum: bool = False
    shares_spectrum: bool = False

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

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """Named, already weighted loss terms added to the task loss."""
        return {}


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
        with torch.no_grad(), ctx.model.disable_adapter():
            reference = ctx.forward(hidden=True)
            log_ref = reference_log_similarity(
                reference.image_hidden, reference.text_hidden, self.reg_cfg.geo_temperature
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
        raise KeyError(
            f"Unknown method {method.name!r}. Available: {sorted(METHODS)}."
        )
    return METHODS[method.name](method, regularizer, model)


register_method("vanilla", Vanilla)
register_method("asr", ASR)
