"""Flower simulation scale: round time, client memory and model loads vs clients.

Each federation size runs as its own ``fed-asr engine=simulation ...`` subprocess (a
wall-clock guard kills its process group on overrun) with a fixed amount of data per
client: ``data.max_train_per_stage = train_per_client x N`` and near-uniform shares
(``data.dirichlet_alpha`` large), one stage (``data.stage_order=[shape]``), three
rounds, ``method=vanilla`` by default to isolate the framework's cost, and
``federation.client_cpus=1`` (on 2 cores Flower runs 2 client actors). Round times come
from the run's ``metrics.json`` (``rounds[].seconds``: from ``configure_train`` to the
end of ``aggregate_evaluate``, i.e. train + evaluate of every sampled client).

Memory: while a run is going, a sampler reads the RSS of every process descending from
it (psutil when installed, else ``/proc``) every ``--sample-interval`` seconds and keeps
each process's peak. Client processes are the Ray workers that loaded the base model.

Model loads: ``benchmarks/_loadhook/sitecustomize.py`` is put on ``PYTHONPATH`` of the
run, which every Ray worker inherits; it logs each ``load_base_model`` call with its
process id. The base model must be loaded once per client process (and once by the
server), whatever the number of rounds and partitions a process serves. The first
round (which includes the client processes' start-up and model load) is reported apart
from the later rounds.

Growth: a least-squares line ``seconds = a + b N`` over the later-round times and the
exponent ``k`` of ``seconds ~ N^k`` (log-log fit). With a fixed amount of work per
client and a fixed number of client processes, linear growth (``k ~ 1``) is expected;
``k > 1 + tolerance`` is flagged as super-linear.

Cross-device sizes: from ``SAMPLED_FROM`` clients on (64 and 100 by default) a round
trains ``federation.fraction_train = SAMPLE_FRACTION`` of the clients, as a
cross-device study would; evaluation still asks every client (exact pooled accuracy),
so those round times include N evaluations but only N/10 trainings. Bytes per round are
the run's own counts (``rounds[].bytes_*`` of ``metrics.json``).

Usage: ``python -m benchmarks.bench_sim [--quick] [--out PATH] [--clients 4 16 32 64]``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    base_parser,
    format_table,
    machine_info,
    write_json,
)
from benchmarks.process_tree import RssSampler, descendants_rss
from benchmarks.sim_run import (
    LOAD_HOOK_DIR,
    LOAD_LOG_ENV,
    REPO_ROOT,
    SAMPLE_FRACTION,
    SAMPLED_FROM,
    fed_asr_command,
    prepare_model,
    read_load_log,
    run_one,
    sampling_overrides,
    sim_overrides,
)

NAME = "bench_sim"
CLIENTS = (4, 16, 32, 64, 100)
# k above 1 + this is reported as growing faster than linearly.
LINEAR_TOLERANCE = 0.15


# -- growth analysis -----------------------------------------------------------------
def fit_growth(sizes: Sequence[float], seconds: Sequence[float]) -> dict[str, Any]:
    """Linear fit ``seconds = a + b N`` and log-log exponent ``k`` of ``N^k``.

    Raises
    ------
    ValueError
        Fewer than two points, mismatched lengths or non-positive values.
    """
    if len(sizes) != len(seconds) or len(sizes) < 2:
        raise ValueError(
            "Need at least two (N, seconds) pairs, "
            f"got {len(sizes)} and {len(seconds)}."
        )
    if min(sizes) <= 0 or min(seconds) <= 0:
        raise ValueError("`sizes` and `seconds` must be positive.")
    n = len(sizes)
    mean_x, mean_y = sum(sizes) / n, sum(seconds) / n
    sxx = sum((x - mean_x) ** 2 for x in sizes)
    pairs = zip(sizes, seconds, strict=True)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in pairs) / sxx
    intercept = mean_y - slope * mean_x
    lx = [math.log(x) for x in sizes]
    ly = [math.log(y) for y in seconds]
    mlx, mly = sum(lx) / n, sum(ly) / n
    exponent = sum((a - mlx) * (b - mly) for a, b in zip(lx, ly, strict=True))
    exponent /= sum((a - mlx) ** 2 for a in lx)
    return {
        "slope_s_per_client": slope,
        "intercept_s": intercept,
        "exponent": exponent,
        "at_most_linear": exponent <= 1 + LINEAR_TOLERANCE,
        "tolerance": LINEAR_TOLERANCE,
    }


def run_benchmark(
    clients: Sequence[int] = CLIENTS,
    out_root: Path | None = None,
    cache_dir: Path | None = None,
    timeout_s: float = 1800.0,
    method: str = "vanilla",
    rounds: int = 3,
    train_per_client: int = 40,
    test_per_client: int = 10,
    sample_interval_s: float = 0.5,
) -> dict[str, Any]:
    """Run every federation size sequentially and analyse round-time growth.

    Returns
    -------
    dict[str, Any]
        ``runs`` (one per size), ``growth`` (later-round fit), ``checks`` and
        ``machine``.
    """
    out_root = out_root or RESULTS_DIR / "sim"
    own_cache = cache_dir is None
    cache = Path(tempfile.mkdtemp(prefix="fed_asr_bench_")) if own_cache else cache_dir
    try:
        runs = [
            run_one(
                n,
                out_root,
                cache,
                timeout_s,
                method,
                rounds,
                train_per_client,
                test_per_client,
                sample_interval_s,
            )
            for n in clients
        ]
    finally:
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)
    ok = [r for r in runs if r["status"] == "ok" and r.get("later_round_s")]
    growth = None
    if len(ok) >= 2:
        sizes = [r["num_clients"] for r in ok]
        growth = fit_growth(sizes, [r["later_round_s"] for r in ok])
        first = fit_growth(sizes, [r["first_round_s"] for r in ok])
        growth["first_round"] = first
    checks = {
        "all_runs_ok": all(r["status"] == "ok" for r in runs),
        "model_loaded_once_per_client_process": all(
            r["model_loads_per_client_process"]
            and all(c == 1 for c in r["model_loads_per_client_process"])
            for r in ok
        ),
        "server_loaded_once": all(r["server_model_loads"] == 1 for r in ok),
        "round_time_at_most_linear": None
        if growth is None
        else growth["at_most_linear"],
    }
    return {
        "benchmark": NAME,
        "settings": {
            "clients": list(clients),
            "method": method,
            "rounds": rounds,
            "train_per_client": train_per_client,
            "test_per_client": test_per_client,
            "client_cpus": 1,
            "timeout_s": timeout_s,
            "sample_interval_s": sample_interval_s,
            "stage_order": ["shape"],
        },
        "runs": runs,
        "growth": growth,
        "checks": checks,
        "machine": machine_info(),
    }


COLUMNS = (
    "num_clients",
    "status",
    "first_round_s",
    "later_round_s",
    "later_per_client_s",
    "sampled",
    "bytes_per_round_kib",
    "client_processes",
    "loads_per_process",
    "client_peak_rss_max_mib",
    "driver_peak_rss_mib",
    "subprocess_wall_s",
)


def table_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the printed table."""
    rows = []
    for run in runs:
        later = run.get("later_round_s")
        rows.append(
            {
                **run,
                "later_per_client_s": None
                if later is None
                else later / run["num_clients"],
                "loads_per_process": run.get("model_loads_per_client_process"),
                "sampled": (run.get("clients_sampled") or [None])[-1],
                "bytes_per_round_kib": None
                if not run.get("bytes_per_round")
                else run["bytes_per_round"][-1] / 1024,
            }
        )
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = base_parser(
        __doc__, NAME, "smoke setting: 2 and 4 clients, 8 samples per client"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    parser.add_argument("--method", default="vanilla")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-per-client", type=int, default=40)
    parser.add_argument("--test-per-client", type=int, default=10)
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="wall-clock guard of each subprocess, seconds",
    )
    parser.add_argument("--sample-interval", type=float, default=0.5)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="tiny-model cache (default: a temporary folder)",
    )
    parser.add_argument("--runs-dir", type=Path, default=RESULTS_DIR / "sim")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints a table and writes the JSON result."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.clients, args.train_per_client, args.test_per_client = [2, 4], 8, 4
        args.timeout = min(args.timeout, 600.0)
    result = run_benchmark(
        args.clients,
        args.runs_dir,
        args.cache_dir,
        args.timeout,
        args.method,
        args.rounds,
        args.train_per_client,
        args.test_per_client,
        args.sample_interval,
    )
    print(format_table(table_rows(result["runs"]), COLUMNS))
    summary = {"growth": result["growth"], "checks": result["checks"]}
    print(json.dumps(summary, indent=2))
    for run in result["runs"]:
        if run["status"] != "ok":
            print(f"--- N={run['num_clients']} {run['status']}:")
            print(run.get("log_tail", ""))
    print(write_json(args.out, result))
    return 0


__all__ = [
    "LOAD_HOOK_DIR",
    "LOAD_LOG_ENV",
    "REPO_ROOT",
    "SAMPLED_FROM",
    "SAMPLE_FRACTION",
    "RssSampler",
    "descendants_rss",
    "fed_asr_command",
    "fit_growth",
    "prepare_model",
    "read_load_log",
    "run_benchmark",
    "run_one",
    "sampling_overrides",
    "sim_overrides",
]

if __name__ == "__main__":
    raise SystemExit(main())
