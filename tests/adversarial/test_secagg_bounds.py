"""Secure-aggregation bounds a server cannot lower: threshold, DP share, range, rows."""

from __future__ import annotations

import numpy as np
import pytest

from fed_asr import protocol as P
from fed_asr.security.dp import calibrate_stats_noise, max_skills_per_sample
from fed_asr.security.secagg import (
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    decode_fixed_point,
    encode_fixed_point,
    flatten_arrays,
)
from fed_asr.security.secagg.encoding import modulus_mask
from server.secure_spectrum import SecureSpectrumRound
from tests.adversarial.secagg_helpers import SESSION, _task_identity, federation

__all__ = ["_task_identity", "federation"]  # fixtures shared via secagg_helpers


# -- thresholds and the DP noise share -------------------------------------------------
def test_server_threshold_below_the_node_minimum_is_refused(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the sites require t = ceil(0.9 * 3) = 3; the server asks for 2
    fed = federation(**{"privacy.secagg_threshold": 0.9})

    # Execute
    result = fed.run(secagg_threshold=0.5)

    # Assert: every node refused at the first step, nothing was aggregated
    assert result.arrays is None
    refusals = [d for d in result.dropped if d["step"] == P.SECAGG_ADVERTISE]
    assert sorted(d["node"] for d in refusals) == sorted(fed.nodes)
    assert all("below this node's minimum 3" in d["reason"] for d in refusals)


def test_dp_noise_share_comes_from_the_node_own_threshold(
    federation,
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the sites' own minimum is t = ceil(0.6 * 3) = 2; the server asks for
    # t = 3, which would shrink each node's noise share to sigma^2 / 3
    fed = federation(
        **{"privacy.dp": "true", "privacy.dp_seed": 3, "privacy.dp_clip": 10.0}
    )
    clean = {k: sum(fed.stats(n)[k] for n in fed.nodes) for k in ("sum",)}
    m = max_skills_per_sample(
        fed.cfg.regularizer.tau_skill, len(fed.site(0).stream.skills)
    )
    sigma = calibrate_stats_noise(fed.cfg.privacy, m).stds["sum"]

    # Execute
    result = fed.run(secagg_threshold=1.0)

    # Assert: three shares of sigma^2 / 2 each: the sum's noise has std sqrt(3/2) sigma
    assert result.arrays is not None and sorted(result.contributors) == sorted(
        fed.nodes
    )
    z = ((result.arrays["sum"] - clean["sum"]) / sigma).ravel()
    assert z.size > 100
    assert abs(float(z.std()) - np.sqrt(1.5)) < 0.12, float(z.std())


# -- fixed-point range -----------------------------------------------------------------
def test_fixed_point_values_at_the_bound_cannot_wrap_with_16_bits() -> None:
    # Prepare: two clients, bits = 16, scale = 1: the sum must stay below 2^15
    config = SecAggConfig(threshold=2, bits=16, scale=1.0)
    server = SecAggServer(config, b"edge")
    clients = {c: SecAggClient(c, config, b"edge") for c in (1, 2)}
    book = server.collect_advertisements({c: v.advertise() for c, v in clients.items()})
    inbox = server.route_shares({c: clients[c].share_keys(book) for c in book})
    bound = config.input_bound(2)
    encoded = encode_fixed_point(np.array([bound, -bound]), 1.0, 16, bound)

    # Execute
    summed = decode_fixed_point((encoded + encoded) & modulus_mask(16), 1.0, 16)

    # Assert: in range sums exactly; 16384 (whose sum 32768 wraps to -32768) refused
    np.testing.assert_array_equal(summed, [2 * bound, -2 * bound])
    with pytest.raises(ValueError, match=r"index 0 = 16384.0 cannot be encoded"):
        clients[1].mask_input(np.array([16384.0]), inbox[1])
    vector, _ = flatten_arrays({"count": np.array([bound])})
    assert clients[2].mask_input(vector, inbox[2]).vector.shape == (1,)


def test_site_with_another_skill_order_refuses_the_secure_round(federation) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the server names the rows in another order than the sites' skills
    fed = federation()
    skills = tuple(fed.site(0).stream.skills)
    round_ = SecureSpectrumRound(
        fed.grid, fed.cfg.privacy, SESSION, 60.0, skills=skills[::-1]
    )
    # Execute
    result = round_.run(fed.arrays, 0, 10**6)
    # Assert: no site takes part, so nothing is summed into wrong rows
    assert result.arrays is None and not result.contributors
    reasons = " ".join(d["reason"] for d in result.dropped)
    assert "skill rows" in reasons
