"""``asr_lwf`` / ``asr_local_lwf``: ASR's attention terms plus LwF's distillation.

Why it exists (docs/findings.md, "FedASR on top of LwF"): wherever both were measured,
the forgetting that remains under any attention constraint sits in the answers, which
only output distillation (``lwf``) holds. Run together, the two separate what each
protects: ``asr_lwf`` - ``lwf`` is what the shared attention spectrum adds once the
readout is held, and ``asr_lwf`` - ``asr_local_lwf`` what sharing it adds there.

The loss is ``L_task + beta L_spec + gamma L_geo + weight T^2 KL(teacher || student)``:
ASR's terms exactly as ``asr`` (settings from ``regularizer``) and LwF's exactly as
``lwf`` (options ``weight``, ``temperature``). The stage end does both: the spectrum
(shared or local) and the previous global adapter kept as LwF's teacher.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fed_asr.config import RegularizerConfig
from fed_asr.methods.asr import ASR
from fed_asr.methods.base import MethodMemory, NoOptions, StageEndPlan, StepContext
from fed_asr.methods.lwf import LwF, LwFOptions
from fed_asr.methods.registry import register_method


class ASRWithLwF(ASR):
    """FedASR against the global spectrum plus LwF on the previous global adapter.

    The LwF part is a :class:`~fed_asr.methods.lwf.LwF` held by composition (its
    teacher adapter and memory); ASR's own state is inherited. Penalties are reported
    under their usual names (``spec``, ``geo``, ``lwf``).
    """

    stage_end = StageEndPlan(spectrum="shared", keep_adapter=True)

    def __init__(self, options: LwFOptions, regularizer: RegularizerConfig) -> None:
        super().__init__(NoOptions(), regularizer)
        self.options = options
        self.lwf = LwF(options, regularizer)

    def set_memory(self, model: Any, memory: MethodMemory) -> None:
        """Load the previous global adapter as LwF's teacher (none in stage 0)."""
        self.lwf.set_memory(model, memory)

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """ASR's ``spec`` and ``geo`` terms, then LwF's ``lwf`` term."""
        terms = super().penalties(ctx)
        terms.update(self.lwf.penalties(ctx))
        return terms


class LocalASRWithLwF(ASRWithLwF):
    """``asr_lwf`` against each client's own prototypes (as ``asr_local``)."""

    stage_end = StageEndPlan(spectrum="local", keep_adapter=True)


register_method("asr_lwf", ASRWithLwF, LwFOptions)
register_method("asr_local_lwf", LocalASRWithLwF, LwFOptions)
