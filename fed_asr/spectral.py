"""Attention maps -> spectral descriptors (DESIGN section 2, steps 1-6).

Pure, batched tensor functions. The input is the text-to-image attention of the
selected layers, ``attn`` of shape (B, L, H, Tq, P) with P = Gh * Gw image tokens on a
row-major Gh x Gw grid. The output is one descriptor per sample, of size
D = 2 (K + 2M + 3), and the mean angular distribution (M,).

Spectra are computed in float32 whatever the input dtype (bfloat16 attention works).

Two conventions (``convention``)
--------------------------------
``"paper"`` (default) follows the paper's code (DESIGN section 2):

- maps are clamped at 0 and divided by their sum clamped at ``eps``
  (``x / x.sum().clamp_min(eps)``); every later normalisation (power spectrum,
  radial and angular distributions, anisotropy) divides the same way;
- the DC frequency stays everywhere: in radial bin 0, in the angular bin of
  theta = atan2(0, 0) = 0, and in the peak search (argmax over all frequencies);
- radial bins: ``bucketize(rho, linspace(0, 1, K + 1)[1:-1])``; angular bins:
  ``bucketize(theta, linspace(-pi, pi, M + 1)[1:-1])``; a value on an inner edge
  goes to the lower bin (``right=False``).

Every map sums to 1, so with the orthonormal FFT the DC power is 1 / P and, for a
non-negative map, |F(k)| <= |F(0)| for every k: DC is always a (possibly tied) peak,
so under ``"paper"`` the peak is DC (rho* = theta* = 0, peak power = the DC share)
unless rounding puts a tied frequency ahead.

``"ours"`` (this project's earlier descriptor):

- maps get ``eps`` added to every cell before normalising (an all-zero map becomes
  uniform), and bin energies get ``eps`` per bin;
- radial bins by ``floor(rho * K)``, angular bins by ``floor((theta + pi) / 2pi * M)``;
- DC is excluded from the angular bins and the peak search (theta is undefined at
  rho = 0); the angular distribution is normalised over the AC power (uniform when
  there is none);
- the peak search runs on the exactly symmetrised spectrum (P(k) + P(-k)) / 2, so
  the k / -k tie is broken by index order, never by rounding noise, and (rho*,
  theta*) are stable under circular shifts of the map.

Under both, the radial DC share is 1 / (P * ||m||^2), the inverse participation ratio
of the map (1 for a uniform map, 1 / P for a one-hot map), and the power spectrum is
invariant under circular shifts of the map.

Implementation of ``"paper"`` (``fed_asr.half_spectrum``): the power of a real map is
conjugate-symmetric, so the features are read off the ``rfft2`` half spectrum with bin
masks cached per grid, and ``describe`` is one autograd node with a hand-written
backward. The values are those of the definition above up to float rounding (a
k / -k tie of the peak, equal in power and rho*, picks the stored half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fed_asr.config_sections import check_choice, check_positive
from fed_asr.half_spectrum import paper_descriptor, paper_features

__all__ = [
    "DESCRIPTOR_CONVENTIONS",
    "SpectralDescriptor",
    "attention_maps",
    "describe",
    "descriptor_dim",
    "features_per_head",
    "frequency_coordinates",
    "layer_head_features",
    "pool_layer_heads",
]

_EPS = 1e-8
DESCRIPTOR_CONVENTIONS = ("paper", "ours")


@dataclass
class SpectralDescriptor:
    """Spectral descriptor of a batch.

    Attributes
    ----------
    descriptor : Tensor
        (B, D) mean and (population) variance across layer-heads of the per-head
        features, D = 2 (K + 2M + 3). float32.
    angular : Tensor
        (B, M) angular distribution averaged over layer-heads (sums to 1). float32.
    """

    descriptor: Tensor
    angular: Tensor

    def detach(self) -> SpectralDescriptor:
        """Return a copy cut from the autograd graph."""
        return SpectralDescriptor(self.descriptor.detach(), self.angular.detach())


def features_per_head(n_radial: int, n_angular: int) -> int:
    """Return the number of features of one layer-head, K + 2M + 3."""
    return n_radial + 2 * n_angular + 3


def descriptor_dim(n_radial: int, n_angular: int) -> int:
    """Descriptor size D = 2 (K + 2M + 3) (54 with K = M = 8).

    Parameters
    ----------
    n_radial : int
        Number of radial bins K.
    n_angular : int
        Number of angular bins M.

    Returns
    -------
    int
        The descriptor size.

    Raises
    ------
    ValueError
        If a bin count is not positive.
    """
    _check_bins(n_radial, n_angular)
    return 2 * features_per_head(n_radial, n_angular)


def frequency_coordinates(
    gh: int, gw: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Polar frequency coordinates of a Gh x Gw spectrum (unshifted FFT layout).

    Parameters
    ----------
    gh, gw : int
        Grid height (rows, frequency fy) and width (columns, frequency fx).
    device : torch.device | str | None
        Device of the returned tensors.

    Returns
    -------
    rho : Tensor
        (gh, gw) float32, sqrt(fy^2 + fx^2) divided by its maximum, in [0, 1]
        (all zeros on a 1 x 1 grid).
    theta : Tensor
        (gh, gw) float32, atan2(fx, fy) in [-pi, pi].

    Raises
    ------
    ValueError
        If a grid side is not positive.
    """
    if gh <= 0 or gw <= 0:
        raise ValueError(f"`grid` must have positive sides, got ({gh}, {gw}).")
    fy = torch.fft.fftfreq(gh, device=device, dtype=torch.float32)[:, None]  # (gh, 1)
    fx = torch.fft.fftfreq(gw, device=device, dtype=torch.float32)[None, :]  # (1, gw)
    fy, fx = torch.broadcast_tensors(fy, fx)  # (gh, gw) each
    rho = torch.sqrt(fy.square() + fx.square())
    rho = rho / rho.max().clamp_min(1e-12)  # a 1 x 1 grid keeps rho = 0
    theta = torch.atan2(fx, fy)
    return rho, theta


def attention_maps(
    attn: Tensor,
    grid: tuple[int, int],
    token_weights: Tensor | None = None,
    convention: str = "paper",
) -> Tensor:
    """Average attention over text queries into one normalised map per layer-head.

    Parameters
    ----------
    attn : Tensor
        (B, L, H, Tq, P) attention of text queries over the P = Gh * Gw image tokens.
    grid : tuple[int, int]
        (Gh, Gw), row-major layout of the image tokens.
    token_weights : Tensor | None
        (B, Tq) non-negative weights of the query tokens (e.g. a functional-token
        mask). ``None`` or an all-zero row means uniform weights.
    convention : str
        ``"paper"``: divide by the sum clamped at eps (an all-zero map stays 0);
        ``"ours"``: add eps to every cell first (an all-zero map becomes uniform).

    Returns
    -------
    Tensor
        (B, J, Gh, Gw) float32 maps, J = L * H, each clamped at 0 and summing to 1
        (or all zero under ``"paper"`` when the attention is all zero).

    Raises
    ------
    ValueError
        If a shape does not match.
    """
    check_choice("convention", convention, DESCRIPTOR_CONVENTIONS)
    maps = query_mean_attention(attn, grid, token_weights).clamp_min(0.0)  # (B,J,P)
    maps = maps.reshape(*maps.shape[:2], *grid)  # (B, J, Gh, Gw)
    if convention == "paper":
        return maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(_EPS)
    # The eps is added uniformly, so it is shift-invariant and turns an all-zero map
    # into the uniform map instead of 0 / 0.
    maps = maps + _EPS
    return maps / maps.sum(dim=(-2, -1), keepdim=True)


def query_mean_attention(
    attn: Tensor, grid: tuple[int, int], token_weights: Tensor | None = None
) -> Tensor:
    """(B, J, P) float32 attention averaged over the weighted queries, unnormalised.

    Same arguments as :func:`attention_maps`; a map keeps the share of attention its
    queries give the image (at most 1).
    """
    rows, weights = _query_rows(attn, grid, token_weights)  # (B,J,Tq,P), (B,Tq)
    return _query_mean(rows, weights)


def _query_rows(
    attn: Tensor, grid: tuple[int, int], token_weights: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Check the shapes; (B, J, Tq, P) float32 rows and (B, Tq) query weights."""
    if attn.ndim != 5:
        raise ValueError(
            f"`attn` must have shape (B, L, H, Tq, P), got {tuple(attn.shape)}."
        )
    b, n_layers, n_heads, tq, p = attn.shape
    gh, gw = grid
    if gh <= 0 or gw <= 0 or gh * gw != p:
        raise ValueError(
            f"`grid` {tuple(grid)} does not match the {p} image tokens of `attn`."
        )
    weights = _query_weights(token_weights, b, tq, attn.device)  # (B, Tq)
    return attn.float().reshape(b, n_layers * n_heads, tq, p), weights


class _QueryMean(torch.autograd.Function):
    """Weighted mean over query tokens; backward is one broadcast product."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, rows: Tensor, weights: Tensor
    ) -> Tensor:
        ctx.save_for_backward(weights)
        return torch.matmul(weights[:, None, None, :], rows).squeeze(2)  # (B, J, P)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None]:
        (weights,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad[:, :, None, :] * weights[:, None, :, None], None  # (B,J,Tq,P)


def _query_mean(rows: Tensor, weights: Tensor) -> Tensor:
    """(B, J, P) = sum_q weights[b, q] rows[b, j, q]; ``weights`` get no gradient.

    A batched (1, Tq) @ (Tq, P) product (``einsum`` picked a far slower
    contraction); autograd's backward of it is a batch of outer products, several
    times slower than the broadcast product of ``_QueryMean``.
    """
    if rows.requires_grad and torch.is_grad_enabled():
        return _QueryMean.apply(rows, weights.detach())
    return torch.matmul(weights[:, None, None, :], rows).squeeze(2)  # (B, J, P)


def _query_weights(
    token_weights: Tensor | None, b: int, tq: int, device: torch.device
) -> Tensor:
    """(B, Tq) float32 query weights summing to 1 (uniform for None or a zero row)."""
    if token_weights is None:
        return torch.full((b, tq), 1.0 / tq, device=device)
    if tuple(token_weights.shape) != (b, tq):
        raise ValueError(
            f"`token_weights` must have shape {(b, tq)}, "
            f"got {tuple(token_weights.shape)}."
        )
    weights = token_weights.to(device=device, dtype=torch.float32).clamp_min(0.0)
    total = weights.sum(dim=1, keepdim=True)  # (B, 1)
    return torch.where(total > 0, weights / total, 1.0 / tq)  # (B, Tq)


def layer_head_features(
    maps: Tensor, n_radial: int = 8, n_angular: int = 8, convention: str = "paper"
) -> Tensor:
    """Spectral features of each map (DESIGN section 2, steps 3-5).

    Parameters
    ----------
    maps : Tensor
        (B, J, Gh, Gw) non-negative maps summing to 1.
    n_radial : int
        Number K of radial bins over rho in [0, 1]; bin 0 includes DC.
    n_angular : int
        Number M of angular bins over theta in [-pi, pi]; DC in the bin of theta = 0
        under ``"paper"``, excluded under ``"ours"``.
    convention : str
        ``"paper"`` or ``"ours"`` (see the module docstring).

    Returns
    -------
    Tensor
        (B, J, K + 2M + 3) float32: radial distribution (K), angular distribution
        (M), anisotropy = angular / mean(angular) (M), rho*, theta*, peak power.
    """
    _check_bins(n_radial, n_angular)
    check_choice("convention", convention, DESCRIPTOR_CONVENTIONS)
    if convention == "paper":
        return paper_features(maps, n_radial, n_angular)
    b, j, gh, gw = maps.shape
    maps = maps.float()
    spectrum = torch.fft.fft2(maps, norm="ortho")  # (B, J, Gh, Gw) complex
    power = spectrum.real.square() + spectrum.imag.square()  # (B, J, Gh, Gw)
    power = power / (power.sum(dim=(-2, -1), keepdim=True) + _EPS)
    flat = power.reshape(b, j, gh * gw)  # (B, J, P)

    rho, theta = frequency_coordinates(gh, gw, device=maps.device)  # (Gh, Gw) each
    rho_flat, theta_flat = rho.reshape(-1), theta.reshape(-1)  # (P,) each
    not_dc = torch.ones(gh * gw, device=maps.device)  # (P,)
    not_dc[0] = 0.0  # index 0 is (fy, fx) = (0, 0) in the unshifted layout

    radial_bin = (rho_flat * n_radial).floor().long().clamp(0, n_radial - 1)  # (P,)
    radial_onehot = torch.nn.functional.one_hot(radial_bin, n_radial).float()  # (P,K)
    radial = flat @ radial_onehot  # (B, J, K)
    radial = (radial + _EPS) / (radial.sum(-1, keepdim=True) + n_radial * _EPS)

    angle = (theta_flat + math.pi) / (2 * math.pi) * n_angular
    angular_bin = angle.floor().long().clamp(0, n_angular - 1)  # (P,)
    angular_onehot = torch.nn.functional.one_hot(angular_bin, n_angular).float()
    angular_onehot = angular_onehot * not_dc[:, None]  # (P, M), DC row zeroed
    angular = flat @ angular_onehot  # (B, J, M)
    angular = (angular + _EPS) / (angular.sum(-1, keepdim=True) + n_angular * _EPS)
    anisotropy = angular / (angular.mean(-1, keepdim=True) + _EPS)  # (B, J, M)

    # Peak search on the exactly conjugate-symmetric spectrum (see module docstring).
    mirrored = torch.roll(
        torch.flip(power, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1)
    )
    symmetric = 0.5 * (power + mirrored)  # (B, J, Gh, Gw), P(k) == P(-k) exactly
    symmetric = symmetric.reshape(b, j, gh * gw)  # (B, J, P)
    if gh * gw > 1:
        candidates = symmetric.masked_fill(not_dc == 0, -1.0)  # DC never wins
    else:
        candidates = symmetric
    peak = candidates.argmax(dim=-1, keepdim=True)  # (B, J, 1)
    return _with_peak(
        radial, angular, anisotropy, symmetric, peak, rho_flat, theta_flat
    )


def _with_peak(
    radial: Tensor,
    angular: Tensor,
    anisotropy: Tensor,
    power: Tensor,
    peak_index: Tensor,
    rho_flat: Tensor,
    theta_flat: Tensor,
) -> Tensor:
    """Concatenate the bin features with the peak's (rho, theta, power).

    ``power`` is (B, J, P), ``peak_index`` (B, J, 1) its chosen peak bin and
    ``rho_flat``/``theta_flat`` (P,) the frequency coordinates.
    Returns (B, J, K + 2M + 3).
    """
    peak_power = power.gather(-1, peak_index)  # (B, J, 1), differentiable
    peak_rho = rho_flat[peak_index]  # (B, J, 1)
    peak_theta = theta_flat[peak_index]  # (B, J, 1)
    return torch.cat(
        [radial, angular, anisotropy, peak_rho, peak_theta, peak_power], dim=-1
    )


def describe(
    attn: Tensor,
    grid: tuple[int, int],
    token_weights: Tensor | None = None,
    n_radial: int = 8,
    n_angular: int = 8,
    convention: str = "paper",
) -> SpectralDescriptor:
    """Spectral descriptor of each sample from its text-to-image attention.

    Parameters
    ----------
    attn : Tensor
        (B, L, H, Tq, P) attention of the selected layers; any float dtype.
    grid : tuple[int, int]
        (Gh, Gw) with Gh * Gw = P; non-square grids are fine.
    token_weights : Tensor | None
        (B, Tq) weights of the text query tokens; ``None`` or an all-zero row means
        uniform weights.
    n_radial : int
        Number K of radial bins.
    n_angular : int
        Number M of angular bins.
    convention : str
        ``"paper"`` (the paper's code) or ``"ours"`` (see the module docstring).

    Returns
    -------
    SpectralDescriptor
        ``descriptor`` (B, 2(K + 2M + 3)): mean then population variance of the
        per-head features across the J = L * H layer-heads; ``angular`` (B, M): the
        mean angular distribution. Both float32 and differentiable w.r.t. ``attn``.

    Raises
    ------
    ValueError
        If a shape does not match, a bin count is not positive or ``convention`` is
        unknown.
    """
    _check_bins(n_radial, n_angular)
    check_choice("convention", convention, DESCRIPTOR_CONVENTIONS)
    if convention == "paper":  # maps, features, mean and variance in one node
        rows, weights = _query_rows(attn, grid, token_weights)
        descriptor = paper_descriptor(rows, weights, grid, n_radial, n_angular)
        angular = descriptor[:, n_radial : n_radial + n_angular]  # (B, M) of mean
        return SpectralDescriptor(descriptor, angular)
    maps = attention_maps(attn, grid, token_weights, convention)
    feats = layer_head_features(maps, n_radial, n_angular, convention)
    descriptor = pool_layer_heads(feats)  # (B, 2F)
    angular = descriptor[:, n_radial : n_radial + n_angular]  # (B, M) of the mean
    return SpectralDescriptor(descriptor, angular)


def pool_layer_heads(features: Tensor) -> Tensor:
    """(B, 2F): mean then population variance over the J layer-heads of (B, J, F).

    The variance is two-pass (several times faster than ``var`` over dim 1); 0 when
    J = 1.
    """
    mean = features.mean(dim=1)  # (B, F)
    var = (features - mean[:, None]).square().mean(dim=1)  # (B, F)
    return torch.cat([mean, var], dim=-1)


def _check_bins(n_radial: int, n_angular: int) -> None:
    """Raise if a bin count is not positive."""
    check_positive("n_radial", n_radial)
    check_positive("n_angular", n_angular)
