"""Server merge cost vs the number of replies: FedAvg of adapters, pooled statistics.

The cross-device projection in BENCHMARKS.md needs the server's cost of one round at
federation sizes the 2-core machine cannot simulate end to end. The merges are cheap
enough to run for real at those sizes, so they are measured, not extrapolated:

- ``fedavg``: Flower's ``FedAvg.aggregate_train`` over ``n`` real reply ``Message``s,
  each holding an ``ArrayRecord`` of the adapter (``--adapter-bytes``, float32, the
  tiny LLaVA's 67,584 B by default; 16 MiB for LLaVA-1.5-7B's) and a ``MetricRecord``
  with ``num-examples``;
- ``pooled``: ``fed_asr.spectrum.sum_stats`` over ``n`` clients' ``SkillStats`` of the
  stage-end round (4 skills, 4,256 B each, as ``bench_comm`` measures).

Time is the median of ``--repeats`` merges; memory is the peak traced by
``tracemalloc`` during one merge plus the replies' own bytes (what the server holds).

Usage: ``python -m benchmarks.bench_merge [--sizes 4 16 32 64 100 1000 10000]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from benchmarks.common import RESULTS_DIR, format_table, machine_info, write_json
from fed_asr.spectrum import SkillStats, sum_stats

NAME = "bench_merge"
SIZES = (4, 16, 32, 64, 100, 1000, 10000)
TINY_ADAPTER_BYTES = 67_584
# 4 skills x (1 + 2 x 64 + 4) float64 values = 4,256 B, the tiny model's stats size
STATS_SHAPE = {"skills": 4, "dim": 64, "angular": 4}


def adapter_replies(n: int, adapter_bytes: int, seed: int = 0) -> list[Message]:
    """``n`` train replies, each an adapter of ``adapter_bytes`` and its weight."""
    from flwr.supercore.task_identity import TaskIdentity

    # Flower stamps messages with the process's task identity (a SuperLink's own run)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    rng = np.random.default_rng(seed)
    elements = adapter_bytes // 4
    rows = 8  # LoRA rank: (8, elements / 8) matrices, as A and B of one module
    arrays = {
        f"layer.{i}.lora_{ab}": rng.standard_normal(
            (rows, elements // (2 * rows)), dtype=np.float32
        )
        for i, ab in enumerate("AB")
    }
    replies = []
    for node in range(n):
        query = Message(RecordDict(), dst_node_id=node + 1, message_type="train")
        query.metadata.__dict__["_message_id"] = f"q{node}"
        content = RecordDict(
            {
                "arrays": ArrayRecord(numpy_ndarrays=list(arrays.values())),
                "metrics": MetricRecord({"num-examples": 16 + node % 5}),
            }
        )
        replies.append(Message(content, reply_to=query))
    return replies


def client_stats(n: int, seed: int = 0) -> list[SkillStats]:
    """``n`` clients' stage-end statistics of the tiny model's shape."""
    gen = torch.Generator().manual_seed(seed)
    s, d, m = STATS_SHAPE["skills"], STATS_SHAPE["dim"], STATS_SHAPE["angular"]
    skills = tuple(f"skill{i}" for i in range(s))
    return [
        SkillStats(
            skills,
            torch.full((s,), 4.0, dtype=torch.float64),
            torch.rand((s, d), generator=gen, dtype=torch.float64),
            torch.rand((s, d), generator=gen, dtype=torch.float64),
            torch.rand((s, m), generator=gen, dtype=torch.float64),
        )
        for _ in range(n)
    ]


def measure(merge: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median seconds of ``merge`` and the peak MiB traced during one call."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        merge()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    merge()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return statistics.median(times), peak / 2**20


def run_benchmark(
    sizes: Sequence[int] = SIZES,
    adapter_bytes: int = TINY_ADAPTER_BYTES,
    repeats: int = 3,
) -> dict[str, Any]:
    """Merge time and memory of FedAvg and of the pooled statistics at each size."""
    rows = []
    strategy = FedAvg()
    for n in sizes:
        replies = adapter_replies(n, adapter_bytes)
        fedavg_s, fedavg_mib = measure(
            lambda r=replies: strategy.aggregate_train(1, r), repeats
        )
        del replies
        stats = client_stats(n)
        pooled_s, pooled_mib = measure(lambda s=stats: sum_stats(s), repeats)
        rows.append(
            {
                "replies": n,
                "fedavg_s": fedavg_s,
                "fedavg_peak_mib": fedavg_mib,
                "replies_held_mib": n * adapter_bytes / 2**20,
                "pooled_stats_s": pooled_s,
                "pooled_peak_mib": pooled_mib,
            }
        )
    return {
        "name": NAME,
        "adapter_bytes": adapter_bytes,
        "repeats": repeats,
        "machine": machine_info(),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the merge benchmark, print a table and write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--adapter-bytes", type=int, default=TINY_ADAPTER_BYTES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS_DIR / f"{NAME}.json"))
    args = parser.parse_args(argv)
    for name in ("adapter_bytes", "repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"`--{name.replace('_', '-')}` must be positive.")
    result = run_benchmark(args.sizes, args.adapter_bytes, args.repeats)
    print(format_table(result["rows"], list(result["rows"][0])))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
