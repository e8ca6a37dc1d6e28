"""Text-to-image attention capture from the last ``L_sel`` language-model layers.

``selective`` mode registers an attention function with transformers'
``AttentionInterface`` and makes it the language model's implementation (the vision
tower keeps its own). It wraps the family's own implementation
(``ModelFamily.attention_implementation``): ``fed_asr_selective`` computes every
layer's output with SDPA, exactly as ``attn_implementation="sdpa"`` does;
``fed_asr_selective_eager`` computes it as transformers' eager attention does,
soft-capping included (Gemma 2, which SDPA cannot run). While a capture is active,
the selected layers also compute ``softmax(softcap(q_text k^T * scaling) + mask)``
for the text query rows only (over all keys, as the model's softmax does) and keep
the image-key columns of the row's stitched image map. The capture slots travel in a
``ContextVar`` set for the duration of one forward call, so concurrent threads do not
see each other's captures.

``eager`` mode is the reference: eager attention with ``output_attentions=True`` for the
language model during the call, sliced to the same rows and columns. It switches the
shared config for the call and is therefore not thread-safe.

The stitched map: the family gives each row's image spans (``ImageSpan``), each with
its token grid and its ``origin`` in the map. Spans with an origin are laid side by
side (tiles and crops of one image form one map); spans without one (an overview
thumbnail) stay keys of the softmax but are not part of the map. Every row of a batch
must share one layout (the collator checks it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from fed_asr.models.family import ImageSpan, ModelFamily
from fed_asr.models.image_layout import image_layout
from fed_asr.models.modules import (
    attention_modules,
    model_family,
    text_config,
    unwrap,
)

SELECTIVE_ATTENTION = "fed_asr_selective"
SELECTIVE_EAGER_ATTENTION = "fed_asr_selective_eager"
# Family attention implementation -> the capturing implementation that wraps it.
SELECTIVE_IMPLEMENTATIONS = {
    "sdpa": SELECTIVE_ATTENTION,
    "eager": SELECTIVE_EAGER_ATTENTION,
}
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
        ``image_end..S-1``) over the cells of the stitched image map, last ``L``
        layers in order.
    grid : tuple[int, int]
        (Gh, Gw) grid of the stitched image map, ``P = Gh * Gw``.
    query_mask : Tensor
        (B, Tq) True on the question tokens (the batch's ``query_mask``).
    image_hidden : Tensor | None
        (B, P, d) last-layer hidden states of the map's image tokens (``hidden``).
    text_hidden : Tensor | None
        (B, Tq, d) last-layer hidden states of the text query rows (``hidden=True``).
    spans : list[list[ImageSpan]] | None
        Image spans of every row, from the model family.
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
    image_end: int
    columns: Tensor  # (P,) key positions of the map cells
    maps: list[Tensor | None] = field(default_factory=list)


_ACTIVE: ContextVar[_CaptureState | None] = ContextVar("fed_asr_capture", default=None)


def _scores(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    softcap: float | None,
) -> Tensor:
    """Masked attention logits of ``query`` over ``key``, as eager attention has them.

    Returns (B, H, Q, S) in the dtype eager attention adds the mask in; masked
    entries hold the dtype's minimum (or ``mask`` added, for float masks).
    """
    key = repeat_kv(key, getattr(module, "num_key_value_groups", 1))  # (B, H, S, d)
    kv_len = key.shape[2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, H, Q, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        if getattr(module, "is_causal", True):
            q_len = query.shape[2]
            total = key.shape[2]
            rows = torch.arange(total - q_len, total, device=query.device)
            cols = torch.arange(kv_len, device=query.device)
            allowed = cols[None, :] <= rows[:, None]  # (Q, S)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :kv_len]  # (B|1, 1, Q, S)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[..., :kv_len]
    return scores


def _text_to_image(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    softcap: float | None,
    state: _CaptureState,
) -> Tensor:
    """Softmax rows of the text queries over all keys, map-cell columns kept."""
    start = state.image_end
    mask = None if attention_mask is None else attention_mask[:, :, start:]
    if mask is None and getattr(module, "is_causal", True):
        # causal rows of the text queries: keep their absolute positions
        full = _scores(module, query, key, None, scaling, softcap)[:, :, start:]
    else:
        full = _scores(module, query[:, :, start:], key, mask, scaling, softcap)
    probs = torch.softmax(full.float(), dim=-1)  # (B, H, Tq, S)
    return probs.index_select(-1, state.columns)  # (B, H, Tq, P)


def _capture(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    kwargs: Mapping[str, Any],
) -> None:
    """Record the selected layer's text-to-image map while a capture is active."""
    state = _ACTIVE.get()
    slot = None if state is None else state.slots.get(id(module))
    if state is not None and slot is not None:
        state.maps[slot] = _text_to_image(
            module, query, key, attention_mask, scaling, kwargs.get("softcap"), state
        )


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
    _capture(module, query, key, attention_mask, scaling, kwargs)
    return output, None


def selective_eager_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Eager attention (soft-capping included) that also records the selected maps.

    Registered as ``"fed_asr_selective_eager"``; computes what transformers' eager
    attention computes (Gemma 2's, with ``softcap``), without returning weights.
    """
    scores = _scores(module, query, key, attention_mask, scaling, softcap)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    value = repeat_kv(value, getattr(module, "num_key_value_groups", 1))
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, Q, H, d)
    _capture(module, query, key, attention_mask, scaling, {"softcap": softcap})
    return output, None


@cache
def _register() -> None:
    """Register the attention functions and their mask builders once per process."""
    AttentionInterface.register(SELECTIVE_ATTENTION, selective_attention_forward)
    AttentionMaskInterface.register(SELECTIVE_ATTENTION, sdpa_mask)
    AttentionInterface.register(
        SELECTIVE_EAGER_ATTENTION, selective_eager_attention_forward
    )
    AttentionMaskInterface.register(SELECTIVE_EAGER_ATTENTION, eager_mask)


def selective_implementation(model: nn.Module) -> str:
    """Name of the capturing implementation that wraps the family's attention.

    Raises
    ------
    ValueError
        The family's attention implementation has no capturing counterpart.
    """
    base = unwrap(model)
    implementation = model_family(base).attention_implementation(base.config)
    if implementation not in SELECTIVE_IMPLEMENTATIONS:
        raise ValueError(
            f"Attention capture wraps {sorted(SELECTIVE_IMPLEMENTATIONS)} attention, "
            f"not the family's {implementation!r}."
        )
    return SELECTIVE_IMPLEMENTATIONS[implementation]


def install_attention_capture(model: nn.Module) -> None:
    """Make the language model use the capturing attention (idempotent).

    Outside a capture it computes exactly what the family's own implementation
    (``sdpa`` or ``eager``) does, so the model can keep it for every forward pass.
    The vision tower is not touched.

    Parameters
    ----------
    model : nn.Module
        An MLLM of a registered family, optionally inside a peft model.
    """
    _register()
    config = text_config(model)
    implementation = selective_implementation(model)
    if config._attn_implementation != implementation:
        config._attn_implementation = implementation


@contextmanager
def stored_activations(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Run the decoder ``layers`` without activation checkpointing inside the block.

    A checkpointed layer reruns its forward in ``backward``, outside the capture:
    non-reentrant checkpointing then saves fewer tensors than the captured forward
    (torch refuses it), reentrant checkpointing leaves the map without gradient. The
    captured layers keep their activations; the others stay checkpointed. Models
    shared between threads must not toggle checkpointing meanwhile.
    """
    flagged = [m for m in layers if getattr(m, "gradient_checkpointing", False)]
    for layer in flagged:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in flagged:
            layer.gradient_checkpointing = True


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


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Select the keys of a collated batch that the model's forward takes.

    Parameters
    ----------
    model : nn.Module
        An MLLM of a registered family, optionally a peft model.
    batch : Mapping[str, Any]
        Output of ``VQACollator``.

    Returns
    -------
    dict[str, Any]
        The family's ``forward_inputs`` and ``labels`` present in ``batch``.
    """
    return _model_inputs(batch, model_family(model))


def _model_inputs(batch: Mapping[str, Any], family: ModelFamily) -> dict[str, Any]:
    """Select the keys of a collated batch that the model's forward takes."""
    keys = (*family.forward_inputs, "labels")
    return {k: batch[k] for k in keys if batch.get(k) is not None}


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
        ``"selective"`` (the family's attention + only the captured rows) or
        ``"eager"`` (reference).
    hidden : bool
        Also return last-layer hidden states of the image and text query tokens.

    Returns
    -------
    CaptureResult
        ``attn`` is (B, l_sel, H, Tq, P), float32, over the stitched image map.

    Raises
    ------
    ValueError
        Bad ``mode`` or ``l_sel``, rows with different image layouts, or an image
        block that does not match the spans found in ``input_ids``.
    RuntimeError
        A selected layer did not run the capturing attention (another attention
        implementation was set).
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
    spans = family.spans_of_batch(unwrap(model).config, batch)
    layout = image_layout(batch, spans)
    inputs = _model_inputs(batch, family)
    device = batch["input_ids"].device
    columns = torch.tensor(layout.columns, dtype=torch.long, device=device)  # (P,)
    if mode == "selective":
        install_attention_capture(model)
        selected = modules[-l_sel:]
        state = _CaptureState(
            slots={id(m): i for i, m in enumerate(selected)},
            image_end=layout.image_end,
            columns=columns,
            maps=[None] * l_sel,
        )
        layers = model_family(model).decoder_layers(unwrap(model))[-l_sel:]
        token = _ACTIVE.set(state)
        try:
            with stored_activations(layers):
                out = model(**inputs, use_cache=False, output_hidden_states=hidden)
        finally:
            _ACTIVE.reset(token)
        if any(m is None for m in state.maps):
            raise RuntimeError(
                "The capturing attention did not run in every selected layer; keep "
                "the language model's attention implementation "
                f"{selective_implementation(model)!r}."
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
        maps = [
            a[:, :, layout.image_end :].index_select(-1, columns).float()
            for a in layers
        ]
    attn = torch.stack(maps, dim=1)  # (B, L, H, Tq, P)
    image_hidden = text_hidden = None
    if hidden:
        last = out.hidden_states[-1]  # (B, S, d), after the final norm
        image_hidden = last.index_select(1, columns)  # (B, P, d)
        text_hidden = last[:, layout.image_end :]  # (B, Tq, d)
    return CaptureResult(
        logits=out.logits,
        loss=out.loss,
        attn=attn,
        grid=layout.grid,
        query_mask=batch["query_mask"],
        image_hidden=image_hidden,
        text_hidden=text_hidden,
        spans=spans,
    )
