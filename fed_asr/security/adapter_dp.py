"""Differential privacy of the adapter updates a client sends (local DP).

Each round a client sends its trained adapter. With ``privacy.dp`` it sends instead
the global adapter it received plus its *update* (trained minus received) clipped to
L2 norm ``C = privacy.adapter_clip`` over all arrays together, plus Gaussian noise.

Neighbouring datasets differ by one training sample of this client, as for the
statistics (``fed_asr.security.dp``). Training is not a sum over samples, so one
sample can move the update anywhere; after clipping both updates lie in the ball of
radius ``C``, so the L2 sensitivity of one release is ``2 C``. The noise is calibrated
with the analytic Gaussian mechanism to (``adapter_epsilon``, ``dp_delta``) per round,
and the run's accountant composes these releases with the statistics releases into
one epsilon per client (``fed_asr.security.dp_budget``).

The number of examples a client reports is coarsened to a multiple of
``privacy.num_examples_granularity`` (rounded down, so it never exceeds the true
count, which the server may know and check; a client with fewer examples than the
granularity reports 1). This is coarsening, not a DP guarantee: the count is not
noised and not accounted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fed_asr.config import PrivacyConfig
from fed_asr.security.dp import calibrate_gaussian, noise_generator

# First part of the seed of adapter noise, so that it never shares a stream with the
# statistics noise of the same stage and partition (``noise_generator``)
ADAPTER_NOISE_STREAM = 0xADA


@dataclass(frozen=True)
class AdapterNoise:
    """Calibrated noise of one adapter release.

    Attributes
    ----------
    clip : float
        L2 bound ``C`` on the update (all arrays together).
    std : float
        Noise standard deviation of every entry.
    noise_multiplier : float
        ``std / (2 C)``: sigma over the release's sensitivity, for the accountant.
    epsilon, delta : float
        The per-release guarantee it was calibrated to.
    """

    clip: float
    std: float
    noise_multiplier: float
    epsilon: float
    delta: float


def adapter_sensitivity(clip: float) -> float:
    """L2 sensitivity ``2 C`` of one clipped update (any change of a client's data)."""
    if not 0 < clip < math.inf:
        raise ValueError(f"`adapter_clip` must be positive and finite, got {clip}.")
    return 2.0 * clip


def calibrate_adapter_noise(cfg: PrivacyConfig) -> AdapterNoise:
    """Noise of one (``adapter_epsilon``, ``dp_delta``)-DP adapter release."""
    sensitivity = adapter_sensitivity(cfg.adapter_clip)
    std = calibrate_gaussian(cfg.adapter_epsilon, cfg.dp_delta, sensitivity)
    return AdapterNoise(
        clip=cfg.adapter_clip,
        std=std,
        noise_multiplier=std / sensitivity,
        epsilon=cfg.adapter_epsilon,
        delta=cfg.dp_delta,
    )


def update_norm(
    received: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]
) -> float:
    """L2 norm of ``sent - received`` over all arrays together.

    Raises
    ------
    ValueError
        If the two do not hold the same array names and shapes.
    """
    if set(received) != set(sent):
        raise ValueError(
            f"The update's arrays {sorted(sent)} differ from the received adapter's "
            f"{sorted(received)}."
        )
    total = 0.0
    for name, value in sent.items():
        if value.shape != received[name].shape:
            raise ValueError(
                f"Array `{name}` has shape {tuple(value.shape)}, the received adapter "
                f"{tuple(received[name].shape)}."
            )
        diff = value.double() - received[name].double()
        total += float(diff.square().sum())
    return math.sqrt(total)


def clip_update(
    received: Mapping[str, torch.Tensor],
    sent: Mapping[str, torch.Tensor],
    clip: float,
) -> dict[str, torch.Tensor]:
    """The update ``sent - received`` (float64), scaled to L2 norm at most ``clip``."""
    norm = update_norm(received, sent)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {
        name: (value.double() - received[name].double()) * factor
        for name, value in sent.items()
    }


def privatize_update(
    received: Mapping[str, torch.Tensor],
    sent: Mapping[str, torch.Tensor],
    noise: AdapterNoise,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """The adapter to send: ``received + clip(sent - received) + N(0, std^2)``.

    Parameters
    ----------
    received : Mapping[str, torch.Tensor]
        The global adapter this client received (its training started from it).
    sent : Mapping[str, torch.Tensor]
        The adapter after local training.
    noise : AdapterNoise
        From :func:`calibrate_adapter_noise`.
    rng : np.random.Generator
        Source of the noise (see :func:`adapter_noise_generator`).

    Returns
    -------
    dict[str, torch.Tensor]
        Same names, shapes and dtypes as ``sent``.
    """
    clipped = clip_update(received, sent, noise.clip)
    out = {}
    for name, delta in clipped.items():
        drawn = rng.normal(0.0, noise.std, size=tuple(delta.shape))
        noisy = received[name].double() + delta + torch.from_numpy(drawn)
        out[name] = noisy.to(sent[name].dtype)
    return out


def adapter_noise_generator(
    cfg: PrivacyConfig, global_round: int, partition: int
) -> np.random.Generator:
    """Generator of one client's adapter noise in one round (OS entropy by default)."""
    return noise_generator(cfg, ADAPTER_NOISE_STREAM, global_round, partition)


def coarse_num_examples_up(count: int, granularity: int) -> int:
    """``count`` rounded up to a multiple of ``granularity`` (0 stays 0).

    For the stage-end replies under DP: their bounds need a claim at least as large
    as the statistics' own count, and the server widens its cap the same way
    (``server.reply_validation``).
    """
    if granularity < 1:
        raise ValueError(f"`num_examples_granularity` must be >= 1, got {granularity}.")
    return -(-int(count) // granularity) * granularity


def coarse_num_examples(count: int, granularity: int) -> int:
    """``count`` rounded down to a multiple of ``granularity``; at least 1 if > 0."""
    if granularity < 1:
        raise ValueError(f"`num_examples_granularity` must be >= 1, got {granularity}.")
    if count < 0:
        raise ValueError(f"`num-examples` must be >= 0, got {count}.")
    if count == 0:
        return 0
    return max(1, int(count) // granularity * granularity)
