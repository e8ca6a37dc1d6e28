"""The ``fed-asr`` console script: compose the Hydra config and run the engine.

Usage: ``fed-asr [--config-name=NAME] [--cfg [job]] [KEY=VALUE ...]`` with Hydra
overrides, e.g. ``fed-asr engine=central method=vanilla data.stream=domain seed=1``.
The last line printed on stdout is the path of the run's ``metrics.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fed_asr.config import ExperimentConfig, compose_config, to_yaml
from fed_asr.security.checkpoint_integrity import IntegrityError
from fed_asr.tracking import check_tracking_backend
from server.cli_help import help_text, pop_cfg_flag


def _one_line(text: str) -> str:
    return " ".join(text.split())


def check_inputs(cfg: ExperimentConfig) -> None:
    """Check what the user supplies before anything runs.

    Builds the data stream (a manifest folder is read and every image decoded) and,
    with ``resume=true`` in a federated run, loads the checkpoint as the run will
    (integrity, and the same configuration).

    Raises
    ------
    ValueError, OSError, IntegrityError
        A bad manifest, a missing file, a checkpoint of another configuration or
        one that fails its manifest.
    """
    from fed_asr.data import build_stream

    build_stream(cfg.data, cfg.seed)
    if cfg.resume and cfg.engine.name != "central":
        from server.checkpoint import run_checkpointer
        from server.signing_key import server_signing_key

        run_checkpointer(cfg, server_signing_key(cfg.security)).load_latest()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    config_name = "config"
    if args and args[0].startswith("--config-name="):
        config_name = args.pop(0).split("=", 1)[1]
    wants_help = "-h" in args or "--help" in args
    try:
        if wants_help:  # groups and defaults come from the config tree
            page = help_text(__doc__ or "", config_name)
        else:
            show_config = pop_cfg_flag(args)
            cfg = compose_config(config_name, args)
            if not show_config:
                check_tracking_backend(cfg.tracking)
    except Exception as err:  # Hydra/OmegaConf/ValueError: show the reason, not a trace
        reason = f"{err}" + (f" ({err.__cause__})" if err.__cause__ else "")
        print(f"fed-asr: invalid configuration: {_one_line(reason)}", file=sys.stderr)
        return 2
    if wants_help:
        print(page)
        return 0
    if show_config:  # `--cfg job`, as Hydra: the resolved config, nothing runs
        print(to_yaml(cfg), end="")
        return 0
    try:
        check_inputs(cfg)
    except (ValueError, OSError, IntegrityError) as err:  # data or checkpoint: user's
        print(f"fed-asr: invalid input: {_one_line(str(err))}", file=sys.stderr)
        return 2
    if cfg.engine.name == "central":
        from fed_asr.central import run_central

        path = run_central(cfg)
    else:
        from server.simulation import run_simulation_engine

        path = run_simulation_engine(cfg, args, config_name)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
