"""Tests of fed_asr.geometry: the paper's pooled B x B geometry term."""

from __future__ import annotations

import math

import pytest
import torch

from fed_asr.geometry import (
    batch_geometry_loss,
    pack_pooled,
    pooled_embeddings,
    unpack_pooled,
)


def test_pooled_embeddings_mean_pools_images_and_masked_text() -> None:
    # Prepare
    image = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])  # (1, P=2, H=2)
    text = torch.tensor([[[2.0, 2.0], [4.0, 0.0], [100.0, 100.0]]])  # (1, T=3, H=2)
    mask = torch.tensor([[True, True, False]])

    # Execute
    img, txt = pooled_embeddings(image, text, mask)

    # Assert
    torch.testing.assert_close(img, torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(txt, torch.tensor([[3.0, 1.0]]))


def test_pooled_embeddings_empty_mask_gives_zero_text_embedding() -> None:
    # Execute
    _, txt = pooled_embeddings(
        torch.randn(2, 4, 3), torch.randn(2, 5, 3), torch.zeros(2, 5)
    )

    # Assert
    torch.testing.assert_close(txt, torch.zeros(2, 3))


def test_pooled_embeddings_wrong_mask_shape_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"`mask` must have shape \(2, 5\)"):
        pooled_embeddings(torch.randn(2, 4, 3), torch.randn(2, 5, 3), torch.ones(2, 4))


def test_batch_geometry_loss_tiny_case_matches_hand_computation() -> None:
    # Prepare: S_cur = I, S_ref = swap; each row: softmax (e, 1) vs (1, e) ->
    # KL(p||q) + KL(q||p) = 2 tanh(1/2), so symKL with the 1/2 is tanh(1/2)
    img = torch.eye(2)
    cur_txt = torch.eye(2).requires_grad_()
    ref_txt = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)

    # Execute
    loss = batch_geometry_loss(img, cur_txt, img, ref_txt)
    total = batch_geometry_loss(img, cur_txt, img, ref_txt, reduction="sum")
    loss.backward()

    # Assert
    torch.testing.assert_close(loss, torch.tensor(math.tanh(0.5)))
    torch.testing.assert_close(total, torch.tensor(2 * math.tanh(0.5)))
    assert ref_txt.grad is None
    assert cur_txt.grad is not None and cur_txt.grad.abs().sum() > 0


def test_batch_geometry_loss_identical_models_is_zero() -> None:
    # Prepare
    img, txt = torch.randn(4, 8), torch.randn(4, 8)

    # Execute
    loss = batch_geometry_loss(img, txt, img, txt, temperature=1.0)

    # Assert
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-7, rtol=0)


def test_batch_geometry_loss_temperature_sharpens_rows() -> None:
    # Prepare
    img = torch.randn(3, 8)
    cur, ref = torch.randn(3, 8), torch.randn(3, 8)

    # Execute
    warm = batch_geometry_loss(img, cur, img, ref, temperature=1.0)
    cold = batch_geometry_loss(img, cur, img, ref, temperature=0.1)

    # Assert
    assert cold > warm > 0


def test_batch_geometry_loss_shape_mismatch_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="same \\(B, H\\) shape"):
        batch_geometry_loss(
            torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4)
        )


def test_batch_geometry_loss_non_positive_temperature_raises() -> None:
    # Prepare
    x = torch.randn(2, 4)

    # Execute / Assert
    with pytest.raises(ValueError, match="`temperature` must be positive, got 0"):
        batch_geometry_loss(x, x, x, x, temperature=0.0)


def test_pack_pooled_round_trips() -> None:
    # Prepare
    img, txt = torch.randn(3, 5), torch.randn(3, 5)

    # Execute
    packed = pack_pooled(img, txt)
    img_back, txt_back = unpack_pooled(packed)

    # Assert
    assert packed.shape == (3, 1, 10)
    torch.testing.assert_close(img_back, img)
    torch.testing.assert_close(txt_back, txt)
