"""LoRA adapters (peft) on the language model and their state for federated exchange."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

from fed_asr.config import LORA_SCOPES, LoraConfig
from fed_asr.models.modules import language_model_prefix

ADAPTER_NAME = "default"


def lora_target_modules(
    model: nn.Module, names: list[str], scope: str
) -> str | list[str]:
    """Build the peft ``target_modules`` for ``names`` restricted to ``scope``.

    Parameters
    ----------
    model : nn.Module
        The transformers model that will receive the adapters.
    names : list[str]
        Module names such as ``["q_proj", "v_proj"]``.
    scope : str
        ``"language_model"``: only modules inside the language model's decoder layers
        (the CLIP vision tower has identically named ``q_proj``/``v_proj``, which are
        left alone); ``"all"``: every module with a matching name.

    Returns
    -------
    str | list[str]
        A regex (peft full-matches it against module names) or the plain name list.

    Raises
    ------
    ValueError
        Unknown ``scope``.
    """
    if scope not in LORA_SCOPES:
        raise ValueError(f"`scope` must be one of {list(LORA_SCOPES)}, got {scope!r}.")
    if scope == "all":
        return list(names)
    prefix = re.escape(language_model_prefix(model))
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"{prefix}\.layers\.\d+\.(?:.*\.)?(?:{alternatives})"


def attach_lora(
    model: nn.Module,
    lora: LoraConfig,
    *,
    scope: str | None = None,
    ffa: bool = False,
    seed: int | None = None,
) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only adapter weights are trainable.

    Parameters
    ----------
    model : nn.Module
        A LLaVA-family model. peft injects the adapter layers in place, so attach once
        per base model and later replace adapter weights with ``load_adapter_state``.
    lora : LoraConfig
        Rank, alpha, dropout and ``target_modules`` names.
    scope : str | None
        ``"language_model"`` or ``"all"`` (see ``lora_target_modules``); None uses
        ``lora.scope``.
    ffa : bool
        FFA-LoRA: keep every ``lora_A`` frozen at its (seeded) initialisation and train
        only ``lora_B``.
    seed : int | None
        Seeds the ``lora_A`` initialisation without touching the global RNG, so every
        client gets the same A. None uses the global RNG.

    Returns
    -------
    PeftModel
        The wrapped model (same device and dtype as ``model``).

    Raises
    ------
    ValueError
        No module matched ``lora.target_modules`` within ``scope``.
    """
    scope = lora.scope if scope is None else scope
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_modules(model, list(lora.target_modules), scope),
        bias="none",
    )
    try:
        if seed is None:
            peft_model = get_peft_model(model, config)
        else:
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(
            f"`lora.target_modules` {list(lora.target_modules)} matched no module of "
            f"the {scope!r} scope: {err}"
        ) from err
    if ffa:
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return peft_model


def _state_key(param_name: str) -> str:
    """Parameter name -> peft state-dict key (the adapter name is dropped)."""
    return param_name.replace(f".{ADAPTER_NAME}.", ".")


def adapter_state(model: PeftModel, trainable_only: bool = False) -> dict[str, Tensor]:
    """Return the adapter weights as CPU float32 copies, sorted by key.

    Parameters
    ----------
    model : PeftModel
        Model from ``attach_lora``.
    trainable_only : bool
        Keep only weights that are trained (with FFA-LoRA: the ``lora_B`` weights).

    Returns
    -------
    dict[str, Tensor]
        peft ``get_peft_model_state_dict`` keys -> detached tensors.
    """
    state = get_peft_model_state_dict(model)
    if trainable_only:
        trainable = {
            _state_key(n) for n, p in model.named_parameters() if p.requires_grad
        }
        state = {k: v for k, v in state.items() if k in trainable}
    return {
        k: state[k].detach().to("cpu", torch.float32).clone() for k in sorted(state)
    }


def load_adapter_state(
    model: PeftModel,
    state: Mapping[str, Tensor | np.ndarray],
    strict: bool = True,
) -> None:
    """Copy adapter weights (e.g. the global adapter) into ``model`` in place.

    Parameters
    ----------
    model : PeftModel
        Model from ``attach_lora``.
    state : Mapping[str, Tensor | np.ndarray]
        Keys as produced by ``adapter_state``; cast to the model's device and dtype.
    strict : bool
        Require every adapter weight. With False, missing keys keep their current
        values (e.g. FFA-LoRA, where only ``lora_B`` travels).

    Raises
    ------
    KeyError
        Unexpected keys, or missing keys when ``strict``.
    ValueError
        A tensor whose shape differs from the model's.
    """
    expected = get_peft_model_state_dict(model)
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state)) if strict else []
    if unexpected or missing:
        raise KeyError(
            f"Adapter state does not match the model: {len(missing)} missing "
            f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}."
        )
    tensors = {k: torch.as_tensor(v) for k, v in state.items()}
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"Adapter weight {key!r} has shape {tuple(value.shape)}, the model "
                f"expects {tuple(expected[key].shape)} (different `lora.r`?)."
            )
    set_peft_model_state_dict(model, tensors)


def save_adapter(
    model: PeftModel, path: str | Path, config_yaml: str | None = None
) -> Path:
    """Save the adapter (``adapter_config.json`` + weights) and the resolved config.

    Parameters
    ----------
    model : PeftModel
        Model from ``attach_lora``.
    path : str | Path
        Directory (created). ``PeftModel.from_pretrained(base, path)`` reloads it.
    config_yaml : str | None
        The run's resolved config, written as ``config.yaml`` beside the adapter.

    Returns
    -------
    Path
        The directory.
    """
    path = Path(path)
    model.save_pretrained(str(path))
    if config_yaml is not None:
        (path / "config.yaml").write_text(config_yaml)
    return path


def load_adapter(base: nn.Module, path: str | Path, trainable: bool = False) -> Any:
    """``PeftModel.from_pretrained(base, path)`` for a directory from ``save_adapter``.

    Raises
    ------
    FileNotFoundError
        ``path`` holds no ``adapter_config.json``.
    """
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"No adapter at {str(path)!r} (adapter_config.json missing)."
        )
    return PeftModel.from_pretrained(base, str(path), is_trainable=trainable)
