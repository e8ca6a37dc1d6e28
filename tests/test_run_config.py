"""Run-config keys of the common settings (fed_asr.run_config) through Flower's parsing.

``flwr run . --run-config "..."`` parses the string with Flower's
``parse_config_args`` and fuses it into the app's declared ``[tool.flwr.app.config]``
with ``get_fused_config_from_dir`` (an undeclared key is refused there); both apps
then call ``fed_asr.config.load_config`` on the result. These tests run the same
three functions on this repository's pyproject.toml.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from fed_asr.config import compose_config, load_config
from fed_asr.run_config import RUN_CONFIG_KEYS, UNSET, run_config_overrides

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]


def flwr_run_config(run_config: str) -> dict:
    """What the apps' ``context.run_config`` is for ``flwr run . --run-config ...``."""
    return get_fused_config_from_dir(REPO_ROOT, parse_config_args([run_config]))


def test_pyproject_declares_every_run_config_key_with_unset_default() -> None:
    # Prepare
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())

    # Execute
    declared = pyproject["tool"]["flwr"]["app"]["config"]

    # Assert
    assert set(declared) == {*RUN_CONFIG_KEYS, "config-name", "overrides"}
    assert all(declared[key] == UNSET for key in RUN_CONFIG_KEYS)


def test_flwr_run_config_keys_set_their_config_fields() -> None:
    # Prepare
    run_config = flwr_run_config(
        "method='vanilla' rounds-per-stage=1 stream='domain' local-epochs=3 "
        "fraction-train=0.5 adapter-strategy='fedmedian' lora-r=4 beta=0.25 "
        "gamma=0.0 spectrum-strategy='mean' seed=7 tracking='none'"
    )

    # Execute
    cfg = load_config(run_config)

    # Assert
    assert cfg.method.name == "vanilla"
    assert cfg.data.stream == "domain"
    assert cfg.federation.rounds_per_stage == 1
    assert cfg.federation.local_epochs == 3
    assert cfg.federation.fraction_train == 0.5
    assert cfg.federation.strategy == "fedmedian"
    assert cfg.lora.r == 4
    assert (cfg.regularizer.beta, cfg.regularizer.gamma) == (0.25, 0.0)
    assert cfg.spectrum.strategy == "mean"
    assert cfg.seed == 7
    assert cfg.tracking.backend == "none"


def test_flwr_run_config_without_keys_gives_the_hydra_defaults() -> None:
    # Prepare
    run_config = flwr_run_config("")

    # Execute
    cfg = load_config(run_config)

    # Assert
    assert run_config_overrides(run_config) == []
    assert cfg == compose_config()


def test_flwr_run_config_keys_combine_with_overrides() -> None:
    # Prepare
    run_config = flwr_run_config(
        "method='vanilla' overrides='data.stream=domain train.lr=0.01'"
    )

    # Execute
    overrides = run_config_overrides(run_config)
    cfg = load_config(run_config)

    # Assert
    assert overrides == ["method=vanilla", "data.stream=domain", "train.lr=0.01"]
    assert (cfg.method.name, cfg.data.stream, cfg.train.lr) == (
        "vanilla",
        "domain",
        0.01,
    )


def test_flwr_run_config_undeclared_key_is_refused_by_flower() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="Key 'rounds' is not present"):
        flwr_run_config("rounds=1")


@pytest.mark.parametrize(
    ("given", "path"),
    [
        ("rounds-per-stage=1 overrides='federation.rounds_per_stage=3'", "rounds"),
        ("method='vanilla' overrides='method=ewc'", "method"),
        ("lora-r=4 overrides='+lora.r=2'", "lora.r"),
    ],
)
def test_run_config_key_and_override_of_same_field_raises_naming_both(
    given: str, path: str
) -> None:
    # Prepare
    run_config = flwr_run_config(given)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"Run config key `.+` and the `overrides`"):
        load_config(run_config)
    with pytest.raises(ValueError, match=path):
        run_config_overrides(run_config)


def test_run_config_values_are_quoted_for_hydra() -> None:
    # Prepare: a value with a space and a bool
    run_config = {"stream": "my stream", "seed": True, "beta": 0.5}

    # Execute
    overrides = run_config_overrides(run_config)

    # Assert
    assert overrides == [
        "data.stream='my stream'",
        "regularizer.beta=0.5",
        "seed=true",
    ]


def test_run_config_unbalanced_overrides_quoting_raises() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="Run config `overrides` is not valid shell"):
        run_config_overrides({"overrides": "data.stream='domain"})


def test_run_config_key_with_bad_value_names_the_field() -> None:
    # Prepare
    run_config = flwr_run_config("rounds-per-stage=0")

    # Execute / Assert
    with pytest.raises(ValueError, match="`federation.rounds_per_stage` must be"):
        load_config(run_config)


def test_flwr_run_config_name_selects_a_preset_and_keys_still_apply() -> None:
    # Prepare
    run_config = flwr_run_config("config-name='qk_shape_color' method='vanilla'")

    # Execute
    cfg = load_config(run_config)

    # Assert
    assert cfg == compose_config("qk_shape_color", ["method=vanilla"])
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
