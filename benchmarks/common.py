"""Helpers shared by the benchmark scripts: machine info, tables, JSON, memory probes.

Memory on CPU
-------------
``tracemalloc`` does not see torch's allocations, so CPU memory is the resident set
size (RSS) of the process, read from ``/proc/self/status``. ``reset_peak_rss`` writes
``5`` to ``/proc/self/clear_refs``, which resets the kernel's high-water mark
(``VmHWM``, also what ``getrusage(...).ru_maxrss`` reports) to the current RSS, so the
peak of a measured section excludes the set-up before it. Where the reset is not
allowed, the peak is the process's lifetime high-water mark (flagged in the result).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fed_asr.config_sections import check_positive

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 2**20


def default_out(name: str) -> Path:
    """Default JSON path of benchmark ``name``: ``benchmarks/results/<name>.json``."""
    return RESULTS_DIR / f"{name}.json"


def base_parser(doc: str | None, name: str, quick_help: str) -> argparse.ArgumentParser:
    """Parser of a benchmark script with the shared ``--quick`` and ``--out`` options.

    Parameters
    ----------
    doc : str | None
        The script's module docstring; its first line is the description.
    name : str
        Benchmark name; ``--out`` defaults to ``default_out(name)``.
    quick_help : str
        Help text of ``--quick`` (what the smoke setting runs).
    """
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=default_out(name))
    return parser


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads explicitly and return the value in force.

    Raises
    ------
    ValueError
        ``threads`` is not positive.
    """
    check_positive("threads", threads)
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine_info() -> dict[str, Any]:
    """CPU count, torch/python versions, thread settings, CUDA and the date."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": torch.cuda.is_available(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    for module in ("transformers", "peft", "flwr"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - optional in a given benchmark
            info[module] = None
    return info


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence.

    Raises
    ------
    ValueError
        ``values`` is empty.
    """
    if not values:
        raise ValueError("`values` must not be empty.")
    return float(statistics.median(values))


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Plain-text table of ``rows`` (floats with 4 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return str(value)
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for values in body:
        lines.append("  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)))
    return "\n".join(lines)


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (None when unavailable)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB (0 when unknown)."""
    kib = _status_kib("VmRSS")
    return 0.0 if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS; False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """RSS high-water mark (``VmHWM``, else ``ru_maxrss``) of this process, in MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024
