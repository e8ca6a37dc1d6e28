"""Locate the parts of a loaded MLLM through its model family, with or without peft.

The family of a model is the one ``bind_model_family`` attached to it
(``load_base_model`` does so, honouring a forced ``model.family``), else the one
inferred from its config.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from torch import nn

from fed_asr.models.family import ModelFamily, get_model_family, infer_model_family

# Family bound to each loaded transformers model (weak: dies with the model).
_BOUND: WeakKeyDictionary[nn.Module, ModelFamily] = WeakKeyDictionary()


def unwrap(model: nn.Module) -> nn.Module:
    """Return the transformers model under a peft wrapper (else ``model``)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def bind_model_family(model: nn.Module, family: ModelFamily) -> None:
    """Make ``family`` the family of ``model`` (and of any peft model around it).

    Parameters
    ----------
    model : nn.Module
        A transformers model, optionally inside a peft model.
    family : ModelFamily
        Its family, e.g. from ``resolve_model_family(cfg.family, model.config)``.
    """
    _BOUND[unwrap(model)] = family


def model_family(model: nn.Module) -> ModelFamily:
    """Return the family of ``model``: the bound one, else inferred from its config.

    Parameters
    ----------
    model : nn.Module
        A transformers model, optionally inside a peft model.

    Returns
    -------
    ModelFamily
        The family that locates the model's parts.

    Raises
    ------
    ValueError
        No family is bound and none (or several) match ``model.config``.
    """
    base = unwrap(model)
    family = _BOUND.get(base)
    if family is None:
        family = get_model_family(infer_model_family(getattr(base, "config", None)))
    return family


def language_model(model: nn.Module) -> nn.Module:
    """Return the decoder-only language model of an MLLM.

    Parameters
    ----------
    model : nn.Module
        A transformers MLLM of a registered family, optionally inside a peft model.

    Returns
    -------
    nn.Module
        The text decoder (e.g. ``LlamaModel``).

    Raises
    ------
    TypeError
        The model does not have its family's layout.
    """
    base = unwrap(model)
    return model_family(base).language_model(base)


def vision_tower(model: nn.Module) -> nn.Module:
    """Return the image encoder of an MLLM (see ``language_model``)."""
    base = unwrap(model)
    return model_family(base).vision_tower(base)


def language_model_prefix(model: nn.Module) -> str:
    """Qualified module name of the language model inside the transformers model."""
    base = unwrap(model)
    target = language_model(base)
    for name, module in base.named_modules():
        if module is target:
            return name
    raise TypeError("The language model is not a submodule of the model.")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Return the self-attention of every language-model decoder layer, in order."""
    base = unwrap(model)
    return model_family(base).attention_modules(base)


def text_config(model: nn.Module) -> Any:  # a transformers PretrainedConfig
    """Config object of the language model (shared with its attention modules)."""
    base = unwrap(model)
    return model_family(base).text_config(base)
