"""``torch.library`` registrations of the fused kernels, so ``torch.compile(fullgraph=True)`` traces a train
step through them (each op is one opaque node with a fake implementation for shapes and a registered
autograd formula; CUDA graphs can capture them).

Ops (namespace ``inrscrecon``):

* ``sparse_head_loss`` / ``sparse_head_loss_backward`` — head + loss against CSR targets
  (:mod:`inrscrecon.kernels.triton_sparse_head_loss`).
* ``head_loss`` / ``head_loss_backward`` — head + loss against a dense target
  (:mod:`inrscrecon.kernels.triton_head_loss`).
* ``trunk`` / ``trunk_backward`` — Fourier encoding + MLP trunk (:mod:`inrscrecon.kernels.triton_trunk`).
* ``count_head_loss`` / ``count_head_loss_backward`` — head + Poisson / NB likelihood against dense or CSR
  counts (:mod:`inrscrecon.kernels.triton_count_loss`); with CSR counts the op's NLL is the η-dependent part
  and :func:`triton_sparse_count_head_loss` adds the (y, θ)-only terms of the non-zeros
  (:func:`csr_count_terms`, plain torch).

The implementations look the kernel modules up at call time (the tests reload them for the Triton
interpreter), so importing this module needs torch only. The public entry points are the functions
below; :mod:`inrscrecon.field.fused` is the switch that calls them.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "csr_count_terms",
    "lgamma_ratio",
    "sort_rows",
    "triton_count_head_loss",
    "triton_sparse_count_head_loss",
    "triton_dense_head_loss",
    "triton_sparse_head_loss",
    "triton_trunk_op",
]


def _mod(name: str) -> ModuleType:
    return importlib.import_module(f"inrscrecon.kernels.{name}")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The matmul dtype: the autocast dtype when autocast is on for the tensors' device, else the promoted
    dtype of the float inputs."""
    dev = tensors[0].device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def needs_grad(*tensors: Tensor | None) -> bool:
    """True when autograd will want gradients of any of ``tensors`` (grad mode on, one requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _scalar(x: Tensor) -> Tensor:
    return x.new_empty((), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------------
# sparse head + loss
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("inrscrecon::sparse_head_loss", mutates_args=())
def _sparse_fwd(
    hidden: Tensor,  # [B, W]
    weight: Tensor,  # [M, W]
    bias: Tensor | None,  # [M]
    indptr: Tensor,  # [B+1] int64
    indices: Tensor,  # [CAP], sorted within rows
    values: Tensor,  # [CAP] fp32
    row_weight: Tensor | None,  # [B]
    lambda_kl: float,
    kl_eps: float,
    grad_in_forward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = _mod("triton_sparse_head_loss").sparse_head_forward(
        hidden, weight, bias, indptr, indices, values, row_weight, lambda_kl, kl_eps, grad_in_forward
    )
    return tuple(out)  # type: ignore[return-value]


@_sparse_fwd.register_fake
def _sparse_fwd_fake(
    hidden, weight, bias, indptr, indices, values, row_weight, lambda_kl, kl_eps, grad_in_forward
):
    n_rows, width = hidden.shape
    n_genes = weight.shape[0]
    f32 = dict(dtype=torch.float32)
    grads = (
        (hidden.new_empty(n_rows, width, **f32), hidden.new_empty(n_genes, width, **f32))
        if grad_in_forward
        else (hidden.new_empty(0, **f32), hidden.new_empty(0, **f32))
    )
    gb = hidden.new_empty(n_genes if grad_in_forward else 0, **f32)
    return (
        _scalar(hidden),
        _scalar(hidden),
        _scalar(hidden),
        hidden.new_empty(2, n_rows, **f32),
        _scalar(hidden),
        *grads,
        gb,
    )


@torch.library.custom_op("inrscrecon::sparse_head_loss_backward", mutates_args=())
def _sparse_bwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    row_weight: Tensor | None,
    rowstat: Tensor,  # [2, B]
    coef: Tensor,  # [2] (c_r, c_k)
    kl_eps: float,
    has_kl: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _mod("triton_sparse_head_loss").sparse_head_backward(
        hidden, weight, bias, indptr, indices, values, row_weight, rowstat, coef, kl_eps, has_kl
    )


def _fp32_grads_like(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fake (shape-only) fp32 gradients of hidden [B, W], weight [M, W] and bias [M]."""
    f32 = torch.float32
    return (
        hidden.new_empty(hidden.shape, dtype=f32),
        hidden.new_empty(weight.shape, dtype=f32),
        hidden.new_empty(weight.shape[0], dtype=f32),
    )


@_sparse_bwd.register_fake
def _sparse_bwd_fake(
    hidden, weight, bias, indptr, indices, values, row_weight, rowstat, coef, kl_eps, has_kl
):
    return _fp32_grads_like(hidden, weight)


def sparse_head_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    """Autograd context of a sparse head op (the Triton and the compiled GEMM op share it): the first ten
    inputs are (hidden, weight, bias, indptr, indices, values, row_weight, lambda_kl, kl_eps, grad_in_forward),
    the outputs (loss, rmse, kl, rowstat, wsum, gh, gw, gb)."""
    hidden, weight, bias, indptr, indices, values, row_weight, lambda_kl, kl_eps, grad_in_forward = inputs[
        :10
    ]
    _, rmse, _, rowstat, wsum, gh, gw, gb = output
    ctx.save_for_backward(
        hidden, weight, bias, indptr, indices, values, row_weight, rowstat, wsum, rmse, gh, gw, gb
    )
    ctx.lambda_kl, ctx.kl_eps, ctx.grad_in_forward = float(lambda_kl), float(kl_eps), bool(grad_in_forward)
    ctx.has_bias = bias is not None


def sparse_head_grads(
    ctx: Any,
    g_loss: Tensor,
    g_rmse: Tensor,
    g_kl: Tensor,
    backward_op: Any,
    *extra: Any,
    rmse_floor: float = 0.0,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients (hidden, weight, bias) of a sparse head op from its :func:`sparse_head_setup` context.

    The coefficients c_r, c_k stay on the device (no host sync). A batch whose rows all have weight 0 (Σw at
    the forward's 1e-30 floor) and an RMSE at or below ``rmse_floor`` give c_r = 0, as the reference: c_r
    would overflow fp32 (1 / (M·1e-45)) and turn the zero sums into NaN. With the gradients formed in the
    forward they are only scaled; otherwise ``backward_op(..., coef, kl_eps, has_kl, *extra)`` recomputes them.
    """
    hidden, weight, bias, indptr, indices, values, row_weight, rowstat, wsum, rmse, gh, gw, gb = (
        ctx.saved_tensors
    )
    live = wsum > 1e-30
    c_r = torch.where(live & (rmse > rmse_floor), (g_loss + g_rmse) / (weight.shape[0] * wsum * rmse), 0.0)
    if ctx.grad_in_forward:
        gh, gw, gb = c_r * gh, c_r * gw, c_r * gb
    else:
        c_k = torch.where(live, (ctx.lambda_kl * g_loss + g_kl) / wsum, 0.0)
        coef = torch.stack([c_r, c_k]).float()
        gh, gw, gb = backward_op(
            hidden, weight, bias, indptr, indices, values, row_weight, rowstat, coef, ctx.kl_eps,
            ctx.lambda_kl != 0, *extra,
        )  # fmt: skip
    need = ctx.needs_input_grad
    return (
        gh.to(hidden.dtype) if need[0] else None,
        gw.to(weight.dtype) if need[1] else None,
        gb.to(bias.dtype) if ctx.has_bias and need[2] else None,
    )


def _sparse_backward(ctx: Any, g_loss: Tensor, g_rmse: Tensor, g_kl: Tensor, *_: Any) -> tuple[Any, ...]:
    grads = sparse_head_grads(ctx, g_loss, g_rmse, g_kl, torch.ops.inrscrecon.sparse_head_loss_backward)
    return (*grads, *([None] * 7))


_sparse_fwd.register_autograd(_sparse_backward, setup_context=sparse_head_setup)


def sort_rows(
    indptr: torch.Tensor,  # [B+1] int64
    indices: torch.Tensor,  # [CAP]
    values: torch.Tensor,  # [CAP]
    n_genes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) with each row's non-zeros sorted by gene; slots past indptr[B] stay at the end.
    One device sort of (row, gene) keys — 32-bit when (B + 1)·M + CAP fits, which halves the radix passes —
    static shapes (traceable). It costs a sort of CAP keys per call: pass ``indices_sorted=True`` instead
    when the rows come from a canonical (sorted) CSR matrix."""
    n_rows = indptr.shape[0] - 1
    cap = indices.shape[0]
    key_dtype = torch.int32 if (n_rows + 1) * max(n_genes, 1) + cap < 2**31 else torch.int64
    slots = torch.arange(cap, device=indices.device, dtype=key_dtype)
    rows = torch.searchsorted(indptr[1:].contiguous(), slots, right=True, out_int32=key_dtype == torch.int32)
    key = rows * n_genes + indices.to(key_dtype).clamp(0, max(n_genes - 1, 0))
    key = torch.where(rows < n_rows, key, n_rows * n_genes + slots)  # unused slots: after every row, in order
    order = torch.sort(key).indices
    return indices[order].contiguous(), values[order].contiguous()


def triton_sparse_head_loss(
    hidden: Tensor,  # [B, W]
    weight: Tensor,  # [M, W]
    bias: Tensor | None,  # [M]
    indptr: Tensor,  # [B+1] int64
    indices: Tensor,  # [CAP] int32/int64
    values: Tensor,  # [CAP] fp32
    lambda_kl: float = 0.0,
    kl_eps: float = 1e-2,
    row_weight: Tensor | None = None,  # [B]
    indices_sorted: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused Triton head + loss on CSR targets → (loss, rmse, kl) fp32 scalars; contract of
    ``sparse_head_loss_reference``. Under autocast the matmuls run in the autocast dtype (the casts are
    differentiable, so fp32 master weights get their gradients). ``indices_sorted`` skips the per-row sort
    when each row's genes are already ascending."""
    dt = compute_dtype(hidden, weight)
    h, w = hidden.to(dt), weight.to(dt)
    b = bias.to(dt) if bias is not None else None
    n_genes = weight.shape[0]
    if not indices_sorted:
        indices, values = sort_rows(indptr, indices, values, n_genes)
    grad_in_forward = lambda_kl == 0 and needs_grad(h, w, b)
    rw = row_weight.float() if row_weight is not None else None
    out = torch.ops.inrscrecon.sparse_head_loss(
        h, w, b, indptr, indices, values.float(), rw, float(lambda_kl), float(kl_eps), grad_in_forward
    )
    return out[0], out[1], out[2]


# ------------------------------------------------------------------------------------------------------------
# dense head + loss
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("inrscrecon::head_loss", mutates_args=())
def _dense_fwd(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, lambda_kl: float, kl_eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _mod("triton_head_loss").head_loss_forward(hidden, weight, bias, target, lambda_kl, kl_eps)


@_dense_fwd.register_fake
def _dense_fwd_fake(hidden, weight, bias, target, lambda_kl, kl_eps):
    return (
        _scalar(hidden),
        _scalar(hidden),
        _scalar(hidden),
        hidden.new_empty(2, hidden.shape[0], dtype=torch.float32),
    )


@torch.library.custom_op("inrscrecon::head_loss_backward", mutates_args=())
def _dense_bwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    rowstat: Tensor,
    coef: Tensor,
    kl_eps: float,
    has_kl: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _mod("triton_head_loss").head_loss_backward(
        hidden, weight, bias, target, rowstat, coef, kl_eps, has_kl
    )


@_dense_bwd.register_fake
def _dense_bwd_fake(hidden, weight, bias, target, rowstat, coef, kl_eps, has_kl):
    return _fp32_grads_like(hidden, weight)


def _dense_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    hidden, weight, bias, target, lambda_kl, kl_eps = inputs
    ctx.save_for_backward(hidden, weight, bias, target, output[3], output[1])
    ctx.lambda_kl, ctx.kl_eps, ctx.has_bias = float(lambda_kl), float(kl_eps), bias is not None


def _dense_backward(ctx: Any, g_loss: Tensor, g_rmse: Tensor, g_kl: Tensor, *_: Any) -> tuple[Any, ...]:
    hidden, weight, bias, target, rowstat, rmse = ctx.saved_tensors
    n_rows, n_genes = target.shape
    c_r = torch.where(rmse > 0, (g_loss + g_rmse) / (n_rows * n_genes * rmse), 0.0)
    c_k = (ctx.lambda_kl * g_loss + g_kl) / n_rows
    coef = torch.stack([c_r, c_k]).float()
    gh, gw, gb = torch.ops.inrscrecon.head_loss_backward(
        hidden, weight, bias, target, rowstat, coef, ctx.kl_eps, ctx.lambda_kl != 0
    )
    need = ctx.needs_input_grad
    return (
        gh.to(hidden.dtype) if need[0] else None,
        gw.to(weight.dtype) if need[1] else None,
        gb.to(bias.dtype) if ctx.has_bias and need[2] else None,
        None,
        None,
        None,
    )


_dense_fwd.register_autograd(_dense_backward, setup_context=_dense_setup)


def triton_dense_head_loss(
    hidden: Tensor,  # [B, W]
    weight: Tensor,  # [M, W]
    bias: Tensor | None,  # [M]
    target: Tensor,  # [B, M]
    lambda_kl: float = 1.0,
    kl_eps: float = 1e-2,
) -> tuple[Tensor, Tensor, Tensor]:
    """The dense-target Triton head + loss as a registered op (autocast-aware like the sparse one)."""
    dt = compute_dtype(hidden, weight)
    b = bias.to(dt) if bias is not None else None
    out = torch.ops.inrscrecon.head_loss(
        hidden.to(dt), weight.to(dt), b, target, float(lambda_kl), float(kl_eps)
    )
    return out[0], out[1], out[2]


# ------------------------------------------------------------------------------------------------------------
# head + count likelihood (Poisson / NB), dense or CSR counts
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("inrscrecon::count_head_loss", mutates_args=())
def _count_fwd(
    hidden: Tensor,  # [B, W]
    weight: Tensor,  # [M, W]
    bias: Tensor | None,  # [M]
    log_theta: Tensor | None,  # [M] fp32 (NB)
    counts: Tensor | None,  # [B, M] dense form
    indptr: Tensor | None,  # [B+1] int64 (CSR form)
    indices: Tensor | None,  # [CAP], sorted within rows
    values: Tensor | None,  # [CAP] fp32 counts
    log_offset: Tensor,  # [B] fp32
    row_weight: Tensor | None,  # [B] fp32
    likelihood: str,
    lambda_kl: float,
    kl_eps: float,
    grad_in_forward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = _mod("triton_count_loss").count_head_forward(
        hidden,
        weight,
        bias,
        log_theta,
        counts,
        indptr,
        indices,
        values,
        log_offset,
        row_weight,
        likelihood,
        lambda_kl,
        kl_eps,
        grad_in_forward,
    )
    return tuple(out)  # type: ignore[return-value]


@_count_fwd.register_fake
def _count_fwd_fake(
    hidden,
    weight,
    bias,
    log_theta,
    counts,
    indptr,
    indices,
    values,
    log_offset,
    row_weight,
    likelihood,
    lambda_kl,
    kl_eps,
    grad_in_forward,
):
    n_rows = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    if grad_in_forward:
        gh, gw, gb = _fp32_grads_like(hidden, weight)
    else:
        gh, gw, gb = (hidden.new_empty(0, **f32) for _ in range(3))
    glt = hidden.new_empty(weight.shape[0] if grad_in_forward and likelihood == "nb" else 0, **f32)
    return (
        _scalar(hidden),
        _scalar(hidden),
        _scalar(hidden),
        hidden.new_empty(2, n_rows, **f32),
        _scalar(hidden),
        gh,
        gw,
        gb,
        glt,
    )


@torch.library.custom_op("inrscrecon::count_head_loss_backward", mutates_args=())
def _count_bwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    log_theta: Tensor | None,
    counts: Tensor | None,
    indptr: Tensor | None,
    indices: Tensor | None,
    values: Tensor | None,
    log_offset: Tensor,
    row_weight: Tensor | None,
    rowstat: Tensor,  # [2, B]
    coef: Tensor,  # [2] (c_n, c_k)
    likelihood: str,
    kl_eps: float,
    has_kl: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _mod("triton_count_loss").count_head_backward(
        hidden,
        weight,
        bias,
        log_theta,
        counts,
        indptr,
        indices,
        values,
        log_offset,
        row_weight,
        rowstat,
        coef,
        likelihood,
        kl_eps,
        has_kl,
    )


@_count_bwd.register_fake
def _count_bwd_fake(
    hidden,
    weight,
    bias,
    log_theta,
    counts,
    indptr,
    indices,
    values,
    log_offset,
    row_weight,
    rowstat,
    coef,
    likelihood,
    kl_eps,
    has_kl,
):
    glt = hidden.new_empty(weight.shape[0] if likelihood == "nb" else 0, dtype=torch.float32)
    return (*_fp32_grads_like(hidden, weight), glt)


def _count_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    (hidden, weight, bias, log_theta, counts, indptr, indices, values, log_offset, row_weight) = inputs[:10]
    likelihood, lambda_kl, kl_eps, grad_in_forward = inputs[10:]
    _, _, _, rowstat, wsum, gh, gw, gb, glt = output
    ctx.save_for_backward(
        hidden,
        weight,
        bias,
        log_theta,
        counts,
        indptr,
        indices,
        values,
        log_offset,
        row_weight,
        rowstat,
        wsum,
        gh,
        gw,
        gb,
        glt,
    )
    ctx.likelihood, ctx.lambda_kl, ctx.kl_eps = str(likelihood), float(lambda_kl), float(kl_eps)
    ctx.grad_in_forward, ctx.has_bias = bool(grad_in_forward), bias is not None
    ctx.has_theta = log_theta is not None


def _count_backward(ctx: Any, g_loss: Tensor, g_nll: Tensor, g_kl: Tensor, *_: Any) -> tuple[Any, ...]:
    (hidden, weight, bias, log_theta, counts, indptr, indices, values, log_offset, row_weight) = (
        ctx.saved_tensors[:10]
    )
    rowstat, wsum, gh, gw, gb, glt = ctx.saved_tensors[10:]
    # c_n, c_k of the kernel module's docstring, on the device (no host sync)
    c_n = (g_loss + g_nll) / (weight.shape[0] * wsum)
    c_k = (ctx.lambda_kl * g_loss + g_kl) / wsum
    if ctx.grad_in_forward:
        gh, gw, gb, glt = c_n * gh, c_n * gw, c_n * gb, c_n * glt
    else:
        gh, gw, gb, glt = torch.ops.inrscrecon.count_head_loss_backward(
            hidden,
            weight,
            bias,
            log_theta,
            counts,
            indptr,
            indices,
            values,
            log_offset,
            row_weight,
            rowstat,
            torch.stack([c_n, c_k]).float(),
            ctx.likelihood,
            ctx.kl_eps,
            ctx.lambda_kl != 0,
        )
    need = ctx.needs_input_grad
    nb = ctx.likelihood == "nb" and ctx.has_theta
    return (
        gh.to(hidden.dtype) if need[0] else None,
        gw.to(weight.dtype) if need[1] else None,
        gb.to(bias.dtype) if ctx.has_bias and need[2] else None,
        glt.to(log_theta.dtype) if nb and need[3] else None,
        *([None] * 10),
    )


_count_fwd.register_autograd(_count_backward, setup_context=_count_setup)


def _stirling_series(x: torch.Tensor) -> torch.Tensor:
    """lgamma(x) − [(x − ½) log x − x + ½ log 2π] for x ≥ 6 (error < 1e-10)."""
    inv = 1.0 / x
    inv2 = inv * inv
    return inv * (1.0 / 12 - inv2 * (1.0 / 360 - inv2 * (1.0 / 1260 - inv2 / 1680)))


def _log_prod6(x: torch.Tensor) -> torch.Tensor:
    """log Π_{k<6} (x + k), in two halves (no fp32 overflow below x ≈ 1e12)."""
    return torch.log(x * (x + 1) * (x + 2)) + torch.log((x + 3) * (x + 4) * (x + 5))


def lgamma_ratio(y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """lgamma(y + a) − lgamma(a) for y ≥ 0, a > 0 (broadcast), differentiable in a.

    The plain difference cancels at large a (each term ≈ a log a, the difference ≈ y log a): in fp32 it loses
    ≈ 1e-7·a·log a, and its gradient a·(ψ(y + a) − ψ(a)) — what ∂log θ of the NB loss is made of — drowns in
    that noise. Here: below 6 both arguments are shifted by 6 (Γ(x) = Γ(x + 6) / Π_k (x + k)), then with
    A = a (+6), B = A + y, Stirling's series gives (A − ½)·log1p(y/A) + y·(log B − 1) + ser(B) − ser(A)
    (the Triton count kernel evaluates the same series in-kernel for dense counts).
    """
    small = a < 6
    a_s = torch.where(small, a, torch.ones_like(a))  # the shift's argument, finite where it is not used
    shift = _log_prod6(a_s + y) - _log_prod6(a_s)
    big_a = torch.where(small, a + 6, a)
    big_b = big_a + y
    lg = (big_a - 0.5) * torch.log1p(y / big_a) + y * (torch.log(big_b) - 1)
    lg = lg + _stirling_series(big_b) - _stirling_series(big_a)
    return torch.where(small, lg - shift, lg)


def csr_count_terms(
    indptr: Tensor,  # [B+1] int64
    indices: Tensor,  # [CAP] gene of each non-zero
    values: Tensor,  # [CAP] raw counts
    log_theta: Tensor | None,  # [M] (NB)
    likelihood: str,
    row_weight: Tensor | None,  # [B]
    n_genes: int,
) -> Tensor:
    """The (y, θ)-only part of the count NLL, which vanishes at y = 0, summed over the CSR non-zeros:
    Σ_b w_b Σ_nz [lgamma(y + 1) − (NB) lgamma_ratio(y, θ_g)] / (M Σ_b w_b), an fp32 scalar, differentiable
    w.r.t. log_theta. Slots past indptr[B] are ignored. Static shapes (traceable)."""
    n_rows = indptr.shape[0] - 1
    cap = indices.shape[0]
    small = cap < 2**31  # 32-bit slot ids: half the bytes of the two [CAP] index temporaries
    slots = torch.arange(cap, device=indices.device, dtype=torch.int32 if small else torch.int64)
    rows = torch.searchsorted(
        indptr[1:].contiguous(), slots, right=True, out_int32=slots.dtype == torch.int32
    )  # [CAP], B: unused
    live = rows < n_rows
    y = torch.where(live, values.float(), 0.0)
    terms = torch.lgamma(y + 1.0)
    if likelihood == "nb":
        assert log_theta is not None
        theta = torch.exp(log_theta.float())[indices.long().clamp(0, max(n_genes - 1, 0))]  # [CAP]
        terms = terms - lgamma_ratio(y, theta)
    w = torch.ones(n_rows, device=y.device) if row_weight is None else row_weight.float()
    w_slot = torch.cat([w, w.new_zeros(1)])[rows]  # 0 on unused slots
    return (w_slot * terms).sum() / (n_genes * w.sum().clamp_min(1e-30))


def _count_call(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    log_theta: Tensor | None,
    counts: Tensor | None,
    csr: tuple[Tensor, Tensor, Tensor] | None,
    log_offset: Tensor,
    likelihood: str,
    lambda_kl: float,
    kl_eps: float,
    row_weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    dt = compute_dtype(hidden, weight)
    h, w = hidden.to(dt), weight.to(dt)
    b = bias.to(dt) if bias is not None else None
    lt = log_theta.float() if likelihood == "nb" and log_theta is not None else None
    grad_in_forward = lambda_kl == 0 and needs_grad(h, w, b, lt)
    rw = row_weight.float() if row_weight is not None else None
    indptr, indices, values = csr if csr is not None else (None, None, None)
    out = torch.ops.inrscrecon.count_head_loss(
        h,
        w,
        b,
        lt,
        counts,
        indptr,
        indices,
        values,
        log_offset.float(),
        rw,
        likelihood,
        float(lambda_kl),
        float(kl_eps),
        grad_in_forward,
    )
    return out[0], out[1], out[2]


def triton_count_head_loss(
    hidden: Tensor,  # [B, W]
    weight: Tensor,  # [M, W]
    bias: Tensor | None,  # [M]
    counts: Tensor,  # [B, M] raw counts
    log_offset: Tensor,  # [B] log(L / 1e4)
    likelihood: str,
    log_theta: Tensor | None = None,  # [M] (NB)
    lambda_kl: float = 0.0,
    kl_eps: float = 1e-2,
    row_weight: Tensor | None = None,  # [B]
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused Triton head + Poisson / NB likelihood on dense counts → (loss, nll, kl) fp32 scalars; contract
    of ``count_head_loss_reference``; gradients to hidden, weight, bias and log_theta (autocast-aware)."""
    return _count_call(
        hidden, weight, bias, log_theta, counts, None, log_offset, likelihood, lambda_kl, kl_eps, row_weight
    )


def triton_sparse_count_head_loss(
    hidden: Tensor,  # [B, W]
    weight: Tensor,  # [M, W]
    bias: Tensor | None,  # [M]
    indptr: Tensor,  # [B+1] int64
    indices: Tensor,  # [CAP] int32/int64
    values: Tensor,  # [CAP] raw counts
    log_offset: Tensor,  # [B]
    likelihood: str,
    log_theta: Tensor | None = None,  # [M] (NB)
    lambda_kl: float = 0.0,
    kl_eps: float = 1e-2,
    row_weight: Tensor | None = None,  # [B]
    indices_sorted: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused Triton head + Poisson / NB likelihood on CSR counts → (loss, nll, kl) fp32 scalars; contract of
    ``sparse_count_head_loss_reference``. ``indices_sorted`` skips the per-row sort of the non-zeros."""
    if not indices_sorted:
        indices, values = sort_rows(indptr, indices, values, weight.shape[0])
    csr = (indptr, indices, values.float())
    loss, nll, kl = _count_call(
        hidden, weight, bias, log_theta, None, csr, log_offset, likelihood, lambda_kl, kl_eps, row_weight
    )
    # the kernel's NLL is the η-dependent part; the (y, θ)-only terms of the non-zeros are added here
    lt = log_theta if likelihood == "nb" else None
    terms = csr_count_terms(indptr, indices, values, lt, likelihood, row_weight, weight.shape[0])
    return loss + terms, nll + terms, kl


# ------------------------------------------------------------------------------------------------------------
# encode + trunk
# ------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("inrscrecon::trunk", mutates_args=())
def _trunk_fwd(
    coords: Tensor, weights: list[Tensor], biases: list[Tensor], n_bands: int, store_all: bool
) -> Tensor:
    """→ [n_layers, B, W] every layer's activation (store_all) or [1, B, W] the hidden only."""
    tt = _mod("triton_trunk")
    cfg = tt._default_blocks(coords.device, weights[0].shape[0])
    ws = [w.contiguous() for w in weights]
    return tt._forward(coords, n_bands, ws, [b.contiguous() for b in biases], cfg, store_all)


@_trunk_fwd.register_fake
def _trunk_fwd_fake(coords, weights, biases, n_bands, store_all):
    n = len(weights) if store_all else 1
    return coords.new_empty(n, coords.shape[0], weights[-1].shape[0], dtype=weights[0].dtype)


@torch.library.custom_op("inrscrecon::trunk_backward", mutates_args=())
def _trunk_bwd(
    coords: Tensor, weights: list[Tensor], ys: Tensor, g_hidden: Tensor, n_bands: int
) -> list[Tensor]:
    """ys [n_layers, B, W] from the forward → fp32 [∂W_0, ∂b_0, ∂W_1, ∂b_1, …]."""
    tt = _mod("triton_trunk")
    cfg = tt._default_blocks(coords.device, weights[0].shape[0])
    ws = [w.contiguous() for w in weights]
    return tt._backward(coords, n_bands, ws, list(ys.unbind(0)), g_hidden, cfg)


@_trunk_bwd.register_fake
def _trunk_bwd_fake(coords, weights, ys, g_hidden, n_bands):
    out = []
    for w in weights:
        out += [w.new_empty(w.shape, dtype=torch.float32), w.new_empty(w.shape[0], dtype=torch.float32)]
    return out


def _trunk_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    coords, weights, biases, n_bands, store_all = inputs
    ctx.n_layers, ctx.n_bands, ctx.store_all = len(weights), int(n_bands), bool(store_all)
    ctx.b_dtypes = [b.dtype for b in biases]
    if store_all:  # nothing is kept for a forward that will not be differentiated
        ctx.save_for_backward(coords, output, *weights)


def _trunk_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    if not ctx.store_all:
        raise RuntimeError("trunk op ran with store_all=False (no activations saved); cannot differentiate")
    n = ctx.n_layers
    coords, ys, *weights = ctx.saved_tensors
    g_hidden = grad[-1]  # only the last layer's output is used downstream
    out = torch.ops.inrscrecon.trunk_backward(coords, weights, ys, g_hidden, ctx.n_bands)
    gws = [out[2 * i].to(weights[i].dtype) for i in range(n)]
    gbs = [out[2 * i + 1].to(ctx.b_dtypes[i]) for i in range(n)]
    return None, gws, gbs, None, None


_trunk_fwd.register_autograd(_trunk_backward, setup_context=_trunk_setup)


def triton_trunk_op(
    coords: Tensor,  # [B, 3] in [-1, 1]
    n_bands: int,
    weights: Sequence[Tensor],  # [W, 3 + 6·n_bands], then [W, W] …
    biases: Sequence[Tensor],  # [W] …
) -> Tensor:
    """Fused encode + trunk as a registered op → hidden [B, W] in the compute dtype (autocast dtype when
    autocast is on: the weights are cast, the casts carry the gradients to fp32 masters). Activations are
    stored for the backward only when a gradient is needed (not under ``torch.no_grad()``)."""
    dt = compute_dtype(*weights)
    ws = [w.to(dt) for w in weights]
    bs = [b.to(dt) for b in biases]
    store_all = needs_grad(*ws, *bs)
    ys = torch.ops.inrscrecon.trunk(coords.detach().float().contiguous(), ws, bs, int(n_bands), store_all)
    return ys[-1]  # [B, W]
