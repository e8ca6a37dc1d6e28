"""Tests of fed_asr.spectral: attention maps -> spectral descriptors."""

from __future__ import annotations

import math

import pytest
import torch

from fed_asr.spectral import (
    attention_maps,
    describe,
    descriptor_dim,
    frequency_coordinates,
    layer_head_features,
)


def make_attention(
    b: int = 3, layers: int = 2, heads: int = 4, tq: int = 5, grid=(8, 8)
) -> torch.Tensor:
    """Softmax attention of random logits, (B, L, H, Tq, P)."""
    p = grid[0] * grid[1]
    return torch.randn(b, layers, heads, tq, p).mul(3.0).softmax(dim=-1)


def roll_grid(attn: torch.Tensor, grid, shifts) -> torch.Tensor:
    """Circularly shift every map of ``attn`` on its (Gh, Gw) grid."""
    shape = attn.shape
    grids = attn.reshape(*shape[:-1], *grid)  # (B, L, H, Tq, Gh, Gw)
    return torch.roll(grids, shifts=shifts, dims=(-2, -1)).reshape(shape)


def test_descriptor_dim_defaults_is_54() -> None:
    # Execute
    dim = descriptor_dim(8, 8)

    # Assert
    assert dim == 54


def test_descriptor_dim_non_positive_bins_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`n_angular` must be positive, got 0"):
        descriptor_dim(8, 0)


@pytest.mark.parametrize(
    ("grid", "n_radial", "n_angular"), [((8, 8), 8, 8), ((4, 6), 5, 6), ((3, 7), 4, 3)]
)
def test_describe_any_grid_returns_descriptor_of_dim_2_k_2m_3(
    grid, n_radial, n_angular
) -> None:
    # Prepare
    attn = make_attention(grid=grid)

    # Execute
    desc = describe(attn, grid, n_radial=n_radial, n_angular=n_angular)

    # Assert
    dim = 2 * (n_radial + 2 * n_angular + 3)
    assert desc.descriptor.shape == (3, dim) == (3, descriptor_dim(n_radial, n_angular))
    assert desc.angular.shape == (3, n_angular)
    assert desc.descriptor.dtype == torch.float32
    torch.testing.assert_close(desc.angular.sum(-1), torch.ones(3))
    assert torch.isfinite(desc.descriptor).all()


@pytest.mark.parametrize(
    ("grid", "shifts"), [((8, 8), (1, 0)), ((8, 8), (3, 5)), ((4, 6), (1, 4))]
)
def test_describe_circular_shift_leaves_descriptor_unchanged(grid, shifts) -> None:
    # Prepare
    attn = make_attention(b=4, grid=grid)
    shifted = roll_grid(attn, grid, shifts)

    # Execute
    desc = describe(attn, grid)
    desc_shifted = describe(shifted, grid)

    # Assert
    assert not torch.allclose(attn, shifted)
    torch.testing.assert_close(
        desc_shifted.descriptor, desc.descriptor, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(desc_shifted.angular, desc.angular, atol=1e-5, rtol=0)


@pytest.mark.parametrize("convention", ["paper", "ours"])
def test_describe_backward_gives_finite_gradients(convention: str) -> None:
    # Prepare: include a map with exact zeros (clamp) and a uniform map (no AC power)
    attn = make_attention(b=3, grid=(4, 6))
    attn[0, 0, 0] = 0.0
    attn[1] = 1.0 / 24
    attn = attn.requires_grad_()

    # Execute
    desc = describe(attn, (4, 6), convention=convention)
    angular = desc.angular.clamp_min(1e-6)  # "paper" puts a uniform map in one bin
    (desc.descriptor.square().sum() + angular.log().sum()).backward()

    # Assert
    assert attn.grad is not None
    assert torch.isfinite(attn.grad).all()
    assert attn.grad.abs().sum() > 0


def test_describe_bfloat16_input_computes_in_float32() -> None:
    # Prepare
    attn = make_attention().to(torch.bfloat16)

    # Execute
    desc_bf16 = describe(attn, (8, 8))
    desc_f32 = describe(attn.float(), (8, 8))

    # Assert
    assert desc_bf16.descriptor.dtype == torch.float32
    torch.testing.assert_close(desc_bf16.descriptor, desc_f32.descriptor)


def test_describe_zero_weight_row_falls_back_to_uniform() -> None:
    # Prepare
    attn = make_attention(b=2, tq=4)
    weights = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])

    # Execute
    weighted = describe(attn, (8, 8), token_weights=weights)
    uniform = describe(attn, (8, 8))
    one_token = describe(attn[:, :, :, 1:2], (8, 8))

    # Assert
    torch.testing.assert_close(weighted.descriptor[0], uniform.descriptor[0])
    torch.testing.assert_close(weighted.descriptor[1], one_token.descriptor[1])


def test_attention_maps_wrong_grid_raises() -> None:
    # Prepare
    attn = make_attention(grid=(8, 8))

    # Execute / Assert
    with pytest.raises(ValueError, match=r"`grid` \(4, 8\) does not match the 64"):
        attention_maps(attn, (4, 8))


def test_attention_maps_wrong_token_weights_raises() -> None:
    # Prepare
    attn = make_attention(b=3, tq=5)

    # Execute / Assert
    with pytest.raises(ValueError, match="`token_weights` must have shape"):
        attention_maps(attn, (8, 8), token_weights=torch.ones(3, 4))


def test_attention_maps_negative_values_are_clamped_and_normalised() -> None:
    # Prepare
    attn = torch.randn(2, 1, 3, 2, 12)

    # Execute
    maps = attention_maps(attn, (3, 4))

    # Assert
    assert maps.shape == (2, 3, 3, 4)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, 3))


def test_frequency_coordinates_non_square_grid_ranges() -> None:
    # Execute
    rho, theta = frequency_coordinates(4, 6)

    # Assert
    assert rho.shape == theta.shape == (4, 6)
    assert rho[0, 0] == 0 and rho.max() == 1 and rho.min() >= 0
    assert theta.min() >= -math.pi and theta.max() <= math.pi
    # (fy, fx) = (0, 1/6): theta = atan2(fx, fy) = pi / 2
    assert theta[0, 1] == pytest.approx(math.pi / 2)
    assert theta[1, 0] == pytest.approx(0.0)


def test_layer_head_features_ours_uniform_map_puts_radial_energy_at_dc() -> None:
    # Prepare
    maps = torch.full((1, 1, 8, 8), 1.0 / 64)

    # Execute
    feats = layer_head_features(maps, n_radial=4, n_angular=4, convention="ours")[0, 0]

    # Assert: radial (4), angular (4), anisotropy (4), rho*, theta*, peak
    torch.testing.assert_close(feats[:4], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(feats[4:8], torch.full((4,), 0.25))
    torch.testing.assert_close(feats[8:12], torch.ones(4))
    assert feats[14] == pytest.approx(0.0, abs=1e-6)


def test_layer_head_features_ours_vertical_stripes_peak_at_horizontal_frequency() -> (
    None
):
    # Prepare: m(y, x) = 1 + cos(2 pi * 2 x / 8), frequency (fy, fx) = (0, +-1/4)
    x = torch.arange(8.0)
    row = 1.0 + torch.cos(2 * math.pi * 2 * x / 8)
    maps = row.expand(8, 8).clone()[None, None] / row.sum() / 8

    # Execute
    feats = layer_head_features(maps, n_radial=8, n_angular=8, convention="ours")[0, 0]

    # Assert
    angular, peak_rho, peak_theta, peak = feats[8:16], feats[24], feats[25], feats[26]
    expected_angular = torch.zeros(8)
    expected_angular[[2, 6]] = 0.5  # theta = -pi/2 -> bin 2, +pi/2 -> bin 6
    torch.testing.assert_close(angular, expected_angular, atol=1e-6, rtol=0)
    assert peak_rho.item() == pytest.approx(0.25 / math.sqrt(0.5), abs=1e-6)
    assert abs(peak_theta.item()) == pytest.approx(math.pi / 2, abs=1e-6)
    # |F|^2 at +-1/4 is 1/4 of the DC power: shares 4/6, 1/6, 1/6
    assert peak.item() == pytest.approx(1 / 6, abs=1e-6)


def test_layer_head_features_paper_uniform_map_puts_everything_at_dc() -> None:
    # Prepare
    maps = torch.full((1, 1, 8, 8), 1.0 / 64)

    # Execute
    feats = layer_head_features(maps, n_radial=4, n_angular=4)[0, 0]

    # Assert: DC (theta = 0) falls in angular bin 1 of [-pi, -pi/2, 0, pi/2, pi]
    # (an inner edge goes to the lower bin); the peak is DC with all the power.
    torch.testing.assert_close(feats[:4], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(feats[4:8], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(feats[8:12], torch.tensor([0.0, 4.0, 0.0, 0.0]))
    torch.testing.assert_close(feats[12:], torch.tensor([0.0, 0.0, 1.0]))


def test_layer_head_features_paper_vertical_stripes_keep_dc_in_angular_and_peak() -> (
    None
):
    # Prepare: m(y, x) = 1 + cos(2 pi * 2 x / 8): power shares 4/6 at DC and 1/6 at
    # (fy, fx) = (0, +-1/4), theta = +-pi/2
    x = torch.arange(8.0)
    row = 1.0 + torch.cos(2 * math.pi * 2 * x / 8)
    maps = row.expand(8, 8).clone()[None, None] / row.sum() / 8

    # Execute
    feats = layer_head_features(maps, n_radial=8, n_angular=8)[0, 0]

    # Assert: edges at k pi / 4; -pi/2 -> bin 1, 0 (DC) -> bin 3, +pi/2 -> bin 5
    expected_angular = torch.zeros(8)
    expected_angular[[1, 3, 5]] = torch.tensor([1 / 6, 4 / 6, 1 / 6])
    torch.testing.assert_close(feats[8:16], expected_angular, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        feats[24:], torch.tensor([0.0, 0.0, 4 / 6]), atol=1e-6, rtol=0
    )


def test_attention_maps_paper_all_zero_map_stays_zero() -> None:
    # Prepare
    attn = torch.zeros(1, 1, 1, 2, 12)

    # Execute
    paper = attention_maps(attn, (3, 4))
    ours = attention_maps(attn, (3, 4), convention="ours")

    # Assert
    torch.testing.assert_close(paper, torch.zeros(1, 1, 3, 4))
    torch.testing.assert_close(ours, torch.full((1, 1, 3, 4), 1 / 12))


def test_describe_unknown_convention_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`convention` must be one of"):
        describe(make_attention(), (8, 8), convention="mine")


def _reference_paper_descriptor(
    attn: torch.Tensor, weights: torch.Tensor, gh: int, gw: int, k: int, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN section 2 written out one sample and one layer-head at a time."""
    eps = 1e-8
    p = gh * gw

    def fftfreq(n: int) -> torch.Tensor:
        return torch.tensor([(i if i < (n + 1) // 2 else i - n) / n for i in range(n)])

    fy, fx = fftfreq(gh), fftfreq(gw)
    # Orthonormal 2-D DFT as an explicit (P, P) matrix over row-major cells.
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ky, kx = ys.reshape(-1).double(), xs.reshape(-1).double()
    phase = (
        -2 * math.pi * (ky[:, None] * ky[None, :] / gh + kx[:, None] * kx[None, :] / gw)
    )
    dft = torch.polar(torch.ones(p, p, dtype=torch.float64), phase) / math.sqrt(p)
    rho = torch.sqrt(fy[ys.reshape(-1)] ** 2 + fx[xs.reshape(-1)] ** 2)
    rho = rho / rho.max()
    theta = torch.atan2(fx[xs.reshape(-1)], fy[ys.reshape(-1)])
    radial_edges = torch.linspace(0.0, 1.0, k + 1)
    angular_edges = torch.linspace(-math.pi, math.pi, m + 1)
    radial_bin = torch.bucketize(rho.float(), radial_edges[1:-1].contiguous())
    angular_bin = torch.bucketize(theta.float(), angular_edges[1:-1].contiguous())
    descriptors, angulars = [], []
    for b in range(attn.shape[0]):
        w = weights[b] / weights[b].sum()
        feats = []
        for layer in range(attn.shape[1]):
            for head in range(attn.shape[2]):
                cell = (w[:, None] * attn[b, layer, head]).sum(0).clamp_min(0.0)
                cell = cell / cell.sum().clamp_min(eps)  # (P,)
                power = (dft.to(torch.complex128) @ cell.to(torch.complex128)).abs()
                power = power.square()
                power = power / power.sum().clamp_min(eps)
                radial = torch.stack(
                    [power[radial_bin == i].sum() for i in range(k)]
                ).float()
                radial = radial / radial.sum().clamp_min(eps)
                angular = torch.stack(
                    [power[angular_bin == i].sum() for i in range(m)]
                ).float()
                angular = angular / angular.sum().clamp_min(eps)
                aniso = angular / angular.mean().clamp_min(eps)
                peak = int(power.argmax())
                tail = torch.tensor([rho[peak], theta[peak], power[peak]]).float()
                feats.append(torch.cat([radial, angular, aniso, tail]))
        stacked = torch.stack(feats)  # (J, F)
        descriptors.append(torch.cat([stacked.mean(0), stacked.var(0, unbiased=False)]))
        angulars.append(stacked[:, k : k + m].mean(0))
    return torch.stack(descriptors), torch.stack(angulars)


@pytest.mark.parametrize(("grid", "k", "m"), [((3, 4), 3, 4), ((4, 4), 4, 6)])
def test_describe_paper_matches_hand_written_reference(grid, k: int, m: int) -> None:
    # Prepare: fixed small maps; two layer-heads, three queries, a token mask
    gh, gw = grid
    p = gh * gw
    values = torch.arange(2 * 1 * 2 * 3 * p, dtype=torch.float32)
    attn = torch.sin(values * 0.37).abs().reshape(2, 1, 2, 3, p)  # (B, L, H, Tq, P)
    attn[1, 0, 1, 2] = torch.linspace(0.0, 1.0, p)  # a ramp
    weights = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])

    # Execute
    desc = describe(attn, grid, token_weights=weights, n_radial=k, n_angular=m)
    expected, expected_angular = _reference_paper_descriptor(
        attn, weights, gh, gw, k, m
    )

    # Assert
    torch.testing.assert_close(desc.descriptor, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(desc.angular, expected_angular, atol=1e-5, rtol=1e-4)
