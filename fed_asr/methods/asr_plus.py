"""ASR plus another method's penalties: ``asr_lwf``, ``asr_spectral_distill`` and
their client-local twins ``asr_local_lwf``, ``asr_local_spectral_distill``.

Why they exist (docs/findings.md, "FedASR on top of LwF" and "FedASR with per-sample
spectral distillation"): wherever both were measured, a method that needs nothing
but the previous global adapter (LwF on the answers, ``spectral_distill`` on each
sample's per-head spectra) forgets less than FedASR. Run together, the pair
separates what each protects: ``asr_<x>`` - ``<x>`` is what the shared attention
spectrum adds on top of ``<x>``, and ``asr_<x>`` - ``asr_local_<x>`` what *sharing*
it adds there.

The loss is ``L_task + beta L_spec + gamma L_geo + <x>'s penalties``: ASR's terms
exactly as ``asr`` (settings from ``regularizer``) and the partner's exactly as the
partner alone (its options are the method's options). The stage end does both:
the spectrum (shared or local) and the previous global adapter the partner keeps.
A partner with stage-end statistics of its own (``ewc``) is refused: only the
adapter travels beside the spectrum.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fed_asr.config import RegularizerConfig
from fed_asr.methods.asr import ASR
from fed_asr.methods.base import (
    ContinualMethod,
    MethodMemory,
    NoOptions,
    SpectrumUse,
    StageEndPlan,
    StepContext,
)
from fed_asr.methods.lwf import LwF, LwFOptions
from fed_asr.methods.registry import register_method
from fed_asr.methods.spectral_distill import SpectralDistill, SpectralDistillOptions

# ContinualMethod hooks ASRPlus does not pass on to its partner
UNDELEGATED_HOOKS = (
    "configure_stage",
    "before_training",
    "training_samples",
    "optimizes",
)


class ASRPlus(ASR):
    """FedASR against the (global or own) spectrum plus a partner method's terms.

    The partner (``partner_class``, set by :func:`asr_plus`) is held by composition
    with the method's options; ASR's own state is inherited. Penalties are reported
    under their usual names (``spec``, ``geo``, then the partner's: ``lwf``,
    ``attn``).
    """

    partner_class: type[ContinualMethod] = LwF

    def __init__(self, options: Any, regularizer: RegularizerConfig) -> None:
        super().__init__(NoOptions(), regularizer)
        self.options = options
        self.partner = self.partner_class(options, regularizer)

    def set_memory(self, model: Any, memory: MethodMemory) -> None:
        """The partner's memory (its teacher adapter; none in stage 0)."""
        self.partner.set_memory(model, memory)

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """ASR's ``spec`` and ``geo`` terms, then the partner's."""
        terms = super().penalties(ctx)
        terms.update(self.partner.penalties(ctx))
        return terms


def asr_plus(partner: type[ContinualMethod], spectrum: SpectrumUse) -> type[ASRPlus]:
    """The class of ASR (``spectrum``: shared or local) plus ``partner``'s terms.

    Only the partner's ``set_memory`` and ``penalties`` are used, so a partner that
    overrides another hook (its own samples, trained weights or spectrum) is refused,
    as is one with stage-end statistics of its own.
    """
    if spectrum not in ("shared", "local"):
        raise ValueError(f"ASRPlus needs a shared or local spectrum, got {spectrum!r}.")
    overridden = [
        hook
        for hook in UNDELEGATED_HOOKS
        if getattr(partner, hook) is not getattr(ContinualMethod, hook)
    ]
    if overridden:
        raise ValueError(
            f"{partner.__name__} overrides {overridden}; ASRPlus delegates only "
            "set_memory and penalties to its partner."
        )
    plan = partner.stage_end
    if plan.statistics or plan.spectrum != "none":
        raise ValueError(
            f"{partner.__name__} has stage-end statistics of its own "
            f"({plan.statistics or plan.spectrum}); ASRPlus carries only the adapter."
        )
    name = f"{'Local' if spectrum == 'local' else ''}ASRPlus{partner.__name__}"
    return type(
        name,
        (ASRPlus,),
        {
            "partner_class": partner,
            "stage_end": StageEndPlan(
                spectrum=spectrum, keep_adapter=plan.keep_adapter
            ),
            "__doc__": f"ASR ({spectrum} spectrum) plus {partner.__name__}'s terms.",
            "__module__": __name__,
        },
    )


for _suffix, _partner, _options in (
    ("lwf", LwF, LwFOptions),
    ("spectral_distill", SpectralDistill, SpectralDistillOptions),
):
    for _prefix, _use in (("asr", "shared"), ("asr_local", "local")):
        _class = asr_plus(_partner, _use)
        globals()[_class.__name__] = _class  # importable by name (pickle, logs)
        register_method(f"{_prefix}_{_suffix}", _class, _options)
