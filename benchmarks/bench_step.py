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
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import (
    base_parser,
    current_rss_mib,
    format_table,
    machine_info,
    median,
    peak_rss_mib,
    reset_peak_rss,
    set_threads,
    write_json,
)
from fed_asr.config import (
    DataConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    RegularizerConfig,
    TrainConfig,
)
from fed_asr.config_sections import check_positive
from fed_asr.data import VQASample, build_stream
from fed_asr.methods import ContinualMethod, build_method
from fed_asr.models import (
    VQACollator,
    adapter_state,
    attach_lora,
    build_tiny,
    install_attention_capture,
    load_adapter_state,
    move_batch,
)
from fed_asr.spectrum import SkillSpectrum
from fed_asr.train import spectrum_statistics, train_stage

NAME = "bench_step"
PATCH_SIZE = 4
IMAGE_SIZES = (32, 64, 96)  # 8x8, 16x16, 24x24 grids with patch 4
# Targets of the issue, checked at the largest grid.
MAX_SELECTIVE_OVER_VANILLA = 1.15
MIN_EAGER_OVER_SELECTIVE = 2.0
# Fixed glibc mmap threshold for the memory subprocess (see module docstring).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


@dataclass(frozen=True)
class StepVariant:
    """One training-step configuration.

    Attributes
    ----------
    name : str
        Row label.
    method : str
        ``vanilla`` or ``asr``.
    capture : str
        ``selective`` or ``eager`` attention capture.
    spectral : bool
        Use the spectral term (``beta`` from the config; 0 otherwise).
    geometry : bool
        Use the geometry term (``gamma`` from the config; 0 otherwise).
    geo_cache : bool
        Cache the reference rows of the geometry term per sample (the default). The
        benchmark repeats one batch, so with the cache every timed step is a warm one
        (a sample seen before: epochs after the first); without it every step pays
        the reference forward pass (a sample's first visit).
    """

    name: str
    method: str
    capture: str
    spectral: bool
    geometry: bool
    geo_cache: bool = True


VARIANTS: tuple[StepVariant, ...] = (
    StepVariant("vanilla", "vanilla", "selective", False, False),
    StepVariant("asr_spec_selective", "asr", "selective", True, False),
    StepVariant("asr_full_selective", "asr", "selective", True, True),
    StepVariant("asr_full_selective_nocache", "asr", "selective", True, True, False),
    StepVariant("asr_spec_eager", "asr", "eager", True, False),
    StepVariant("asr_full_eager", "asr", "eager", True, True),
)


def get_variant(name: str) -> StepVariant:
    """Look up a variant by name.

    Raises
    ------
    KeyError
        Unknown name; the message lists the choices.
    """
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise KeyError(
        f"Unknown variant {name!r}. Available: {[v.name for v in VARIANTS]}."
    )


@dataclass
class StepSetup:
    """Model, batch and spectrum shared by every variant of one grid."""

    model: Any
    collator: VQACollator
    samples: list[VQASample]
    batch: dict[str, Any]
    spectrum: SkillSpectrum
    skills: list[str]
    model_cfg: ModelConfig
    reg_cfg: RegularizerConfig
    train_cfg: TrainConfig
    initial_adapter: dict[str, Tensor]
    grid: tuple[int, int]
    device: torch.device


def _mixed_samples(samples_per_stage: list[list[VQASample]], n: int) -> list[VQASample]:
    """Round-robin over the stages, so every skill of the stream is in the batch."""
    mixed: list[VQASample] = []
    for group in zip(*samples_per_stage, strict=False):
        mixed.extend(group)
    if len(mixed) < n:
        raise ValueError(f"Only {len(mixed)} samples for a batch of {n}.")
    return mixed[:n]


def build_setup(
    image_size: int,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    patch_size: int = PATCH_SIZE,
) -> StepSetup:
    """Untrained tiny LLaVA + LoRA, one real easy-VQA batch and prototypes.

    Parameters
    ----------
    image_size : int
        Image side; the grid is ``image_size // patch_size`` squared.
    batch_size : int
        Samples in the batch (mixed over the stream's stages).
    seed : int
        Seeds the weights, the LoRA initialisation and the data subset.
    device : str
        ``cpu`` or ``cuda``.
    patch_size : int
        Vision patch size.

    Returns
    -------
    StepSetup
        Ready for ``run_step``; the spectrum holds prototypes of the untrained model's
        descriptors on the same batch, so the spectral term is active.
    """
    model_cfg = ModelConfig(image_size=image_size, patch_size=patch_size, device=device)
    data_cfg = DataConfig(max_train_per_stage=max(batch_size, 16), max_test_per_stage=4)
    stream = build_stream(data_cfg, seed)
    samples = _mixed_samples([s.train for s in stream.stages], batch_size)
    target = torch.device(device)
    base, processor = build_tiny(model_cfg, stream.vocabulary(), seed=seed)
    # What load_base_model does after loading: frozen base, capturing SDPA attention.
    base.requires_grad_(False)
    install_attention_capture(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = attach_lora(base.to(target), LoraConfig())
    collator = VQACollator(processor, model_cfg.prompt_template, stream.answers)
    batch = move_batch(collator(samples), target)
    reg_cfg = RegularizerConfig()
    stats = spectrum_statistics(
        model, collator, samples, stream.skills, reg_cfg, batch_size, "selective"
    )
    grid = (image_size // patch_size, image_size // patch_size)
    return StepSetup(
        model=model,
        collator=collator,
        samples=samples,
        batch=batch,
        spectrum=stats.to_prototypes(reg_cfg.cov_floor),
        skills=list(stream.skills),
        model_cfg=model_cfg,
        reg_cfg=reg_cfg,
        # One stage of one step over the whole batch.
        train_cfg=TrainConfig(batch_size=batch_size, epochs=1, max_steps_per_stage=1),
        initial_adapter=adapter_state(model),
        grid=grid,
        device=target,
    )


def make_method(setup: StepSetup, variant: StepVariant) -> ContinualMethod:
    """The configured method of ``variant`` (prototypes from ``setup.spectrum``)."""
    reg_cfg = dataclasses.replace(
        setup.reg_cfg,
        beta=setup.reg_cfg.beta if variant.spectral else 0.0,
        gamma=setup.reg_cfg.gamma if variant.geometry else 0.0,
        geo_cache_entries=setup.reg_cfg.geo_cache_entries if variant.geo_cache else 0,
    )
    method = build_method(MethodConfig(name=variant.method), reg_cfg)
    method.configure_stage(setup.spectrum)
    return method


def run_step(
    setup: StepSetup, method: ContinualMethod, capture: str
) -> dict[str, float]:
    """One training step: ``train_stage`` on a one-step stage; returns its losses."""
    result = train_stage(
        setup.model,
        setup.collator,
        setup.samples,
        setup.skills,
        method,
        setup.train_cfg,
        setup.reg_cfg,
        capture_mode=capture,
    )
    return result.losses


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


def measure_memory(
    image_size: int,
    variant_name: str,
    batch_size: int,
    steps: int,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Peak memory of ``steps`` training steps in this process (see module notes).

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
    "VARIANTS",
    "StepSetup",
    "StepVariant",
    "build_setup",
    "check_targets",
    "measure_memory",
    "measure_memory_subprocess",
    "run_benchmark",
    "run_step",
    "time_variants",
]

if __name__ == "__main__":
    raise SystemExit(main())
