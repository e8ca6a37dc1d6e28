"""Tests of region patch masks and the grounding share."""

from __future__ import annotations

import pytest
import torch

from fed_asr.data import (
    VQASample,
    grounding_share,
    region_mask,
    region_masks,
    sample_mask,
)


def test_region_mask_marks_every_touched_patch() -> None:
    # Execute
    mask = region_mask((0.25, 0.0, 0.6, 0.3), 4)

    # Assert: columns 1-2 (x in [0.25, 0.75)), rows 0-1 (y in [0, 0.5))
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:2, 1:3] = True
    assert torch.equal(mask, expected)


def test_region_mask_min_overlap_drops_slightly_covered_patches() -> None:
    # Execute: column 2 is covered 0.4, row 1 is covered 0.2
    mask = region_mask((0.25, 0.0, 0.6, 0.3), (4, 4), min_overlap=0.3)

    # Assert
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 1:3] = True
    assert torch.equal(mask, expected)


def test_region_mask_non_square_grid_shape() -> None:
    # Execute
    mask = region_mask((0.0, 0.0, 1.0, 0.5), (2, 3))

    # Assert
    assert mask.shape == (2, 3)
    assert mask[0].all() and not mask[1].any()


@pytest.mark.parametrize(
    ("region", "match"),
    [((0.5, 0.0, 0.5, 1.0), "region"), ((0.0, 0.0, 1.2, 1.0), "region")],
)
def test_region_mask_rejects_bad_box(
    region: tuple[float, float, float, float], match: str
) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        region_mask(region, 4)


def test_region_masks_flags_samples_without_region() -> None:
    # Prepare
    samples = [
        VQASample("a.png", "q", "a", "color", (0.0, 0.0, 0.5, 0.5)),
        VQASample("b.png", "q", "a", "count"),
    ]

    # Execute
    masks, has = region_masks(samples, 2)

    # Assert
    assert has.tolist() == [True, False]
    assert masks[0].tolist() == [[True, False], [False, False]]
    assert not masks[1].any()
    assert sample_mask(samples[1], 2) is None


def test_grounding_share_is_mass_inside_mask() -> None:
    # Prepare: 2 samples on a 2x2 grid
    attention = torch.tensor([[[1.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[True, False], [False, False]]] * 2)

    # Execute
    share = grounding_share(attention, masks)

    # Assert
    torch.testing.assert_close(share, torch.tensor([0.25, 0.0]), atol=1e-6, rtol=0)
