"""Fused gene head + loss in Triton: softplus(h Wᵀ + b) → RMSE + λ·KL without a [B, M] prediction.

Reference: :func:`inrscrecon.field.losses.head_loss_reference`. The idea of Liger's FusedLinearCrossEntropy
and Cut Cross-Entropy, for our loss: logit tiles live in registers only and are reduced at once to per-row
statistics (forward) or to their share of the three input gradients (backward, recomputed).

Notation (one row b of the batch, gene g; sums over the M genes of the row unless said otherwise)::

    z_g = h·w_g + b_g                 logit                  pred_g = softplus(z_g)
    q_g = pred_g + ε                  s = Σ q_g              P̂_g = q_g / s
    p_g = t_g + ε                     S = Σ p_g              P_g = p_g / S
    SSE = Σ (pred_g − t_g)²           A = Σ q_g log q_g      C = Σ q_g log p_g

    RMSE = sqrt(Σ_b SSE_b / (B·M))
    KL_b = Σ P̂_g (log q_g − log s − log p_g + log S) = A/s − log s − C/s + log S
    loss = RMSE + λ · (1/B) Σ_b KL_b

Gradients (derived once here; the kernels only evaluate them)::

    ∂RMSE/∂pred_g = (pred_g − t_g) / (B·M·RMSE)        (d√u = du / 2√u,  du/dpred_g = 2(pred_g − t_g)/BM)
    ∂KL_b/∂q_g    = Σ_j ∂/∂q_g [ (q_j/s)·r_j ],  r_j = log q_j − log s − log p_j + log S
                  = r_g/s − Σ_j q_j r_j / s² + Σ_j (q_j/s)(δ_jg/q_g − 1/s)
                  = (r_g − KL_b)/s + 1/s − 1/s = (r_g − KL_b) / s
    ∂pred/∂z      = sigmoid(z)

With upstream scalars (ḡ_loss, ḡ_rmse, ḡ_kl) for the three outputs, every output is differentiable:

    dz_g = [c_r·(pred_g − t_g) + c_k·(log q_g − log p_g + off_b)/s_b] · sigmoid(z_g)
    c_r  = (ḡ_loss + ḡ_rmse) / (B·M·RMSE),   c_k = (λ·ḡ_loss + ḡ_kl) / B,   off_b = −log s_b + log S_b − KL_b
    ∂h   = dz · W      (reduce over genes: kernel ``_head_grad_hidden_kernel``, grid over row blocks)
    ∂W   = dzᵀ · h     (reduce over rows:  kernel ``_head_grad_weight_kernel``, grid over gene blocks)
    ∂b   = Σ_rows dz   (same kernel as ∂W)

So the backward needs per-row (1/s_b, off_b) and the global RMSE from the forward: 2·B + 1 floats. The dz
tile is recomputed from (h, W, b, t) in each of the two backward kernels and never leaves the chip. At
RMSE = 0 the RMSE part of the gradient is set to 0 (the torch reference would give NaN there).

Memory. The torch reference keeps ≈ 6 fp32 [B, M] tensors alive for autograd (logits, pred, pred − t, q,
log q, log p and normalised versions): at B = 65 536, M = 5 000 that is 1.3 GB each, ≈ 8 GB in all. This op
allocates a [5, B] fp32 statistics buffer (1.3 MB at B = 65 536), a [2, B] per-row buffer for the backward
and the gradients (fp32 accumulators [B, W], [M, W], [M], cast to the input dtypes when those differ).

Cost: 1 GEMM-equivalent forward, 4 backward (each backward kernel recomputes the logits), against 1 + 2 for
the reference, traded for no [B, M] traffic. bf16/fp16 inputs: tl.dot on the input dtype with fp32
accumulation; elementwise math and statistics in fp32; dz is rounded to the input dtype only as a dot operand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inrscrecon.kernels import interpreting
from inrscrecon.kernels._precision import _cast, _softplus_and_sigmoid, dot_precision

__all__ = ["HeadLossBlocks", "TritonHeadLoss", "head_loss_backward", "head_loss_forward", "triton_head_loss"]


# ------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(h, wt, b_ptr, genes, g_ok, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """h [BB, BW] @ wt [BW, BM] (+ bias) → fp32 logits [BB, BM]."""
    z = tl.dot(h, wt, input_precision=PRECISION)
    if HAS_BIAS:
        z += tl.load(b_ptr + genes, mask=g_ok, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _dlogit_tile(
    h,  # [BB, BW] dot operand
    wt,  # [BW, BM] dot operand (Wᵀ tile)
    b_ptr,
    t_ptr,
    rows,  # [BB]
    genes,  # [BM]
    row_ok,
    g_ok,
    stride_tb,
    inv_s,  # [BB] 1 / s_b
    off,  # [BB] −log s_b + log S_b − KL_b
    c_r,
    c_k,
    kl_eps,
    HAS_BIAS: tl.constexpr,
    HAS_KL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Recompute logits and return dL/dz [BB, BM] in fp32 (zero outside the valid rows × genes)."""
    z = _logits_tile(h, wt, b_ptr, genes, g_ok, HAS_BIAS, PRECISION)
    pred, sig = _softplus_and_sigmoid(z)
    ok = row_ok[:, None] & g_ok[None, :]
    t = tl.load(t_ptr + rows[:, None] * stride_tb + genes[None, :], mask=ok, other=0.0).to(tl.float32)
    dpred = c_r * (pred - t)
    if HAS_KL:
        dpred += c_k * inv_s[:, None] * (tl.log(pred + kl_eps) - tl.log(t + kl_eps) + off[:, None])
    return tl.where(ok, dpred * sig, 0.0)


@triton.jit
def _head_stats_kernel(
    h_ptr,  # [B, W]
    w_ptr,  # [M, W]
    b_ptr,  # [M] (unused without HAS_BIAS)
    t_ptr,  # [B, M]
    stats_ptr,  # [5, B] fp32: SSE, s, A, C, S (zeroed when ATOMIC)
    B,
    M,
    W,
    stride_hb,
    stride_wm,
    stride_tb,
    tiles_per_prog,  # gene tiles handled by one program along grid axis 1
    kl_eps,
    HAS_BIAS: tl.constexpr,
    HAS_KL: tl.constexpr,
    UPCAST: tl.constexpr,  # cast dot operands to fp32 (interpreter, where bf16 dot is wrong)
    ATOMIC: tl.constexpr,  # several programs share a row block: accumulate with atomics
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Forward: per-row statistics over a slice of the genes; logits never leave registers."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cw = tl.arange(0, BLOCK_W)
    w_ok = cw < W
    h = tl.load(
        h_ptr + rows[:, None] * stride_hb + cw[None, :], mask=row_ok[:, None] & w_ok[None, :], other=0.0
    )
    if UPCAST:
        h = h.to(tl.float32)
    sse = tl.zeros([BLOCK_B], dtype=tl.float32)
    s = tl.zeros([BLOCK_B], dtype=tl.float32)
    a = tl.zeros([BLOCK_B], dtype=tl.float32)
    c = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_t = tl.zeros([BLOCK_B], dtype=tl.float32)
    for i in range(tiles_per_prog):
        genes = (pid_s * tiles_per_prog + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        g_ok = genes < M
        wt = tl.load(
            w_ptr + genes[None, :] * stride_wm + cw[:, None], mask=w_ok[:, None] & g_ok[None, :], other=0.0
        )
        if UPCAST:
            wt = wt.to(tl.float32)
        z = _logits_tile(h, wt, b_ptr, genes, g_ok, HAS_BIAS, PRECISION)
        pred, _sig = _softplus_and_sigmoid(z)
        ok = row_ok[:, None] & g_ok[None, :]
        t = tl.load(t_ptr + rows[:, None] * stride_tb + genes[None, :], mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, pred - t, 0.0)
        sse += tl.sum(d * d, axis=1)
        if HAS_KL:
            q = pred + kl_eps
            p = t + kl_eps
            s += tl.sum(tl.where(ok, q, 0.0), axis=1)
            a += tl.sum(tl.where(ok, q * tl.log(q), 0.0), axis=1)
            c += tl.sum(tl.where(ok, q * tl.log(p), 0.0), axis=1)
            s_t += tl.sum(tl.where(ok, p, 0.0), axis=1)
    if ATOMIC:
        tl.atomic_add(stats_ptr + rows, sse, mask=row_ok)
        if HAS_KL:
            tl.atomic_add(stats_ptr + B + rows, s, mask=row_ok)
            tl.atomic_add(stats_ptr + 2 * B + rows, a, mask=row_ok)
            tl.atomic_add(stats_ptr + 3 * B + rows, c, mask=row_ok)
            tl.atomic_add(stats_ptr + 4 * B + rows, s_t, mask=row_ok)
    else:
        tl.store(stats_ptr + rows, sse, mask=row_ok)
        if HAS_KL:
            tl.store(stats_ptr + B + rows, s, mask=row_ok)
            tl.store(stats_ptr + 2 * B + rows, a, mask=row_ok)
            tl.store(stats_ptr + 3 * B + rows, c, mask=row_ok)
            tl.store(stats_ptr + 4 * B + rows, s_t, mask=row_ok)


@triton.jit
def _head_grad_hidden_kernel(
    h_ptr,  # [B, W]
    w_ptr,  # [M, W]
    b_ptr,  # [M]
    t_ptr,  # [B, M]
    rowstat_ptr,  # [2, B] fp32: 1/s_b, off_b
    coef_ptr,  # [2] fp32: c_r, c_k
    gh_ptr,  # [B, W] fp32 out (zeroed when ATOMIC)
    B,
    M,
    W,
    stride_hb,
    stride_wm,
    stride_tb,
    tiles_per_prog,
    kl_eps,
    HAS_BIAS: tl.constexpr,
    HAS_KL: tl.constexpr,
    UPCAST: tl.constexpr,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Backward, ∂h = dz · W: one row block, a slice of genes; dz recomputed per tile in registers."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cw = tl.arange(0, BLOCK_W)
    w_ok = cw < W
    h = tl.load(
        h_ptr + rows[:, None] * stride_hb + cw[None, :], mask=row_ok[:, None] & w_ok[None, :], other=0.0
    )
    if UPCAST:
        h = h.to(tl.float32)
    c_r = tl.load(coef_ptr)
    c_k = tl.load(coef_ptr + 1)
    inv_s = tl.load(rowstat_ptr + rows, mask=row_ok, other=0.0)
    off = tl.load(rowstat_ptr + B + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_B, BLOCK_W], dtype=tl.float32)
    for i in range(tiles_per_prog):
        genes = (pid_s * tiles_per_prog + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        g_ok = genes < M
        wt_raw = tl.load(
            w_ptr + genes[None, :] * stride_wm + cw[:, None], mask=w_ok[:, None] & g_ok[None, :], other=0.0
        )
        wt = wt_raw
        if UPCAST:
            wt = wt_raw.to(tl.float32)
        dz = _dlogit_tile(
            h,
            wt,
            b_ptr,
            t_ptr,
            rows,
            genes,
            row_ok,
            g_ok,
            stride_tb,
            inv_s,
            off,
            c_r,
            c_k,
            kl_eps,
            HAS_BIAS,
            HAS_KL,
            PRECISION,
        )
        dz_op = _cast(
            dz, wt_raw.dtype, UPCAST
        )  # dot operand in the input dtype (bf16 rounding as on the GPU)
        if UPCAST:
            dz_op = dz_op.to(tl.float32)
        acc += tl.dot(dz_op, tl.trans(wt), input_precision=PRECISION)
    out = gh_ptr + rows[:, None] * W + cw[None, :]
    ok = row_ok[:, None] & w_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=ok)
    else:
        tl.store(out, acc, mask=ok)


@triton.jit
def _head_grad_weight_kernel(
    h_ptr,  # [B, W]
    w_ptr,  # [M, W]
    b_ptr,  # [M]
    t_ptr,  # [B, M]
    rowstat_ptr,  # [2, B] fp32
    coef_ptr,  # [2] fp32
    gw_ptr,  # [M, W] fp32 out (zeroed when ATOMIC)
    gb_ptr,  # [M] fp32 out (zeroed when ATOMIC)
    B,
    M,
    W,
    stride_hb,
    stride_wm,
    stride_tb,
    tiles_per_prog,  # row tiles handled by one program along grid axis 1
    kl_eps,
    HAS_BIAS: tl.constexpr,
    HAS_KL: tl.constexpr,
    UPCAST: tl.constexpr,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Backward, ∂W = dzᵀ · h and ∂b = Σ_rows dz: one gene block, a slice of the rows."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    genes = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    g_ok = genes < M
    cw = tl.arange(0, BLOCK_W)
    w_ok = cw < W
    wt = tl.load(
        w_ptr + genes[None, :] * stride_wm + cw[:, None], mask=w_ok[:, None] & g_ok[None, :], other=0.0
    )
    if UPCAST:
        wt = wt.to(tl.float32)
    c_r = tl.load(coef_ptr)
    c_k = tl.load(coef_ptr + 1)
    acc_w = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i in range(tiles_per_prog):
        rows = (pid_s * tiles_per_prog + i) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        h_raw = tl.load(
            h_ptr + rows[:, None] * stride_hb + cw[None, :], mask=row_ok[:, None] & w_ok[None, :], other=0.0
        )
        h = h_raw
        if UPCAST:
            h = h_raw.to(tl.float32)
        inv_s = tl.load(rowstat_ptr + rows, mask=row_ok, other=0.0)
        off = tl.load(rowstat_ptr + B + rows, mask=row_ok, other=0.0)
        dz = _dlogit_tile(
            h,
            wt,
            b_ptr,
            t_ptr,
            rows,
            genes,
            row_ok,
            g_ok,
            stride_tb,
            inv_s,
            off,
            c_r,
            c_k,
            kl_eps,
            HAS_BIAS,
            HAS_KL,
            PRECISION,
        )
        acc_b += tl.sum(dz, axis=0)
        dz_op = _cast(dz, h_raw.dtype, UPCAST)
        if UPCAST:
            dz_op = dz_op.to(tl.float32)
        acc_w += tl.dot(tl.trans(dz_op), h, input_precision=PRECISION)
    out = gw_ptr + genes[:, None] * W + cw[None, :]
    ok = g_ok[:, None] & w_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc_w, mask=ok)
        if HAS_BIAS:
            tl.atomic_add(gb_ptr + genes, acc_b, mask=g_ok)
    else:
        tl.store(out, acc_w, mask=ok)
        if HAS_BIAS:
            tl.store(gb_ptr + genes, acc_b, mask=g_ok)


# ------------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadLossBlocks:
    """Tile sizes and work split; ``splits``: programs sharing one reduction (None: from the SM count);
    ``num_stages``: Triton software-pipelining depth (None: Triton's default)."""

    block_b: int
    block_m: int
    num_warps: int = 4
    splits: int | None = None
    num_stages: int | None = None


def _default_blocks(device: torch.device, width: int, dtype: torch.dtype) -> HeadLossBlocks:
    """Tiles chosen so every kernel stays within H100 shared memory (checked by AOT compiles for sm_90)."""
    if device.type != "cuda":  # interpreter: cost is per program, so few large programs
        return HeadLossBlocks(block_b=128, block_m=256, num_warps=4, splits=1)
    if dtype == torch.float32:
        return HeadLossBlocks(block_b=64, block_m=64, num_warps=4, num_stages=2)
    if width <= 128:
        return HeadLossBlocks(block_b=128, block_m=128, num_warps=8, num_stages=2)
    return HeadLossBlocks(block_b=64, block_m=64, num_warps=8, num_stages=2)


def _split(n_tiles: int, other_programs: int, requested: int | None, device: torch.device) -> tuple[int, int]:
    """Share ``n_tiles`` among programs so the grid has ≈ 4 programs per SM → (splits, tiles per program)."""
    if requested is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        requested = max(1, math.ceil(4 * sms / max(other_programs, 1)))
    tiles_per_prog = math.ceil(n_tiles / max(1, min(requested, n_tiles)))
    return math.ceil(n_tiles / tiles_per_prog), tiles_per_prog


def _check(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or target.dim() != 2:
        raise ValueError("hidden [B, W], weight [M, W] and target [B, M] must be 2-D")
    b, w = hidden.shape
    m = weight.shape[0]
    if weight.shape[1] != w or target.shape != (b, m):
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"target {tuple(target.shape)}"
        )
    if bias is not None and bias.shape != (m,):
        raise ValueError(f"bias must be [M] = [{m}], got {tuple(bias.shape)}")
    if w > 1024:
        raise ValueError(
            f"hidden width {w} > 1024 is not supported by the fused head (tiles hold a whole row)"
        )
    devices = {hidden.device, weight.device, target.device} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if hidden.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "triton_head_loss needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)"
        )


def head_loss_forward(
    hidden: torch.Tensor,  # [B, W]
    weight: torch.Tensor,  # [M, W]
    bias: torch.Tensor | None,  # [M]
    target: torch.Tensor,  # [B, M]
    lambda_kl: float,
    kl_eps: float,
    blocks: HeadLossBlocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward kernel → (loss, rmse, kl, rowstat [2, B] = (1/s_b, off_b) for the backward)."""
    dt = torch.promote_types(hidden.dtype, weight.dtype)
    h = hidden.to(dt).contiguous()  # [B, W]
    w = weight.to(dt).contiguous()  # [M, W]
    b = bias.contiguous() if bias is not None else None  # [M]
    t = target.contiguous()  # [B, M]
    n_rows, width = h.shape
    n_genes = w.shape[0]
    cfg = blocks or _default_blocks(h.device, width, dt)
    has_kl = lambda_kl != 0.0
    common = _common(h, b, has_kl, cfg)
    row_blocks = triton.cdiv(n_rows, cfg.block_b)
    splits, per_prog = _split(triton.cdiv(n_genes, cfg.block_m), row_blocks, cfg.splits, h.device)
    stats = torch.zeros(5, n_rows, device=h.device, dtype=torch.float32)
    b_arg = b if b is not None else w  # never read without HAS_BIAS
    _head_stats_kernel[(row_blocks, splits)](
        h,
        w,
        b_arg,
        t,
        stats,
        n_rows,
        n_genes,
        width,
        h.stride(0),
        w.stride(0),
        t.stride(0),
        per_prog,
        float(kl_eps),
        ATOMIC=splits > 1,
        **common,
    )
    sse, s, a, c, s_t = stats.unbind(0)
    rmse = torch.sqrt(sse.sum() / (n_rows * n_genes))
    if has_kl:
        kl_rows = a / s - torch.log(s) - c / s + torch.log(s_t)  # [B]
        kl = kl_rows.mean()
        rowstat = torch.stack([1.0 / s, torch.log(s_t) - torch.log(s) - kl_rows])  # [2, B]
    else:
        kl = torch.zeros((), device=h.device, dtype=torch.float32)
        rowstat = torch.zeros(2, n_rows, device=h.device, dtype=torch.float32)
    return rmse + lambda_kl * kl, rmse, kl, rowstat


def _common(h: torch.Tensor, b: torch.Tensor | None, has_kl: bool, cfg: HeadLossBlocks) -> dict:
    common = dict(
        HAS_BIAS=b is not None,
        HAS_KL=has_kl,
        UPCAST=h.device.type != "cuda" or h.dtype == torch.float32,
        PRECISION=dot_precision(h.dtype),
        BLOCK_B=cfg.block_b,
        BLOCK_M=cfg.block_m,
        BLOCK_W=max(16, triton.next_power_of_2(h.shape[1])),
        num_warps=cfg.num_warps,
    )
    if cfg.num_stages is not None:
        common["num_stages"] = cfg.num_stages
    return common


def head_loss_backward(
    hidden: torch.Tensor,  # [B, W]
    weight: torch.Tensor,  # [M, W]
    bias: torch.Tensor | None,  # [M]
    target: torch.Tensor,  # [B, M]
    rowstat: torch.Tensor,  # [2, B]
    coef: torch.Tensor,  # [2] fp32 (c_r, c_k)
    kl_eps: float,
    has_kl: bool,
    blocks: HeadLossBlocks | None = None,
    need_hidden: bool = True,
    need_weight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernels → fp32 (∂h [B, W], ∂W [M, W], ∂b [M]); a gradient not needed comes back empty."""
    dt = torch.promote_types(hidden.dtype, weight.dtype)
    h = hidden.to(dt).contiguous()
    w = weight.to(dt).contiguous()
    b = bias.contiguous() if bias is not None else None
    t = target.contiguous()
    n_rows, width = h.shape
    n_genes = w.shape[0]
    cfg = blocks or _default_blocks(h.device, width, dt)
    common = _common(h, b, has_kl, cfg)
    coef = coef.float().contiguous()
    rowstat = rowstat.contiguous()
    b_arg = b if b is not None else w
    gh = torch.zeros(0, device=h.device, dtype=torch.float32)
    gw = torch.zeros(0, device=h.device, dtype=torch.float32)
    gb = torch.zeros(0, device=h.device, dtype=torch.float32)
    if need_hidden:
        row_blocks = triton.cdiv(n_rows, cfg.block_b)
        splits, per_prog = _split(triton.cdiv(n_genes, cfg.block_m), row_blocks, cfg.splits, h.device)
        alloc = torch.zeros if splits > 1 else torch.empty
        gh = alloc(n_rows, width, device=h.device, dtype=torch.float32)
        _head_grad_hidden_kernel[(row_blocks, splits)](
            h,
            w,
            b_arg,
            t,
            rowstat,
            coef,
            gh,
            n_rows,
            n_genes,
            width,
            h.stride(0),
            w.stride(0),
            t.stride(0),
            per_prog,
            float(kl_eps),
            ATOMIC=splits > 1,
            **common,
        )
    if need_weight:
        gene_blocks = triton.cdiv(n_genes, cfg.block_m)
        splits, per_prog = _split(triton.cdiv(n_rows, cfg.block_b), gene_blocks, cfg.splits, h.device)
        alloc = torch.zeros if splits > 1 else torch.empty
        gw = alloc(n_genes, width, device=h.device, dtype=torch.float32)
        # without a bias the kernel writes no ∂b: zeros, not uninitialised memory, leave the op
        gb = (alloc if b is not None else torch.zeros)(n_genes, device=h.device, dtype=torch.float32)
        _head_grad_weight_kernel[(gene_blocks, splits)](
            h,
            w,
            b_arg,
            t,
            rowstat,
            coef,
            gw,
            gb,
            n_rows,
            n_genes,
            width,
            h.stride(0),
            w.stride(0),
            t.stride(0),
            per_prog,
            float(kl_eps),
            ATOMIC=splits > 1,
            **common,
        )
    return gh, gw, gb


class TritonHeadLoss(torch.autograd.Function):
    """autograd Function over :func:`head_loss_forward` / :func:`head_loss_backward` (explicit tiles);
    the registered op ``inrscrecon::head_loss`` (:mod:`inrscrecon.kernels.ops`) is the traceable twin."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, lambda_kl, kl_eps, blocks):  # type: ignore[override]
        loss, rmse, kl, rowstat = head_loss_forward(hidden, weight, bias, target, lambda_kl, kl_eps, blocks)
        ctx.save_for_backward(hidden, weight, bias, target, rowstat, rmse)
        ctx.lambda_kl, ctx.kl_eps, ctx.blocks = lambda_kl, float(kl_eps), blocks
        return loss, rmse, kl

    @staticmethod
    def backward(ctx, g_loss, g_rmse, g_kl):  # type: ignore[override]
        hidden, weight, bias, target, rowstat, rmse = ctx.saved_tensors
        n_rows, n_genes = target.shape
        # c_r, c_k of the module docstring, computed on the device (no host sync).
        denom = n_rows * n_genes * rmse
        c_r = torch.where(rmse > 0, (g_loss + g_rmse) / torch.where(rmse > 0, denom, 1.0), 0.0)
        c_k = (ctx.lambda_kl * g_loss + g_kl) / n_rows
        coef = torch.stack([c_r, c_k]).float()
        need_w = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        gh, gw, gb = head_loss_backward(
            hidden,
            weight,
            bias,
            target,
            rowstat,
            coef,
            ctx.kl_eps,
            ctx.lambda_kl != 0.0,
            ctx.blocks,
            need_hidden=ctx.needs_input_grad[0],
            need_weight=need_w,
        )
        grad_h = gh.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_w = gw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = gb.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None, None, None


def triton_head_loss(
    hidden: torch.Tensor,  # [B, W]
    weight: torch.Tensor,  # [M, W]
    bias: torch.Tensor | None,  # [M]
    target: torch.Tensor,  # [B, M]
    lambda_kl: float = 1.0,
    kl_eps: float = 1e-2,
    blocks: HeadLossBlocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused softplus head + RMSE + λ·KL; same contract as ``head_loss_reference``.

    Returns fp32 scalars (loss, rmse, kl), all three differentiable w.r.t. hidden, weight and bias (target
    gets no gradient). kl is 0 (and not computed) when ``lambda_kl == 0``. hidden and weight are computed in
    their promoted dtype (fp32 accumulation); gradients come back in each input's own dtype. ``blocks``
    overrides the tile configuration (tests, tuning).
    """
    _check(hidden, weight, bias, target)
    return TritonHeadLoss.apply(hidden, weight, bias, target, float(lambda_kl), float(kl_eps), blocks)
