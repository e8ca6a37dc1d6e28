"""Single-site continual run (``engine=central``): the paper's setting, no Flower."""

from __future__ import annotations

import time
from pathlib import Path

from fed_asr.baselines import fisher_sums, mean_fisher, update_memory
from fed_asr.config import ExperimentConfig
from fed_asr.data import build_stream
from fed_asr.lora_aggregation import get_lora_aggregation
from fed_asr.methods import StageMemory, build_method
from fed_asr.metrics import AccuracyMatrix
from fed_asr.models import VQACollator, adapter_state, load_base_model, resolve_device
from fed_asr.outputs import seed_everything, write_run_outputs
from fed_asr.progress import Progress
from fed_asr.spectrum import SkillSpectrum, blend
from fed_asr.train import accuracy, evaluate_samples, spectrum_statistics, train_stage


def run_central(cfg: ExperimentConfig) -> Path:
    """Train one site through every stage and write the run's outputs.

    Parameters
    ----------
    cfg : ExperimentConfig
        Full experiment config (``engine.name`` is not checked here).

    Returns
    -------
    Path
        Path of the written ``metrics.json``.
    """
    start = time.perf_counter()
    seed_everything(cfg.seed)
    stream = build_stream(cfg.data, cfg.seed)
    stage_names = [stage.name for stage in stream.stages]
    device = resolve_device(cfg.model.device)
    base, processor = load_base_model(cfg.model, stream.vocabulary(), device)
    model = get_lora_aggregation(cfg.lora.aggregation).attach(base, cfg.lora, cfg.seed)
    collator = VQACollator(processor, cfg.model.prompt_template, stream.answers)
    method = build_method(cfg.method, cfg.regularizer, cfg.model)
    matrix = AccuracyMatrix(len(stream.stages))
    spectrum: SkillSpectrum | None = None
    memory = StageMemory()
    curves: dict[str, list[tuple[float, float]]] = {name: [] for name in stage_names}
    stage_log = []
    overall = Progress("stages", len(stream.stages), cfg.progress)
    for t, stage in enumerate(stream.stages):
        method.configure_stage(spectrum, None, None)
        method.set_memory(model, memory)
        label = f"stage {t + 1}/{len(stage_names)} {stage.name}"
        steps = Progress(label, 1, cfg.progress)
        result = train_stage(
            model,
            collator,
            method.training_samples(stream.stages, t),
            stream.skills,
            method,
            cfg.train,
            cfg.regularizer,
            capture_mode=cfg.model.attn_capture,
            seed=cfg.seed * 1000 + t,
            progress=steps,
        )
        if method.uses_spectrum:
            stats = spectrum_statistics(
                model,
                collator,
                stage.train,
                stream.skills,
                cfg.regularizer,
                cfg.train.eval_batch_size,
                cfg.model.attn_capture,
            )
            spectrum = blend(
                spectrum,
                stats.to_prototypes(cfg.regularizer.cov_floor),
                mode=cfg.spectrum.blend,
                alpha=cfg.spectrum.alpha,
            )
        if t < len(stream.stages) - 1 and (
            method.needs_previous_adapter or method.needs_fisher
        ):
            fisher = None
            if method.needs_fisher:
                parts = fisher_sums(
                    model, collator, stage.train, cfg.method.ewc_fisher_batch_size
                )
                fisher = mean_fisher([parts])
            memory = update_memory(
                method, memory, adapter_state(model), fisher, cfg.method.ewc_decay
            )
        row = []
        for seen in stream.stages[: t + 1]:
            acc = accuracy(
                *evaluate_samples(model, collator, seen.test, cfg.train.eval_batch_size)
            )
            row.append(acc)
            curves[seen.name].append((t + 1, acc))
        matrix.set_row(t, row)
        stage_log.append(
            {
                "stage": stage.name,
                "steps": result.steps,
                "seconds": result.seconds,
                "losses": result.losses,
            }
        )
        overall.update(t + 1, f"{stage.name}: " + " ".join(f"{a:.3f}" for a in row))
    method.set_memory(model, StageMemory())  # drop per-stage state (the LwF teacher)
    extra = {
        "engine": "central",
        "method": cfg.method.name,
        "stream": stream.name,
        "seed": cfg.seed,
        "stage_log": stage_log,
        "wall_time_s": time.perf_counter() - start,
    }
    return write_run_outputs(
        cfg.output_dir,
        cfg,
        stage_names,
        matrix,
        model,
        spectrum,
        extra,
        curves=curves,
        curve_xlabel="after training stage",
    )
