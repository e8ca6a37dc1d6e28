"""bench_spectral side by side: the paper-style encoder agrees with ours."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from benchmarks import bench_spectral
from fed_asr.spectral import describe


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """The benchmark sets torch's thread count; give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("grid", [8, 12])
def test_paper_style_descriptor_equals_describe(grid: int) -> None:
    # Prepare
    attn = bench_spectral.random_attention(2, 2, 3, 4, grid, seed=1)

    # Execute
    descriptor, angular = bench_spectral.paper_style_descriptor(attn, (grid, grid))
    ours = describe(attn, (grid, grid))

    # Assert
    torch.testing.assert_close(ours.descriptor, descriptor, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ours.angular, angular, atol=2e-6, rtol=1e-5)


def test_versus_paper_row_times_both_and_checks_values() -> None:
    # Execute
    row = bench_spectral.versus_paper_row(8, warmup=0, repeat=1, batch=2)

    # Assert
    assert row["grid"] == "8x8" and row["max_abs_diff"] < 1e-5
    assert row["speedup_fwd"] > 0 and row["speedup_fwd_bwd"] > 0
    assert row["ours_fwd_bwd_ms"] > 0 and row["paper_fwd_bwd_ms"] > 0
