"""How LoRA adapters are exchanged and averaged (``lora.aggregation``), a registry.

- ``fedavg`` (default): clients train and send A and B; the server averages each
  matrix by examples (Flower's FedAvg).
- ``ffa`` (FFA-LoRA, Sun et al. 2024, https://arxiv.org/abs/2403.12313): every A is
  frozen at a seeded random initialisation that is identical on every client and on
  the server; only B is trained and sent (half the upload and download). Averaging B
  alone is exact: mean_k(B_k A) = (mean_k B_k) A.
- ``exact``: clients train and send A and B as with ``fedavg``; the server averages the
  products B_k A_k (the actual weight updates) and re-factorises the mean with a
  truncated SVD to rank r. Exact when the mean update has rank <= r, otherwise the
  best rank-r approximation (Eckart-Young) of it, instead of FedAvg's
  mean(B) mean(A), which is neither.

This module is pure torch/NumPy; the Flower strategy in ``server/`` only calls it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fed_asr.config import LoraConfig
from fed_asr.models import adapter_state, attach_lora, load_adapter_state
from fed_asr.registry import check_new_name, lookup

LORA_A = ".lora_A."
LORA_B = ".lora_B."


@dataclass(frozen=True)
class LoraAggregation:
    """One way of exchanging and merging LoRA adapters.

    Attributes
    ----------
    name : str
        Registry name.
    freeze_a : bool
        Keep A frozen at its seeded initialisation; only B is trained and exchanged.
    server_merges : bool
        The server replaces FedAvg's per-matrix average by :meth:`aggregate`.
    """

    name: str
    freeze_a: bool = False
    server_merges: bool = False

    def attach(self, base: nn.Module, lora: LoraConfig, seed: int) -> nn.Module:
        """Wrap ``base`` with LoRA; every caller with the same ``seed`` gets the same A.

        ``torch.manual_seed(seed)`` is set first (as the engines always did), so the
        ``fedavg`` initialisation is unchanged; with ``freeze_a`` the A matrices are
        drawn from a forked RNG seeded with ``seed`` and frozen.
        """
        torch.manual_seed(seed)
        if self.freeze_a:
            return attach_lora(base, lora, ffa=True, seed=seed)
        return attach_lora(base, lora)

    def exchanged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapter weights that travel (only B with ``freeze_a``)."""
        return adapter_state(model, trainable_only=self.freeze_a)

    def load(
        self, model: nn.Module, state: Mapping[str, torch.Tensor | np.ndarray]
    ) -> None:
        """Load received weights; with ``freeze_a`` the (absent) A keep their values.

        With ``freeze_a`` every A is (re-)frozen: peft re-enables gradients of the
        active adapter in ``disable_adapter``/``set_adapter``.
        """
        load_adapter_state(model, state, strict=not self.freeze_a)
        if self.freeze_a:
            for name, param in model.named_parameters():
                if LORA_A in name:
                    param.requires_grad_(False)

    def aggregate(
        self, states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
    ) -> dict[str, np.ndarray]:
        """Weighted merge of client adapters (``exact``: product average + SVD).

        Parameters
        ----------
        states : Sequence[Mapping[str, np.ndarray]]
            One adapter state per client (same keys).
        weights : Sequence[float]
            Non-negative weights (e.g. ``num-examples``), not all zero.

        Returns
        -------
        dict[str, np.ndarray]
            The merged adapter, float32.
        """
        if self.server_merges:
            return exact_lora_merge(states, weights)
        return weighted_average(states, weights)


def _normalised(weights: Sequence[float], n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or n == 0:
        raise ValueError(
            f"`weights` must hold one value per state ({n}), got {w.shape}."
        )
    if np.any(w < 0) or float(w.sum()) <= 0:
        raise ValueError(f"`weights` must be >= 0 and not all zero, got {w.tolist()}.")
    return w / w.sum()


def weighted_average(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Per-key weighted mean of adapter states (FedAvg)."""
    w = _normalised(weights, len(states))
    keys = list(states[0])
    return {
        k: sum(
            wi * np.asarray(s[k], np.float64) for wi, s in zip(w, states, strict=True)
        ).astype(np.float32)
        for k in keys
    }


def exact_lora_merge(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Average the LoRA products B_k A_k and re-factorise to the clients' rank.

    For every adapted module with ``A_k (r, in)`` and ``B_k (out, r)``:
    ``M = sum_k w_k B_k A_k (out, in)``, ``M = U S V^T`` and the new factors are
    ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``, so ``B A`` is the best rank-r
    approximation of ``M``. Keys that are not LoRA factors are averaged.

    Raises
    ------
    ValueError
        If a module has an A without its B (or the reverse), or bad weights.
    """
    w = _normalised(weights, len(states))
    merged = weighted_average(states, weights)
    a_keys = [k for k in states[0] if LORA_A in k]
    for a_key in a_keys:
        b_key = a_key.replace(LORA_A, LORA_B)
        if b_key not in states[0]:
            raise ValueError(f"LoRA factor {a_key!r} has no matching {b_key!r}.")
        rank = np.asarray(states[0][a_key]).shape[0]
        product = sum(
            wi * (np.asarray(s[b_key], np.float64) @ np.asarray(s[a_key], np.float64))
            for wi, s in zip(w, states, strict=True)
        )  # (out, in)
        u, sing, vt = np.linalg.svd(product, full_matrices=False)
        root = np.sqrt(sing[:rank])  # (r,)
        merged[b_key] = (u[:, :rank] * root[None, :]).astype(np.float32)  # (out, r)
        merged[a_key] = (root[:, None] * vt[:rank]).astype(np.float32)  # (r, in)
    orphan_b = [
        k
        for k in states[0]
        if LORA_B in k and k.replace(LORA_B, LORA_A) not in states[0]
    ]
    if orphan_b:
        raise ValueError(f"LoRA factors without their A: {orphan_b[:3]}.")
    return merged


LORA_AGGREGATIONS: dict[str, LoraAggregation] = {}


def register_lora_aggregation(aggregation: LoraAggregation) -> None:
    """Register a LoRA aggregation under its unique snake_case name."""
    check_new_name(LORA_AGGREGATIONS, aggregation.name, "LoRA aggregation")
    LORA_AGGREGATIONS[aggregation.name] = aggregation


def get_lora_aggregation(name: str) -> LoraAggregation:
    """Look up ``lora.aggregation``.

    Raises
    ------
    KeyError
        Unknown name; the message lists the choices.
    """
    return lookup(LORA_AGGREGATIONS, name, "`lora.aggregation`")


register_lora_aggregation(LoraAggregation("fedavg"))
register_lora_aggregation(LoraAggregation("ffa", freeze_a=True))
register_lora_aggregation(LoraAggregation("exact", server_merges=True))
