"""Locate the parts of a LLaVA-family model, with or without a peft wrapper."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """Return the transformers model under a peft wrapper (else ``model``)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def language_model(model: nn.Module) -> nn.Module:
    """Return the decoder-only language model of a LLaVA-family model.

    Parameters
    ----------
    model : nn.Module
        ``LlavaForConditionalGeneration`` (or a family member with the same layout:
        ``model.language_model`` or ``language_model``), optionally inside a peft model.

    Returns
    -------
    nn.Module
        The text decoder (e.g. ``LlamaModel``) whose ``layers`` hold ``self_attn``.

    Raises
    ------
    TypeError
        The model has no ``language_model`` with ``layers``.
    """
    base = unwrap(model)
    inner = getattr(base, "model", None)
    for owner in (inner, base):
        candidate = (
            getattr(owner, "language_model", None) if owner is not None else None
        )
        if candidate is not None and hasattr(candidate, "layers"):
            return candidate
    raise TypeError(
        f"{type(base).__name__} has no `language_model` with `layers`; only "
        "LLaVA-family models are supported."
    )


def language_model_prefix(model: nn.Module) -> str:
    """Qualified module name of the language model inside the transformers model."""
    base = unwrap(model)
    target = language_model(base)
    for name, module in base.named_modules():
        if module is target:
            return name
    raise TypeError("The language model is not a submodule of the model.")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Return the ``self_attn`` of every language-model decoder layer, in order."""
    return [layer.self_attn for layer in language_model(model).layers]


def text_config(model: nn.Module):  # noqa: ANN201 - a transformers PretrainedConfig
    """Config object of the language model (shared with its attention modules)."""
    return language_model(model).config


def vision_grid(model: nn.Module) -> tuple[int, int]:
    """Image token grid (Gh, Gw) from the vision config: image size // patch size."""
    config = unwrap(model).config.vision_config
    size = config.image_size
    patch = config.patch_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return height // patch_h, width // patch_w
