"""Fused gene head + count likelihood (Poisson / negative binomial) in Triton, dense or CSR count target.

References: :func:`inrscrecon.field.losses.count_head_loss_reference` (dense counts) and
:func:`~inrscrecon.field.losses.sparse_count_head_loss_reference` (CSR counts). The structure is that of
:mod:`inrscrecon.kernels.triton_sparse_head_loss`: one tile kernel computes a logit tile [BLOCK_B, BLOCK_M]
on the chip (K loop over the width), builds the matching count tile in registers (a dense load, or from the
batch's CSR rows with ``_csr_target_tile``), and reduces both at once to per-row statistics and/or writes the
tile's dz into a [CHUNK, M] buffer that two cuBLAS GEMMs turn into ∂h and ∂W. Neither the [B, M] prediction
nor (CSR form) the [B, M] target is written to global memory; in the CSR form a zero count simply is a 0 in
the register tile, so the closed form of the reference (Σ_g zero-term + Σ_nz corrections) is what the tile
sum computes.

Notation (row b, gene g; w_b the row weight, Σw = Σ_b w_b; sums over all M genes)::

    z = h·w_g + b_g  (η, log-rate per 1e4 counts),  l = z + o_b  (log μ),  y the count
    Poisson  NLL = e^l − y·l + lgamma(y + 1)
    NB       x = l − log θ_g,  NLL = θ·softplus(x) + y·softplus(−x) − lgamma(y + θ) + lgamma(θ) + lgamma(y + 1)
    nll = Σ_b w_b Σ_g NLL / (M Σw)
    KL (λ > 0): p̂ = softplus(z), q = p̂ + ε, t = log1p(y·e^{−o}), s_b = Σ q, A_b = Σ q log q,
                C_b = Σ q log(t + ε), S_b = Σ (t + ε),  KL_b = A_b/s_b − log s_b − C_b/s_b + log S_b

Gradients (softplus′ = sigmoid σ; ∂KL_b/∂q derived in ``triton_head_loss``)::

    Poisson  ∂NLL/∂z = e^l − y
    NB       ∂NLL/∂z = θ σ(x) − y σ(−x) = (θ + y)·σ(x) − y
             ∂NLL/∂log θ = θ·[softplus(x) − σ(x) − ψ(y + θ) + ψ(θ)] + y·σ(−x)      (ψ = digamma)
    dz       = w_b · [c_n ∂NLL/∂z + c_k σ(z)(log q − log(t + ε) + off_b) / s_b]
    ∂log θ_g = c_n Σ_b w_b ∂NLL/∂log θ      (reduced per tile, one atomic add per gene and row tile)
    c_n = (ḡ_loss + ḡ_nll) / (M Σw),  c_k = (λ ḡ_loss + ḡ_kl) / Σw,  off_b = log S_b − log s_b − KL_b
    ∂h = dz · W,   ∂W = dzᵀ · h,   ∂b = Σ_rows dz

λ = 0 (the usual loss): dz and ∂log θ depend on no statistic but the scalar c_n, so the forward writes
dz / c_n while it reduces the statistics and the backward only scales: 3 GEMM passes (logits, dz·W, dzᵀ·h).
λ ≠ 0: dz needs s_b and KL_b, known only after the forward's pass over all genes; the backward recomputes the
logits once: 4 GEMM passes.

Terms that depend on (y, θ) only — lgamma(y + 1), −lgamma(y + θ) + lgamma(θ) and, in ∂log θ,
−θ·(ψ(y + θ) − ψ(θ)) — vanish at y = 0. With CSR counts (≈ 95 % zeros) the kernel leaves them out (its nll
is the η-dependent part: e^l − y·l, or θ·softplus(x) + y·softplus(−x)) and the host adds them at the CAP
non-zeros in torch (:func:`inrscrecon.kernels.ops.csr_count_terms`, whose autograd gives their ∂log θ), so
each of the B·M tile elements costs only exp / softplus. With dense counts they run in the kernel: lgamma
(shift by 6, then Stirling: fp32 error ≈ 1e-7 relative, ≈ 1.5e-6 absolute near its zeros at 1 and 2 where the
shift cancels), so they never need a [B, M] tensor.
The NB differences lgamma(y + θ) − lgamma(θ) and ψ(y + θ) − ψ(θ) are evaluated as one series in y/θ
(``_lgamma_ratio_and_digamma_diff``): at large θ the plain differences lose ≈ 1e-7·θ log θ in fp32, which
would swamp ∂log θ, of order y²/θ there (the torch side uses the same series:
:func:`inrscrecon.kernels.ops.lgamma_ratio`).

Memory: statistics [5, M/BLOCK_M, B] fp32, per-row constants [2, B], the dz chunk [CHUNK, M] in the compute
dtype (≤ 64 MiB), fp32 gradients; ∂log θ [M] fp32. The torch reference keeps several fp32 [B, M] tensors for
autograd (1.3 GB each at B = 65 536, M = 5 000). Mixed precision as in the sparse RMSE kernel: tl.dot on the
compute dtype with fp32 accumulation, all elementwise math in fp32, dz rounded to the compute dtype as a
GEMM operand.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from inrscrecon.kernels import interpreting
from inrscrecon.kernels._precision import _cast, _softplus_and_sigmoid, dot_precision
from inrscrecon.kernels.triton_sparse_head_loss import (
    SparseHeadBlocks,
    _chunks,
    _csr_target_tile,
    _logits_tile,
    default_blocks,
    env_blocks,
)

__all__ = [
    "LIKELIHOODS",
    "compile_count_head",
    "count_blocks",
    "count_head_backward",
    "count_head_forward",
]

LIKELIHOODS = ("poisson", "nb")
N_STATS = 5  # NLL, s, A, C, S per (gene tile, row)
HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))


# ------------------------------------------------------------------------------------------------------------
# Special functions (fp32, x > 0)
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _lgamma(x):
    """log Γ(x) for x > 0: Γ(x) = Γ(x + 6) / (x (x+1) … (x+5)) below 6, then Stirling's series."""
    small = x < 6.0
    prod = x * (x + 1.0) * (x + 2.0) * (x + 3.0) * (x + 4.0) * (x + 5.0)
    zz = tl.where(small, x + 6.0, x)
    inv = 1.0 / zz
    inv2 = inv * inv
    series = inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 / 1680.0)))
    out = (zz - 0.5) * tl.log(zz) - zz + HALF_LOG_2PI + series
    return tl.where(small, out - tl.log(prod), out)


@triton.jit
def _inv_sum6(x):
    """Σ_{k<6} 1/(x + k), in pairs (three divisions)."""
    return (
        (2.0 * x + 1.0) / (x * (x + 1.0))
        + (2.0 * x + 5.0) / ((x + 2.0) * (x + 3.0))
        + (2.0 * x + 9.0) / ((x + 4.0) * (x + 5.0))
    )


@triton.jit
def _log_prod6(x):
    """log Π_{k<6} (x + k), in two halves (no fp32 overflow below x ≈ 1e12)."""
    return tl.log(x * (x + 1.0) * (x + 2.0)) + tl.log((x + 3.0) * (x + 4.0) * (x + 5.0))


@triton.jit
def _lgamma_ratio_and_digamma_diff(y, a):
    """lgamma(y + a) − lgamma(a) and ψ(y + a) − ψ(a) for y ≥ 0 [BB, BM], a > 0 [1, BM] (θ of the genes),
    without the cancellation of the two differences at large a (each term ≈ a log a, the difference
    ≈ y log a).

    Below 6 both arguments are shifted by 6 (Γ(x) = Γ(x + 6)/Π_k (x + k)): the shift contributes
    −log Π_k (y + a + k) + log Π_k (a + k) and −Σ_k 1/(y + a + k) + Σ_k 1/(a + k); what depends on a alone
    is computed once per gene. Then with A = a (+6), B = A + y, Stirling::

        lgamma(B) − lgamma(A) = (A − ½)·log1p(y/A) + y·(log B − 1) + ser(B) − ser(A)
        ψ(B) − ψ(A)           = log1p(y/A) + y/(2AB) − ser′(B) + ser′(A)
    """
    small = a < 6.0
    b = a + y
    lg_shift = _log_prod6(b) - _log_prod6(a)
    dg_shift = _inv_sum6(a) - _inv_sum6(b)
    aa = tl.where(small, a + 6.0, a)  # per gene
    bb = aa + y
    ia = 1.0 / aa
    ib = 1.0 / bb
    ia2 = ia * ia
    ib2 = ib * ib
    ser_a = ia * (1.0 / 12.0 - ia2 * (1.0 / 360.0 - ia2 * (1.0 / 1260.0 - ia2 / 1680.0)))
    ser_b = ib * (1.0 / 12.0 - ib2 * (1.0 / 360.0 - ib2 * (1.0 / 1260.0 - ib2 / 1680.0)))
    dser_a = ia2 * (1.0 / 12.0 - ia2 * (1.0 / 120.0 - ia2 * (1.0 / 252.0 - ia2 / 240.0)))
    dser_b = ib2 * (1.0 / 12.0 - ib2 * (1.0 / 120.0 - ib2 * (1.0 / 252.0 - ib2 / 240.0)))
    l1 = _log1p(y * ia)
    lg = (aa - 0.5) * l1 + y * (tl.log(bb) - 1.0) + ser_b - ser_a
    dg = l1 + 0.5 * y * ia * ib - dser_b + dser_a
    lg = tl.where(small, lg - lg_shift, lg)
    dg = tl.where(small, dg + dg_shift, dg)
    return lg, dg


@triton.jit
def _log1p(x):
    """log(1 + x) for x ≥ 0 without the cancellation of log(1 + x) at small x."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


# ------------------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _count_tile_kernel(
    h_ptr,  # [B, W]
    w_ptr,  # [M, W]
    b_ptr,  # [M] (HAS_BIAS)
    lt_ptr,  # [M] fp32 log θ (NB)
    y_ptr,  # [B, M] counts (dense form)
    indptr_ptr,  # [B+1] int64 (CSR form)
    idx_ptr,  # [CAP] gene of each non-zero, sorted within each row (CSR form)
    val_ptr,  # [CAP] fp32 counts (CSR form)
    off_ptr,  # [B] fp32 log offset o_b
    rw_ptr,  # [B] fp32 row weights (HAS_RW)
    stats_ptr,  # [N_STATS, n_gene_tiles, B] fp32 out (STATS)
    rowstat_ptr,  # [2, B] fp32: 1/s_b, off_b (DZ and HAS_KL)
    coef_ptr,  # [2] fp32: c_n, c_k (DZ)
    dz_ptr,  # [CHUNK, M] out (DZ); row r of the chunk is batch row row0 + r
    glt_ptr,  # [M] fp32 ∂log θ, accumulated atomically (DZ and NB)
    row0,
    row_end,
    B,
    M,
    W,
    stride_hb,
    stride_wm,
    stride_yb,
    kl_eps,
    STATS: tl.constexpr,
    DZ: tl.constexpr,
    NB: tl.constexpr,
    CSR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_RW: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    KCH: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One tile of rows [row0 + pid_b·BLOCK_B, …) ∩ [.., row_end) × genes [pid_m·BLOCK_M, …): logits on chip,
    count tile in registers; writes the tile's per-row statistics (STATS), dz tile and ∂log θ share (DZ)."""
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = row0 + pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < row_end
    g0 = pid_m * BLOCK_M
    genes = g0 + tl.arange(0, BLOCK_M)
    g_ok = genes < M
    ok = row_ok[:, None] & g_ok[None, :]
    out_dtype = w_ptr.dtype.element_ty
    z = _logits_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        rows,
        row_ok,
        genes,
        g_ok,
        W,
        stride_hb,
        stride_wm,
        HAS_BIAS,
        UPCAST,
        PRECISION,
        BLOCK_B,
        BLOCK_M,
        BLOCK_K,
    )
    if CSR:
        y = _csr_target_tile(
            indptr_ptr, idx_ptr, val_ptr, rows, row_ok, g0, SEARCH_STEPS, KCH, BLOCK_B, BLOCK_M
        )
    else:
        y = tl.load(y_ptr + rows[:, None] * stride_yb + genes[None, :], mask=ok, other=0.0).to(tl.float32)
    o = tl.load(off_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    lr = z + o[:, None]  # log μ
    if NB:
        lt = tl.load(lt_ptr + genes, mask=g_ok, other=0.0).to(tl.float32)
        th = tl.exp(lt)
        x = lr - lt[None, :]
        sp, sg = _softplus_and_sigmoid(x)
        nll = th[None, :] * sp + y * (sp - x)
        dnll = (th[None, :] + y) * sg - y
        if not CSR:  # the (y, θ)-only terms; the CSR form leaves them to the host, at the non-zeros only
            lg_ratio, _dg = _lgamma_ratio_and_digamma_diff(y, th[None, :])
            nll += _lgamma(y + 1.0) - lg_ratio
    else:
        mu = tl.exp(lr)
        nll = mu - y * lr
        dnll = mu - y
        if not CSR:
            nll += _lgamma(y + 1.0)
    nll = tl.where(ok, nll, 0.0)
    if HAS_KL:
        pred, sig = _softplus_and_sigmoid(z)
        q = pred + kl_eps
        log_q = tl.log(q)
        p = _log1p(y * tl.exp(-o)[:, None]) + kl_eps
        log_p = tl.log(p)
    if STATS:
        base = stats_ptr + pid_m * B + rows
        tile_stride = tl.num_programs(1) * B
        tl.store(base, tl.sum(nll, axis=1), mask=row_ok)
        if HAS_KL:
            tl.store(base + tile_stride, tl.sum(tl.where(ok, q, 0.0), axis=1), mask=row_ok)
            tl.store(base + 2 * tile_stride, tl.sum(tl.where(ok, q * log_q, 0.0), axis=1), mask=row_ok)
            tl.store(base + 3 * tile_stride, tl.sum(tl.where(ok, q * log_p, 0.0), axis=1), mask=row_ok)
            tl.store(base + 4 * tile_stride, tl.sum(tl.where(ok, p, 0.0), axis=1), mask=row_ok)
    if DZ:
        c_n = tl.load(coef_ptr)
        d = c_n * dnll
        if HAS_KL:
            inv_s = tl.load(rowstat_ptr + rows, mask=row_ok, other=0.0)
            off = tl.load(rowstat_ptr + B + rows, mask=row_ok, other=0.0)
            d += tl.load(coef_ptr + 1) * sig * inv_s[:, None] * (log_q - log_p + off[:, None])
        if HAS_RW:
            rw = tl.load(rw_ptr + rows, mask=row_ok, other=0.0)
            d = d * rw[:, None]
        d = tl.where(ok, d, 0.0)
        tl.store(dz_ptr + (rows - row0)[:, None] * M + genes[None, :], _cast(d, out_dtype, UPCAST), mask=ok)
        if NB:
            core = sp - sg
            if not CSR:
                _lg, dg_diff = _lgamma_ratio_and_digamma_diff(y, th[None, :])
                core -= dg_diff
            dlt = th[None, :] * core + y * (1.0 - sg)
            if HAS_RW:
                dlt = dlt * rw[:, None]
            dlt = tl.where(ok, c_n * dlt, 0.0)
            tl.atomic_add(glt_ptr + genes, tl.sum(dlt, axis=0), mask=g_ok)


# ------------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------------


def count_blocks(device: torch.device, width: int, dtype: torch.dtype, csr: bool = True) -> SparseHeadBlocks:
    """Tiles of the count kernel. Interpreter: the sparse head's (few large programs). GPU, CSR counts in
    bf16 (``fit``'s configuration): the sparse RMSE head's 64 × 64 tiles, KCH = 4, K slices of 64 (≤ 197
    registers); dense counts (lgamma / digamma in the tile, NB spills at 64 × 64) and fp32: 32 × 64 tiles,
    KCH = 4, K slices of 32 (80–148 registers). 8 warps; every mode compiles for sm_90 without spills
    (:func:`compile_count_head`). Chosen by resource count, not yet by time on a GPU;
    ``INRSCRECON_SPARSE_HEAD_BLOCKS`` (see ``triton_sparse_head_loss.env_blocks``) overrides both kernels."""
    if device.type != "cuda" or (csr and dtype != torch.float32):
        return default_blocks(device, width, dtype)
    return SparseHeadBlocks(block_b=32, block_m=64, kch=4, block_k=32, num_warps=8, num_stages=2)


def _check(hidden: torch.Tensor, likelihood: str, log_theta: torch.Tensor | None) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if likelihood == "nb" and log_theta is None:
        raise ValueError("likelihood 'nb' needs log_theta [M]")
    if hidden.shape[1] > 1024:
        raise ValueError(f"hidden width {hidden.shape[1]} > 1024 is not supported (tiles hold a whole row)")
    if hidden.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "triton count head needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)"
        )


class _Problem:
    """The inputs of one call, made contiguous once, with placeholder pointers for what a form lacks."""

    def __init__(
        self,
        hidden: torch.Tensor,  # [B, W] compute dtype
        weight: torch.Tensor,  # [M, W] compute dtype
        bias: torch.Tensor | None,  # [M]
        log_theta: torch.Tensor | None,  # [M]
        counts: torch.Tensor | None,  # [B, M] dense form
        indptr: torch.Tensor | None,  # [B+1] CSR form
        indices: torch.Tensor | None,  # [CAP] sorted within rows
        values: torch.Tensor | None,  # [CAP]
        log_offset: torch.Tensor,  # [B]
        row_weight: torch.Tensor | None,  # [B]
        likelihood: str,
        kl_eps: float,
        has_kl: bool,
        blocks: SparseHeadBlocks | None,
    ) -> None:
        _check(hidden, likelihood, log_theta)
        if (counts is None) == (indptr is None or indices is None or values is None):
            raise ValueError("give either dense counts [B, M] or the CSR triple (indptr, indices, values)")
        self.h, self.w = hidden.contiguous(), weight.contiguous()
        self.b = bias.contiguous() if bias is not None else None
        self.nb = likelihood == "nb"
        self.lt = log_theta.float().contiguous() if self.nb and log_theta is not None else None
        self.csr = counts is None
        self.y = counts.contiguous() if counts is not None else None
        self.indptr, self.indices = indptr, indices
        self.values = values.float().contiguous() if values is not None else None
        self.off = log_offset.float().contiguous()
        self.rw = row_weight.float().contiguous() if row_weight is not None else None
        self.kl_eps, self.has_kl = float(kl_eps), has_kl
        n_rows, width = self.h.shape
        self.n_rows, self.width, self.n_genes = n_rows, width, self.w.shape[0]
        self.cfg = blocks or env_blocks() or count_blocks(self.h.device, width, self.h.dtype, self.csr)

    def launch(
        self,
        stats: torch.Tensor | None,
        rowstat: torch.Tensor | None,
        coef: torch.Tensor | None,
        dz: torch.Tensor | None,
        glt: torch.Tensor | None,
        row0: int,
        row_end: int,
    ) -> None:
        cfg = self.cfg
        grid = (triton.cdiv(row_end - row0, cfg.block_b), triton.cdiv(self.n_genes, cfg.block_m))
        opts: dict[str, int] = {"num_warps": cfg.num_warps}
        if cfg.num_stages is not None:
            opts["num_stages"] = cfg.num_stages
        any_f32 = self.off  # any valid pointer for arguments a mode does not read
        _count_tile_kernel[grid](
            self.h,
            self.w,
            self.b if self.b is not None else self.w,
            self.lt if self.lt is not None else any_f32,
            self.y if self.y is not None else any_f32,
            self.indptr if self.indptr is not None else any_f32,
            self.indices if self.indices is not None else any_f32,
            self.values if self.values is not None else any_f32,
            self.off,
            self.rw if self.rw is not None else any_f32,
            stats if stats is not None else any_f32,
            rowstat if rowstat is not None else any_f32,
            coef if coef is not None else any_f32,
            dz if dz is not None else self.h,
            glt if glt is not None else any_f32,
            row0,
            row_end,
            self.n_rows,
            self.n_genes,
            self.width,
            self.h.stride(0),
            self.w.stride(0),
            self.y.stride(0) if self.y is not None else 0,
            self.kl_eps,
            STATS=stats is not None,
            DZ=dz is not None,
            NB=self.nb,
            CSR=self.csr,
            HAS_BIAS=self.b is not None,
            HAS_KL=self.has_kl,
            HAS_RW=self.rw is not None,
            UPCAST=self.h.device.type != "cuda" or self.h.dtype == torch.float32,
            PRECISION=dot_precision(self.h.dtype),
            SEARCH_STEPS=max(1, self.n_genes).bit_length() + 1,
            KCH=cfg.kch,
            BLOCK_B=cfg.block_b,
            BLOCK_M=cfg.block_m,
            BLOCK_K=min(cfg.block_k, max(16, triton.next_power_of_2(self.width))),
            **opts,
        )

    def grads(
        self, stats: torch.Tensor | None, rowstat: torch.Tensor | None, coef: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chunk by chunk: dz tile kernel → ∂h = dz·W, ∂W += dzᵀ·h, ∂b += Σ dz; ∂log θ from the kernel."""
        h, w, dev = self.h, self.w, self.h.device
        gh = torch.empty(self.n_rows, self.width, device=dev, dtype=torch.float32)
        gw = torch.zeros(self.n_genes, self.width, device=dev, dtype=torch.float32)
        gb = torch.zeros(self.n_genes, device=dev, dtype=torch.float32)
        glt = torch.zeros(self.n_genes if self.nb else 0, device=dev, dtype=torch.float32)
        chunks = _chunks(self.n_rows, self.n_genes, h.element_size(), self.cfg)
        dz = torch.empty(chunks[0][1] - chunks[0][0], self.n_genes, device=dev, dtype=h.dtype)
        for r0, r1 in chunks:
            if r1 <= r0:
                continue
            self.launch(stats, rowstat, coef, dz, glt if self.nb else None, r0, r1)
            d = dz[: r1 - r0]
            gh[r0:r1] = torch.mm(d, w).float()
            gw += torch.mm(d.t(), h[r0:r1]).float()
            gb += d.sum(0, dtype=torch.float32)
        return gh, gw, gb, glt


def count_head_forward(
    hidden: torch.Tensor,  # [B, W] compute dtype
    weight: torch.Tensor,  # [M, W] compute dtype
    bias: torch.Tensor | None,  # [M]
    log_theta: torch.Tensor | None,  # [M] (NB)
    counts: torch.Tensor | None,  # [B, M] dense counts, or None with the CSR triple
    indptr: torch.Tensor | None,  # [B+1] int64
    indices: torch.Tensor | None,  # [CAP], sorted within rows
    values: torch.Tensor | None,  # [CAP] counts
    log_offset: torch.Tensor,  # [B]
    row_weight: torch.Tensor | None,  # [B]
    likelihood: str,
    lambda_kl: float,
    kl_eps: float,
    grad_in_forward: bool,
    blocks: SparseHeadBlocks | None = None,
) -> tuple[torch.Tensor, ...]:
    """→ (loss, nll, kl, rowstat [2, B], wsum, gh_u, gw_u, gb_u, glt_u) as fp32.

    With CSR counts nll (and loss) leave out the (y, θ)-only terms of the non-zeros (see the module
    docstring); :func:`inrscrecon.kernels.ops.triton_sparse_count_head_loss` adds them.

    rowstat = (1/s_b, off_b) for the backward (zeros without KL); wsum = Σ w_b. With ``grad_in_forward``
    (only valid for λ = 0) gh_u, gw_u, gb_u, glt_u are the gradients for c_n = 1 (the backward scales them;
    glt_u is empty for Poisson); otherwise all four are empty."""
    has_kl = lambda_kl != 0.0
    if grad_in_forward and has_kl:
        raise ValueError("grad_in_forward needs lambda_kl == 0")
    pb = _Problem(
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
        kl_eps,
        has_kl,
        blocks,
    )
    dev, n_rows, n_genes = pb.h.device, pb.n_rows, pb.n_genes
    n_tiles = triton.cdiv(n_genes, pb.cfg.block_m)
    stats = torch.zeros(N_STATS, n_tiles, n_rows, device=dev, dtype=torch.float32)
    if grad_in_forward:
        one = torch.zeros(2, device=dev, dtype=torch.float32)  # (c_n, c_k) = (1, 0): no host copy
        one[0] = 1.0
        gh, gw, gb, glt = pb.grads(stats, None, one)
    else:
        if n_rows:
            pb.launch(stats, None, None, None, None, 0, n_rows)
        gh, gw, gb, glt = (torch.zeros(0, device=dev, dtype=torch.float32) for _ in range(4))
    nll_rows, s, a, c, s_t = stats.sum(1).unbind(0)  # [B] each
    wts = pb.rw if pb.rw is not None else torch.ones(n_rows, device=dev, dtype=torch.float32)
    wsum = wts.sum().clamp_min(1e-30)
    nll = (wts * nll_rows).sum() / (n_genes * wsum)
    if has_kl:
        kl_rows = a / s - torch.log(s) - c / s + torch.log(s_t)
        kl = (wts * kl_rows).sum() / wsum
        rowstat = torch.stack([1.0 / s, torch.log(s_t) - torch.log(s) - kl_rows])
    else:
        kl = torch.zeros((), device=dev, dtype=torch.float32)
        rowstat = torch.zeros(2, n_rows, device=dev, dtype=torch.float32)
    return nll + lambda_kl * kl, nll, kl, rowstat, wsum, gh, gw, gb, glt


def count_head_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    log_theta: torch.Tensor | None,
    counts: torch.Tensor | None,
    indptr: torch.Tensor | None,
    indices: torch.Tensor | None,
    values: torch.Tensor | None,
    log_offset: torch.Tensor,
    row_weight: torch.Tensor | None,
    rowstat: torch.Tensor,  # [2, B]
    coef: torch.Tensor,  # [2] fp32 (c_n, c_k)
    likelihood: str,
    kl_eps: float,
    has_kl: bool,
    blocks: SparseHeadBlocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂h [B, W], ∂W [M, W], ∂b [M], ∂log θ [M] or empty) in fp32: logits recomputed once per tile."""
    pb = _Problem(
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
        kl_eps,
        has_kl,
        blocks,
    )
    return pb.grads(None, rowstat.contiguous(), coef.float().contiguous())


def compile_count_head(
    dtype: str = "bf16",  # "bf16" | "fp32"
    likelihood: str = "nb",
    csr: bool = True,
    stats: bool = True,
    dz: bool = True,
    has_kl: bool = False,
    width: int = 256,
    arch: int = 90,
    blocks: SparseHeadBlocks | None = None,
) -> Any:
    """AOT compile of ``_count_tile_kernel`` for sm_``arch`` without a GPU (triton's NVIDIA backend, no
    TRITON_INTERPRET) → :class:`inrscrecon.kernels.aot.Resources` (shared bytes, registers, spill stack)."""
    from inrscrecon.kernels.aot import compile_kernel

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    cfg = blocks or count_blocks(torch.device("cuda"), width, torch_dtype, csr)
    ptr = "*bf16" if dtype == "bf16" else "*fp32"
    f32, i32 = "*fp32", "i32"
    sig = dict(h_ptr=ptr, w_ptr=ptr, b_ptr=ptr, lt_ptr=f32, y_ptr=f32, indptr_ptr="*i64", idx_ptr="*i32")
    sig.update(val_ptr=f32, off_ptr=f32, rw_ptr=f32, stats_ptr=f32, rowstat_ptr=f32, coef_ptr=f32)
    sig.update(dz_ptr=ptr, glt_ptr=f32, row0=i32, row_end=i32, B=i32, M=i32, W=i32, stride_hb=i32)
    sig.update(stride_wm=i32, stride_yb=i32, kl_eps="fp32")
    const = dict(
        STATS=stats,
        DZ=dz,
        NB=likelihood == "nb",
        CSR=csr,
        HAS_BIAS=True,
        HAS_KL=has_kl,
        HAS_RW=True,
        UPCAST=dtype == "fp32",
        PRECISION="ieee" if dtype == "fp32" else "tf32",
        SEARCH_STEPS=14,
        KCH=cfg.kch,
        BLOCK_B=cfg.block_b,
        BLOCK_M=cfg.block_m,
        BLOCK_K=min(cfg.block_k, max(16, triton.next_power_of_2(width))),
    )
    return compile_kernel(_count_tile_kernel, sig, const, cfg.num_warps, cfg.num_stages or 2, arch)


if __name__ == "__main__":  # python -m inrscrecon.kernels.triton_count_loss: resources of the GPU tiles
    for dt in ("bf16", "fp32"):
        for lik in LIKELIHOODS:
            for form in (True, False):
                for mode in ((True, True, False), (False, True, True), (True, False, True)):
                    r = compile_count_head(dt, lik, form, *mode)
                    kind = "csr" if form else "dense"
                    print(f"count head {dt} {lik} {kind} stats={mode[0]} dz={mode[1]} kl={mode[2]}: {r}")
