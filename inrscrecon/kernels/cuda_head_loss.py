"""Gene head + RMSE + λ·KL on the compiled extension: cuBLAS / MKL GEMMs and one fused loss pass per row chunk.

The C++ ops ``inrscrecon::gemm_sparse_head_loss`` / ``gemm_sparse_head_loss_backward`` (csrc/sparse_head.cpp,
CPU and CUDA implementations; the CUDA row pass is csrc/cuda/sparse_head_kernel.cu) take the batch's targets as
CSR rows and follow the contract of :func:`inrscrecon.field.losses.sparse_head_loss_reference`: (loss, rmse, kl)
fp32 scalars, rows weighted by ``row_weight``, slots past indptr[B] ignored, genes unique within a row (any
order). This module registers their fake (shape) implementations and their autograd formula, so
``torch.compile(fullgraph=True)`` traces them as opaque nodes.

How a step runs (rows in chunks of C, a [C, M] workspace in the GEMM dtype, 64 MiB by default):
    z = addmm(b, h_c, Wᵀ)                         GEMM 1 (cuBLAS: tensor cores in bf16 / fp16, TF32 if enabled)
    one pass over z with the chunk's CSR rows     per-row SSE, KL statistics; z ← dz = ∂L/∂z in place
    gh_c = dz·W,  gW += dzᵀ·h_c,  gb += Σ dz      GEMMs 2 and 3
Gradient (w_b row weight, p = softplus(z), q = p + ε, s_b = Σ q, S_b = Σ_nz t + M ε, KL_b per row)::

    dz = w_b · sigmoid(z) · [c_r (p − t) + c_k (log q − log(t + ε) + off_b) / s_b],  off_b = log S_b − log s_b − KL_b
    c_r = (ḡ_loss + ḡ_rmse) / (M Σw RMSE),   c_k = (λ ḡ_loss + ḡ_kl) / Σw

* λ = 0 (the default loss): dz / c_r depends on no batch statistic, so the forward forms the unscaled
  gradients while it computes the loss and the backward multiplies them by c_r (the Liger pattern):
  **3 GEMM passes** per step instead of the five of a recomputing head.
* λ ≠ 0: c_r and c_k are known only in the backward; the forward is one GEMM pass (statistics), the backward
  recomputes the logits chunk by chunk (three passes): **4 in all**. The KL term is fully supported.

Memory beyond inputs and gradients: the [C, M] workspace, [CAP] fp32 scratch and [B, 4] fp32 row statistics;
with λ = 0 the forward also holds the unscaled fp32 gradients ([B, W] + [M, W] + [M]) until the backward.
Mixed precision: the GEMMs run in the inputs' dtype (under autocast the wrapper casts to the autocast dtype;
the casts are differentiable, so fp32 master weights get fp32 gradients); the loss pass computes in fp32
(double sums on CPU), dz is rounded to the GEMM dtype as a GEMM operand, gW and gb accumulate in fp32.

:func:`cuda_head_loss` keeps the dense-target entry point: it turns the dense target into CSR rows (the
non-zeros; eager only, data-dependent shapes) and calls the same op.

Imports torch only; the extension is imported at import time when present (it registers the ops), otherwise
the functions raise RuntimeError naming what is missing.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from inrscrecon.kernels.ops import compute_dtype, needs_grad, sparse_head_grads, sparse_head_setup

KL_EPS = 1e-2  # same default as inrscrecon.field.losses.KL_EPS (not imported: kernels depend on torch only)
FWD = "inrscrecon::gemm_sparse_head_loss"
BWD = "inrscrecon::gemm_sparse_head_loss_backward"


def _load() -> tuple[ModuleType | None, str]:
    try:
        mod = importlib.import_module("inrscrecon._C")
    except ImportError as err:
        return None, (
            "the compiled extension inrscrecon._C is not built "
            f"(pip install --no-build-isolation -e .): {err}"
        )
    if not hasattr(torch.ops.inrscrecon, "gemm_sparse_head_loss"):
        return None, "inrscrecon._C predates the gemm_sparse_head_loss op (rebuild the extension)"
    return mod, ""


_EXT, _WHY = _load()


def unavailable(device: str | torch.device = "cpu") -> str:
    """Why the op cannot run on ``device`` ("" when it can): not built, or CUDA tensors without CUDA ops."""
    if _EXT is None:
        return _WHY
    dev = torch.device(device)
    if dev.type == "cuda":
        if not getattr(_EXT, "with_cuda", False):
            return "inrscrecon._C was built without CUDA ops (CPU-only torch or no nvcc at build time)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
    elif dev.type != "cpu":
        return f"the compiled op has CPU and CUDA implementations only, got {dev.type}"
    return ""


def is_available(device: str | torch.device = "cpu") -> bool:
    """True when the compiled op can run on ``device`` (CPU: the extension is built; CUDA: built with CUDA)."""
    return not unavailable(device)


def _require(device: torch.device) -> None:
    why = unavailable(device)
    if why:
        raise RuntimeError(f"gemm_sparse_head_loss: {why}")


# ------------------------------------------------------------------------------------------------------------
# torch.library registrations (fake shapes + autograd) of the C++ ops
# ------------------------------------------------------------------------------------------------------------


def _fwd_fake(
    hidden, weight, bias, indptr, indices, values, row_weight, lambda_kl, kl_eps, grad_in_forward, chunk_rows
):
    n_rows, width = hidden.shape
    n_genes = weight.shape[0]
    f32 = torch.float32
    g = bool(grad_in_forward)
    return (
        hidden.new_empty((), dtype=f32),
        hidden.new_empty((), dtype=f32),
        hidden.new_empty((), dtype=f32),
        hidden.new_empty(n_rows, 2, dtype=f32),
        hidden.new_empty((), dtype=f32),
        hidden.new_empty((n_rows, width) if g else (0, 0), dtype=f32),
        hidden.new_empty((n_genes, width) if g else (0, 0), dtype=f32),
        hidden.new_empty(n_genes if g else 0, dtype=f32),
    )


def _bwd_fake(
    hidden, weight, bias, indptr, indices, values, row_weight, rowstat, coef, kl_eps, has_kl, chunk_rows
):
    f32 = torch.float32
    return (
        hidden.new_empty(hidden.shape, dtype=f32),
        hidden.new_empty(weight.shape, dtype=f32),
        hidden.new_empty(weight.shape[0], dtype=f32),
    )


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    sparse_head_setup(ctx, inputs, output)
    ctx.chunk_rows = int(inputs[10])


def _backward(ctx: Any, g_loss: Tensor, g_rmse: Tensor, g_kl: Tensor, *_: Any) -> tuple[Any, ...]:
    # a perfect fit (RMSE at the 1e-15 floor, where the reference's clamp has zero gradient) gives c_r = 0
    grads = sparse_head_grads(
        ctx, g_loss, g_rmse, g_kl, torch.ops.inrscrecon.gemm_sparse_head_loss_backward, ctx.chunk_rows,
        rmse_floor=1e-15,
    )  # fmt: skip
    return (*grads, *([None] * 8))


@functools.cache
def _register() -> None:
    torch.library.register_fake(FWD)(_fwd_fake)
    torch.library.register_fake(BWD)(_bwd_fake)
    torch.library.register_autograd(FWD, _backward, setup_context=_setup)


if _EXT is not None:
    _register()


# ------------------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------------------


def gemm_sparse_head_loss(
    hidden: Tensor,  # [B, W]
    weight: Tensor,  # [M, W]
    bias: Tensor | None,  # [M]
    indptr: Tensor,  # [B+1] int64 CSR row offsets
    indices: Tensor,  # [CAP] int32/int64 gene of each non-zero (unique within a row, any order)
    values: Tensor,  # [CAP] fp32 target of each non-zero
    lambda_kl: float = 0.0,
    kl_eps: float = KL_EPS,
    row_weight: Tensor | None = None,  # [B] fp32, 0 = padding row
    chunk_rows: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """softplus(h Wᵀ + b) against CSR targets → (RMSE + λ·KL, RMSE, KL) fp32 scalars, on CPU or CUDA tensors.

    Contract of ``sparse_head_loss_reference``; gradients to hidden, weight and bias. ``chunk_rows`` bounds the
    [C, M] logits workspace (0: 64 MiB worth of rows). Under autocast the GEMMs run in the autocast dtype.
    Raises RuntimeError when the extension (with CUDA ops, for CUDA tensors) is not built.
    """
    _require(hidden.device)
    dt = compute_dtype(hidden, weight)
    h, w = hidden.to(dt), weight.to(dt)
    b = bias.to(dt) if bias is not None else None
    grad_in_forward = lambda_kl == 0 and needs_grad(h, w, b)
    rw = row_weight.float() if row_weight is not None else None
    out = torch.ops.inrscrecon.gemm_sparse_head_loss(
        h,
        w,
        b,
        indptr,
        indices,
        values.float(),
        rw,
        float(lambda_kl),
        float(kl_eps),
        grad_in_forward,
        chunk_rows,
    )
    return out[0], out[1], out[2]


def dense_to_csr(target: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # target: [B, M]
    """(indptr [B+1] int64, indices [nnz] int64, values [nnz] fp32) of the non-zeros of a dense target."""
    mask = target != 0
    counts = mask.sum(dim=1)
    indptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).long()
    nz = mask.nonzero()
    return indptr, nz[:, 1].contiguous(), target[mask].float().contiguous()


def cuda_head_loss(
    hidden: Tensor,  # [B, W]
    weight: Tensor,  # [M, W]
    bias: Tensor | None,  # [M]
    target: Tensor,  # [B, M]
    lambda_kl: float = 1.0,
    kl_eps: float = KL_EPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense-target head + RMSE + λ·KL → (loss, rmse, kl), the contract of ``head_loss_reference``.

    The target's non-zeros become CSR rows (eager: data-dependent shapes) for :func:`gemm_sparse_head_loss`;
    the target gets no gradient.
    """
    indptr, indices, values = dense_to_csr(target.detach())
    return gemm_sparse_head_loss(hidden, weight, bias, indptr, indices, values, lambda_kl, kl_eps)


__all__ = ["cuda_head_loss", "dense_to_csr", "gemm_sparse_head_loss", "is_available", "unavailable"]
