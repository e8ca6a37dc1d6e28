"""Spectral drift and grounding as poolable sums (pure torch, no Flower).

A central run measures drift on its own data; in a federated run every client
measures it on its share and the server pools the sums, so both engines write the
same rows (``metrics.json`` ``drift``). A row says, after training stage ``after``,
how far stage ``stage``'s test descriptors sit from the prototypes recorded at the
end of ``stage`` (unweighted mean d2 / D per skill, ``fed_asr.diagnostics``) and the
share of attention on the queried object next to the object's share of the image.
``after == stage`` is the in-distribution floor.

A row also says how far the *maps* themselves moved (``map_shift``): the mean over
samples and layer-heads of KL(map at the end of ``stage`` || map after ``after``),
in nats, on the same test samples (0 on the floor row). The spectral descriptor is
blind to where the attention sits (the power spectrum is shift-invariant), so
``map_shift`` with a flat ``drift`` is attention that moved without changing its
spectrum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from fed_asr.diagnostics import mahalanobis_d2, map_kl

__all__ = ["DriftSums", "drift_row", "drift_sums", "map_shift"]

Prototypes = Mapping[str, tuple[Tensor, Tensor]]  # skill -> (mean (D,), var (D,))


@dataclass
class DriftSums:
    """Sums behind one drift row: per skill sum of d2 / D and count; grounding."""

    d2: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    grounding: float = 0.0  # sum of grounding shares over samples with a region
    object_share: float = 0.0  # sum of the objects' area shares
    regions: int = 0  # samples with a region
    map_kl: float = 0.0  # sum over samples of map_shift
    map_n: int = 0  # samples with a reference map

    def add(self, other: DriftSums) -> DriftSums:
        """The sums of both (pooled over clients)."""
        out = DriftSums(dict(self.d2), dict(self.count))
        out.map_kl, out.map_n = self.map_kl + other.map_kl, self.map_n + other.map_n
        for skill, value in other.d2.items():
            out.d2[skill] = out.d2.get(skill, 0.0) + value
            out.count[skill] = out.count.get(skill, 0) + other.count[skill]
        out.grounding = self.grounding + other.grounding
        out.object_share = self.object_share + other.object_share
        out.regions = self.regions + other.regions
        return out

    def to_metrics(self, stage: int, skills: Sequence[str]) -> dict[str, float | int]:
        """Flat metric keys of ``stage`` (``drift-d2-<stage>-<skill index>`` ...)."""
        out: dict[str, float | int] = {}
        for j, skill in enumerate(skills):
            if self.count.get(skill):
                out[f"drift-d2-{stage}-{j}"] = float(self.d2[skill])
                out[f"drift-n-{stage}-{j}"] = int(self.count[skill])
        out[f"ground-{stage}"] = float(self.grounding)
        out[f"ground-object-{stage}"] = float(self.object_share)
        out[f"ground-n-{stage}"] = int(self.regions)
        if self.map_n:
            out[f"drift-mapkl-{stage}"] = float(self.map_kl)
            out[f"drift-mapn-{stage}"] = int(self.map_n)
        return out

    @classmethod
    def from_metrics(
        cls, metrics: Mapping[str, Any], stage: int, skills: Sequence[str]
    ) -> DriftSums:
        """Read ``to_metrics`` keys back; raises ValueError on impossible values."""
        sums = cls()
        for j, skill in enumerate(skills):
            if f"drift-n-{stage}-{j}" not in metrics:
                continue
            n = metrics[f"drift-n-{stage}-{j}"]
            d2 = float(metrics.get(f"drift-d2-{stage}-{j}", float("nan")))
            if not isinstance(n, int) or n < 1 or not math.isfinite(d2) or d2 < 0:
                raise ValueError(
                    f"drift of stage {stage}, skill `{skill}`: n={n}, d2={d2}"
                )
            sums.d2[skill], sums.count[skill] = d2, n
        regions = metrics.get(f"ground-n-{stage}", 0)
        grounding = float(metrics.get(f"ground-{stage}", 0.0))
        share = float(metrics.get(f"ground-object-{stage}", 0.0))
        if not isinstance(regions, int) or regions < 0:
            raise ValueError(f"grounding of stage {stage}: count {regions!r}")
        for name, value in (("grounding", grounding), ("object share", share)):
            if not (math.isfinite(value) and 0.0 <= value <= regions + 1e-6):
                raise ValueError(
                    f"{name} of stage {stage}: {value} for {regions} samples"
                )
        sums.grounding, sums.object_share, sums.regions = grounding, share, regions
        map_n = metrics.get(f"drift-mapn-{stage}", 0)
        map_kl = float(metrics.get(f"drift-mapkl-{stage}", 0.0))
        if not isinstance(map_n, int) or map_n < 0 or not math.isfinite(map_kl):
            raise ValueError(f"map shift of stage {stage}: n={map_n!r}, kl={map_kl}")
        if map_kl < 0 or (map_n == 0 and map_kl != 0):
            raise ValueError(f"map shift of stage {stage}: kl={map_kl} for n={map_n}")
        sums.map_kl, sums.map_n = map_kl, map_n
        return sums


def drift_sums(
    descriptors: Tensor,
    sample_skills: Sequence[str],
    prototypes: Prototypes,
    grounding: Tensor | None = None,
    object_share: Tensor | None = None,
) -> DriftSums:
    """Sums of d2 / D per skill (skills with a prototype) and of grounding shares."""
    sums = DriftSums()
    for skill in sorted(set(sample_skills) & set(prototypes)):
        rows = [i for i, s in enumerate(sample_skills) if s == skill]
        mean, var = prototypes[skill]
        x = descriptors[rows].detach()
        d2 = mahalanobis_d2(x, mean.to(x.device), var.to(x.device))
        sums.d2[skill], sums.count[skill] = float(d2.sum()), len(rows)
    if grounding is not None and grounding.numel():
        sums.grounding = float(grounding.sum())
        sums.object_share = (
            float(object_share.sum()) if object_share is not None else 0.0
        )
        sums.regions = int(grounding.numel())
    return sums


def map_shift(reference: Tensor, current: Tensor) -> Tensor:
    """(N,) mean over layer-heads of KL(reference map || current map), in nats.

    ``reference`` and ``current`` are (N, J, P) maps of the same samples summing to
    1 (``AttentionProbe.maps``); ``fed_asr.diagnostics.map_kl`` in float32. The
    maps are stored in float16, so each is renormalised to sum 1 first and the KL,
    non-negative by definition, is clamped at 0: otherwise the rounding of two almost
    equal maps gives a KL of about -1e-5, which the server rightly refuses.
    """
    if reference.shape != current.shape:
        raise ValueError(
            f"map shift needs maps of the same samples: {tuple(reference.shape)} vs "
            f"{tuple(current.shape)}"
        )
    reference, current = reference.float(), current.float()
    reference = reference / reference.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    current = current / current.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return map_kl(reference, current).clamp_min(0.0).mean(dim=-1)


def drift_row(after: int, stage: int, sums: DriftSums) -> dict[str, Any]:
    """One ``metrics.json`` drift row (means) from pooled sums."""
    drift = {s: sums.d2[s] / sums.count[s] for s in sorted(sums.d2) if sums.count[s]}
    return {
        "after_stage": after,
        "stage": stage,
        "drift": drift,
        "drift_mean": sum(drift.values()) / len(drift) if drift else None,
        "grounding_share": sums.grounding / sums.regions if sums.regions else None,
        "object_share": sums.object_share / sums.regions if sums.regions else None,
        "map_shift": sums.map_kl / sums.map_n if sums.map_n else None,
    }
