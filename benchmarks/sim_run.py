"""One federation size of ``bench_sim``: a guarded ``fed-asr`` run, summarised.

``run_one`` builds the run's Hydra overrides (fixed data per client, client sampling
from ``SAMPLED_FROM`` clients on), prepares the cached tiny model, starts the
simulation subprocess with the model-load hook on ``PYTHONPATH``, samples the RSS of
its process tree under a wall-clock guard and reads round times, bytes and model loads
back from the run's ``metrics.json`` and load log.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.process_tree import RssSampler, kill_leftovers, kill_tree

REPO_ROOT = Path(__file__).resolve().parents[1]
LOAD_HOOK_DIR = Path(__file__).resolve().parent / "_loadhook"
LOAD_LOG_ENV = "FED_ASR_BENCH_LOAD_LOG"
# From this many clients on, a round trains only SAMPLE_FRACTION of them
SAMPLED_FROM = 64
SAMPLE_FRACTION = 0.1


def sim_overrides(
    num_clients: int,
    output_dir: str | Path,
    cache_dir: str | Path,
    method: str = "vanilla",
    rounds: int = 3,
    train_per_client: int = 40,
    test_per_client: int = 10,
    pretrain_steps: int = 30,
    extra: Sequence[str] = (),
) -> list[str]:
    """Hydra overrides of one benchmark run (fixed data per client).

    Raises
    ------
    ValueError
        A count that is not positive.
    """
    for name, value in (
        ("num_clients", num_clients),
        ("rounds", rounds),
        ("train_per_client", train_per_client),
        ("test_per_client", test_per_client),
    ):
        if value <= 0:
            raise ValueError(f"`{name}` must be positive, got {value}.")
    return [
        "engine=simulation",
        f"method={method}",
        f"federation.num_clients={num_clients}",
        f"federation.min_available_clients={_min_clients(num_clients)}",
        f"federation.rounds_per_stage={rounds}",
        "federation.schedule=fixed",
        "federation.client_cpus=1",
        "data.stage_order=[shape]",
        f"data.max_train_per_stage={train_per_client * num_clients}",
        f"data.max_test_per_stage={test_per_client * num_clients}",
        "data.dirichlet_alpha=1000",
        "model.device=cpu",
        f"model.cache_dir={cache_dir}",
        f"model.pretrain_steps={pretrain_steps}",
        "progress=false",
        f"output_dir={output_dir}",
        *extra,
    ]


def fed_asr_command(overrides: Sequence[str]) -> list[str]:
    """``fed-asr`` of this environment (else ``python -m server.cli``) + overrides."""
    script = Path(sys.executable).with_name("fed-asr")
    if not script.exists():
        found = shutil.which("fed-asr")
        script = Path(found) if found else script
    if script.exists():
        return [str(script), *overrides]
    return [sys.executable, "-m", "server.cli", *overrides]


def prepare_model(overrides: Sequence[str]) -> float:
    """Build the run's cached tiny model now, so no run pays for it; returns seconds."""
    from fed_asr.config import compose_config
    from fed_asr.data import build_stream
    from fed_asr.models import ensure_tiny_model

    start = time.perf_counter()
    cfg = compose_config("config", overrides)
    stream = build_stream(cfg.data, cfg.seed)
    ensure_tiny_model(cfg.model, stream.vocabulary(), cfg.seed, progress=False)
    return time.perf_counter() - start


def read_load_log(path: Path) -> list[dict[str, Any]]:
    """Lines of the load log (empty when the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _min_clients(num_clients: int) -> int:
    """Every client below ``SAMPLED_FROM``; else a floor that lets sampling work.

    Flower's FedAvg samples ``max(fraction_train x N, min_train_nodes)`` nodes, and
    fed-asr sets ``min_train_nodes`` from ``federation.min_available_clients``.
    """
    if num_clients < SAMPLED_FROM:
        return num_clients
    return max(2, math.floor(SAMPLE_FRACTION * num_clients))


def sampling_overrides(num_clients: int) -> list[str]:
    """``federation.fraction_train`` of a cross-device size, none below it."""
    if num_clients < SAMPLED_FROM:
        return []
    return [f"federation.fraction_train={SAMPLE_FRACTION}"]


def _round_bytes(entry: dict[str, Any]) -> int:
    """All bytes of one round of the round log, up and down."""
    return sum(int(v) for k, v in entry.items() if k.startswith("bytes_"))


def run_one(
    num_clients: int,
    out_root: Path,
    cache_dir: Path,
    timeout_s: float,
    method: str = "vanilla",
    rounds: int = 3,
    train_per_client: int = 40,
    test_per_client: int = 10,
    sample_interval_s: float = 0.5,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Run one simulation subprocess under a wall-clock guard and summarise it.

    Returns
    -------
    dict[str, Any]
        Status, wall time, per-round seconds and bytes, model loads per process,
        client-process peak RSS and the log tail on failure.
    """
    out_dir = out_root / f"n{num_clients}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    overrides = sim_overrides(
        num_clients,
        out_dir,
        cache_dir,
        method,
        rounds,
        train_per_client,
        test_per_client,
        extra=[*sampling_overrides(num_clients), *extra],
    )
    prepare_s = prepare_model(overrides)
    load_log = out_dir / "model_loads.jsonl"
    env = dict(os.environ)
    env[LOAD_LOG_ENV] = str(load_log)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(LOAD_HOOK_DIR), *filter(None, [env.get("PYTHONPATH")])]
    )
    command = fed_asr_command(overrides)
    log_path = out_dir / "run.log"
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sampler = RssSampler(proc.pid, sample_interval_s).start()
        status = "ok"
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            sampler.stop()
        if status == "timeout":
            kill_tree(proc)
        leftovers = kill_leftovers(
            {p: c for p, c in sampler.commands.items() if p != proc.pid}
        )
    wall = time.perf_counter() - start
    if status == "ok" and proc.returncode != 0:
        status = f"exit {proc.returncode}"
    result: dict[str, Any] = {
        "num_clients": num_clients,
        "status": status,
        "command": command,
        "subprocess_wall_s": wall,
        "model_prepare_s": prepare_s,
        "leftover_processes_killed": leftovers,
        "output_dir": str(out_dir),
    }
    metrics_path = out_dir / "metrics.json"
    if status != "ok" or not metrics_path.exists():
        result["log_tail"] = log_path.read_text(errors="replace")[-3000:]
        return result
    metrics = json.loads(metrics_path.read_text())
    rounds_log = metrics["rounds"]
    loads = read_load_log(load_log)
    loads_per_pid: dict[int, int] = {}
    for line in loads:
        loads_per_pid[line["pid"]] = loads_per_pid.get(line["pid"], 0) + 1
    client_pids = [pid for pid in loads_per_pid if pid != proc.pid]
    client_peaks = [sampler.peaks[p] for p in client_pids if p in sampler.peaks]
    later = [r["seconds"] for r in rounds_log[1:]]
    answered = [r["clients_answered"] for r in rounds_log]
    result.update(
        {
            "metrics_wall_time_s": metrics.get("wall_time_s"),
            "round_seconds": [r["seconds"] for r in rounds_log],
            "first_round_s": rounds_log[0]["seconds"],
            "later_round_s": sum(later) / len(later) if later else None,
            "clients_answered": answered,
            "clients_sampled": [r["clients_sampled"] for r in rounds_log],
            "bytes_per_round": [_round_bytes(r) for r in rounds_log],
            "failed_replies": metrics.get("failed_replies"),
            "bytes_up_adapter_per_client_round": [
                r["bytes_up_adapter"] / max(r["clients_answered"], 1)
                for r in rounds_log
            ],
            "bytes_down_adapter_per_client_round": [
                r["bytes_down_adapter"] / max(r["clients_sampled"], 1)
                for r in rounds_log
            ],
            "server_model_loads": loads_per_pid.get(proc.pid, 0),
            "client_processes": len(client_pids),
            "model_loads_per_client_process": [loads_per_pid[p] for p in client_pids],
            "model_load_seconds": [line["seconds"] for line in loads],
            "client_peak_rss_mib": client_peaks,
            "client_peak_rss_max_mib": max(client_peaks) if client_peaks else None,
            "driver_peak_rss_mib": sampler.peaks.get(proc.pid),
            "all_processes_peak_rss_sum_mib": sampler.total_peak,
            "rss_samples": sampler.samples,
            "processes_seen": {
                str(pid): {
                    "peak_mib": sampler.peaks[pid],
                    "command": sampler.commands.get(pid, "")[:120],
                }
                for pid in sorted(sampler.peaks)
            },
        }
    )
    return result


__all__ = [
    "LOAD_HOOK_DIR",
    "LOAD_LOG_ENV",
    "REPO_ROOT",
    "SAMPLED_FROM",
    "SAMPLE_FRACTION",
    "fed_asr_command",
    "prepare_model",
    "read_load_log",
    "run_one",
    "sampling_overrides",
    "sim_overrides",
]
