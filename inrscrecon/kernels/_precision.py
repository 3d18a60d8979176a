"""Rounding and dot-precision helpers shared by the Triton kernels (import only torch and triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_bf16(x):
    """fp32 → nearest bf16 value (ties to even), kept in fp32; the interpreter's own bf16 cast is inexact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cast(x, dtype, UPCAST: tl.constexpr):
    """fp32 x → dtype with round-to-nearest-even (exact on GPU; patched for bf16 in the interpreter)."""
    if UPCAST:
        if dtype == tl.bfloat16:
            x = _round_bf16(x)
    return x.to(dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot for operands of ``dtype``: fp32 follows torch's TF32 switch (exact
    "ieee" by default); half types ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
