"""Spectral aggregation strategies: client skill statistics -> global skill spectrum.

Each strategy is a small class registered under a snake_case name in
``SPECTRUM_STRATEGIES``; the Flower strategy in ``server/`` only looks one up and calls
``merge``. Notation for one skill s: client k has count n_k, prototype mean mu_k,
variance var_k and angular distribution a_k (from its own statistics); only clients
with n_k > 0 take part, and the merged count is sum_k n_k. See
``docs/spectrum_strategies.md``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from fed_asr.config import SpectrumConfig
from fed_asr.registry import check_new_name, lookup
from fed_asr.spectrum import SkillSpectrum, SkillStats, sum_stats

__all__ = [
    "SPECTRUM_STRATEGIES",
    "Barycenter",
    "Mean",
    "Median",
    "Pooled",
    "SpectrumStrategy",
    "TrimmedMean",
    "get_spectrum_strategy",
    "register_spectrum_strategy",
]


class SpectrumStrategy(ABC):
    """Merge per-client skill statistics into one global skill spectrum."""

    #: True when ``merge`` needs only the sum of the client statistics, so the
    #: statistics may travel through secure aggregation (SecAgg+).
    secure_compatible: ClassVar[bool] = False

    @abstractmethod
    def merge(
        self, client_stats: Sequence[SkillStats], cfg: SpectrumConfig, cov_floor: float
    ) -> SkillSpectrum:
        """Merge the statistics of the clients.

        Parameters
        ----------
        client_stats : Sequence[SkillStats]
            One entry per client (or a single pre-summed entry for SecAgg-compatible
            strategies); all with the same skills and sizes.
        cfg : SpectrumConfig
            ``weighted`` and ``trim_fraction`` are read by the strategies that use them.
        cov_floor : float
            Lower bound of every variance.

        Returns
        -------
        SkillSpectrum
            float64 global spectrum; a skill no client holds has count 0.

        Raises
        ------
        ValueError
            If ``client_stats`` is empty or its entries disagree in skills or sizes.
        """


class Pooled(SpectrumStrategy):
    """Exact pooled moments: the spectrum one site holding all data would compute.

    n = sum_k n_k, S1 = sum_k sum_{x in k} x, S2 = sum_k sum_{x in k} x^2;
    mu = S1 / n, var = max(S2 / n - mu^2, cov_floor), a = normalise(sum_k A_k / n).
    Needs only the summed statistics, hence SecAgg-compatible.
    """

    secure_compatible = True

    def merge(
        self, client_stats: Sequence[SkillStats], cfg: SpectrumConfig, cov_floor: float
    ) -> SkillSpectrum:
        """Pooled moments of the summed statistics."""
        _check_clients(client_stats)
        return sum_stats(client_stats).to_prototypes(cov_floor)


class Mean(SpectrumStrategy):
    """Mean of client prototypes (FedProto-style).

    w_k = n_k / sum_j n_j if ``cfg.weighted`` else 1 / K_s (K_s clients with the skill);
    mu = sum_k w_k mu_k, var = sum_k w_k var_k, a = sum_k w_k a_k.
    Unlike ``pooled`` it ignores the spread between client means.
    """

    def merge(
        self, client_stats: Sequence[SkillStats], cfg: SpectrumConfig, cov_floor: float
    ) -> SkillSpectrum:
        """Weighted mean of the client means and angular profiles; ``_variance``."""
        protos, counts = _client_prototypes(client_stats, cov_floor)
        w = _weights(counts, cfg.weighted)  # (K, S, 1)
        mean = (w * protos["mean"]).sum(0)
        var = self._variance(w, protos["var"])
        angular = (w * protos["angular"]).sum(0)
        return _spectrum(client_stats[0].skills, mean, var, angular, counts, cov_floor)

    @staticmethod
    def _variance(w: Tensor, var: Tensor) -> Tensor:
        """Weighted mean of the client variances ``var`` (K, S, D) -> (S, D)."""
        return (w * var).sum(0)


class Barycenter(Mean):
    """Wasserstein-2 barycenter of the clients' diagonal Gaussians.

    With w_k as in ``mean`` (count-weighted if ``cfg.weighted``), the W2 barycenter of
    N(mu_k, diag(sigma_k^2)) is N(mu, diag(sigma^2)) with mu = sum_k w_k mu_k and
    sigma = sum_k w_k sigma_k (per coordinate), so var = (sum_k w_k sqrt(var_k))^2.
    a = sum_k w_k a_k.
    """

    @staticmethod
    def _variance(w: Tensor, var: Tensor) -> Tensor:
        """Closed-form W2 barycenter variance: (sum_k w_k sqrt(var_k))^2."""
        return (w * var.sqrt()).sum(0).square()


class Median(SpectrumStrategy):
    """Coordinate-wise median of client prototypes (robust to poisoned clients).

    mu_j = median_k mu_k,j, var_j = median_k var_k,j, a = normalise(median_k a_k);
    the median of an even number of clients is the mean of the two middle values.
    Unweighted: counts are reported by the clients and could be poisoned too, so
    ``cfg.weighted`` does not apply.
    """

    def merge(
        self, client_stats: Sequence[SkillStats], cfg: SpectrumConfig, cov_floor: float
    ) -> SkillSpectrum:
        """Coordinate-wise median over the clients holding each skill."""
        protos, counts = _client_prototypes(client_stats, cov_floor)
        held = (counts > 0)[..., None]  # (K, S, 1)
        out = {
            key: torch.nanquantile(value.masked_fill(~held, math.nan), 0.5, dim=0)
            for key, value in protos.items()
        }  # each (S, D) or (S, M); NaN for a skill no client holds
        return _prototype_spectrum(client_stats[0].skills, out, counts, cov_floor)


class TrimmedMean(SpectrumStrategy):
    """Coordinate-wise trimmed mean of client prototypes (robust).

    For a skill held by K_s clients, drop the floor(f * K_s) smallest and largest
    values of every coordinate (f = ``cfg.trim_fraction``) and average the rest;
    applied to mu, var and a (then renormalised). Unweighted, like ``median``.
    """

    def merge(
        self, client_stats: Sequence[SkillStats], cfg: SpectrumConfig, cov_floor: float
    ) -> SkillSpectrum:
        """Coordinate-wise trimmed mean over the clients holding each skill."""
        protos, counts = _client_prototypes(client_stats, cov_floor)
        held = counts > 0  # (K, S)
        n_held = held.sum(0)  # (S,)
        n_trim = torch.floor(n_held * cfg.trim_fraction + 1e-9)  # (S,)
        rank = torch.arange(held.shape[0], dtype=torch.float64)[:, None]  # (K, 1)
        keep = (rank >= n_trim) & (rank < n_held - n_trim)  # (K, S)
        keep = keep[..., None].to(torch.float64)  # (K, S, 1)
        n_keep = keep.sum(0).clamp_min(1.0)  # (S, 1)
        out = {}
        for key, value in protos.items():
            # torch.sort puts NaN last, so rank r < n_held indexes the held values.
            ranked = value.masked_fill(~held[..., None], math.nan).sort(dim=0).values
            out[key] = (ranked.nan_to_num(0.0) * keep).sum(0) / n_keep
        return _prototype_spectrum(client_stats[0].skills, out, counts, cov_floor)


SPECTRUM_STRATEGIES: dict[str, type[SpectrumStrategy]] = {}


def register_spectrum_strategy(name: str, cls: type[SpectrumStrategy]) -> None:
    """Register a strategy class under a unique snake_case name.

    Raises
    ------
    ValueError
        If ``name`` is not snake_case or ``cls`` is not a ``SpectrumStrategy``.
    KeyError
        If ``name`` is already registered.
    """
    check_new_name(SPECTRUM_STRATEGIES, name, "spectrum strategy")
    if not (isinstance(cls, type) and issubclass(cls, SpectrumStrategy)):
        raise ValueError(f"`cls` must subclass SpectrumStrategy, got {cls!r}.")
    SPECTRUM_STRATEGIES[name] = cls


def get_spectrum_strategy(name: str) -> SpectrumStrategy:
    """Instantiate the strategy registered under ``name``.

    Raises
    ------
    KeyError
        If ``name`` is unknown; the message lists the available names.
    """
    return lookup(SPECTRUM_STRATEGIES, name, "spectrum strategy")()


def _check_clients(client_stats: Sequence[SkillStats]) -> None:
    """Raise unless there is at least one entry and all agree in skills and sizes."""
    if not client_stats:
        raise ValueError("`client_stats` must hold at least one client, got none.")
    first = client_stats[0]
    for i, stats in enumerate(client_stats[1:], start=1):
        if stats.skills != first.skills:
            raise ValueError(
                f"`client_stats[{i}]` has skills {list(stats.skills)}, expected "
                f"{list(first.skills)}."
            )
        if (stats.dim, stats.n_angular) != (first.dim, first.n_angular):
            raise ValueError(
                f"`client_stats[{i}]` has (D, M) = {(stats.dim, stats.n_angular)}, "
                f"expected {(first.dim, first.n_angular)}."
            )


def _client_prototypes(
    client_stats: Sequence[SkillStats], cov_floor: float
) -> tuple[dict[str, Tensor], Tensor]:
    """Stacked client prototypes {mean, var, angular} (K, S, *) and counts (K, S)."""
    _check_clients(client_stats)
    protos = [stats.to_prototypes(cov_floor) for stats in client_stats]
    stacked = {
        key: torch.stack([getattr(p, key) for p in protos])  # (K, S, D) or (K, S, M)
        for key in ("mean", "var", "angular")
    }
    counts = torch.stack([p.count for p in protos])  # (K, S)
    return stacked, counts


def _weights(counts: Tensor, weighted: bool) -> Tensor:
    """(K, S, 1) client weights, summing to 1 over the clients holding each skill."""
    raw = counts if weighted else (counts > 0).to(counts.dtype)  # (K, S)
    total = raw.sum(0, keepdim=True).clamp_min(1e-300)  # (1, S)
    return (raw / total)[..., None]


def _prototype_spectrum(
    skills: tuple[str, ...],
    protos: Mapping[str, Tensor],
    counts: Tensor,
    cov_floor: float,
) -> SkillSpectrum:
    """``_spectrum`` of merged prototypes keyed ``mean``, ``var`` and ``angular``."""
    return _spectrum(
        skills, protos["mean"], protos["var"], protos["angular"], counts, cov_floor
    )


def _spectrum(
    skills: tuple[str, ...],
    mean: Tensor,
    var: Tensor,
    angular: Tensor,
    counts: Tensor,
    cov_floor: float,
) -> SkillSpectrum:
    """Assemble the result: floor var, renormalise angular, placeholders if absent."""
    count = counts.sum(0)  # (S,)
    present = (count > 0)[:, None]  # (S, 1)
    m = angular.shape[1]
    angular = angular.nan_to_num(0.0).clamp_min(0.0)
    total = angular.sum(-1, keepdim=True)
    angular = torch.where(total > 0, angular / total.clamp_min(1e-300), 1.0 / m)
    return SkillSpectrum(
        skills,
        torch.where(present, mean, 0.0),
        torch.where(present, var.clamp_min(cov_floor), 1.0),
        torch.where(present, angular, 1.0 / m),
        count,
    )


register_spectrum_strategy("pooled", Pooled)
register_spectrum_strategy("mean", Mean)
register_spectrum_strategy("barycenter", Barycenter)
register_spectrum_strategy("median", Median)
register_spectrum_strategy("trimmed", TrimmedMean)
