"""Image loading with a per-process cache."""

from __future__ import annotations

import os
from functools import lru_cache

from PIL import Image, UnidentifiedImageError

# Bound in entries, not bytes: all 5,000 easy-VQA images (64x64 RGB, 12 kB each) fit
# in about 60 MB, so a run never re-decodes them. Large real images cost more per entry;
# call `clear_image_cache()` between stages if memory is tight.
IMAGE_CACHE_SIZE = 8192


def load_image(path: str) -> Image.Image:
    """Load an image as RGB, cached per process.

    The same ``PIL.Image.Image`` object is returned for repeated calls with the same
    path: treat it as read-only (copy it before drawing on it).

    Parameters
    ----------
    path : str
        Path of the image file.

    Returns
    -------
    PIL.Image.Image
        The image in mode ``"RGB"``, fully loaded (no open file handle).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file exists but is not a readable image.
    """
    return _load_image_cached(os.fspath(path))


@lru_cache(maxsize=IMAGE_CACHE_SIZE)
def _load_image_cached(path: str) -> Image.Image:
    """Read and convert one image; failures are not cached by ``lru_cache``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path!r}.")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"Cannot read image {path!r}: {err}") from err


def clear_image_cache() -> None:
    """Drop every cached image (e.g. after files changed on disk)."""
    _load_image_cached.cache_clear()
