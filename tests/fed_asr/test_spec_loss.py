"""Tests of the ASR loss's spectral-term variants (``regularizer.spec_loss``)."""

from __future__ import annotations

import math

import pytest
import torch

from fed_asr.config import RegularizerConfig
from fed_asr.regularizer import ASRRegularizer
from fed_asr.spectral import SpectralDescriptor, describe
from fed_asr.spectrum import SkillSpectrum, SkillStats

SKILLS = ("color", "count", "shape")


def hinge_spectrum() -> SkillSpectrum:
    """One skill, D = 2: mu = (0, 0), var = (1, 4)."""
    return SkillSpectrum(
        ("color",),
        mean=torch.zeros(1, 2),
        var=torch.tensor([[1.0, 4.0]]),
        angular=torch.tensor([[0.5, 0.5]]),
        count=torch.tensor([5.0]),
    )


def test_regularizer_hinge_inside_typical_spread_is_zero_with_zero_gradient() -> None:
    # Prepare: d2 / D = (0.5^2 / 1 + 1^2 / 4) / 2 = 0.25 < 1
    reg = ASRRegularizer(RegularizerConfig(spec_loss="hinge"), hinge_spectrum())
    x = torch.tensor([[0.5, 1.0]], requires_grad=True)
    a = torch.tensor([[0.9, 0.1]], requires_grad=True)

    # Execute
    out = reg(SpectralDescriptor(x, a), torch.ones(1, 1))
    out.loss.backward()

    # Assert
    assert out.loss.item() == 0.0
    torch.testing.assert_close(out.mahalanobis, torch.tensor(0.25))
    torch.testing.assert_close(x.grad, torch.zeros(1, 2))


def test_regularizer_hinge_outside_spread_penalises_excess_and_pulls_back() -> None:
    # Prepare: d2 / D = (2^2 / 1 + 4^2 / 4) / 2 = 4; margin 0.5 -> excess 2.5
    cfg = RegularizerConfig(spec_loss="hinge", hinge_margin=0.5)
    reg = ASRRegularizer(cfg, hinge_spectrum())
    x = torch.tensor([[2.0, 4.0]], requires_grad=True)

    # Execute
    out = reg(SpectralDescriptor(x, torch.full((1, 2), 0.5)), torch.ones(1, 1))
    out.loss.backward()

    # Assert: grad = 2 (x - mu) / var / D = (2, 1)
    torch.testing.assert_close(out.loss, torch.tensor(2.5))
    torch.testing.assert_close(x.grad, torch.tensor([[2.0, 1.0]]))


def test_regularizer_moment_batch_matching_prototype_moments_is_zero() -> None:
    # Prepare: x = mu +- sqrt(var / 2): mean mu, Kish-corrected variance var
    reg = ASRRegularizer(RegularizerConfig(spec_loss="moment"), hinge_spectrum())
    s = torch.tensor([math.sqrt(0.5), math.sqrt(2.0)])
    x = torch.stack([s, -s]).requires_grad_()
    a = torch.full((2, 2), 0.5, requires_grad=True)

    # Execute
    out = reg(SpectralDescriptor(x, a), torch.ones(2, 1))
    out.loss.backward()

    # Assert
    torch.testing.assert_close(out.loss, torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad, torch.zeros(2, 2), atol=1e-5, rtol=0)


def test_regularizer_moment_collapsed_batch_is_penalised_and_spread_pushed_out() -> (
    None
):
    # Prepare: both samples at the prototype mean (the collapse of "paper")
    cfg = RegularizerConfig(spec_loss="moment", cov_floor=1e-4)
    reg = ASRRegularizer(cfg, hinge_spectrum())
    x = torch.tensor([[0.01, -0.02], [-0.01, 0.02]], requires_grad=True)
    a = torch.full((2, 2), 0.5)

    # Execute
    out = reg(SpectralDescriptor(x, a), torch.ones(2, 1))
    out.loss.backward()

    # Assert: spread = 2 * 0.01^2 etc.; the loss is the log-variance term
    spread = torch.tensor([2e-4, 8e-4])
    log_ratio = torch.log(spread + 1e-4) - torch.log(torch.tensor([1.0, 4.0]) + 1e-4)
    torch.testing.assert_close(out.loss, log_ratio.square().mean(), rtol=1e-5, atol=0)
    # Descending the gradient moves the samples apart
    assert (x.grad * x.detach()).sum() < 0


def test_regularizer_moment_single_sample_skips_variance_and_matches_mean() -> None:
    # Prepare: one sample at (1, 2): mean term (1 / 1 + 4 / 4) / 2 = 1
    reg = ASRRegularizer(RegularizerConfig(spec_loss="moment"), hinge_spectrum())
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)

    # Execute
    out = reg(SpectralDescriptor(x, torch.full((1, 2), 0.5)), torch.ones(1, 1))
    out.loss.backward()

    # Assert
    torch.testing.assert_close(out.loss, torch.tensor(1.0))
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 0.5]]))


@pytest.mark.parametrize("spec_loss", ["paper", "hinge", "moment"])
def test_regularizer_every_spec_loss_backpropagates_through_describe(
    spec_loss: str,
) -> None:
    # Prepare: prototypes from one batch, a far-off batch to regularise
    cfg = RegularizerConfig(spec_loss=spec_loss)
    attn = torch.randn(8, 2, 4, 5, 64).mul(3.0).softmax(-1)
    probs = torch.rand(8, 3).mul(4.0).softmax(-1)
    stats = SkillStats.from_batch(describe(attn, (8, 8)), probs, SKILLS, 0.2)
    reg = ASRRegularizer(cfg, stats.to_prototypes(cfg.cov_floor))
    logits = torch.randn(4, 2, 4, 5, 64).mul(8.0).requires_grad_()

    # Execute
    out = reg(describe(logits.softmax(-1), (8, 8)), torch.rand(4, 3).softmax(-1))
    out.loss.backward()

    # Assert
    assert out.loss.item() > 0
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
