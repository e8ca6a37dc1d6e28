"""Safetensors files of skill statistics and spectra (``fed_asr.spectrum_io``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fed_asr.spectrum_io import (
    METADATA_KEY,
    SPECTRUM_FORMAT,
    load_arrays,
    save_arrays,
)

SKILLS = ("color", "shape")
ARRAYS = {
    "mean": np.arange(12, dtype=np.float64).reshape(2, 6),
    "present": np.array([1.0, 0.0]),
}


def test_same_arrays_give_the_same_file_bytes(tmp_path: Path) -> None:
    # Execute: safetensors writes a metadata map in hash order, which varies from
    # one map to the next even within a process
    paths = [tmp_path / f"spectrum-{i}.safetensors" for i in range(8)]
    for path in paths:
        save_arrays(ARRAYS, SKILLS, SPECTRUM_FORMAT, path)

    # Assert
    assert len({path.read_bytes() for path in paths}) == 1


def test_round_trip_keeps_arrays_and_skills(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "spectrum.safetensors"

    # Execute
    save_arrays(ARRAYS, SKILLS, SPECTRUM_FORMAT, path)
    arrays, skills = load_arrays(path, SPECTRUM_FORMAT)

    # Assert
    assert skills == list(SKILLS)
    for key, value in ARRAYS.items():
        torch.testing.assert_close(arrays[key], torch.from_numpy(value))


def test_files_of_the_earlier_two_entry_layout_still_load(tmp_path: Path) -> None:
    # Prepare: `format` and `skills` as separate metadata entries
    path = tmp_path / "old.safetensors"
    tensors = {k: torch.from_numpy(v) for k, v in ARRAYS.items()}
    metadata = {"format": SPECTRUM_FORMAT, "skills": json.dumps(list(SKILLS))}
    save_file(tensors, str(path), metadata=metadata)

    # Execute
    _, skills = load_arrays(path, SPECTRUM_FORMAT)

    # Assert
    assert skills == list(SKILLS)


def test_unreadable_metadata_is_refused_naming_the_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "broken.safetensors"
    tensors = {k: torch.from_numpy(v) for k, v in ARRAYS.items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: "{not json"})

    # Execute / Assert
    with pytest.raises(ValueError, match="broken.safetensors: unreadable"):
        load_arrays(path, SPECTRUM_FORMAT)
