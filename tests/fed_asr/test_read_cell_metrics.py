"""Reading a grid of runs: run folders first, then flat archived copies."""

from __future__ import annotations

import json
from pathlib import Path

from fed_asr.outputs import read_cell_metrics


def test_read_cell_metrics_groups_folders_and_flat_copies_by_variant(
    tmp_path: Path,
) -> None:
    # Prepare: a run folder, flat copies, and files that are not cells
    (tmp_path / "asr-s1").mkdir()
    (tmp_path / "asr-s1" / "metrics.json").write_text(json.dumps({"seed": 1}))
    (tmp_path / "asr-s0.json").write_text(json.dumps({"seed": 0}))
    (tmp_path / "asr_local-s0.json").write_text(json.dumps({"seed": 0}))
    (tmp_path / "summary.json").write_text("[]")
    (tmp_path / "asr-s2").mkdir()  # an unfinished run: no metrics.json yet

    # Execute
    runs = read_cell_metrics(tmp_path)

    # Assert
    assert runs == {"asr": [{"seed": 1}, {"seed": 0}], "asr_local": [{"seed": 0}]}
