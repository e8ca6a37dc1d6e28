"""``asr_local``: ASR against each client's own prototypes (nothing spectral shared)."""

from __future__ import annotations

from fed_asr.methods.asr import ASR
from fed_asr.methods.base import NoOptions, StageEndPlan
from fed_asr.methods.registry import register_method


class ASRLocal(ASR):
    """ASR against each client's own prototypes only (no global spectrum).

    At each stage end every client turns its statistics into its own spectrum,
    blended across stages like the server would, and keeps it in its node state;
    nothing spectral travels. Isolates the value of sharing the spectrum. In the
    central engine (one site) it equals ``asr``.
    """

    stage_end = StageEndPlan(spectrum="local")


register_method("asr_local", ASRLocal, NoOptions)
