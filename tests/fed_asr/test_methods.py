"""Methods as plug-ins (FedProx, LwF, EWC, ASR-local, joint) and LoRA aggregations."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from tiny_lora import small_stream, tiny_lora_model

from fed_asr.adapter_aggregation import exact_lora_merge, get_lora_aggregation
from fed_asr.config import (
    MethodConfig,
    RegularizerConfig,
    SpectrumConfig,
)
from fed_asr.data import ContinualStream
from fed_asr.methods import (
    METHODS,
    PREVIOUS_ADAPTER,
    ContinualMethod,
    NoOptions,
    StageEndPlan,
    StepContext,
    build_method,
    method_entry,
    register_method,
    trainable_parameters,
)
from fed_asr.methods.ewc import FISHER, accumulate_fisher, fisher_sums
from fed_asr.methods.lwf import TEACHER_ADAPTER, distillation_loss
from fed_asr.models import adapter_state, forward_with_attention
from fed_asr.models.batching import MODEL_INPUT_KEYS
from fed_asr.schedule import update_spectrum
from fed_asr.spectrum import SkillStats

REG = RegularizerConfig(l_sel=2)


@pytest.fixture(scope="module")
def stream() -> ContinualStream:
    return small_stream()


def _model(stream, aggregation: str = "fedavg"):  # type: ignore[no-untyped-def]
    return tiny_lora_model(stream, aggregation=aggregation)


def _method(name: str, **options: object):  # type: ignore[no-untyped-def]
    return build_method(MethodConfig(name=name, options=options), REG)


def _ctx(model, collator, samples, method) -> StepContext:  # type: ignore[no-untyped-def]
    batch = collator(samples)
    forward = partial(forward_with_attention, model, batch, REG.l_sel, "selective")
    outputs = model(**{k: batch[k] for k in MODEL_INPUT_KEYS})
    return StepContext(
        model=model,
        batch=batch,
        capture=None,
        skill_probs=torch.zeros(len(samples), 1),
        forward=forward,
        outputs=outputs,
    )


def _sgd_step(model, loss: torch.Tensor, lr: float = 0.5) -> None:  # type: ignore[no-untyped-def]
    loss.backward()
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p -= lr * p.grad
            p.grad = None


def _perturb(model, seed: int = 1) -> None:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def test_fedprox_penalty_zero_at_received_weights_positive_after_a_step(
    stream: ContinualStream,
) -> None:
    # Prepare
    model, collator = _model(stream)
    _perturb(model)
    method = _method("fedprox", mu=0.5)
    samples = stream.stages[0].train[:4]
    method.before_training(model)
    # Execute
    at_start = method.penalties(_ctx(model, collator, samples, method))["prox"]
    _sgd_step(model, _ctx(model, collator, samples, method).outputs.loss)
    after = method.penalties(_ctx(model, collator, samples, method))["prox"]
    # Assert
    torch.testing.assert_close(at_start, torch.tensor(0.0), atol=0, rtol=0)
    expected = 0.25 * sum(
        (p - method.anchor[k]).square().sum()
        for k, p in trainable_parameters(model).items()
    )
    torch.testing.assert_close(after, expected, atol=1e-7, rtol=1e-5)
    assert float(after) > 0
    after.backward()
    assert all(p.grad is not None for p in trainable_parameters(model).values())


def test_lwf_penalty_zero_when_teacher_equals_student_and_keeps_ffa_a_frozen(
    stream: ContinualStream,
) -> None:
    # Prepare: FFA-LoRA student (A frozen); the teacher is the current adapter
    model, collator = _model(stream, "ffa")
    _perturb(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    method = _method("lwf", weight=1.0, temperature=2.0)
    samples = stream.stages[0].train[:4]
    # Execute
    method.set_memory(
        model, {PREVIOUS_ADAPTER: adapter_state(model, trainable_only=True)}
    )
    same = method.penalties(_ctx(model, collator, samples, method))["lwf"]
    _perturb(model, seed=2)
    differs = method.penalties(_ctx(model, collator, samples, method))["lwf"]
    differs.backward()
    # Assert
    assert TEACHER_ADAPTER in model.peft_config
    torch.testing.assert_close(same, torch.tensor(0.0), atol=1e-6, rtol=0)
    assert float(differs) > 1e-6
    assert {
        n: p.requires_grad
        for n, p in model.named_parameters()
        if f".{TEACHER_ADAPTER}." not in n
    } == flags
    assert all(p.grad is not None for p in trainable_parameters(model).values())
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_A." in n)
    # The teacher's frozen A are the shared ones; only the student's B moved
    state = model.state_dict()
    for name, value in state.items():
        if f"lora_A.{TEACHER_ADAPTER}." in name:
            torch.testing.assert_close(
                value, state[name.replace(TEACHER_ADAPTER, "default")]
            )


def test_lwf_without_previous_adapter_adds_nothing_and_drops_teacher(
    stream: ContinualStream,
) -> None:
    # Prepare
    model, collator = _model(stream)
    method = _method("lwf")
    method.set_memory(model, {PREVIOUS_ADAPTER: adapter_state(model)})
    # Execute
    method.set_memory(model, {})
    terms = method.penalties(_ctx(model, collator, stream.stages[0].train[:2], method))
    # Assert
    assert terms == {}
    assert TEACHER_ADAPTER not in model.peft_config


def test_distillation_loss_matches_hand_computed_kl() -> None:
    # Prepare: one position, two classes, T = 2
    student = torch.tensor([[[0.0, 2.0]]])
    teacher = torch.tensor([[[2.0, 0.0]]])
    mask = torch.tensor([[True]])
    p = torch.softmax(teacher[0, 0] / 2, -1)
    q = torch.softmax(student[0, 0] / 2, -1)
    expected = 4 * (p * (p.log() - q.log())).sum()
    # Execute
    loss = distillation_loss(student, teacher, mask, temperature=2.0)
    # Assert
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)


def test_ewc_penalty_zero_at_anchor_and_weighted_by_fisher(
    stream: ContinualStream,
) -> None:
    # Prepare
    model, collator = _model(stream)
    _perturb(model)
    method = _method("ewc", ewc_lambda=4.0)
    anchor = adapter_state(model)
    fisher = {k: torch.full_like(v, 0.5) for k, v in anchor.items()}
    samples = stream.stages[0].train[:2]
    method.set_memory(model, {PREVIOUS_ADAPTER: anchor, FISHER: fisher})
    # Execute
    at_anchor = method.penalties(_ctx(model, collator, samples, method))["ewc"]
    with torch.no_grad():
        next(iter(trainable_parameters(model).values())).add_(1.0)
    moved = method.penalties(_ctx(model, collator, samples, method))["ewc"]
    moved.backward()
    # Assert
    torch.testing.assert_close(at_anchor, torch.tensor(0.0), atol=0, rtol=0)
    first = next(iter(trainable_parameters(model).values()))
    torch.testing.assert_close(moved, torch.tensor(2.0 * 0.5 * first.numel()))
    assert first.grad is not None and float(first.grad.abs().sum()) > 0


def test_fisher_sums_batch_one_equal_per_sample_squared_gradients(
    stream: ContinualStream,
) -> None:
    # Prepare
    model, collator = _model(stream)
    _perturb(model)
    samples = stream.stages[0].train[:3]
    params = trainable_parameters(model)
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    for sample in samples:
        batch = collator([sample])
        loss = model(**{k: batch[k] for k in MODEL_INPUT_KEYS}).loss
        for (k, _), g in zip(
            params.items(),
            torch.autograd.grad(loss, list(params.values())),
            strict=True,
        ):
            expected[k] += g.square()
    # Execute
    sums, count = fisher_sums(model, collator, samples, batch_size=1)
    # Assert
    assert count == 3
    for k in expected:
        torch.testing.assert_close(sums[k], expected[k], atol=1e-7, rtol=1e-4)
    assert all(p.grad is None for p in params.values())


def test_ewc_merge_statistics_weights_sites_by_examples_and_accumulates() -> None:
    # Prepare: Fisher sums of three sites; the last one had no sample
    ewc = _method("ewc")
    parts = [
        ({"w": torch.tensor([2.0])}, 2),
        ({"w": torch.tensor([10.0])}, 6),
        ({"w": torch.tensor([99.0])}, 0),
    ]
    # Execute
    pooled = ewc.merge_statistics(FISHER, parts)
    summed = accumulate_fisher({"w": torch.tensor([1.0])}, pooled, decay=1.0)
    online = accumulate_fisher({"w": torch.tensor([1.0])}, pooled, decay=0.5)
    # Assert
    torch.testing.assert_close(pooled["w"], torch.tensor([1.5]))
    torch.testing.assert_close(summed["w"], torch.tensor([2.5]))
    torch.testing.assert_close(online["w"], torch.tensor([2.0]))
    assert ewc.merge_statistics(FISHER, [({"w": torch.tensor([1.0])}, 0)]) is None


def test_update_memory_keeps_what_the_method_needs() -> None:
    # Prepare
    adapter = {"w": torch.tensor([1.0])}
    fisher = {"w": torch.tensor([3.0])}
    # Execute
    lwf = _method("lwf").update_memory({}, adapter, {FISHER: fisher})
    ewc = _method("ewc", decay=1.0).update_memory(
        {FISHER: {"w": torch.tensor([1.0])}}, adapter, {FISHER: fisher}
    )
    vanilla = _method("vanilla").update_memory({}, adapter, {FISHER: fisher})
    # Assert
    assert set(lwf) == {PREVIOUS_ADAPTER} and set(ewc) == {PREVIOUS_ADAPTER, FISHER}
    assert vanilla == {}
    torch.testing.assert_close(ewc[FISHER]["w"], torch.tensor([4.0]))
    adapter["w"].add_(5.0)
    torch.testing.assert_close(ewc[PREVIOUS_ADAPTER]["w"], torch.tensor([1.0]))


def test_joint_trains_on_union_of_stages_so_far(stream: ContinualStream) -> None:
    # Prepare
    joint, vanilla = _method("joint"), _method("vanilla")
    # Execute
    union = joint.training_samples(stream.stages, 1)
    own = vanilla.training_samples(stream.stages, 1)
    # Assert
    assert union == list(stream.stages[0].train) + list(stream.stages[1].train)
    assert own == list(stream.stages[1].train)


def test_update_spectrum_blends_and_keeps_old_without_data() -> None:
    # Prepare
    skills = ("a", "b")
    spectrum_cfg = SpectrumConfig(blend="ema", alpha=0.5)
    first = SkillStats.empty(skills, 2, 1)
    first.count[0], first.sum[0], first.sumsq[0] = 2, torch.tensor([2.0, 4.0]), 10.0
    first.angular_sum[0] = 2.0
    second = SkillStats.empty(skills, 2, 1)
    second.count[0], second.sum[0], second.sumsq[0] = 1, torch.tensor([3.0, 3.0]), 9.0
    second.angular_sum[0] = 1.0
    # Execute
    own = update_spectrum(None, [first], spectrum_cfg, 1e-4)
    blended = update_spectrum(own, [second], spectrum_cfg, 1e-4)
    kept = update_spectrum(
        blended, [SkillStats.empty(skills, 2, 1)], spectrum_cfg, 1e-4
    )
    # Assert
    torch.testing.assert_close(
        own.mean[0], torch.tensor([1.0, 2.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        blended.mean[0], torch.tensor([2.0, 2.5], dtype=torch.float64)
    )
    assert own is not None and blended is not None
    assert kept is blended


def test_stage_end_plan_needs_and_client_queries_per_method() -> None:
    # Execute
    plans = {name: entry.method_class.stage_end for name, entry in METHODS.items()}
    needed = {n: [p.is_needed(t, 3) for t in range(3)] for n, p in plans.items()}
    queried = {n: [p.queries_clients(t, 3) for t in range(3)] for n, p in plans.items()}
    # Assert: a shared spectrum is merged after every stage (the last is an output)
    assert needed["asr"] == queried["asr"] == [True, True, True]
    assert needed["asr_local"] == queried["asr_local"] == [True, True, False]
    assert needed["asr_lwf"] == queried["asr_lwf"] == [True, True, True]
    assert needed["asr_local_lwf"] == queried["asr_local_lwf"] == [True, True, False]
    for name in ("asr_spectral_distill", "asr_local_spectral_distill"):
        assert plans[name].keep_adapter
        twin = name.replace("_spectral_distill", "_lwf")
        assert needed[name] == queried[name] == needed[twin]
    assert needed["ewc"] == queried["ewc"] == [True, True, False]
    # a client-local Fisher is still computed by the clients at each stage end
    assert needed["ewc_local"] == queried["ewc_local"] == [True, True, False]
    assert plans["ewc"].shared_statistics == plans["ewc_local"].local_statistics
    assert plans["ewc_local"].shared_statistics == plans["ewc"].local_statistics == ()
    # LwF only keeps the global adapter: a stage end without any client work
    assert needed["lwf"] == [True, True, False]
    assert queried["lwf"] == [False, False, False]
    for name in ("vanilla", "fedprox", "joint"):
        assert needed[name] == queried[name] == [False, False, False]


def test_stage_end_plan_unknown_spectrum_use_raises() -> None:
    with pytest.raises(ValueError, match="`StageEndPlan.spectrum` must be one of"):
        StageEndPlan(spectrum="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`StageEndPlan.statistics_scope` must be"):
        StageEndPlan(statistics=("f",), statistics_scope="node")  # type: ignore[arg-type]


def test_register_method_refuses_taken_non_snake_case_and_untyped_options() -> None:
    with pytest.raises(KeyError, match="'ewc' is already registered"):
        register_method("ewc", ContinualMethod, NoOptions)
    with pytest.raises(ValueError, match="snake_case, got 'StageMean'"):
        register_method("StageMean", ContinualMethod, NoOptions)
    with pytest.raises(ValueError, match="must be a dataclass"):
        register_method("stage_mean", ContinualMethod, dict)
    assert "stage_mean" not in METHODS


def test_method_entry_unknown_name_lists_choices() -> None:
    with pytest.raises(KeyError, match="Available: .*'ewc'.*'joint'.*'lwf'"):
        method_entry("ewk")


def test_method_config_unknown_name_raises_naming_field_and_choices() -> None:
    with pytest.raises(ValueError, match=r"`method.name`: Unknown method 'ewk'.*'lwf'"):
        MethodConfig(name="ewk")


def test_method_option_out_of_range_raises_naming_field() -> None:
    with pytest.raises(ValueError, match=r"`method.options.mu` must be >= 0, got -1"):
        _method("fedprox", mu=-1.0)
    with pytest.raises(ValueError, match=r"`method.options.decay` must be in"):
        _method("ewc", decay=1.5)
    with pytest.raises(ValueError, match=r"`method.options.temperature` must be posi"):
        _method("lwf", temperature=0.0)
    with pytest.raises(ValueError, match=r"`method.options.fisher_batch_size` must"):
        _method("ewc", fisher_batch_size=0)
    with pytest.raises(ValueError, match=r"`method.options.weight` must be >= 0"):
        _method("lwf", weight=-0.5)


def test_method_unknown_option_raises_naming_key_and_options() -> None:
    with pytest.raises(
        ValueError,
        match=r"`method.options.lambda` is not an option of method 'ewc'.*decay",
    ):
        _method("ewc", **{"lambda": 1.0})


def test_get_lora_aggregation_unknown_name_lists_choices() -> None:
    with pytest.raises(
        KeyError, match=r"`lora.aggregation` 'fedavgg'.*\['exact', 'fedavg', 'ffa'\]"
    ):
        get_lora_aggregation("fedavgg")


def test_ffa_exchanges_only_b_and_seeds_identical_a(stream: ContinualStream) -> None:
    # Prepare / Execute: two independent models attached with the same seed
    first, _ = _model(stream, "ffa")
    second, _ = _model(stream, "ffa")
    ffa = get_lora_aggregation("ffa")
    # Assert
    sent = ffa.exchanged_state(first)
    assert sent and all(".lora_B." in k for k in sent)
    full = adapter_state(first)
    assert len(sent) == len(full) // 2
    for key, value in adapter_state(second).items():
        if ".lora_A." in key:
            torch.testing.assert_close(value, full[key], atol=0, rtol=0)


def test_exact_lora_merge_equals_mean_of_products_when_rank_fits() -> None:
    # Prepare: two clients of rank 2 whose updates share a rank-2 row space
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 5))
    states = [
        {"m.lora_A.weight": a, "m.lora_B.weight": rng.normal(size=(4, 2))},
        {"m.lora_A.weight": 2 * a, "m.lora_B.weight": rng.normal(size=(4, 2))},
    ]
    weights = [1.0, 3.0]
    expected = sum(
        w * s["m.lora_B.weight"] @ s["m.lora_A.weight"]
        for w, s in zip([0.25, 0.75], states, strict=True)
    )
    # Execute
    merged = exact_lora_merge(states, weights)
    fedavg = get_lora_aggregation("fedavg").aggregate(states, weights)
    # Assert
    product = merged["m.lora_B.weight"].astype(float) @ merged["m.lora_A.weight"]
    np.testing.assert_allclose(product, expected, atol=1e-5)
    naive = fedavg["m.lora_B.weight"].astype(float) @ fedavg["m.lora_A.weight"]
    assert np.abs(naive - expected).max() > 1e-2
