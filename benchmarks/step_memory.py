"""Peak memory of ``bench_step``'s training steps, each in a fresh process.

``measure_memory_subprocess`` runs ``python -m benchmarks.bench_step --child-memory``
with a fixed glibc mmap threshold (``MALLOC_ENV``), so freed tensors go back to the OS
and RSS follows live memory; the child calls ``measure_memory``, which resets the RSS
high-water mark after a warm-up step (``torch.cuda.max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import current_rss_mib, peak_rss_mib, reset_peak_rss
from benchmarks.step_setup import build_setup, get_variant, make_method, run_step

# Fixed glibc mmap threshold for the memory subprocess (see module docstring).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def measure_memory(
    image_size: int,
    variant_name: str,
    batch_size: int,
    steps: int,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Peak memory of ``steps`` training steps in this process (see ``bench_step``).

    Meant to run in a fresh process (``measure_memory_subprocess``); in a process that
    already ran other work the baseline RSS is inflated by what the allocator kept.

    Returns
    -------
    dict[str, Any]
        ``peak_mib`` and ``step_delta_mib`` (peak minus the baseline at the reset),
        ``baseline_mib``, ``method`` (how it was measured) and ``hwm_reset``.
    """
    setup = build_setup(image_size, batch_size, seed, device)
    variant = get_variant(variant_name)
    method = make_method(setup, variant)
    run_step(setup, method, variant.capture)  # warm-up: lazy state, caches
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        baseline = torch.cuda.memory_allocated(setup.device) / 2**20
        for _ in range(steps):
            run_step(setup, method, variant.capture)
        torch.cuda.synchronize(setup.device)
        peak = torch.cuda.max_memory_allocated(setup.device) / 2**20
        how, reset = "torch.cuda.max_memory_allocated", True
    else:
        reset = reset_peak_rss()
        baseline = current_rss_mib()
        for _ in range(steps):
            run_step(setup, method, variant.capture)
        peak = peak_rss_mib()
        how = "VmHWM after reset" if reset else "lifetime VmHWM (reset not permitted)"
    return {
        "peak_mib": peak,
        "baseline_mib": baseline,
        "step_delta_mib": peak - baseline,
        "method": how,
        "hwm_reset": reset,
        "steps": steps,
    }


def measure_memory_subprocess(
    image_size: int,
    variant_name: str,
    batch_size: int,
    steps: int,
    threads: int,
    seed: int = 0,
    device: str = "cpu",
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """``measure_memory`` in a fresh Python process (fixed mmap threshold).

    Raises
    ------
    RuntimeError
        The subprocess failed or printed no result.
    subprocess.TimeoutExpired
        It ran longer than ``timeout_s``.
    """
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_step",
        "--child-memory",
        variant_name,
        "--image-sizes",
        str(image_size),
        "--batch-size",
        str(batch_size),
        "--memory-steps",
        str(steps),
        "--threads",
        str(threads),
        "--seed",
        str(seed),
        "--device",
        device,
    ]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **MALLOC_ENV}
    done = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"Memory subprocess for {variant_name} at image size {image_size} failed "
            f"(exit {done.returncode}): {done.stderr[-2000:]}"
        )
    return json.loads(lines[-1])


__all__ = ["MALLOC_ENV", "measure_memory", "measure_memory_subprocess"]
