"""Single-site continual run (``engine=central``): the paper's setting, no Flower.

The one-client case of the federated run: the same :class:`StageSchedule` drives the
stages; this module only says how one site trains, collects and evaluates.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import Tensor

from fed_asr.adapter_aggregation import get_lora_aggregation
from fed_asr.config import ExperimentConfig
from fed_asr.data import ContinualStream, build_stream
from fed_asr.evaluation import DriftMonitor, probe_run_samples, score_stage
from fed_asr.learned import unlearned_skills, warn_unlearned
from fed_asr.methods import ContinualMethod, build_method
from fed_asr.metrics import AccuracyMatrix, SkillAccuracyMatrices
from fed_asr.models import (
    VQACollator,
    adapter_state,
    load_run_base_model,
    model_family,
    resolve_device,
    torch_threads,
)
from fed_asr.models.scoring import EVAL_PROTOCOLS, stream_skill_answers
from fed_asr.outputs import seed_everything, write_run_outputs
from fed_asr.progress import Progress
from fed_asr.schedule import ContinualState, StageEndInputs, StageSchedule
from fed_asr.tracking import NullTracker, Tracker, open_tracker, stage_scalars
from fed_asr.train import spectrum_statistics, train_stage


class CentralEngine:
    """One site: trains on its whole stream, evaluates after each stage."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        stream: ContinualStream,
        tracker: Tracker | None = None,
    ) -> None:
        self.cfg = cfg
        self.stream = stream
        self.tracker: Tracker = tracker or NullTracker()  # scalars after each stage
        device = resolve_device(cfg.model.device)
        base, processor = load_run_base_model(
            cfg.model, cfg.data, stream.vocabulary(), device
        )
        self.model: Any = get_lora_aggregation(cfg.lora.aggregation).attach(
            base, cfg.lora, cfg.seed
        )
        self.collator = VQACollator(
            processor,
            cfg.model.prompt_template,
            stream.answers,
            family=model_family(base),
            function_words=cfg.regularizer.function_words,
        )
        self.method: ContinualMethod = build_method(cfg.method, cfg.regularizer)
        self.names = [stage.name for stage in stream.stages]
        T = len(stream.stages)
        self.matrices = {p: AccuracyMatrix(T) for p in EVAL_PROTOCOLS}
        self.per_skill = {p: SkillAccuracyMatrices(T) for p in EVAL_PROTOCOLS}
        self.skill_answers = stream_skill_answers(stream)
        self.drift = DriftMonitor(stream.skills, cfg.regularizer.cov_floor)
        self.curves: dict[str, list[tuple[float, float]]] = {n: [] for n in self.names}
        self.stage_log: list[dict[str, Any]] = []
        self.confusion: list[dict[str, Any]] = []
        self.progress = Progress("stages", len(stream.stages), cfg.progress)

    def train_stage(self, stage: int, state: ContinualState) -> None:
        """Train ``stage`` on this site's data, then score every stage seen."""
        cfg, method = self.cfg, self.method
        method.configure_stage(state.spectrum)
        method.set_memory(self.model, state.memory)
        label = f"stage {stage + 1}/{len(self.names)} {self.names[stage]}"
        result = train_stage(
            self.model,
            self.collator,
            method.training_samples(self.stream.stages, stage),
            self.stream.skills,
            method,
            cfg.train,
            cfg.regularizer,
            capture_mode=cfg.model.attn_capture,
            seed=cfg.seed * 1000 + stage,
            progress=Progress(label, 1, cfg.progress),
        )
        self.stage_log.append(
            {
                "stage": self.names[stage],
                "steps": result.steps,
                "seconds": result.seconds,
                "losses": result.losses,
                "grad_ratios": result.grad_ratios,
            }
        )
        self._evaluate(stage)
        self.tracker.log_scalars(
            stage_scalars(
                stage,
                self.names,
                self.matrices["all"].to_list()[stage],
                result.losses,
                self.per_skill["all"],
                self.drift.rows,
            ),
            step=stage + 1,
        )

    def collect_stage_end(
        self, stage: int, state: ContinualState, query_clients: bool
    ) -> StageEndInputs:
        """This site's statistics of ``stage`` (spectrum and the method's own)."""
        cfg, samples = self.cfg, self.stream.stages[stage].train
        inputs = StageEndInputs()
        plan = self.method.stage_end
        if plan.spectrum != "none":
            inputs.spectrum_parts.append(
                spectrum_statistics(
                    self.model,
                    self.collator,
                    samples,
                    self.stream.skills,
                    cfg.regularizer,
                    cfg.train.eval_batch_size,
                    cfg.model.attn_capture,
                )
            )
        if stage < len(self.names) - 1:
            for name in plan.statistics:
                inputs.statistics[name] = [
                    self.method.stage_end_statistics(
                        name, self.model, self.collator, samples
                    )
                ]
        return inputs

    def global_adapter(self) -> dict[str, Tensor]:
        """The site's adapter (it is the global one)."""
        return adapter_state(self.model)

    def stage_end_done(self, stage: int, state: ContinualState) -> None:
        """Nothing to checkpoint in a central run."""

    def _evaluate(self, stage: int) -> None:
        """Row ``stage`` of every protocol's matrix, per skill; drift and grounding."""
        cfg = self.cfg
        rows: dict[str, list[float]] = {p: [] for p in EVAL_PROTOCOLS}
        if cfg.train.diagnostics:
            self.drift.record(stage, self._probe(self.stream.stages[stage].train))
        for i, seen in enumerate(self.stream.stages[: stage + 1]):
            scores = score_stage(
                self.model,
                self.collator,
                seen.test,
                cfg.train.eval_batch_size,
                self.skill_answers,
            )
            for protocol in EVAL_PROTOCOLS:
                rows[protocol].append(scores.accuracy(protocol))
                self.per_skill[protocol].add(stage, i, scores.per_skill[protocol])
            self.curves[seen.name].append((stage + 1, scores.accuracy("all")))
            self.confusion.append(
                {"after_stage": stage, "stage": i, "skills": scores.confusion}
            )
            if cfg.train.diagnostics:
                self.drift.measure(stage, i, self._probe(seen.test, keep_maps=True))
        for protocol, row in rows.items():
            self.matrices[protocol].set_row(stage, row)
        shown = " ".join(f"{a:.3f}" for a in rows["all"])
        typed = " ".join(f"{a:.3f}" for a in rows["type"])
        self.progress.update(
            stage + 1, f"{self.names[stage]}: {shown} (type protocol: {typed})"
        )

    def _probe(self, samples: Any, keep_maps: bool = False) -> Any:
        return probe_run_samples(
            self.model, self.collator, samples, self.cfg, keep_maps
        )

    def report(self) -> dict[str, Any]:
        """The mechanism's view for ``metrics.json`` (besides the ``all`` matrix)."""
        done = self.matrices["all"].completed_rows
        unlearned = unlearned_skills(
            self.per_skill["type"], self.skill_answers, self.names[:done]
        )
        warn_unlearned(unlearned)
        return {
            "accuracy_matrix_type": self.matrices["type"].to_list(),
            "unlearned_skills": unlearned,
            "metrics_type": self.matrices["type"].summary().as_dict(),
            "per_skill": {
                p: m.to_json(done) for p, m in self.per_skill.items() if m.skills
            },
            "drift": self.drift.rows,
            "answer_confusion": self.confusion,
        }


def run_central(cfg: ExperimentConfig) -> Path:
    """Train one site through every stage and write the run's outputs.

    Computes on ``train.torch_threads`` CPU threads (restored afterwards).

    Parameters
    ----------
    cfg : ExperimentConfig
        Full experiment config (``engine.name`` is not checked here).

    Returns
    -------
    Path
        Path of the written ``metrics.json``.
    """
    with torch_threads(cfg.train.torch_threads):
        return _run_central(cfg)


def _run_central(cfg: ExperimentConfig) -> Path:
    start = time.perf_counter()
    seed_everything(cfg.seed)
    stream = build_stream(cfg.data, cfg.seed)
    tracker = open_tracker(cfg)  # flushes after every stage
    engine = CentralEngine(cfg, stream, tracker)
    schedule = StageSchedule(
        engine.method, len(stream.stages), cfg.spectrum, cfg.regularizer.cov_floor
    )
    state = schedule.run(engine, ContinualState())
    engine.method.set_memory(engine.model, {})  # drop per-stage state (LwF teacher)
    extra = {
        "engine": "central",
        "method": cfg.method.name,
        "stream": stream.name,
        "seed": cfg.seed,
        "stage_log": engine.stage_log,
        **engine.report(),
        "wall_time_s": time.perf_counter() - start,
    }
    path = write_run_outputs(
        cfg.output_dir,
        cfg,
        engine.names,
        engine.matrices["all"],
        engine.model,
        state.spectrum,
        extra,
        curves=engine.curves,
        curve_xlabel="after training stage",
    )
    tracker.close()
    return path
