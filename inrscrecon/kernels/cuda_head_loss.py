"""Fused gene head + RMSE + KL loss on the compiled CUDA extension (csrc/cuda/head_loss_kernel.cu).

Same contract as :func:`inrscrecon.field.losses.head_loss_reference`: pred = softplus(h Wᵀ + b),
loss = RMSE(pred, t) + λ·KL(P̂ ‖ P), returning (loss, rmse, kl) as fp32 scalars, all three differentiable
w.r.t. hidden, weight and bias. The [B, M] prediction is never stored: the forward kernel reduces each tile to
per-row statistics (fp64 [B, 5]) and the backward kernels recompute the tiles.

From the row statistics (SSE_b, s_b = Σq, A_b = Σ q log q, C_b = Σ q log p, S_b = Σp; q = pred + ε, p = t + ε):
    RMSE = sqrt(Σ_b SSE_b / (B·M)),   KL_b = A_b/s_b − log s_b − C_b/s_b + log S_b,   KL = mean_b KL_b.
Backward (derivation in the .cu): with upstream gradients (g_loss, g_rmse, g_kl),
    dL/dpred = c_rmse·(pred − t) + c_kl·(1/s_b)(log q − log p + log S_b − log s_b − KL_b)
    c_rmse = (g_loss + g_rmse) / (B·M·RMSE)    (0 when RMSE = 0: the subgradient at a perfect fit)
    c_kl   = (λ·g_loss + g_kl) / B
Memory: O(B + M) extra instead of the [B, M] fp32 prediction and its saved activations.

Routing: this kernel is SIMT (32×32 fp32 shared-memory tiles, scalar FMAs, no tensor cores; grids of M/32 or
B/32 blocks), so ``backend="auto"`` never picks it for existing: only when the measured backend table
(``inrscrecon/field/backend_table.json``) says it is the fastest on the device and shape. ``backend="cuda"``
still selects it explicitly. It has no sparse-target variant; the sparse path is Triton.

Imports torch only; the extension is imported lazily so ``inrscrecon.kernels`` needs torch (+ triton) alone.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

KL_EPS = 1e-2  # same default as inrscrecon.field.losses.KL_EPS (not imported: kernels depend on torch only)


def _ext() -> ModuleType:
    try:
        mod = importlib.import_module("inrscrecon._C")
    except ImportError as err:
        raise RuntimeError(
            "cuda_head_loss needs the compiled extension inrscrecon._C built with CUDA "
            f"(pip install --no-build-isolation -e . on a machine with nvcc and CUDA torch): {err}"
        ) from None
    if not getattr(mod, "with_cuda", False):
        raise RuntimeError(
            "inrscrecon._C was built without CUDA ops (CPU-only torch or no nvcc at build time)"
        )
    return mod


def is_available() -> bool:
    """True when the CUDA ops are compiled in and a CUDA device is visible."""
    try:
        _ext()
    except RuntimeError:
        return False
    return torch.cuda.is_available()


class CudaHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # [B, W]
        weight: torch.Tensor,  # [M, W]
        bias: torch.Tensor | None,  # [M]
        target: torch.Tensor,  # [B, M]
        lambda_kl: float,
        kl_eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ext = _ext()
        dtype = hidden.dtype
        weight_c = weight.to(dtype)
        bias_c = None if bias is None else bias.to(dtype)
        target_c = target.to(dtype)
        n_rows, n_genes = target.shape
        stats = ext.head_loss_forward(hidden, weight_c, bias_c, target_c, float(kl_eps))  # [B, 5] fp64
        sse, s, a, c, big_s = stats.unbind(1)
        rmse = torch.sqrt(sse.sum() / (n_rows * n_genes))
        kl_rows = a / s - torch.log(s) - c / s + torch.log(big_s)  # [B]
        kl = kl_rows.mean() if lambda_kl != 0 else torch.zeros((), dtype=torch.float64, device=hidden.device)
        # row_aux [B, 2] = (1/s_b, log S_b − log s_b − KL_b), the per-row constants of dKL_b/dq
        row_aux = torch.stack([1.0 / s, torch.log(big_s) - torch.log(s) - kl_rows], dim=1).float()
        ctx.save_for_backward(hidden, weight_c, bias_c, target_c, row_aux, rmse)
        ctx.lambda_kl = float(lambda_kl)
        ctx.kl_eps = float(kl_eps)
        ctx.has_bias = bias is not None
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = rmse + lambda_kl * kl
        return loss.float(), rmse.float(), kl.float()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_loss: torch.Tensor | None, g_rmse: torch.Tensor | None, g_kl: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, target, row_aux, rmse = ctx.saved_tensors
        n_rows, n_genes = target.shape
        zero = torch.zeros((), dtype=torch.float64, device=hidden.device)
        gl = zero if g_loss is None else g_loss.double()
        gr = zero if g_rmse is None else g_rmse.double()
        gk = zero if g_kl is None else g_kl.double()
        # d(loss)/d(rmse) = 1 and d(loss)/d(kl) = λ; the kl output is a constant 0 when λ = 0
        c_rmse = torch.where(rmse > 0, (gl + gr) / (n_rows * n_genes * rmse.clamp_min(1e-300)), zero)
        c_kl = (ctx.lambda_kl * gl + gk) / n_rows if ctx.lambda_kl != 0 else zero
        coef = torch.stack([c_rmse, c_kl]).float()  # stays on the device: no host sync
        grad_h, grad_w, grad_b = _ext().head_loss_backward(
            hidden, weight, bias, target, row_aux, coef, ctx.kl_eps
        )
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_bias = grad_b.to(b_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (
            grad_h.to(h_dtype) if ctx.needs_input_grad[0] else None,
            grad_w.to(w_dtype) if ctx.needs_input_grad[1] else None,
            grad_bias,
            None,
            None,
            None,
        )


def cuda_head_loss(
    hidden: torch.Tensor,  # [B, W]
    weight: torch.Tensor,  # [M, W]
    bias: torch.Tensor | None,  # [M]
    target: torch.Tensor,  # [B, M]
    lambda_kl: float = 1.0,
    kl_eps: float = KL_EPS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused softplus head + RMSE + λ·KL on CUDA tensors → (loss, rmse, kl), fp32 scalars.

    Inputs may be fp32, bf16 or fp16 (weight / bias / target are cast to hidden's dtype); the kernel computes in
    fp32 with fp64 row reductions. The target gets no gradient. Raises RuntimeError when the extension was not
    built with CUDA.
    """
    if not hidden.is_cuda:
        raise RuntimeError(f"cuda_head_loss needs CUDA tensors, got hidden on {hidden.device}")
    loss, rmse, kl = CudaHeadLoss.apply(hidden, weight, bias, target, lambda_kl, kl_eps)
    return loss, rmse, kl


__all__ = ["CudaHeadLoss", "cuda_head_loss", "is_available"]
