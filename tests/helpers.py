"""Plain values shared by test modules (importable: ``tests/`` is on ``sys.path``)."""

from __future__ import annotations

# Tiny LLaVA small enough for unit tests: 16x16 images in a 4x4 grid, 2 text layers.
TINY_MODEL_FIELDS: dict[str, int] = {
    "image_size": 16,
    "patch_size": 4,
    "vision_hidden_size": 16,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_hidden_size": 32,
    "text_layers": 2,
    "text_heads": 4,
    "text_intermediate_size": 64,
}
