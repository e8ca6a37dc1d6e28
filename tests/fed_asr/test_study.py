"""The study runner and report, with an injected fake runner (no training)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fed_asr.config import compose_config, to_yaml
from fed_asr.study import (
    RUNS_DIR,
    Cell,
    Grid,
    StudySpec,
    _parser,
    build_spec,
    expand_cells,
    is_finished,
    main,
    run_study,
)
from fed_asr.study_report import mean_matrix, mean_std

# Last per (method, seed): the fake runner writes these into metrics.json
LAST = {("asr", 0): 0.50, ("asr", 1): 0.70, ("vanilla", 0): 0.20, ("vanilla", 1): 0.40}


class FakeRunner:
    """Writes a run's config.yaml and a made-up metrics.json; counts its calls."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail or set()

    def __call__(self, cell: Cell, folder: Path) -> None:
        self.calls.append(cell.name)
        if cell.method in self.fail:
            raise RuntimeError("boom")
        folder.mkdir(parents=True, exist_ok=True)
        cfg = compose_config("config", [*cell.overrides, f"output_dir={folder}"])
        (folder / "config.yaml").write_text(to_yaml(cfg))
        last = LAST[(cell.method, cell.seed)]
        metrics = {
            "stages": ["a", "b"],
            "accuracy_matrix": [[last + 0.1, None], [last - 0.1, last + 0.1]],
            "Last": last,
            "Avg": last,
            "AF": 0.2 * last,
            "BWT": -0.2 * last,
            "communication_bytes": {"bytes_up_adapter": 300, "bytes_down_adapter": 900},
            "rounds": [{}, {}, {}],
            "wall_time_s": 10.0 + cell.seed,
        }
        (folder / "metrics.json").write_text(json.dumps(metrics))


def _spec(
    tmp_path: Path, strategies: tuple[str, ...] = ("pooled", "median")
) -> StudySpec:
    grid = Grid(
        methods=("asr", "vanilla"),
        strategies=strategies,
        streams=("ability",),
        seeds=(0, 1),
    )
    return StudySpec(
        out=tmp_path / "study",
        grids=[grid],
        engine="central",
        overrides=["train.epochs=1"],
    )


def test_expand_cells_applies_strategies_only_to_spectrum_sharing_methods(
    tmp_path: Path,
) -> None:
    # Execute
    cells = expand_cells(_spec(tmp_path))
    # Assert: asr x {pooled, median} x 2 seeds + vanilla x 2 seeds
    labels = [c.label for c in cells]
    assert labels == [
        "asr/pooled/ability/s0",
        "asr/pooled/ability/s1",
        "asr/median/ability/s0",
        "asr/median/ability/s1",
        "vanilla/-/ability/s0",
        "vanilla/-/ability/s1",
    ]
    assert len({c.config_hash for c in cells}) == 6
    assert "spectrum.strategy=median" in cells[2].overrides
    assert not any(o.startswith("spectrum.") for o in cells[4].overrides)
    assert (
        cells[0].name.startswith("asr-pooled-ability-s0-")
        and cells[0].config_hash in cells[0].name
    )


def test_run_study_aggregates_mean_and_std_over_seeds(tmp_path: Path) -> None:
    # Prepare
    spec = _spec(tmp_path, strategies=("pooled",))
    runner = FakeRunner()
    # Execute
    results = run_study(
        spec, runner, header={"command": "test"}, log=lambda _: None, plots=False
    )
    # Assert
    assert [r.status for r in results] == ["done"] * 4
    study = json.loads((spec.out / "study.json").read_text())
    groups = {(g["method"], g["strategy"]): g for g in study["groups"]}
    asr = groups[("asr", "pooled")]
    assert asr["n"] == 2 and asr["seeds"] == [0, 1]
    assert asr["Last"]["mean"] == pytest.approx(0.6)
    assert asr["Last"]["std"] == pytest.approx(math.sqrt(0.02))  # sample std of .5, .7
    assert asr["AF"]["mean"] == pytest.approx(0.12)
    assert groups[("vanilla", "-")]["BWT"]["mean"] == pytest.approx(-0.06)
    assert asr["bytes_per_round"] == pytest.approx(400.0)
    assert asr["wall_time_s"] == pytest.approx(10.5)
    assert asr["accuracy_matrix"] == [
        [pytest.approx(0.7), None],
        [pytest.approx(0.5), pytest.approx(0.7)],
    ]
    rows = list(csv.DictReader((spec.out / "study.csv").open()))
    assert len(rows) == 4 and rows[0]["method"] == "asr"
    table = (spec.out / "study.md").read_text()
    assert "| asr | pooled | 2 | 0.600 ± 0.141 |" in table
    assert "| vanilla | - | 2 | 0.300 ± 0.141 |" in table
    # every method is paired with vanilla on shared seeds (AF .10/.14 vs .04/.08)
    (paired,) = study["paired"]
    assert (paired["method"], paired["baseline"]) == ("asr", "vanilla")
    assert paired["AF"]["ratio"] == pytest.approx(2.0)
    assert paired["AF"]["diff_mean"] == pytest.approx(0.06)
    assert paired["AF"]["seeds"] == [0, 1] and paired["AF"]["n_lower"] == 0
    assert paired["AF"]["t"] is None  # equal differences: t is infinite, stored as null
    assert paired["AF"]["p"] == 0.0
    assert "Paired against `vanilla`" in table and "2.00x, +0.060" in table


def test_run_study_skips_finished_cells_and_reruns_changed_config(
    tmp_path: Path,
) -> None:
    # Prepare: a first study, then one cell's saved config is altered
    spec = _spec(tmp_path, strategies=("pooled",))
    run_study(spec, FakeRunner(), log=lambda _: None, plots=False)
    cells = expand_cells(spec)
    changed = spec.out / RUNS_DIR / cells[0].name / "config.yaml"
    changed.write_text(changed.read_text().replace("epochs: 1", "epochs: 3"))
    runner = FakeRunner()
    # Execute
    results = run_study(spec, runner, log=lambda _: None, plots=False)
    # Assert
    assert runner.calls == [cells[0].name]
    assert [r.status for r in results] == ["done", "cached", "cached", "cached"]
    assert all(is_finished(c, spec.out / RUNS_DIR / c.name) for c in cells)


def test_run_study_failed_cell_is_reported_and_others_continue(tmp_path: Path) -> None:
    # Prepare
    spec = _spec(tmp_path, strategies=("pooled",))
    lines: list[str] = []
    # Execute
    results = run_study(spec, FakeRunner(fail={"asr"}), log=lines.append, plots=True)
    # Assert
    assert [r.status for r in results] == ["failed", "failed", "done", "done"]
    study = json.loads((spec.out / "study.json").read_text())
    assert [g["method"] for g in study["groups"]] == ["vanilla"]
    assert "Failed cells" in (spec.out / "study.md").read_text()
    assert (spec.out / "af_bars.png").exists()
    assert (spec.out / "accuracy_matrices_ability.png").exists()
    assert any("ETA" in line for line in lines)


def test_build_spec_reads_yaml_grids_and_flags_win(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "study.yaml"
    path.write_text(
        "engine: central\nout: x\noverrides: [train.epochs=1]\n"
        "grids:\n  - {methods: [asr], strategies: [pooled, mean], streams: [domain], "
        "seeds: [0, 1]}\n  - {methods: [vanilla]}\n"
    )
    # Execute
    from_yaml = build_spec(_parser().parse_args(["--spec", str(path)]), ["seed=3"])
    flags = build_spec(
        _parser().parse_args(["--spec", str(path), "--methods", "ewc", "--out", "y"]),
        [],
    )
    # Assert
    assert from_yaml.engine == "central" and from_yaml.out.name == "x"
    assert [g.methods for g in from_yaml.grids] == [("asr",), ("vanilla",)]
    assert from_yaml.grids[0].seeds == (0, 1) and from_yaml.grids[1].streams == (
        "ability",
    )
    assert from_yaml.overrides == ["train.epochs=1", "seed=3"]
    assert [g.methods for g in flags.grids] == [("ewc",)] and flags.out.name == "y"


def test_main_unknown_method_or_override_exits_2_with_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    bad_method = main(["--methods", "ewk", "--out", str(tmp_path)])
    bad_key = main(
        ["--methods", "vanilla", "--out", str(tmp_path), "--", "train.lrr=1"]
    )
    # Assert
    assert bad_method == 2 and bad_key == 2
    err = capsys.readouterr().err
    assert "Unknown method 'ewk'" in err and "train.lrr" in err


def test_mean_std_and_mean_matrix_handle_single_runs_and_gaps() -> None:
    # Execute / Assert
    assert mean_std([0.4])[0] == pytest.approx(0.4) and math.isnan(mean_std([0.4])[1])
    assert mean_matrix([[[1.0, None]], [[0.0, 0.5]]]) == [[0.5, 0.5]]


def test_study_runs_real_central_cells_then_reuses_them(
    tmp_path: Path, run_overrides
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: two methods on a tiny slice, run as real `fed-asr` subprocesses
    common = [
        o
        for o in run_overrides("unused")
        if not o.startswith(("output_dir=", "progress="))
    ]
    spec = StudySpec(
        out=tmp_path / "study",
        grids=[Grid(methods=("vanilla", "asr"), streams=("ability",), seeds=(0,))],
        engine="central",
        overrides=common,
    )
    lines: list[str] = []
    # Execute: run, then run again
    first = run_study(spec, log=lines.append)
    again = run_study(spec, log=lines.append)
    # Assert: real metrics, a report, and no recomputation the second time
    assert [r.status for r in first] == ["done", "done"]
    assert [r.status for r in again] == ["cached", "cached"]
    assert all(0.0 <= r.metrics["Last"] <= 1.0 for r in first)
    table = (spec.out / "study.md").read_text()
    assert "| asr |" in table and "| vanilla |" in table
    assert (spec.out / "study.csv").exists() and (spec.out / "study.json").exists()
