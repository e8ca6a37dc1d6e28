"""The ``fed-asr`` console script: compose the Hydra config and run the engine.

Usage: ``fed-asr [KEY=VALUE ...]`` with Hydra overrides, e.g.
``fed-asr engine=central method=vanilla data.stream=domain seed=1``. The last line
printed on stdout is the path of the run's ``metrics.json``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fed_asr.config import compose_config


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    config_name = "config"
    if args and args[0].startswith("--config-name="):
        config_name = args.pop(0).split("=", 1)[1]
    try:
        cfg = compose_config(config_name, args)
    except Exception as err:  # Hydra/OmegaConf/ValueError: show the reason, not a trace
        reason = f"{err}" + (f" ({err.__cause__})" if err.__cause__ else "")
        print(f"fed-asr: invalid configuration: {reason}", file=sys.stderr)
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
