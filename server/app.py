"""Flower ServerApp of FedASR (``flwr run .`` and the Python simulation engine)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_asr.config import load_config
from fed_asr.models.device import torch_threads
from server.run import FederatedRun


def make_server_app(
    run_config: Mapping[str, Any] | None = None, engine: str = "flwr-run"
) -> ServerApp:
    """Build the ServerApp; ``run_config`` overrides the context's (Python API runs)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = load_config(run_config or context.run_config)
        # the merges compute on the run's thread count, as the clients do
        with torch_threads(cfg.train.torch_threads):
            FederatedRun(cfg, grid, engine=engine).run()

    return app


app = make_server_app()
