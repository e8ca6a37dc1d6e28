"""Patch masks of queried-object regions, and the grounding share of attention.

A sample's ``region`` is a normalised box ``(x0, y0, x1, y1)`` of the image; the
vision tower sees the image as a ``Gh x Gw`` grid of patches. The tiny model's CLIP
processor resizes the shortest edge and centre-crops, which for square images (easy-VQA,
scenes) keeps the whole image, so normalised coordinates map straight onto the grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fed_asr.data.samples import VQASample

Region = tuple[float, float, float, float]


def _grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    """``(Gh, Gw)`` from an int (square grid) or a pair, checked positive."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    if gh <= 0 or gw <= 0:
        raise ValueError(f"`grid` must be positive, got {grid}.")
    return gh, gw


def region_mask(
    region: Region, grid: int | tuple[int, int], *, min_overlap: float = 0.0
) -> Tensor:
    """Patches of a ``Gh x Gw`` grid covered by a normalised box.

    Parameters
    ----------
    region : Region
        ``(x0, y0, x1, y1)`` in [0, 1], origin top left, ``x0 < x1`` and ``y0 < y1``.
    grid : int | tuple[int, int]
        ``Gh`` (= ``Gw``) or ``(Gh, Gw)``; patch ``(r, c)`` covers
        ``[c / Gw, (c + 1) / Gw] x [r / Gh, (r + 1) / Gh]``.
    min_overlap : float
        A patch is in the mask when the box covers more than this fraction of its
        area (0: any overlap).

    Returns
    -------
    Tensor
        ``(Gh, Gw)`` bool; at least one patch is set.

    Raises
    ------
    ValueError
        An empty or out-of-range box, or ``min_overlap`` outside [0, 1).
    """
    gh, gw = _grid(grid)
    x0, y0, x1, y1 = region
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(
            f"`region` must be (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and "
            f"0 <= y0 < y1 <= 1, got {region}."
        )
    if not 0.0 <= min_overlap < 1.0:
        raise ValueError(f"`min_overlap` must be in [0, 1), got {min_overlap}.")
    cols = torch.arange(gw, dtype=torch.float64)
    rows = torch.arange(gh, dtype=torch.float64)
    # overlap of the box with each column / row band, as a fraction of the band
    over_x = (
        torch.clamp(cols + 1, max=x1 * gw) - torch.clamp(cols, min=x0 * gw)
    ).clamp(min=0)  # (Gw,)
    over_y = (
        torch.clamp(rows + 1, max=y1 * gh) - torch.clamp(rows, min=y0 * gh)
    ).clamp(min=0)  # (Gh,)
    covered = over_y[:, None] * over_x[None, :]  # (Gh, Gw) fraction of each patch
    mask = covered > min_overlap
    if not mask.any():  # a box thinner than min_overlap of every patch: keep its peak
        mask = covered == covered.max()
    return mask


def sample_mask(
    sample: VQASample, grid: int | tuple[int, int], *, min_overlap: float = 0.0
) -> Tensor | None:
    """``region_mask`` of a sample's region, or ``None`` when it has none."""
    if sample.region is None:
        return None
    return region_mask(sample.region, grid, min_overlap=min_overlap)


def region_masks(
    samples: Sequence[VQASample],
    grid: int | tuple[int, int],
    *,
    min_overlap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Masks of a batch of samples.

    Parameters
    ----------
    samples : Sequence[VQASample]
        The batch.
    grid : int | tuple[int, int]
        Patch grid (see ``region_mask``).
    min_overlap : float
        See ``region_mask``.

    Returns
    -------
    tuple[Tensor, Tensor]
        ``(N, Gh, Gw)`` bool masks (all False for a sample without region) and the
        ``(N,)`` bool flags of the samples that have a region.
    """
    gh, gw = _grid(grid)
    masks = torch.zeros(len(samples), gh, gw, dtype=torch.bool)  # (N, Gh, Gw)
    has = torch.zeros(len(samples), dtype=torch.bool)  # (N,)
    for i, sample in enumerate(samples):
        mask = sample_mask(sample, (gh, gw), min_overlap=min_overlap)
        if mask is not None:
            masks[i], has[i] = mask, True
    return masks, has


def grounding_share(attention: Tensor, masks: Tensor) -> Tensor:
    """Share of attention mass on the masked patches.

    Parameters
    ----------
    attention : Tensor
        ``(..., N, Gh, Gw)`` non-negative attention over the image patches (e.g.
        averaged over heads and query tokens).
    masks : Tensor
        ``(N, Gh, Gw)`` bool masks (``region_masks``).

    Returns
    -------
    Tensor
        ``(..., N)`` mass inside the mask over total mass (0 where the total is 0).
        Compare with ``masks.float().mean((-2, -1))``, the region's share of the
        image, which uniform attention would reach.
    """
    assert attention.shape[-3:] == masks.shape, (attention.shape, masks.shape)
    total = attention.sum((-2, -1))  # (..., N)
    inside = (attention * masks.to(attention.dtype)).sum((-2, -1))  # (..., N)
    return torch.where(
        total > 0, inside / total.clamp(min=1e-12), torch.zeros_like(total)
    )
