"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT, a patch merger and a Qwen2 decoder.

An image of any size is cut into ``patch_size`` patches; every ``merge_size x
merge_size`` of them become one token, so one image is a block of ``(H / p / m) x
(W / p / m)`` tokens (row-major) whose size follows the image's resolution: the
processor reports it per image as ``image_grid_thw = (1, H / p, W / p)``. The
prompt is the processor's chat template, in which the image is
``<|vision_start|><|image_pad|><|vision_end|>``; the answer follows the assistant
header directly and ends with the tokenizer's EOS (``<|im_end|>`` in the instruct
checkpoints). Positions are M-RoPE triples (temporal, height, width): the image's
tokens carry their row and column, and the text after it continues from the image's
largest position. The model computes them from ``mm_token_type_ids`` and
``image_grid_thw``; ``position_ids`` gives them to packed scoring.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fed_asr.models.families.chat import chat_prompt
from fed_asr.models.family import ImageSpan, ModelFamily, inner_module
from fed_asr.models.image_layout import token_runs
from fed_asr.models.modules import unwrap


class Qwen2VLFamily(ModelFamily):
    """``Qwen2VLForConditionalGeneration`` and its Qwen2.5-VL counterpart."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl", "qwen2_5_vl")
    forward_inputs: ClassVar[tuple[str, ...]] = (
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
    )
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "image_grid_thw")
    token_inputs: ClassVar[tuple[str, ...]] = ("mm_token_type_ids",)
    add_special_tokens: ClassVar[bool] = False  # the chat template holds them
    answer_separator: ClassVar[str] = ""

    def language_model(self, model: nn.Module) -> nn.Module:
        """Return ``model.model.language_model`` (``Qwen2VLTextModel``).

        Raises
        ------
        TypeError
            The model has no ``model.language_model`` with ``layers``.
        """
        return inner_module(model, "language_model", "Qwen2-VL", needs_layers=True)

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """Return ``model.model.visual`` (the ViT with its patch merger).

        Raises
        ------
        TypeError
            The model has no ``model.visual``.
        """
        return inner_module(model, "visual", "Qwen2-VL")

    def prompt_text(self, processor: Any, template: str, question: str) -> str:
        """One user turn (``template`` with the image where ``{image}`` stands).

        Raises
        ------
        ValueError
            The processor has no chat template.
        """
        return chat_prompt(processor, template, question, "Qwen2-VL")

    def token_inputs_of(
        self, input_ids: Tensor, prompt_length: Tensor, image_token_id: int
    ) -> dict[str, Tensor]:
        """``mm_token_type_ids``: 1 on image tokens, 0 on text (M-RoPE needs it)."""
        return {"mm_token_type_ids": (input_ids == image_token_id).long()}  # (B, S)

    def select_images(self, batch: Mapping[str, Any], rows: Tensor) -> dict[str, Any]:
        """Patches and grids of the images of ``rows`` (one image per row)."""
        grids = batch["image_grid_thw"]  # (B, 3)
        sizes = grids.prod(-1).tolist()  # patches of each image
        patches = torch.split(batch["pixel_values"], sizes)
        picked = rows.tolist()
        return {
            "pixel_values": torch.cat([patches[i] for i in picked]),
            "image_grid_thw": grids[rows.to(grids.device)],
        }

    def position_ids(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        """M-RoPE positions (3, B, S) of the batch, as the model computes them."""
        base = unwrap(model)
        ids = batch["input_ids"]
        token_types = batch.get("mm_token_type_ids")
        if token_types is None:
            token_types = (ids == base.config.image_token_id).long()
        positions, _ = base.model.get_rope_index(
            input_ids=ids,
            mm_token_type_ids=token_types,
            image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=batch.get("attention_mask"),
        )
        return positions  # (3, B, S)

    def image_spans(self, config: Any, input_ids: Tensor) -> list[list[ImageSpan]]:
        """Not defined without the images' grids: use ``spans_of_batch``.

        Raises
        ------
        ValueError
            Always (the grid of an image depends on its resolution).
        """
        raise ValueError(
            "Qwen2-VL image grids follow each image's resolution; they come from "
            "`image_grid_thw` (use `spans_of_batch` with a collated batch)."
        )

    def spans_of_batch(
        self, config: Any, batch: Mapping[str, Any]
    ) -> list[list[ImageSpan]]:
        """One span per image, grid ``(h / merge, w / merge)`` from ``image_grid_thw``.

        Raises
        ------
        ValueError
            A run of image tokens does not match its image's grid, or the batch has
            a different number of images than grids.
        """
        merge = int(config.vision_config.spatial_merge_size)
        grids = batch["image_grid_thw"].tolist()  # [[t, h, w], ...] in row order
        runs = token_runs(batch["input_ids"] == config.image_token_id)
        if sum(len(r) for r in runs) != len(grids):
            raise ValueError(
                f"The batch holds {sum(len(r) for r in runs)} image blocks but "
                f"`image_grid_thw` describes {len(grids)} images."
            )
        spans: list[list[ImageSpan]] = []
        image = 0
        for row, row_runs in enumerate(runs):
            spans.append([])
            for start, end in row_runs:
                frames, height, width = grids[image]
                image += 1
                grid = (height // merge, width // merge)
                if frames != 1 or end - start != grid[0] * grid[1]:
                    raise ValueError(
                        f"Row {row} has {end - start} image tokens at [{start}, "
                        f"{end}) but its image grid (t, h, w) = "
                        f"{(frames, height, width)} gives {grid} after merging."
                    )
                spans[row].append(ImageSpan(start, end, grid))
        return spans
