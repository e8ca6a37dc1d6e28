"""The skill-partition coverage script: its share and its end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from fed_asr.data import ContinualStream, Stage, VQASample

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "studies" / "skill_partition" / "coverage.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("coverage_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _client(n_shape: int, n_color: int) -> ContinualStream:
    def samples(skill: str, n: int) -> list[VQASample]:
        return [VQASample(f"{skill}{i}", "q?", "a", skill=skill) for i in range(n)]

    stages = [
        Stage("shape", samples("shape", n_shape), []),
        Stage("color", samples("color", n_color), []),
    ]
    return ContinualStream("c", stages, ["a"], ["shape", "color"])


def test_unprotected_share_counts_later_training_without_the_earlier_skill() -> None:
    # Prepare: client 0 saw shape; clients 1 and 2 did not and train 30 + 10 colour
    shares = [_client(50, 60), _client(0, 30), _client(0, 10)]

    # Execute
    share = _load_script().unprotected_share(shares)

    # Assert
    assert share == [0.4]


def test_coverage_script_pairs_seeds_and_writes_json(tmp_path: Path) -> None:
    # Prepare: flat metrics copies of two variants on three seeds
    for seed, (a, b) in enumerate([(0.3, 0.4), (0.2, 0.2), (0.5, 0.3)]):
        for name, af in (("asr", a), ("asr_local", b)):
            path = tmp_path / f"{name}-s{seed}.json"
            path.write_text(json.dumps({"seed": seed, "metrics_type": {"AF": af}}))
    overrides = [
        "data.stage_order=[shape,color]",
        "data.max_train_per_stage=80",
        "data.max_test_per_stage=8",
        "data.dirichlet_alpha=0.1",
        "data.partition_by=skill",
    ]

    # Execute
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--against", "asr", "asr_local"]
        + overrides,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "coverage.json").read_text())
    assert [r["seed"] for r in summary["rows"]] == [0, 1, 2]
    assert [round(r["diff"], 3) for r in summary["rows"]] == [-0.1, 0.0, 0.2]
    for row in summary["rows"]:
        assert sum(map(sum, row["train_sizes"])) == 160
        assert 0.0 <= row["unprotected"][0] <= 1.0
    assert -1.0 <= summary["pearson_r"] <= 1.0
    assert "Pearson r" in done.stdout
    groups = summary["groups"]
    assert sorted(groups) == ["< 0.5", ">= 0.5"]
    assert sorted(groups["< 0.5"]["seeds"] + groups[">= 0.5"]["seeds"]) == [0, 1, 2]
