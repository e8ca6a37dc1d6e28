"""``frozen_attention``: attention-score adapters stop after the first stage."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from flower_helpers import set_task_identity
from safetensors.torch import load_file
from tiny_lora import small_stream, tiny_lora_model

from clients.app import make_client_app
from clients.testing import LoopbackGrid, node_contexts
from fed_asr.config import (
    LoraConfig,
    MethodConfig,
    RegularizerConfig,
    TrainConfig,
    compose_config,
)
from fed_asr.methods import (
    PREVIOUS_ADAPTER,
    MethodMemory,
    build_method,
    register_method,
    unregister_method,
)
from fed_asr.methods.frozen_attention import FrozenAttention, FrozenAttentionOptions
from fed_asr.models import adapter_state
from fed_asr.train import train_stage
from server.run import FederatedRun

REG = RegularizerConfig(l_sel=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _is_frozen_key(key: str) -> bool:
    return any(m in key.split(".") for m in ("q_proj", "k_proj"))


@pytest.mark.parametrize("later_stage", [False, True])
def test_frozen_attention_keeps_q_k_adapters_only_after_the_first_stage(
    later_stage: bool,
) -> None:
    stream = small_stream()
    model, collator = tiny_lora_model(stream, LoraConfig(r=4, target_modules=TARGETS))
    method = build_method(MethodConfig(name="frozen_attention"), REG)
    before = {k: v.clone() for k, v in adapter_state(model).items()}
    method.set_memory(model, {PREVIOUS_ADAPTER: before} if later_stage else {})
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    train_stage(
        model,
        collator,
        list(stream.stages[0].train),
        stream.skills,
        method,
        TrainConfig(batch_size=4, epochs=1, lr=1e-2, diagnostics=False),
        REG,
    )

    after = adapter_state(model)
    frozen = [k for k in before if _is_frozen_key(k)]
    trained = [k for k in before if not _is_frozen_key(k) and "lora_B" in k]
    assert frozen and trained
    moved = {k: not torch.equal(before[k], after[k]) for k in before}
    assert all(moved[k] for k in trained)
    assert all(moved[k] != later_stage for k in frozen if "lora_B" in k)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_frozen_attention_refuses_an_empty_module_list() -> None:
    with pytest.raises(ValueError, match="method.options.modules"):
        build_method(
            MethodConfig(name="frozen_attention", options={"modules": []}), REG
        )


class _RecordingFrozenAttention(FrozenAttention):
    """``frozen_attention`` that records the memory each client receives."""

    received: ClassVar[list[MethodMemory]] = []

    def set_memory(self, model: Any, memory: MethodMemory) -> None:
        _RecordingFrozenAttention.received.append(
            {n: {k: v.clone() for k, v in g.items()} for n, g in memory.items()}
        )
        super().set_memory(model, memory)


def test_frozen_attention_keeps_q_k_of_the_global_adapter_in_a_federation(
    run_overrides,  # noqa: ANN001
) -> None:
    # Prepare: two clients in process (real ServerApp run and ClientApps)
    name = "frozen_attention_recorded"
    register_method(name, _RecordingFrozenAttention, FrozenAttentionOptions)
    _RecordingFrozenAttention.received = []
    set_task_identity(7)
    overrides = [
        *run_overrides(
            "f",
            **{
                "data.max_train_per_stage": 16,
                "data.max_test_per_stage": 8,
                "train.max_steps_per_stage": 2,
                "train.lr": 0.05,
            },
        ),
        f"method.name={name}",
        f"method/options={name}",
        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
    ]
    try:
        cfg = compose_config("config", overrides)
        run_config = {"config-name": "config", "overrides": shlex.join(overrides)}
        contexts = node_contexts(run_config, 2, 7, first_node=101)
        app = make_client_app()
        grid = LoopbackGrid(dict.fromkeys(contexts, app), contexts)

        # Execute
        FederatedRun(cfg, grid, engine="simulation").run()
    finally:
        unregister_method(name)

    # Assert: stage 1's clients got the stage-0 adapter; the final global adapter
    # keeps its q/k weights and moved the others
    previous = _RecordingFrozenAttention.received[-1][PREVIOUS_ADAPTER]
    final = load_file(
        str(Path(cfg.output_dir) / "adapter" / "adapter_model.safetensors")
    )
    final = {k.replace(".weight", ""): v for k, v in final.items()}
    common = {k: k.replace(".weight", "") for k in previous}
    frozen = [k for k in previous if _is_frozen_key(k) and "lora_B" in k]
    trained = [k for k in previous if not _is_frozen_key(k) and "lora_B" in k]
    assert frozen and trained
    for key in frozen:
        torch.testing.assert_close(final[common[key]], previous[key])
    assert any(not torch.allclose(final[common[k]], previous[k]) for k in trained)
