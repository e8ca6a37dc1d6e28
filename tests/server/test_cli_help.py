"""``fed-asr --help`` and ``fed-asr --cfg``: options and the resolved config, no run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from server.cli import main


def test_cli_help_lists_groups_with_choices_and_fields_with_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    code = main(["--help"])

    # Assert
    out = capsys.readouterr().out
    assert code == 0
    methods = (
        "asr*, asr_conditional, asr_local, asr_local_lwf, asr_local_spectral_distill, "
        "asr_lwf, asr_spectral_distill, attention_distill, "
        "ewc, ewc_local, fedprox, "
        "frozen_attention, joint, "
        "lwf, spectral_distill, vanilla"
    )
    assert f"  method     {methods}" in out
    assert "  tracking   mlflow, none, tensorboard*, wandb" in out
    assert "  engine     central, simulation*" in out
    for field in ("seed=0", "federation.rounds_per_stage=2", "lora.r=8"):
        assert field in out
    assert "--cfg [job]" in out


def test_cli_help_of_a_preset_marks_the_choices_it_inherits_and_overrides(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    code = main(["--config-name=qk_shape_color", "--help"])

    # Assert
    out = capsys.readouterr().out
    assert code == 0
    assert "tiny_vision*" in out and "tiny*" not in out  # `override model:`
    assert "  engine     central, simulation*" in out  # inherited from `config`
    assert "config, qk_shape_color (default: config)" in out
    assert "lora.target_modules=[q_proj,k_proj]" in out


def test_cli_cfg_job_prints_the_resolved_config_and_runs_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Prepare
    out_dir = tmp_path / "run"

    # Execute
    code = main(["--cfg", "job", "method=vanilla", "seed=3", f"output_dir={out_dir}"])

    # Assert
    printed = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    assert printed["method"]["name"] == "vanilla"
    assert (printed["seed"], printed["output_dir"]) == (3, str(out_dir))
    assert printed["tracking"]["backend"] == "tensorboard"
    assert not out_dir.exists()


def test_cli_cfg_after_the_overrides_also_prints_the_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Execute
    code = main(["data.stream=domain", f"output_dir={tmp_path / 'x'}", "--cfg"])

    # Assert
    assert code == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["stream"] == "domain"


def test_cli_cfg_hydra_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    code = main(["--cfg", "hydra"])

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "`--cfg hydra`" in err


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is not None, reason="wandb is installed"
)
def test_cli_tracking_backend_without_package_fails_before_running(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Execute
    code = main(["tracking=wandb", "engine=central", f"output_dir={tmp_path / 'x'}"])

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and 'pip install -e ".[wandb]"' in err
    assert not (tmp_path / "x").exists()
