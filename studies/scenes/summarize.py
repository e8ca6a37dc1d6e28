"""Summarise the scenes comparison (docs/findings.md): one JSON and a Markdown table.

Usage: python studies/scenes/summarize.py OUT_DIR [--stage K] [--upto N] [--against V]
                                                  [--confusion SKILL]
Reads OUT_DIR/<variant>-s<seed>/metrics.json (or flat OUT_DIR/<variant>-s<seed>.json
copies of them); writes OUT_DIR/summary.{json,md} (and, with --against,
summary_paired_af_type.png).
Drift, map shift and grounding are those of stage K's test data (default 0): at its
own end (the floor) and after the last stage.
``--upto N`` reads every run as if it had stopped after its first N stages (the
matrices cut to N x N and their metrics recomputed; drift rows after stage N-1
dropped): what a run of those N stages alone gives, as the schedule of a stage does
not depend on the stages after it.
``--against VARIANT`` pairs every other variant with VARIANT on the seeds both have
(ratio of means, per-seed differences, paired t and p: ``fed_asr.paired``) for AF and
Last under ``type`` and AF under ``all``. A seed whose two runs started from different
base weights (their ``base_fingerprint``s differ) is left out of the pair and named
under the table; runs written before the fingerprint was recorded pair as before.
``--confusion SKILL`` adds, per variant, how stage 0's SKILL questions were answered
after its own stage and after the last one (central runs' ``answer_confusion``, type
protocol, summed over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from fed_asr.metrics import continual_metrics
from fed_asr.outputs import read_cell_metrics
from fed_asr.paired import format_comparison, paired_comparison
from fed_asr.plots import plot_paired_seeds

PAIRED = (("AF_type", "AF (type)"), ("Last_type", "Last (type)"), ("AF", "AF (all)"))


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _drift(m: dict, stage: int, after: int) -> float | None:
    for row in m.get("drift", []):
        if row["stage"] == stage and row["after_stage"] == after:
            return row["drift_mean"]
    return None


def _share(m: dict, stage: int, after: int) -> float | None:
    for row in m.get("drift", []):
        if row["stage"] == stage and row["after_stage"] == after:
            return row["grounding_share"]
    return None


def _map_shift(m: dict, stage: int, after: int) -> float | None:
    for row in m.get("drift", []):
        if row["stage"] == stage and row["after_stage"] == after:
            return row.get("map_shift")
    return None


def _metrics_of(matrix: list[list[float | None]]) -> dict[str, float | None]:
    nan = float("nan")
    rows = [[nan if v is None else v for v in row] for row in matrix]
    values = continual_metrics(rows, allow_missing=True).as_dict()
    return {k: None if v != v else v for k, v in values.items()}


def first_stages(m: dict, n: int) -> dict:
    """``m`` (a metrics.json) as if the run had stopped after its first ``n`` stages."""
    if not 1 <= n <= len(m["stages"]):
        raise ValueError(f"--upto must be in 1..{len(m['stages'])}, got {n}.")

    def cut(matrix: list[list]) -> list[list]:
        return [row[:n] for row in matrix[:n]]

    out = dict(m, stages=m["stages"][:n])
    out["accuracy_matrix"] = cut(m["accuracy_matrix"])
    out["accuracy_matrix_type"] = cut(m["accuracy_matrix_type"])
    out.update(_metrics_of(out["accuracy_matrix"]))
    out["metrics_type"] = _metrics_of(out["accuracy_matrix_type"])
    out["per_skill"] = {}
    for protocol, skills in m["per_skill"].items():
        kept = {}
        for skill, entry in skills.items():
            matrix = cut(entry["accuracy_matrix"])
            # only skills asked within the first n stages
            if any(v is not None for row in matrix for v in row):
                kept[skill] = {
                    "accuracy_matrix": matrix,
                    "metrics": _metrics_of(matrix),
                }
        out["per_skill"][protocol] = kept
    out["drift"] = [r for r in m.get("drift", []) if r["after_stage"] < n]
    out["answer_confusion"] = [
        r for r in m.get("answer_confusion", []) if r["after_stage"] < n
    ]
    return out


def main(
    out: Path,
    confusion_skill: str | None = None,
    stage: int = 0,
    upto: int | None = None,
    against: str | None = None,
) -> None:
    runs: dict[str, list[dict]] = defaultdict(list, read_cell_metrics(out))
    if upto is not None:
        runs = defaultdict(
            list, {v: [first_stages(m, upto) for m in ms] for v, ms in runs.items()}
        )
    rows, table = {}, []
    header = (
        "| variant | seeds | Last | AF | Last (type) | AF (type) | "
        f"drift stage {stage}: floor -> after last | map shift stage {stage} "
        f"after last | grounding stage {stage}: own -> after last |"
    )
    table += [header, "|" + "---|" * 9]
    for variant, ms in sorted(runs.items()):
        T = len(ms[0]["stages"])
        rec = {
            "seeds": [m["seed"] for m in ms],
            "base": [m.get("base_fingerprint") for m in ms],
            "Last": [m["Last"] for m in ms],
            "AF": [m["AF"] for m in ms],
            "Last_type": [m["metrics_type"]["Last"] for m in ms],
            "AF_type": [m["metrics_type"]["AF"] for m in ms],
            "stage": stage,
            "drift_floor": [_drift(m, stage, stage) for m in ms],
            "drift_last": [_drift(m, stage, T - 1) for m in ms],
            "map_shift_last": [_map_shift(m, stage, T - 1) for m in ms],
            "share_own": [_share(m, stage, stage) for m in ms],
            "share_last": [_share(m, stage, T - 1) for m in ms],
            "per_skill_type": {
                skill: {
                    "AF": [
                        m["per_skill"]["type"][skill]["metrics"]["AF"]
                        for m in ms
                        if skill in m["per_skill"]["type"]
                    ],
                    "Last": [
                        m["per_skill"]["type"][skill]["metrics"]["Last"]
                        for m in ms
                        if skill in m["per_skill"]["type"]
                    ],
                    "matrix_seed0": ms[0]["per_skill"]["type"][skill][
                        "accuracy_matrix"
                    ],
                }
                for skill in ms[0]["per_skill"]["type"]
            },
            "accuracy_matrix_seed0": ms[0]["accuracy_matrix"],
        }
        rows[variant] = rec
        table.append(
            f"| {variant} | {len(ms)} | {_mean_std(rec['Last'])} | "
            f"{_mean_std(rec['AF'])} | {_mean_std(rec['Last_type'])} | "
            f"{_mean_std(rec['AF_type'])} | {_mean_std(rec['drift_floor'])} -> "
            f"{_mean_std(rec['drift_last'])} | {_mean_std(rec['map_shift_last'])} | "
            f"{_mean_std(rec['share_own'])} -> {_mean_std(rec['share_last'])} |"
        )
    skills = sorted({s for r in rows.values() for s in r["per_skill_type"]})
    table += ["", "Per-skill AF / Last (type protocol):", ""]
    table += [
        "| variant | " + " | ".join(skills) + " |",
        "|" + "---|" * (len(skills) + 1),
    ]
    for variant, rec in sorted(rows.items()):
        cells = [
            f"{_mean_std(rec['per_skill_type'][s]['AF'])} / "
            f"{_mean_std(rec['per_skill_type'][s]['Last'])}"
            if s in rec["per_skill_type"]
            else "-"
            for s in skills
        ]
        table.append(f"| {variant} | " + " | ".join(cells) + " |")
    if against:
        table += _paired_table(rows, against)
        _plot_paired(rows, against, out / "summary_paired_af_type.png")
    if confusion_skill:
        table += _confusion_table(runs, confusion_skill, rows)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    (out / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def _paired_table(rows: dict, baseline: str) -> list[str]:
    """Every variant against ``baseline``, seed by seed (also into ``rows``)."""
    if baseline not in rows:
        raise SystemExit(f"--against {baseline}: no such variant in {sorted(rows)}")
    base = rows[baseline]
    lines = [
        "",
        f"Paired against {baseline} (same seeds): ratio of the means, per-seed "
        "difference mean ± std, paired t, two-sided p, seeds where lower:",
        "",
        "| variant | " + " | ".join(label for _, label in PAIRED) + " |",
        "|" + "---|" * (len(PAIRED) + 1),
    ]
    other_base: dict[str, list[int]] = {}
    for variant, rec in sorted(rows.items()):
        if variant == baseline:
            continue
        skip = _seeds_on_other_bases(rec, base)
        if skip:
            other_base[variant] = skip
        cells, rec["paired_against"] = [], {"baseline": baseline, "other_base": skip}
        for key, _ in PAIRED:
            c = paired_comparison(_by_seed(rec, key, skip), _by_seed(base, key, skip))
            rec["paired_against"][key] = c.as_dict() if c else None
            cells.append(format_comparison(c) if c else "-")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    for variant, seeds in other_base.items():
        lines.append(
            f"\nNot paired: {variant} on seeds {seeds} started from other base "
            f"weights than {baseline} (`base_fingerprint` differs)."
        )
    return lines


def _by_seed(rec: dict, key: str, skip: list[int]) -> dict[int, float]:
    return {s: v for s, v in zip(rec["seeds"], rec[key], strict=True) if s not in skip}


def _seeds_on_other_bases(rec: dict, base: dict) -> list[int]:
    """Seeds where both runs record a base fingerprint and the two differ."""
    theirs = dict(zip(base["seeds"], base["base"], strict=True))
    return sorted(
        s
        for s, mine in zip(rec["seeds"], rec["base"], strict=True)
        if mine and theirs.get(s) and mine != theirs[s]
    )


def _plot_paired(rows: dict, baseline: str, path: Path) -> None:
    """Per-seed AF (type) of each variant against ``baseline``'s (seeds it pairs)."""
    base = dict(zip(rows[baseline]["seeds"], rows[baseline]["AF_type"], strict=True))
    pairs = {
        variant: {
            s: (base[s], v)
            for s, v in zip(rec["seeds"], rec["AF_type"], strict=True)
            if s in base and s not in rec["paired_against"]["other_base"]
        }
        for variant, rec in sorted(rows.items())
        if variant != baseline
    }
    plot_paired_seeds(pairs, path, baseline=baseline, metric="AF (type)")


def _pooled_confusion(ms: list[dict], skill: str, after: int) -> dict[str, dict]:
    pooled: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for m in ms:
        for row in m.get("answer_confusion", []):
            if row["stage"] == 0 and row["after_stage"] == after:
                for gold, preds in row["skills"].get(skill, {}).items():
                    for pred, n in preds.items():
                        pooled[gold][pred] += n
    return {g: dict(p) for g, p in sorted(pooled.items())}


def _confusion_table(runs: dict, skill: str, rows: dict) -> list[str]:
    """Stage 0's ``skill`` answers after stage 0 and after the last stage."""
    lines = [
        "",
        f"Stage 0's {skill} questions: gold -> predicted counts, "
        "after stage 0 | after the last stage (type protocol, seeds summed):",
        "",
    ]
    for variant, ms in sorted(runs.items()):
        T = len(ms[0]["stages"])
        first, last = (_pooled_confusion(ms, skill, a) for a in (0, T - 1))
        if not last:
            continue
        rows[variant][f"confusion_{skill}_stage0"] = {
            "after_0": first,
            "after_last": last,
        }
        cells = [
            f"{gold}: {first.get(gold, {})} | {last[gold]}" for gold in sorted(last)
        ]
        lines.append(f"- {variant}: " + "; ".join(cells))
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder of the runs (see above)")
    parser.add_argument("--stage", type=int, default=0, help="old stage K")
    parser.add_argument("--upto", type=int, help="read runs as N-stage runs")
    parser.add_argument("--confusion", metavar="SKILL", help="stage 0's answers")
    parser.add_argument("--against", metavar="VARIANT", help="pair with VARIANT")
    args = parser.parse_args()
    main(args.out, args.confusion, args.stage, args.upto, args.against)
