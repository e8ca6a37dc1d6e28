"""The coherence spectrum: where attention sits relative to the image's content."""

from __future__ import annotations

import pytest
import torch

from fed_asr.coherence import band_coherence, coherence_descriptor, content_maps


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(dim=(-2, -1), keepdim=True)


def test_content_map_is_the_object_on_a_plain_background() -> None:
    # Setup: a 16 x 16 image, background 0.2, an object of value 1 on rows/cols 4..7
    pixels = torch.full((1, 3, 16, 16), 0.2)
    pixels[:, :, 4:8, 4:8] = 1.0

    # Execute: a 4 x 4 grid of 4 x 4 patches
    content = content_maps(pixels, (4, 4))

    # Assert: only patch (1, 1) holds content, at the object's distance sqrt(3) * 0.8
    expected = torch.zeros(1, 4, 4)
    expected[0, 1, 1] = (3 * 0.8**2) ** 0.5
    torch.testing.assert_close(content, expected)


def test_content_map_of_one_colour_is_zero_and_flat_patches_are_refused() -> None:
    assert content_maps(torch.full((2, 3, 8, 8), 0.5), (2, 2)).abs().sum() == 0
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) pixel values"):
        content_maps(torch.zeros(2, 16, 48), (4, 4))


def test_band_coherence_is_one_on_the_content_and_falls_when_attention_moves() -> None:
    # Setup
    torch.manual_seed(0)
    content = torch.rand(3, 8, 8)
    on_content = _normalised(content)[:, None]  # (B, 1, 8, 8)
    moved = torch.roll(on_content, shifts=3, dims=-1)

    # Execute
    aligned = band_coherence(on_content, content, 4)
    after_move = band_coherence(moved, content, 4)
    both_moved = band_coherence(moved, torch.roll(content, shifts=3, dims=-1), 4)

    # Assert: a map on the content is coherent in every band; moving the attention
    # off it lowers the coherence; moving the image with it does not
    torch.testing.assert_close(aligned, torch.ones_like(aligned))
    assert bool((after_move < 0.99).all())
    torch.testing.assert_close(both_moved, aligned)


def test_one_band_coherence_is_the_pearson_correlation_over_patches() -> None:
    # Setup
    torch.manual_seed(1)
    maps = _normalised(torch.rand(2, 3, 6, 5))
    content = torch.rand(2, 6, 5)

    # Execute
    coherence = band_coherence(maps, content, 1)[..., 0]  # (B, J)

    # Assert: Parseval, the AC part of the cross-spectrum is the covariance
    a = maps.flatten(2) - maps.flatten(2).mean(-1, keepdim=True)
    c = content.flatten(1) - content.flatten(1).mean(-1, keepdim=True)
    pearson = (a * c[:, None]).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1)[:, None])
    torch.testing.assert_close(coherence, pearson)


def test_band_coherence_is_zero_where_a_map_has_no_power() -> None:
    content = torch.rand(1, 4, 4)
    uniform = torch.full((1, 2, 4, 4), 1 / 16)
    assert band_coherence(uniform, content, 3).abs().sum() == 0


def test_coherence_descriptor_holds_mean_and_variance_and_is_differentiable() -> None:
    # Setup: (B, L, H, Tq, P) attention over a 4 x 4 grid
    torch.manual_seed(2)
    attn = torch.rand(2, 2, 3, 5, 16, requires_grad=True)
    pixels = torch.rand(2, 3, 16, 16)

    # Execute
    descriptor = coherence_descriptor(attn, (4, 4), pixels, n_bands=3)
    descriptor.sum().backward()

    # Assert
    assert descriptor.shape == (2, 6)
    assert bool((descriptor[:, :3].abs() <= 1 + 1e-6).all())
    assert bool((descriptor[:, 3:] >= 0).all())
    assert attn.grad is not None and attn.grad.abs().sum() > 0


def test_per_head_coherence_descriptor_keeps_every_layer_head() -> None:
    # Setup
    torch.manual_seed(3)
    attn = torch.rand(2, 2, 3, 5, 16)
    pixels = torch.rand(2, 3, 16, 16)
    weights = torch.ones(2, 5)

    # Execute
    each = coherence_descriptor(attn, (4, 4), pixels, weights, 3, per_head=True)
    pooled = coherence_descriptor(attn, (4, 4), pixels, weights, 3)

    # Assert: J = 2 layers x 3 heads, K = 3; the pooled mean is their mean
    assert each.shape == (2, 18)
    torch.testing.assert_close(each.reshape(2, 6, 3).mean(1), pooled[:, :3])
