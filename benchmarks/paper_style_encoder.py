"""The paper's spectral encoder as its description reads, for ``bench_spectral``.

Written from the description (not from its code): average the query tokens,
renormalise each map, one ``torch.fft.fft2`` (``norm="ortho"``), power normalised to
sum 1, radial and angular distributions by two matrix products against one-hot masks
built with ``bucketize`` on every call, the peak by ``argmax``; no symmetrisation.
The per-map features are then reduced like ``fed_asr.spectral.describe`` (mean and
population variance over the layer-heads), so the two give the same values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["paper_style_descriptor"]

_EPS = 1e-8


def paper_style_descriptor(
    attn: torch.Tensor, grid: tuple[int, int], n_radial: int = 8, n_angular: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's encoder as described (uniform query weights), for comparison.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        (B, 2 (K + 2M + 3)) descriptor (mean and population variance over the
        layer-heads) and (B, M) mean angular distribution.
    """
    b, n_layers, n_heads, _, p = attn.shape
    gh, gw = grid
    maps = attn.float().mean(dim=3).clamp_min(0.0)  # (B, L, H, P)
    maps = maps / maps.sum(dim=-1, keepdim=True).clamp_min(_EPS)
    maps = maps.reshape(b, n_layers * n_heads, gh, gw)  # (B, J, Gh, Gw)
    spectrum = torch.fft.fft2(maps, norm="ortho")  # (B, J, Gh, Gw) complex
    power = spectrum.real.square() + spectrum.imag.square()  # (B, J, Gh, Gw)
    power = power.reshape(b, n_layers * n_heads, p)  # (B, J, P)
    power = power / power.sum(dim=-1, keepdim=True).clamp_min(_EPS)

    fy = torch.fft.fftfreq(gh)[:, None].expand(gh, gw)  # (Gh, Gw)
    fx = torch.fft.fftfreq(gw)[None, :].expand(gh, gw)  # (Gh, Gw)
    rho = torch.sqrt(fy.square() + fx.square()).reshape(-1)  # (P,)
    rho = rho / rho.max().clamp_min(1e-12)
    theta = torch.atan2(fx, fy).reshape(-1)  # (P,)
    radial_edges = torch.linspace(0.0, 1.0, n_radial + 1)[1:-1].contiguous()
    angular_edges = torch.linspace(-math.pi, math.pi, n_angular + 1)[1:-1]
    radial_mask = F.one_hot(torch.bucketize(rho, radial_edges), n_radial).float()
    angular_mask = F.one_hot(
        torch.bucketize(theta, angular_edges.contiguous()), n_angular
    ).float()  # (P, M)

    radial = power @ radial_mask  # (B, J, K)
    radial = radial / radial.sum(-1, keepdim=True).clamp_min(_EPS)
    angular = power @ angular_mask  # (B, J, M)
    angular = angular / angular.sum(-1, keepdim=True).clamp_min(_EPS)
    anisotropy = angular / angular.mean(-1, keepdim=True).clamp_min(_EPS)
    peak = power.argmax(dim=-1, keepdim=True)  # (B, J, 1)
    feats = torch.cat(
        [radial, angular, anisotropy, rho[peak], theta[peak], power.gather(-1, peak)],
        dim=-1,
    )  # (B, J, K + 2M + 3)
    descriptor = torch.cat([feats.mean(1), feats.var(1, unbiased=False)], dim=-1)
    return descriptor, angular.mean(1)
