"""Drawing of multi-object scenes (64x64 RGB) in one of a few visual styles.

A ``Scene`` lists its objects (colour, shape, pixel box) and a render seed; the
style decides what surrounds them: object size, background (plain or textured),
distractor dots or lines, pixel noise. Rendering is deterministic in the scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CANVAS = 64
# Six well-separated object colours; backgrounds and distractor lines stay muted.
COLORS: dict[str, tuple[int, int, int]] = {
    "blue": (30, 70, 225),
    "green": (25, 165, 50),
    "orange": (250, 135, 0),
    "purple": (145, 45, 195),
    "red": (225, 25, 25),
    "yellow": (240, 215, 0),
}
COLOR_NAMES: tuple[str, ...] = tuple(sorted(COLORS))
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Style:
    """Visual statistics of a stage.

    Parameters
    ----------
    name : str
        Style name (a stage name, or ``base`` for preparation).
    size_range : tuple[int, int]
        Inclusive range of object sides, in pixels.
    texture : bool
        Striped or checked background instead of a plain one.
    noise : float
        Standard deviation of the Gaussian pixel noise (0 = none).
    dots : tuple[int, int]
        Inclusive range of the number of distractor dots.
    lines : tuple[int, int]
        Inclusive range of the number of distractor lines.
    """

    name: str
    size_range: tuple[int, int]
    texture: bool = False
    noise: float = 0.0
    dots: tuple[int, int] = (0, 0)
    lines: tuple[int, int] = (0, 0)


STYLES: dict[str, Style] = {
    # stage 0: large objects on a plain background
    "plain": Style("plain", (15, 20)),
    # stage 1: small objects, pixel noise and clutter dots
    "clutter": Style("clutter", (8, 11), noise=12.0, dots=(25, 45)),
    # stage 2: medium objects on stripes / checks, crossed by distractor lines
    "texture": Style("texture", (11, 15), texture=True, lines=(4, 7)),
    # base-model preparation: plain background, every object size of the stages
    "base": Style("base", (8, 20)),
}
PLAIN_BACKGROUND = (246, 246, 246)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: colour and shape names and its pixel box ``(x0, y0, x1, y1)``.

    The box is half-open: the object covers columns ``x0..x1-1`` and rows
    ``y0..y1-1``.
    """

    color: str
    shape: str
    box: Box

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(x, y)`` in pixels."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def region(self) -> tuple[float, float, float, float]:
        """Box normalised to the canvas (``VQASample.region``)."""
        x0, y0, x1, y1 = self.box
        return (x0 / CANVAS, y0 / CANVAS, x1 / CANVAS, y1 / CANVAS)


@dataclass(frozen=True)
class Scene:
    """Objects of one image, its style name and the seed of its distractors/noise."""

    style: str
    objects: tuple[SceneObject, ...]
    render_seed: int


def _texture(rng: np.random.Generator) -> np.ndarray:
    """Muted stripes (horizontal, vertical, diagonal) or checks, ``(H, W, 3)``."""
    grey = int(rng.integers(150, 216))
    light = np.clip(grey + rng.integers(-12, 13, size=3), 0, 255)
    dark = np.clip(light - int(rng.integers(30, 55)), 0, 255)
    half = int(rng.integers(2, 5))  # stripe width; period 4..8 px
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS]  # (H, W) each
    kind = int(rng.integers(4))
    if kind == 0:
        on = (yy // half) % 2
    elif kind == 1:
        on = (xx // half) % 2
    elif kind == 2:
        on = ((xx + yy) // half) % 2
    else:
        on = (xx // half + yy // half) % 2
    return np.where(on[..., None] == 1, dark, light).astype(np.uint8)  # (H, W, 3)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    """Draw one object inside its half-open box."""
    x0, y0, x1, y1 = obj.box
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon(
            [((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill
        )
    else:
        raise ValueError(f"Unknown shape {obj.shape!r}; known: {list(SHAPES)}.")


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene.

    Parameters
    ----------
    scene : Scene
        Objects, style name and render seed.

    Returns
    -------
    PIL.Image.Image
        ``CANVAS`` x ``CANVAS`` RGB image; distractors are drawn below the objects,
        noise over everything.

    Raises
    ------
    KeyError
        Unknown style name.
    """
    style = STYLES[scene.style]
    rng = np.random.default_rng(scene.render_seed)
    if style.texture:
        image = Image.fromarray(_texture(rng), mode="RGB")
    else:
        image = Image.new("RGB", (CANVAS, CANVAS), PLAIN_BACKGROUND)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(style.dots[0], style.dots[1] + 1))):
        x, y = rng.integers(0, CANVAS, size=2).tolist()
        color = tuple(rng.integers(0, 256, size=3).tolist())
        draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=color)
    for _ in range(int(rng.integers(style.lines[0], style.lines[1] + 1))):
        x0, y0, x1, y1 = rng.integers(0, CANVAS, size=4).tolist()
        color = tuple(rng.integers(30, 120, size=3).tolist())
        draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(1, 3)))
    for obj in scene.objects:
        _draw_object(draw, obj)
    if style.noise > 0:
        pixels = np.asarray(image, dtype=np.float32)  # (H, W, 3)
        pixels = pixels + rng.normal(0.0, style.noise, size=pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    return image
