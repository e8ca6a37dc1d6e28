"""Render the benchmark JSON results as Markdown tables (for ``BENCHMARKS.md``).

Usage: ``python -m benchmarks.report [--results DIR]``; prints to stdout the tables of
every ``bench_*.json`` found.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def step_tables(result: dict[str, Any]) -> str:
    """Step time / memory table and the targets of ``bench_step``."""
    rows = [
        [
            r["grid"],
            r["seq_len"],
            r["variant"],
            _f(r["median_s"]),
            _f(r["ratio_vs_vanilla"], 2),
            _f(r.get("peak_mib"), 0),
            _f(r.get("step_delta_mib"), 0),
        ]
        for r in result["rows"]
    ]
    header = [
        "grid",
        "seq",
        "variant",
        "median step (s)",
        "x vanilla",
        "peak RSS (MiB)",
        "step delta (MiB)",
    ]
    t = result["targets"]
    targets = [
        [
            "ASR spectral-only (selective) / vanilla",
            _f(t["asr_spec_selective_over_vanilla"], 3),
            "<= 1.15",
            _f(t["target_spec_over_vanilla_met"]),
        ],
        [
            "ASR full (selective, gamma=0.05) / vanilla",
            _f(t["asr_full_selective_over_vanilla"], 3),
            "(info)",
            "",
        ],
        [
            "eager / selective, spectral-only",
            _f(t["eager_over_selective_spec"], 2),
            ">= 2",
            _f(t["target_selective_2x_faster_met"]),
        ],
        [
            "eager / selective, full",
            _f(t["eager_over_selective_full"], 2),
            ">= 2",
            _f(
                None
                if t["eager_over_selective_full"] is None
                else t["eager_over_selective_full"] >= 2
            ),
        ],
        [
            "selective peak < eager peak (spectral-only)",
            "",
            "",
            _f(t["selective_lower_peak_memory_spec"]),
        ],
        [
            "selective peak < eager peak (full)",
            "",
            "",
            _f(t["selective_lower_peak_memory_full"]),
        ],
    ]
    return (
        markdown_table(rows, header)
        + f"\n\nTargets at the {t['grid']}x{t['grid']} grid:\n\n"
        + markdown_table(targets, ["check", "measured", "target", "met"])
    )


def spectral_table(result: dict[str, Any]) -> str:
    """Descriptor throughput table of ``bench_spectral``."""
    rows = [
        [
            r["grid"],
            r["seq_len"],
            r["maps"],
            _f(r["describe_fwd_ms"], 2),
            _f(r["describe_fwd_bwd_ms"], 2),
            f"{r['maps_per_s']:,.0f}",
            f"{r['maps_per_s_fwd_bwd']:,.0f}",
            _f(r["model_fwd_ms"], 1),
            f"{100 * r['describe_share_of_fwd']:.2f}%",
        ]
        for r in result["rows"]
    ]
    header = [
        "grid",
        "seq",
        "maps/call",
        "describe fwd (ms)",
        "fwd+bwd (ms)",
        "maps/s (fwd)",
        "maps/s (fwd+bwd)",
        "model fwd (ms)",
        "describe / model fwd",
    ]
    return markdown_table(rows, header)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def comm_table(result: dict[str, Any]) -> str:
    """Payload table of ``bench_comm``."""
    rows = [
        [
            r["model"],
            f"{r['parameters']:,}",
            f"{r['lora_parameters']:,}",
            f"{_bytes(r['adapter_bytes'])} ({r['adapter_bytes']:,} B)",
            f"{r['stats_bytes']:,} B",
            f"{r['spectrum_bytes']:,} B",
            _bytes(r["full_bytes_fp32"]),
            _bytes(r["full_bytes_fp16"]),
            f"{100 * r['spectrum_over_adapter']:.3f}%",
            f"{100 * r['adapter_over_full_fp32']:.4f}%",
            f"{_bytes(r['fedasr_round_bytes'])} vs "
            f"{_bytes(r['fedavg_full_round_bytes'])}",
        ]
        for r in result["rows"]
    ]
    header = [
        "model",
        "parameters",
        "LoRA params",
        "adapter",
        "stats (up/stage)",
        "spectrum (down/round)",
        "full fp32",
        "full fp16",
        "spectrum / adapter",
        "adapter / full fp32",
        "per client-round: FedASR vs full FedAvg",
    ]
    return markdown_table(rows, header)


def sim_table(result: dict[str, Any]) -> str:
    """Simulation scale table of ``bench_sim``."""
    rows = []
    for r in result["runs"]:
        if r["status"] != "ok":
            rows.append([r["num_clients"], r["status"]] + [""] * 8)
            continue
        rows.append(
            [
                r["num_clients"],
                r["status"],
                _f(r["first_round_s"], 2),
                _f(r["later_round_s"], 2),
                _f(r["later_round_s"] / r["num_clients"], 3),
                r["client_processes"],
                r["model_loads_per_client_process"],
                _f(r["client_peak_rss_max_mib"], 0),
                _f(r["driver_peak_rss_mib"], 0),
                _f(r["subprocess_wall_s"], 1),
            ]
        )
    header = [
        "clients",
        "status",
        "round 1 (s)",
        "later rounds, mean (s)",
        "later round / client (s)",
        "client processes",
        "model loads per client process",
        "client peak RSS (MiB)",
        "driver peak RSS (MiB)",
        "subprocess wall (s)",
    ]
    return markdown_table(rows, header)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the Markdown tables of every result found."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    renderers = {
        "bench_step": step_tables,
        "bench_step_threads2": step_tables,
        "bench_spectral": spectral_table,
        "bench_comm": comm_table,
        "bench_sim": sim_table,
        "bench_sim_asr": sim_table,
    }
    for name, render in renderers.items():
        path = args.results / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        machine = result["machine"]
        print(f"## {name}\n")
        print(
            f"{machine['date']}, {machine['cpu_count']} CPUs, torch "
            f"{machine['torch']}, torch threads {machine['torch_threads']}, load "
            f"average {machine.get('load_average')}\n"
        )
        print(render(result) + "\n")
        extra = result.get("growth") or None
        if extra:
            print("Growth: " + json.dumps(extra) + "\n")
        if result.get("checks"):
            print("Checks: " + json.dumps(result["checks"]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
