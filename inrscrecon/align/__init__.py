"""Alignment stage: expression-matched, robust rigid registration of consecutive sections into one 3D frame."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inrscrecon.align.pipeline import AlignConfig, AlignmentResult, PairResult, align

__all__ = ["AlignConfig", "AlignmentResult", "PairResult", "align"]


def __getattr__(name: str) -> Any:  # lazy: `inrscrecon align --help` must not import torch
    if name in __all__:
        return getattr(importlib.import_module("inrscrecon.align.pipeline"), name)
    raise AttributeError(f"module 'inrscrecon.align' has no attribute {name!r}")
