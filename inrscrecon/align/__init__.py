"""Alignment stage: expression-matched, robust rigid registration of consecutive sections into one 3D frame."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inrscrecon.align.pipeline import AlignConfig, AlignmentResult, PairResult, align

__all__ = ["AlignConfig", "AlignmentResult", "PairResult", "align"]


def __getattr__(name: str) -> Any:  # lazy: `inrscrecon align --help` must not import torch
    if name in __all__:
        return getattr(importlib.import_module("inrscrecon.align.pipeline"), name)
    raise AttributeError(f"module 'inrscrecon.align' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """The subpackage, callable as :func:`align`: ``inrscrecon.align(sections, ...)`` works whether that name
    is the function or, after ``import inrscrecon.align``, this module."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return importlib.import_module("inrscrecon.align.pipeline").align(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
