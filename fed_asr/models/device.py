"""Device, dtype and CPU thread settings, and moving batches onto the model's device."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn a device setting into a ``torch.device``.

    Parameters
    ----------
    spec : str | torch.device
        ``"auto"`` (CUDA when available, else CPU), or any ``torch.device`` string such
        as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``.

    Returns
    -------
    torch.device
        The device to place the model and batches on.

    Raises
    ------
    ValueError
        ``spec`` names CUDA but no CUDA device is available, or is not a device.
    """
    if isinstance(spec, torch.device):
        device = spec
    elif spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(spec)
        except RuntimeError as err:
            raise ValueError(
                f"`model.device` must be 'auto' or a torch device, got {spec!r}."
            ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"`model.device` is {spec!r} but CUDA is not available; use 'auto' or "
            "'cpu'."
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Model dtype for ``name`` on ``device``; half precision only on CUDA.

    Parameters
    ----------
    name : str
        ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    device : torch.device
        Where the model runs.

    Returns
    -------
    torch.dtype
        ``float32`` on CPU whatever ``name`` says (with a warning), else ``name``.

    Raises
    ------
    ValueError
        Unknown dtype name.
    """
    if name not in _DTYPES:
        raise ValueError(
            f"`model.dtype` must be one of {sorted(_DTYPES)}, got {name!r}."
        )
    dtype = _DTYPES[name]
    if dtype != torch.float32 and device.type != "cuda":
        warnings.warn(
            f"`model.dtype={name}` specified but will be ignored when running on "
            f"{device.type}: using float32.",
            stacklevel=2,
        )
        return torch.float32
    return dtype


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """Floating dtype of the model's first floating parameter."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def move_batch(
    batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Move every tensor of a collated batch to ``device``.

    Parameters
    ----------
    batch : Mapping[str, Any]
        Output of ``VQACollator``; non-tensor values are kept as they are.
    device : torch.device
        Target device.
    dtype : torch.dtype | None
        When given, floating tensors (``pixel_values``) are cast to it; integer and
        boolean tensors keep their dtype.

    Returns
    -------
    dict[str, Any]
        A new dict; the input is not modified.
    """
    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            cast = dtype if dtype is not None and value.is_floating_point() else None
            value = value.to(device=device, dtype=cast, non_blocking=True)
        moved[key] = value
    return moved


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block on ``count`` intra-op CPU threads, then restore the earlier count.

    torch's CPU kernels split their work by thread, so one computation on another
    thread count can differ in the last bits, and training amplifies that (Adam turns
    tiny gradient differences into full steps). Fixing the count makes a result depend
    on the config alone, not on the launcher (Ray gives each actor its reservation
    as ``OMP_NUM_THREADS``) or the machine's core count.
    """
    if count < 1:
        raise ValueError(f"A thread count must be >= 1, got {count}.")
    before = torch.get_num_threads()
    if before != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
