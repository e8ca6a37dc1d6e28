"""Training step time and peak memory: vanilla LoRA vs ASR (selective vs eager capture).

One training step is ``fed_asr.train.train_stage`` on a one-step stage: collation,
the task loss plus the method's penalties, ``backward``, gradient clipping and an AdamW
step on the LoRA weights (with a fresh optimizer, as at the start of every stage). The
model is an untrained tiny LLaVA from ``build_tiny`` (patch 4, so image sizes 32/64/96
give 8x8/16x16/24x24 image grids) with LoRA on the language model's
``q_proj``/``v_proj``; the batch is one batch of real easy-VQA samples, the same for
every variant.

Variants (``beta``/``gamma`` are the ASR weights, DESIGN section 2):

- ``vanilla``: task loss only;
- ``asr_spec_*``: ASR with the spectral term only (``gamma = 0``): capture, descriptor,
  Mahalanobis + angular loss against prototypes computed on the same batch;
- ``asr_full_*``: ASR with the default geometry term as well (``gamma = 0.05``), which
  adds a no-grad forward pass with the adapters disabled;
- ``*_selective``: SDPA attention + only the captured text-to-image rows;
- ``*_eager``: eager attention with ``output_attentions=True`` (the reference).

Timing: all variants of one grid run in one process, interleaved step by step (so load
from other processes on a shared machine hits every variant alike), after warm-up
steps; the adapter weights are restored before every step. The median is reported.
torch runs with ``--threads`` intra-op threads (default 1): on a small shared machine,
two OpenMP threads competing with other processes' work get descheduled in turn and
a step slows down several-fold and erratically; one thread keeps the ratios stable.

Memory: each (grid, variant) runs in a fresh subprocess (allocator state of earlier
variants would otherwise leak into later ones). After set-up and one warm-up step the
RSS high-water mark is reset; the peak RSS of the following steps and its increase over
the RSS at the reset ("step delta") are reported. The subprocess runs with a fixed
glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go back to the OS and
RSS follows live memory. On CUDA, ``torch.cuda.max_memory_allocated`` is used instead.

Usage: ``python -m benchmarks.bench_step [--quick] [--out PATH]``;
``--family NAME|all`` times the tiny checkpoint of every model family instead
(``benchmarks/step_families.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.common import (
    base_parser,
    format_table,
    machine_info,
    median,
    set_threads,
    write_json,
)
from benchmarks.step_memory import (
    MALLOC_ENV,
    measure_memory,
    measure_memory_subprocess,
)
from benchmarks.step_setup import (
    PATCH_SIZE,
    VARIANTS,
    StepSetup,
    StepVariant,
    build_setup,
    get_variant,
    make_method,
    run_step,
)
from fed_asr.config_sections import check_positive
from fed_asr.models import load_adapter_state

NAME = "bench_step"
IMAGE_SIZES = (32, 64, 96)  # 8x8, 16x16, 24x24 grids with patch 4
# Targets of the issue, checked at the largest grid.
MAX_SELECTIVE_OVER_VANILLA = 1.15
MIN_EAGER_OVER_SELECTIVE = 2.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(
    setup: StepSetup,
    variants: Sequence[StepVariant],
    warmup: int,
    repeat: int,
) -> dict[str, dict[str, Any]]:
    """Interleaved step timing of ``variants`` on one setup.

    Parameters
    ----------
    setup : StepSetup
        Shared model and batch.
    variants : Sequence[StepVariant]
        Variants to time; each gets its own method.
    warmup, repeat : int
        Untimed and timed rounds; a round runs one step of every variant.

    Returns
    -------
    dict[str, dict[str, Any]]
        Per variant: ``seconds`` (timed steps), ``median_s`` and the last loss terms.

    Raises
    ------
    ValueError
        ``repeat`` is not positive.
    """
    check_positive("repeat", repeat)
    runners = [(v, make_method(setup, v)) for v in variants]
    seconds: dict[str, list[float]] = {v.name: [] for v in variants}
    losses: dict[str, dict[str, float]] = {}
    for round_ in range(warmup + repeat):
        for variant, method in runners:
            load_adapter_state(setup.model, setup.initial_adapter)
            _sync(setup.device)
            start = time.perf_counter()
            losses[variant.name] = run_step(setup, method, variant.capture)
            _sync(setup.device)
            if round_ >= warmup:
                seconds[variant.name].append(time.perf_counter() - start)
    return {
        v.name: {
            "seconds": seconds[v.name],
            "median_s": median(seconds[v.name]),
            "losses": losses[v.name],
        }
        for v in variants
    }


def check_targets(rows: Sequence[dict[str, Any]], image_size: int) -> dict[str, Any]:
    """Issue targets at ``image_size`` (ratios of medians; memory when measured)."""
    at = {r["variant"]: r for r in rows if r["image_size"] == image_size}

    def ratio(a: str, b: str) -> float | None:
        if a in at and b in at:
            return at[a]["median_s"] / at[b]["median_s"]
        return None

    def mem(name: str) -> float | None:
        return at.get(name, {}).get("peak_mib")

    spec = ratio("asr_spec_selective", "vanilla")
    full = ratio("asr_full_selective", "vanilla")
    full_cold = ratio("asr_full_selective_nocache", "vanilla")
    eager_spec = ratio("asr_spec_eager", "asr_spec_selective")
    eager_full = ratio("asr_full_eager", "asr_full_selective")
    mem_spec = (mem("asr_spec_selective"), mem("asr_spec_eager"))
    mem_full = (mem("asr_full_selective"), mem("asr_full_eager"))

    def lower(pair: tuple[float | None, float | None]) -> bool | None:
        return None if None in pair else bool(pair[0] < pair[1])  # type: ignore[operator]

    return {
        "image_size": image_size,
        "grid": image_size // PATCH_SIZE,
        "asr_spec_selective_over_vanilla": spec,
        "asr_full_selective_over_vanilla": full,
        "asr_full_selective_nocache_over_vanilla": full_cold,
        "target_spec_over_vanilla_met": None
        if spec is None
        else spec <= MAX_SELECTIVE_OVER_VANILLA,
        "eager_over_selective_spec": eager_spec,
        "eager_over_selective_full": eager_full,
        "target_selective_2x_faster_met": None
        if eager_spec is None
        else eager_spec >= MIN_EAGER_OVER_SELECTIVE,
        "selective_lower_peak_memory_spec": lower(mem_spec),
        "selective_lower_peak_memory_full": lower(mem_full),
    }


def run_benchmark(
    image_sizes: Sequence[int] = IMAGE_SIZES,
    batch_size: int = 32,
    warmup: int = 2,
    repeat: int = 5,
    memory_steps: int = 2,
    threads: int = 1,
    with_memory: bool = True,
    variants: Sequence[StepVariant] = VARIANTS,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Time every variant at every image size, then measure memory per subprocess.

    Returns
    -------
    dict[str, Any]
        ``rows`` (one per image size and variant), ``targets`` (at the largest image
        size), ``settings`` and ``machine``.
    """
    set_threads(threads)
    rows: list[dict[str, Any]] = []
    for size in image_sizes:
        setup = build_setup(size, batch_size, seed, device)
        timed = time_variants(setup, variants, warmup, repeat)
        seq_len = int(setup.batch["input_ids"].shape[1])
        base = timed[variants[0].name]["median_s"]
        for variant in variants:
            result = timed[variant.name]
            rows.append(
                {
                    "image_size": size,
                    "grid": f"{setup.grid[0]}x{setup.grid[1]}",
                    "seq_len": seq_len,
                    "variant": variant.name,
                    "median_s": result["median_s"],
                    "min_s": min(result["seconds"]),
                    "max_s": max(result["seconds"]),
                    f"ratio_vs_{variants[0].name}": result["median_s"] / base,
                    "seconds": result["seconds"],
                    "losses": result["losses"],
                }
            )
        del setup, timed
        gc.collect()
    if with_memory:
        for row in rows:
            memory = measure_memory_subprocess(
                row["image_size"],
                row["variant"],
                batch_size,
                memory_steps,
                threads,
                seed,
                device,
            )
            row.update(
                {
                    "peak_mib": memory["peak_mib"],
                    "step_delta_mib": memory["step_delta_mib"],
                    "memory_method": memory["method"],
                }
            )
    return {
        "benchmark": NAME,
        "settings": {
            "image_sizes": list(image_sizes),
            "patch_size": PATCH_SIZE,
            "batch_size": batch_size,
            "warmup": warmup,
            "repeat": repeat,
            "memory_steps": memory_steps,
            "threads": threads,
            "device": device,
            "seed": seed,
            "model": "untrained tiny LLaVA (build_tiny, default ModelConfig sizes)",
            "lora": "r=8 q_proj/v_proj of the language model",
            "regularizer": "default RegularizerConfig (l_sel=4, beta=0.5, gamma=0.05)",
            "memory_env": MALLOC_ENV if with_memory else None,
        },
        "rows": rows,
        "targets": check_targets(rows, max(image_sizes)),
        "machine": machine_info(),
    }


COLUMNS = (
    "grid",
    "seq_len",
    "variant",
    "median_s",
    "min_s",
    "max_s",
    "ratio_vs_vanilla",
    "peak_mib",
    "step_delta_mib",
)


def _parser() -> argparse.ArgumentParser:
    parser = base_parser(
        __doc__, NAME, "smoke setting: 8x8 grid, batch 4, 1 timed step"
    )
    parser.add_argument("--image-sizes", type=int, nargs="+", default=list(IMAGE_SIZES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=device)
    parser.add_argument("--child-memory", metavar="VARIANT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--family",
        metavar="NAME",
        help="time ASR over plain LoRA on the tiny checkpoints of one model family "
        "(or 'all'), see benchmarks/step_families.py; writes "
        "benchmarks/results/bench_step_families.json unless --out is given",
    )
    return parser


def main_families(args: argparse.Namespace) -> int:
    """``--family``: per-family step-time table and JSON (``step_families``)."""
    from benchmarks.common import default_out
    from benchmarks.step_families import COLUMNS as FAMILY_COLUMNS
    from benchmarks.step_families import family_kinds, run_family_benchmark

    try:
        family_kinds(args.family)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    if args.quick:
        args = replace_args(args, batch_size=4, warmup=1, repeat=1)
    out = default_out(f"{NAME}_families") if args.out == default_out(NAME) else args.out
    result = run_family_benchmark(
        args.family,
        args.batch_size,
        args.warmup,
        args.repeat,
        args.threads,
        args.seed,
        args.device,
    )
    print(format_table(result["rows"], FAMILY_COLUMNS))
    print(write_json(out, result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints a table and writes the JSON result."""
    args = _parser().parse_args(argv)
    set_threads(args.threads)
    if args.child_memory:
        result = measure_memory(
            args.image_sizes[0],
            args.child_memory,
            args.batch_size,
            args.memory_steps,
            args.seed,
            args.device,
        )
        print(json.dumps(result))
        return 0
    if args.family:
        return main_families(args)
    if args.quick:
        args = replace_args(
            args, image_sizes=[32], batch_size=4, warmup=1, repeat=1, memory_steps=1
        )
    result = run_benchmark(
        args.image_sizes,
        args.batch_size,
        args.warmup,
        args.repeat,
        args.memory_steps,
        args.threads,
        not args.no_memory,
        seed=args.seed,
        device=args.device,
    )
    print(format_table(result["rows"], COLUMNS))
    print(json.dumps(result["targets"], indent=2))
    print(write_json(args.out, result))
    return 0


def replace_args(args: argparse.Namespace, **values: Any) -> argparse.Namespace:
    """Copy of ``args`` with ``values`` set."""
    copy = argparse.Namespace(**vars(args))
    for key, value in values.items():
        setattr(copy, key, value)
    return copy


__all__ = [
    "MALLOC_ENV",
    "PATCH_SIZE",
    "VARIANTS",
    "StepSetup",
    "StepVariant",
    "build_setup",
    "check_targets",
    "get_variant",
    "make_method",
    "measure_memory",
    "measure_memory_subprocess",
    "run_benchmark",
    "run_step",
    "time_variants",
]

if __name__ == "__main__":
    raise SystemExit(main())
