"""Triton kernels (and, beside them, the CUDA extension wrapper) for the hot path of the field.

Import the op modules directly (``inrscrecon.kernels.triton_head_loss``, ``...triton_trunk``); this package
imports nothing heavy so that ``import inrscrecon.kernels`` works without Triton installed. The public switch
between implementations is :mod:`inrscrecon.field.fused`.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


__all__ = ["interpreting"]
