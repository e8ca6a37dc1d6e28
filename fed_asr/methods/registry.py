"""Registry binding each method's class to its typed options dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fed_asr.config import MethodConfig, RegularizerConfig
from fed_asr.methods.base import ContinualMethod
from fed_asr.registry import check_new_name, lookup


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its class and its options dataclass."""

    method_class: type[ContinualMethod]
    options_class: type


METHODS: dict[str, MethodEntry] = {}


def register_method(
    name: str, method_class: type[ContinualMethod], options_class: type
) -> None:
    """Register a method under a unique snake_case name with its options dataclass.

    Raises
    ------
    KeyError
        The name is taken.
    ValueError
        The name is not snake_case, or ``options_class`` is not a dataclass.
    """
    check_new_name(METHODS, name, "method")
    if not dataclasses.is_dataclass(options_class):
        raise ValueError(
            f"Options of method {name!r} must be a dataclass, got {options_class!r}."
        )
    METHODS[name] = MethodEntry(method_class, options_class)


def unregister_method(name: str) -> None:
    """Remove a registered method (tests that register their own)."""
    METHODS.pop(name, None)


def method_entry(name: str) -> MethodEntry:
    """The registered entry of ``name``.

    Raises
    ------
    KeyError
        Unknown name; the message lists the choices.
    """
    return lookup(METHODS, name, "method")


def method_options(name: str, options: Any) -> Any:
    """The typed options of method ``name`` from a dataclass, a mapping or None.

    Raises
    ------
    ValueError
        A key the method does not have (named), or a value its dataclass refuses.
    """
    cls = method_entry(name).options_class
    if isinstance(options, cls):
        return options
    values = dict(options or {}) if isinstance(options, Mapping | type(None)) else None
    if values is None:
        values = dataclasses.asdict(options)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"`method.options.{unknown[0]}` is not an option of method {name!r}. "
            f"Options: {sorted(known)}."
        )
    return cls(**values)


def build_method(
    method: MethodConfig, regularizer: RegularizerConfig
) -> ContinualMethod:
    """Instantiate the method named by ``method.name`` with its typed options.

    Raises
    ------
    KeyError
        Unknown name; the message lists the choices.
    """
    entry = method_entry(method.name)
    return entry.method_class(method_options(method.name, method.options), regularizer)
