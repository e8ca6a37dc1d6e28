"""``spectral_distill``: per-sample attention-spectrum distillation; nothing shared.

The previous stage's adapter (federated: the previous global adapter, which every
client already holds; ``fed_asr.methods.lwf``) is run on the current batch, and each
sample's spectral features of every captured layer-head (``fed_asr.spectral``, with
the ``regularizer`` conventions) are pulled to the teacher's features of the same
sample: ``attention_distill`` with ``match=spectrum`` and ``heads=each``, as a method
of its own name so that runs, outputs and studies name it.

Why it exists (docs/findings.md, "What carries the protection"): on easy-VQA
``ability`` the attention protection lives in per-sample, per-head targets. ASR's
per-skill statistics of the same features hold neither the maps nor the accuracy;
these per-sample targets hold both, and need nothing but the previous adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from fed_asr.methods.attention_distill import AttentionDistill, AttentionDistillOptions
from fed_asr.methods.registry import register_method


@dataclass
class SpectralDistillOptions(AttentionDistillOptions):
    """``attention_distill``'s options with per-head spectral targets by default."""

    match: str = "spectrum"
    heads: str = "each"


class SpectralDistill(AttentionDistill):
    """Distil every layer-head's spectral features of each sample (see module doc)."""


register_method("spectral_distill", SpectralDistill, SpectralDistillOptions)
