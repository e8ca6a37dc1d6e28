"""Diagnostics of the method's premise and of its losses (pure torch, no Flower).

- ``spectral_drift``: per skill, the unweighted mean normalised Mahalanobis distance
  d2 / D of the descriptors of that skill's samples to the skill's prototype. Under
  the prototype's own diagonal Gaussian its expectation is 1 (the in-distribution
  floor); drift shows as values well above it, collapse as values well below.
- ``attention_grounding_share``: the share of text-to-image attention (the
  normalised map averaged over layers, heads and query tokens) that falls on a
  patch mask per sample, e.g. the queried object's box (``fed_asr.data.regions``).
  Uniform attention reaches the mask's area share.
- ``map_kl``: KL(reference map || current map) of each attention map, in nats.
- ``grad_norm_ratios``: ||grad of each regularizer term|| / ||grad of the task
  loss|| over the trainable parameters (DESIGN section 2 quotes ~2e-4 for the
  paper's L_geo against 0.08-0.28 for the token-level one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from fed_asr.spectral import attention_maps
from fed_asr.spectrum import SkillSpectrum

__all__ = [
    "attention_grounding_share",
    "grad_norm_ratios",
    "map_kl",
    "mahalanobis_d2",
    "spectral_drift",
    "spectrum_prototypes",
]


_EPS = 1e-8


def map_kl(reference: Tensor, current: Tensor) -> Tensor:
    """(...) KL(reference || current) of each map over its last dim, in nats.

    Both are maps summing to 1 over the last dim; cells are clamped at 1e-8 before
    the logarithm. Computed in the inputs' dtype (differentiable).
    """
    r = reference.clamp_min(_EPS)
    c = current.clamp_min(_EPS)
    return (r * (r.log() - c.log())).sum(dim=-1)


def mahalanobis_d2(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """(N,) normalised distances sum_j (x_j - mu_j)^2 / var_j / D of rows of ``x``."""
    x = x.float()
    return ((x - mean.float()).square() / var.float()).sum(-1) / x.shape[-1]


def spectrum_prototypes(spectrum: SkillSpectrum) -> dict[str, tuple[Tensor, Tensor]]:
    """Skill -> (mean (D,), var (D,)) of the skills of ``spectrum`` with a prototype."""
    present = spectrum.present.tolist()
    return {
        skill: (spectrum.mean[s].float(), spectrum.var[s].float())
        for s, skill in enumerate(spectrum.skills)
        if present[s]
    }


def spectral_drift(
    descriptors: Tensor,
    sample_skills: Sequence[str],
    prototypes: Mapping[str, tuple[Tensor, Tensor]] | SkillSpectrum,
) -> dict[str, float]:
    """Unweighted mean d2 / D of each skill's samples to that skill's prototype.

    Parameters
    ----------
    descriptors : Tensor
        (N, D) descriptors (``describe(...).descriptor``).
    sample_skills : Sequence[str]
        The skill of each sample (N of them).
    prototypes : Mapping[str, tuple[Tensor, Tensor]] | SkillSpectrum
        Skill -> (mean (D,), var (D,)), or a spectrum (its present skills).

    Returns
    -------
    dict[str, float]
        Skill -> mean d2 / D over its samples, for skills with samples and a
        prototype (sorted by skill).

    Raises
    ------
    ValueError
        If the number of skills differs from the number of descriptors.
    """
    if isinstance(prototypes, SkillSpectrum):
        prototypes = spectrum_prototypes(prototypes)
    if descriptors.ndim != 2 or descriptors.shape[0] != len(sample_skills):
        raise ValueError(
            f"`descriptors` {tuple(descriptors.shape)} must be (N, D) with N = "
            f"len(`sample_skills`) = {len(sample_skills)}."
        )
    out: dict[str, float] = {}
    for skill in sorted(set(sample_skills) & set(prototypes)):
        rows = [i for i, s in enumerate(sample_skills) if s == skill]
        mean, var = prototypes[skill]
        x = descriptors[rows].detach()  # (n_s, D)
        d2 = mahalanobis_d2(x, mean.to(x.device), var.to(x.device))  # (n_s,)
        out[skill] = float(d2.mean())
    return out


def attention_grounding_share(
    attn: Tensor,
    grid: tuple[int, int],
    patch_mask: Tensor,
    token_weights: Tensor | None = None,
    convention: str = "paper",
) -> Tensor:
    """Share of each sample's averaged attention map that lies on ``patch_mask``.

    Parameters
    ----------
    attn : Tensor
        (B, L, H, Tq, P) text-to-image attention (the capture's ``attn``).
    grid : tuple[int, int]
        (Gh, Gw) with Gh * Gw = P.
    patch_mask : Tensor
        (B, P) or (B, Gh, Gw) bool, True on the patches of interest (row-major).
    token_weights : Tensor | None
        (B, Tq) query weights, as for ``describe`` (``None``: uniform).
    convention : str
        Map normalisation of ``fed_asr.spectral.attention_maps``.

    Returns
    -------
    Tensor
        (B,) float32 in [0, 1]: mass of the normalised map (averaged over the
        L * H layer-heads) on the mask. Compare with
        ``patch_mask.float().mean(-1)``, what uniform attention gives.

    Raises
    ------
    ValueError
        If ``patch_mask`` does not match the batch and grid.
    """
    b = attn.shape[0]
    gh, gw = grid
    if patch_mask.shape not in ((b, gh * gw), (b, gh, gw)):
        raise ValueError(
            f"`patch_mask` must have shape {(b, gh * gw)} or {(b, gh, gw)}, "
            f"got {tuple(patch_mask.shape)}."
        )
    maps = attention_maps(attn, grid, token_weights, convention)  # (B, J, Gh, Gw)
    mean_map = maps.mean(dim=1).reshape(b, gh * gw)  # (B, P)
    mask = patch_mask.reshape(b, gh * gw).to(device=maps.device, dtype=maps.dtype)
    total = mean_map.sum(-1)  # (B,), 1 unless the attention was all zero
    inside = (mean_map * mask).sum(-1)  # (B,)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), 0.0)


def grad_norm_ratios(
    model_params: Iterable[Tensor],
    task_loss: Tensor,
    terms: Mapping[str, Tensor],
) -> dict[str, float]:
    """Gradient-norm ratio of each loss term to the task loss.

    Parameters
    ----------
    model_params : Iterable[Tensor]
        The parameters to differentiate (those with ``requires_grad``, e.g. the
        LoRA weights; the others are skipped).
    task_loss : Tensor
        Scalar task loss.
    terms : Mapping[str, Tensor]
        Named scalar terms (as added to the loss, i.e. already weighted).

    Returns
    -------
    dict[str, float]
        Name -> ||d term / d params|| / ||d task / d params|| (L2 over all the
        parameters); ``inf`` when the task gradient is zero and the term's is not,
        ``nan`` when both are zero. The graph is retained, so the caller can still
        call ``backward`` on the total loss.

    Raises
    ------
    ValueError
        If no parameter requires gradients.
    """
    params = [p for p in model_params if p.requires_grad]
    if not params:
        raise ValueError("`model_params` holds no parameter that requires grad.")
    task_norm = _grad_norm(task_loss, params)
    ratios: dict[str, float] = {}
    for name, term in terms.items():
        norm = _grad_norm(term, params)
        if task_norm > 0:
            ratios[name] = norm / task_norm
        else:
            ratios[name] = math.inf if norm > 0 else math.nan
    return ratios


def _grad_norm(loss: Tensor, params: Sequence[Tensor]) -> float:
    """L2 norm of d ``loss`` / d ``params`` (0 for parameters it does not reach)."""
    if not loss.requires_grad:
        return 0.0
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    total = sum(float(g.float().square().sum()) for g in grads if g is not None)
    return math.sqrt(total)
