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
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    base_parser,
    format_table,
    machine_info,
    write_json,
)

NAME = "bench_sim"
REPO_ROOT = Path(__file__).resolve().parents[1]
LOAD_HOOK_DIR = Path(__file__).resolve().parent / "_loadhook"
LOAD_LOG_ENV = "FED_ASR_BENCH_LOAD_LOG"
CLIENTS = (4, 16, 32, 64, 100)
# From this many clients on, a round trains only SAMPLE_FRACTION of them
SAMPLED_FROM = 64
SAMPLE_FRACTION = 0.1
# k above 1 + this is reported as growing faster than linearly.
LINEAR_TOLERANCE = 0.15


# -- process memory sampling ---------------------------------------------------------
def _proc_children() -> dict[int, list[int]]:
    """Parent pid -> child pids, read from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: split after it
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _proc_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants_rss(root: int) -> dict[int, tuple[float, str]]:
    """RSS (MiB) and command line of ``root`` and all its live descendants.

    Uses psutil when it is installed, else ``/proc``.
    """
    try:
        import psutil
    except ImportError:
        psutil = None  # type: ignore[assignment]
    found: dict[int, tuple[float, str]] = {}
    if psutil is not None:
        try:
            top = psutil.Process(root)
            procs = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return found
        for proc in procs:
            try:
                with proc.oneshot():
                    found[proc.pid] = (
                        proc.memory_info().rss / 2**20,
                        " ".join(proc.cmdline())[:200],
                    )
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found
    children = _proc_children()
    stack = [root]
    while stack:
        pid = stack.pop()
        rss = _proc_rss_mib(pid)
        if rss is not None:
            found[pid] = (rss, _proc_cmdline(pid)[:200])
        stack.extend(children.get(pid, []))
    return found


@dataclass
class RssSampler:
    """Background thread keeping the peak RSS of every descendant of ``root``."""

    root: int
    interval_s: float = 0.5
    peaks: dict[int, float] = field(default_factory=dict)
    commands: dict[int, str] = field(default_factory=dict)
    total_peak: float = 0.0
    samples: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        """Start sampling; returns ``self``."""
        self._thread.start()
        return self

    def sample(self) -> None:
        """Take one sample now."""
        found = descendants_rss(self.root)
        for pid, (rss, command) in found.items():
            self.peaks[pid] = max(self.peaks.get(pid, 0.0), rss)
            if command:
                self.commands[pid] = command
        self.total_peak = max(self.total_peak, sum(r for r, _ in found.values()))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        self._thread.join()


# -- one simulation run --------------------------------------------------------------
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
        f"federation.min_available_clients={num_clients}",
        f"federation.rounds_per_stage={rounds}",
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


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """End the run's process group, then any recorded descendant still alive."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue


def _kill_leftovers(commands: dict[int, str], grace_s: float = 15.0) -> list[int]:
    """SIGKILL our run's descendants that outlived it (after a grace period).

    A pid is only signalled while its command line is still the one recorded for it,
    so a pid reused by an unrelated process is never touched.
    """

    def ours(pid: int) -> bool:
        command = commands.get(pid)
        return bool(command) and _proc_cmdline(pid)[:200] == command

    deadline = time.monotonic() + grace_s
    alive = [pid for pid in commands if ours(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [pid for pid in alive if ours(pid)]
    killed = []
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return killed


def read_load_log(path: Path) -> list[dict[str, Any]]:
    """Lines of the load log (empty when the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
            _kill_tree(proc)
        leftovers = _kill_leftovers(
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
    "RssSampler",
    "descendants_rss",
    "fit_growth",
    "run_benchmark",
    "run_one",
    "sim_overrides",
]

if __name__ == "__main__":
    raise SystemExit(main())
