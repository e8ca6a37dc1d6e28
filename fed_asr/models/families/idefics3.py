"""Idefics3 and SmolVLM: SigLIP-like encoder, pixel-shuffle connector, Llama decoder.

The decoder is ``model.model.text_model`` and the vision encoder
``model.model.vision_model``. The image processor resizes an image and cuts it into
an ``r x c`` grid of square tiles, then adds the whole image resized to one tile (the
global image). Every tile is encoded on its own; the pixel shuffle merges
``scale_factor^2`` patches into one token, so a tile is a ``g x g`` block of tokens
(row-major) with ``g = image_size / patch_size / scale_factor``. In the prompt, one
image becomes::

    <fake><row_1_col_1><image>*g^2 <fake><row_1_col_2><image>*g^2 ... \\n
    ...
    \\n <fake><global-img><image>*g^2 <fake>

(an image no larger than a tile is its global image alone). The forward takes
``pixel_values (B, N, 3, H, W)`` with ``N = r * c + 1`` views and their
``pixel_attention_mask (B, N, H, W)``. The prompt is the processor's chat template
(``User:<image>...<end_of_utterance>\\nAssistant:``); the answer follows after a space
and ends with the tokenizer's EOS (``<end_of_utterance>`` in SmolVLM).

Image spans: tile ``(i, j)`` is placed at ``(i * g, j * g)`` of the stitched map, so
the map is the ``r g x c g`` picture the tiles were cut from; the global image is a
span with ``origin=None`` (a key of every softmax, not a cell of the map).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from fed_asr.models.families.chat import chat_prompt
from fed_asr.models.family import ImageSpan, ModelFamily, inner_module
from fed_asr.models.image_layout import token_runs

# Tokens between two tiles of one row of tiles: <fake_token_around_image><row_i_col_j>.
TILE_MARKERS = 2


def tile_layout(runs: list[tuple[int, int]], row: int) -> tuple[int, int]:
    """(rows, columns) of tiles of one image from its runs of image tokens.

    Tiles of one row of tiles are separated by their two marker tokens; a new row of
    tiles also starts after a newline, so its gap is longer. The last run is the
    global image.

    Raises
    ------
    ValueError
        The gaps do not form ``rows`` rows of the same number of tiles.
    """
    tiles = runs[:-1]
    breaks = [
        k for k in range(1, len(tiles)) if tiles[k][0] - tiles[k - 1][1] > TILE_MARKERS
    ]
    rows = len(breaks) + 1
    columns = len(tiles) // rows
    if rows * columns != len(tiles) or breaks != list(
        range(columns, len(tiles), columns)
    ):
        raise ValueError(
            f"Row {row}: the {len(tiles)} image tiles at {tiles} do not form a grid "
            f"of rows of equal length (new rows of tiles start at tiles {breaks})."
        )
    return rows, columns


class Idefics3Family(ModelFamily):
    """``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``."""

    model_types: ClassVar[tuple[str, ...]] = ("idefics3", "smolvlm")
    forward_inputs: ClassVar[tuple[str, ...]] = (
        "input_ids",
        "attention_mask",
        "pixel_values",
        "pixel_attention_mask",
    )
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_attention_mask")
    add_special_tokens: ClassVar[bool] = False  # the chat template holds them

    def language_model(self, model: nn.Module) -> nn.Module:
        """Return ``model.model.text_model`` (e.g. ``LlamaModel``).

        Raises
        ------
        TypeError
            The model has no ``model.text_model`` with ``layers``.
        """
        return inner_module(
            model, "text_model", "Idefics3 / SmolVLM", needs_layers=True
        )

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """Return ``model.model.vision_model`` (the SigLIP-like encoder).

        Raises
        ------
        TypeError
            The model has no ``model.vision_model``.
        """
        return inner_module(model, "vision_model", "Idefics3 / SmolVLM")

    def prompt_text(self, processor: Any, template: str, question: str) -> str:
        """One user turn of the chat template, the image where ``{image}`` stands.

        Raises
        ------
        ValueError
            The processor has no chat template.
        """
        return chat_prompt(processor, template, question, "Idefics3 / SmolVLM")

    def tile_grid(self, config: Any) -> tuple[int, int]:
        """(g, g) tokens of one tile: ``image_size // patch_size // scale_factor``."""
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side // config.scale_factor, side // config.scale_factor

    def image_spans(self, config: Any, input_ids: Tensor) -> list[list[ImageSpan]]:
        """Spans of each row's one image: its tiles in the map, the global image not.

        Raises
        ------
        ValueError
            A run of image tokens is not one tile of ``g x g`` tokens, or the tiles
            do not form a grid.
        """
        grid = self.tile_grid(config)
        per_tile = grid[0] * grid[1]
        spans: list[list[ImageSpan]] = []
        for row, runs in enumerate(token_runs(input_ids == config.image_token_id)):
            for start, end in runs:
                if end - start != per_tile:
                    raise ValueError(
                        f"Row {row} has a block of {end - start} image tokens at "
                        f"[{start}, {end}); an Idefics3 tile is {grid} = {per_tile} "
                        "tokens (`vision_config.image_size`, `patch_size`, "
                        "`scale_factor`)."
                    )
            if len(runs) <= 1:  # no image, or one not split: the global image alone
                spans.append([ImageSpan(s, e, grid) for s, e in runs])
                continue
            _, columns = tile_layout(runs, row)
            tiles = [
                ImageSpan(s, e, grid, (k // columns * grid[0], k % columns * grid[1]))
                for k, (s, e) in enumerate(runs[:-1])
            ]
            start, end = runs[-1]
            spans.append([*tiles, ImageSpan(start, end, grid, origin=None)])
        return spans
