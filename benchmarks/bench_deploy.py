"""Per-message overhead of a SuperNode on the loopback Deployment Engine.

Runs ``scripts/deploy_local.sh`` (TLS, node authentication, signing, secure
aggregation) three times with the same run, every node in one mode:
- ``site worker``: Flower's ``flwr-clientapp`` process per message forwards it to a
  long-lived ``fed-asr-site-worker`` that keeps the model loaded;
- ``in-process``: the message is handled in that per-message process (imports torch
  and loads the base model every time: what every deployment did before);
- ``site executor``: the SuperNode in process isolation mode, every task run by one
  long-lived ``fed-asr-site-executor`` process (no process per message at all).

Per message:
- ``node_s``: time at the node, from the ClientApp process's start (or, for the
  executor, from acquiring the task) to the reply pushed or ready;
- ``compute_s``: the message type's median handling time in a warm site worker
  (the first message of each type per node excluded: that one loads the model);
- ``overhead_s = node_s - compute_s``: what a message costs beyond its work.

Usage: ``python -m benchmarks.bench_deploy [--rounds 3] [--quick]``.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import base_parser, format_table, machine_info, write_json

REPO = Path(__file__).resolve().parents[1]
TIMING = re.compile(
    r"timing (\S+): process up ([\d.]+) s before the handler, handler ([\d.]+) s "
    r"\(([^)]+)\)"
)
HANDLED = re.compile(r"\] (\S+) for node \d+ handled in ([\d.]+) s")
EXECUTED = re.compile(r"site executor: (\S+) (?:done|failed) in ([\d.]+) s")
# Mode -> deploy_local.sh variable that gives every node that helper ("" = none).
# The site worker runs first: its warm handling times are the compute estimate.
MODES = {
    "site worker": "FED_ASR_SITE_WORKERS",
    "in-process": "",
    "site executor": "FED_ASR_SITE_EXECUTORS",
}


def run_deployment(out: Path, nodes: int, helper: str, overrides: str) -> float:
    """Run the loopback deployment once; return its wall time in seconds."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FED_ASR_NODES": str(nodes),
        "FED_ASR_OVERRIDES": overrides,
        "FED_ASR_SITE_WORKERS": "0",
        "FED_ASR_SITE_EXECUTORS": "0",
    }
    if helper:
        env[helper] = str(nodes)
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "deploy_local.sh"), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"deploy_local.sh failed:\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def parse_logs(out: Path, nodes: int) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """Per-message timings of every node; warm handling times per message type.

    ``node_s`` is the time a message spent at the node: ``process up`` + handler for
    a ClientApp process per message, the executor's whole task for a site executor.
    """
    messages, warm = [], {}
    for node in range(nodes):
        executor_log = out / f"site-executor-{node}.log"
        if executor_log.exists():
            messages += _executor_messages(executor_log, node)
        else:
            for line in (out / f"supernode-{node}.log").read_text().splitlines():
                if match := TIMING.search(line):
                    kind, up, handler, where = match.groups()
                    messages.append(
                        _message(node, kind, float(up) + float(handler), handler, where)
                    )
        worker_log = out / f"site-worker-{node}.log"
        if worker_log.exists():
            handled = HANDLED.findall(worker_log.read_text())
            for (kind, seconds), cold in zip(
                handled, _first_of_kind([kind for kind, _ in handled]), strict=True
            ):
                if not cold:
                    warm.setdefault(kind, []).append(float(seconds))
    keys = [(m["node"], m["type"]) for m in messages]
    for message, cold in zip(messages, _first_of_kind(keys), strict=True):
        message["cold"] = cold
    return messages, warm


def _first_of_kind(keys: list[Any]) -> list[bool]:
    """Whether each entry is the first of its key: the message that loads the model."""
    seen: set[Any] = set()
    first = []
    for key in keys:
        first.append(key not in seen)
        seen.add(key)
    return first


def _executor_messages(log: Path, node: int) -> list[dict[str, Any]]:
    """A site executor's tasks: its handler timing line, then its task line."""
    messages, handler = [], "nan"
    for line in log.read_text().splitlines():
        if match := TIMING.search(line):
            handler = match.group(3)
        elif match := EXECUTED.search(line):
            kind, seconds = match.group(1), float(match.group(2))
            messages.append(_message(node, kind, seconds, handler, "site executor"))
    return messages


def _message(
    node: int, kind: str, node_s: float, handler: str, where: str
) -> dict[str, Any]:
    return {
        "node": node,
        "type": kind,
        "node_s": node_s,
        "handler_s": float(handler),
        "outside_handler_s": node_s - float(handler),
        "where": where,
    }


def summarize(
    messages: list[dict[str, Any]], compute: dict[str, float]
) -> dict[str, Any]:
    """Medians of node time, compute and overhead, overall and per message type."""
    rows = {}
    for kind in sorted({m["type"] for m in messages}) + ["all", "all warm"]:
        chosen = [
            m
            for m in messages
            if kind == m["type"]
            or kind == "all"
            or (kind == "all warm" and not m["cold"])
        ]
        node = [m["node_s"] for m in chosen]
        over = [
            n - compute.get(m["type"], 0.0) for n, m in zip(node, chosen, strict=True)
        ]
        rows[kind] = {
            "messages": len(chosen),
            "outside_handler_s": statistics.median(
                m["outside_handler_s"] for m in chosen
            ),
            "handler_s": statistics.median(m["handler_s"] for m in chosen),
            "node_s": statistics.median(node),
            "overhead_s": statistics.median(over),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run every mode, print a table, write JSON."""
    parser = base_parser(__doc__, "bench_deploy", "one round, smallest slice")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("bench-deploy"))
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="summarize the logs of earlier runs in --work instead of running",
    )
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    overrides = (
        "data.max_train_per_stage=16 data.max_test_per_stage=8 "
        "data.stage_order=[shape] federation.schedule=fixed "
        f"federation.rounds_per_stage={rounds} progress=false"
    )
    results: dict[str, Any] = {"overrides": overrides, "nodes": args.nodes}
    logs: dict[str, list[dict[str, Any]]] = {}
    compute: dict[str, float] = {}
    for mode, helper in MODES.items():
        out = (args.work / mode.replace(" ", "-")).resolve()
        metrics_path = out / "run" / "metrics.json"
        if args.reuse and metrics_path.exists():
            wall = float(json.loads(metrics_path.read_text())["wall_time_s"])
        else:
            wall = run_deployment(out, args.nodes, helper, overrides)
        logs[mode], warm = parse_logs(out, args.nodes)
        compute = compute or {k: statistics.median(v) for k, v in warm.items()}
        metrics = json.loads((out / "run" / "metrics.json").read_text())
        results[mode] = {
            "wall_s": wall,
            "round_s": [r["seconds"] for r in metrics["rounds"]],
            "messages": logs[mode],
        }
    results["compute_s"] = compute
    table = []
    for mode in MODES:
        summary = summarize(logs[mode], compute)
        results[mode]["summary"] = summary
        for kind, row in summary.items():
            table.append({"mode": mode, "type": kind, **row})
    print(
        format_table(
            table,
            [
                "mode",
                "type",
                "messages",
                "outside_handler_s",
                "handler_s",
                "node_s",
                "overhead_s",
            ],
        )
    )
    results["machine"] = machine_info()
    print(f"wrote {write_json(args.out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
