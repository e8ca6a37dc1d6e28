"""studies/run_cells.sh composes each cell's fed-asr overrides and resumes a grid.

A recording ``fed-asr`` stand-in on PATH writes the arguments it was called with,
so the script's own logic (shared settings, variants, seeds, skipping finished
cells, the scenes wrapper's defaults) is checked without training anything.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def recording_path(tmp_path: Path) -> str:
    """A PATH whose ``fed-asr`` writes its arguments to ``<output_dir>/args``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "fed-asr"
    recorder.write_text(
        "#!/usr/bin/env bash\n"
        'for a in "$@"; do\n'
        "  case $a in output_dir=*) out=${a#output_dir=} ;; esac\n"
        "done\n"
        'printf "%s\\n" "$@" > "$out/args"\n'
    )
    recorder.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def _run(script: str, out: Path, cells: list[str], path: str, **env: str) -> str:
    done = subprocess.run(
        ["bash", script, str(out), "2", *cells],
        cwd=REPO_ROOT,
        env={**os.environ, "PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _args(out: Path, cell: str) -> list[str]:
    return (out / cell / "args").read_text().split("\n")[:-1]


def test_cells_get_shared_settings_variant_and_seed(
    tmp_path: Path, recording_path: str
) -> None:
    out = tmp_path / "grid"
    _run(
        "studies/run_cells.sh",
        out,
        ["vanilla:0", "spectral_distill_w3:2"],
        recording_path,
        ENGINE="simulation",
        MODEL="tiny_vision",
        EXTRA="federation.num_clients=2 federation.schedule=fixed",
    )
    vanilla = _args(out, "vanilla-s0")
    assert vanilla[:5] == [
        "engine=simulation",
        "data=easyvqa",
        "data.stream=ability",
        "model=tiny_vision",
        "progress=false",
    ]
    assert "method=vanilla" in vanilla and "seed=0" in vanilla
    assert not any(a.startswith("lora.target_modules") for a in vanilla)
    weighted = _args(out, "spectral_distill_w3-s2")
    assert "method=spectral_distill" in weighted
    assert "method.options.weight=3.0" in weighted
    assert {"federation.num_clients=2", "federation.schedule=fixed"} <= set(weighted)
    assert "seed=2" in weighted
    assert weighted[-1] == f"output_dir={out / 'spectral_distill_w3-s2'}"


def test_finished_cells_are_skipped(tmp_path: Path, recording_path: str) -> None:
    out = tmp_path / "grid"
    (out / "asr-s1").mkdir(parents=True)
    (out / "asr-s1" / "metrics.json").write_text("{}")
    log = _run("studies/run_cells.sh", out, ["asr:1", "lwf:1"], recording_path)
    assert not (out / "asr-s1" / "args").exists()
    assert "method=lwf" in _args(out, "lwf-s1")
    assert "start lwf:1" in log and "asr:1" not in log


def test_scenes_wrapper_sets_scenes_defaults(
    tmp_path: Path, recording_path: str
) -> None:
    out = tmp_path / "scenes"
    _run("studies/scenes/run_central.sh", out, ["asr_hinge:0"], recording_path)
    args = _args(out, "asr_hinge-s0")
    assert args[:3] == ["engine=central", "data=scenes", "model=scenes_cpu"]
    assert "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]" in args
    assert "regularizer.spec_loss=hinge" in args
