"""Spectral features of real maps on the ``rfft2`` half spectrum (paper convention).

The power spectrum of a real map is conjugate-symmetric, P(k) = P(-k), so the
``rfft2`` half spectrum (Gh, Gw // 2 + 1) carries all of it. Every feature of
``fed_asr.spectral`` under ``convention="paper"`` is a sum of power over frequency
bins, a ratio of such sums or the power at the peak, so it can be read off the half
spectrum: a stored cell counts once for itself and once for its mirror -k when -k is
not stored. The values are those of the full ``fft2`` spectrum up to float rounding.

The bin masks, frequency coordinates and (small grids) the DFT matrix are cached per
grid. ``paper_features`` (per map) and ``paper_descriptor`` (``describe``: query
weighting, features, mean and variance over the layer-heads) are each one autograd
node with a hand-written backward: one ``irfft2`` (autograd's backward of ``rfft2``
runs a full complex FFT) or one matrix product, and no graph of small operations.
``tests/fed_asr/test_half_spectrum.py`` checks values and gradients against autograd
through the full ``fft2`` definition.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "HalfSpectrumBins",
    "half_spectrum_bins",
    "paper_descriptor",
    "paper_features",
]

_EPS = 1e-8
# Up to this many cells (10 x 10) the spectrum is one matrix product with a cached
# DFT matrix, faster than rfft2 on CPU (measured crossover near 12 x 12)
DFT_MAX_CELLS = 100


@lru_cache(maxsize=64)
def _column_scale(gw: int, device: str) -> Tensor:
    """(Gw // 2 + 1,) weight of each half-spectrum column in the power gradient.

    d/dm sum_k g_k |X_k|^2 = 2 Re F^H (g X) over the full spectrum. ``irfft2`` adds
    the mirror of a column whose mirror is not stored, so those columns take g once
    and the self-mirrored ones (0 and, for even Gw, Gw / 2) take 2 g.
    """
    column = torch.arange(gw // 2 + 1, device=device)
    self_mirrored = (column == 0) | (2 * column == gw)
    return self_mirrored.float() + 1.0


@dataclass(frozen=True)
class HalfSpectrumBins:
    """Bin masks and coordinates of a Gh x Gw half spectrum (read-only, cached).

    Attributes
    ----------
    masks : Tensor
        (Ph, K + M + 1) float32, Ph = Gh (Gw // 2 + 1). Columns: radial one-hot (K),
        angular one-hot (M), then each cell's multiplicity (power @ it is the total
        power). A cell's row adds its mirror's when that is not stored.
    n_angular : int
        M (the anisotropy is the angular distribution over its mean 1 / M).
    coords : Tensor
        (Ph, 2) float32 (rho, theta) of each stored cell.
    dft : Tensor | None
        (P, 2 Ph) float32 orthonormal real DFT onto the stored cells, real parts then
        imaginary parts, for grids of at most ``DFT_MAX_CELLS`` cells (where one
        matrix product beats ``rfft2``); None on larger grids.
    """

    masks: Tensor
    coords: Tensor
    n_angular: int
    dft: Tensor | None = None


@lru_cache(maxsize=64)
def half_spectrum_bins(
    gh: int, gw: int, n_radial: int, n_angular: int, device: str
) -> HalfSpectrumBins:
    """Paper-convention bins of the ``rfft2`` half spectrum of a Gh x Gw grid.

    Parameters
    ----------
    gh, gw : int
        Grid height and width.
    n_radial, n_angular : int
        Bin counts K and M (``bucketize`` on even edges, ties to the lower bin; DC
        in radial bin 0 and in the angular bin of theta = 0).
    device : str
        Device of the tensors.

    Returns
    -------
    HalfSpectrumBins
        Cached per arguments; never modify its tensors in place.
    """
    from fed_asr.spectral import frequency_coordinates  # that module imports this one

    rho, theta = frequency_coordinates(gh, gw, device=device)  # (Gh, Gw) each
    radial = F.one_hot(_bucket(rho, 0.0, 1.0, n_radial), n_radial).float()
    angular = F.one_hot(_bucket(theta, -math.pi, math.pi, n_angular), n_angular)
    angular = angular.float()  # (Gh, Gw, M)
    ones = torch.ones(gh, gw, 1, device=device)
    full = torch.cat([radial, angular, ones], dim=-1)  # (Gh, Gw, K + M + 1)
    # Mirror -k of cell (r, c) is ((-r) mod Gh, (-c) mod Gw).
    mirror = torch.roll(torch.flip(full, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    cols = gw // 2 + 1
    column = torch.arange(cols, device=device)  # (Gw // 2 + 1,)
    unstored = ((column > 0) & (2 * column != gw)).float()  # its -c is not a column
    masks = full[:, :cols] + mirror[:, :cols] * unstored[None, :, None]
    coords = torch.stack([rho[:, :cols], theta[:, :cols]], dim=-1)  # (Gh, cols, 2)
    return HalfSpectrumBins(
        masks.reshape(gh * cols, -1),  # (Ph, K + M + 1)
        coords.reshape(gh * cols, 2),  # (Ph, 2)
        n_angular,
        _dft_matrix(gh, gw, device) if gh * gw <= DFT_MAX_CELLS else None,
    )


def _dft_matrix(gh: int, gw: int, device: str) -> Tensor:
    """(P, 2 Ph) orthonormal DFT onto the stored half: [cos | -sin] / sqrt(P)."""
    y = torch.arange(gh, dtype=torch.float64)[:, None, None, None]  # (Gh, 1, 1, 1)
    x = torch.arange(gw, dtype=torch.float64)[None, :, None, None]  # (1, Gw, 1, 1)
    r = torch.arange(gh, dtype=torch.float64)[None, None, :, None]  # (1, 1, Gh, 1)
    c = torch.arange(gw // 2 + 1, dtype=torch.float64)[None, None, None, :]
    angle = 2 * math.pi * (r * y / gh + c * x / gw)  # (Gh, Gw, Gh, Gw // 2 + 1)
    angle = angle.reshape(gh * gw, -1)  # (P, Ph): map cell -> stored frequency
    dft = torch.cat([angle.cos(), -angle.sin()], dim=-1) / math.sqrt(gh * gw)
    return dft.to(device=device, dtype=torch.float32)  # (P, 2 Ph)


def _bucket(values: Tensor, low: float, high: float, n_bins: int) -> Tensor:
    """Index of each value among ``n_bins`` even bins of [low, high] (ties: lower)."""
    edges = torch.linspace(low, high, n_bins + 1, device=values.device)  # (n + 1,)
    return torch.bucketize(values, edges[1:-1].contiguous())  # right=False


@dataclass
class _Forward:
    """Intermediates of ``_paper_forward`` that the backward needs."""

    features: Tensor  # (B, J, K + 2M + 3)
    maps: Tensor  # (B, J, Gh, Gw) normalised
    map_sum: Tensor  # (B, J, 1, 1) sum of the clamped map, before the eps clamp
    spectrum: Tensor  # (B, J, Gh, Gw // 2 + 1) complex, or (B, J, 2 Ph) with a DFT
    total: Tensor  # (B, J, 1) total power, before the eps clamp
    peak: Tensor  # (B, J, 1) index of the peak in the half spectrum

    def tensors(self) -> tuple[Tensor, ...]:
        """The fields in order (for ``save_for_backward``; no copies)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


def _paper_forward(raw: Tensor, bins: HalfSpectrumBins) -> _Forward:
    """Clamp and normalise the maps, then the features (no autograd graph)."""
    b, j, _, _ = raw.shape
    maps = raw.clamp_min(0.0)  # (B, J, Gh, Gw), a new tensor: normalised in place
    map_sum = maps.sum(dim=(-2, -1), keepdim=True)  # (B, J, 1, 1)
    maps.div_(map_sum.clamp_min(_EPS))
    if bins.dft is not None:
        spectrum = maps.reshape(b, j, -1) @ bins.dft  # (B, J, 2 Ph): re, im
        real, imag = spectrum.chunk(2, dim=-1)  # (B, J, Ph) each
        flat = real.square() + imag.square()  # (B, J, Ph), |X|^2
    else:
        spectrum = torch.fft.rfft2(maps, norm="ortho")  # (B, J, Gh, Gw // 2 + 1)
        power = spectrum.real.square()  # contiguous: argmax and matmul run faster
        power.addcmul_(spectrum.imag, spectrum.imag)  # |X|^2 = re^2 + im^2
        flat = power.reshape(b, j, -1)  # (B, J, Ph)
    binned = flat @ bins.masks  # (B, J, K + M + 1), unnormalised
    total = binned[..., -1:]  # (B, J, 1), all the power
    denom = total.clamp_min(_EPS)
    shares = binned[..., :-1] / denom  # (B, J, K + M): radial, angular
    peak = flat.argmax(dim=-1, keepdim=True)  # (B, J, 1), DC (index 0) first
    features = torch.cat(
        [
            shares,
            bins.n_angular * shares[..., -bins.n_angular :],  # (B, J, M) anisotropy
            bins.coords[peak.squeeze(-1)],  # (B, J, 2): rho*, theta*
            flat.gather(-1, peak) / denom,  # (B, J, 1): peak power share
        ],
        dim=-1,
    )
    return _Forward(features, maps, map_sum, spectrum, total, peak)


def _paper_backward(
    grad: Tensor, raw: Tensor, out: _Forward, bins: HalfSpectrumBins
) -> Tensor:
    """Gradient w.r.t. ``raw`` of sum(grad * features) (no autograd graph)."""
    b, j, gh, gw = raw.shape
    n_bins, m = bins.masks.shape[1] - 1, bins.n_angular  # K + M, M
    features, total = out.features, out.total
    denom = total.clamp_min(_EPS)  # (B, J, 1)
    grad_peak = grad[..., -1:]  # rho*, theta* have no gradient
    # features = shares, M * angular shares, peak / denom; shares = binned / denom
    grad_bins = grad[..., :n_bins].clone()  # (B, J, K + M)
    grad_bins[..., -m:] += m * grad[..., n_bins : n_bins + m]  # the anisotropy
    along_bins = (grad_bins * features[..., :n_bins]).sum(-1, keepdim=True)
    grad_denom = -(along_bins + grad_peak * features[..., -1:]) / denom  # (B, J, 1)
    grad_total = torch.where(total >= _EPS, grad_denom, 0.0)  # clamp_min: >= eps
    grad_binned = torch.cat([grad_bins / denom, grad_total], dim=-1)
    grad_flat = grad_binned @ bins.masks.T  # (B, J, Ph)
    grad_flat = grad_flat.scatter_add(-1, out.peak, grad_peak / denom)
    if bins.dft is not None:  # d|X_k|^2 = 2 (re_k d re_k + im_k d im_k)
        grad_spectrum = 2.0 * torch.cat([grad_flat, grad_flat], dim=-1) * out.spectrum
        grad_maps = (grad_spectrum @ bins.dft.T).reshape(b, j, gh, gw)
    else:
        scale = _column_scale(gw, str(raw.device))  # (Gw // 2 + 1,)
        grad_power = grad_flat.reshape(b, j, gh, gw // 2 + 1) * scale
        grad_maps = torch.fft.irfft2(
            out.spectrum * grad_power, s=(gh, gw), norm="ortho"
        )  # (B, J, Gh, Gw)
    # maps = clamped / map_sum.clamp_min(eps)
    along = (grad_maps * out.maps).sum(dim=(-2, -1), keepdim=True)  # (B, J, 1, 1)
    along = torch.where(out.map_sum >= _EPS, along, 0.0)
    grad_maps.sub_(along).div_(out.map_sum.clamp_min(_EPS))  # grad_maps is ours
    # clamp_min(0) passes at raw >= 0: sign + 1 is 0, 1, 2 there; several times
    # faster on CPU than a comparison and a masked fill
    return grad_maps.mul_((raw.sign() + 1.0).clamp_max_(1.0))


class _PaperFeatures(torch.autograd.Function):
    """``paper_features`` with a hand-written backward (one ``irfft2``, one node)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, raw: Tensor, bins: HalfSpectrumBins
    ) -> Tensor:
        out = _paper_forward(raw, bins)
        ctx.save_for_backward(raw, *out.tensors())  # type: ignore[attr-defined]
        ctx.bins = bins  # type: ignore[attr-defined]
        return out.features

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None]:
        raw, *saved = ctx.saved_tensors  # type: ignore[attr-defined]
        return _paper_backward(grad, raw, _Forward(*saved), ctx.bins), None  # type: ignore[attr-defined]


class _PaperDescriptor(torch.autograd.Function):
    """``describe`` under the paper's conventions as one autograd node.

    Query-weighted maps, features, then mean and population variance over the
    layer-heads; the backward chains the three by hand (module docstring).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        rows: Tensor,
        weights: Tensor,
        bins: HalfSpectrumBins,
        grid: tuple[int, int],
    ) -> Tensor:
        b, j, _, _ = rows.shape
        raw = torch.matmul(weights[:, None, None, :], rows)  # (B, J, 1, P)
        raw = raw.reshape(b, j, *grid)  # (B, J, Gh, Gw)
        out = _paper_forward(raw, bins)
        mean = out.features.mean(dim=1)  # (B, F)
        centred = out.features - mean[:, None]  # (B, J, F)
        var = centred.square().mean(dim=1)  # (B, F), population
        ctx.save_for_backward(  # type: ignore[attr-defined]
            weights, centred, raw, *out.tensors()
        )
        ctx.bins = bins  # type: ignore[attr-defined]
        return torch.cat([mean, var], dim=-1)  # (B, 2F)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None, None, None]:
        weights, centred, raw, *saved = ctx.saved_tensors  # type: ignore[attr-defined]
        b, j, gh, gw = raw.shape
        # The large result first: allocated below the temporaries, freeing it later
        # does not shrink the heap (fewer page faults on the next call)
        grad_rows = raw.new_empty(b, j, weights.shape[1], gh * gw)  # (B, J, Tq, P)
        grad_mean, grad_var = grad.chunk(2, dim=-1)  # (B, F) each
        grad_features = (grad_mean[:, None] + 2.0 * grad_var[:, None] * centred) / j
        grad_raw = _paper_backward(grad_features, raw, _Forward(*saved), ctx.bins)  # type: ignore[attr-defined]
        torch.mul(
            grad_raw.reshape(b, j, 1, gh * gw), weights[:, None, :, None], out=grad_rows
        )
        return grad_rows, None, None, None


def paper_descriptor(
    rows: Tensor, weights: Tensor, grid: tuple[int, int], n_radial: int, n_angular: int
) -> Tensor:
    """Descriptor of ``fed_asr.spectral.describe`` under the paper's conventions.

    Parameters
    ----------
    rows : Tensor
        (B, J, Tq, P) float32 attention of the J = L * H layer-heads.
    weights : Tensor
        (B, Tq) query weights summing to 1 (treated as constants: no gradient).
    grid : tuple[int, int]
        (Gh, Gw), Gh * Gw = P.
    n_radial, n_angular : int
        Bin counts K and M.

    Returns
    -------
    Tensor
        (B, 2 (K + 2M + 3)): mean then population variance over the layer-heads of
        ``paper_features`` of the query-weighted maps; differentiable w.r.t. ``rows``.
    """
    bins = half_spectrum_bins(*grid, n_radial, n_angular, str(rows.device))
    if rows.requires_grad and torch.is_grad_enabled():
        return _PaperDescriptor.apply(rows, weights.detach(), bins, tuple(grid))
    b, j, _, _ = rows.shape
    raw = torch.matmul(weights[:, None, None, :], rows).reshape(b, j, *grid)
    features = _paper_forward(raw, bins).features  # (B, J, F)
    mean = features.mean(dim=1)  # (B, F)
    var = (features - mean[:, None]).square().mean(dim=1)  # (B, F)
    return torch.cat([mean, var], dim=-1)


def paper_features(maps: Tensor, n_radial: int, n_angular: int) -> Tensor:
    """Per-map features under the paper's conventions, from the half spectrum.

    Parameters
    ----------
    maps : Tensor
        (B, J, Gh, Gw) maps; clamped at 0 and divided by their sum clamped at eps
        here (a no-op for maps from ``fed_asr.spectral.attention_maps``).
    n_radial, n_angular : int
        Bin counts K and M.

    Returns
    -------
    Tensor
        (B, J, K + 2M + 3) float32: radial (K) and angular (M) power distributions,
        anisotropy (M), rho*, theta* and the power share of the peak (the first
        maximum, DC included). An all-zero map gives zeros. Differentiable w.r.t.
        ``maps``.
    """
    _, _, gh, gw = maps.shape
    bins = half_spectrum_bins(gh, gw, n_radial, n_angular, str(maps.device))
    maps = maps.float()
    if maps.requires_grad and torch.is_grad_enabled():
        return _PaperFeatures.apply(maps, bins)
    return _paper_forward(maps, bins).features
