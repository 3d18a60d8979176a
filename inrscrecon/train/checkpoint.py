"""Atomic training checkpoints (temp file + rename) that load with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from inrscrecon.data.io import atomic_path
from inrscrecon.errors import InputError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically."""
    final, tmp = atomic_path(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` without unpickling arbitrary objects."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"{path}: unreadable or truncated checkpoint ({type(exc).__name__}: {exc})"
        ) from None
