"""One thread count per run (``train.torch_threads``), whatever launched it."""

from __future__ import annotations

import pytest
import torch

from fed_asr import central
from fed_asr.config import compose_config
from fed_asr.models import torch_threads


def test_torch_threads_sets_and_restores_the_count() -> None:
    # Prepare
    torch.set_num_threads(2)

    # Execute
    with torch_threads(1):
        inside = torch.get_num_threads()

    # Assert
    assert inside == 1
    assert torch.get_num_threads() == 2


def test_torch_threads_restores_after_an_error_and_refuses_zero() -> None:
    # Prepare
    torch.set_num_threads(2)

    # Execute / Assert
    with pytest.raises(KeyError), torch_threads(1):
        raise KeyError("inside")
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match=">= 1, got 0"), torch_threads(0):
        pass


def test_central_run_computes_on_train_torch_threads(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the engine's body, spied; a process on 2 threads
    seen: list[int] = []
    monkeypatch.setattr(
        central, "_run_central", lambda cfg: seen.append(torch.get_num_threads())
    )
    torch.set_num_threads(2)

    # Execute
    central.run_central(compose_config("config", ["train.torch_threads=3"]))

    # Assert
    assert seen == [3]
    assert torch.get_num_threads() == 2
