"""Images with labelled objects: the data of the vision tower's preparation.

A real MLLM's vision encoder was pre-trained to see before anyone fine-tunes the
language side; the built-in tiny model's tower is built from scratch. Streams that know
what their images show (the generated ``scenes``) can provide, next to their caption
set, images whose every object carries a box and attribute labels (its colour, its
shape). ``fed_asr.models.vision_pretrain`` trains the tower to tell those attributes
from the patches the object covers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

Region = tuple[float, float, float, float]


@dataclass(frozen=True)
class LabelledObject:
    """One object of an image.

    Parameters
    ----------
    region : Region
        Normalised box ``(x0, y0, x1, y1)`` (0..1, origin top left), as
        ``VQASample.region``.
    attributes : tuple[tuple[str, str], ...]
        ``(attribute, value)`` pairs, e.g. ``(("color", "red"), ("shape", "circle"))``.
    """

    region: Region
    attributes: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ObjectImage:
    """An image file and every object drawn on it."""

    image: str
    objects: tuple[LabelledObject, ...]


def attribute_values(items: Sequence[ObjectImage]) -> dict[str, list[str]]:
    """Sorted values of every attribute that occurs in ``items``.

    Raises
    ------
    ValueError
        No labelled object at all.
    """
    values: dict[str, set[str]] = {}
    for item in items:
        for obj in item.objects:
            for name, value in obj.attributes:
                values.setdefault(name, set()).add(value)
    if not values:
        raise ValueError("The object set has no labelled object.")
    return {name: sorted(found) for name, found in sorted(values.items())}


def objects_fingerprint(items: Sequence[ObjectImage]) -> str:
    """Stable digest of an object set: image contents (not paths), boxes and labels."""
    from fed_asr.data.images import image_file_digest

    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{image_file_digest(item.image)}\0{item.objects!r}\n".encode())
    return digest.hexdigest()
