"""Which per-sample descriptor ASR's per-skill statistics summarise, and its size.

Two settings of ``RegularizerConfig`` choose it:

- ``features``: ``"spectrum"`` (the paper's: each map's power-spectral features,
  ``fed_asr.spectral``) or ``"coherence"`` (each map's band coherences with its
  image's content, ``fed_asr.coherence``: where the attention sits relative to what
  the image shows);
- ``heads``: ``"pooled"`` (the paper's: mean and population variance of the features
  over the J captured layer-heads) or ``"each"`` (every layer-head's features, in
  order: layer-major, then head).

The paper's descriptor (``spectrum``, ``pooled``) has D = 2 (K + 2M + 3) whatever the
model; with ``heads=each`` D grows with J = ``l_sel`` x the language model's heads
(``layer_heads``). Features without an angular distribution (``coherence``) report a
uniform one, so the angular term of L_spec is 0 for them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fed_asr.coherence import coherence_descriptor
from fed_asr.config import RegularizerConfig
from fed_asr.config_sections import DESCRIPTOR_FEATURES, HEAD_POOLING
from fed_asr.models.modules import text_config
from fed_asr.query_tokens import query_token_weights
from fed_asr.spectral import (
    SpectralDescriptor,
    attention_maps,
    describe,
    features_per_head,
    layer_head_features,
)

__all__ = [
    "DESCRIPTOR_FEATURES",
    "HEAD_POOLING",
    "describe_batch",
    "descriptor_size",
    "layer_heads",
    "model_descriptor_size",
    "per_head_size",
]


def per_head_size(reg_cfg: RegularizerConfig) -> int:
    """Features of one layer-head: K + 2M + 3 (``spectrum``) or K (``coherence``)."""
    if reg_cfg.features == "coherence":
        return reg_cfg.n_radial
    return features_per_head(reg_cfg.n_radial, reg_cfg.n_angular)


def descriptor_size(reg_cfg: RegularizerConfig, num_layer_heads: int | None) -> int:
    """D of the configured descriptor (``num_layer_heads`` = J, needed for ``each``).

    Raises
    ------
    ValueError
        ``heads=each`` without a positive ``num_layer_heads``.
    """
    if reg_cfg.heads == "pooled":
        return 2 * per_head_size(reg_cfg)
    if num_layer_heads is None or num_layer_heads < 1:
        raise ValueError(
            "`regularizer.heads=each` needs the number of captured layer-heads, got "
            f"{num_layer_heads!r}."
        )
    return num_layer_heads * per_head_size(reg_cfg)


def layer_heads(model: nn.Module, l_sel: int) -> int:
    """J = ``l_sel`` x the language model's attention heads (a capture's L * H)."""
    return l_sel * int(text_config(model).num_attention_heads)


def model_descriptor_size(model: nn.Module, reg_cfg: RegularizerConfig) -> int:
    """D of the configured descriptor for ``model`` (``descriptor_size``)."""
    heads = layer_heads(model, reg_cfg.l_sel) if reg_cfg.heads == "each" else None
    return descriptor_size(reg_cfg, heads)


def describe_batch(
    capture: Any, batch: dict[str, Tensor], reg_cfg: RegularizerConfig
) -> SpectralDescriptor:
    """Descriptors of a captured batch with the configured features and pooling.

    Parameters
    ----------
    capture : CaptureResult
        ``attn`` (B, L, H, Tq, P), ``grid``, ``query_mask``.
    batch : dict[str, Tensor]
        The collated batch (``function_mask`` for the query weights; ``pixel_values``
        for ``coherence``).
    reg_cfg : RegularizerConfig
        ``features``, ``heads``, bins, conventions and query tokens.

    Returns
    -------
    SpectralDescriptor
        ``descriptor`` (B, D) with D = ``descriptor_size``; ``angular`` (B, M).
    """
    weights = query_token_weights(
        capture.query_mask, batch.get("function_mask"), reg_cfg.query_tokens
    ).to(capture.attn.dtype)
    k, m = reg_cfg.n_radial, reg_cfg.n_angular
    if reg_cfg.features == "spectrum" and reg_cfg.heads == "pooled":
        return describe(capture.attn, capture.grid, weights, k, m, reg_cfg.descriptor)
    if reg_cfg.features == "spectrum":  # heads == "each"
        maps = attention_maps(capture.attn, capture.grid, weights, reg_cfg.descriptor)
        feats = layer_head_features(maps, k, m, reg_cfg.descriptor)  # (B, J, F)
        return SpectralDescriptor(feats.flatten(1), feats[:, :, k : k + m].mean(1))
    descriptor = coherence_descriptor(
        capture.attn,
        capture.grid,
        batch["pixel_values"],
        weights,
        k,
        per_head=reg_cfg.heads == "each",
    )
    uniform = torch.full((descriptor.shape[0], m), 1.0 / m, device=descriptor.device)
    return SpectralDescriptor(descriptor, uniform)
