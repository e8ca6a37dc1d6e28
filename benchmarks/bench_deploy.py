"""Per-message overhead of a SuperNode on the loopback Deployment Engine.

Runs ``scripts/deploy_local.sh`` (TLS, node authentication, signing, secure
aggregation) twice with the same run: every node handling each message in the
``flwr-clientapp`` process Flower starts for it (``in-process``: imports torch and
loads the base model every time), then every node with a site worker
(``fed-asr-site-worker``: the model stays loaded). Both runs log one timing line per
message (``clients/entry.py``); the worker logs its own handling time.

Per message:
- ``node_s``: process start -> reply ready (``process up`` + ``handler``);
- ``compute_s``: the same message type's median handling time inside a warm worker
  (first message of each type per node excluded: that one loads the model);
- ``overhead_s = node_s - compute_s``: what a message costs beyond its work
  (Flower's own process start, imports, model loading, forwarding).

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
MODES = {"in-process": 0, "site worker": None}  # None: every node


def run_deployment(out: Path, nodes: int, workers: int, overrides: str) -> float:
    """Run the loopback deployment once; return its wall time in seconds."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FED_ASR_NODES": str(nodes),
        "FED_ASR_SITE_WORKERS": str(workers),
        "FED_ASR_OVERRIDES": overrides,
    }
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
    """Timing lines of every SuperNode; warm handling times per message type."""
    messages, warm = [], {}
    for node in range(nodes):
        for line in (out / f"supernode-{node}.log").read_text().splitlines():
            if match := TIMING.search(line):
                kind, up, handler, where = match.groups()
                messages.append(
                    {
                        "node": node,
                        "type": kind,
                        "process_up_s": float(up),
                        "handler_s": float(handler),
                        "where": where,
                    }
                )
        worker_log = out / f"site-worker-{node}.log"
        if worker_log.exists():
            seen: set[str] = set()
            for line in worker_log.read_text().splitlines():
                if match := HANDLED.search(line):
                    kind, seconds = match.group(1), float(match.group(2))
                    if kind in seen:  # the first of a type loads the model
                        warm.setdefault(kind, []).append(seconds)
                    seen.add(kind)
    return messages, warm


def summarize(
    messages: list[dict[str, Any]], compute: dict[str, float]
) -> dict[str, Any]:
    """Medians of node time, compute and overhead, overall and per message type."""
    rows = {}
    for kind in sorted({m["type"] for m in messages}) + ["all"]:
        chosen = [m for m in messages if kind in ("all", m["type"])]
        node = [m["process_up_s"] + m["handler_s"] for m in chosen]
        over = [
            n - compute.get(m["type"], 0.0) for n, m in zip(node, chosen, strict=True)
        ]
        rows[kind] = {
            "messages": len(chosen),
            "process_up_s": statistics.median(m["process_up_s"] for m in chosen),
            "handler_s": statistics.median(m["handler_s"] for m in chosen),
            "node_s": statistics.median(node),
            "overhead_s": statistics.median(over),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run both modes, print a table, write JSON."""
    parser = base_parser(__doc__, "bench_deploy", "one round, smallest slice")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("bench-deploy"))
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
    for mode, workers in reversed(MODES.items()):  # the worker run gives compute
        out = (args.work / mode.replace(" ", "-")).resolve()
        count = args.nodes if workers is None else workers
        wall = run_deployment(out, args.nodes, count, overrides)
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
                "process_up_s",
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
