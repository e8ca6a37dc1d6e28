"""fed_asr.half_spectrum: the paper-convention features against plain autograd.

The reference below is the full-spectrum definition (``fft2``, power normalised to
sum 1, one-hot bin masks, ``argmax``) in float64, differentiated by autograd. The
fast path (half spectrum; DFT matrix on small grids, ``rfft2`` on larger ones; one
hand-written backward) must give the same values and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fed_asr.half_spectrum import DFT_MAX_CELLS, half_spectrum_bins, paper_features
from fed_asr.spectral import describe, frequency_coordinates

K, M = 5, 6
EPS = 1e-8
# (grid, path): small grids take the DFT matrix, larger ones rfft2
GRIDS = [((8, 8), "dft"), ((3, 7), "dft"), ((12, 12), "fft"), ((11, 14), "fft")]


def reference_features(maps: torch.Tensor) -> torch.Tensor:
    """(B, J, K + 2M + 3) from the full fft2 spectrum, every step a torch op."""
    b, j, gh, gw = maps.shape
    maps = maps.clamp_min(0.0)
    maps = maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(EPS)
    power = torch.fft.fft2(maps, norm="ortho").abs().square().reshape(b, j, -1)
    power = power / power.sum(-1, keepdim=True).clamp_min(EPS)
    rho, theta = frequency_coordinates(gh, gw)
    rho, theta = rho.reshape(-1).double(), theta.reshape(-1).double()
    radial_edges = torch.linspace(0.0, 1.0, K + 1, dtype=torch.float64)[1:-1]
    angular_edges = torch.linspace(-math.pi, math.pi, M + 1, dtype=torch.float64)
    radial_bins = torch.bucketize(rho.float(), radial_edges.float().contiguous())
    angular_bins = torch.bucketize(
        theta.float(), angular_edges[1:-1].float().contiguous()
    )
    radial = power @ F.one_hot(radial_bins, K).to(power.dtype)
    radial = radial / radial.sum(-1, keepdim=True).clamp_min(EPS)
    angular = power @ F.one_hot(angular_bins, M).to(power.dtype)
    angular = angular / angular.sum(-1, keepdim=True).clamp_min(EPS)
    anisotropy = angular / angular.mean(-1, keepdim=True).clamp_min(EPS)
    peak = power.argmax(-1, keepdim=True)
    return torch.cat(
        [radial, angular, anisotropy, rho[peak], theta[peak], power.gather(-1, peak)],
        dim=-1,
    )


def random_maps(grid: tuple[int, int]) -> torch.Tensor:
    """(3, 4, Gh, Gw) softmax maps, one all-zero and one with negative cells."""
    maps = torch.randn(3, 4, grid[0] * grid[1]).mul(2.0).softmax(-1)
    maps = maps.reshape(3, 4, *grid)
    maps[0, 0] = 0.0
    maps[1, 1] -= 0.5 / (grid[0] * grid[1])
    return maps


@pytest.mark.parametrize(("grid", "path"), GRIDS)
def test_paper_features_match_full_spectrum_values_and_gradients(
    grid: tuple[int, int], path: str
) -> None:
    # Prepare
    maps = random_maps(grid)
    fast_in = maps.clone().requires_grad_()
    ref_in = maps.double().requires_grad_()
    weights = torch.randn(3, 4, K + 2 * M + 3, dtype=torch.float64)
    weights[..., K + 2 * M : K + 2 * M + 2] = 0.0  # rho*, theta*: piecewise constant

    # Execute
    fast = paper_features(fast_in, K, M)
    ref = reference_features(ref_in)
    (fast.double() * weights).sum().backward()
    (ref * weights).sum().backward()

    # Assert
    uses_dft = half_spectrum_bins(*grid, K, M, "cpu").dft is not None
    assert uses_dft == (path == "dft") == (grid[0] * grid[1] <= DFT_MAX_CELLS)
    torch.testing.assert_close(fast.double(), ref, atol=2e-6, rtol=1e-5)
    assert fast_in.grad is not None and ref_in.grad is not None
    torch.testing.assert_close(
        fast_in.grad.double(), ref_in.grad, atol=1e-5 * ref_in.grad.abs().max(), rtol=0
    )


@pytest.mark.parametrize(("grid", "path"), GRIDS)
def test_describe_paper_gradient_matches_autograd_reference(
    grid: tuple[int, int], path: str
) -> None:
    # Prepare: (B, L, H, Tq, P) attention and a token mask with an empty row
    attn = torch.randn(2, 2, 2, 3, grid[0] * grid[1]).mul(3.0).softmax(-1)
    tokens = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    fast_in = attn.clone().requires_grad_()
    ref_in = attn.double().requires_grad_()
    probe_d = torch.randn(2, 2 * (K + 2 * M + 3), dtype=torch.float64)
    probe_a = torch.randn(2, M, dtype=torch.float64)

    # Execute
    fast = describe(fast_in, grid, tokens, K, M)
    w = torch.where(tokens.sum(1, keepdim=True) > 0, tokens, 1.0).double()
    w = w / w.sum(1, keepdim=True)
    ref_maps = torch.einsum("blhqp,bq->blhp", ref_in, w).reshape(2, 4, *grid)
    feats = reference_features(ref_maps)
    mean, var = feats.mean(1), feats.var(1, unbiased=False)
    ref_desc, ref_angular = torch.cat([mean, var], -1), mean[:, K : K + M]
    (
        (fast.descriptor.double() * probe_d).sum() + (fast.angular * probe_a).sum()
    ).backward()
    ((ref_desc * probe_d).sum() + (ref_angular * probe_a).sum()).backward()

    # Assert
    torch.testing.assert_close(fast.descriptor.double(), ref_desc, atol=2e-6, rtol=1e-5)
    assert fast_in.grad is not None and ref_in.grad is not None
    torch.testing.assert_close(
        fast_in.grad.double(), ref_in.grad, atol=1e-5 * ref_in.grad.abs().max(), rtol=0
    )


def test_half_spectrum_bins_masks_count_every_frequency_once() -> None:
    # Prepare / Execute: an odd and an even width
    for grid in ((4, 7), (5, 6)):
        bins = half_spectrum_bins(*grid, K, M, "cpu")

        # Assert: radial, angular and multiplicity columns each cover P cells
        cells = grid[0] * grid[1]
        assert bins.masks[:, :K].sum() == cells
        assert bins.masks[:, K : K + M].sum() == cells
        assert bins.masks[:, -1].sum() == cells
