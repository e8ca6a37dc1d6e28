"""``joint``: each stage trains on the union of the stages seen so far."""

from __future__ import annotations

from collections.abc import Sequence

from fed_asr.data import Stage, VQASample
from fed_asr.methods.base import ContinualMethod, NoOptions
from fed_asr.methods.registry import register_method


class Joint(ContinualMethod):
    """Joint training: stage t trains on the union of this site's stages 0..t.

    The usual upper bound that still yields a full accuracy matrix (row t is scored
    after training on everything seen so far); it replays data, so it is not a
    continual method.
    """

    def training_samples(self, stages: Sequence[Stage], stage: int) -> list[VQASample]:
        """Training splits of stages ``0..stage``, in stage order."""
        return [s for seen in stages[: stage + 1] for s in seen.train]


register_method("joint", Joint, NoOptions)
