"""Smoke tests of the benchmark scripts: each core function on its smallest setting.

No timing is asserted (the machine is shared); only that the benchmarks run and
produce well-formed, plausible numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import bench_comm, bench_sim, bench_spectral, bench_step
from benchmarks.common import format_table, machine_info, write_json
from fed_asr.config import compose_config

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """The benchmarks set torch's thread count; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_step_smallest_grid_times_every_variant_and_measures_memory() -> None:
    # Prepare
    setup = bench_step.build_setup(image_size=32, batch_size=2)
    # Execute
    timed = bench_step.time_variants(setup, bench_step.VARIANTS, warmup=0, repeat=1)
    memory = bench_step.measure_memory(32, "asr_full_selective", 2, steps=1)
    # Assert
    assert setup.grid == (8, 8)
    assert bool(setup.spectrum.present.any())  # the spectral term is active
    assert set(timed) == {v.name for v in bench_step.VARIANTS}
    assert all(r["median_s"] > 0 for r in timed.values())
    assert "spec" in timed["asr_spec_selective"]["losses"]
    assert "geo" not in timed["asr_spec_selective"]["losses"]
    assert "geo" in timed["asr_full_eager"]["losses"]
    assert timed["vanilla"]["losses"].keys() == {"task", "total"}
    assert memory["peak_mib"] >= memory["baseline_mib"] > 0


def test_bench_step_check_targets_ratios_of_medians() -> None:
    # Prepare
    rows = [
        {"image_size": 96, "variant": "vanilla", "median_s": 1.0, "peak_mib": 1.0},
        {
            "image_size": 96,
            "variant": "asr_spec_selective",
            "median_s": 1.1,
            "peak_mib": 2.0,
        },
        {
            "image_size": 96,
            "variant": "asr_spec_eager",
            "median_s": 3.3,
            "peak_mib": 3.0,
        },
    ]
    # Execute
    targets = bench_step.check_targets(rows, 96)
    # Assert
    assert targets["asr_spec_selective_over_vanilla"] == pytest.approx(1.1)
    assert targets["target_spec_over_vanilla_met"] is True
    assert targets["eager_over_selective_spec"] == pytest.approx(3.0)
    assert targets["target_selective_2x_faster_met"] is True
    assert targets["selective_lower_peak_memory_spec"] is True
    assert targets["selective_lower_peak_memory_full"] is None  # not measured


def test_bench_spectral_smallest_grid_gives_throughput_and_share() -> None:
    # Prepare / Execute
    result = bench_spectral.run_benchmark(
        grids=[8], batch=2, warmup=0, repeat=1, model_repeat=1
    )
    # Assert
    (row,) = result["rows"]
    assert row["attn_shape"][:3] == [2, 4, 4] and row["attn_shape"][-1] == 64
    assert row["maps"] == 2 * 4 * 4
    assert row["maps_per_s"] > 0 and row["model_fwd_ms"] > 0
    assert 0 < row["describe_share_of_fwd"] < 10
    assert result["settings"]["threads"] == 1


def test_bench_comm_counts_tiny_and_llava7b_payloads() -> None:
    # Prepare / Execute
    result = bench_comm.run_benchmark(rounds_per_stage=2, include_7b=True)
    # Assert
    tiny, big = result["rows"]
    # LoRA r=8 on q_proj/v_proj: r * (in + out) per module, 2 modules per layer
    assert tiny["lora_parameters"] == 4 * 2 * 8 * (128 + 128)
    assert tiny["adapter_raw_bytes"] == 4 * tiny["lora_parameters"]
    assert big["parameters"] == 7_063_427_072  # LLaVA-1.5-7B
    assert big["lora_parameters"] == 32 * 2 * 8 * (4096 + 4096)
    assert tiny["stats_raw_bytes"] == 8 * (4 + 4 * (54 + 54 + 8))  # S=4, float64
    # the spectrum travels in float32: half the stats' float64 bytes
    assert 2 * tiny["spectrum_raw_bytes"] == tiny["stats_raw_bytes"]
    assert result["targets"]["target_spectrum_le_2pct_of_adapter_tiny_met"] is True
    assert result["targets"]["target_adapter_le_5pct_of_full_tiny_met"] is True
    assert result["targets"]["target_spectrum_le_2pct_of_adapter_7b_met"] is True


def test_bench_sim_helpers_compose_config_fit_growth_and_sample_rss(
    tmp_path: Path,
) -> None:
    # Prepare
    overrides = bench_sim.sim_overrides(8, tmp_path / "out", tmp_path / "cache")
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; x = b'x' * (50 * 2**20); time.sleep(10)"]
    )
    # Execute
    cfg = compose_config("config", overrides)
    linear = bench_sim.fit_growth([4, 8, 16, 32], [2.0, 4.0, 8.0, 16.0])
    quadratic = bench_sim.fit_growth([4, 8, 16, 32], [1.0, 4.0, 16.0, 64.0])
    sampler = bench_sim.RssSampler(os.getpid(), interval_s=0.1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sampler.peaks.get(child.pid, 0.0) <= 40:
        sampler.sample()
        time.sleep(0.1)
    child.kill()
    child.wait()
    # Assert
    assert cfg.federation.num_clients == 8
    assert cfg.federation.client_cpus == 1
    assert cfg.federation.schedule == "fixed"  # the rounds asked for, no plateau
    # A cross-device size really samples 10%: Flower trains max(0.1 N, min nodes)
    big = compose_config(
        "config",
        bench_sim.sim_overrides(
            100, tmp_path / "o", tmp_path / "c", extra=bench_sim.sampling_overrides(100)
        ),
    )
    assert big.federation.fraction_train == 0.1
    assert big.federation.min_available_clients == 10
    assert cfg.data.max_train_per_stage == 8 * 40
    assert cfg.data.stage_order == ["shape"]
    assert cfg.method.name == "vanilla"
    assert linear["exponent"] == pytest.approx(1.0)
    assert linear["slope_s_per_client"] == pytest.approx(0.5)
    assert linear["at_most_linear"] is True
    assert quadratic["exponent"] == pytest.approx(2.0)
    assert quadratic["at_most_linear"] is False
    assert sampler.peaks[child.pid] > 40  # MiB: the child's 50 MiB buffer


def test_bench_sim_load_hook_wraps_load_base_model(tmp_path: Path) -> None:
    # Prepare
    env = {
        **os.environ,
        bench_sim.LOAD_LOG_ENV: str(tmp_path / "loads.jsonl"),
        "PYTHONPATH": str(bench_sim.LOAD_HOOK_DIR),
    }
    code = (
        "import fed_asr.models as m; print(hasattr(m.load_base_model, '__wrapped__'))"
    )
    # Execute
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Assert
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_common_write_json_and_table_include_machine_info(tmp_path: Path) -> None:
    # Prepare
    payload = {"machine": machine_info(), "rows": [{"a": 1.23456, "b": "x"}]}
    # Execute
    path = write_json(tmp_path / "r.json", payload)
    table = format_table(payload["rows"], ["a", "b"])
    # Assert
    loaded = json.loads(path.read_text())
    assert loaded["machine"]["cpu_count"] == os.cpu_count()
    assert loaded["machine"]["torch_threads"] >= 1
    assert "1.235" in table and math.isfinite(loaded["rows"][0]["a"])


@pytest.mark.slow
def test_bench_sim_quick_run_loads_the_model_once_per_client_process(
    tmp_path: Path,
) -> None:
    # Prepare / Execute: a real (slow) simulation with 2 clients
    result = bench_sim.run_benchmark(
        clients=[2],
        out_root=tmp_path / "runs",
        cache_dir=tmp_path / "cache",
        timeout_s=600,
        train_per_client=8,
        test_per_client=4,
    )
    # Assert
    (run,) = result["runs"]
    assert run["status"] == "ok", run.get("log_tail")
    assert run["server_model_loads"] == 1
    assert run["model_loads_per_client_process"]
    assert all(n == 1 for n in run["model_loads_per_client_process"])
