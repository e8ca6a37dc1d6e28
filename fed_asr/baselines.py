"""Baseline continual-learning methods: FedProx, LwF, EWC, ASR-local and joint training.

Each baseline is one class and one registry line (``fed_asr.methods.METHODS``); their
losses and what travels over the network are described in ``docs/methods.md``. The
helpers below (distillation, Fisher sums, memory updates, local spectrum) are pure
torch and shared by the central engine and the Flower ClientApp/ServerApp.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fed_asr.config import MethodConfig, ModelConfig, RegularizerConfig, SpectrumConfig
from fed_asr.data import Stage, VQASample
from fed_asr.methods import (
    ASR,
    ContinualMethod,
    StageMemory,
    StepContext,
    preserve_requires_grad,
    register_method,
)
from fed_asr.models import IGNORE_INDEX, VQACollator, model_device
from fed_asr.models.lora import ADAPTER_NAME
from fed_asr.spectrum import SkillSpectrum, SkillStats, blend

# Records and keys of the baselines' messages (server <-> client) and node state.
PREVIOUS_ADAPTER_RECORD = "previous-adapter"  # ArrayRecord: global adapter, end of t-1
FISHER_RECORD = "fisher"  # ArrayRecord: Fisher (server -> client: mean; up: sums)
FISHER_COUNT_KEY = "fisher-count"  # MetricRecord: samples behind the Fisher sums
LOCAL_SPECTRUM_STATE = "local-spectrum"  # context.state: a client's own spectrum
TEACHER_ADAPTER = "teacher"  # peft adapter name of the LwF teacher

_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values")


def trainable_parameters(model: Any) -> dict[str, Tensor]:
    """Trainable adapter parameters under their ``adapter_state`` keys."""
    suffix = f".{ADAPTER_NAME}."
    return {
        name.replace(suffix, "."): param
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def _check_non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"`method.{name}` must be >= 0, got {value}.")


class FedProx(ContinualMethod):
    """FedProx: (mu/2) ||w - w_global||^2 over the trainable (LoRA) weights.

    ``w_global`` is the adapter received this round, snapshotted by
    ``before_training`` (in the central engine: the adapter at the stage start).
    """

    def __init__(
        self, method: MethodConfig, regularizer: RegularizerConfig, model: ModelConfig
    ) -> None:
        super().__init__(method, regularizer, model)
        _check_non_negative("fedprox_mu", method.fedprox_mu)
        self.anchor: dict[str, Tensor] = {}

    def before_training(self, model: Any) -> None:
        """Snapshot the received weights."""
        self.anchor = {
            k: p.detach().clone() for k, p in trainable_parameters(model).items()
        }

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """``prox``: (mu/2) sum ||w - w_global||^2."""
        params = trainable_parameters(ctx.model)
        terms = [(params[k] - w0).square().sum() for k, w0 in self.anchor.items()]
        if not terms or self.method_cfg.fedprox_mu == 0:
            return {}
        return {"prox": 0.5 * self.method_cfg.fedprox_mu * torch.stack(terms).sum()}


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
        raise ValueError(
            f"`method.lwf_temperature` must be positive, got {temperature}."
        )
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
    ``lwf_weight * T^2 * KL(teacher || student)`` on the answer positions.
    """

    needs_previous_adapter = True

    def __init__(
        self, method: MethodConfig, regularizer: RegularizerConfig, model: ModelConfig
    ) -> None:
        super().__init__(method, regularizer, model)
        _check_non_negative("lwf_weight", method.lwf_weight)
        if method.lwf_temperature <= 0:
            raise ValueError(
                "`method.lwf_temperature` must be positive, got "
                f"{method.lwf_temperature}."
            )
        self.has_teacher = False

    def set_memory(self, model: Any, memory: StageMemory) -> None:
        """Load ``memory.previous`` into the teacher adapter (or drop the teacher)."""
        self.has_teacher = memory.previous is not None
        if memory.previous is None:
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
        unknown = sorted(set(memory.previous) - set(state))
        if unknown:
            raise KeyError(f"Previous adapter has unexpected keys {unknown[:4]}.")
        state.update({k: torch.as_tensor(v) for k, v in memory.previous.items()})
        set_peft_model_state_dict(model, state, adapter_name=TEACHER_ADAPTER)

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """``lwf``: lwf_weight * T^2 * KL(teacher || student) (none in stage 0)."""
        if not self.has_teacher or self.method_cfg.lwf_weight == 0:
            return {}
        inputs = {k: ctx.batch[k] for k in _INPUT_KEYS}
        with torch.no_grad(), active_adapter(ctx.model, TEACHER_ADAPTER):
            teacher = ctx.model(**inputs).logits
        mask = answer_mask(ctx.batch["labels"])
        loss = distillation_loss(
            ctx.logits[:, :-1], teacher[:, :-1], mask, self.method_cfg.lwf_temperature
        )
        return {"lwf": self.method_cfg.lwf_weight * loss}


class EWC(ContinualMethod):
    """Elastic Weight Consolidation with an accumulated diagonal Fisher.

    Penalty ``(ewc_lambda/2) sum F (w - w*)^2`` with ``w*`` the global adapter at the
    end of the previous stage and ``F`` the Fisher accumulated over earlier stages
    (``update_memory``).
    """

    needs_previous_adapter = True
    needs_fisher = True

    def __init__(
        self, method: MethodConfig, regularizer: RegularizerConfig, model: ModelConfig
    ) -> None:
        super().__init__(method, regularizer, model)
        _check_non_negative("ewc_lambda", method.ewc_lambda)
        if not 0.0 <= method.ewc_decay <= 1.0:
            raise ValueError(
                f"`method.ewc_decay` must be in [0, 1], got {method.ewc_decay}."
            )
        if method.ewc_fisher_batch_size <= 0:
            raise ValueError(
                "`method.ewc_fisher_batch_size` must be positive, got "
                f"{method.ewc_fisher_batch_size}."
            )
        self.terms: list[tuple[str, Tensor, Tensor]] = []

    def set_memory(self, model: Any, memory: StageMemory) -> None:
        """Keep (key, Fisher, anchor) on the model's device per trainable weight."""
        self.terms = []
        if memory.previous is None or memory.fisher is None:
            return
        device = model_device(model)
        for key in trainable_parameters(model):
            if key in memory.fisher and key in memory.previous:
                fisher = torch.as_tensor(memory.fisher[key]).to(device, torch.float32)
                anchor = torch.as_tensor(memory.previous[key]).to(device, torch.float32)
                self.terms.append((key, fisher, anchor))

    def penalties(self, ctx: StepContext) -> dict[str, Tensor]:
        """``ewc``: (lambda/2) sum F (w - w*)^2 (none in the first stage)."""
        if not self.terms or self.method_cfg.ewc_lambda == 0:
            return {}
        params = trainable_parameters(ctx.model)
        total = torch.stack(
            [(f * (params[k].float() - a).square()).sum() for k, f, a in self.terms]
        ).sum()
        return {"ewc": 0.5 * self.method_cfg.ewc_lambda * total}


def fisher_sums(
    model: Any,
    collator: VQACollator,
    samples: Sequence[VQASample],
    batch_size: int = 1,
) -> tuple[dict[str, Tensor], int]:
    """Sums of squared task-loss gradients of the trainable weights over ``samples``.

    The samples are cut into consecutive batches of ``batch_size``; batch b (of n_b
    samples) adds ``n_b * g_b^2``, with ``g_b`` the gradient of its mean task loss.
    With ``batch_size=1`` this is the empirical Fisher (sum over samples of the
    squared per-sample gradient); larger batches are cheaper and smaller in scale.

    Returns
    -------
    tuple[dict[str, Tensor], int]
        Adapter-state keys -> float32 CPU sums, and the number of samples. Divide by
        the (pooled) count for the mean: ``mean_fisher``.
    """
    params = trainable_parameters(model)
    sums = {k: torch.zeros(p.shape, dtype=torch.float32) for k, p in params.items()}
    if len(samples) == 0:
        return sums, 0
    device = model_device(model)
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        for start in range(0, len(samples), batch_size):
            chunk = list(samples[start : start + batch_size])
            batch = collator(chunk)
            inputs = {
                k: v.to(device)
                for k, v in batch.items()
                if k in (*_INPUT_KEYS, "labels")
            }
            loss = model(**inputs).loss
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for key, grad in zip(params, grads, strict=True):
                if grad is not None:
                    sums[key] += len(chunk) * grad.detach().float().cpu().square()
    model.train(was_training)
    return sums, len(samples)


def mean_fisher(
    parts: Sequence[tuple[Mapping[str, Tensor], int]],
) -> dict[str, Tensor] | None:
    """Pool Fisher sums of several sites: sum of sums / sum of counts (by examples).

    Returns None when no site had data.
    """
    total = sum(count for _, count in parts)
    if total == 0:
        return None
    keys = sorted({k for sums, count in parts if count > 0 for k in sums})
    return {
        k: sum(
            torch.as_tensor(sums[k], dtype=torch.float64) for sums, c in parts if c > 0
        )
        .div(total)
        .float()
        for k in keys
    }


def accumulate_fisher(
    old: Mapping[str, Tensor] | None, new: Mapping[str, Tensor] | None, decay: float
) -> dict[str, Tensor] | None:
    """``F <- decay * F_old + F_new`` (decay 1: sum over stages; < 1: online EWC)."""
    if new is None:
        return None if old is None else dict(old)
    if old is None:
        return dict(new)
    return {
        k: decay * torch.as_tensor(old[k]) + v if k in old else v
        for k, v in new.items()
    }


def update_memory(
    method: ContinualMethod | type[ContinualMethod],
    memory: StageMemory,
    adapter: Mapping[str, Tensor],
    fisher: Mapping[str, Tensor] | None,
    decay: float,
) -> StageMemory:
    """Memory for the next stage from the stage-end global adapter and Fisher.

    Parameters
    ----------
    method : ContinualMethod | type[ContinualMethod]
        Its class flags (``needs_previous_adapter``, ``needs_fisher``) decide what
        is kept.
    memory : StageMemory
        Memory used during the stage that just ended.
    adapter : Mapping[str, Tensor]
        Global adapter at the end of the stage (becomes ``previous``).
    fisher : Mapping[str, Tensor] | None
        Pooled mean Fisher of the stage that just ended.
    decay : float
        ``method.ewc_decay``.
    """
    previous = (
        {k: torch.as_tensor(v).detach().clone() for k, v in adapter.items()}
        if method.needs_previous_adapter
        else None
    )
    accumulated = (
        accumulate_fisher(memory.fisher, fisher, decay) if method.needs_fisher else None
    )
    return StageMemory(previous=previous, fisher=accumulated)


class ASRLocal(ASR):
    """ASR against each client's own prototypes only (no global spectrum).

    The stage-end round still runs, but each client turns its statistics into its own
    spectrum, blends it across stages like the server would (``update_local_spectrum``)
    and keeps it in its node state; nothing spectral travels. Isolates the value of
    sharing the spectrum. In the central engine (one site) it equals ``asr``.
    """

    shares_spectrum = False
    keeps_local_spectrum = True


def update_local_spectrum(
    old: SkillSpectrum | None,
    stats: SkillStats,
    spectrum_cfg: SpectrumConfig,
    cov_floor: float,
) -> SkillSpectrum | None:
    """A client's own spectrum after a stage: its prototypes blended with the old ones.

    One site's statistics merged by any strategy give its own prototypes; the blend
    across stages is the server's (``spectrum.blend``, ``spectrum.alpha``). Statistics
    without any sample keep ``old``.
    """
    if float(stats.count.sum()) <= 0:
        return old
    new = stats.to_prototypes(cov_floor)
    return blend(old, new, mode=spectrum_cfg.blend, alpha=spectrum_cfg.alpha)


class Joint(ContinualMethod):
    """Joint training: stage t trains on the union of this site's stages 0..t.

    The usual upper bound that still yields a full accuracy matrix (row t is scored
    after training on everything seen so far); it replays data, so it is not a
    continual method.
    """

    cumulative_data = True

    def training_samples(self, stages: Sequence[Stage], stage: int) -> list[VQASample]:
        """Training splits of stages ``0..stage``, in stage order."""
        return [s for seen in stages[: stage + 1] for s in seen.train]


register_method("fedprox", FedProx)
register_method("lwf", LwF)
register_method("ewc", EWC)
register_method("asr_local", ASRLocal)
register_method("joint", Joint)
