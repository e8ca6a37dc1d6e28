"""Flower run-config keys of the common settings, mapped onto Hydra overrides.

``pyproject.toml`` declares each key of :data:`RUN_CONFIG_KEYS` under
``[tool.flwr.app.config]`` (Flower refuses a ``--run-config`` key that is not
declared), so ``flwr run . --run-config "method='vanilla' rounds-per-stage=1"``
works. Flower requires a default for every declared key: the default is
:data:`UNSET` (``""``), which means "use the Hydra default". Everything else goes
through the ``overrides`` key, one shell-quoted string of Hydra overrides. A setting
given both ways is refused.

No Hydra here: this module only builds override strings for
``fed_asr.config.compose_config``.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Any

__all__ = ["RUN_CONFIG_KEYS", "UNSET", "run_config_overrides"]

# Run-config key (kebab-case) -> Hydra override path. `method` and `tracking` pick a
# config group (configs/<group>/<choice>.yaml); the others set a field.
RUN_CONFIG_KEYS: dict[str, str] = {
    "method": "method",
    "stream": "data.stream",
    "rounds-per-stage": "federation.rounds_per_stage",
    "local-epochs": "federation.local_epochs",
    "fraction-train": "federation.fraction_train",
    "adapter-strategy": "federation.strategy",
    "lora-r": "lora.r",
    "beta": "regularizer.beta",
    "gamma": "regularizer.gamma",
    "spectrum-strategy": "spectrum.strategy",
    "seed": "seed",
    "tracking": "tracking",
}
# Default of every declared key in pyproject.toml: leave the setting to Hydra.
UNSET = ""
_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_./:+-]+$")


def run_config_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """Hydra overrides of a Flower run config: the declared keys, then ``overrides``.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        Flower's ``context.run_config`` (or the dict of a Python API run). Keys of
        :data:`RUN_CONFIG_KEYS` set to :data:`UNSET` are skipped; keys it does not
        know are left to whoever declared them.

    Returns
    -------
    list[str]
        Override strings, e.g. ``["method=vanilla",
        "federation.rounds_per_stage=1", "data.stream=domain"]``.

    Raises
    ------
    ValueError
        ``overrides`` is not valid shell quoting, a value is not a scalar, or a
        setting is given both as a run-config key and in ``overrides``.
    """
    raw = run_config.get("overrides", "")
    try:
        extra = shlex.split(str(raw))
    except ValueError as err:
        raise ValueError(
            f"Run config `overrides` is not valid shell quoting ({err}): {raw!r}."
        ) from None
    given = {_override_path(o): o for o in extra}
    overrides = []
    for key, path in RUN_CONFIG_KEYS.items():
        value = run_config.get(key, UNSET)
        if isinstance(value, str) and value == UNSET:
            continue
        if path in given:
            raise ValueError(
                f"Run config key `{key}={value!r}` and the `overrides` entry "
                f"`{given[path]}` both set `{path}`; give it once."
            )
        overrides.append(f"{path}={_hydra_value(key, value)}")
    return [*overrides, *extra]


def _override_path(override: str) -> str:
    """The config path an override sets: ``+a.b=1`` and ``~a.b`` give ``a.b``."""
    return override.lstrip("+~").split("=", 1)[0].strip()


def _hydra_value(key: str, value: Any) -> str:
    """A run-config value as the right-hand side of a Hydra override."""
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN_VALUE.match(value):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise ValueError(
        f"Run config key `{key}` must be a string, number or boolean, "
        f"got {type(value).__name__} {value!r}."
    )
