"""Compare two variants with the base model as the unit (docs/findings.md).

Usage: python studies/scenes/across_bases.py VARIANT BASELINE FOLDER... [--seeds S ...]
                          [--metric AF_type] [--out FILE.json] [--plot FILE.png]
Each FOLDER holds the runs of one base (``model.pretrain_seed``), as
``studies/run_cells.sh`` writes them or as flat ``<variant>-s<seed>.json`` copies. Per
base: the mean of ``--metric`` over the seeds both variants have (``--seeds``
restricts them), its ratio and paired t over those seeds. Across bases: the ratio of
the per-base means, a paired t over the bases and the exact sign test on how many bases
the variant is lower (``fed_asr.paired``), so that an effect that one base shows and
another does not is read as such. ``--plot`` draws each base's per-seed gaps and their
mean. ``drift`` is the first stage's spectral drift after the last stage (the
unweighted Mahalanobis distance, ``metrics.json`` "drift"). ``--covariate METRIC``
asks whether the per-base gap follows the baseline's per-base mean of METRIC (Pearson
r over the bases), e.g. whether FedASR helps more where FedAvg-LoRA drifts more. A
folder whose runs started from more than one base (two different
``base_fingerprint``s) is refused.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fed_asr.outputs import read_cell_metrics
from fed_asr.paired import (
    correlation_test,
    format_comparison,
    paired_comparison,
    sign_test_p,
)
from fed_asr.plots import plot_gaps_by_group


def first_stage_drift(m: dict[str, Any]) -> float:
    """Stage 0's drift after the last stage (``metrics.json`` "drift" rows)."""
    last = len(m["stages"]) - 1
    for row in m.get("drift", []):
        if row["stage"] == 0 and row["after_stage"] == last:
            return float(row["drift_mean"])
    raise KeyError(f"no drift row for stage 0 after stage {last}")


METRICS = {
    "AF_type": lambda m: m["metrics_type"]["AF"],
    "Last_type": lambda m: m["metrics_type"]["Last"],
    "AF": lambda m: m["AF"],
    "Last": lambda m: m["Last"],
    "drift": first_stage_drift,
}


Runs = dict[
    str, list[dict[str, Any]]
]  # variant -> its metrics.json (read_cell_metrics)


def base_values(
    folder: Path,
    runs: Runs,
    variant: str,
    metric: str,
    seeds: Sequence[int] | None,
) -> dict[int, float]:
    """``metric`` of ``variant``'s runs (one folder's ``runs``) by seed.

    A run that lacks the metric (e.g. no drift rows) is refused in one line.
    """
    values = {}
    for m in runs.get(variant, []):
        seed = int(m["seed"])
        if seeds is not None and seed not in seeds:
            continue
        try:
            values[seed] = float(METRICS[metric](m))
        except (KeyError, TypeError) as err:
            raise SystemExit(
                f"{folder}: {variant} seed {seed} has no {metric} ({err})."
            ) from None
    return values


def check_one_base(folder: Path, runs: Runs) -> str | None:
    """The folder's one base fingerprint (None: no run recorded one); refuse a mix.

    Runs written before fingerprints were recorded carry none and are not checked.
    """
    prints = {
        m["base_fingerprint"]
        for ms in runs.values()
        for m in ms
        if m.get("base_fingerprint")
    }
    if len(prints) > 1:
        raise SystemExit(
            f"{folder}: runs from {len(prints)} different bases (base_fingerprint); "
            "put one base's runs in each folder."
        )
    return next(iter(prints), None)


def compare_across_bases(
    variant: str,
    baseline: str,
    folders: Sequence[Path],
    metric: str = "AF_type",
    seeds: Sequence[int] | None = None,
    covariate: str | None = None,
) -> dict[str, Any]:
    """Per-base paired comparison, the comparison over the bases' means and, with
    ``covariate``, the correlation of the per-base gap with the baseline's mean of
    that metric (on the same seeds)."""
    per_base, means_v, means_b, covariates = [], {}, {}, {}
    for index, folder in enumerate(folders):
        runs = read_cell_metrics(folder)  # read once per folder
        fingerprint = check_one_base(folder, runs)
        v = base_values(folder, runs, variant, metric, seeds)
        b = base_values(folder, runs, baseline, metric, seeds)
        shared = sorted(set(v) & set(b))
        if not shared:
            raise SystemExit(f"{folder}: no seed has both {variant} and {baseline}.")
        means_v[index] = statistics.mean(v[s] for s in shared)
        means_b[index] = statistics.mean(b[s] for s in shared)
        gaps = [v[s] - b[s] for s in shared]
        within = paired_comparison(v, b)
        row = {
            "folder": str(folder),
            "base_fingerprint": fingerprint,
            "seeds": shared,
            variant: means_v[index],
            baseline: means_b[index],
            "ratio": means_v[index] / means_b[index],
            "gaps": gaps,
            "paired": None if within is None else within.as_dict(),
            "paired_text": None if within is None else format_comparison(within),
        }
        if covariate is not None:
            of_baseline = base_values(folder, runs, baseline, covariate, shared)
            covariates[index] = statistics.mean(of_baseline.values())
            row[f"{baseline}_{covariate}"] = covariates[index]
        per_base.append(row)
    across = paired_comparison(means_v, means_b)
    lower = sum(means_v[i] < means_b[i] for i in means_v)
    higher = sum(means_v[i] > means_b[i] for i in means_v)
    follows = None
    if covariate is not None and len(covariates) >= 3:
        try:
            r, p = correlation_test(
                [covariates[i] for i in means_v],
                [means_v[i] - means_b[i] for i in means_v],
            )
        except ValueError as err:  # e.g. every base has the same gap
            raise SystemExit(f"--covariate {covariate}: {err}") from None
        follows = {"covariate": f"{baseline}_{covariate}", "pearson_r": r, "p": p}
    return {
        "variant": variant,
        "baseline": baseline,
        "metric": metric,
        "bases": per_base,
        "across_bases": None if across is None else across.as_dict(),
        "across_bases_text": None if across is None else format_comparison(across),
        "lower_on_bases": lower,
        "higher_on_bases": higher,
        "sign_test_p": sign_test_p(lower, higher),
        "gap_against_covariate": follows,
    }


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table and one line over the bases."""
    v, b = result["variant"], result["baseline"]
    lines = [
        f"| base folder | seeds | {v} | {b} | ratio | paired over seeds |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["bases"]:
        lines.append(
            f"| {Path(row['folder']).name} | {len(row['seeds'])} | {row[v]:.3f} | "
            f"{row[b]:.3f} | {row['ratio']:.2f}x | {row['paired_text'] or '-'} |"
        )
    lines.append(
        f"\nOver {len(result['bases'])} bases ({result['metric']}, the per-base means "
        f"paired): {result['across_bases_text'] or '- (fewer than two bases)'}; "
        f"sign test: lower on {result['lower_on_bases']}, higher on "
        f"{result['higher_on_bases']}, p = {result['sign_test_p']:.2g}."
    )
    follows = result["gap_against_covariate"]
    if follows is not None:
        lines.append(
            f"Per-base gap against {follows['covariate']}: Pearson r = "
            f"{follows['pearson_r']:+.2f}, p = {follows['p']:.2g} "
            f"({len(result['bases'])} bases)."
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Each base's per-seed gaps (variant - baseline) and their mean; with a
    covariate, the mean gaps against it."""
    gaps = {Path(row["folder"]).name: row["gaps"] for row in result["bases"]}
    label = f"{result['variant']} - {result['baseline']} {result['metric']}"
    follows = result["gap_against_covariate"]
    if follows is None:
        return plot_gaps_by_group(gaps, path, label=label)
    key = follows["covariate"]
    covariate = {Path(row["folder"]).name: row[key] for row in result["bases"]}
    return plot_gaps_by_group(
        gaps, path, label=label, covariate=covariate, covariate_label=key
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant")
    parser.add_argument("baseline")
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--metric", default="AF_type", choices=sorted(METRICS))
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="draw the gaps here")
    parser.add_argument(
        "--covariate",
        default=None,
        choices=sorted(METRICS),
        help="correlate the per-base gap with the baseline's mean of this metric",
    )
    args = parser.parse_args(argv)
    result = compare_across_bases(
        args.variant,
        args.baseline,
        args.folders,
        args.metric,
        args.seeds,
        args.covariate,
    )
    print(markdown(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot is not None:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
