"""``fed-asr --help`` and ``fed-asr --cfg``: what can be set, and what a run would use.

``--help`` lists the config groups under ``configs/`` with their choices (the
default marked) and every field of the default config with its value. ``--cfg
[job]`` (Hydra's flag) prints the resolved config of the given overrides as YAML and
exits without running anything.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Sequence
from typing import Any

import yaml

from fed_asr.config import CONFIG_DIR, ExperimentConfig

CFG_FLAGS = ("--cfg", "-c")
CFG_KINDS = ("job", "all")  # Hydra's names; fed-asr composes no `hydra` node
_WIDTH = 88


def pop_cfg_flag(args: list[str]) -> bool:
    """Remove ``--cfg [job|all]`` (or ``-c``) from ``args``; True if it was there.

    Raises
    ------
    ValueError
        ``--cfg hydra`` or another kind: only the job config exists here.
    """
    for i, arg in enumerate(args):
        if arg not in CFG_FLAGS:
            continue
        del args[i]
        if i < len(args) and "=" not in args[i] and not args[i].startswith("-"):
            kind = args.pop(i)
            if kind not in CFG_KINDS:
                raise ValueError(
                    f"`{arg} {kind}`: fed-asr prints only the job config; use "
                    f"`{arg}` or `{arg} job`."
                )
        return True
    return False


def help_text(usage: str, config_name: str = "config") -> str:
    """The ``--help`` page: ``usage``, the flags, the groups and the fields.

    Parameters
    ----------
    usage : str
        The console script's docstring.
    config_name : str
        Primary config whose defaults are shown.

    Returns
    -------
    str
        The page (composing the default config takes about a second).
    """
    from fed_asr.config import compose_config

    cfg = compose_config(config_name, [])
    flags = [
        ("-h, --help", "this page"),
        (
            "--config-name=NAME",
            f"primary config under configs/: {', '.join(primary_configs())} "
            "(default: config)",
        ),
        ("--cfg [job], -c", "print the resolved config (YAML) and exit; nothing runs"),
    ]
    lines = [usage.strip(), "", "Flags:"]
    lines += [f"  {flag:<20} {text}" for flag, text in flags]
    lines += ["", "Config groups (GROUP=CHOICE; * = default):"]
    lines += group_lines(config_name)
    lines += ["", "Fields (KEY=VALUE; the default config's values):"]
    lines += field_lines(cfg)
    return "\n".join(lines)


def group_lines(config_name: str = "config") -> list[str]:
    """One line per config group: ``  method     asr*, ewc, ...``."""
    chosen = group_choices(config_name)
    lines = []
    for group in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir()):
        choices = sorted(p.stem for p in group.glob("*.yaml"))
        marked = [f"{c}*" if chosen.get(group.name) == c else c for c in choices]
        lines.append(f"  {group.name:<10} {', '.join(marked)}")
    return lines


def primary_configs() -> list[str]:
    """Names of the primary configs (``configs/*.yaml``) for ``--config-name``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def group_choices(config_name: str) -> dict[str, str]:
    """The group choices of a primary config's defaults list, following a primary
    config it extends (``- config``) and its ``override GROUP: CHOICE`` entries."""
    chosen: dict[str, str] = {}
    primary = yaml.safe_load((CONFIG_DIR / f"{config_name}.yaml").read_text()) or {}
    for entry in primary.get("defaults", []):
        if isinstance(entry, str) and (CONFIG_DIR / f"{entry}.yaml").is_file():
            chosen.update(group_choices(entry))
        elif isinstance(entry, dict):
            for key, value in entry.items():
                chosen[str(key).removeprefix("override ").strip()] = str(value)
    return chosen


def field_lines(cfg: ExperimentConfig) -> list[str]:
    """Every field of ``cfg`` as ``key=value``, one wrapped block per section."""
    top, sections = [], []
    for item in dataclasses.fields(cfg):
        value = getattr(cfg, item.name)
        if dataclasses.is_dataclass(value):
            sections.append((item.name, _leaves(value, f"{item.name}.")))
        else:
            top.append(f"{item.name}={_show(value)}")
    lines = []
    for name, tokens in [("(top)", top), *sections]:
        lines += textwrap.wrap(
            " ".join(tokens),
            _WIDTH,
            initial_indent=f"  {name + ':':<13} ",
            subsequent_indent=" " * 16,
            break_on_hyphens=False,
        )
    return lines


def _leaves(node: Any, prefix: str) -> list[str]:
    """``prefix.key=value`` of every leaf field of a dataclass."""
    tokens = []
    for item in dataclasses.fields(node):
        value = getattr(node, item.name)
        if dataclasses.is_dataclass(value):
            tokens += _leaves(value, f"{prefix}{item.name}.")
        else:
            tokens.append(f"{prefix}{item.name}={_show(value)}")
    return tokens


def _show(value: Any) -> str:
    """A value as it is written in an override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[" + ",".join(_show(v) for v in value) + "]"
    text = str(value)
    return repr(text) if " " in text else text
