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


def test_describe_backward_gives_finite_gradients() -> None:
    # Prepare: include a map with exact zeros (clamp) and a uniform map (no AC power)
    attn = make_attention(b=3, grid=(4, 6))
    attn[0, 0, 0] = 0.0
    attn[1] = 1.0 / 24
    attn = attn.requires_grad_()

    # Execute
    desc = describe(attn, (4, 6))
    (desc.descriptor.square().sum() + desc.angular.log().sum()).backward()

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


def test_layer_head_features_uniform_map_puts_radial_energy_at_dc() -> None:
    # Prepare
    maps = torch.full((1, 1, 8, 8), 1.0 / 64)

    # Execute
    feats = layer_head_features(maps, n_radial=4, n_angular=4)[0, 0]

    # Assert: radial (4), angular (4), anisotropy (4), rho*, theta*, peak
    torch.testing.assert_close(feats[:4], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(feats[4:8], torch.full((4,), 0.25))
    torch.testing.assert_close(feats[8:12], torch.ones(4))
    assert feats[14] == pytest.approx(0.0, abs=1e-6)


def test_layer_head_features_vertical_stripes_peak_at_horizontal_frequency() -> None:
    # Prepare: m(y, x) = 1 + cos(2 pi * 2 x / 8), frequency (fy, fx) = (0, +-1/4)
    x = torch.arange(8.0)
    row = 1.0 + torch.cos(2 * math.pi * 2 * x / 8)
    maps = row.expand(8, 8).clone()[None, None] / row.sum() / 8

    # Execute
    feats = layer_head_features(maps, n_radial=8, n_angular=8)[0, 0]

    # Assert
    angular, peak_rho, peak_theta, peak = feats[8:16], feats[24], feats[25], feats[26]
    expected_angular = torch.zeros(8)
    expected_angular[[2, 6]] = 0.5  # theta = -pi/2 -> bin 2, +pi/2 -> bin 6
    torch.testing.assert_close(angular, expected_angular, atol=1e-6, rtol=0)
    assert peak_rho.item() == pytest.approx(0.25 / math.sqrt(0.5), abs=1e-6)
    assert abs(peak_theta.item()) == pytest.approx(math.pi / 2, abs=1e-6)
    # |F|^2 at +-1/4 is 1/4 of the DC power: shares 4/6, 1/6, 1/6
    assert peak.item() == pytest.approx(1 / 6, abs=1e-6)
