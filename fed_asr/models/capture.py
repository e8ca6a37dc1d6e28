"""Text-to-image attention capture from the last ``L_sel`` language-model layers.

``selective`` mode registers an attention function with transformers'
``AttentionInterface`` and makes it the language model's implementation (the vision
tower keeps its own). Every layer's output comes from SDPA, exactly as with
``attn_implementation="sdpa"``; while a capture is active, the selected layers also
compute ``softmax(q_text k^T * scaling + mask)`` for the text query rows only (over all
keys, as the model's softmax does) and keep the image-key columns. The capture slots
travel in a ``ContextVar`` set for the duration of one forward call, so concurrent
threads do not see each other's captures.

``eager`` mode is the reference: eager attention with ``output_attentions=True`` for the
language model during the call, sliced to the same rows and columns. It switches the
shared config for the call and is therefore not thread-safe.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fed_asr.models.family import ImageSpan, ModelFamily
from fed_asr.models.modules import (
    attention_modules,
    model_family,
    text_config,
    unwrap,
)

SELECTIVE_ATTENTION = "fed_asr_selective"
CAPTURE_MODES = ("selective", "eager")


@dataclass
class CaptureResult:
    """One forward pass with captured text-to-image attention.

    Attributes
    ----------
    logits : Tensor
        (B, S, V) language-model logits.
    loss : Tensor | None
        Mean LM loss over the answer tokens (None without ``labels``).
    attn : Tensor
        (B, L, H, Tq, P) float32 attention of the text query rows (positions
        ``image_end..S-1``) over the image keys, last ``L`` layers in order.
    grid : tuple[int, int]
        (Gh, Gw) image token grid, ``P = Gh * Gw``.
    query_mask : Tensor
        (B, Tq) True on the question tokens (the batch's ``query_mask``).
    image_hidden : Tensor | None
        (B, P, d) last-layer hidden states of the image tokens (``hidden=True``).
    text_hidden : Tensor | None
        (B, Tq, d) last-layer hidden states of the text query rows (``hidden=True``).
    spans : list[list[ImageSpan]] | None
        Image spans of every row, from the model family (one per row for now).
    """

    logits: Tensor
    loss: Tensor | None
    attn: Tensor
    grid: tuple[int, int]
    query_mask: Tensor
    image_hidden: Tensor | None = None
    text_hidden: Tensor | None = None
    spans: list[list[ImageSpan]] | None = None


@dataclass
class _CaptureState:
    """Per-call capture slots: attention module id -> index among selected layers."""

    slots: dict[int, int]
    image_start: int
    image_end: int
    maps: list[Tensor | None] = field(default_factory=list)


_ACTIVE: ContextVar[_CaptureState | None] = ContextVar("fed_asr_capture", default=None)


def _text_to_image(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    state: _CaptureState,
) -> Tensor:
    """Softmax rows of the text queries over all keys, image-key columns kept."""
    key = repeat_kv(key, getattr(module, "num_key_value_groups", 1))  # (B, H, S, d)
    q_len, kv_len = query.shape[2], key.shape[2]
    start = state.image_end
    query_text = query[:, :, start:]  # (B, H, Tq, d)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (
        torch.matmul(query_text, key.transpose(2, 3)) * scale
    ).float()  # (B, H, Tq, S)
    if attention_mask is None:
        rows = torch.arange(start, q_len, device=query.device) + (kv_len - q_len)
        cols = torch.arange(kv_len, device=query.device)
        allowed = cols[None, :] <= rows[:, None]  # (Tq, S)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[:, :, start:, :kv_len]  # (B|1, 1, Tq, S)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[:, :, start:, :kv_len].float()
    probs = torch.softmax(scores, dim=-1)  # (B, H, Tq, S)
    return probs[..., state.image_start : state.image_end]  # (B, H, Tq, P)


def selective_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """SDPA attention that also records text-to-image maps of the selected layers.

    Registered as ``AttentionInterface`` ``"fed_asr_selective"``; same arguments and
    output as ``transformers.integrations.sdpa_attention.sdpa_attention_forward``.
    """
    output, _ = sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )
    state = _ACTIVE.get()
    slot = None if state is None else state.slots.get(id(module))
    if state is not None and slot is not None:
        state.maps[slot] = _text_to_image(
            module, query, key, attention_mask, scaling, state
        )
    return output, None


@cache
def _register() -> None:
    """Register the attention function and its (SDPA) mask builder once per process."""
    AttentionInterface.register(SELECTIVE_ATTENTION, selective_attention_forward)
    AttentionMaskInterface.register(SELECTIVE_ATTENTION, sdpa_mask)


def install_attention_capture(model: nn.Module) -> None:
    """Make the language model use the capturing SDPA attention (idempotent).

    Outside a capture it computes exactly what ``sdpa`` does, so the model can keep it
    for every forward pass. The vision tower is not touched.

    Parameters
    ----------
    model : nn.Module
        An MLLM of a registered family, optionally inside a peft model.
    """
    _register()
    config = text_config(model)
    if config._attn_implementation != SELECTIVE_ATTENTION:
        config._attn_implementation = SELECTIVE_ATTENTION


@contextmanager
def text_attention(model: nn.Module, implementation: str) -> Iterator[None]:
    """Use ``implementation`` in the language model inside the block, then restore."""
    config = text_config(model)
    previous = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


def _model_inputs(batch: Mapping[str, Any], family: ModelFamily) -> dict[str, Any]:
    """Select the keys of a collated batch that the model's forward takes."""
    keys = (*family.forward_inputs, "labels")
    return {k: batch[k] for k in keys if batch.get(k) is not None}


def _image_block(
    batch: Mapping[str, Any], spans: list[list[ImageSpan]]
) -> tuple[int, int, tuple[int, int]]:
    """Shared ``(image_start, image_end, grid)`` of a batch with one image per row."""
    if any(len(row) != 1 for row in spans):
        raise NotImplementedError(
            "Attention capture takes exactly one image span per row, got "
            f"{sorted({len(row) for row in spans})} spans per row; several images "
            "(or image tiles) per sample are not supported yet."
        )
    first = spans[0][0]
    if any(row[0] != first for row in spans):
        raise ValueError(
            "The image span differs between rows "
            f"{sorted({(r[0].start, r[0].end) for r in spans})}; capture needs the "
            "image block at the same positions in every row."
        )
    start = int(batch.get("image_start", first.start))
    end = int(batch.get("image_end", first.end))
    grid = first.grid
    if end - start != grid[0] * grid[1]:
        raise ValueError(
            f"The image block has {end - start} tokens but the vision grid "
            f"{grid} has {grid[0] * grid[1]}; multi-crop image layouts are not "
            "supported."
        )
    if (start, end) != (first.start, first.end):
        raise ValueError(
            f"The batch's image block [{start}, {end}) is not the image span "
            f"[{first.start}, {first.end}) found in `input_ids`."
        )
    return start, end, grid


def forward_with_attention(
    model: nn.Module,
    batch: Mapping[str, Any],
    l_sel: int,
    mode: str = "selective",
    hidden: bool = False,
) -> CaptureResult:
    """Run the model and capture text-to-image attention of its last ``l_sel`` layers.

    Parameters
    ----------
    model : nn.Module
        An MLLM of a registered family, optionally a peft model (gradients flow to
        adapters).
    batch : Mapping[str, Any]
        Output of ``VQACollator`` on the model's device.
    l_sel : int
        Number of last language-model layers to capture.
    mode : str
        ``"selective"`` (SDPA + only the captured rows) or ``"eager"`` (reference).
    hidden : bool
        Also return last-layer hidden states of the image and text query tokens.

    Returns
    -------
    CaptureResult
        ``attn`` is (B, l_sel, H, Tq, P), float32.

    Raises
    ------
    ValueError
        Bad ``mode`` or ``l_sel``, or an image block that does not match the span
        found in ``input_ids`` or its grid.
    NotImplementedError
        A row holds more than one image span.
    RuntimeError
        A selected layer did not run the capturing attention (e.g. gradient
        checkpointing re-ran it outside the capture, or another implementation).
    """
    if mode not in CAPTURE_MODES:
        raise ValueError(f"`mode` must be one of {list(CAPTURE_MODES)}, got {mode!r}.")
    modules = attention_modules(model)
    if not 0 < l_sel <= len(modules):
        raise ValueError(
            f"`l_sel` must be in [1, {len(modules)}] (language-model layers), "
            f"got {l_sel}."
        )
    family = model_family(model)
    spans = family.image_spans(unwrap(model).config, batch["input_ids"])
    image_start, image_end, grid = _image_block(batch, spans)
    inputs = _model_inputs(batch, family)
    if mode == "selective":
        install_attention_capture(model)
        selected = modules[-l_sel:]
        state = _CaptureState(
            slots={id(m): i for i, m in enumerate(selected)},
            image_start=image_start,
            image_end=image_end,
            maps=[None] * l_sel,
        )
        token = _ACTIVE.set(state)
        try:
            out = model(**inputs, use_cache=False, output_hidden_states=hidden)
        finally:
            _ACTIVE.reset(token)
        if any(m is None for m in state.maps):
            raise RuntimeError(
                "The capturing attention did not run in every selected layer; disable "
                "gradient checkpointing and keep the language model's attention "
                f"implementation {SELECTIVE_ATTENTION!r}."
            )
        maps = [m for m in state.maps if m is not None]
    else:
        with text_attention(model, "eager"):
            out = model(
                **inputs,
                use_cache=False,
                output_attentions=True,
                output_hidden_states=hidden,
            )
        layers = out.attentions[-l_sel:]  # each (B, H, S, S)
        maps = [a[:, :, image_end:, image_start:image_end].float() for a in layers]
    attn = torch.stack(maps, dim=1)  # (B, L, H, Tq, P)
    image_hidden = text_hidden = None
    if hidden:
        last = out.hidden_states[-1]  # (B, S, d), after the final norm
        image_hidden = last[:, image_start:image_end]  # (B, P, d)
        text_hidden = last[:, image_end:]  # (B, Tq, d)
    return CaptureResult(
        logits=out.logits,
        loss=out.loss,
        attn=attn,
        grid=grid,
        query_mask=batch["query_mask"],
        image_hidden=image_hidden,
        text_hidden=text_hidden,
        spans=spans,
    )
