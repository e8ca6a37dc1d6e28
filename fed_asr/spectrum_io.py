"""Safetensors files of skill statistics and spectra (skill names in the metadata)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

STATS_FORMAT = "fed-asr-skill-stats"
SPECTRUM_FORMAT = "fed-asr-skill-spectrum"


def save_arrays(
    arrays: Mapping[str, np.ndarray],
    skills: tuple[str, ...],
    fmt: str,
    path: str | Path,
) -> None:
    """Write float64 arrays and the skill names to a safetensors file."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    metadata = {"format": fmt, "skills": json.dumps(list(skills))}
    save_file(tensors, str(path), metadata=metadata)


def load_arrays(path: str | Path, fmt: str) -> tuple[dict[str, Tensor], list[str]]:
    """Read arrays and skill names written by ``save_arrays``."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != fmt or "skills" not in metadata:
            raise ValueError(
                f"{path}: not a {fmt} file (metadata `format` is "
                f"{metadata.get('format')!r})."
            )
        arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    return arrays, json.loads(metadata["skills"])
