"""Conditional per-skill prototypes (fed_asr.conditional_prototypes) and the
``asr_conditional`` method on the tiny model."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import simulation_metrics
from tiny_lora import small_stream, tiny_lora_model

from fed_asr.conditional_prototypes import (
    add_sums,
    conditional_sums,
    fit_prototype,
    image_features,
    skills_of,
)
from fed_asr.config import MethodConfig, RegularizerConfig, compose_config
from fed_asr.data import skill_probabilities
from fed_asr.methods import StepContext, build_method
from fed_asr.methods.asr_conditional import CONDITIONAL
from fed_asr.models import forward_with_attention
from fed_asr.spectrum import SkillSpectrum

REG = RegularizerConfig(l_sel=2)


def _linear_data(n: int = 200, f: int = 3, d: int = 2, seed: int = 0):  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, f, generator=generator) * torch.tensor([1.0, 5.0, 0.1]) + 3
    weights = torch.randn(f, d, generator=generator)
    x = phi @ weights + torch.tensor([0.5, -1.0])
    return phi, x


def test_fit_recovers_an_exact_linear_relation() -> None:
    # Prepare: x = phi W + b exactly; features of very different scales and means
    phi, x = _linear_data()
    sums = conditional_sums(phi, x, {"shape": torch.ones(len(phi))})

    # Execute
    proto = fit_prototype(sums, "shape", ridge=1e-9, floor=1e-6)

    # Assert
    assert proto is not None
    torch.testing.assert_close(proto.predict(phi), x, atol=1e-3, rtol=1e-4)
    assert proto.explained > 0.999
    assert torch.all(proto.var <= 1e-5)  # the residual variance is the floor
    assert proto.count == len(phi)


def test_fit_without_information_predicts_the_mean_with_the_marginal_variance() -> None:
    # Prepare: x independent of phi; a huge ridge shrinks every coefficient to 0
    generator = torch.Generator().manual_seed(1)
    phi, x = (
        torch.randn(500, 3, generator=generator),
        torch.randn(500, 2, generator=generator),
    )
    sums = conditional_sums(phi, x, {"color": torch.ones(500)})

    # Execute
    proto = fit_prototype(sums, "color", ridge=1e9, floor=1e-6)

    # Assert
    assert proto is not None
    torch.testing.assert_close(proto.predict(phi[:4]), x.mean(0).expand(4, 2))
    torch.testing.assert_close(proto.var, x.double().var(0, correction=0).float())
    assert abs(proto.explained) < 1e-6


def test_sums_of_two_sites_equal_the_sums_of_their_union() -> None:
    # Prepare: what the server adds is what one site holding everything computes
    phi, x = _linear_data(n=40)
    member = (torch.arange(40) % 3 == 0).float()
    whole = conditional_sums(phi, x, {"shape": torch.ones(40), "color": member})

    # Execute
    parts = [
        conditional_sums(phi[s], x[s], {"shape": torch.ones(20), "color": member[s]})
        for s in (slice(0, 20), slice(20, 40))
    ]
    merged = add_sums(parts)

    # Assert
    assert merged.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(merged[key], whole[key])


def test_add_sums_ignores_a_malformed_skill_and_skills_of_incomplete_ones() -> None:
    # Prepare: the second sum's `shape` has the wrong feature size; a third sum
    # lacks `shape|Q`
    phi, x = _linear_data(n=10)
    good = conditional_sums(phi, x, {"shape": torch.ones(10)})
    bad = conditional_sums(phi[:, :2], x, {"shape": torch.ones(10)})
    partial_sum = {k: v for k, v in good.items() if not k.endswith("|Q")}

    # Execute
    merged = add_sums([good, bad, partial_sum])

    # Assert
    for key in good:
        torch.testing.assert_close(merged[key], good[key])
    assert skills_of(partial_sum) == []
    assert skills_of(good) == ["shape"]


def test_image_features_mean_and_layout_share() -> None:
    # Prepare: two tokens, the second with twice the norm
    hidden = torch.tensor([[[3.0, 4.0], [6.0, 8.0]]])

    # Execute
    phi = image_features(hidden)

    # Assert: mean (4.5, 6) then norm shares (1/3, 2/3)
    torch.testing.assert_close(phi, torch.tensor([[4.5, 6.0, 1 / 3, 2 / 3]]))
    assert image_features(hidden, layout=False).shape == (1, 2)


def test_method_statistics_fit_and_penalty_on_the_tiny_model() -> None:
    # Prepare: stage-end statistics of stage 0, merged, become memory; the
    # penalty then acts on stage-1 samples and backpropagates into the adapter
    stream = small_stream()
    model, collator = tiny_lora_model(stream)
    method = build_method(MethodConfig(name="asr_conditional"), REG)
    samples = list(stream.stages[0].train)
    sums, count = method.stage_end_statistics(CONDITIONAL, model, collator, samples)
    merged = method.merge_statistics(CONDITIONAL, [(sums, count), (sums, count)])
    assert merged is not None
    memory = method.update_memory({}, {}, {CONDITIONAL: merged})
    skills = stream.skills
    d = int(merged[f"{skills_of(merged)[0]}|H"].shape[1])
    spectrum = SkillSpectrum(
        tuple(skills),
        mean=torch.zeros(len(skills), d),
        var=torch.ones(len(skills), d),
        angular=torch.full((len(skills), REG.n_angular), 1 / REG.n_angular),
        count=torch.ones(len(skills)),
    )
    method.configure_stage(spectrum)
    method.set_memory(model, memory)
    train = list(stream.stages[1].train)
    batch = collator(train)
    forward = partial(forward_with_attention, model, batch, REG.l_sel, "selective")
    ctx = StepContext(
        model=model,
        batch=batch,
        capture=forward(hidden=True),
        skill_probs=skill_probabilities(train, skills),
        forward=forward,
        sample_keys=[(s.image, s.question) for s in train],
    )

    # Execute
    terms = method.penalties(ctx)
    terms["spec"].backward()

    # Assert
    assert count == len(samples)
    assert set(skills_of(sums)) <= set(skills) and skills_of(sums)
    torch.testing.assert_close(
        merged[f"{skills_of(sums)[0]}|n"], 2 * sums[f"{skills_of(sums)[0]}|n"]
    )
    assert set(method.prototypes) == set(skills_of(sums))
    assert float(terms["spec"].detach()) > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert len(method.features) == len({(s.image, s.question) for s in train})


def test_method_refuses_a_loss_other_than_the_papers() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`regularizer.spec_loss=hinge` is not"):
        build_method(
            MethodConfig(name="asr_conditional"), RegularizerConfig(spec_loss="hinge")
        )


@pytest.mark.parametrize("method", ["asr_conditional", "ewc"])
@pytest.mark.parametrize("flag", ["dp", "secure_spectrum"])
def test_clear_text_statistics_are_refused_under_dp_or_secure_aggregation(
    method: str, flag: str
) -> None:
    # Execute / Assert: the promise would cover only the spectrum
    with pytest.raises(ValueError, match=rf"`privacy.{flag}=true` protects only"):
        compose_config("config", [f"method={method}", f"privacy.{flag}=true"])


def test_simulation_sends_sums_up_and_their_total_down_and_penalises(
    run_overrides,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: a real Flower simulation, 2 clients, 2 stages, 1 round each
    overrides = run_overrides("sim-conditional", method="asr_conditional")
    # Execute
    metrics = simulation_metrics(overrides)
    # Assert: the stage-0 sums go up, their total comes down with stage 1's train
    # messages, and stage 1 trains under the conditional L_spec
    first, second = metrics["rounds"]
    assert first["bytes_up_extra"] > 0 and first["bytes_down_extra"] == 0
    assert second["bytes_down_extra"] > 0
    assert "spec" not in first["losses"] or first["losses"]["spec"] == 0
    assert second["losses"]["spec"] > 0
    assert metrics["dropped_replies"] == 0
