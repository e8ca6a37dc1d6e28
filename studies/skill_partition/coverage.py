"""How much of each later stage trains where an earlier skill was never seen.

Usage: python studies/skill_partition/coverage.py OUT_DIR [--against A B] [OVERRIDE ...]
  e.g. python studies/skill_partition/coverage.py OUT --against asr asr_local \
         data.stage_order=[shape,color] data.dirichlet_alpha=0.1 data.partition_by=skill

Rebuilds the run's client split (``fed_asr.data.partition_stream``, the config the
overrides compose, every seed found in OUT_DIR) and reports, per seed, the
*unprotected share*: of stage t's training samples (t >= 1), the fraction held by
clients with no training sample of an earlier skill k before stage t, averaged over
those skills. On such a client ``asr_local`` has no prototype of k to regularise
against, while ``asr`` has the global one; so if sharing the spectrum protects a
skill, ``A - B`` (here asr - asr_local AF, type protocol) should fall as the share
grows. Prints a table, the Pearson correlation and, for the seeds at or above
``--split`` (default 0.5: most of the later stage trains where the skill was never
seen) and those below it, A paired with B (``fed_asr.paired``); writes
OUT_DIR/coverage.json.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from fed_asr.config import compose_config
from fed_asr.data import build_stream, partition_stream
from fed_asr.data.partition import partition_label
from fed_asr.data.samples import ContinualStream
from fed_asr.outputs import read_cell_metrics
from fed_asr.paired import format_comparison, paired_comparison


def unprotected_share(shares: list[ContinualStream]) -> list[float]:
    """Per stage t >= 1: mean over earlier skills of the share trained without them."""
    n_stages = len(shares[0].stages)
    result = []
    for t in range(1, n_stages):
        seen: list[dict[str, int]] = []
        for client in shares:
            counts: dict[str, int] = defaultdict(int)
            for stage in client.stages[:t]:
                for s in stage.train:
                    counts[partition_label(s, "skill")] += 1
            seen.append(counts)
        earlier = sorted({k for counts in seen for k in counts})
        sizes = np.array([len(c.stages[t].train) for c in shares], dtype=float)
        per_skill = [
            sum(
                n
                for n, counts in zip(sizes, seen, strict=True)
                if counts.get(k, 0) == 0
            )
            / sizes.sum()
            for k in earlier
        ]
        result.append(float(np.mean(per_skill)) if per_skill else 0.0)
    return result


def _af_type(out: Path) -> dict[tuple[str, int], float]:
    """AF (type protocol) of each ``<variant>-s<seed>`` run in ``out``."""
    return {
        (variant, m["seed"]): m["metrics_type"]["AF"]
        for variant, ms in read_cell_metrics(out).items()
        for m in ms
    }


def main() -> None:
    """Print the per-seed table and the correlation; write coverage.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--against", nargs=2, metavar=("A", "B"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--split", type=float, default=0.5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    af = _af_type(args.out)
    seeds = sorted({seed for _, seed in af})
    rows = []
    for seed in seeds:
        cfg = compose_config(overrides=[*args.overrides, f"seed={seed}"])
        stream = build_stream(cfg.data, seed)
        shares = partition_stream(
            stream,
            args.clients,
            cfg.data.dirichlet_alpha,
            seed,
            by=cfg.data.partition_by,
        )
        row = {
            "seed": seed,
            "train_sizes": [[len(s.train) for s in c.stages] for c in shares],
            "unprotected": unprotected_share(shares),
        }
        if args.against:
            a, b = args.against
            if (a, seed) in af and (b, seed) in af:
                row["diff"] = af[(a, seed)] - af[(b, seed)]
                row[a], row[b] = af[(a, seed)], af[(b, seed)]
        rows.append(row)
        diff = f"{row['diff']:+.3f}" if "diff" in row else "-"
        print(f"seed {seed}: unprotected {row['unprotected']}  diff {diff}")
    paired = [r for r in rows if "diff" in r]
    summary: dict = {"rows": rows, "overrides": args.overrides}
    x = [float(np.mean(r["unprotected"])) for r in paired]
    if len(paired) >= 3 and np.std(x) > 0:
        y = [r["diff"] for r in paired]
        summary["pearson_r"] = float(np.corrcoef(x, y)[0, 1])
        print(
            f"Pearson r (unprotected share, {args.against[0]} - "
            f"{args.against[1]} AF type) = {summary['pearson_r']:+.2f} "
            f"over {len(paired)} seeds"
        )
    if args.against:
        summary["groups"] = _paired_groups(paired, args.against, args.split)
    (args.out / "coverage.json").write_text(json.dumps(summary, indent=1))


def _paired_groups(rows: list[dict], against: list[str], split: float) -> dict:
    """A against B on the seeds at or above ``split`` and on those below it."""
    a, b = against
    groups = {}
    for name, keep in (
        (f">= {split}", lambda u: u >= split),
        (f"< {split}", lambda u: u < split),
    ):
        chosen = [r for r in rows if keep(float(np.mean(r["unprotected"])))]
        c = paired_comparison(
            {r["seed"]: r[a] for r in chosen}, {r["seed"]: r[b] for r in chosen}
        )
        text = format_comparison(c) if c else "fewer than 2 seeds"
        print(f"unprotected share {name}: {a} against {b}: {text}")
        groups[name] = {"seeds": [r["seed"] for r in chosen], "paired": text}
    return groups


if __name__ == "__main__":
    main()
