"""LLaVA: a CLIP-like vision tower, a projector and a decoder-only language model.

One image token in the prompt expands into ``Gh * Gw`` consecutive tokens, one per
vision patch (row-major), with ``(Gh, Gw) = image_size // patch_size`` from the vision
config. The built-in tiny model is a LLaVA.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from fed_asr.models.family import ImageSpan, ModelFamily


def _owners(model: nn.Module) -> tuple[nn.Module, ...]:
    """``model.model`` (transformers >= 4.52 layout) then ``model`` itself."""
    inner = getattr(model, "model", None)
    return (model,) if inner is None else (inner, model)


def _pair(value: int | Any) -> tuple[int, int]:
    """``(v, v)`` for an int, else the first two items."""
    return (value, value) if isinstance(value, int) else (value[0], value[1])


class LlavaFamily(ModelFamily):
    """``LlavaForConditionalGeneration`` (``model_type`` ``"llava"``)."""

    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    forward_inputs: ClassVar[tuple[str, ...]] = (
        "input_ids",
        "attention_mask",
        "pixel_values",
    )
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)

    def language_model(self, model: nn.Module) -> nn.Module:
        """Return ``language_model`` (e.g. ``LlamaModel``), whose ``layers`` attend.

        Raises
        ------
        TypeError
            The model has no ``language_model`` with ``layers``.
        """
        for owner in _owners(model):
            candidate = getattr(owner, "language_model", None)
            if candidate is not None and hasattr(candidate, "layers"):
                return candidate
        raise TypeError(
            f"{type(model).__name__} has no `language_model` with `layers`; it is not "
            "a LLaVA model."
        )

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """Return ``vision_tower`` (e.g. ``CLIPVisionModel``).

        Raises
        ------
        TypeError
            The model has no ``vision_tower``.
        """
        for owner in _owners(model):
            candidate = getattr(owner, "vision_tower", None)
            if isinstance(candidate, nn.Module):
                return candidate
        raise TypeError(
            f"{type(model).__name__} has no `vision_tower`; it is not a LLaVA model."
        )

    def image_grid(self, config: Any) -> tuple[int, int]:
        """Image token grid (Gh, Gw): vision ``image_size // patch_size``."""
        vision = config.vision_config
        height, width = _pair(vision.image_size)
        patch_h, patch_w = _pair(vision.patch_size)
        return height // patch_h, width // patch_w

    def image_token_id(self, config: Any) -> int:
        """Image token id (``image_token_id``; formerly ``image_token_index``)."""
        token = getattr(config, "image_token_id", None)
        return int(config.image_token_index if token is None else token)

    def num_image_tokens(self, processor: Any, image: Any) -> int:
        """Count the image tokens the processor puts in place of one image token."""
        token = self.image_token(processor)
        encoded = processor(text=[token], images=[image], return_tensors="pt")
        token_id = processor.tokenizer.convert_tokens_to_ids(token)
        return int((encoded["input_ids"] == token_id).sum())

    def image_spans(self, config: Any, input_ids: Tensor) -> list[list[ImageSpan]]:
        """Split each row's runs of image tokens into images of ``Gh * Gw`` tokens.

        Raises
        ------
        ValueError
            A run's length is not a multiple of ``Gh * Gw`` (e.g. multi-crop layouts).
        """
        grid = self.image_grid(config)
        per_image = grid[0] * grid[1]
        is_image = (input_ids == self.image_token_id(config)).to("cpu", torch.int8)
        edges = F.pad(is_image, (1, 1)).diff(dim=1)  # (B, S + 1): +1 run start, -1 end
        starts = (edges == 1).nonzero().tolist()  # [[row, position], ...] row-major
        ends = (edges == -1).nonzero().tolist()
        spans: list[list[ImageSpan]] = [[] for _ in range(input_ids.shape[0])]
        for (row, start), (_, end) in zip(starts, ends, strict=True):
            if (end - start) % per_image:
                raise ValueError(
                    f"Row {row} has a block of {end - start} image tokens at "
                    f"[{start}, {end}), not a multiple of the vision grid {grid} "
                    f"({per_image} tokens); LLaVA lays out one block per image "
                    "(for anyres crops use `model.family=llava_onevision`)."
                )
            spans[row].extend(
                ImageSpan(at, at + per_image, grid)
                for at in range(start, end, per_image)
            )
        return spans
