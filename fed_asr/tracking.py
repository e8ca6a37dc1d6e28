"""Experiment tracking: per-round scalars to TensorBoard, Weights & Biases or MLflow.

``tracking=none|tensorboard|wandb|mlflow`` (the ``configs/tracking`` group) picks a
backend; :func:`open_tracker` builds it for a run. Every backend implements the
small :class:`Tracker` protocol, ``log_scalars(scalars, step)`` and ``close()``. The
engines hand it flat ``{tag: value}`` dicts: the federated run one per global round
(:func:`round_scalars`, from the round log of ``metrics.json``) and the spectral drift
after each stage (:func:`drift_scalars`), the central engine one per stage
(:func:`stage_scalars`).

Where the files go: ``<tracking.dir>/<tracking.run_name>``, by default
``<output_dir>/tracking``. The study runner points every cell at one folder (one
subfolder per cell), so ``tensorboard --logdir <study>/tracking`` compares them.
Weights & Biases and MLflow are optional extras (``pip install -e ".[wandb]"``,
``".[mlflow]"``), imported only when picked, and run offline: W&B in offline mode
under the run folder (``wandb sync`` uploads it later), MLflow in a file store there
(``mlflow ui --backend-store-uri <folder>/mlruns``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fed_asr import protocol as P
from fed_asr.config_sections import check_choice

if TYPE_CHECKING:
    from fed_asr.config import ExperimentConfig
    from fed_asr.metrics import SkillAccuracyMatrices

__all__ = [
    "TRACKING_BACKENDS",
    "Tracker",
    "TrackingConfig",
    "check_tracking_backend",
    "drift_scalars",
    "open_tracker",
    "round_scalars",
    "stage_scalars",
    "tracking_run_dir",
]

TRACKING_BACKENDS = ("none", "tensorboard", "wandb", "mlflow")
# Backend -> (module it needs, the extra of pyproject.toml that installs it)
_PACKAGES = {
    "tensorboard": ("tensorboard", None),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


@dataclass
class TrackingConfig:
    """Where and how the run's per-round scalars are tracked."""

    backend: str = "tensorboard"
    # None: <output_dir>/tracking; else <dir>/<run_name> (the study runner's choice)
    dir: str | None = None
    # None: the name of the output folder
    run_name: str | None = None
    # W&B project / MLflow experiment
    project: str = "fed-asr"

    def __post_init__(self) -> None:
        check_choice("tracking.backend", self.backend, TRACKING_BACKENDS)


def check_tracking_backend(cfg: TrackingConfig) -> None:
    """Raise unless the package of ``cfg.backend`` is installed (nothing imported).

    Raises
    ------
    ValueError
        The backend's package is missing; the message says how to install it.
    """
    if cfg.backend not in _PACKAGES:
        return
    module, extra = _PACKAGES[cfg.backend]
    if importlib.util.find_spec(module) is None:
        how = f'pip install -e ".[{extra}]"' if extra else f"pip install {module}"
        raise ValueError(
            f"`tracking={cfg.backend}` needs the `{module}` package, which is not "
            f"installed: {how} (or pick `tracking=none`)."
        )


class Tracker(Protocol):
    """What the engines call: scalars per step, then ``close`` once."""

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Record ``{tag: value}`` at ``step`` (non-finite values are skipped)."""

    def close(self) -> None:
        """Flush and release the backend."""


class NullTracker:
    """``tracking=none``: records nothing."""

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Drop the scalars."""

    def close(self) -> None:
        """Nothing to release."""


class TensorBoardTracker:
    """Event files of ``torch.utils.tensorboard.SummaryWriter`` in ``log_dir``."""

    def __init__(self, log_dir: Path, config_yaml: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("config", f"```yaml\n{config_yaml}```")

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Add each finite scalar at ``step`` and flush (a crash keeps the curve)."""
        for tag, value in _finite(scalars).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()


class WandbTracker:
    """An offline Weights & Biases run under ``log_dir`` (``wandb sync`` uploads)."""

    def __init__(self, log_dir: Path, name: str, project: str, config: dict) -> None:
        import wandb

        self.run = wandb.init(
            project=project, name=name, dir=str(log_dir), mode="offline", config=config
        )

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Log the finite scalars at ``step``."""
        self.run.log(_finite(scalars), step=step)

    def close(self) -> None:
        """Finish the run."""
        self.run.finish()


class MlflowTracker:
    """An MLflow run in the file store ``<log_dir>/mlruns`` (no server needed)."""

    def __init__(self, log_dir: Path, name: str, project: str, config: dict) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=(log_dir / "mlruns").as_uri())
        found = self.client.get_experiment_by_name(project)
        experiment = (
            found.experiment_id if found else self.client.create_experiment(project)
        )
        self.run_id = self.client.create_run(experiment, run_name=name).info.run_id
        for key, value in _flatten(config).items():
            self.client.log_param(self.run_id, key, str(value)[:500])

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Log the finite scalars at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in _finite(scalars).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        """Mark the run finished."""
        self.client.set_terminated(self.run_id)


def tracking_run_dir(cfg: TrackingConfig, output_dir: str | Path) -> Path:
    """The folder of a run's tracking files (module docstring)."""
    out = Path(output_dir).expanduser()
    if cfg.dir is None:
        return out / "tracking"
    return Path(cfg.dir).expanduser() / (cfg.run_name or out.name)


def open_tracker(cfg: ExperimentConfig) -> Tracker:
    """The tracker ``cfg.tracking`` asks for, its folder created.

    Parameters
    ----------
    cfg : ExperimentConfig
        The run's config (``tracking``, ``output_dir``; all of it is recorded with
        the run: TensorBoard text, W&B config, MLflow parameters).

    Returns
    -------
    Tracker
        Call ``close()`` when the run ends.

    Raises
    ------
    ValueError
        The backend's package is not installed.
    """
    from fed_asr.config import to_yaml  # fed_asr.config imports this module

    tracking = cfg.tracking
    if tracking.backend == "none":
        return NullTracker()
    check_tracking_backend(tracking)
    log_dir = tracking_run_dir(tracking, cfg.output_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    name = tracking.run_name or Path(cfg.output_dir).name
    if tracking.backend == "tensorboard":
        return TensorBoardTracker(log_dir, to_yaml(cfg))
    backends: dict[str, Callable[..., Tracker]] = {
        "wandb": WandbTracker,
        "mlflow": MlflowTracker,
    }
    return backends[tracking.backend](
        log_dir, name, tracking.project, dataclasses.asdict(cfg)
    )


def round_scalars(
    round_log: Mapping[str, Any], stage_names: Sequence[str]
) -> dict[str, float]:
    """Scalars of one federated round, from its ``metrics.json`` ``rounds`` entry.

    Tags: ``loss/<term>`` (pooled), ``accuracy/<stage>`` and ``accuracy/mean_seen``,
    ``accuracy_skill/<stage>/<skill>`` (pooled counts), ``bytes/up``, ``bytes/down``
    and ``bytes/<counter>``, ``clients/{sampled,answered,dropped,failures}``,
    ``time/round_s`` and ``stage`` (1-based).
    """
    out: dict[str, float] = {"stage": round_log["stage"] + 1}
    for term, value in round_log.get("losses", {}).items():
        out[f"loss/{term}"] = value
    accuracy = round_log.get("accuracy", {})
    for stage, value in accuracy.items():
        out[f"accuracy/{stage_names[int(stage)]}"] = value
    if accuracy:
        out["accuracy/mean_seen"] = sum(accuracy.values()) / len(accuracy)
    counts: Mapping[str, int] = round_log.get("counts", {})
    for key, total in counts.items():
        if not key.startswith(P.TOTAL_PREFIX) or not total:
            continue
        stage_skill = key[len(P.TOTAL_PREFIX) :].split("-", 1)  # <stage>-<skill>
        if len(stage_skill) != 2:
            continue
        stage, skill = int(stage_skill[0]), stage_skill[1]
        correct = counts.get(P.correct_key(stage, "all", skill), 0)
        out[f"accuracy_skill/{stage_names[stage]}/{skill}"] = correct / total
    for direction in ("up", "down"):
        fields = [k for k in round_log if k.startswith(f"bytes_{direction}_")]
        out[f"bytes/{direction}"] = sum(round_log[k] for k in fields)
        out.update({f"bytes/{k[len('bytes_') :]}": round_log[k] for k in fields})
    out["clients/sampled"] = round_log.get("clients_sampled", 0)
    out["clients/answered"] = round_log.get("clients_answered", 0)
    out["clients/dropped"] = len(round_log.get("dropped", []))
    out["clients/failures"] = round_log.get("failures", 0)
    out["time/round_s"] = round_log.get("seconds", 0.0)
    return out


def stage_scalars(
    stage: int,
    stage_names: Sequence[str],
    accuracy_row: Sequence[float | None],
    losses: Mapping[str, float],
    per_skill: SkillAccuracyMatrices | None = None,
    drift_rows: Sequence[Mapping[str, Any]] = (),
) -> dict[str, float]:
    """Scalars of the central engine after training ``stage`` (0-based).

    Tags: ``loss/<term>`` (the stage's mean), ``accuracy/<stage>`` of every stage
    seen and ``accuracy/mean_seen``, ``accuracy_skill/<stage>/<skill>``,
    ``drift/<stage>`` (mean spectral drift of an earlier stage's test data),
    ``map_shift/<stage>`` (KL of its maps from those at its stage's end) and
    ``grounding/<stage>`` (grounding share).
    """
    out: dict[str, float] = {f"loss/{term}": v for term, v in losses.items()}
    seen = [(stage_names[i], a) for i, a in enumerate(accuracy_row[: stage + 1])]
    out.update({f"accuracy/{name}": a for name, a in seen if a is not None})
    measured = [a for _, a in seen if a is not None]
    if measured:
        out["accuracy/mean_seen"] = sum(measured) / len(measured)
    for skill in per_skill.skills if per_skill is not None else ():
        row = per_skill.matrix(skill)[stage]  # type: ignore[union-attr]
        for i in range(stage + 1):
            out[f"accuracy_skill/{stage_names[i]}/{skill}"] = float(row[i])
    out.update(drift_scalars(drift_rows, stage_names, stage))
    return out


def drift_scalars(
    drift_rows: Sequence[Mapping[str, Any]], stage_names: Sequence[str], after: int
) -> dict[str, float]:
    """``drift/``, ``map_shift/`` and ``grounding/<stage>`` of the rows after ``after``.

    The rows are ``metrics.json``'s ``drift`` entries (``after_stage``, ``stage``,
    ``drift_mean``, ``map_shift``, ``grounding_share``), from either engine; a value
    a row lacks is left out.
    """
    tags = (
        ("drift", "drift_mean"),
        ("map_shift", "map_shift"),
        ("grounding", "grounding_share"),
    )
    out: dict[str, float] = {}
    for row in drift_rows:
        if row.get("after_stage") != after:
            continue
        name = stage_names[row["stage"]]
        for tag, key in tags:
            if row.get(key) is not None:
                out[f"{tag}/{name}"] = row[key]
    return out


def _finite(scalars: Mapping[str, float]) -> dict[str, float]:
    """The scalars that are finite numbers, as floats."""
    out = {}
    for tag, value in scalars.items():
        number = float(value)
        if math.isfinite(number):
            out[tag] = number
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
