"""``attention_distill``: keep the previous stage's text-to-image attention maps.

A data-free bound for attention-preserving methods: LwF's teacher (the global adapter
at the end of the previous stage, ``fed_asr.methods.lwf``) is run on the *current*
batch, and the student's text-to-image attention maps of the last
``regularizer.l_sel`` layers are pulled to the teacher's, map by map (every sample,
layer and head), with KL(teacher || student). ASR keeps only per-skill spectral
statistics of such maps; this keeps the maps themselves. If it does not reduce
forgetting, no constraint on these maps computed from current data can.

``method.options.match=spectrum`` keeps, per sample, only what ASR keeps of each map:
its spectral descriptor (``fed_asr.spectral.describe`` with the ``regularizer``
conventions), pulled to the teacher's descriptor of the same sample. It separates
the two things ASR gives up against the map bound: the maps' phase (where the
attention sits; the power spectrum is invariant under shifts) and per-sample
targets (ASR has per-skill statistics only).

``method.options.match=coherence`` keeps, per sample, only where each map sits
relative to its image's content: the band coherences of ``fed_asr.coherence`` (how
the map lines up with the image's non-background pixels, per spatial scale), pulled
to the teacher's of the same sample.

``method.options.heads=each`` (with ``spectrum`` or ``coherence``) keeps those
features for every layer-head instead of ASR's mean and variance over the heads: it
asks whether what the maps carry is lost by reducing each map or by pooling the heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fed_asr.config_sections import DESCRIPTOR_FEATURES, HEAD_POOLING, check_choice
from fed_asr.descriptor_layout import describe_batch
from fed_asr.diagnostics import map_kl
from fed_asr.methods.base import StepContext, check_non_negative
from fed_asr.methods.lwf import TEACHER_ADAPTER, LwF, active_adapter
from fed_asr.methods.registry import register_method
from fed_asr.query_tokens import query_token_weights
from fed_asr.spectral import SpectralDescriptor, attention_maps, query_mean_attention

# "maps", or the per-sample features of a descriptor layout (fed_asr.descriptor_layout)
DISTILL_TARGETS = ("maps", *DESCRIPTOR_FEATURES)


@dataclass
class AttentionDistillOptions:
    """Options of ``attention_distill``: the weight of the map distillation."""

    weight: float = 1.0
    # Keep how much attention goes to the image at all: distil P + 1 bins (the image
    # cells unnormalised and the mass on every other key) instead of maps that sum to 1
    image_mass: bool = False
    # "maps": the maps themselves; "spectrum": each map's spectral descriptor only;
    # "coherence": each map's band coherences with its image's content only
    match: str = "maps"
    # for match=spectrum|coherence: "pooled" keeps the descriptor's mean and variance
    # over the layer-heads (ASR's layout); "each" keeps every layer-head's features
    heads: str = "pooled"

    def __post_init__(self) -> None:
        check_non_negative("weight", self.weight)
        check_choice("method.options.match", self.match, DISTILL_TARGETS)
        check_choice("method.options.heads", self.heads, HEAD_POOLING)
        if self.heads == "each" and self.match == "maps":
            raise ValueError(
                "method.options.heads applies to match=spectrum|coherence (the maps "
                "are always distilled head by head)"
            )
        if self.image_mass and self.match != "maps":
            raise ValueError(
                "method.options.image_mass applies to match=maps only "
                f"(got match={self.match!r})"
            )


def query_weighted_maps(attn: Tensor, token_weights: Tensor) -> Tensor:
    """(B, L, H, P) attention maps averaged over the weighted query rows, sum 1.

    ``fed_asr.spectral.attention_maps`` with the paper's normalisation; the cells'
    layout does not matter here, so the map is taken as one row of P cells.

    Parameters
    ----------
    attn : Tensor
        (B, L, H, Tq, P) text-to-image attention (a capture's ``attn``).
    token_weights : Tensor
        (B, Tq) non-negative query-row weights (``query_token_weights``).
    """
    b, n_layers, n_heads, _, p = attn.shape
    maps = attention_maps(attn, (1, p), token_weights)  # (B, J, 1, P)
    return maps.reshape(b, n_layers, n_heads, p)


def with_rest_mass(attn: Tensor, token_weights: Tensor) -> Tensor:
    """(B, L, H, P + 1): weighted image-cell attention plus the mass on other keys.

    ``attn`` holds the softmax probabilities over every key restricted to the image
    cells (``fed_asr.models.capture``), so a row sums to at most 1; the last bin is
    the rest (text tokens, other images).
    """
    b, n_layers, n_heads, _, p = attn.shape
    cells = query_mean_attention(attn, (1, p), token_weights)  # (B, J, P)
    cells = cells.reshape(b, n_layers, n_heads, p)
    rest = (1.0 - cells.sum(dim=-1, keepdim=True)).clamp_min(0.0)  # (B, L, H, 1)
    return torch.cat([cells, rest], dim=-1)


def map_distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over maps of KL(teacher || student) for (..., P) maps that sum to 1."""
    return map_kl(teacher, student).mean()


def spectral_distillation_loss(
    student: SpectralDescriptor, teacher: SpectralDescriptor, floor: float
) -> Tensor:
    """Mean standardised squared descriptor difference, student vs teacher per sample.

    Each of the D descriptor features is divided by its variance over the teacher's
    batch (at least ``floor``, the ``regularizer.cov_floor`` that ASR's prototypes use)
    so features on different scales weigh alike: the diagonal Mahalanobis distance of
    ``fed_asr.regularizer`` with the teacher's sample as the mean, averaged over D.
    """
    target = teacher.descriptor.detach()  # (B, D)
    scale = target.var(dim=0, unbiased=False).clamp_min(floor)  # (D,)
    return ((student.descriptor - target).square() / scale).mean()


class AttentionDistill(LwF):
    """Distil the previous adapter's attention maps on the current batch.

    Memory and teacher as in ``lwf`` (``keep_adapter``, a second peft adapter);
    penalty ``weight * mean KL(teacher map || student map)`` over the batch's
    samples and the selected layers' heads, maps weighted over the query tokens by
    ``regularizer.query_tokens``; with ``image_mass`` the maps keep their share of
    the attention (plus one bin for the rest) instead of summing to 1; with
    ``match=spectrum`` the maps' spectral descriptors instead
    (``spectral_distillation_loss``), with ``match=coherence`` their band coherences
    with the image's content (``fed_asr.coherence``); ``heads=each`` keeps those
    features for every layer-head instead of their mean and variance over heads.
    """

    needs_attention = True

    def __init__(self, options: AttentionDistillOptions, regularizer: Any) -> None:
        super().__init__(options, regularizer)  # type: ignore[arg-type]
        # match=spectrum|coherence: the regularizer's descriptor with the layout the
        # options name (not regularizer.features/heads, which are ASR's)
        self.feature_cfg = (
            None
            if options.match == "maps"
            else dataclasses.replace(
                regularizer, features=options.match, heads=options.heads
            )
        )

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """``attn``: weight * KL(teacher maps || student maps) (none in stage 0)."""
        if not self.has_teacher or self.options.weight == 0:
            return {}
        student = ctx.capture
        if student is None:
            raise ValueError("`attention_distill` needs the step's attention capture.")
        with torch.no_grad(), active_adapter(ctx.model, TEACHER_ADAPTER):
            teacher = ctx.forward(hidden=False)
        if self.feature_cfg is not None:
            loss = spectral_distillation_loss(
                describe_batch(student, ctx.batch, self.feature_cfg),
                describe_batch(teacher, ctx.batch, self.feature_cfg),
                self.reg_cfg.cov_floor,
            )
            return {"attn": self.options.weight * loss}
        weights = query_token_weights(
            student.query_mask,
            ctx.batch.get("function_mask"),
            self.reg_cfg.query_tokens,
        )
        as_maps = with_rest_mass if self.options.image_mass else query_weighted_maps
        loss = map_distillation_loss(
            as_maps(student.attn, weights), as_maps(teacher.attn, weights)
        )
        return {"attn": self.options.weight * loss}


register_method("attention_distill", AttentionDistill, AttentionDistillOptions)
