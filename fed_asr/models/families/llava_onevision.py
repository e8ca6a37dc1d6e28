"""LLaVA-OneVision: SigLIP, a projector and a Qwen2 decoder, with anyres image crops.

The image processor encodes one image as a base view (the whole image at the vision
tower's resolution) followed by the crops of the best-fitting resolution among
``image_grid_pinpoints`` (``pixel_values (B, N, 3, H, W)``, ``N = crops + 1``). The
model lays the crops' features side by side into one high-resolution feature map,
removes the rows or columns that only hold the processor's padding (``unpad``),
shrinks the map when it exceeds ``anyres_max_<n>`` base views, and appends a learned
newline token after every row. One image is thus a block of
``g^2 + h * (w + 1)`` image tokens: the base view's ``g x g`` grid, then ``h`` rows of
``w`` map tokens each followed by a newline. ``(h, w)`` follow the image's size
(``image_sizes``), which the forward takes too.

Image spans: every row of the high-resolution map is a span of grid ``(1, w)`` at
``(r, 0)``, so the stitched map is the ``h x w`` map the model built; the newline
tokens and the base view (``origin=None``) are keys of every softmax but not cells
of the map. The prompt is the processor's chat template (images before the text);
the answer follows the assistant header directly and ends with the tokenizer's EOS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from fed_asr.models.families.chat import chat_prompt
from fed_asr.models.families.llava import LlavaFamily
from fed_asr.models.family import ImageSpan
from fed_asr.models.image_layout import token_runs

ANYRES_PREFIX = "anyres_max_"


def anyres_map_shape(config: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the model's high-resolution feature map of an image of ``image_size``.

    The crops of the best pinpoint resolution, side by side, unpadded to the image's
    aspect ratio, then shrunk when larger than ``anyres_max_<n>`` base views, as
    ``LlavaOnevisionModel.pack_image_features`` builds it.

    Parameters
    ----------
    config : Any
        The checkpoint's ``LlavaOnevisionConfig``.
    image_size : tuple[int, int]
        (height, width) of the original image (a row of ``image_sizes``).

    Returns
    -------
    tuple[int, int]
        Rows and columns of the map (without the newline column).
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    crops_h, crops_w = get_anyres_image_grid_shape(
        list(image_size), config.image_grid_pinpoints, vision.image_size
    )
    # unpad on an empty (0, H, W) map: only its shape matters
    empty = torch.empty(0, crops_h * side, crops_w * side)
    height, width = unpad_image(empty, list(image_size)).shape[1:]  # (0, h, w)
    limit = int(str(config.vision_aspect_ratio).removeprefix(ANYRES_PREFIX))
    ratio = math.sqrt(height * width / (limit * side**2))
    if ratio > 1.1:
        height, width = int(height // ratio), int(width // ratio)
    return int(height), int(width)


class LlavaOnevisionFamily(LlavaFamily):
    """``LlavaOnevisionForConditionalGeneration`` (``llava_onevision`` checkpoints)."""

    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    forward_inputs: ClassVar[tuple[str, ...]] = (
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_sizes",
    )
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes")
    add_special_tokens: ClassVar[bool] = False  # the chat template holds them
    answer_separator: ClassVar[str] = ""

    def prompt_text(self, processor: Any, template: str, question: str) -> str:
        """One user turn of the chat template, the image where ``{image}`` stands.

        Raises
        ------
        ValueError
            The processor has no chat template.
        """
        return chat_prompt(processor, template, question, "LLaVA-OneVision")

    def image_spans(self, config: Any, input_ids: Tensor) -> list[list[ImageSpan]]:
        """Not defined without the images' sizes: use ``spans_of_batch``.

        Raises
        ------
        ValueError
            Always (the map of an image follows its size, ``image_sizes``).
        """
        raise ValueError(
            "LLaVA-OneVision image maps follow each image's size; they come from "
            "`image_sizes` (use `spans_of_batch` with a collated batch)."
        )

    def spans_of_batch(
        self, config: Any, batch: Mapping[str, Any]
    ) -> list[list[ImageSpan]]:
        """Base view (not in the map) and one span per row of the anyres map.

        Raises
        ------
        ValueError
            The batch has a different number of image blocks than ``image_sizes``,
            or a block's length is not ``g^2 + h * (w + 1)`` for its image's size.
        """
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        base = side * side
        sizes = [tuple(s) for s in batch["image_sizes"].tolist()]  # [(H, W), ...]
        runs = token_runs(batch["input_ids"] == config.image_token_id)
        if sum(len(r) for r in runs) != len(sizes):
            raise ValueError(
                f"The batch holds {sum(len(r) for r in runs)} image blocks but "
                f"`image_sizes` describes {len(sizes)} images."
            )
        spans: list[list[ImageSpan]] = []
        image = 0
        for row, row_runs in enumerate(runs):
            spans.append([])
            for start, end in row_runs:
                height, width = anyres_map_shape(config, sizes[image])
                image += 1
                if end - start != base + height * (width + 1):
                    raise ValueError(
                        f"Row {row} has {end - start} image tokens at [{start}, {end})"
                        f" but an image of size {sizes[image - 1]} gives a base view "
                        f"of {base} tokens and a {height}x{width} map with newlines "
                        f"({base + height * (width + 1)})."
                    )
                spans[row].append(ImageSpan(start, start + base, (side, side), None))
                first = start + base
                spans[row].extend(
                    ImageSpan(at, at + width, (1, width), (r, 0))
                    for r, at in enumerate(range(first, end, width + 1))
                )
        return spans
