"""ASR plus a partner (``asr_lwf``, ``asr_spectral_distill``, their local twins)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import simulation_metrics
from tiny_lora import small_stream, tiny_lora_model

from fed_asr.config import MethodConfig, RegularizerConfig
from fed_asr.data import skill_probabilities
from fed_asr.methods import (
    PREVIOUS_ADAPTER,
    StepContext,
    build_method,
    trainable_parameters,
)
from fed_asr.methods.asr_plus import asr_plus
from fed_asr.methods.ewc import EWC
from fed_asr.methods.joint import Joint
from fed_asr.methods.lwf import TEACHER_ADAPTER, LwF
from fed_asr.models import adapter_state, forward_with_attention
from fed_asr.regularizer import describe_capture
from fed_asr.spectrum import SkillSpectrum

REG = RegularizerConfig(l_sel=2)


def _context(model, batch, samples, skills) -> StepContext:  # type: ignore[no-untyped-def]
    forward = partial(forward_with_attention, model, batch, REG.l_sel, "selective")
    return StepContext(
        model=model,
        batch=batch,
        capture=forward(hidden=True),
        skill_probs=skill_probabilities(samples, skills),
        forward=forward,
        sample_keys=[(s.image, s.question) for s in samples],
    )


@pytest.mark.parametrize(
    ("combined_name", "partner_name", "partner_term"),
    [("asr_lwf", "lwf", "lwf"), ("asr_spectral_distill", "spectral_distill", "attn")],
)
def test_penalties_are_asrs_and_the_partners_terms_of_the_same_step(
    combined_name: str, partner_name: str, partner_term: str
) -> None:
    # Prepare: one model, a spectrum at the origin, the teacher = the current adapter
    # moved afterwards, so every term is non-zero
    torch.manual_seed(0)
    stream = small_stream()
    model, collator = tiny_lora_model(stream)
    samples = list(stream.stages[1].train[:4])
    batch = collator(samples)
    skills = stream.skills
    d = describe_capture(
        _context(model, batch, samples, skills).capture, batch, REG
    ).descriptor.shape[-1]
    spectrum = SkillSpectrum(
        tuple(skills),
        mean=torch.zeros(len(skills), d),
        var=torch.ones(len(skills), d),
        angular=torch.full((len(skills), REG.n_angular), 1 / REG.n_angular),
        count=torch.ones(len(skills)),
    )
    memory = {PREVIOUS_ADAPTER: adapter_state(model, trainable_only=True)}
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.2 * torch.randn_like(p))
    methods = {
        name: build_method(MethodConfig(name=name), REG)
        for name in (combined_name, "asr", partner_name)
    }
    for method in methods.values():
        method.configure_stage(spectrum)
        method.set_memory(model, memory)

    # Execute
    terms = {
        name: method.penalties(_context(model, batch, samples, skills))
        for name, method in methods.items()
    }
    combined = terms[combined_name]
    sum(combined.values()).backward()

    # Assert
    assert set(combined) == {"spec", "geo", partner_term}
    for name in ("spec", "geo"):
        torch.testing.assert_close(combined[name], terms["asr"][name])
    torch.testing.assert_close(
        combined[partner_term], terms[partner_name][partner_term]
    )
    assert all(float(v.detach()) > 0 for v in combined.values())
    assert TEACHER_ADAPTER in model.peft_config
    grads = [p.grad for p in trainable_parameters(model).values()]
    assert all(g is not None for g in grads)


def test_options_reach_the_lwf_part_and_the_stage_end_keeps_the_adapter() -> None:
    # Execute
    shared = build_method(MethodConfig(name="asr_lwf"), REG)
    local = build_method(
        MethodConfig(name="asr_local_lwf", options={"weight": 2.0}), REG
    )
    memory = shared.update_memory({}, {"w": torch.ones(2)}, {})

    # Assert: both keep the previous global adapter for LwF (which stage ends query
    # the clients: test_methods' per-method plan table)
    assert shared.stage_end.spectrum == "shared" and local.stage_end.spectrum == "local"
    assert shared.stage_end.keep_adapter and local.stage_end.keep_adapter
    assert local.options.weight == 2.0 and local.partner.options.weight == 2.0
    torch.testing.assert_close(memory[PREVIOUS_ADAPTER]["w"], torch.ones(2))
    distill = build_method(
        MethodConfig(name="asr_local_spectral_distill", options={"weight": 3.0}), REG
    )
    assert distill.stage_end.spectrum == "local" and distill.stage_end.keep_adapter
    assert distill.partner.options.weight == 3.0
    assert distill.partner.options.match == "spectrum"


def test_a_partner_with_statistics_or_hooks_of_its_own_is_refused() -> None:
    with pytest.raises(ValueError, match="EWC has stage-end statistics of its own"):
        asr_plus(EWC, "shared")
    with pytest.raises(ValueError, match=r"Joint overrides \['training_samples'\]"):
        asr_plus(Joint, "local")
    with pytest.raises(ValueError, match="shared or local spectrum, got 'none'"):
        asr_plus(LwF, "none")


def test_simulation_trains_stage_one_under_both_terms(
    run_overrides,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: a real Flower simulation, 2 clients, 2 stages, 1 round each
    overrides = run_overrides("sim-asr-lwf", method="asr_lwf")

    # Execute
    metrics = simulation_metrics(overrides)

    # Assert: statistics go up at the stage end, the spectrum and the previous
    # adapter come down with stage 1, which trains under L_spec and LwF
    first, second = metrics["rounds"]
    assert first["bytes_up_spectrum"] > 0 and first["bytes_up_extra"] == 0
    assert second["bytes_down_extra"] > 0
    assert first["losses"].get("lwf", 0.0) == 0.0
    assert second["losses"]["spec"] > 0 and second["losses"]["lwf"] > 0
    assert metrics["dropped_replies"] == 0
