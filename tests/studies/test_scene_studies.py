"""The scenes study scripts run end to end on the smallest settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import small_run_overrides

REPO_ROOT = Path(__file__).resolve().parents[2]


def _script(script: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """Run ``studies/scenes/<script>`` from the repository root (output captured)."""
    return subprocess.run(
        [sys.executable, f"studies/scenes/{script}", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _run_script(script: str, *args: str, timeout: int) -> None:
    """Run ``studies/scenes/<script>``; fail on its stderr."""
    done = _script(script, *args, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]


def test_skill_probe_trains_one_skill_and_writes_its_curve(
    model_cache: str, tmp_path: Path
) -> None:
    # Prepare: the test config's stream (stage 0 = shape questions)
    out = tmp_path / "probe.json"
    overrides = small_run_overrides(model_cache, str(tmp_path / "run"))

    # Execute
    _run_script(
        "skill_probe.py", str(out), "shape", "--epochs", "2", *overrides, timeout=300
    )

    # Assert
    result = json.loads(out.read_text())
    assert result["skill"] == "shape" and result["train"] > 0 and result["test"] > 0
    assert [row["epoch"] for row in result["curve"]] == [0, 1, 2]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in result["curve"])
    assert result["chance"] == 1 / len(result["answers"])


def test_vision_probe_fits_shape_and_colour_probes_at_three_depths(
    model_cache: str, tmp_path: Path
) -> None:
    # Prepare: a tiny scenes slice (rendered under tmp_path) on the smallest model
    out = tmp_path / "vision.json"
    overrides = [
        o
        for o in small_run_overrides(model_cache, str(tmp_path / "run"))
        if not o.startswith(("data.", "model.image_size"))
    ]
    overrides += [
        "data=scenes",
        f"data.cache_dir={tmp_path / 'data'}",
        "data.max_train_per_stage=60",
        "data.max_test_per_stage=30",
        "model.image_size=32",
    ]

    # Execute
    _run_script("vision_probe.py", str(out), *overrides, timeout=300)

    # Assert: every probe scored on the stage's object questions; pixels decode it
    result = json.loads(out.read_text())
    assert result["train"] > 0 and result["test"] > 0
    assert set(result["probes"]) == {
        f"{target}/{depth}"
        for target in ("shape", "color")
        for depth in ("pixels", "vision", "projected")
    }
    for probe in result["probes"].values():
        assert 0.0 <= probe["test"] <= 1.0 and 0.0 < probe["chance"] < 1.0
    assert result["probes"]["color/pixels"]["train"] == 1.0


def test_summarize_reports_confusion_of_stage_zero(tmp_path: Path) -> None:
    # Prepare: two hand-made runs of one variant with answer_confusion rows
    def run(seed: int, last: dict[str, dict[str, int]]) -> dict:
        skill = {"metrics": {"AF": 0.1, "Last": 0.5}, "accuracy_matrix": [[1.0]]}
        return {
            "stages": ["a", "b"],
            "seed": seed,
            "Last": 0.5,
            "AF": 0.1,
            "metrics_type": {"Last": 0.5, "AF": 0.1},
            "per_skill": {"type": {"count": skill}},
            "accuracy_matrix": [[1.0, None], [0.5, 1.0]],
            "answer_confusion": [
                {
                    "after_stage": 0,
                    "stage": 0,
                    "skills": {"count": {"two": {"two": 2}}},
                },
                {"after_stage": 1, "stage": 0, "skills": {"count": last}},
            ],
        }

    # seed 0 as a run folder, seed 1 as a flat copy of its metrics.json
    folder = tmp_path / "vanilla-s0"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(run(0, {"two": {"one": 2}})))
    flat = run(1, {"two": {"one": 1, "two": 1}})
    (tmp_path / "vanilla-s1.json").write_text(json.dumps(flat))

    # Execute
    _run_script("summarize.py", str(tmp_path), "--confusion", "count", timeout=60)

    # Assert: seeds summed, after stage 0 and after the last stage
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["vanilla"]["seeds"] == [0, 1]
    confusion = summary["vanilla"]["confusion_count_stage0"]
    assert confusion == {
        "after_0": {"two": {"two": 4}},
        "after_last": {"two": {"one": 3, "two": 1}},
    }


def test_summarize_upto_reads_runs_as_if_stopped_after_n_stages(
    tmp_path: Path,
) -> None:
    # Prepare: one hand-made 3-stage run; stage 0 learned 0.9, 0.5 after stage 1
    matrix = [[0.9, None, None], [0.5, 1.0, None], [0.3, 0.2, 0.8]]
    skill = {"metrics": {"AF": 0.6, "Last": 0.3}, "accuracy_matrix": matrix}
    drift = [
        {"stage": 0, "after_stage": a, "drift_mean": d, "grounding_share": g}
        for a, d, g in ((0, 0.6, 0.6), (1, 2.0, 0.5), (2, 3.0, 0.4))
    ]
    run = {
        "stages": ["shape", "color", "existence"],
        "seed": 0,
        "Last": 0.43,
        "AF": 0.65,
        "metrics_type": {"Last": 0.43, "AF": 0.65},
        "accuracy_matrix": matrix,
        "accuracy_matrix_type": matrix,
        "per_skill": {"type": {"shape": skill}, "all": {"shape": skill}},
        "drift": drift,
    }
    (tmp_path / "vanilla-s0.json").write_text(json.dumps(run))

    # Execute
    _run_script("summarize.py", str(tmp_path), "--upto", "2", timeout=60)

    # Assert: metrics of the 2 x 2 matrix; drift read after stage 1, not stage 2
    rec = json.loads((tmp_path / "summary.json").read_text())["vanilla"]
    assert rec["AF_type"] == [0.4] and rec["AF"] == [0.4]
    assert rec["Last_type"] == [0.75]
    assert rec["per_skill_type"]["shape"]["AF"] == [0.4]
    assert rec["drift_last"] == [2.0] and rec["share_last"] == [0.5]


def _two_stage_run(seed: int, af: float, last: float) -> dict:
    """A hand-made two-stage metrics.json with this AF and Last (both protocols)."""
    matrix = [[last + af, None], [last, last]]
    skill = {"metrics": {"AF": af, "Last": last}, "accuracy_matrix": matrix}
    return {
        "stages": ["shape", "color"],
        "seed": seed,
        "Last": last,
        "AF": af,
        "metrics_type": {"Last": last, "AF": af},
        "accuracy_matrix": matrix,
        "per_skill": {"type": {"shape": skill}, "all": {"shape": skill}},
    }


def test_summarize_against_pairs_variants_on_shared_seeds(tmp_path: Path) -> None:
    # Prepare: asr on seeds 0-2, vanilla on seeds 0-3 (seed 3 has no partner)
    for seed, (af_asr, af_van) in enumerate(((0.3, 0.5), (0.2, 0.45), (0.25, 0.4))):
        (tmp_path / f"asr-s{seed}.json").write_text(
            json.dumps(_two_stage_run(seed, af_asr, 0.8))
        )
        (tmp_path / f"vanilla-s{seed}.json").write_text(
            json.dumps(_two_stage_run(seed, af_van, 0.7))
        )
    (tmp_path / "vanilla-s3.json").write_text(json.dumps(_two_stage_run(3, 0.9, 0.1)))

    # Execute
    _run_script("summarize.py", str(tmp_path), "--against", "vanilla", timeout=60)

    # Assert: differences -0.2, -0.25, -0.15 on seeds 0-2 only
    summary = json.loads((tmp_path / "summary.json").read_text())
    paired = summary["asr"]["paired_against"]
    af = paired["AF_type"]
    assert af["seeds"] == [0, 1, 2] and af["n_lower"] == 3
    assert abs(af["diff_mean"] + 0.2) < 1e-9 and abs(af["ratio"] - 0.75 / 1.35) < 1e-9
    assert abs(af["diff_std"] - 0.05) < 1e-9 and af["df"] == 2
    assert abs(af["t"] + 0.2 / (0.05 / 3**0.5)) < 1e-6
    assert 0.015 < af["p"] < 0.025  # t = -6.9 on 2 df
    assert abs(paired["Last_type"]["diff_mean"] - 0.1) < 1e-9
    assert "| asr | 0.56x, -0.200 ± 0.050" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "summary_paired_af_type.png").stat().st_size > 0
    # an unknown baseline is one clear line, not a traceback
    done = _script("summarize.py", str(tmp_path), "--against=x", timeout=60)
    assert done.returncode == 1 and "--against x: no such variant" in done.stderr


def test_summarize_against_leaves_out_seeds_that_started_from_another_base(
    tmp_path: Path,
) -> None:
    # Prepare: seed 1's asr run started from other base weights; seed 2's
    # baseline was written before fingerprints were recorded
    bases = {0: ("a", "a"), 1: ("b", "a"), 2: ("a", None)}
    for seed, (af_asr, af_van) in enumerate(((0.3, 0.5), (0.9, 0.1), (0.25, 0.4))):
        asr, van = _two_stage_run(seed, af_asr, 0.8), _two_stage_run(seed, af_van, 0.7)
        asr["base_fingerprint"], van["base_fingerprint"] = bases[seed]
        (tmp_path / f"asr-s{seed}.json").write_text(json.dumps(asr))
        (tmp_path / f"vanilla-s{seed}.json").write_text(json.dumps(van))

    # Execute
    _run_script("summarize.py", str(tmp_path), "--against", "vanilla", timeout=60)

    # Assert: seed 1 is named and left out; seeds 0 and 2 pair
    paired = json.loads((tmp_path / "summary.json").read_text())["asr"]
    assert paired["paired_against"]["other_base"] == [1]
    assert paired["paired_against"]["AF_type"]["seeds"] == [0, 2]
    assert (
        "Not paired: asr on seeds [1] started from other base weights"
        in (tmp_path / "summary.md").read_text()
    )


def test_across_bases_reads_each_folder_as_one_base_and_tests_over_bases(
    tmp_path: Path,
) -> None:
    # Prepare: three bases (one folder each), asr against vanilla on seeds 0 and 5;
    # per-base mean gaps -0.1, -0.2 and +0.0
    gaps = {"b1": (-0.1, -0.1), "b2": (-0.15, -0.25), "b3": (0.05, -0.05)}
    folders = []
    for name, (gap0, gap5) in gaps.items():
        folder = tmp_path / name
        folder.mkdir()
        for seed, gap in ((0, gap0), (5, gap5)):
            for variant, af in (("vanilla", 0.4), ("asr", 0.4 + gap)):
                run = _two_stage_run(seed, af, 0.7)
                run["base_fingerprint"] = name
                (folder / f"{variant}-s{seed}.json").write_text(json.dumps(run))
        folders.append(str(folder))
    out = tmp_path / "across.json"

    # Execute
    _run_script(
        "across_bases.py", "asr", "vanilla", *folders, "--out", str(out), timeout=60
    )

    # Assert: the bases are the unit: gaps -0.1, -0.2, 0.0 -> t over 2 df
    result = json.loads(out.read_text())
    assert [row["base_fingerprint"] for row in result["bases"]] == ["b1", "b2", "b3"]
    assert [row["seeds"] for row in result["bases"]] == [[0, 5]] * 3
    assert abs(result["bases"][1]["ratio"] - 0.2 / 0.4) < 1e-9
    across = result["across_bases"]
    assert across["df"] == 2 and abs(across["diff_mean"] + 0.1) < 1e-9
    assert abs(across["diff_std"] - 0.1) < 1e-9 and result["lower_on_bases"] == 2
    # a folder whose runs started from two bases is refused in one line
    mixed = tmp_path / "b1" / "vanilla-s9.json"
    mixed.write_text(
        json.dumps({**_two_stage_run(9, 0.4, 0.7), "base_fingerprint": "x"})
    )
    done = _script("across_bases.py", "asr", "vanilla", folders[0], timeout=60)
    assert done.returncode == 1 and "runs from 2 different bases" in done.stderr


def test_across_bases_tests_drift_by_sign_and_draws_the_gaps(tmp_path: Path) -> None:
    # Prepare: three bases where asr's stage-0 drift after the last stage is lower
    # (gaps -0.1, -0.2, -0.3) and vanilla's Last 0.7, 0.6, 0.5 (a covariate the gaps
    # follow exactly); later, one vanilla run of base b3 loses its drift rows
    folders = []
    for index, name in enumerate(("b1", "b2", "b3")):
        folder = tmp_path / name
        folder.mkdir()
        for seed in (0, 5):
            for variant, drift in (("vanilla", 1.0), ("asr", 0.9 - 0.1 * index)):
                last = 0.7 - 0.1 * index if variant == "vanilla" else 0.7
                run = _two_stage_run(seed, 0.4, last)
                run["drift"] = [
                    {"stage": 0, "after_stage": 0, "drift_mean": 0.6},
                    {"stage": 0, "after_stage": 1, "drift_mean": drift},
                ]
                (folder / f"{variant}-s{seed}.json").write_text(json.dumps(run))
        folders.append(str(folder))
    out, png = tmp_path / "drift.json", tmp_path / "drift.png"

    # Execute
    _run_script(
        "across_bases.py", "asr", "vanilla", *folders, "--metric", "drift",
        "--covariate", "Last_type", "--out", str(out), "--plot", str(png), timeout=60,
    )  # fmt: skip

    # Assert: drift after the last stage (not the floor), lower on 3/3 bases
    result = json.loads(out.read_text())
    assert [round(row["ratio"], 6) for row in result["bases"]] == [0.9, 0.8, 0.7]
    assert result["bases"][2]["gaps"] == pytest.approx([-0.3, -0.3])
    assert (result["lower_on_bases"], result["higher_on_bases"]) == (3, 0)
    assert result["sign_test_p"] == pytest.approx(0.25)
    assert [row["vanilla_Last_type"] for row in result["bases"]] == pytest.approx(
        [0.7, 0.6, 0.5]
    )
    follows = result["gap_against_covariate"]
    assert follows["covariate"] == "vanilla_Last_type"
    assert follows["pearson_r"] == pytest.approx(1.0) and follows["p"] < 1e-6
    assert png.stat().st_size > 0
    # a run without drift rows is refused in one line that names it
    (tmp_path / "b3" / "vanilla-s5.json").write_text(
        json.dumps(_two_stage_run(5, 0.4, 0.7))
    )
    done = _script(
        "across_bases.py", "asr", "vanilla", *folders, "--metric", "drift", timeout=60
    )
    assert done.returncode == 1
    assert "b3: vanilla seed 5 has no drift" in done.stderr.strip().splitlines()[-1]
