"""``bench_step --family``: the per-family step-time table on tiny checkpoints.

No timing is asserted (the machine is shared); only that every variant of a
family's tiny checkpoints ran a real training step and the JSON holds the ratios.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import bench_step
from benchmarks.step_families import FAMILY_VARIANTS, family_kinds


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """The benchmark sets torch's thread count; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_step_family_writes_a_row_per_variant_with_asr_losses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    out = tmp_path / "families.json"

    # Execute
    code = bench_step.main(["--family", "idefics3", "--quick", "--out", str(out)])

    # Assert: one row per variant, the ASR ones with a spectral loss term
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert code == 0 and sorted(rows) == sorted(FAMILY_VARIANTS)
    assert {r["kind"] for r in result["rows"]} == {"idefics3"}
    assert rows["vanilla"]["ratio_vs_vanilla"] == 1.0
    assert all(
        math.isfinite(r["median_s"]) and r["median_s"] > 0 for r in rows.values()
    )
    assert "spec" in rows["asr_spec_selective"]["losses"]
    assert rows["asr_spec_selective"]["grid"] == "4x4"
    assert "idefics3" in capsys.readouterr().out


def test_bench_step_unknown_family_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Execute
    code = bench_step.main(["--family", "idefix"])

    # Assert
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "`--family` must be 'all' or one of" in err and "'idefix'" in err
    assert family_kinds("all")[-2:] == ["idefics3", "llava_onevision"]
