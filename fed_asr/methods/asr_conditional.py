"""``asr_conditional``: ASR against per-skill prototypes conditioned on the image.

FedASR (``asr``) holds every sample of a skill to one shared prototype mean. Here
each skill's prototype mean is a linear function of the image's features under the
frozen base model (``fed_asr.conditional_prototypes``): the clients send additive
statistics (``G``, ``H``, ``Q``, ``n`` per skill), the server sums them, and every
client fits the same ridge prototypes from the sum. L_spec is the paper's (confidence
weight, Mahalanobis term, angular term against the global spectrum's angular
prototypes) with mu_s(x) = the skill's conditional mean for the sample's image and
var_s its residual variance. The geometry term is ASR's.

The statistics are second moments of image features: they travel like EWC's Fisher,
outside the secure-aggregation round and without DP noise, so ``privacy.dp`` and
``privacy.secure_spectrum`` refuse this method
(``fed_asr.config.check_clear_statistics``).
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fed_asr.conditional_prototypes import (
    ConditionalPrototype,
    add_sums,
    conditional_sums,
    fit_prototypes,
    image_features,
    skills_of,
    sums_reason,
)
from fed_asr.config import RegularizerConfig
from fed_asr.data import VQASample, skill_probabilities
from fed_asr.data.skills import skill_distribution
from fed_asr.methods.asr import ASR
from fed_asr.methods.base import (
    MethodMemory,
    StageEndPlan,
    StepContext,
    check_non_negative,
    preserve_requires_grad,
)
from fed_asr.methods.registry import register_method
from fed_asr.models import model_device
from fed_asr.models.capture import forward_with_attention
from fed_asr.models.device import move_batch
from fed_asr.regularizer import describe_capture, spec_terms
from fed_asr.spectrum import SkillSpectrum

CONDITIONAL = "conditional_spectrum"  # stage-end statistics and memory name


@dataclass
class ConditionalASROptions:
    """Options of ``asr_conditional``.

    ``ridge``: added to the diagonal of the image features' correlation matrix;
    ``layout``: the features include where the image's tokens carry their norm;
    ``batch_size``: samples per forward pass of the stage-end statistics.
    """

    ridge: float = 1.0
    layout: bool = True
    batch_size: int = 64

    def __post_init__(self) -> None:
        check_non_negative("ridge", self.ridge)
        if self.batch_size <= 0:
            raise ValueError(
                f"`method.options.batch_size` must be positive, got {self.batch_size}."
            )


class ConditionalASR(ASR):
    """ASR with per-skill prototype means conditioned on the image (module doc)."""

    stage_end = StageEndPlan(spectrum="shared", statistics=(CONDITIONAL,))

    def __init__(
        self, options: ConditionalASROptions, regularizer: RegularizerConfig
    ) -> None:
        if regularizer.spec_loss != "paper":
            raise ValueError(
                "`method=asr_conditional` uses the paper's L_spec; "
                f"`regularizer.spec_loss={regularizer.spec_loss}` is not supported."
            )
        super().__init__(options, regularizer)  # type: ignore[arg-type]
        self.options: ConditionalASROptions = options
        self.spectrum: SkillSpectrum | None = None
        self.prototypes: dict[str, ConditionalPrototype] = {}
        self.features: dict[Hashable, Tensor] = {}

    def configure_stage(self, spectrum: SkillSpectrum | None) -> None:
        """Keep the global spectrum: its skill order and angular prototypes."""
        super().configure_stage(spectrum)
        self.spectrum = spectrum

    def set_memory(self, model: Any, memory: MethodMemory) -> None:
        """Fit the conditional prototypes from the pooled statistics received."""
        self.prototypes = {}
        sums = memory.get(CONDITIONAL)
        if sums is None or self.spectrum is None:
            return
        fitted = fit_prototypes(
            sums, self.spectrum.skills, self.options.ridge, self.reg_cfg.cov_floor
        )
        device = model_device(model)
        self.prototypes = {s: p.to(device) for s, p in fitted.items()}

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """``spec``: beta * conditional L_spec; ``geo``: gamma * L_geo (as ``asr``)."""
        terms: dict[str, Tensor] = {}
        if self.beta > 0 and self.prototypes and self.spectrum is not None:
            capture = ctx.capture
            assert capture is not None, "asr_conditional needs the captured attention"
            desc = describe_capture(capture, ctx.batch, self.reg_cfg)
            terms["spec"] = self.beta * self._spec_loss(
                desc.descriptor.float(), desc.angular.float(), ctx
            )
        if self.gamma > 0:
            terms["geo"] = self.gamma * self._geometry(ctx)
        return terms

    def _spec_loss(self, x: Tensor, a: Tensor, ctx: StepContext) -> Tensor:
        """The paper's L_spec with per-sample prototype means (module doc)."""
        assert self.spectrum is not None
        names = [s for s in self.spectrum.skills if s in self.prototypes]
        if not names:
            return x.sum() * 0.0
        columns = [self.spectrum.skills.index(s) for s in names]
        phi = self._image_features(ctx).to(x.device)  # (B, F)
        protos = [self.prototypes[s] for s in names]
        mu = torch.stack([p.predict(phi) for p in protos], dim=1)  # (B, S', D)
        var = torch.stack([p.var for p in protos])  # (S', D)
        spec = self.spectrum.to(x.device, torch.float32)
        probs = ctx.skill_probs.float()[:, columns]  # (B, S')
        terms = spec_terms(x, a, mu, var, spec.angular[columns], probs, self.reg_cfg)
        return terms.paper_loss(self.reg_cfg)[0]

    def _image_features(self, ctx: StepContext) -> Tensor:
        """Base-model (adapters off) image features of the batch, cached per sample."""
        keys = list(ctx.sample_keys)
        if keys and len(keys) == ctx.batch["input_ids"].shape[0]:
            if all(k in self.features for k in keys):
                return torch.stack([self.features[k] for k in keys])
        with (
            torch.no_grad(),
            preserve_requires_grad(ctx.model),
            ctx.model.disable_adapter(),
        ):
            reference = ctx.forward(hidden=True)
        phi = image_features(reference.image_hidden, self.options.layout).cpu()
        if keys and len(keys) == len(phi):
            self.features.update(zip(keys, phi, strict=True))
        return phi

    def stage_end_statistics(
        self, name: str, model: Any, collator: Any, samples: Sequence[VQASample]
    ) -> tuple[dict[str, Tensor], int]:
        """``G, H, Q, n`` per skill of this site's stage data (module doc)."""
        sums: list[dict[str, Tensor]] = []
        device = model_device(model)
        model.eval()
        size = self.options.batch_size
        for start in range(0, len(samples), size):
            chunk = list(samples[start : start + size])
            batch = move_batch(collator(chunk), device)
            with torch.no_grad():
                capture = forward_with_attention(model, batch, self.reg_cfg.l_sel)
                with preserve_requires_grad(model), model.disable_adapter():
                    base = forward_with_attention(
                        model, batch, self.reg_cfg.l_sel, hidden=True
                    )
            desc = describe_capture(capture, batch, self.reg_cfg)
            phi = image_features(base.image_hidden, self.options.layout)
            sums.append(conditional_sums(phi, desc.descriptor, self._members(chunk)))
        return add_sums(sums), len(samples)

    def _members(self, chunk: Sequence[VQASample]) -> dict[str, Tensor]:
        """Skill -> (B,) membership p(s | question) > tau_skill, as ``SkillStats``."""
        names = sorted(
            {
                skill
                for sample in chunk
                for skill in (
                    [sample.skill]
                    if sample.skill is not None
                    else skill_distribution(sample.question)
                )
            }
        )
        probs = skill_probabilities(chunk, names)  # (B, S)
        member = probs > self.reg_cfg.tau_skill
        return {name: member[:, j] for j, name in enumerate(names)}

    def statistics_reason(
        self,
        name: str,
        sums: Mapping[str, Tensor],
        adapter_shapes: Mapping[str, tuple[int, ...]],
    ) -> str | None:
        """A valid set of per-skill sums (``sums_reason``), whatever the adapter."""
        return sums_reason(sums)

    def merge_statistics(
        self, name: str, parts: Sequence[tuple[Mapping[str, Tensor], int]]
    ) -> dict[str, Tensor] | None:
        """Sum the clients' statistics skill by skill (``add_sums``)."""
        return add_sums(sums for sums, count in parts if count > 0) or None

    def update_memory(
        self,
        memory: MethodMemory,
        adapter: Mapping[str, Tensor],
        merged: Mapping[str, dict[str, Tensor] | None],
    ) -> MethodMemory:
        """Pool each skill's statistics over every stage seen so far."""
        new = super().update_memory(memory, adapter, {})
        parts = [p for p in (memory.get(CONDITIONAL), merged.get(CONDITIONAL)) if p]
        if parts:
            new[CONDITIONAL] = add_sums(parts)
            fitted = fit_prototypes(
                new[CONDITIONAL],
                skills_of(new[CONDITIONAL]),
                self.options.ridge,
                self.reg_cfg.cov_floor,
            )
            shown = ", ".join(f"{s} {p.explained:.2f}" for s, p in fitted.items())
            print(
                "[fed-asr] asr_conditional: the image features explain "
                f"{shown} of the descriptor variance (in-sample)",
                file=sys.stderr,
                flush=True,
            )
        return new


register_method("asr_conditional", ConditionalASR, ConditionalASROptions)
