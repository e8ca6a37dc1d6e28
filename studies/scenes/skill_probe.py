"""Can the base learn one skill at all? Train LoRA on that skill alone and watch it.

Usage: python studies/scenes/skill_probe.py OUT.json SKILL [--stage K] [--epochs E]
           [hydra overrides ...]
e.g.   python studies/scenes/skill_probe.py out/shape.json shape --epochs 8 \\
           data=scenes model=scenes_cpu "lora.target_modules=[q_proj,k_proj]"

Builds the run's base and adapter exactly as ``engine=central`` does (same
preparation cache), keeps only SKILL's questions of stage K (train and test), and
trains them with the task loss (``method=vanilla`` unless overridden) one epoch at
a time, scoring SKILL's test questions under the ``type`` protocol before
training and after every epoch. A skill still at chance after many epochs of its
own data is beyond the base (its resolution or capacity), not forgotten.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from base_engine import central_engine

from fed_asr.evaluation import score_stage
from fed_asr.models.scoring import sample_skill
from fed_asr.train import train_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("skill")
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    stream, engine = central_engine(args.overrides)
    cfg = engine.cfg
    stage = stream.stages[args.stage]
    train = [s for s in stage.train if sample_skill(s) == args.skill]
    test = [s for s in stage.test if sample_skill(s) == args.skill]
    if not train or not test:
        raise SystemExit(f"No {args.skill!r} questions in stage {stage.name!r}.")
    answers = engine.skill_answers[args.skill]

    def accuracy() -> float:
        scores = score_stage(
            engine.model,
            engine.collator,
            test,
            cfg.train.eval_batch_size,
            engine.skill_answers,
        )
        return scores.accuracy("type")

    curve = [{"epoch": 0, "accuracy": accuracy(), "seconds": 0.0}]
    print(
        f"{args.skill} ({len(answers)} answers, chance {1 / len(answers):.3f}), "
        f"stage {stage.name}: {len(train)} train / {len(test)} test"
    )
    print(f"epoch 0: {curve[0]['accuracy']:.3f}")
    engine.method.set_memory(engine.model, {})
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        result = train_stage(
            engine.model,
            engine.collator,
            train,
            stream.skills,
            engine.method,
            cfg.train,
            cfg.regularizer,
            capture_mode=cfg.model.attn_capture,
            epochs=1,
            seed=cfg.seed * 1000 + epoch,
        )
        row = {
            "epoch": epoch,
            "accuracy": accuracy(),
            "task_loss": result.losses.get("task"),
            "seconds": time.perf_counter() - start,
        }
        curve.append(row)
        print(
            f"epoch {epoch}: {row['accuracy']:.3f} (task loss {row['task_loss']:.3f})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "skill": args.skill,
                "stage": stage.name,
                "answers": list(answers),
                "chance": 1 / len(answers),
                "train": len(train),
                "test": len(test),
                "overrides": args.overrides,
                "curve": curve,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
