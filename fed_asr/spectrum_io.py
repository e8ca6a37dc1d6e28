"""Safetensors files of skill statistics and spectra (skill names in the metadata)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

STATS_FORMAT = "fed-asr-skill-stats"
SPECTRUM_FORMAT = "fed-asr-skill-spectrum"
METADATA_KEY = "fed-asr"


def save_arrays(
    arrays: Mapping[str, np.ndarray],
    skills: tuple[str, ...],
    fmt: str,
    path: str | Path,
) -> None:
    """Write float64 arrays and the skill names to a safetensors file.

    The format and skills travel as one metadata entry (``METADATA_KEY``): safetensors
    writes its metadata map in hash order, so with two entries two runs that compute
    the same tensors wrote files with different bytes.
    """
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    info = json.dumps({"format": fmt, "skills": list(skills)}, sort_keys=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: info})


def load_arrays(path: str | Path, fmt: str) -> tuple[dict[str, Tensor], list[str]]:
    """Read arrays and skill names written by ``save_arrays`` (or its older layout)."""
    with safe_open(str(path), framework="pt") as handle:
        info = _file_info(handle.metadata() or {}, path)
        if info.get("format") != fmt or not isinstance(info.get("skills"), list):
            raise ValueError(
                f"{path}: not a {fmt} file (metadata `format` is "
                f"{info.get('format')!r})."
            )
        arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    return arrays, [str(skill) for skill in info["skills"]]


def _file_info(metadata: Mapping[str, str], path: str | Path) -> dict[str, Any]:
    """``{"format": ..., "skills": [...]}`` of either metadata layout."""
    try:
        if METADATA_KEY in metadata:
            info = json.loads(metadata[METADATA_KEY])
            return info if isinstance(info, dict) else {}
        # files written before the single entry: `format` and `skills` (JSON list)
        skills = metadata.get("skills")
        return {
            "format": metadata.get("format"),
            "skills": json.loads(skills) if skills is not None else None,
        }
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: unreadable fed-asr metadata ({err}).") from None
