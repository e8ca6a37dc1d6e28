"""The rules every registry of the library follows (methods, streams, families, ...).

Names are unique snake_case strings; registering a taken name raises ``KeyError``; a
failed lookup raises ``KeyError`` listing the choices (the model is peft's
``register_peft_method``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")

SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def check_new_name(registry: Mapping[str, object], name: str, kind: str) -> None:
    """Refuse ``name`` for a new ``kind`` entry of ``registry``.

    Raises
    ------
    ValueError
        ``name`` is not snake_case.
    KeyError
        ``name`` is already registered.
    """
    if not isinstance(name, str) or not SNAKE_CASE.match(name):
        raise ValueError(f"{kind.capitalize()} names are snake_case, got {name!r}.")
    if name in registry:
        raise KeyError(f"{kind.capitalize()} {name!r} is already registered.")


def lookup(registry: Mapping[str, T], name: str, kind: str) -> T:
    """The ``kind`` entry ``name`` of ``registry``.

    Raises
    ------
    KeyError
        Unknown name; the message lists the choices.
    """
    if name not in registry:
        raise KeyError(f"Unknown {kind} {name!r}. Available: {sorted(registry)}.")
    return registry[name]
