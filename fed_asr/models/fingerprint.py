"""A fingerprint of the frozen base model's weights, recorded in every ``metrics.json``.

Two runs are comparable seed by seed only when they start from the same base. A tiny
base prepared by another code version, or on another thread count, can differ in its
last bits and send every run apart (docs/findings.md, "Reproducibility"); the cache
key of its directory does not show that, the weights do.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

# Peft's names for what it adds: the adapters themselves and the trainable copies of
# ``modules_to_save``; the frozen original of a wrapped module lives on under
# ``original_module`` / ``base_layer`` and is part of the base.
_ADAPTER_MARKERS = ("lora_", "modules_to_save.")
_PEFT_PREFIX = "base_model.model."


def base_parameter_name(name: str) -> str | None:
    """The name a base parameter has in the unwrapped model, or None for an adapter's.

    ``base_model.model.x.q_proj.base_layer.weight`` -> ``x.q_proj.weight``; a plain
    transformers name is returned unchanged.
    """
    if any(marker in name for marker in _ADAPTER_MARKERS):
        return None
    name = name.removeprefix(_PEFT_PREFIX)
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def base_fingerprint(model: Any) -> str:
    """SHA-256 of the base's parameters (names, dtypes, shapes, bytes), hex.

    Adapter weights are left out, so the fingerprint is the same before and after
    training and with or without the peft wrapper; tied parameters count once. Runs
    on whatever device holds the weights, copying one tensor at a time to the CPU.
    """
    named: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():  # tied weights are yielded once
        base_name = base_parameter_name(name)
        if base_name is not None:
            named[base_name] = param
    digest = hashlib.sha256()
    for name in sorted(named):
        tensor = named[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        flat = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
