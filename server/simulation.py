"""``engine=simulation``: the ServerApp and ClientApp in Flower's simulation engine."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fed_asr.config import ExperimentConfig
from fed_asr.outputs import METRICS_FILE


def run_simulation_engine(
    cfg: ExperimentConfig,
    overrides: Sequence[str],
    config_name: str = "config",
    client_mods: list[Any] | None = None,
) -> Path:
    """Run a simulation of ``cfg.federation.num_clients`` SuperNodes from Python.

    Parameters
    ----------
    cfg : ExperimentConfig
        The composed config (read for the federation size and output folder).
    overrides : Sequence[str]
        The Hydra overrides that produced ``cfg``; the apps recompose from them.
    config_name : str
        Primary config name.
    client_mods : list | None
        Flower client mods for every ClientApp (e.g. fault injection in tests).

    Returns
    -------
    Path
        The ``metrics.json`` written by the ServerApp.

    Raises
    ------
    RuntimeError
        If the simulation ended without writing ``metrics.json``.
    """
    from flwr.simulation import run_simulation

    from clients.app import make_client_app
    from server.app import make_server_app

    out = Path(cfg.output_dir).expanduser().resolve()
    pinned = [o for o in overrides if not o.startswith("output_dir=")]
    run_config = {
        "config-name": config_name,
        "overrides": shlex.join([*pinned, f"output_dir={out}"]),
    }
    metrics = out / METRICS_FILE
    before = metrics.stat().st_mtime if metrics.exists() else None
    run_simulation(
        server_app=make_server_app(run_config, engine="simulation"),
        client_app=make_client_app(run_config, mods=client_mods),
        num_supernodes=cfg.federation.num_clients,
        backend_config={
            "client_resources": {
                "num_cpus": cfg.federation.client_cpus,
                "num_gpus": 0.0 if cfg.model.device == "cpu" else _gpus_per_client(),
            },
            "init_args": {"log_to_driver": True},
        },
    )
    if not metrics.exists() or (
        before is not None and metrics.stat().st_mtime == before
    ):
        raise RuntimeError(
            f"The simulation ended without writing {metrics}; see the log above."
        )
    return metrics


def _gpus_per_client() -> float:
    import torch

    return 0.5 if torch.cuda.is_available() else 0.0
