"""Per-skill sufficient statistics and the skill spectrum (prototypes).

A client summarises its descriptors per skill by additive statistics
(``SkillStats``: n_s, sum x, sum x^2, sum of angular distributions, in float64). They
merge exactly by addition, so the merge over clients equals what one site holding all
the data would compute, and they can travel through secure aggregation. The server
turns merged statistics into a ``SkillSpectrum`` (per skill: diagonal Gaussian
(mean, var) and mean angular distribution) and ``blend`` mixes it with the spectrum of
earlier stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fed_asr.spectral import SpectralDescriptor
from fed_asr.spectrum_io import SPECTRUM_FORMAT, STATS_FORMAT, load_arrays, save_arrays
from fed_asr.spectrum_schema import (
    SPECTRUM_FIELDS,
    STATS_FIELDS,
    check_skills,
    validate_arrays,
)

__all__ = ["BLEND_MODES", "SkillSpectrum", "SkillStats", "blend", "sum_stats"]

BLEND_MODES = ("ema", "count", "replace")


@dataclass
class SkillStats:
    """Additive per-skill statistics of spectral descriptors (float64, CPU).

    Attributes
    ----------
    skills : tuple[str, ...]
        Skill names, S of them.
    count : Tensor
        (S,) number of samples counted toward each skill.
    sum : Tensor
        (S, D) sum of their descriptors.
    sumsq : Tensor
        (S, D) sum of their squared descriptors.
    angular_sum : Tensor
        (S, M) sum of their angular distributions.
    """

    skills: tuple[str, ...]
    count: Tensor
    sum: Tensor
    sumsq: Tensor
    angular_sum: Tensor

    def __post_init__(self) -> None:
        """Validate shapes and values; store float64 CPU tensors."""
        self.skills = check_skills(self.skills)
        arrays = {name: getattr(self, name) for name in STATS_FIELDS}
        checked = validate_arrays(arrays, STATS_FIELDS, len(self.skills), "SkillStats")
        for name, value in checked.items():
            setattr(self, name, value)

    @property
    def dim(self) -> int:
        """Descriptor size D."""
        return self.sum.shape[1]

    @property
    def n_angular(self) -> int:
        """Number of angular bins M."""
        return self.angular_sum.shape[1]

    @classmethod
    def empty(cls, skills: Sequence[str], dim: int, n_angular: int) -> SkillStats:
        """Statistics of no sample (the neutral element of ``+``)."""
        s = len(skills)
        zeros = torch.zeros
        return cls(
            tuple(skills),
            zeros(s, dtype=torch.float64),
            zeros(s, dim, dtype=torch.float64),
            zeros(s, dim, dtype=torch.float64),
            zeros(s, n_angular, dtype=torch.float64),
        )

    @classmethod
    def from_batch(
        cls,
        desc: SpectralDescriptor,
        skill_probs: Tensor,
        skills: Sequence[str],
        tau_skill: float,
    ) -> SkillStats:
        """Statistics of one batch; sample x counts toward skill s when p(s|x) > tau.

        Parameters
        ----------
        desc : SpectralDescriptor
            Descriptors (B, D) and angular distributions (B, M); detached here.
        skill_probs : Tensor
            (B, S) skill probabilities p(s|x).
        skills : Sequence[str]
            The S skill names, in the column order of ``skill_probs``.
        tau_skill : float
            Membership threshold (strict).

        Returns
        -------
        SkillStats
            float64 statistics on CPU.

        Raises
        ------
        ValueError
            If the shapes of ``desc`` and ``skill_probs`` do not agree.
        """
        x = desc.descriptor.detach().to("cpu", torch.float64)  # (B, D)
        a = desc.angular.detach().to("cpu", torch.float64)  # (B, M)
        if tuple(skill_probs.shape) != (x.shape[0], len(skills)):
            raise ValueError(
                f"`skill_probs` must have shape {(x.shape[0], len(skills))} "
                f"(batch, skills), got {tuple(skill_probs.shape)}."
            )
        if a.shape[0] != x.shape[0]:
            raise ValueError(
                f"`desc.angular` has {a.shape[0]} rows but `desc.descriptor` has "
                f"{x.shape[0]}."
            )
        # Compare in the input dtype: float32 0.2 cast to float64 exceeds 0.2.
        member = (skill_probs.detach() > tau_skill).to("cpu", torch.float64)  # (B, S)
        return cls(
            tuple(skills),
            member.sum(dim=0),
            member.T @ x,
            member.T @ x.square(),
            member.T @ a,
        )

    def __add__(self, other: SkillStats) -> SkillStats:
        """Exact merge: statistics of the union of both sample sets."""
        if not isinstance(other, SkillStats):
            return NotImplemented
        if other.skills != self.skills:
            raise ValueError(
                f"Cannot merge statistics of skills {list(self.skills)} and "
                f"{list(other.skills)}."
            )
        if (other.dim, other.n_angular) != (self.dim, self.n_angular):
            raise ValueError(
                f"Cannot merge statistics of (D, M) = {(self.dim, self.n_angular)} "
                f"and {(other.dim, other.n_angular)}."
            )
        return SkillStats(
            self.skills,
            self.count + other.count,
            self.sum + other.sum,
            self.sumsq + other.sumsq,
            self.angular_sum + other.angular_sum,
        )

    def to_prototypes(self, cov_floor: float) -> SkillSpectrum:
        """Per-skill prototypes: mean, variance E[x^2] - mean^2 floored, angular.

        Parameters
        ----------
        cov_floor : float
            Lower bound of every variance.

        Returns
        -------
        SkillSpectrum
            float64. Skills with count 0 get mean 0, variance 1 and the uniform
            angular distribution (placeholders; ``present`` is False for them).

        Raises
        ------
        ValueError
            If ``cov_floor`` is not positive.
        """
        if cov_floor <= 0:
            raise ValueError(f"`cov_floor` must be positive, got {cov_floor}.")
        present = (self.count > 0)[:, None]  # (S, 1)
        n = self.count.clamp_min(1.0)[:, None]  # (S, 1)
        mean = self.sum / n
        var = (self.sumsq / n - mean.square()).clamp_min(cov_floor)
        angular = _normalise_rows(self.angular_sum / n)
        uniform = torch.full_like(angular, 1.0 / self.n_angular)
        return SkillSpectrum(
            self.skills,
            torch.where(present, mean, torch.zeros_like(mean)),
            torch.where(present, var, torch.ones_like(var)),
            torch.where(present, angular, uniform),
            self.count.clone(),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """float64 NumPy arrays keyed ``count``, ``sum``, ``sumsq``, ``angular_sum``."""
        return {name: getattr(self, name).numpy().copy() for name in STATS_FIELDS}

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray | Tensor], skills: Sequence[str]
    ) -> SkillStats:
        """Rebuild from ``to_arrays`` output (extra keys are ignored).

        Raises
        ------
        ValueError
            Naming the missing key, the bad shape or the non-finite value.
        """
        checked = validate_arrays(arrays, STATS_FIELDS, len(skills), "SkillStats")
        return cls(tuple(skills), **checked)

    def save(self, path: str | Path) -> None:
        """Write a safetensors file; skill names go in its metadata."""
        save_arrays(self.to_arrays(), self.skills, STATS_FORMAT, path)

    @classmethod
    def load(cls, path: str | Path) -> SkillStats:
        """Read a file written by ``save`` (validated like ``from_arrays``)."""
        arrays, skills = load_arrays(path, STATS_FORMAT)
        return cls.from_arrays(arrays, skills)


def sum_stats(stats: Sequence[SkillStats]) -> SkillStats:
    """Exact merge of several statistics (their sum).

    Raises
    ------
    ValueError
        If ``stats`` is empty or the statistics do not share skills and sizes.
    """
    if not stats:
        raise ValueError("`stats` must hold at least one SkillStats, got none.")
    total = stats[0]
    for item in stats[1:]:
        total = total + item
    return total


@dataclass
class SkillSpectrum:
    """Global skill spectrum: per skill a diagonal Gaussian and an angular profile.

    Attributes
    ----------
    skills : tuple[str, ...]
        Skill names, S of them.
    mean : Tensor
        (S, D) prototype means.
    var : Tensor
        (S, D) prototype variances (positive).
    angular : Tensor
        (S, M) mean angular distributions (rows sum to 1).
    count : Tensor
        (S,) number of samples behind each prototype; 0 means no prototype.
    """

    skills: tuple[str, ...]
    mean: Tensor
    var: Tensor
    angular: Tensor
    count: Tensor

    def __post_init__(self) -> None:
        """Validate shapes and values (dtype and device are kept)."""
        self.skills = check_skills(self.skills)
        arrays = {name: getattr(self, name) for name in SPECTRUM_FIELDS}
        checked = validate_arrays(
            arrays, SPECTRUM_FIELDS, len(self.skills), "SkillSpectrum", keep_dtype=True
        )
        for name, value in checked.items():
            setattr(self, name, value)

    @property
    def present(self) -> Tensor:
        """(S,) bool, True for skills that have a prototype (count > 0)."""
        return self.count > 0

    @property
    def dim(self) -> int:
        """Descriptor size D."""
        return self.mean.shape[1]

    @property
    def n_angular(self) -> int:
        """Number of angular bins M."""
        return self.angular.shape[1]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SkillSpectrum:
        """Copy on another device and/or float dtype (``count`` stays float64)."""
        return SkillSpectrum(
            self.skills,
            self.mean.to(device=device, dtype=dtype),
            self.var.to(device=device, dtype=dtype),
            self.angular.to(device=device, dtype=dtype),
            self.count.to(device=device),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """float64 NumPy arrays keyed ``mean``, ``var``, ``angular``, ``count``."""
        return {
            name: getattr(self, name).detach().to("cpu", torch.float64).numpy().copy()
            for name in SPECTRUM_FIELDS
        }

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray | Tensor], skills: Sequence[str]
    ) -> SkillSpectrum:
        """Rebuild from ``to_arrays`` output (extra keys are ignored).

        Raises
        ------
        ValueError
            Naming the missing key, the bad shape, the non-finite value, a
            non-positive variance or a negative count.
        """
        checked = validate_arrays(arrays, SPECTRUM_FIELDS, len(skills), "SkillSpectrum")
        return cls(tuple(skills), **checked)

    def save(self, path: str | Path) -> None:
        """Write a safetensors file; skill names go in its metadata."""
        save_arrays(self.to_arrays(), self.skills, SPECTRUM_FORMAT, path)

    @classmethod
    def load(cls, path: str | Path) -> SkillSpectrum:
        """Read a file written by ``save`` (validated like ``from_arrays``)."""
        arrays, skills = load_arrays(path, SPECTRUM_FORMAT)
        return cls.from_arrays(arrays, skills)


def blend(
    old: SkillSpectrum | None, new: SkillSpectrum, mode: str = "ema", alpha: float = 0.9
) -> SkillSpectrum:
    """Blend the spectrum of earlier stages with the newly merged one.

    For a skill present in both spectra:

    - ``ema``: alpha * old + (1 - alpha) * new for mean, var and angular; the count
      is the sum of both counts.
    - ``count``: the exact moments of the union, weighting each side by its count:
      mu = w_o mu_o + w_n mu_n, var = w_o (var_o + mu_o^2) + w_n (var_n + mu_n^2)
      - mu^2, angular = w_o a_o + w_n a_n, with w = n / (n_o + n_n). Blending the
      prototypes of two sets of statistics equals the prototypes of their sum
      (up to the variance floor).
    - ``replace``: the new prototype.

    A skill present on one side only is taken as it is. Skills are aligned by name;
    the result holds the old skills first, then skills new in ``new``.

    Parameters
    ----------
    old : SkillSpectrum | None
        Spectrum of the earlier stages; ``None`` returns ``new``.
    new : SkillSpectrum
        Spectrum merged from this stage.
    mode : str
        One of ``ema``, ``count``, ``replace``.
    alpha : float
        EMA weight of ``old``, in [0, 1].

    Returns
    -------
    SkillSpectrum
        The blended spectrum, float64 on CPU (``new`` itself when ``old`` is None).

    Raises
    ------
    ValueError
        For an unknown mode, alpha outside [0, 1] or mismatched sizes.
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"`mode` must be one of {list(BLEND_MODES)}, got {mode!r}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    if old is None:
        return new
    if (old.dim, old.n_angular) != (new.dim, new.n_angular):
        raise ValueError(
            f"Cannot blend spectra of (D, M) = {(old.dim, old.n_angular)} and "
            f"{(new.dim, new.n_angular)}."
        )
    skills = old.skills + tuple(s for s in new.skills if s not in old.skills)
    o, n = _align(old, skills), _align(new, skills)
    both = (o.present & n.present)[:, None]  # (S, 1)
    only_old = (o.present & ~n.present)[:, None]  # (S, 1)
    if mode == "ema":
        mean = alpha * o.mean + (1 - alpha) * n.mean
        var = alpha * o.var + (1 - alpha) * n.var
        angular = alpha * o.angular + (1 - alpha) * n.angular
        count = o.count + n.count
    elif mode == "count":
        total = (o.count + n.count).clamp_min(1.0)[:, None]  # (S, 1)
        w_old, w_new = o.count[:, None] / total, n.count[:, None] / total
        mean = w_old * o.mean + w_new * n.mean
        second = w_old * (o.var + o.mean.square()) + w_new * (n.var + n.mean.square())
        # The union's variance is >= min(var_o, var_n); the bound only absorbs rounding.
        var = torch.maximum(second - mean.square(), torch.minimum(o.var, n.var))
        angular = w_old * o.angular + w_new * n.angular
        count = o.count + n.count
    else:  # replace
        mean, var, angular, count = n.mean, n.var, n.angular, n.count

    def choose(merged: Tensor, old_v: Tensor, new_v: Tensor) -> Tensor:
        return torch.where(both, merged, torch.where(only_old, old_v, new_v))

    return SkillSpectrum(
        skills,
        choose(mean, o.mean, n.mean),
        choose(var, o.var, n.var),
        choose(angular, o.angular, n.angular),
        torch.where(both[:, 0], count, torch.where(only_old[:, 0], o.count, n.count)),
    )


def _align(spectrum: SkillSpectrum, skills: tuple[str, ...]) -> SkillSpectrum:
    """Float64 CPU copy of ``spectrum`` over ``skills`` (missing ones absent)."""
    spectrum = spectrum.to("cpu", torch.float64)
    if spectrum.skills == skills:
        return spectrum
    s, d, m = len(skills), spectrum.dim, spectrum.n_angular
    mean = torch.zeros(s, d, dtype=torch.float64)
    var = torch.ones(s, d, dtype=torch.float64)
    angular = torch.full((s, m), 1.0 / m, dtype=torch.float64)
    count = torch.zeros(s, dtype=torch.float64)
    for i, name in enumerate(spectrum.skills):
        j = skills.index(name)
        mean[j], var[j] = spectrum.mean[i], spectrum.var[i]
        angular[j], count[j] = spectrum.angular[i], spectrum.count[i]
    return SkillSpectrum(skills, mean, var, angular, count)


def _normalise_rows(x: Tensor) -> Tensor:
    """Rows divided by their sum (rows summing to 0 stay 0)."""
    total = x.sum(dim=-1, keepdim=True)
    return x / torch.where(total > 0, total, torch.ones_like(total))
