"""The method interface: per-step penalties, stage-end needs as data, memory.

A continual-learning method is one module under ``fed_asr.methods`` with a class
derived from :class:`ContinualMethod` and a typed options dataclass, registered
together with ``register_method`` (the model is peft's ``register_peft_method``).
Engines never read ad-hoc flags: what a method needs at a stage end is declared in
its :class:`StageEndPlan`, and both engines execute that plan through
``fed_asr.schedule``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor

from fed_asr.config import RegularizerConfig
from fed_asr.data import Stage, VQASample
from fed_asr.models.lora import ADAPTER_NAME
from fed_asr.spectrum import SkillSpectrum

# Named groups of tensors a method keeps across stages (adapter-state keys -> tensor).
# ``previous`` is the global adapter at the end of the previous stage.
MethodMemory = dict[str, dict[str, Tensor]]
PREVIOUS_ADAPTER = "previous"

SpectrumUse = Literal["none", "shared", "local"]
StatisticsScope = Literal["shared", "local"]


@dataclass(frozen=True)
class StageEndPlan:
    """What a method needs when a stage ends, as data the engines execute.

    Attributes
    ----------
    spectrum : {"none", "shared", "local"}
        ``shared``: clients send per-skill statistics, the server merges them into
        the global spectrum that later train messages carry (FedASR); ``local``: each
        client turns its statistics into its own spectrum and keeps it (never sent);
        ``none``: no spectrum.
    statistics : tuple[str, ...]
        Other stage-end statistics: each client computes
        ``method.stage_end_statistics(name, ...)`` on its stage data, the server
        merges them with ``method.merge_statistics`` and the result joins the
        method's memory, sent with every later train message.
    statistics_scope : {"shared", "local"}
        ``shared``: the above. ``local``: each client merges its own ``statistics``
        (``merge_statistics`` over its one part), folds them into the memory it keeps
        in its node state with ``update_memory``, and adds them to the memory of every
        later train message; they never leave the node (``ewc_local``). The central
        engine has one site, where both scopes are the same.
    keep_adapter : bool
        Keep the stage-end global adapter in memory as ``previous``.
    """

    spectrum: SpectrumUse = "none"
    statistics: tuple[str, ...] = ()
    keep_adapter: bool = False
    statistics_scope: StatisticsScope = "shared"

    def __post_init__(self) -> None:
        if self.spectrum not in ("none", "shared", "local"):
            raise ValueError(
                "`StageEndPlan.spectrum` must be one of ['local', 'none', 'shared'], "
                f"got {self.spectrum!r}."
            )
        if self.statistics_scope not in ("shared", "local"):
            raise ValueError(
                "`StageEndPlan.statistics_scope` must be one of ['local', 'shared'], "
                f"got {self.statistics_scope!r}."
            )

    @property
    def shared_statistics(self) -> tuple[str, ...]:
        """The statistics clients send and the server merges."""
        return self.statistics if self.statistics_scope == "shared" else ()

    @property
    def local_statistics(self) -> tuple[str, ...]:
        """The statistics each client keeps to itself."""
        return self.statistics if self.statistics_scope == "local" else ()

    def is_needed(self, stage: int, num_stages: int) -> bool:
        """Whether anything happens at the end of ``stage`` (0-based).

        A shared spectrum is merged after every stage (the final one is an output);
        everything else only serves later stages.
        """
        if self.spectrum == "shared":
            return True
        if stage >= num_stages - 1:
            return False
        return self.spectrum == "local" or bool(self.statistics) or self.keep_adapter

    def queries_clients(self, stage: int, num_stages: int) -> bool:
        """Whether the stage end needs a round of client work."""
        return self.is_needed(stage, num_stages) and (
            self.spectrum != "none" or bool(self.statistics)
        )


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


@dataclass(frozen=True)
class NoOptions:
    """Options of a method that has none."""


class ContinualMethod:
    """Plain fine-tuning: no penalties, nothing at stage ends.

    Hooks, in the order an engine calls them for one stage (or round):
    ``configure_stage``, ``set_memory``, ``training_samples``, then ``train_stage``
    calls ``before_training`` once and ``penalties`` at every step. At a stage end
    the engine executes ``stage_end`` (``stage_end_statistics`` on clients,
    ``merge_statistics`` and ``update_memory`` on the server).

    Parameters
    ----------
    options : Any
        The method's own options dataclass (``NoOptions`` when it has none).
    regularizer : RegularizerConfig
        ASR settings (descriptor, loss weights).
    """

    stage_end: ClassVar[StageEndPlan] = StageEndPlan()
    # What a training step must capture for ``penalties``
    needs_attention: ClassVar[bool] = False
    needs_hidden: ClassVar[bool] = False

    def __init__(self, options: Any, regularizer: RegularizerConfig) -> None:
        self.options = options
        self.reg_cfg = regularizer

    def configure_stage(self, spectrum: SkillSpectrum | None) -> None:
        """Set the spectrum (global or own) for the coming local training."""

    def set_memory(self, model: Any, memory: MethodMemory) -> None:
        """Receive what is kept of earlier stages (empty in the first stage)."""

    def before_training(self, model: Any) -> None:
        """Called by ``train_stage`` with the received weights loaded, before step 1."""

    def training_samples(self, stages: Sequence[Stage], stage: int) -> list[VQASample]:
        """Training data of ``stage`` (the stage's own split)."""
        return list(stages[stage].train)

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """Named, already weighted loss terms added to the task loss."""
        return {}

    def optimizes(self, parameter_name: str) -> bool:
        """Whether ``train_stage`` updates this trainable parameter (default: all).

        Asked after ``set_memory``; a parameter it declines keeps its received value
        for the stage (its ``requires_grad`` is off while the stage trains).
        """
        return True

    def stage_end_statistics(
        self, name: str, model: Any, collator: Any, samples: Sequence[VQASample]
    ) -> tuple[dict[str, Tensor], int]:
        """Additive statistics ``name`` of ``samples`` and how many samples they sum.

        Called on every client (the one site in the central engine) for each name in
        ``stage_end.statistics``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} declares statistics {name!r} but does not "
            "implement `stage_end_statistics`."
        )

    def statistics_reason(
        self,
        name: str,
        sums: Mapping[str, Tensor],
        adapter_shapes: Mapping[str, tuple[int, ...]],
    ) -> str | None:
        """Why one client's statistics ``name`` cannot be merged, or None.

        Asked by the server for every reply before anything is merged (a malformed
        or hostile reply is dropped with this reason), after checking that it is
        finite and agrees in shape with most replies. Default: no further check;
        statistics laid out like the adapter can return ``layout_reason(sums,
        adapter_shapes)`` (EWC's Fisher does).
        """
        return None

    def merge_statistics(
        self, name: str, parts: Sequence[tuple[Mapping[str, Tensor], int]]
    ) -> dict[str, Tensor] | None:
        """Merge the clients' statistics ``name`` (default: sum / total count).

        Each key is summed over the replies that carry it and divided by their
        total count.
        """
        kept = [(sums, count) for sums, count in parts if count > 0]
        if not kept:
            return None
        keys = sorted({k for sums, _ in kept for k in sums})
        merged = {}
        for k in keys:
            carrying = [(sums[k].double(), count) for sums, count in kept if k in sums]
            total = sum(count for _, count in carrying)
            merged[k] = (sum(v for v, _ in carrying) / total).float()
        return merged

    def update_memory(
        self,
        memory: MethodMemory,
        adapter: Mapping[str, Tensor],
        merged: Mapping[str, dict[str, Tensor] | None],
    ) -> MethodMemory:
        """Memory for the next stage (default: latest merged statistics + adapter)."""
        new: MethodMemory = {}
        if self.stage_end.keep_adapter:
            new[PREVIOUS_ADAPTER] = {k: v.detach().clone() for k, v in adapter.items()}
        for name in self.stage_end.statistics:
            value = merged.get(name)
            if value is not None:
                new[name] = dict(value)
            elif name in memory:
                new[name] = memory[name]
        return new


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


def trainable_parameters(model: Any) -> dict[str, Tensor]:
    """Trainable adapter parameters under their ``adapter_state`` keys."""
    suffix = f".{ADAPTER_NAME}."
    return {
        name.replace(suffix, "."): param
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def layout_reason(
    sums: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]]
) -> str | None:
    """Name the first key missing, unexpected or of the wrong shape, or None."""
    missing = sorted(set(expected) - set(sums))
    if missing:
        return f"missing `{missing[0]}` ({len(missing)} of {len(expected)} missing)"
    extra = sorted(set(sums) - set(expected))
    if extra:
        return f"unexpected `{extra[0]}` ({len(extra)} unexpected)"
    for key in sorted(expected):
        shape = tuple(sums[key].shape)
        if shape != tuple(expected[key]):
            return f"`{key}` has shape {shape}, expected {tuple(expected[key])}"
    return None


def check_non_negative(field_name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``method.options.<field_name>`` when negative."""
    if value < 0:
        raise ValueError(f"`method.options.{field_name}` must be >= 0, got {value}.")
