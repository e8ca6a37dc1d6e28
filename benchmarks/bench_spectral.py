"""Spectral descriptor throughput against grid size, and its share of a forward pass.

``fed_asr.spectral.describe`` turns the captured attention (B, L, H, Tq, P) into one
descriptor per sample. A *map* is one layer-head's Gh x Gw attention map, so a call
describes B * L * H maps (L = ``l_sel`` = 4 and H = 4 heads of the tiny model by
default). Inputs are softmax-normalised random attention rows of the real shape; the
descriptor's cost does not depend on the values.

For each grid (8x8, 16x16, 24x24, 32x32; image sizes 32..128 with patch 4) the script
times, as medians after warm-up:

- ``describe`` forward (no grad) and forward + backward (as in ASR training, where the
  loss is differentiated through the descriptor);
- one forward pass (no grad) of the untrained tiny LLaVA at that grid on a real
  easy-VQA batch of the same size, with selective capture (what the spectrum round
  runs), and the descriptor's share of it.

Side by side with the paper's encoder (``versus_paper``): ``paper_style_descriptor``
(``benchmarks/paper_style_encoder.py``) is written from the paper's description.
Both run on the same tensors (B=16, L=4, H=4, Tq=12, uniform query weights, 1 thread
by default), in alternating blocks of 5 calls; the script checks that their values
agree and prints medians in ms and the speed-ups (paper time / ours).

Usage: ``python -m benchmarks.bench_spectral [--quick] [--versus-paper-only]
[--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
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
from benchmarks.paper_style_encoder import paper_style_descriptor
from fed_asr.config import DataConfig, ModelConfig, RegularizerConfig
from fed_asr.config_sections import check_positive
from fed_asr.data import build_stream
from fed_asr.models import (
    VQACollator,
    build_tiny,
    forward_with_attention,
    install_attention_capture,
)
from fed_asr.spectral import describe

NAME = "bench_spectral"
PATCH_SIZE = 4
GRIDS = (8, 16, 24, 32)
VERSUS_SHAPE = {"batch": 16, "layers": 4, "heads": 4, "queries": 12}


def time_call(fn: Callable[[], Any], warmup: int, repeat: int) -> list[float]:
    """Wall times of ``repeat`` calls of ``fn`` after ``warmup`` untimed calls.

    Raises
    ------
    ValueError
        ``repeat`` is not positive.
    """
    check_positive("repeat", repeat)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def random_attention(
    batch: int, layers: int, heads: int, queries: int, grid: int, seed: int = 0
) -> torch.Tensor:
    """Softmax rows (B, L, H, Tq, P) over a grid x grid image block."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, layers, heads, queries, grid * grid)
    scores = torch.randn(shape, generator=generator)
    return torch.softmax(scores, dim=-1)  # (B, L, H, Tq, P)


def describe_timing(
    grid: int,
    batch: int,
    layers: int,
    heads: int,
    queries: int,
    warmup: int,
    repeat: int,
    reg_cfg: RegularizerConfig | None = None,
) -> dict[str, Any]:
    """Median forward and forward+backward time of ``describe`` on one batch.

    Returns
    -------
    dict[str, Any]
        ``maps`` per call, ``forward_s``, ``fwd_bwd_s``, ``maps_per_s`` (forward) and
        ``maps_per_s_fwd_bwd``.
    """
    reg_cfg = reg_cfg or RegularizerConfig()
    attn = random_attention(batch, layers, heads, queries, grid)
    weights = torch.ones(batch, queries)

    def forward() -> None:
        with torch.no_grad():
            describe(attn, (grid, grid), weights, reg_cfg.n_radial, reg_cfg.n_angular)

    leaf = attn.clone().requires_grad_(True)

    def forward_backward() -> None:
        desc = describe(
            leaf, (grid, grid), weights, reg_cfg.n_radial, reg_cfg.n_angular
        )
        (desc.descriptor.sum() + desc.angular.sum()).backward()
        leaf.grad = None

    maps = batch * layers * heads
    fwd = median(time_call(forward, warmup, repeat))
    both = median(time_call(forward_backward, warmup, repeat))
    return {
        "maps": maps,
        "forward_s": fwd,
        "fwd_bwd_s": both,
        "maps_per_s": maps / fwd,
        "maps_per_s_fwd_bwd": maps / both,
    }


def _interleaved(
    calls: Sequence[Callable[[], Any]], warmup: int, repeat: int, block: int = 5
) -> list[list[float]]:
    """Wall times of ``repeat`` calls of each, in alternating blocks of ``block``.

    Alternating spreads a shared machine's load over all the calls alike; within a
    block a call finds the caches as the same implementation left them, as in a
    training loop.
    """
    check_positive("repeat", repeat)
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for start_at in range(0, repeat, block):
        for call, bucket in zip(calls, times, strict=True):
            for _ in range(min(block, repeat - start_at)):
                start = time.perf_counter()
                call()
                bucket.append(time.perf_counter() - start)
    return times


def versus_paper_row(
    grid: int, warmup: int = 3, repeat: int = 40, seed: int = 0, **shape: int
) -> dict[str, Any]:
    """``describe`` against ``paper_style_descriptor`` at one grid (same tensors).

    Returns
    -------
    dict[str, Any]
        Median ms of both, forward (no grad) and forward + backward, the speed-ups
        (paper / ours) of the medians and of the fastest calls (``*_min``: on a
        shared machine the least disturbed), and the largest absolute difference of
        their values.
    """
    dims = {**VERSUS_SHAPE, **shape}
    attn = random_attention(
        dims["batch"], dims["layers"], dims["heads"], dims["queries"], grid, seed
    )
    leaf = attn.clone().requires_grad_(True)

    def ours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        desc = describe(x, (grid, grid))
        return desc.descriptor, desc.angular

    def paper(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return paper_style_descriptor(x, (grid, grid))

    def forward(fn: Callable[..., Any]) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                fn(attn)

        return call

    def forward_backward(fn: Callable[..., Any]) -> Callable[[], None]:
        def call() -> None:
            descriptor, angular = fn(leaf)
            (descriptor.sum() + angular.sum()).backward()
            leaf.grad = None

        return call

    with torch.no_grad():
        diff = max(
            (a - b).abs().max().item()
            for a, b in zip(ours(attn), paper(attn), strict=True)
        )
    fwd = _interleaved([forward(ours), forward(paper)], warmup, repeat)
    both = _interleaved(
        [forward_backward(ours), forward_backward(paper)], warmup, repeat
    )
    ms = [1e3 * median(t) for t in (*fwd, *both)]
    fastest = [1e3 * min(t) for t in (*fwd, *both)]  # least disturbed by other load
    return {
        "grid": f"{grid}x{grid}",
        "ours_fwd_ms": ms[0],
        "paper_fwd_ms": ms[1],
        "speedup_fwd": ms[1] / ms[0],
        "ours_fwd_bwd_ms": ms[2],
        "paper_fwd_bwd_ms": ms[3],
        "speedup_fwd_bwd": ms[3] / ms[2],
        "speedup_fwd_min": fastest[1] / fastest[0],
        "speedup_fwd_bwd_min": fastest[3] / fastest[2],
        "min_ms": dict(
            zip(
                ("ours_fwd", "paper_fwd", "ours_fwd_bwd", "paper_fwd_bwd"),
                fastest,
                strict=True,
            )
        ),
        "max_abs_diff": diff,
    }


def model_forward_timing(
    grid: int, batch: int, warmup: int, repeat: int, seed: int = 0
) -> dict[str, Any]:
    """Median no-grad forward time of the tiny LLaVA (selective capture) at ``grid``.

    Returns
    -------
    dict[str, Any]
        ``forward_s``, the captured attention's shape (``attn_shape``) and ``seq_len``.
    """
    model_cfg = ModelConfig(image_size=grid * PATCH_SIZE, patch_size=PATCH_SIZE)
    reg_cfg = RegularizerConfig()
    stream = build_stream(DataConfig(max_train_per_stage=max(batch, 16)), seed)
    samples = [s for stage in stream.stages for s in stage.train][:batch]
    model, processor = build_tiny(model_cfg, stream.vocabulary(), seed=seed)
    install_attention_capture(model)
    collator = VQACollator(processor, model_cfg.prompt_template, stream.answers)
    inputs = collator(samples)
    shape: list[int] = []

    def forward() -> None:
        with torch.no_grad():
            capture = forward_with_attention(model, inputs, reg_cfg.l_sel, "selective")
        shape[:] = list(capture.attn.shape)

    seconds = median(time_call(forward, warmup, repeat))
    return {
        "forward_s": seconds,
        "attn_shape": shape,
        "seq_len": int(inputs["input_ids"].shape[1]),
    }


def run_benchmark(
    grids: Sequence[int] = GRIDS,
    batch: int = 32,
    warmup: int = 2,
    repeat: int = 10,
    model_repeat: int = 3,
    threads: int = 1,
    seed: int = 0,
    versus_repeat: int = 40,
    model_rows: bool = True,
) -> dict[str, Any]:
    """Descriptor and model-forward timing at every grid, and ours versus the paper's.

    Parameters
    ----------
    versus_repeat : int
        Timed calls of each implementation in ``versus_paper`` (0 skips it).
    model_rows : bool
        False skips the model-forward rows (``rows`` is then empty).

    Returns
    -------
    dict[str, Any]
        ``rows`` (one per grid), ``versus_paper`` (one per grid), ``settings`` and
        ``machine``.
    """
    set_threads(threads)
    versus = [
        versus_paper_row(grid, warmup, versus_repeat, seed)
        for grid in (grids if versus_repeat > 0 else ())
    ]
    rows = []
    for grid in grids if model_rows else ():
        model = model_forward_timing(grid, batch, 1, model_repeat, seed)
        _, layers, heads, queries, _ = model["attn_shape"]
        desc = describe_timing(grid, batch, layers, heads, queries, warmup, repeat)
        rows.append(
            {
                "grid": f"{grid}x{grid}",
                "P": grid * grid,
                "seq_len": model["seq_len"],
                "maps": desc["maps"],
                "describe_fwd_ms": 1e3 * desc["forward_s"],
                "describe_fwd_bwd_ms": 1e3 * desc["fwd_bwd_s"],
                "maps_per_s": desc["maps_per_s"],
                "maps_per_s_fwd_bwd": desc["maps_per_s_fwd_bwd"],
                "model_fwd_ms": 1e3 * model["forward_s"],
                "describe_share_of_fwd": desc["forward_s"] / model["forward_s"],
                "attn_shape": model["attn_shape"],
            }
        )
    return {
        "benchmark": NAME,
        "settings": {
            "grids": list(grids),
            "batch": batch,
            "warmup": warmup,
            "repeat": repeat,
            "model_repeat": model_repeat,
            "threads": threads,
            "seed": seed,
            "model": "untrained tiny LLaVA (build_tiny, default ModelConfig sizes)",
            "versus_paper": {**VERSUS_SHAPE, "repeat": versus_repeat},
        },
        "rows": rows,
        "versus_paper": versus,
        "machine": machine_info(),
    }


COLUMNS = (
    "grid",
    "seq_len",
    "maps",
    "describe_fwd_ms",
    "describe_fwd_bwd_ms",
    "maps_per_s",
    "model_fwd_ms",
    "describe_share_of_fwd",
)
VERSUS_COLUMNS = (
    "grid",
    "ours_fwd_ms",
    "paper_fwd_ms",
    "speedup_fwd",
    "ours_fwd_bwd_ms",
    "paper_fwd_bwd_ms",
    "speedup_fwd_bwd",
    "speedup_fwd_min",
    "speedup_fwd_bwd_min",
    "max_abs_diff",
)


def _parser() -> argparse.ArgumentParser:
    parser = base_parser(
        __doc__, NAME, "smoke setting: 8x8 grid, batch 4, 1 timed call"
    )
    parser.add_argument("--grids", type=int, nargs="+", default=list(GRIDS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--model-repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--versus-repeat",
        type=int,
        default=40,
        help="timed calls per implementation against the paper's encoder (0: skip)",
    )
    parser.add_argument(
        "--versus-paper-only",
        action="store_true",
        help="only the side-by-side with the paper's encoder (no model forward)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints a table and writes the JSON result."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.grids, args.batch_size, args.warmup = [8], 4, 1
        args.repeat, args.model_repeat, args.versus_repeat = 1, 1, 1
    result = run_benchmark(
        args.grids,
        args.batch_size,
        args.warmup,
        args.repeat,
        args.model_repeat,
        args.threads,
        args.seed,
        args.versus_repeat,
        model_rows=not args.versus_paper_only,
    )
    if result["rows"]:
        print(format_table(result["rows"], COLUMNS))
    if result["versus_paper"]:
        print(format_table(result["versus_paper"], VERSUS_COLUMNS))
    print(json.dumps({"threads": result["settings"]["threads"]}))
    print(write_json(args.out, result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
