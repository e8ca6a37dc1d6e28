"""``fed-asr-study``: run a grid of experiments and compare them in one report.

Usage::

    fed-asr-study --methods asr,vanilla --strategies pooled,median --seeds 0,1,2 \\
        --streams ability,domain --out studies/x [--engine simulation] \\
        -- <common Hydra overrides, e.g. federation.rounds_per_stage=1>
    fed-asr-study --spec study.yaml [--out studies/x] [-- overrides]

The grid is methods x spectrum strategies x streams x seeds. Spectrum strategies only
apply to methods that share a spectrum (``asr``); every other method runs once per
(stream, seed) and is reported with strategy "-". A YAML spec may list several grids
(keys ``engine``, ``out``, ``overrides``, ``grids: [{methods, strategies, streams,
seeds}, ...]``; see ``docs/study.md``).

Each cell runs as its own ``fed-asr`` subprocess (isolation: a fresh Ray, fresh
caches) writing to ``<out>/runs/<method>-<strategy>-<stream>-s<seed>-<hash>``, where
the hash is of the cell's resolved config. A cell whose ``metrics.json`` exists and
whose ``config.yaml`` has that hash is not run again. ``--in-process`` runs the cells
in this process instead (central cells only: ``fed_asr`` never imports Flower or
the apps). The study writes ``study.json``,
``study.csv``, ``study.md`` and plots into ``<out>`` (``fed_asr.study_report``), and
every cell's tracking run into ``<out>/tracking/<cell>`` (``tensorboard --logdir
<out>/tracking`` shows them side by side).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_asr.config import ExperimentConfig, compose_config, to_yaml
from fed_asr.progress import format_seconds
from fed_asr.study_report import NO_STRATEGY, CellResult, write_report
from fed_asr.tracking import TrackingConfig

RUNS_DIR = "runs"
CELL_LOG = "study_run.log"
TRACKING_DIR = "tracking"  # <out>/tracking/<cell>: every cell's tracking run


@dataclass(frozen=True)
class Grid:
    """One cross product of the study."""

    methods: tuple[str, ...]
    strategies: tuple[str, ...] = ("pooled",)
    streams: tuple[str, ...] = ("ability",)
    seeds: tuple[int, ...] = (0,)


@dataclass
class StudySpec:
    """A study: grids, engine, common overrides and output folder."""

    out: Path
    grids: list[Grid]
    engine: str = "simulation"
    overrides: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Cell:
    """One run of the study."""

    method: str
    strategy: str  # NO_STRATEGY when the method does not share a spectrum
    stream: str
    seed: int
    overrides: tuple[str, ...]  # fed-asr overrides, without output_dir
    config_hash: str

    @property
    def name(self) -> str:
        """Folder name: readable prefix + config hash."""
        strategy = "na" if self.strategy == NO_STRATEGY else self.strategy
        return f"{self.method}-{strategy}-{self.stream}-s{self.seed}-{self.config_hash}"

    @property
    def label(self) -> str:
        """Short label for progress lines."""
        return f"{self.method}/{self.strategy}/{self.stream}/s{self.seed}"


# A runner executes one cell and leaves metrics.json (and config.yaml) in the folder.
Runner = Callable[[Cell, Path], None]


def config_hash(cfg: ExperimentConfig) -> str:
    """12 hex digits of the resolved config (not of where or how verbosely it runs)."""
    neutral = dataclasses.replace(
        cfg, output_dir="", progress=False, resume=False, tracking=TrackingConfig()
    )
    return hashlib.sha256(to_yaml(neutral).encode()).hexdigest()[:12]


def saved_config_hash(folder: Path) -> str | None:
    """Hash of the ``config.yaml`` a finished run wrote (None if absent or invalid)."""
    path = folder / "config.yaml"
    if not path.exists():
        return None
    from omegaconf import OmegaConf

    from fed_asr.config import to_experiment_config

    try:
        return config_hash(to_experiment_config(OmegaConf.load(path)))
    except Exception:  # an unreadable or outdated config is simply "not finished"
        return None


def is_finished(cell: Cell, folder: Path) -> bool:
    """``metrics.json`` exists and the saved config hashes to the cell's hash."""
    return (folder / "metrics.json").exists() and saved_config_hash(folder) == (
        cell.config_hash
    )


def expand_cells(spec: StudySpec) -> list[Cell]:
    """Every distinct cell of the spec's grids, in grid order.

    Raises
    ------
    KeyError
        Unknown method or spectrum strategy (the message lists the choices).
    ValueError
        Overrides that do not compose (misspelt key, bad value).
    """
    from fed_asr.methods import METHODS
    from fed_asr.spectrum_strategies import get_spectrum_strategy

    cells: dict[str, Cell] = {}
    for grid in spec.grids:
        for method in grid.methods:
            if method not in METHODS:
                raise KeyError(
                    f"Unknown method {method!r}. Available: {sorted(METHODS)}."
                )
            shares = METHODS[method].method_class.stage_end.spectrum == "shared"
            for strategy in grid.strategies if shares else (NO_STRATEGY,):
                if shares:
                    get_spectrum_strategy(strategy)
                for stream in grid.streams:
                    for seed in grid.seeds:
                        overrides = [
                            f"engine={spec.engine}",
                            f"method={method}",
                            f"data.stream={stream}",
                            f"seed={seed}",
                            *([f"spectrum.strategy={strategy}"] if shares else []),
                            *spec.overrides,
                        ]
                        digest = config_hash(compose_config("config", overrides))
                        cell = Cell(
                            method, strategy, stream, seed, tuple(overrides), digest
                        )
                        cells.setdefault(cell.name, cell)
    return list(cells.values())


def subprocess_runner(timeout_s: float | None = None) -> Runner:
    """Run each cell as ``fed-asr <overrides> output_dir=<folder>`` in its own session.

    The output goes to ``<folder>/study_run.log``. On timeout the cell's process group
    (and only it) is killed and the cell fails.
    """

    def run(cell: Cell, folder: Path) -> None:
        script = Path(sys.executable).with_name("fed-asr")
        command = (
            [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]
        )
        command += [*cell.overrides, *_placement(folder)]
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / CELL_LOG).open("w") as log:
            log.write("$ " + shlex.join(command) + "\n")
            log.flush()
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"timed out after {timeout_s} s") from None
        if code != 0:
            raise RuntimeError(f"fed-asr exited with {code}; see {folder / CELL_LOG}")

    return run


def inprocess_runner(cell: Cell, folder: Path) -> None:
    """Run a central cell in this process (federated cells need ``fed-asr``).

    The library never imports the Flower apps, so a federated cell runs through
    the subprocess runner (``fed-asr engine=simulation ...``) instead.

    Raises
    ------
    ValueError
        The cell is not ``engine=central``.
    """
    overrides = [*cell.overrides, *_placement(folder)]
    cfg = compose_config("config", overrides)
    if cfg.engine.name != "central":
        raise ValueError(
            f"`--in-process` runs only `engine=central` cells, got "
            f"`engine={cfg.engine.name}` for {cell.name}; drop `--in-process`."
        )
    from fed_asr.central import run_central

    run_central(cfg)


def _placement(folder: Path) -> list[str]:
    """Where a cell writes: its folder, and its tracking run in the study's one
    tracking folder (``<out>/tracking/<cell>``: one TensorBoard log dir for all)."""
    return [
        f"output_dir={folder}",
        "progress=false",
        f"tracking.dir={folder.parent.parent / TRACKING_DIR}",
        f"tracking.run_name={folder.name}",
    ]


def _log(message: str) -> None:
    print(f"[study] {message}", file=sys.stderr, flush=True)


def run_study(
    spec: StudySpec,
    runner: Runner | None = None,
    header: dict[str, Any] | None = None,
    log: Callable[[str], None] = _log,
    plots: bool = True,
) -> list[CellResult]:
    """Run (or reuse) every cell, one at a time, then write the report.

    Parameters
    ----------
    spec : StudySpec
        The study.
    runner : Runner | None
        Executes one cell; ``subprocess_runner()`` by default. Tests inject fakes.
    header : dict | None
        Recorded in ``study.json``/``study.md`` (e.g. the command line).
    log : Callable[[str], None]
        Receives one progress line per cell (with elapsed time and ETA).
    plots : bool
        Draw the report's plots.

    Returns
    -------
    list[CellResult]
        One result per cell, in grid order.
    """
    runner = runner or subprocess_runner()
    cells = expand_cells(spec)
    runs = spec.out / RUNS_DIR
    todo = sum(not is_finished(c, runs / c.name) for c in cells)
    log(f"{len(cells)} cells, {len(cells) - todo} already finished, {todo} to run")
    results: list[CellResult] = []
    start = time.perf_counter()
    ran = 0
    for index, cell in enumerate(cells, start=1):
        folder = runs / cell.name
        began = time.perf_counter()
        status = "cached"
        if not is_finished(cell, folder):
            try:
                runner(cell, folder)
                status = "done" if is_finished(cell, folder) else "failed"
            except Exception as err:  # one failed cell must not stop the study
                log(f"{cell.label} failed: {err}")
                status = "failed"
            ran += 1
        seconds = time.perf_counter() - began
        metrics: dict[str, Any] = {}
        if status != "failed":
            metrics = json.loads((folder / "metrics.json").read_text())
        results.append(
            CellResult(
                cell.method,
                cell.strategy,
                cell.stream,
                cell.seed,
                str(folder),
                status,
                metrics,
                seconds,
            )
        )
        elapsed = time.perf_counter() - start
        left = todo - ran
        eta = elapsed / ran * left if ran else 0.0
        summary = (
            f"Last={metrics['Last']:.3f} AF={metrics['AF']:.3f}"
            if metrics
            else "no metrics"
        )
        log(
            f"{index}/{len(cells)} {cell.label} {status} in {format_seconds(seconds)} "
            f"| {summary} | elapsed {format_seconds(elapsed)} "
            f"| ETA {format_seconds(eta)}"
        )
    info = {
        "engine": spec.engine,
        "overrides": list(spec.overrides),
        "grids": [dataclasses.asdict(g) for g in spec.grids],
        **(header or {}),
    }
    paths = write_report(spec.out, results, info, plots=plots)
    log(f"report: {paths['md']}")
    return results


def _split_list(text: str | None) -> tuple[str, ...] | None:
    return (
        None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())
    )


def load_spec(path: Path) -> dict[str, Any]:
    """Read a YAML study spec into plain containers."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise ValueError(
            f"Study spec {path} must be a mapping, got {type(data).__name__}."
        )
    unknown = sorted(set(data) - {"engine", "out", "overrides", "grids"})
    if unknown:
        raise ValueError(f"Unknown keys {unknown} in study spec {path}.")
    return data


def build_spec(args: argparse.Namespace, overrides: Sequence[str]) -> StudySpec:
    """Combine the YAML spec (if any) with the command-line flags (flags win)."""
    data = load_spec(Path(args.spec)) if args.spec else {}
    grids = [
        Grid(
            methods=tuple(g["methods"]),
            strategies=tuple(g.get("strategies", ("pooled",))),
            streams=tuple(g.get("streams", ("ability",))),
            seeds=tuple(int(s) for s in g.get("seeds", (0,))),
        )
        for g in data.get("grids", [])
    ]
    flags = [args.methods, args.strategies, args.streams, args.seeds]
    if any(f is not None for f in flags) or not grids:
        grids = [
            Grid(
                methods=_split_list(args.methods) or ("asr", "vanilla"),
                strategies=_split_list(args.strategies) or ("pooled",),
                streams=_split_list(args.streams) or ("ability",),
                seeds=tuple(int(s) for s in (_split_list(args.seeds) or ("0",))),
            )
        ]
    out = args.out or data.get("out")
    if not out:
        raise ValueError("`--out` (or `out:` in the spec) is required.")
    return StudySpec(
        out=Path(out).expanduser().resolve(),
        grids=grids,
        engine=args.engine or data.get("engine", "simulation"),
        overrides=[*data.get("overrides", []), *overrides],
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fed-asr-study",
        description="Run a grid of fed-asr experiments and write a comparison report.",
        epilog="Arguments after `--` are Hydra overrides common to every run.",
    )
    parser.add_argument(
        "--spec", help="YAML study spec (grids, engine, overrides, out)"
    )
    parser.add_argument("--methods", help="comma-separated, e.g. asr,vanilla,fedprox")
    parser.add_argument("--strategies", help="spectrum strategies, e.g. pooled,median")
    parser.add_argument("--streams", help="comma-separated, e.g. ability,domain")
    parser.add_argument("--seeds", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--engine", choices=("simulation", "central"))
    parser.add_argument("--out", help="study folder (runs/ and the report go there)")
    parser.add_argument("--timeout", type=float, help="seconds per cell (subprocess)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run cells in this process instead of subprocesses",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the cells and whether they are finished; run nothing",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the plots")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fed-asr-study``; returns the exit code (1 if a cell failed)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in args_list:
        cut = args_list.index("--")
        args_list, overrides = args_list[:cut], args_list[cut + 1 :]
    args = _parser().parse_args(args_list)
    try:
        spec = build_spec(args, overrides)
        cells = expand_cells(spec)
    except Exception as err:  # bad flags, spec or overrides: the reason, not a trace
        print(f"fed-asr-study: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for cell in cells:
            done = is_finished(cell, spec.out / RUNS_DIR / cell.name)
            print(f"{'finished' if done else 'to run  '} {cell.label} -> {cell.name}")
        return 0
    command = shlex.join(["fed-asr-study", *(sys.argv[1:] if argv is None else argv)])
    runner = inprocess_runner if args.in_process else subprocess_runner(args.timeout)
    results = run_study(
        spec, runner, header={"command": command}, plots=not args.no_plots
    )
    print(spec.out / "study.md")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
