"""Export an embedded stream as a manifest folder (``data=manifest``).

Usage: python studies/manifest_check/export_stream.py OUT_DIR [KEY=VALUE ...]
with Hydra overrides of the data config, e.g. ``data.stream=domain seed=3``.
Writes ``stage_<k>_{train,test}.jsonl`` with the images copied into ``OUT_DIR/images``
(paths relative to the folder) and ``stages.json``. The skill of each row is written
only when the stream labels it explicitly; otherwise the manifest reader infers it.
Used by docs/findings.md to check the federated defaults on a manifest whose stages
they were not tuned on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from fed_asr.config import compose_config
from fed_asr.data.samples import VQASample
from fed_asr.data.streams import build_stream


def _row(sample: VQASample, images: Path, root: Path) -> dict[str, str]:
    source = Path(sample.image)
    digest = hashlib.sha1(str(source).encode()).hexdigest()[:16]
    target = images / f"{digest}{source.suffix}"
    if not target.exists():
        shutil.copyfile(source, target)
    row = {
        "image": str(target.relative_to(root)),
        "question": sample.question,
        "answer": sample.answer,
    }
    if sample.skill is not None:
        row["skill"] = sample.skill
    return row


def export(out: Path, overrides: list[str]) -> None:
    """Write the stream selected by ``overrides`` as a manifest folder under ``out``."""
    cfg = compose_config("config", overrides)
    stream = build_stream(cfg.data, cfg.seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k, stage in enumerate(stream.stages):
        for split in ("train", "test"):
            rows = [_row(s, images, out) for s in getattr(stage, split)]
            lines = "".join(json.dumps(r) + "\n" for r in rows)
            (out / f"stage_{k}_{split}.jsonl").write_text(lines, encoding="utf-8")
    names = [stage.name for stage in stream.stages]
    (out / "stages.json").write_text(json.dumps(names), encoding="utf-8")
    rows = stream.num_samples("train")
    print(f"{out}: {len(names)} stages {names}, {rows} train rows")


if __name__ == "__main__":
    export(Path(sys.argv[1]), sys.argv[2:])
