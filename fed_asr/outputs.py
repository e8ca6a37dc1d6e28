"""Run outputs of every engine: config, metrics.json, adapter, spectrum, plots."""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fed_asr.config import ExperimentConfig, to_yaml
from fed_asr.metrics import AccuracyMatrix
from fed_asr.models.fingerprint import base_fingerprint
from fed_asr.plots import (
    plot_accuracy_matrix,
    plot_drift_curves,
    plot_forgetting_curves,
)
from fed_asr.spectrum import SkillSpectrum

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
SPECTRUM_FILE = "spectrum.safetensors"
HEATMAP_FILE = "accuracy_matrix.png"
CURVES_FILE = "forgetting_curves.png"
DRIFT_FILE = "drift_curves.png"


def read_cell_metrics(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """The ``metrics.json`` of each ``<variant>-s<seed>`` run in ``folder``, by variant.

    Reads the run folders ``studies/run_cells.sh`` writes
    (``<variant>-s<seed>/metrics.json``), then flat archived copies
    (``<variant>-s<seed>.json``), each group in name order.
    """
    runs: dict[str, list[dict[str, Any]]] = {}
    folders = sorted(folder.glob(f"*-s*/{METRICS_FILE}"))
    for path in folders + sorted(folder.glob("*-s*.json")):
        name = path.parent.name if path.name == METRICS_FILE else path.stem
        runs.setdefault(name.rsplit("-s", 1)[0], []).append(
            json.loads(path.read_text())
        )
    return runs


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_run_outputs(
    out_dir: str | Path,
    cfg: ExperimentConfig,
    stage_names: Sequence[str],
    matrix: AccuracyMatrix,
    model: Any,
    spectrum: SkillSpectrum | None,
    extra: Mapping[str, Any],
    curves: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    curve_xlabel: str = "stage",
    stage_boundaries: Sequence[float] = (),
) -> Path:
    """Write every artefact of a finished run and return the ``metrics.json`` path.

    Parameters
    ----------
    out_dir : str | Path
        Created if missing.
    cfg : ExperimentConfig
        Saved resolved as ``config.yaml`` (also inside the adapter directory).
    stage_names : Sequence[str]
        Stage order of the accuracy matrix.
    matrix : AccuracyMatrix
        Filled accuracy matrix.
    model : Any
        Peft model whose adapter is saved with ``save_pretrained`` and whose frozen
        base is fingerprinted as ``base_fingerprint`` (None to skip both).
    spectrum : SkillSpectrum | None
        Final global skill spectrum (safetensors), when the method has one.
    extra : Mapping[str, Any]
        More JSON fields (per-client matrices, rounds, wall time, ...).
    curves : Mapping[str, Sequence[tuple[float, float]]] | None
        Accuracy of each stage over time, plotted as forgetting curves.
    curve_xlabel, stage_boundaries
        Axis label and vertical markers of the forgetting plot.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_yaml = to_yaml(cfg)
    atomic_write_text(out / CONFIG_FILE, config_yaml)
    if model is not None:
        model.save_pretrained(out / ADAPTER_DIR)
        atomic_write_text(out / ADAPTER_DIR / "fed_asr_config.yaml", config_yaml)
    if spectrum is not None:
        spectrum.save(out / SPECTRUM_FILE)
    rows = matrix.to_list()
    metrics: dict[str, Any] = {
        "stages": list(stage_names),
        "accuracy_matrix": rows,
        **matrix.summary().as_dict(),
        **extra,
    }
    if model is not None:  # which base the run started from (models/fingerprint.py)
        metrics["base_fingerprint"] = base_fingerprint(model)
    plot_accuracy_matrix(
        rows,
        stage_names,
        out / HEATMAP_FILE,
        title=f"{cfg.method.name}: accuracy matrix",
    )
    if curves:
        plot_forgetting_curves(
            curves,
            out / CURVES_FILE,
            xlabel=curve_xlabel,
            stage_boundaries=stage_boundaries,
        )
    if extra.get("drift"):
        plot_drift_curves(extra["drift"], stage_names, out / DRIFT_FILE)
    path = out / METRICS_FILE
    atomic_write_text(
        path, json.dumps(metrics, indent=2, allow_nan=False, default=_json_default)
    )
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot serialise {type(value).__name__} to JSON.")
