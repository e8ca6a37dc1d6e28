"""Resume that cannot mix runs: another config is refused, a corrupt newest checkpoint
falls back to the previous intact one, and checkpoints are fsynced before the rename.

The runs are real federated runs (``FederatedRun`` over the in-process
``LoopbackGrid``: real ClientApps, protobuf on the wire).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from flower_helpers import loopback_grid, set_task_identity
from helpers import small_run_overrides

from fed_asr.config import compose_config
from fed_asr.security.checkpoint_integrity import IntegrityError
from server.checkpoint import ADAPTER, LATEST, Checkpoint, Checkpointer
from server.run import FederatedRun


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(7)


def _overrides(cache: str, out: Path, **extra: object) -> list[str]:
    settings: dict[str, object] = {
        "method": "vanilla",
        "data.max_train_per_stage": 16,
        "train.max_steps_per_stage": 2,
        "federation.keep_checkpoints": 10,
        **extra,
    }
    return small_run_overrides(cache, str(out), **settings)


def _run(overrides: list[str]) -> Path:
    return FederatedRun(
        compose_config("config", overrides), loopback_grid(overrides)
    ).run()


@pytest.fixture(scope="module")
def finished_run(model_cache: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of a finished 2-stage run (one round per stage)."""
    out = tmp_path_factory.mktemp("resume") / "original"
    set_task_identity(7)
    _run(_overrides(model_cache, out))
    return out


def _copy(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    return out


def test_resume_with_another_method_seed_and_rounds_is_refused_naming_the_keys(
    finished_run: Path, model_cache: str, tmp_path: Path
) -> None:
    # Prepare: the same output folder, resumed with three settings changed
    out = _copy(finished_run, tmp_path)
    changed = _overrides(
        model_cache,
        out,
        resume="true",
        method="asr",
        seed=1,
        **{"federation.rounds_per_stage": 2},
    )
    # Execute / Assert: refused before anything is trained, each key named
    with pytest.raises(ValueError, match="different configuration") as err:
        _run(changed)
    for key in ("method.name", "seed", "federation.rounds_per_stage"):
        assert f"`{key}`" in str(err.value)
    assert "`output_dir` (" not in str(err.value)  # allowed to differ
    assert "\n" not in str(err.value)


def test_resume_with_another_stage_order_is_refused(
    finished_run: Path, model_cache: str, tmp_path: Path
) -> None:
    # Prepare
    out = _copy(finished_run, tmp_path)
    changed = _overrides(
        model_cache, out, resume="true", **{"data.stage_order": "[color,shape]"}
    )
    # Execute / Assert
    with pytest.raises(ValueError, match=re.escape("`data.stage_order`")):
        _run(changed)


def test_resume_with_only_paths_and_flags_changed_is_accepted(
    finished_run: Path, model_cache: str, tmp_path: Path
) -> None:
    # Prepare: another output folder, resume flag and checkpoint count only
    out = _copy(finished_run, tmp_path)
    same = _overrides(
        model_cache, out, resume="true", **{"federation.keep_checkpoints": 3}
    )
    # Execute
    metrics = json.loads(_run(same).read_text())
    # Assert: nothing re-run, same results
    reference = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["accuracy_matrix"] == reference["accuracy_matrix"]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_with_a_warning(
    finished_run: Path, model_cache: str, tmp_path: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: flip one byte of the newest checkpoint's adapter
    out = _copy(finished_run, tmp_path)
    folder = out / "checkpoint"
    latest = folder / (folder / LATEST).read_text().strip()
    previous = sorted(p for p in folder.glob("round-*") if p != latest)[-1]
    data = bytearray((latest / ADAPTER).read_bytes())
    data[-1] ^= 1
    (latest / ADAPTER).write_bytes(bytes(data))
    # Execute
    with caplog.at_level(logging.WARNING):
        path = _run(_overrides(model_cache, out, resume="true"))
    # Assert: a warning names both; the lost round was re-run to the same result
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    named = [w for w in warnings if str(latest) in w and str(previous) in w]
    assert named, warnings
    metrics = json.loads(path.read_text())
    reference = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["accuracy_matrix"] == reference["accuracy_matrix"]
    assert [r["losses"] for r in metrics["rounds"]] == [
        r["losses"] for r in reference["rounds"]
    ]


def test_checkpoint_records_the_resolved_config_and_its_digest(
    finished_run: Path,
) -> None:
    # Prepare
    folder = finished_run / "checkpoint"
    latest = folder / (folder / LATEST).read_text().strip()
    # Execute
    config = json.loads((latest / "config.json").read_text())
    state = json.loads((latest / "state.json").read_text())
    # Assert
    assert config["method.name"] == "vanilla" and config["seed"] == 0
    assert len(state["config_sha256"]) == 64


def test_every_checkpoint_corrupt_raises_the_newest_error(tmp_path: Path) -> None:
    # Prepare: two checkpoints, both damaged
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=5)
    for r in (1, 2):
        checkpointer.save(Checkpoint(r, {"w": torch.full((4,), float(r))}, None, {}))
    for folder in (tmp_path / "ckpt").glob("round-*"):
        (folder / ADAPTER).write_bytes(b"garbage")
    # Execute / Assert
    with pytest.raises(IntegrityError, match="round-000002"):
        checkpointer.load_latest()


def test_latest_naming_a_missing_folder_falls_back(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=5)
    for r in (1, 2):
        checkpointer.save(Checkpoint(r, {"w": torch.full((4,), float(r))}, None, {}))
    shutil.rmtree(tmp_path / "ckpt" / "round-000002")
    # Execute
    with caplog.at_level(logging.WARNING):
        checkpoint = checkpointer.load_latest()
    # Assert
    assert checkpoint is not None and checkpoint.global_round == 1
    assert any("round-000002" in r.getMessage() for r in caplog.records)


def test_checkpoint_files_and_folders_are_fsynced_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record what every fsync flushed, and when the rename happened
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst) -> None:  # type: ignore[no-untyped-def]
        events.append(f"replace {Path(src).name} -> {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpointer = Checkpointer(tmp_path / "ckpt")
    # Execute
    checkpointer.save(Checkpoint(3, {"w": torch.zeros(4)}, None, {}))
    # Assert: the adapter, state, manifest and the folder itself, then the rename
    rename = events.index("replace .round-000003.tmp -> round-000003")
    before = [e.rsplit("/", 1)[-1] for e in events[:rename]]
    for name in (ADAPTER, "state.json", "MANIFEST.sha256.json", ".round-000003.tmp"):
        assert name in before, events
    after = events[rename + 1 :]
    assert any(e.endswith("/ckpt") for e in after)  # the parent folder
    assert any("LATEST" in e for e in after)


def test_cli_resume_with_another_config_prints_one_line_and_exits_2(
    finished_run: Path,
    model_cache: str,
    tmp_path: Path,
    capsys,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the engine must never start
    from server.cli import main

    def engine(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the run started despite a mismatched checkpoint")

    monkeypatch.setattr("server.simulation.run_simulation_engine", engine)
    out = _copy(finished_run, tmp_path)
    # Execute
    code = main(_overrides(model_cache, out, resume="true", seed=1))
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "`seed` (0 -> 1)" in err[0]
