"""Helpers shared by the Triton kernels: bf16 rounding, the stable softplus, dot precision (import only
torch and triton)."""

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


@triton.jit
def _softplus_and_sigmoid(z):
    """softplus(z) and its derivative sigmoid(z), both stable for any z (fp32 in, fp32 out)."""
    e = tl.exp(-tl.abs(z))  # in (0, 1]: no overflow
    pred = tl.maximum(z, 0.0) + tl.log(1.0 + e)
    sig = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return pred, sig


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot for operands of ``dtype``: fp32 follows torch's TF32 switch (exact
    "ieee" by default); half types ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
