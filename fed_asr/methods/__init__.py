"""Continual-learning methods as plug-ins: one module per method.

A method is a :class:`ContinualMethod` subclass plus an options dataclass, bound by
``register_method(name, cls, options_cls)``; its stage-end needs are declared as a
:class:`StageEndPlan` that both engines execute (``fed_asr.schedule``). Adding a
method = one module here (imported below) + one ``configs/method/<name>.yaml``.
"""

from fed_asr.methods import (
    asr,
    asr_conditional,
    asr_local,
    asr_plus,
    attention_distill,
    ewc,
    fedprox,
    frozen_attention,
    joint,
    lwf,
    spectral_distill,
    vanilla,
)
from fed_asr.methods.base import (
    PREVIOUS_ADAPTER,
    ContinualMethod,
    MethodMemory,
    NoOptions,
    StageEndPlan,
    StepContext,
    preserve_requires_grad,
    trainable_parameters,
)
from fed_asr.methods.registry import (
    METHODS,
    MethodEntry,
    build_method,
    method_entry,
    method_options,
    register_method,
    unregister_method,
)

__all__ = [
    "METHODS",
    "PREVIOUS_ADAPTER",
    "ContinualMethod",
    "MethodEntry",
    "MethodMemory",
    "NoOptions",
    "StageEndPlan",
    "StepContext",
    "asr",
    "asr_conditional",
    "asr_local",
    "asr_plus",
    "attention_distill",
    "build_method",
    "ewc",
    "fedprox",
    "frozen_attention",
    "joint",
    "lwf",
    "method_entry",
    "method_options",
    "preserve_requires_grad",
    "spectral_distill",
    "register_method",
    "trainable_parameters",
    "unregister_method",
    "vanilla",
]
