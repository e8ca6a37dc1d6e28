"""``attention_distill``: the previous adapter's attention maps on the current batch."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from tiny_lora import small_stream, tiny_lora_model

from fed_asr.config import (
    MethodConfig,
    RegularizerConfig,
)
from fed_asr.methods import (
    PREVIOUS_ADAPTER,
    StepContext,
    build_method,
    trainable_parameters,
)
from fed_asr.methods.attention_distill import (
    map_distillation_loss,
    query_weighted_maps,
    spectral_distillation_loss,
    with_rest_mass,
)
from fed_asr.models import adapter_state, forward_with_attention
from fed_asr.spectral import SpectralDescriptor

REG = RegularizerConfig(l_sel=2)


def _step_context(model: torch.nn.Module, batch: dict) -> StepContext:
    """A training step's context: the batch's attention under the current adapter."""
    forward = partial(forward_with_attention, model, batch, REG.l_sel, "selective")
    return StepContext(
        model=model,
        batch=batch,
        capture=forward(hidden=False),
        skill_probs=torch.zeros(4, 1),
        forward=forward,
    )


def _perturb_adapter(model: torch.nn.Module) -> None:
    """Move every trainable (LoRA) weight, so the student differs from its teacher."""
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.3 * torch.randn_like(p))


def test_query_weighted_maps_average_the_weighted_rows_and_sum_to_one() -> None:
    # Prepare: one sample, one layer-head, two query rows over 2 cells
    attn = torch.tensor([[0.6, 0.2], [0.1, 0.3]]).reshape(1, 1, 1, 2, 2)
    weights = torch.tensor([[1.0, 0.0]])

    # Execute
    maps = query_weighted_maps(attn, weights)

    # Assert: only row 0 counts, renormalised over the cells
    torch.testing.assert_close(maps, torch.tensor([0.75, 0.25]).reshape(1, 1, 1, 2))
    kl = map_distillation_loss(maps, torch.tensor([0.5, 0.5]).reshape(1, 1, 1, 2))
    expected = 0.5 * (
        torch.log(torch.tensor(0.5 / 0.75)) + torch.log(torch.tensor(2.0))
    )
    torch.testing.assert_close(kl, expected)


def test_with_rest_mass_keeps_the_image_share_and_adds_the_rest() -> None:
    # Prepare: one query row putting 0.3 + 0.1 of its attention on the two cells
    attn = torch.tensor([[0.3, 0.1], [0.5, 0.5]]).reshape(1, 1, 1, 2, 2)
    weights = torch.tensor([[1.0, 0.0]])

    # Execute
    bins = with_rest_mass(attn, weights)

    # Assert
    torch.testing.assert_close(bins, torch.tensor([0.3, 0.1, 0.6]).reshape(1, 1, 1, 3))


def test_spectral_distillation_standardises_features_by_the_teacher_spread() -> None:
    # Prepare: two samples, two features; the teacher's batch variance is 1 and 0
    teacher = SpectralDescriptor(
        torch.tensor([[0.0, 5.0], [2.0, 5.0]]), torch.zeros(2, 1)
    )
    student = SpectralDescriptor(
        torch.tensor([[1.0, 5.1], [2.0, 5.0]]), torch.zeros(2, 1)
    )

    # Execute
    loss = spectral_distillation_loss(student, teacher, floor=0.01)

    # Assert: feature 0 (1^2 / 1) and feature 1 (0.1^2 / floor 0.01), mean of 4 cells
    torch.testing.assert_close(loss, torch.tensor((1.0 + 1.0) / 4))


@pytest.mark.parametrize(
    "options",
    [
        {"image_mass": False},
        {"image_mass": True},
        {"match": "spectrum"},
        {"match": "coherence"},
        {"match": "spectrum", "heads": "each"},
        {"match": "coherence", "heads": "each"},
    ],
    ids=[
        "maps",
        "image_mass",
        "spectrum",
        "coherence",
        "spectrum_each",
        "coherence_each",
    ],
)
def test_attention_distill_zero_against_itself_positive_and_differentiable_after(
    options: dict[str, object],
) -> None:
    # Prepare: the teacher is the current adapter
    stream = small_stream()
    model, collator = tiny_lora_model(stream)
    method = build_method(MethodConfig(name="attention_distill", options=options), REG)
    batch = collator(stream.stages[0].train[:4])

    assert method.penalties(_step_context(model, batch)) == {}  # no teacher yet
    method.set_memory(model, {PREVIOUS_ADAPTER: adapter_state(model)})

    # Execute
    same = method.penalties(_step_context(model, batch))["attn"]
    _perturb_adapter(model)
    differs = method.penalties(_step_context(model, batch))["attn"]
    differs.backward()

    # Assert
    torch.testing.assert_close(same, torch.tensor(0.0), atol=1e-6, rtol=0)
    assert float(differs.detach()) > 1e-6
    grads = [p.grad for p in trainable_parameters(model).values()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_attention_distill_refuses_a_negative_weight() -> None:
    with pytest.raises(ValueError, match="method.options.weight"):
        build_method(
            MethodConfig(name="attention_distill", options={"weight": -1.0}), REG
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"match": "phase"}, "method.options.match"),
        ({"match": "spectrum", "image_mass": True}, "image_mass applies to match=maps"),
        ({"match": "coherence", "image_mass": True}, "image_mass applies"),
        ({"heads": "each"}, "heads applies to match=spectrum"),
        ({"match": "coherence", "heads": "all"}, "method.options.heads"),
    ],
)
def test_attention_distill_refuses_bad_match_options(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_method(MethodConfig(name="attention_distill", options=options), REG)


def test_spectral_distill_is_attention_distill_of_per_head_spectra() -> None:
    # Prepare: the same model, batch and teacher for both methods
    stream = small_stream()
    model, collator = tiny_lora_model(stream)
    batch = collator(stream.stages[0].train[:4])
    named = build_method(MethodConfig(name="spectral_distill"), REG)
    spelled = build_method(
        MethodConfig(
            name="attention_distill", options={"match": "spectrum", "heads": "each"}
        ),
        REG,
    )
    memory = {PREVIOUS_ADAPTER: adapter_state(model)}
    _perturb_adapter(model)

    def penalty(method) -> torch.Tensor:  # type: ignore[no-untyped-def]
        method.set_memory(model, memory)
        return method.penalties(_step_context(model, batch))["attn"].detach()

    # Execute / Assert
    assert (named.options.match, named.options.heads) == ("spectrum", "each")
    torch.testing.assert_close(penalty(named), penalty(spelled))
    assert float(penalty(named)) > 0


def test_attention_distill_features_follow_its_options_not_asrs_layout() -> None:
    # Prepare: the same teacher and batch; only ASR's regularizer layout differs
    stream = small_stream()
    model, collator = tiny_lora_model(stream)
    batch = collator(stream.stages[0].train[:4])
    memory = {PREVIOUS_ADAPTER: adapter_state(model)}
    _perturb_adapter(model)
    config = MethodConfig(name="attention_distill", options={"match": "spectrum"})

    def penalty(reg: RegularizerConfig) -> torch.Tensor:
        method = build_method(config, reg)
        method.set_memory(model, memory)
        return method.penalties(_step_context(model, batch))["attn"].detach()

    # Execute / Assert: match=spectrum is the pooled spectrum whatever ASR uses
    asr_layout = RegularizerConfig(l_sel=2, features="coherence", heads="each")
    torch.testing.assert_close(penalty(asr_layout), penalty(REG))
