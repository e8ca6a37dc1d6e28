"""The image layout of a batch: where its stitched image map lives in the tokens.

A model family gives each row's image spans (``ImageSpan``), each with its token grid
and its ``origin`` in the row's map. Spans with an origin are laid side by side, so
the tiles and crops of one image form the picture they were cut from; spans without
one (an overview thumbnail) are not cells of the map. Every row of a batch must share
one layout; the capture reads the attention of the text rows over the map's cells.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from fed_asr.models.family import ImageSpan


@dataclass(frozen=True)
class ImageLayout:
    """Where a batch's stitched image map lives in its token sequence.

    Attributes
    ----------
    image_start, image_end : int
        The image block ``[image_start, image_end)``; text query rows follow it. It
        covers the spans and may hold more tokens (tile markers, newlines).
    grid : tuple[int, int]
        (Gh, Gw) of the stitched map.
    columns : tuple[int, ...]
        Token position of every map cell, row-major (``Gh * Gw`` of them).
    """

    image_start: int
    image_end: int
    grid: tuple[int, int]
    columns: tuple[int, ...]


def token_runs(mask: Tensor) -> list[list[tuple[int, int]]]:
    """``[start, end)`` of the runs of True in each row of a (B, S) bool mask."""
    edges = F.pad(mask.to("cpu", torch.int8), (1, 1)).diff(dim=1)  # (B, S + 1)
    starts = (edges == 1).nonzero().tolist()  # [[row, position], ...] row-major
    ends = (edges == -1).nonzero().tolist()
    runs: list[list[tuple[int, int]]] = [[] for _ in range(mask.shape[0])]
    for (row, start), (_, end) in zip(starts, ends, strict=True):
        runs[row].append((start, end))
    return runs


def stitch_spans(spans: list[ImageSpan]) -> tuple[tuple[int, int], tuple[int, ...]]:
    """Stitched map of one row: its grid and the token position of every cell.

    Parameters
    ----------
    spans : list[ImageSpan]
        The row's image spans; those with an ``origin`` form the map.

    Returns
    -------
    tuple[tuple[int, int], tuple[int, ...]]
        (Gh, Gw) and ``Gh * Gw`` token positions, row-major.

    Raises
    ------
    ValueError
        No span has an origin, spans overlap, or the map has holes.
    """
    placed = [s for s in spans if s.origin is not None]
    if not placed:
        raise ValueError(f"None of the image spans {spans} is placed in the image map.")
    height = max(s.origin[0] + s.grid[0] for s in placed if s.origin is not None)
    width = max(s.origin[1] + s.grid[1] for s in placed if s.origin is not None)
    cells = [-1] * (height * width)
    for span in placed:
        assert span.origin is not None
        top, left = span.origin
        for k in range(span.end - span.start):
            cell = (top + k // span.grid[1]) * width + left + k % span.grid[1]
            if cells[cell] != -1:
                raise ValueError(
                    f"Image spans overlap in the stitched map at cell "
                    f"{divmod(cell, width)}: {placed}; give each tile its `origin`."
                )
            cells[cell] = span.start + k
    if -1 in cells:
        raise ValueError(
            f"The image spans {placed} leave cell {divmod(cells.index(-1), width)} "
            f"of the {height}x{width} map empty."
        )
    return (height, width), tuple(cells)


def image_layout(batch: Mapping[str, Any], spans: list[list[ImageSpan]]) -> ImageLayout:
    """Return the one image layout of a batch (every row the same spans).

    Raises
    ------
    ValueError
        Rows without an image or with different spans, a batch image block that
        does not cover the spans, or a map that cannot be stitched.
    """
    if any(not row for row in spans):
        raise ValueError(
            "Attention capture needs an image in every row; rows "
            f"{[i for i, row in enumerate(spans) if not row]} have none."
        )
    first = spans[0]
    if any(row != first for row in spans):
        raise ValueError(
            "The image spans differ between rows "
            f"{sorted({tuple((s.start, s.end, s.grid) for s in r) for r in spans})}; "
            "capture needs one image layout at the same positions in every row."
        )
    grid, columns = stitch_spans(first)
    lowest = min(s.start for s in first)
    highest = max(s.end for s in first)
    start = int(batch.get("image_start", lowest))
    end = int(batch.get("image_end", highest))
    if start > lowest or end < highest:
        raise ValueError(
            f"The batch's image block [{start}, {end}) does not cover the image "
            f"spans [{lowest}, {highest}) found in `input_ids` (vision grid {grid}); "
            "check `image_start`/`image_end`."
        )
    return ImageLayout(start, end, grid, columns)
