"""``asr``: Attention-Spectrum Regularization against the global skill spectrum."""

from __future__ import annotations

import torch
from torch import Tensor

from fed_asr.config import RegularizerConfig
from fed_asr.geometry import (
    batch_geometry_loss,
    cached_pooled_reference,
    geometry_loss_from_reference,
    pooled_embeddings,
    reference_log_similarity,
)
from fed_asr.methods.base import (
    ContinualMethod,
    NoOptions,
    StageEndPlan,
    StepContext,
    preserve_requires_grad,
)
from fed_asr.methods.registry import register_method
from fed_asr.reference_cache import ReferenceCache
from fed_asr.regularizer import ASRRegularizer, describe_capture
from fed_asr.spectrum import SkillSpectrum


class ASR(ContinualMethod):
    """Attention-Spectrum Regularization (ASR, arXiv 2606.23063).

    ``beta * L_spec`` against the skill spectrum received for the stage (0 while no
    prototype exists) and ``gamma * L_geo`` against the base model (adapters
    disabled). Settings come from ``regularizer``; clients send stage-end per-skill
    statistics and receive the merged global spectrum (``StageEndPlan.spectrum``).
    """

    stage_end = StageEndPlan(spectrum="shared")
    needs_attention = True
    needs_hidden = True

    def __init__(self, options: NoOptions, regularizer: RegularizerConfig) -> None:
        super().__init__(options, regularizer)
        self.regularizer = ASRRegularizer(regularizer, None)
        self.beta = regularizer.beta
        self.gamma = regularizer.gamma
        self.reference_cache = ReferenceCache(regularizer.geo_cache_entries)

    def configure_stage(self, spectrum: SkillSpectrum | None) -> None:
        """Use ``spectrum`` as prototypes; beta is 0 while none exists."""
        self.regularizer.set_spectrum(spectrum)
        self.beta = self.reg_cfg.beta
        if spectrum is None or not bool(spectrum.present.any()):
            self.beta = 0.0

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """``spec``: beta * L_spec; ``geo``: gamma * L_geo (reference: adapters off)."""
        capture = ctx.capture
        assert capture is not None, "ASR needs the captured attention"
        terms: dict[str, Tensor] = {}
        if self.beta > 0:
            desc = describe_capture(capture, ctx.batch, self.reg_cfg)
            terms["spec"] = self.beta * self.regularizer(desc, ctx.skill_probs).loss
        if self.gamma > 0:
            terms["geo"] = self.gamma * self._geometry(ctx)
        return terms

    def _geometry(self, ctx: StepContext) -> Tensor:
        """L_geo: the paper's pooled B x B term, or the token-level variant."""
        capture, cfg = ctx.capture, self.reg_cfg
        if cfg.geometry == "paper":
            current = pooled_embeddings(
                capture.image_hidden, capture.text_hidden, capture.query_mask
            )
            reference = cached_pooled_reference(
                self.reference_cache,
                list(ctx.sample_keys),
                lambda: self._pooled_reference(ctx),
                capture.query_mask.shape[0],
                capture.image_hidden.shape[-1],
                capture.image_hidden.device,
            )
            return batch_geometry_loss(
                *current, *reference, cfg.geo_temperature, cfg.sym_kl
            )
        return geometry_loss_from_reference(
            capture.image_hidden,
            capture.text_hidden,
            self._token_reference(ctx),
            capture.query_mask,
            cfg.geo_temperature,
            cfg.sym_kl,
        )

    def _pooled_reference(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """The base model's pooled image and text embeddings of the batch."""
        with (
            torch.no_grad(),
            preserve_requires_grad(ctx.model),
            ctx.model.disable_adapter(),
        ):
            reference = ctx.forward(hidden=True)
        return pooled_embeddings(
            reference.image_hidden, reference.text_hidden, ctx.capture.query_mask
        )

    def _token_reference(self, ctx: StepContext) -> Tensor:
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


register_method("asr", ASR, NoOptions)
