"""Benchmark instrumentation: log every ``load_base_model`` call with the process id.

``benchmarks/bench_sim.py`` puts this folder first on ``PYTHONPATH`` of the simulation
subprocess and sets ``FED_ASR_BENCH_LOAD_LOG``; Python imports ``sitecustomize`` at
start-up in that process and in every Ray worker it spawns (they inherit the
environment). Once ``fed_asr.models.loading`` has executed, its ``load_base_model`` is
wrapped so each call appends one JSON line ``{"pid", "start", "seconds"}`` to the log,
before ``fed_asr.models`` re-exports it. Nothing else changes. Without the environment
variable this module does nothing.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import sys
import time
from types import ModuleType
from typing import Any

_LOG = os.environ.get("FED_ASR_BENCH_LOAD_LOG")
_TARGET = "fed_asr.models.loading"


def _wrap(module: ModuleType) -> None:
    original = module.load_base_model

    @functools.wraps(original)
    def load_base_model(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        result = original(*args, **kwargs)
        line = {"pid": os.getpid(), "start": start, "seconds": time.time() - start}
        with open(_LOG, "a") as handle:  # type: ignore[arg-type]
            handle.write(json.dumps(line) + "\n")
        return result

    module.load_base_model = load_base_model


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _wrap(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


if _LOG:
    sys.meta_path.insert(0, _Finder())
