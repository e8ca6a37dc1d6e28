"""Labelled-object images of the ``scenes`` stream (the vision tower's preparation).

Scenes of 2-4 objects in every visual style of the stream (its stages' and the neutral
base style), drawn from their own generator so that no image is one of the stream's
test images; every object carries its box, colour, shape and side of the canvas.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fed_asr.data.objects import LabelledObject, ObjectImage
from fed_asr.data.partition import make_rng
from fed_asr.data.scene_render import CANVAS, STYLES, SceneObject
from fed_asr.data.scenes import COUNT_WORDS, materialise_scenes, scene_for


def scenes_objects(
    n: int,
    seed: int = 0,
    *,
    cache_dir: str | Path = "~/.cache/fed_asr",
    styles: Sequence[str] | None = None,
) -> list[ObjectImage]:
    """``n`` scene images with every object's box, colour, shape and position.

    Parameters
    ----------
    n : int
        Number of images.
    seed : int
        Generation seed (a generator of its own: the images differ from the stream's).
    cache_dir : str | Path
        Rendered images go under ``<cache_dir>/scenes/``.
    styles : Sequence[str] | None
        Visual styles, used in turn (``None``: every style, sorted), so a tower
        prepared on them has seen each stage's statistics, as a pre-trained encoder
        has seen varied images.

    Returns
    -------
    list[ObjectImage]
        One entry per image, objects in drawing order, each labelled ``color``,
        ``shape``, ``horizontal`` (``left``/``right``) and ``vertical``
        (``top``/``bottom``) by its centre, as ``fed_asr.data.scenes.caption`` names
        them.

    Raises
    ------
    ValueError
        Non-positive ``n`` or an unknown style.
    """
    if n <= 0:
        raise ValueError(f"`n` must be positive, got {n}.")
    style_list = sorted(STYLES) if styles is None else list(styles)
    unknown = [s for s in style_list if s not in STYLES]
    if unknown or not style_list:
        raise ValueError(f"Unknown `styles` {unknown}. Available: {sorted(STYLES)}.")
    rng = make_rng(seed, "scenes", "objects", *style_list)
    scenes = []
    for i in range(n):
        count = COUNT_WORDS[int(rng.integers(2, 5))]
        scene, _, _ = scene_for("count", count, style_list[i % len(style_list)], rng)
        scenes.append(scene)
    paths = materialise_scenes(scenes, cache_dir, "objects")
    return [
        ObjectImage(path, tuple(_labelled(o) for o in scene.objects))
        for path, scene in zip(paths, scenes, strict=True)
    ]


def _labelled(obj: SceneObject) -> LabelledObject:
    """An object's box with its colour, shape and side of the canvas (as captioned)."""
    cx, cy = obj.center
    return LabelledObject(
        obj.region,
        (
            ("color", obj.color),
            ("shape", obj.shape),
            ("horizontal", "left" if cx < CANVAS / 2 else "right"),
            ("vertical", "top" if cy < CANVAS / 2 else "bottom"),
        ),
    )
