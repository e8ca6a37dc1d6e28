"""Tests of fed_asr.regularizer: the ASR loss and the geometry term."""

from __future__ import annotations

import math

import pytest
import torch

from fed_asr.config import RegularizerConfig
from fed_asr.regularizer import (
    ASRRegularizer,
    geometry_loss,
    route_samples,
    symmetric_kl,
)
from fed_asr.spectral import SpectralDescriptor, describe
from fed_asr.spectrum import SkillSpectrum, SkillStats

SKILLS = ("color", "count", "shape")


def tiny_spectrum() -> SkillSpectrum:
    """D = 2, M = 2; ``shape`` has no prototype."""
    return SkillSpectrum(
        SKILLS,
        mean=torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]),
        var=torch.tensor([[1.0, 4.0], [1.0, 1.0], [1.0, 1.0]]),
        angular=torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]]),
        count=torch.tensor([3.0, 2.0, 0.0]),
    )


def tiny_desc() -> SpectralDescriptor:
    """Two samples: x = (1, 2), a = (0.25, 0.75), twice."""
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]], requires_grad=True)
    a = torch.tensor([[0.25, 0.75], [0.25, 0.75]], requires_grad=True)
    return SpectralDescriptor(x, a)


def test_regularizer_without_spectrum_is_zero_and_backpropagates() -> None:
    # Prepare
    reg = ASRRegularizer(RegularizerConfig(), None)
    desc = tiny_desc()

    # Execute
    out = reg(desc, torch.rand(2, 3))
    out.loss.backward()

    # Assert
    assert out.loss.item() == 0.0 and out.active_fraction.item() == 0.0
    assert desc.descriptor.grad is not None
    assert (desc.descriptor.grad == 0).all()


def test_regularizer_probs_only_on_skill_without_prototype_is_zero() -> None:
    # Prepare
    reg = ASRRegularizer(RegularizerConfig(), tiny_spectrum())
    desc = tiny_desc()
    probs = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])

    # Execute
    out = reg(desc, probs)
    out.loss.backward()

    # Assert
    assert out.loss.item() == 0.0 and out.active_fraction.item() == 0.0
    assert torch.isfinite(desc.descriptor.grad).all()


def test_regularizer_set_spectrum_turns_loss_on() -> None:
    # Prepare
    reg = ASRRegularizer(RegularizerConfig(), None)
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    before = reg(tiny_desc(), probs).loss

    # Execute
    reg.set_spectrum(tiny_spectrum())
    after = reg(tiny_desc(), probs).loss

    # Assert
    assert before.item() == 0.0
    assert after.item() > 0.0


def test_regularizer_tiny_case_matches_hand_computation() -> None:
    # Prepare: sample 0 has p = (0.2, 0.6, 0.2) -> p~ = (0.25, 0.75) over the two
    # prototypes; sample 1 only has probability on `shape` (no prototype): inactive.
    cfg = RegularizerConfig(lambda_ang=0.1, tau_mah=1.0, sym_kl="sum")
    reg = ASRRegularizer(cfg, tiny_spectrum())
    desc = tiny_desc()
    probs = torch.tensor([[0.2, 0.6, 0.2], [0.0, 0.0, 1.0]])
    # d2_color = (1/1 + 4/4) / 2 = 1, d2_count = (0 + 1/1) / 2 = 0.5
    maha = 0.25 * 1.0 + 0.75 * 0.5
    # symKL((1/4, 3/4), (1/2, 1/2)) = 1/4 ln 3 without the 1/2; to `count` it is 0
    ang = 0.25 * 0.25 * math.log(3.0)
    w = math.exp(-0.5)

    # Execute
    out = reg(desc, probs)
    out.loss.backward()

    # Assert
    expected = torch.tensor(w * (maha + 0.1 * ang))
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.mahalanobis, torch.tensor(maha))
    torch.testing.assert_close(out.angular, torch.tensor(ang), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.weight, torch.tensor(w))
    torch.testing.assert_close(out.active_fraction, torch.tensor(0.5))
    # w is detached: grad_x = w * sum_s p~_s (x - mu_s) / var_s * 2 / D (one active
    # sample out of one): 0.25 * (1, 2/4) + 0.75 * (0, 1)
    grad = torch.tensor([[w * 0.25, w * (0.125 + 0.75)], [0.0, 0.0]])
    torch.testing.assert_close(desc.descriptor.grad, grad, atol=1e-6, rtol=1e-6)


def test_regularizer_wrong_probs_shape_raises() -> None:
    # Prepare
    reg = ASRRegularizer(RegularizerConfig(), tiny_spectrum())

    # Execute / Assert
    with pytest.raises(ValueError, match=r"`skill_probs` must have shape \(2, 3\)"):
        reg(tiny_desc(), torch.rand(2, 2))


def test_regularizer_wrong_descriptor_size_raises() -> None:
    # Prepare
    reg = ASRRegularizer(RegularizerConfig(), tiny_spectrum())
    desc = SpectralDescriptor(torch.rand(2, 5), torch.rand(2, 2))

    # Execute / Assert
    with pytest.raises(ValueError, match="do not match the spectrum"):
        reg(desc, torch.rand(2, 3))


def test_regularizer_backward_through_describe_gives_finite_gradients() -> None:
    # Prepare: prototypes from the same model's descriptors, then a fresh batch
    cfg = RegularizerConfig()
    attn = torch.randn(8, 2, 4, 5, 64).mul(3.0).softmax(-1)
    probs = torch.rand(8, 3).mul(4.0).softmax(-1)
    stats = SkillStats.from_batch(describe(attn, (8, 8)), probs, SKILLS, 0.2)
    reg = ASRRegularizer(cfg, stats.to_prototypes(cfg.cov_floor)).to("cpu")
    logits = torch.randn(4, 2, 4, 5, 64, requires_grad=True)

    # Execute
    desc = describe(logits.softmax(-1).to(torch.bfloat16), (8, 8))
    out = reg(desc, torch.rand(4, 3).softmax(-1))
    out.loss.backward()

    # Assert
    assert out.loss.item() > 0
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_regularizer_question_or_nearest_holds_unrouted_samples_to_nearest() -> None:
    # Prepare: sample 0's question names `color` (prototype): it keeps that weight;
    # sample 1's question only names `shape` (no prototype): under the paper's
    # routing it is inactive, here it meets its nearest prototype, `count`
    # (d2_color = 1, d2_count = 0.5 for x = (1, 2)).
    cfg = RegularizerConfig(lambda_ang=0.0, routing="question_or_nearest")
    reg = ASRRegularizer(cfg, tiny_spectrum())
    desc = tiny_desc()
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    w = math.exp(-0.5)

    # Execute
    out = reg(desc, probs)
    out.loss.backward()

    # Assert: mean over two active samples of w * d2 of the routed prototype
    expected = torch.tensor(w * (1.0 + 0.5) / 2)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.active_fraction, torch.tensor(1.0))
    # sample 0 pulled toward `color` (0, 0) with var (1, 4), sample 1 toward `count`
    # (1, 1) with var (1, 1): grad = w * (x - mu) / var * 2 / D / 2 samples
    grad = torch.tensor([[w * 0.5, w * 0.25], [0.0, w * 0.5]])
    torch.testing.assert_close(desc.descriptor.grad, grad, atol=1e-6, rtol=1e-6)


def test_regularizer_nearest_routing_ignores_the_question() -> None:
    # Prepare: both questions name only `color`; both samples sit nearer `count`
    cfg = RegularizerConfig(lambda_ang=0.0, routing="nearest")
    reg = ASRRegularizer(cfg, tiny_spectrum())
    probs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])

    # Execute
    out = reg(tiny_desc(), probs)
    paper = ASRRegularizer(RegularizerConfig(lambda_ang=0.0), tiny_spectrum())(
        tiny_desc(), probs
    )

    # Assert: d2_count = 0.5 for both under `nearest`, d2_color = 1 under the question
    torch.testing.assert_close(out.mahalanobis, torch.tensor(0.5))
    torch.testing.assert_close(paper.mahalanobis, torch.tensor(1.0))


def test_route_samples_unknown_routing_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`regularizer.routing` must be one of"):
        route_samples(torch.ones(1, 1), torch.ones(1, 1), "closest")


def test_symmetric_kl_is_symmetric_and_zero_on_equal() -> None:
    # Prepare
    p, q = torch.rand(4, 6).softmax(-1), torch.rand(4, 6).softmax(-1)

    # Execute / Assert
    torch.testing.assert_close(symmetric_kl(p, q), symmetric_kl(q, p))
    torch.testing.assert_close(symmetric_kl(p, p), torch.zeros(4))


def test_symmetric_kl_mean_is_half_the_sum_of_both_kls() -> None:
    # Prepare: sum (p - q)(ln p - ln q) = -1/4 ln(1/2) + 1/4 ln(3/2) = ln 3 / 4
    p, q = torch.tensor([0.25, 0.75]), torch.tensor([0.5, 0.5])

    # Execute
    mean, total = symmetric_kl(p, q), symmetric_kl(p, q, reduction="sum")

    # Assert
    torch.testing.assert_close(total, torch.tensor(math.log(3.0) / 4))
    torch.testing.assert_close(mean, torch.tensor(math.log(3.0) / 8))


def test_symmetric_kl_unknown_reduction_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        symmetric_kl(torch.ones(2) / 2, torch.ones(2) / 2, reduction="half")


def test_geometry_loss_tiny_case_matches_hand_computation() -> None:
    # Prepare: cos rows (1, 0) and (0, 1) -> symKL = 2 tanh(1/2) at temperature 1
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, P=2, d=2)
    text_cur = torch.tensor([[[1.0, 0.0]]], requires_grad=True)  # (1, T=1, d=2)
    text_ref = torch.tensor([[[0.0, 1.0]]], requires_grad=True)

    # Execute
    loss = geometry_loss(
        image, text_cur, image, text_ref, torch.ones(1, 1), 1.0, reduction="sum"
    )
    half = geometry_loss(image, text_cur, image, text_ref, torch.ones(1, 1), 1.0)
    loss.backward()

    # Assert
    torch.testing.assert_close(loss, torch.tensor(2 * math.tanh(0.5)))
    torch.testing.assert_close(half, torch.tensor(math.tanh(0.5)))
    assert text_ref.grad is None
    assert text_cur.grad is not None


def test_geometry_loss_identical_models_is_zero() -> None:
    # Prepare
    image, text = torch.randn(2, 16, 8), torch.randn(2, 5, 8)

    # Execute
    loss = geometry_loss(image, text, image, text, torch.ones(2, 5), 0.1)

    # Assert
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-6, rtol=0)


def test_geometry_loss_masked_rows_are_ignored() -> None:
    # Prepare
    image = torch.randn(2, 16, 8)
    text_cur, text_ref = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    changed = text_cur.clone()
    changed[:, 2:] = torch.randn(2, 3, 8)
    changed[1, 1] = torch.randn(8)

    # Execute
    loss = geometry_loss(image, text_cur, image, text_ref, mask, 0.1)
    loss_changed = geometry_loss(image, changed, image, text_ref, mask, 0.1)

    # Assert
    torch.testing.assert_close(loss, loss_changed)
    assert loss.item() > 0


def test_geometry_loss_empty_mask_is_zero_and_backpropagates() -> None:
    # Prepare
    text = torch.randn(2, 5, 8, requires_grad=True)
    image = torch.randn(2, 16, 8)

    # Execute
    loss = geometry_loss(image, text, image, torch.randn(2, 5, 8), torch.zeros(2, 5), 1)
    loss.backward()

    # Assert
    assert loss.item() == 0.0
    assert torch.isfinite(text.grad).all()


def test_geometry_loss_non_positive_temperature_raises() -> None:
    # Prepare
    image, text = torch.randn(1, 4, 8), torch.randn(1, 2, 8)

    # Execute / Assert
    with pytest.raises(ValueError, match="`temperature` must be positive, got 0"):
        geometry_loss(image, text, image, text, torch.ones(1, 2), 0.0)


def test_regularizer_default_symkl_halves_the_angular_term() -> None:
    # Prepare: the tiny case of the test above with sym_kl="mean" (default)
    reg = ASRRegularizer(RegularizerConfig(), tiny_spectrum())
    probs = torch.tensor([[0.2, 0.6, 0.2], [0.0, 0.0, 1.0]])

    # Execute
    out = reg(tiny_desc(), probs)

    # Assert
    expected = 0.25 * 0.25 * math.log(3.0) / 2
    torch.testing.assert_close(out.angular, torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("descriptor", "mine"),
        ("query_tokens", "all"),
        ("sym_kl", "half"),
        ("geometry", "pooled"),
        ("spec_loss", "pull"),
        ("routing", "closest"),
    ],
)
def test_regularizer_config_unknown_choice_raises(field: str, value: str) -> None:
    # Execute / Assert
    with pytest.raises(
        ValueError, match=rf"`regularizer.{field}` must be one of .*got '{value}'"
    ):
        RegularizerConfig(**{field: value})


@pytest.mark.parametrize(("field", "value"), [("hinge_margin", -0.1)])
def test_regularizer_config_negative_margin_raises(field: str, value: float) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=rf"`regularizer.{field}` must be >= 0"):
        RegularizerConfig(**{field: value})


def test_regularizer_config_non_positive_geo_temperature_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`regularizer.geo_temperature` must be"):
        RegularizerConfig(geo_temperature=0.0)


def test_regularizer_config_defaults_follow_the_paper() -> None:
    # Execute
    cfg = RegularizerConfig()

    # Assert
    assert (cfg.geometry, cfg.gamma, cfg.geo_temperature) == ("paper", 0.02, 1.0)
    assert (cfg.descriptor, cfg.sym_kl, cfg.spec_loss) == ("paper", "mean", "paper")
    assert cfg.query_tokens == "function_words"
    assert cfg.routing == "question"
