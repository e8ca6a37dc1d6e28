"""The server's per-client example caps follow the clients' own partition."""

from __future__ import annotations

import pytest

from clients.site import _client_stream
from fed_asr.config import load_config
from fed_asr.data import build_stream
from fed_asr.methods import build_method
from server.example_caps import ExampleCaps
from tests.flower_helpers import make_run_config

PARTITIONS = 4


@pytest.mark.parametrize("by", ["answer", "skill"])
def test_simulated_caps_match_each_clients_share(by: str) -> None:
    # Prepare: a skewed split, so a wrong label would give other sizes
    overrides = [
        "data.stage_order=[shape,color]",
        "data.max_train_per_stage=200",
        "data.max_test_per_stage=40",
        "data.dirichlet_alpha=0.1",
        f"data.partition_by={by}",
    ]
    run_config = make_run_config(overrides)
    cfg = load_config(run_config)
    stream = build_stream(cfg.data, cfg.seed)
    method = build_method(cfg.method, cfg.regularizer)
    run_key = tuple(sorted((k, str(v)) for k, v in run_config.items()))

    # Execute
    caps = ExampleCaps.for_run(cfg, stream, method, simulated=True)
    sizes = caps._sizes(PARTITIONS)  # the sizes the server checks replies against
    shares = [
        _client_stream(run_key, p, PARTITIONS, None)[0] for p in range(PARTITIONS)
    ]

    # Assert
    assert sizes is not None
    for p, share in enumerate(shares):
        assert sizes.stage_end[p] == tuple(len(s.train) for s in share.stages)
        assert sizes.test[p] == tuple(len(s.test) for s in share.stages)
