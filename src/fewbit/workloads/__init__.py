"""Reference workloads on offline data: each is data + model + metric + YAML configs (see :mod:`.base`).

``get(name)`` returns a workload class, ``names()`` lists them. Runs (train, save, load, evaluate) live in
:mod:`.run`.
"""

from __future__ import annotations

import importlib

from fewbit.workloads.base import Source, TrainSettings, Workload

_REGISTRY = {
    "translate": ("fewbit.workloads.translate", "Translate"),
    "lm": ("fewbit.workloads.lm", "LanguageModel"),
    "vision": ("fewbit.workloads.vision", "Vision"),
    "asr": ("fewbit.workloads.asr", "SpeechRecognition"),
    "hf": ("fewbit.workloads.hf", "HuggingFace"),
}


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> type[Workload]:
    """The workload class called ``name``; an unknown name is an error listing the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(names())}")
    module, attr = _REGISTRY[name]
    return getattr(importlib.import_module(module), attr)


__all__ = ["Source", "TrainSettings", "Workload", "get", "names"]
