"""Evaluation that can see the mechanism: protocols, skills, drift, grounding.

- Accuracy under two protocols (``fed_asr.models.scoring.EVAL_PROTOCOLS``): ``all``
  ranks every answer of the stream; ``type`` ranks only the answers of the question's
  skill (taken from the training rows, so it works from a manifest alone).
- Accuracy per skill (question type) under both.
- Spectral drift: the unweighted normalised Mahalanobis distance d2/D of a stage's
  test descriptors to the prototypes recorded at the end of that stage, next to its
  in-distribution floor (the same distance right after that stage).
- Grounding share: the share of text-to-image attention on the queried object's
  patches (streams whose samples carry a ``region``), next to the object's share of
  the image (what uniform attention gives).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fed_asr.config import RegularizerConfig
from fed_asr.data import VQASample
from fed_asr.data.regions import region_masks
from fed_asr.descriptor_layout import model_descriptor_size
from fed_asr.diagnostics import attention_grounding_share, spectrum_prototypes
from fed_asr.drift import DriftSums, drift_row, drift_sums, map_shift
from fed_asr.models import (
    VQACollator,
    forward_with_attention,
    model_device,
    move_batch,
)
from fed_asr.models.scoring import (
    EVAL_PROTOCOLS,
    allowed_answers_mask,
    predict_protocols,
    sample_skill,
)
from fed_asr.query_tokens import query_token_weights
from fed_asr.regularizer import describe_capture
from fed_asr.spectral import SpectralDescriptor, attention_maps
from fed_asr.spectrum import SkillSpectrum, SkillStats


@dataclass
class StageScores:
    """Counts of one evaluated stage: per protocol, overall and per skill."""

    total: int = 0
    correct: dict[str, int] = field(default_factory=dict)  # protocol -> correct
    per_skill: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    # Under the `type` protocol: skill -> gold answer -> predicted answer -> count
    confusion: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    def accuracy(self, protocol: str = "all") -> float:
        """Accuracy under ``protocol`` (NaN without samples)."""
        return (
            self.correct.get(protocol, 0) / self.total if self.total else float("nan")
        )


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def score_stage(
    model: torch.nn.Module,
    collator: VQACollator,
    samples: Sequence[VQASample],
    batch_size: int,
    skill_answers: Mapping[str, Sequence[str]],
) -> StageScores:
    """Score ``samples`` under every protocol from one forward pass per batch.

    Parameters
    ----------
    skill_answers : Mapping[str, Sequence[str]]
        Skill -> its answers (``skill_answer_sets`` of the training rows): the
        candidates of the ``type`` protocol.
    """
    scores = StageScores(correct=dict.fromkeys(EVAL_PROTOCOLS, 0))
    scores.per_skill = {p: {} for p in EVAL_PROTOCOLS}
    if len(samples) == 0:
        return scores
    device = model_device(model)
    candidates = collator.candidate_token_ids()
    model.eval()
    for rows in _batches(len(samples), batch_size):
        chunk = [samples[i] for i in rows]
        skills = [sample_skill(s) for s in chunk]
        batch = move_batch(collator(chunk), device)
        allowed = allowed_answers_mask(skills, collator.answers, skill_answers)
        predicted = predict_protocols(model, batch, candidates, allowed.to(device))
        for protocol, pred in predicted.items():
            hits = (pred == batch["answer_index"]).tolist()
            scores.correct[protocol] += int(sum(hits))
            table = scores.per_skill[protocol]
            for skill, hit in zip(skills, hits, strict=True):
                c, n = table.get(skill, (0, 0))
                table[skill] = (c + int(hit), n + 1)
        _count_confusion(
            scores.confusion, skills, batch["answer_index"], predicted["type"], collator
        )
        scores.total += len(chunk)
    return scores


def _count_confusion(
    confusion: dict[str, dict[str, dict[str, int]]],
    skills: Sequence[str],
    gold: Tensor,
    predicted: Tensor,
    collator: VQACollator,
) -> None:
    """Add (gold, predicted) answer pairs per skill to ``confusion``."""
    answers = collator.answers
    for skill, g, p in zip(skills, gold.tolist(), predicted.tolist(), strict=True):
        row = confusion.setdefault(skill, {}).setdefault(answers[g], {})
        row[answers[p]] = row.get(answers[p], 0) + 1


@dataclass
class AttentionProbe:
    """Descriptors, maps, skills and grounding shares of a set of samples."""

    descriptors: Tensor  # (N, D)
    skills: list[str]
    grounding: Tensor  # (M,) share on the queried object (samples with a region)
    uniform: Tensor  # (M,) the object's share of the image
    # (N, J, P) query-weighted maps summing to 1 (the descriptor's maps); empty: none
    maps: Tensor = field(default_factory=lambda: torch.zeros(0, 0, 0))


@torch.no_grad()
def probe_attention(
    model: torch.nn.Module,
    collator: VQACollator,
    samples: Sequence[VQASample],
    reg_cfg: RegularizerConfig,
    batch_size: int,
    capture_mode: str = "selective",
    keep_maps: bool = False,
) -> AttentionProbe:
    """Capture the attention of ``samples``: descriptors and grounding shares.

    With ``keep_maps`` the probe also holds every sample's (J, P) maps, in float16
    (J * P values a sample: keep them for test splits, whose map shift is measured,
    not for training sets).
    """
    dim = model_descriptor_size(model, reg_cfg)
    descriptors, skills, shares, uniform, maps = [], [], [], [], []
    device = model_device(model)
    model.eval()
    for rows in _batches(len(samples), batch_size):
        chunk = [samples[i] for i in rows]
        batch = move_batch(collator(chunk), device)
        capture = forward_with_attention(model, batch, reg_cfg.l_sel, capture_mode)
        descriptors.append(describe_capture(capture, batch, reg_cfg).descriptor.cpu())
        skills.extend(sample_skill(s) for s in chunk)
        weights = query_token_weights(
            capture.query_mask, batch.get("function_mask"), reg_cfg.query_tokens
        )
        if keep_maps:
            batch_maps = attention_maps(
                capture.attn,
                capture.grid,
                weights.to(capture.attn.dtype),
                reg_cfg.descriptor,
            )
            maps.append(batch_maps.flatten(start_dim=2).half().cpu())  # (B, J, P)
        masks, has = region_masks(chunk, capture.grid)  # (B, Gh, Gw), (B,)
        if bool(has.any()):
            share = attention_grounding_share(
                capture.attn,
                capture.grid,
                masks.to(capture.attn.device),
                weights.to(capture.attn.dtype),
                reg_cfg.descriptor,
            ).cpu()
            shares.append(share[has])
            uniform.append(masks.float().mean((-2, -1))[has])
    empty = torch.zeros(0)
    return AttentionProbe(
        descriptors=torch.cat(descriptors) if descriptors else torch.zeros(0, dim),
        skills=skills,
        grounding=torch.cat(shares) if shares else empty,
        uniform=torch.cat(uniform) if uniform else empty,
        maps=_stacked_maps(maps),
    )


def _stacked_maps(parts: Sequence[Tensor]) -> Tensor:
    """(N, J, P) maps of every batch; empty when none or when the grids differ.

    Families whose grid depends on the image (e.g. Qwen2-VL at native resolution)
    can give batches of different P; their map shift is then not measured.
    """
    if not parts or len({tuple(part.shape[1:]) for part in parts}) != 1:
        return torch.zeros(0, 0, 0)
    return torch.cat(list(parts))


def probe_run_samples(
    model: torch.nn.Module,
    collator: VQACollator,
    samples: Sequence[VQASample],
    cfg: Any,
    keep_maps: bool = False,
) -> AttentionProbe:
    """``probe_attention`` with a run's settings (``cfg``: an ``ExperimentConfig``)."""
    return probe_attention(
        model,
        collator,
        samples,
        cfg.regularizer,
        cfg.train.eval_batch_size,
        cfg.model.attn_capture,
        keep_maps,
    )


_MAPS = "reference_maps"  # to_arrays name of a stage's reference test maps


class DriftMonitor:
    """Old-skill spectral drift and grounding after each stage (any engine).

    After stage ``t``: ``record(t, train_probe)`` keeps prototypes of stage ``t``'s
    own training data; ``sums(i, test_probe, after=t)`` gives the poolable sums of
    stage ``i``'s test descriptors against stage ``i``'s prototypes and ``measure``
    the row (``fed_asr.drift``; ``i == t`` is the floor, whose maps become stage
    ``i``'s reference for ``map_shift``). A federated client keeps its prototypes and
    reference maps between messages with ``to_arrays`` / ``load_arrays``.
    """

    def __init__(self, skills: Sequence[str], cov_floor: float) -> None:
        self.skills = tuple(skills)
        self.cov_floor = cov_floor
        self.prototypes: dict[int, SkillSpectrum] = {}
        self.reference_maps: dict[int, Tensor] = {}  # stage -> (N, J, P) test maps
        self.rows: list[dict[str, Any]] = []

    def record(self, stage: int, probe: AttentionProbe) -> None:
        """Prototypes of ``stage`` from its training probe (one-hot skills)."""
        index = {skill: j for j, skill in enumerate(self.skills)}
        probs = torch.zeros(len(probe.skills), len(self.skills))  # (N, S) one-hot
        for k, skill in enumerate(probe.skills):
            if skill in index:
                probs[k, index[skill]] = 1.0
        # the angular part is unused by the distance: one constant bin
        desc = SpectralDescriptor(probe.descriptors, torch.ones(len(probe.skills), 1))
        stats = SkillStats.from_batch(desc, probs, self.skills, 0.5)
        self.prototypes[stage] = stats.to_prototypes(self.cov_floor)

    def sums(self, stage: int, probe: AttentionProbe, *, after: int) -> DriftSums:
        """Poolable drift sums of ``stage``'s test probe after training ``after``.

        Descriptors against ``stage``'s prototypes; the maps against the reference
        kept on the floor call (``after == stage``), when they are the same samples.
        """
        sums = drift_sums(
            probe.descriptors,
            probe.skills,
            spectrum_prototypes(self.prototypes[stage]),
            probe.grounding,
            probe.uniform,
        )
        if after == stage and probe.maps.numel():
            self.reference_maps[stage] = probe.maps.clone()
        reference = self.reference_maps.get(stage)
        if reference is not None and reference.shape == probe.maps.shape:
            shift = map_shift(reference, probe.maps)
            sums.map_kl, sums.map_n = float(shift.sum()), int(shift.numel())
        return sums

    def measure(self, after: int, stage: int, probe: AttentionProbe) -> dict[str, Any]:
        """Drift of ``stage``'s test data after training ``after`` (one JSON row)."""
        row = drift_row(after, stage, self.sums(stage, probe, after=after))
        self.rows.append(row)
        return row

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Prototypes and reference maps as named arrays (``<stage>/<array>``)."""
        arrays = {
            f"{stage}/{name}": array
            for stage, spectrum in self.prototypes.items()
            for name, array in spectrum.to_arrays().items()
        }
        for stage, maps in self.reference_maps.items():
            arrays[f"{stage}/{_MAPS}"] = maps.numpy()
        return arrays

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore prototypes and reference maps written by ``to_arrays``."""
        stages = sorted({int(key.split("/", 1)[0]) for key in arrays})
        for stage in stages:
            prefix = f"{stage}/"
            own = {
                k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)
            }
            if _MAPS in own:
                self.reference_maps[stage] = torch.from_numpy(np.array(own.pop(_MAPS)))
            if own:
                self.prototypes[stage] = SkillSpectrum.from_arrays(own, self.skills)
