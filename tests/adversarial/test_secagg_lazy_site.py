"""Steps 1-4 of the secure round answer from the config and node state alone.

A SuperNode starts a ClientApp process per message, so a step that built the site
(model, data) only to read the config spent seconds per message for nothing; only
the first step (advertise) computes statistics and needs it. The signature is still
checked on every step (tests/adversarial/test_signing.py).
"""

from __future__ import annotations

import numpy as np
import pytest

import clients.app as client_app
from fed_asr import protocol as P
from tests.adversarial.secagg_helpers import _task_identity, federation, step_of

__all__ = ["_task_identity", "federation"]  # fixtures shared via secagg_helpers


def test_only_the_advertise_step_builds_the_site_and_the_sum_is_exact(
    federation, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: three honest nodes; every site build is recorded with its step
    fed = federation()
    expected = {
        k: sum(fed.stats(node)[k] for node in fed.nodes) for k in fed.stats(1000)
    }
    built: list[str] = []
    original = client_app._loaded_site

    def spy(msg, context, run_config, arrays_required=True):  # type: ignore[no-untyped-def]
        built.append(step_of(msg))
        return original(msg, context, run_config, arrays_required)

    monkeypatch.setattr(client_app, "_loaded_site", spy)

    # Execute
    result = fed.run()

    # Assert: one build per node, at advertise; the round still sums exactly
    assert result.arrays is not None, result.dropped
    assert sorted(result.contributors) == sorted(fed.nodes)
    assert built == [P.SECAGG_ADVERTISE] * len(fed.nodes)
    for key, value in expected.items():
        np.testing.assert_allclose(result.arrays[key], value, rtol=0, atol=1e-6)
