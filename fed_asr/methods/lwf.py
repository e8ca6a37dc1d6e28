"""``lwf``: Learning without Forgetting (Li & Hoiem, TPAMI 2017) on the adapter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fed_asr.methods.base import (
    PREVIOUS_ADAPTER,
    ContinualMethod,
    MethodMemory,
    StageEndPlan,
    StepContext,
    check_non_negative,
    preserve_requires_grad,
)
from fed_asr.methods.registry import register_method
from fed_asr.models import IGNORE_INDEX, model_inputs
from fed_asr.models.lora import ADAPTER_NAME

TEACHER_ADAPTER = "teacher"  # peft adapter name of the LwF teacher


@dataclass
class LwFOptions:
    """Options of ``lwf``: distillation weight and temperature."""

    weight: float = 1.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        check_non_negative("weight", self.weight)
        if self.temperature <= 0:
            raise ValueError(
                "`method.options.temperature` must be positive, got "
                f"{self.temperature}."
            )


def answer_mask(labels: Tensor) -> Tensor:
    """(B, S-1) True where ``logits[:, :-1]`` predicts an answer token (or EOS)."""
    return labels[:, 1:] != IGNORE_INDEX


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float
) -> Tensor:
    """T^2 * mean over masked positions of KL(teacher_T || student_T).

    Parameters
    ----------
    student_logits, teacher_logits : Tensor
        (B, S', V) logits at the same positions.
    mask : Tensor
        (B, S') positions to distil.
    temperature : float
        Softmax temperature T > 0.
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}.")
    student = student_logits[mask].float() / temperature  # (N, V)
    teacher = teacher_logits[mask].float() / temperature  # (N, V)
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(
        F.log_softmax(student, dim=-1),
        F.log_softmax(teacher, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return kl * temperature**2


@contextmanager
def active_adapter(model: Any, name: str) -> Iterator[None]:
    """Run the forward passes inside with peft adapter ``name`` active.

    peft's ``set_adapter`` rewrites ``requires_grad`` flags (it would unfreeze the A
    matrices of FFA-LoRA), so every flag is restored on exit.
    """
    previous = model.active_adapter
    with preserve_requires_grad(model):
        model.set_adapter(name, inference_mode=True)
        try:
            yield
        finally:
            model.set_adapter(previous)


class LwF(ContinualMethod):
    """Learning without Forgetting: distil the previous stage's global adapter.

    The teacher is a second peft adapter (``teacher``) on the same model, loaded
    with the global adapter at the end of the previous stage; penalty
    ``weight * T^2 * KL(teacher || student)`` on the answer positions.
    """

    stage_end = StageEndPlan(keep_adapter=True)

    def __init__(self, options: LwFOptions, regularizer: Any) -> None:
        super().__init__(options, regularizer)
        self.has_teacher = False

    def set_memory(self, model: Any, memory: MethodMemory) -> None:
        """Load the previous adapter into the teacher adapter (or drop the teacher)."""
        previous = memory.get(PREVIOUS_ADAPTER)
        self.has_teacher = previous is not None
        if previous is None:
            if TEACHER_ADAPTER in model.peft_config:
                model.delete_adapter(TEACHER_ADAPTER)
            return
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        if TEACHER_ADAPTER not in model.peft_config:
            with preserve_requires_grad(model):
                model.add_adapter(TEACHER_ADAPTER, model.peft_config[ADAPTER_NAME])
            for name, param in model.named_parameters():
                if f".{TEACHER_ADAPTER}." in name:
                    param.requires_grad_(False)
        # Start from the student's full state so weights the memory lacks (the frozen
        # A of FFA-LoRA) are the shared ones, then overlay the previous adapter.
        state = {
            k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()
        }
        unknown = sorted(set(previous) - set(state))
        if unknown:
            raise KeyError(f"Previous adapter has unexpected keys {unknown[:4]}.")
        state.update({k: torch.as_tensor(v) for k, v in previous.items()})
        set_peft_model_state_dict(model, state, adapter_name=TEACHER_ADAPTER)

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """``lwf``: weight * T^2 * KL(teacher || student) (none in stage 0)."""
        if not self.has_teacher or self.options.weight == 0:
            return {}
        inputs = model_inputs(ctx.model, ctx.batch)
        inputs.pop("labels", None)
        with torch.no_grad(), active_adapter(ctx.model, TEACHER_ADAPTER):
            teacher = ctx.model(**inputs).logits
        mask = answer_mask(ctx.batch["labels"])
        loss = distillation_loss(
            ctx.logits[:, :-1], teacher[:, :-1], mask, self.options.temperature
        )
        return {"lwf": self.options.weight * loss}


register_method("lwf", LwF, LwFOptions)
