"""Attention-Spectrum Regularization loss L_spec (DESIGN section 2).

``ASRRegularizer`` returns L_spec only; the training loop applies the weights:
L = L_task + beta * L_spec + gamma * L_geo. Three losses (``RegularizerConfig.
spec_loss``):

- ``"paper"``: pull each sample to its skills' prototype means, weighted by a
  confidence exp(-min_s d2_s / tau_mah), plus lambda_ang times the angular symKL;
- ``"hinge"``: penalise only the excess relu(d2_s - (1 + margin)) of the normalised
  Mahalanobis distance over its expectation 1 under the prototype's own diagonal
  Gaussian, so samples within the typical spread are left alone (no confidence
  weight, no angular term: the angular features are part of the descriptor);
- ``"moment"``: match the batch's per-skill weighted mean and variance to the
  prototype's (squared standardised mean difference + squared log-variance ratio,
  plus lambda_ang times symKL of the batch's mean angular distribution), so the
  spread is kept rather than collapsed.

Which prototypes a sample meets is ``RegularizerConfig.routing`` (``route_samples``):
its question's skill probabilities (paper), or the prototype nearest its descriptor.

The geometry term L_geo lives in ``fed_asr.geometry`` (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fed_asr.config import RegularizerConfig
from fed_asr.config_sections import SKILL_ROUTING, check_choice
from fed_asr.descriptor_layout import describe_batch
from fed_asr.geometry import (
    batch_geometry_loss,
    geometry_loss,
    geometry_loss_from_reference,
    pooled_embeddings,
    reference_log_similarity,
)
from fed_asr.spectral import SpectralDescriptor
from fed_asr.spectrum import SkillSpectrum

__all__ = [
    "SPEC_LOSSES",
    "ASRLoss",
    "ASRRegularizer",
    "SpecTerms",
    "batch_geometry_loss",
    "geometry_loss",
    "geometry_loss_from_reference",
    "moment_loss",
    "pooled_embeddings",
    "route_samples",
    "spec_terms",
    "reference_log_similarity",
    "symmetric_kl",
]

SPEC_LOSSES = ("paper", "hinge", "moment")
_EPS = 1e-8


@dataclass
class ASRLoss:
    """Result of one regularizer call.

    Attributes
    ----------
    loss : Tensor
        Scalar L_spec, differentiable w.r.t. the descriptors.
    mahalanobis : Tensor
        Scalar, detached: mean over active samples of sum_s p~ d2_s.
    angular : Tensor
        Scalar, detached: mean over active samples of sum_s p~ symKL(a, a_s).
    weight : Tensor
        Scalar, detached: mean confidence weight w(x) over active samples (1 for
        ``"hinge"`` and ``"moment"``).
    active_fraction : Tensor
        Scalar, detached: fraction of the batch with some active skill.
    """

    loss: Tensor
    mahalanobis: Tensor
    angular: Tensor
    weight: Tensor
    active_fraction: Tensor


def symmetric_kl(
    p: Tensor, q: Tensor, eps: float = _EPS, reduction: str = "mean"
) -> Tensor:
    """Symmetric KL of two distributions over the last dimension.

    Parameters
    ----------
    p, q : Tensor
        Distributions (clamped at ``eps`` before the logarithm).
    eps : float
        Floor of the probabilities.
    reduction : str
        ``"mean"`` (paper): 0.5 (KL(p||q) + KL(q||p)); ``"sum"``: KL(p||q) + KL(q||p)
        = sum (p - q)(log p - log q).

    Returns
    -------
    Tensor
        One value per leading index.

    Raises
    ------
    ValueError
        If ``reduction`` is unknown.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"`reduction` must be one of ['mean', 'sum'], got {reduction!r}."
        )
    p, q = p.clamp_min(eps), q.clamp_min(eps)
    both = ((p - q) * (p.log() - q.log())).sum(-1)
    return 0.5 * both if reduction == "mean" else both


class ASRRegularizer:
    """Spectral regularizer against the per-skill prototypes of a ``SkillSpectrum``.

    For descriptor x (D,), angular a(x) (M,) and skill probabilities p (S,):

    - d2_s = sum_j (x_j - mu_s,j)^2 / var_s,j / D for each skill s with a prototype;
    - p~ = p restricted to skills with a prototype, renormalised; a sample is active
      when its restricted mass is positive (with ``routing`` other than
      ``"question"``, p is replaced by ``route_samples``);
    - w(x) = exp(-min_s d2_s / tau_mah), min over all skills with a prototype;
    - ``spec_loss="paper"``: L_spec = mean over active samples of w (sum_s p~ d2_s
      + lambda_ang sum_s p~ symKL(a, a_s));
    - ``"hinge"``: L_spec = mean over active samples of
      sum_s p~ relu(d2_s - (1 + hinge_margin));
    - ``"moment"``: L_spec = ``moment_loss`` of the batch with weights p~.

    w is detached: it is a per-sample weight, not a target. Were gradients to flow
    through it, the cheapest way to lower w * d2 would be to push the descriptor
    *away* from every prototype (lowering w), the opposite of the regularizer's
    purpose. Detached, it only down-weights samples far from all known prototypes,
    whose gradient always points towards the prototypes.

    Parameters
    ----------
    cfg : RegularizerConfig
        Reads ``spec_loss``, ``routing``, ``lambda_ang``, ``tau_mah``, ``sym_kl``,
        ``hinge_margin`` and ``cov_floor``.
    spectrum : SkillSpectrum | None
        The prototypes; ``None`` gives a zero loss until ``set_spectrum``.
    """

    def __init__(self, cfg: RegularizerConfig, spectrum: SkillSpectrum | None) -> None:
        self.cfg = cfg
        self.spectrum: SkillSpectrum | None = None
        self._cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        self.set_spectrum(spectrum)

    def set_spectrum(self, spectrum: SkillSpectrum | None) -> None:
        """Use ``spectrum`` as the prototypes from now on (``None`` disables)."""
        self.spectrum = spectrum
        self._cache = {}

    def to(self, device: torch.device | str) -> ASRRegularizer:
        """Prepare the prototypes on ``device`` (done lazily on first use otherwise)."""
        if self.spectrum is not None and bool(self.spectrum.present.any()):
            self._prototypes(torch.device(device))
        return self

    def _prototypes(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """float32 (mean, var, angular) of the present skills on ``device``."""
        if device not in self._cache:
            assert self.spectrum is not None
            present = self.spectrum.present.cpu()
            spec = self.spectrum.to("cpu", torch.float32)
            self._cache[device] = (
                spec.mean[present].to(device),  # (S', D)
                spec.var[present].to(device),  # (S', D)
                spec.angular[present].to(device),  # (S', M)
            )
        return self._cache[device]

    def __call__(self, desc: SpectralDescriptor, skill_probs: Tensor) -> ASRLoss:
        """Compute L_spec for a batch.

        Parameters
        ----------
        desc : SpectralDescriptor
            (B, D) descriptors and (B, M) angular distributions.
        skill_probs : Tensor
            (B, S) skill probabilities, columns in the spectrum's skill order.

        Returns
        -------
        ASRLoss
            ``loss`` is a zero scalar still connected to ``desc`` when no prototype
            is active for any sample (or there is no spectrum).

        Raises
        ------
        ValueError
            If the shapes do not match the spectrum.
        """
        x = desc.descriptor.float()  # (B, D)
        a = desc.angular.float()  # (B, M)
        zero = x.new_zeros(())
        spectrum = self.spectrum
        if spectrum is None or not bool(spectrum.present.any()):
            return ASRLoss(_zero_like_graph(x, a), zero, zero, zero, zero)
        b, d = x.shape
        if d != spectrum.dim or a.shape[-1] != spectrum.n_angular:
            raise ValueError(
                f"Descriptor sizes (D, M) = {(d, a.shape[-1])} do not match the "
                f"spectrum's {(spectrum.dim, spectrum.n_angular)}."
            )
        if tuple(skill_probs.shape) != (b, len(spectrum.skills)):
            raise ValueError(
                f"`skill_probs` must have shape {(b, len(spectrum.skills))}, "
                f"got {tuple(skill_probs.shape)}."
            )
        mu, var, proto_ang = self._prototypes(x.device)
        present = spectrum.present.to(skill_probs.device)
        terms = spec_terms(
            x, a, mu, var, proto_ang, skill_probs.float()[:, present], self.cfg
        )
        d2, p_tilde, active = terms.d2, terms.p_tilde, terms.active
        maha, ang = terms.mahalanobis, terms.angular
        n_active = active.sum().clamp_min(1.0)
        w = torch.ones_like(maha)  # (B,)

        if self.cfg.spec_loss == "paper":
            loss, w = terms.paper_loss(self.cfg)
        elif self.cfg.spec_loss == "hinge":
            excess = torch.relu(d2 - (1.0 + self.cfg.hinge_margin))  # (B, S')
            loss = (active * (p_tilde * excess).sum(1)).sum() / n_active
        else:
            loss = moment_loss(
                x,
                a,
                p_tilde,
                mu,
                var,
                proto_ang,
                self.cfg.lambda_ang,
                self.cfg.cov_floor,
                self.cfg.sym_kl,
            )

        def batch_mean(v: Tensor) -> Tensor:
            return ((active * v).sum() / n_active).detach()

        return ASRLoss(
            loss=loss,
            mahalanobis=batch_mean(maha),
            angular=batch_mean(ang),
            weight=batch_mean(w),
            active_fraction=active.mean().detach(),
        )


@dataclass
class SpecTerms:
    """Per-sample pieces of L_spec for a batch (``spec_terms``).

    ``d2`` (B, S') normalised Mahalanobis distances; ``p_tilde`` (B, S') routed skill
    weights, renormalised (rows of inactive samples are 0); ``active`` (B,) 0/1;
    ``mahalanobis`` and ``angular`` (B,) the p~-weighted d2 and symKL(a, a_s).
    """

    d2: Tensor
    p_tilde: Tensor
    active: Tensor
    mahalanobis: Tensor
    angular: Tensor

    def paper_loss(self, cfg: RegularizerConfig) -> tuple[Tensor, Tensor]:
        """The paper's L_spec and its (B,) confidence weights w.

        mean over active samples of w (maha + lambda_ang ang), w = exp(-min_s d2_s /
        tau_mah) detached.
        """
        w = torch.exp(-self.d2.min(dim=1).values.detach() / cfg.tau_mah)
        per_sample = w * (self.mahalanobis + cfg.lambda_ang * self.angular)
        n_active = self.active.sum().clamp_min(1.0)
        return (self.active * per_sample).sum() / n_active, w


def spec_terms(
    x: Tensor,
    a: Tensor,
    mu: Tensor,
    var: Tensor,
    proto_ang: Tensor,
    probs: Tensor,
    cfg: RegularizerConfig,
) -> SpecTerms:
    """Distances, routing and the weighted terms of L_spec (``SpecTerms``).

    ``x`` (B, D) and ``a`` (B, M) the batch's descriptors; ``mu`` the prototype means,
    (S', D) one per skill or (B, S', D) one per sample and skill; ``var`` (S', D);
    ``proto_ang`` (S', M); ``probs`` (B, S') the questions' skill probabilities of
    those S' skills, routed by ``cfg.routing``.
    """
    means = mu if mu.dim() == 3 else mu[None]
    diff = x[:, None, :] - means  # (B, S', D)
    d2 = (diff.square() / var[None]).sum(-1) / x.shape[1]  # (B, S')
    routed = route_samples(probs.to(x.device), d2, cfg.routing)  # (B, S')
    mass = routed.sum(1, keepdim=True)  # (B, 1)
    active = (mass[:, 0] > 0).float()  # (B,)
    p_tilde = routed / mass.clamp_min(_EPS)  # (B, S'), rows of inactive are 0
    kl = symmetric_kl(a[:, None, :], proto_ang[None], reduction=cfg.sym_kl)
    return SpecTerms(
        d2=d2,
        p_tilde=p_tilde,
        active=active,
        mahalanobis=(p_tilde * d2).sum(1),
        angular=(p_tilde * kl).sum(1),  # kl is (B, S')
    )


def route_samples(probs: Tensor, d2: Tensor, routing: str) -> Tensor:
    """Which present skills' prototypes each sample is held to (``cfg.routing``).

    Parameters
    ----------
    probs : Tensor
        (B, S') the questions' skill probabilities, restricted to present skills.
    d2 : Tensor
        (B, S') normalised Mahalanobis distances to those skills' prototypes.
    routing : str
        ``"question"``: ``probs`` as they are (paper); ``"nearest"``: one-hot on the
        prototype nearest each descriptor; ``"question_or_nearest"``: ``probs``
        where a row has mass, the nearest prototype where it has none.

    Returns
    -------
    Tensor
        (B, S') non-negative weights; the nearest-prototype choice is detached (a
        selection, not a target).

    Raises
    ------
    ValueError
        If ``routing`` is unknown.
    """
    if routing == "question":
        return probs
    check_choice("regularizer.routing", routing, SKILL_ROUTING)
    nearest = torch.zeros_like(probs)
    nearest.scatter_(1, d2.detach().argmin(dim=1, keepdim=True), 1.0)
    if routing == "nearest":
        return nearest
    unrouted = probs.sum(1, keepdim=True) <= 0  # (B, 1)
    return torch.where(unrouted, nearest, probs)


def moment_loss(
    x: Tensor,
    a: Tensor,
    weights: Tensor,
    mu: Tensor,
    var: Tensor,
    proto_ang: Tensor,
    lambda_ang: float = 0.1,
    floor: float = 1e-4,
    reduction: str = "mean",
) -> Tensor:
    """Match the batch's per-skill moments to the prototypes' (``spec_loss="moment"``).

    For skill s with sample weights w_bs (p~, zero for inactive samples) and
    n_s = sum_b w_bs > 0:

    - m_s = sum_b w_bs x_b / n_s; v_s the weighted variance with Kish's correction
      1 / (1 - sum_b w_bs^2 / n_s^2) (unbiased for equal weights);
    - L_s = mean_j (m_sj - mu_sj)^2 / var_sj
      + mean_j (log(v_sj + floor) - log(var_sj + floor))^2  (only when the
      effective sample size n_s^2 / sum_b w_bs^2 exceeds 1)
      + lambda_ang symKL(sum_b w_bs a_b / n_s, a_s);
    - L = sum_s n_s L_s / sum_s n_s.

    Parameters
    ----------
    x : Tensor
        (B, D) descriptors.
    a : Tensor
        (B, M) angular distributions.
    weights : Tensor
        (B, S') non-negative skill weights (p~ of the present skills).
    mu, var : Tensor
        (S', D) prototype means and variances.
    proto_ang : Tensor
        (S', M) prototype angular distributions.
    lambda_ang : float
        Weight of the angular term.
    floor : float
        Added to both variances inside the logarithms.
    reduction : str
        Symmetric KL with (``"mean"``) or without (``"sum"``) the 1/2.

    Returns
    -------
    Tensor
        Scalar loss; a zero connected to ``x`` when no skill has weight.
    """
    n = weights.sum(0)  # (S',)
    keep = n > 0  # (S',)
    if not bool(keep.any()):
        return _zero_like_graph(x, a)
    n_safe = n.clamp_min(_EPS)[:, None]  # (S', 1)
    mean = weights.T @ x / n_safe  # (S', D)
    dev = x[:, None, :] - mean[None]  # (B, S', D)
    biased = (weights[..., None] * dev.square()).sum(0) / n_safe  # (S', D)
    n_eff = n.square() / weights.square().sum(0).clamp_min(_EPS)  # (S',)
    has_spread = n_eff > 1.0 + 1e-6  # (S',)
    correction = torch.where(has_spread, 1.0 - 1.0 / n_eff, torch.ones_like(n_eff))
    spread = biased / correction[:, None]  # (S', D)
    mean_term = ((mean - mu).square() / var).mean(-1)  # (S',)
    log_ratio = torch.log(spread + floor) - torch.log(var + floor)  # (S', D)
    var_term = torch.where(has_spread, log_ratio.square().mean(-1), 0.0)  # (S',)
    mean_ang = weights.T @ a / n_safe  # (S', M)
    ang_term = symmetric_kl(mean_ang, proto_ang, reduction=reduction)  # (S',)
    per_skill = mean_term + var_term + lambda_ang * ang_term  # (S',)
    n_kept = torch.where(keep, n, 0.0)  # (S',)
    return (n_kept * per_skill).sum() / n_kept.sum()


def _zero_like_graph(*tensors: Tensor) -> Tensor:
    """Zero scalar that backpropagates (zeros) into ``tensors`` needing grad."""
    connected = [t for t in tensors if t.requires_grad]
    if not connected:
        return torch.zeros((), device=tensors[0].device, requires_grad=True)
    total = connected[0].sum()
    for t in connected[1:]:
        total = total + t.sum()
    return total * 0.0


def describe_capture(
    capture: Any, batch: dict[str, Tensor], reg_cfg: RegularizerConfig
) -> SpectralDescriptor:
    """Descriptors of a captured batch with the configured conventions, features and
    head pooling (``fed_asr.descriptor_layout.describe_batch``)."""
    return describe_batch(capture, batch, reg_cfg)
