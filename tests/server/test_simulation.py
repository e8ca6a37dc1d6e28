"""End-to-end runs through Flower's simulation engine (Ray), on a tiny slice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from clients.testing import failing_mod, nan_reply_mod
from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import compose_config
from fed_asr.data import build_stream
from fed_asr.models import adapter_state, load_base_model
from fed_asr.security.signing import (
    generate_signing_key,
    save_private_key,
    save_public_key,
)
from fed_asr.spectrum import SkillSpectrum
from server.simulation import run_simulation_engine


def _run(overrides: list[str], **kwargs) -> dict:  # type: ignore[no-untyped-def]
    cfg = compose_config("config", overrides)
    path = run_simulation_engine(cfg, overrides, **kwargs)
    return json.loads(Path(path).read_text())


def test_simulation_two_clients_two_stages_survives_a_failing_client(
    run_overrides,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: partition 0 raises in global round 1
    overrides = run_overrides("e2e")
    # Execute
    metrics = _run(overrides, client_mods=[failing_mod(partition_id=0, global_round=1)])
    # Assert: the run finished with a full 2x2 matrix and recorded the failure
    out = Path(compose_config("config", overrides).output_dir)
    assert metrics["stages"] == ["shape", "color"]
    matrix = metrics["accuracy_matrix"]
    assert (
        matrix[0][0] is not None
        and matrix[1][0] is not None
        and matrix[1][1] is not None
    )
    assert metrics["failed_replies"] == 1
    assert metrics["rounds"][0]["clients_answered"] == 1
    assert metrics["rounds"][1]["clients_answered"] == 2
    assert set(metrics["per_client"]) == {"0", "1"}
    assert (
        metrics["rounds"][1]["bytes_down_spectrum"] > 0
    )  # stage 2 carries the spectrum
    assert metrics["rounds"][0]["bytes_up_spectrum"] > 0
    assert metrics["rounds"][1]["losses"]["spec"] > 0
    for key in ("Last", "Avg", "AF", "BWT", "wall_time_s"):
        assert isinstance(metrics[key], float)
    for name in (
        "config.yaml",
        "accuracy_matrix.png",
        "forgetting_curves.png",
        "spectrum.safetensors",
    ):
        assert (out / name).exists(), name
    cfg = compose_config("config", overrides)
    stream = build_stream(cfg.data, cfg.seed)
    base, _ = load_base_model(cfg.model, stream.vocabulary())
    adapted = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_B" in name for name, _ in adapted.named_parameters())
    spectrum = SkillSpectrum.load(out / "spectrum.safetensors")
    assert bool(spectrum.present.any())


@pytest.mark.parametrize("strategy", ["fedmedian", "fedadam"])
def test_simulation_asr_around_another_flower_strategy_fills_the_matrix(
    run_overrides, strategy: str
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: ASR wrapped around FedMedian / FedAdam, on an even smaller slice
    overrides = run_overrides(
        strategy,
        **{
            "federation.strategy": strategy,
            "data.max_train_per_stage": 16,
            "data.max_test_per_stage": 8,
            "train.max_steps_per_stage": 2,
        },
    )
    cfg = compose_config("config", overrides)
    # Execute
    metrics = _run(overrides)
    # Assert: a full lower-triangular matrix, every reply aggregated
    assert metrics["adapter_strategy"] == strategy
    matrix = metrics["accuracy_matrix"]
    assert matrix[0][0] is not None and None not in matrix[1]
    assert metrics["dropped_replies"] == metrics["failed_replies"] == 0
    assert [r["clients_answered"] for r in metrics["rounds"]] == [2, 2]
    assert metrics["rounds"][1]["losses"]["spec"] > 0
    # Assert: the saved adapter moved away from the initial (seeded) one
    stream = build_stream(cfg.data, cfg.seed)
    base, _ = load_base_model(cfg.model, stream.vocabulary())
    initial = adapter_state(
        get_lora_aggregation(cfg.lora.aggregation).attach(base, cfg.lora, cfg.seed)
    )
    base, _ = load_base_model(cfg.model, stream.vocabulary())
    trained = adapter_state(
        PeftModel.from_pretrained(base, Path(cfg.output_dir) / "adapter")
    )
    assert trained.keys() == initial.keys()
    moved = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert any(".lora_B." in k for k in moved)
    assert all(bool(torch.isfinite(v).all()) for v in trained.values())


def test_simulation_resume_from_checkpoint_gives_same_result(
    run_overrides, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: an uninterrupted run that keeps every checkpoint
    full = run_overrides("full", **{"federation.keep_checkpoints": 10})
    reference = _run(full)
    full_dir = Path(compose_config("config", full).output_dir)
    # A run "killed" after global round 1: its output folder holds only what the full
    # run had written by then (checkpoint of round 1, before the spectrum round).
    resumed = run_overrides("resumed", resume="true")
    resumed_dir = Path(compose_config("config", resumed).output_dir)
    (resumed_dir / "checkpoint").mkdir(parents=True)
    shutil.copytree(
        full_dir / "checkpoint" / "round-000001",
        resumed_dir / "checkpoint" / "round-000001",
    )
    (resumed_dir / "checkpoint" / "LATEST").write_text("round-000001")
    # Execute
    result = _run(resumed)
    # Assert
    assert result["accuracy_matrix"] == reference["accuracy_matrix"]
    assert result["per_client"] == reference["per_client"]
    assert [r["losses"] for r in result["rounds"]] == [
        r["losses"] for r in reference["rounds"]
    ]
    # round 1 came from the checkpoint (its timing is restored, not re-measured) ...
    assert result["rounds"][0]["seconds"] == reference["rounds"][0]["seconds"]
    # ... and round 2 was really run again
    assert result["rounds"][1]["seconds"] != reference["rounds"][1]["seconds"]


@pytest.mark.slow
def test_simulation_killed_process_resumes_to_same_result(run_overrides) -> None:  # type: ignore[no-untyped-def]
    """A real SIGKILL of the whole process group after the first checkpoint."""
    # Prepare
    reference = _run(run_overrides("reference"))
    killed = run_overrides("killed", **{"federation.rounds_per_stage": 1})
    out = Path(compose_config("config", killed).output_dir)
    proc = subprocess.Popen(
        ["fed-asr", "engine=simulation", *killed],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoint" / "LATEST").exists():
        assert proc.poll() is None, "run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    # Execute
    resumed = _run([*killed, "resume=true"])
    # Assert
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    assert resumed["per_client"] == reference["per_client"]


def test_simulation_with_secure_spectrum_dp_and_signatures_drops_a_nan_reply(
    run_overrides, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a signing key pair; partition 1 sends a NaN adapter in global round 2
    key = generate_signing_key()
    save_private_key(key, tmp_path / "signing.key")
    save_public_key(key.public_key(), tmp_path / "signing.pub")
    overrides = run_overrides(
        "secure",
        **{
            "privacy.secure_spectrum": "true",
            "privacy.dp": "true",
            "privacy.dp_seed": 0,
            "security.sign": "true",
            "security.signing_key": str(tmp_path / "signing.key"),
            "security.verify_key": str(tmp_path / "signing.pub"),
        },
    )
    # Execute
    metrics = _run(
        overrides, client_mods=[nan_reply_mod(partition_id=1, global_round=2)]
    )
    # Assert: the run finished; the NaN reply was dropped and named; epsilon reported
    assert metrics["dropped_replies"] == 1
    assert metrics["dropped"][0]["round"] == 2
    assert "non-finite" in metrics["dropped"][0]["reason"]
    assert metrics["failed_replies"] == 0
    assert metrics["security"] == {
        "secure_spectrum": True,
        "signed": True,
        "hashed_checkpoints": True,
    }
    privacy = metrics["privacy"]  # one epsilon: 2 statistics + 2 adapter releases
    assert privacy["dp"] and privacy["statistics"]["releases"] == 2
    assert privacy["adapter"]["releases"] == 2 and privacy["releases"] == 4
    assert 8.0 < privacy["epsilon_spent"] < 4 * 8.0
    assert metrics["rounds"][0]["bytes_up_spectrum"] > 0
    assert metrics["rounds"][1]["bytes_down_spectrum"] > 0
    out = Path(compose_config("config", overrides).output_dir)
    assert bool(SkillSpectrum.load(out / "spectrum.safetensors").present.any())
