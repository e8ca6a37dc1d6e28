"""Tests of fed_asr.diagnostics on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from fed_asr.diagnostics import (
    attention_grounding_share,
    grad_norm_ratios,
    spectral_drift,
)
from fed_asr.spectrum import SkillSpectrum


def test_spectral_drift_is_unweighted_mean_d2_per_skill() -> None:
    # Prepare: color mu = (0, 0), var = (1, 4); shape mu = (1, 1), var = (1, 1)
    prototypes = {
        "color": (torch.zeros(2), torch.tensor([1.0, 4.0])),
        "shape": (torch.ones(2), torch.ones(2)),
    }
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 1.0], [9.0, 9.0]])
    skills = ["color", "color", "shape", "count"]

    # Execute
    drift = spectral_drift(x, skills, prototypes)

    # Assert: color (1 + 1) / 2 = 1 and 0 -> 0.5; shape (4 + 0) / 2 = 2; no count
    assert drift == pytest.approx({"color": 0.5, "shape": 2.0})


def test_spectral_drift_reads_present_skills_of_a_spectrum() -> None:
    # Prepare
    spectrum = SkillSpectrum(
        ("color", "shape"),
        mean=torch.zeros(2, 2),
        var=torch.ones(2, 2),
        angular=torch.full((2, 2), 0.5),
        count=torch.tensor([4.0, 0.0]),
    )

    # Execute
    drift = spectral_drift(torch.ones(2, 2), ["color", "shape"], spectrum)

    # Assert
    assert drift == pytest.approx({"color": 1.0})


def test_spectral_drift_length_mismatch_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="len\\(`sample_skills`\\) = 1"):
        spectral_drift(torch.ones(2, 2), ["color"], {})


def test_attention_grounding_share_averages_heads_and_queries() -> None:
    # Prepare: grid 2 x 2; head 0 puts all mass on patch 0, head 1 spreads it
    # evenly; the mask holds patches 0 and 1
    attn = torch.zeros(1, 1, 2, 2, 4)  # (B, L, H, Tq, P)
    attn[0, 0, 0, :, 0] = 1.0
    attn[0, 0, 1] = 0.25
    mask = torch.tensor([[True, True, False, False]])

    # Execute
    share = attention_grounding_share(attn, (2, 2), mask)
    share_grid = attention_grounding_share(attn, (2, 2), mask.reshape(1, 2, 2))

    # Assert: (1 + 0.5) / 2
    torch.testing.assert_close(share, torch.tensor([0.75]))
    torch.testing.assert_close(share_grid, share)


def test_attention_grounding_share_weights_query_tokens() -> None:
    # Prepare: query 0 looks at patch 3, query 1 at patch 0; only query 1 counts
    attn = torch.zeros(1, 1, 1, 2, 4)
    attn[0, 0, 0, 0, 3] = 1.0
    attn[0, 0, 0, 1, 0] = 1.0
    mask = torch.tensor([[True, False, False, False]])

    # Execute
    share = attention_grounding_share(
        attn, (2, 2), mask, token_weights=torch.tensor([[0.0, 1.0]])
    )

    # Assert
    torch.testing.assert_close(share, torch.tensor([1.0]))


def test_attention_grounding_share_wrong_mask_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`patch_mask` must have shape"):
        attention_grounding_share(
            torch.rand(1, 1, 1, 1, 4), (2, 2), torch.ones(1, 3, dtype=torch.bool)
        )


def test_grad_norm_ratios_match_hand_computed_gradients() -> None:
    # Prepare: w = (1, 2); task = 0.5 ||w||^2 -> grad w, norm sqrt 5;
    # geo = 3 w_0 -> grad (3, 0), norm 3; spec ignores w -> 0
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    frozen = torch.ones(2)
    task = 0.5 * w.square().sum()
    terms = {"geo": 3.0 * w[0], "spec": (frozen * 2).sum()}

    # Execute
    ratios = grad_norm_ratios([w, frozen], task, terms)
    (task + terms["geo"]).backward()  # the graph is retained

    # Assert
    assert ratios["geo"] == pytest.approx(3 / math.sqrt(5))
    assert ratios["spec"] == 0.0
    torch.testing.assert_close(w.grad, torch.tensor([4.0, 2.0]))


def test_grad_norm_ratios_without_trainable_params_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        grad_norm_ratios([torch.ones(2)], torch.tensor(0.0), {})
