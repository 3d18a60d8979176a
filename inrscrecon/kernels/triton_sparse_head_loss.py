"""Fused gene head + loss against a *sparse* (CSR) target: softplus(h Wᵀ + b) → RMSE + λ·KL.

Reference: :func:`inrscrecon.field.losses.sparse_head_loss_reference` (equal to the dense
``head_loss_reference`` on the densified target). Neither the [B, M] target nor the [B, M] prediction is
written to global memory: each program computes a logit tile [BLOCK_B, BLOCK_M] on the chip, builds the
matching target tile in registers from the batch's CSR rows and reduces both at once.

Target tile from CSR. The wrapper (``inrscrecon.kernels.ops.sort_rows``) sorts each row's non-zeros by
gene (one device sort of the CAP slots, skipped with ``indices_sorted=True``). A program covering genes
[g0, g0 + BLOCK_M) finds, per row, the first non-zero with gene ≥ g0 by a vectorised binary search
(SEARCH_STEPS = ⌈log2(M + 1)⌉ + 1 gathers of BLOCK_B indices), then reads the rows' non-zeros one per row
at a time (KCH of them per loop step, unrolled) and scatters each into the tile with a [BLOCK_B, BLOCK_M]
compare-select (registers only) until no row has more in the tile. At 5 % density and BLOCK_M = 64 (≈ 3
non-zeros per row and tile, ≈ 8 for the fullest of 64 rows) that is ≈ 8 compare-selects per tile element
beside its W MACs.

Notation (row b, gene g, w_b the row weight, sums over all M genes)::

    z = h·w_g + b_g,  p = softplus(z),  q = p + ε,  s_b = Σ q,  A_b = Σ q log q,  C_b = Σ q log(t + ε)
    S_b = Σ_nz t + M ε,   KL_b = A_b/s_b − log s_b − C_b/s_b + log S_b,   KL = Σ w_b KL_b / Σ w_b
    SSE_b = Σ (p − t)²,   RMSE = sqrt(Σ w_b SSE_b / (M Σ w_b))

Gradients (per element of the tile; derivation of ∂KL_b/∂q as in ``triton_head_loss``)::

    ∂RMSE/∂p = w_b (p − t) / (M Σw RMSE)                  ∂KL/∂q = w_b (log q − log p_t − log s_b + log S_b − KL_b) / (s_b Σw)
    dz = w_b · sigmoid(z) · [c_r (p − t) + c_k (log q − log(t + ε) + off_b) / s_b]
    c_r = (ḡ_loss + ḡ_rmse) / (M Σw RMSE),  c_k = (λ ḡ_loss + ḡ_kl) / Σw,  off_b = log S_b − log s_b − KL_b
    ∂h = dz · W,   ∂W = dzᵀ · h,   ∂b = Σ_rows dz

GEMM passes (the dense Triton head runs five: forward, then logits recomputed in each of two backward
kernels, each followed by its gradient GEMM). Here dz is computed *once* per tile and reused for both
gradient GEMMs (Liger / Cut Cross-Entropy style): the kernel writes dz for a chunk of rows into a
[CHUNK, M] buffer, and two cuBLAS GEMMs turn it into ∂h and ∂W for the chunk.

* λ = 0 (the default loss): dz does not depend on any statistic except the global scalar c_r, so the forward
  writes dz / c_r while it reduces the statistics, and the backward only scales: **3 GEMM passes**
  (logits, dz·W, dzᵀ·h), no recomputation.
* λ ≠ 0: dz needs each row's s_b and KL_b, known only after the forward's pass over all genes; the
  backward recomputes the logits once: **4 GEMM passes**.

Memory: statistics [4, M/BLOCK_M, B] fp32 (summed once), per-row constants [2, B], the dz chunk
[CHUNK, M] in the compute dtype (≤ 64 MiB: CHUNK = 6 656 rows at M = 5 000 bf16) and the gradients; the
torch references keep several fp32 [B, M] tensors for autograd (1.3 GB each at B = 65 536, M = 5 000) and
the dense path also needs the dense target (another 1.3 GB). With λ = 0 the forward also holds the unscaled gradients
([B, W] + [M, W] + [M] fp32) until the backward.

Mixed precision: tl.dot on the compute dtype (bf16 on tensor cores) with fp32 accumulation; statistics,
softplus and logs in fp32; dz rounded to the compute dtype as a GEMM operand; ∂W accumulated in fp32
across chunks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inrscrecon.kernels import interpreting
from inrscrecon.kernels._precision import _cast, _softplus_and_sigmoid, dot_precision

__all__ = ["SparseHeadBlocks", "sparse_head_backward", "sparse_head_forward"]

N_STATS = 4  # SSE, s, A, C per (gene tile, row)
CHUNK_BYTES = 64 * 1024 * 1024  # budget of the dz chunk


# ------------------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _csr_target_tile(
    indptr_ptr,  # [B+1] int64
    idx_ptr,  # [CAP] gene of each non-zero, sorted within each row
    val_ptr,  # [CAP] fp32
    rows,  # [BLOCK_B] absolute row ids
    row_ok,  # [BLOCK_B]
    g0,  # first gene of the tile
    SEARCH_STEPS: tl.constexpr,
    KCH: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Dense target tile [BLOCK_B, BLOCK_M] (fp32, zeros elsewhere) built in registers from CSR rows."""
    start = tl.load(indptr_ptr + rows, mask=row_ok, other=0)
    end = tl.load(indptr_ptr + rows + 1, mask=row_ok, other=0)
    lo = start
    hi = end
    for _ in range(SEARCH_STEPS):  # lower bound of g0 in the row's sorted genes
        active = lo < hi
        mid = (lo + hi) // 2
        g_mid = tl.load(idx_ptr + mid, mask=active, other=0).to(tl.int32)
        right = active & (g_mid < g0)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (g_mid >= g0), mid, hi)
    ptr = lo
    g_end = g0 + BLOCK_M
    cols = tl.arange(0, BLOCK_M)
    t = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
    more = tl.sum(row_ok.to(tl.int32), axis=0) > 0
    while more:
        cnt = tl.zeros([BLOCK_B], dtype=tl.int32)
        for k in tl.static_range(KCH):  # one non-zero per row at a time: 2-D [BLOCK_B, BLOCK_M] work only
            pos = ptr + k
            g = tl.load(idx_ptr + pos, mask=pos < end, other=0).to(tl.int32)
            inside = (pos < end) & (g < g_end)  # sorted: the in-tile entries are a prefix
            v = tl.load(val_ptr + pos, mask=inside, other=0.0).to(tl.float32)
            t += tl.where(inside[:, None] & ((g - g0)[:, None] == cols[None, :]), v[:, None], 0.0)
            cnt += inside.to(tl.int32)
        ptr += cnt
        more = tl.max(cnt, axis=0) == KCH
    return t


@triton.jit
def _logits_tile(
    h_ptr,  # [B, W]
    w_ptr,  # [M, W]
    b_ptr,  # [M]
    rows,  # [BLOCK_B] batch rows of the tile
    row_ok,
    genes,  # [BLOCK_M] genes of the tile
    g_ok,
    W,
    stride_hb,
    stride_wm,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The head's logits h·Wᵀ + b of one [BLOCK_B, BLOCK_M] tile in fp32, on chip."""
    z = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, W, BLOCK_K):  # K loop: small register tiles, pipelined through shared memory
        ck = k0 + tl.arange(0, BLOCK_K)
        k_ok = ck < W
        h = tl.load(
            h_ptr + rows[:, None] * stride_hb + ck[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        wt = tl.load(
            w_ptr + genes[None, :] * stride_wm + ck[:, None], mask=k_ok[:, None] & g_ok[None, :], other=0.0
        )
        if UPCAST:
            h = h.to(tl.float32)
            wt = wt.to(tl.float32)
        z += tl.dot(h, wt, input_precision=PRECISION)
    if HAS_BIAS:
        z += tl.load(b_ptr + genes, mask=g_ok, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _sparse_head_kernel(
    h_ptr,  # [B, W]
    w_ptr,  # [M, W]
    b_ptr,  # [M] (unused without HAS_BIAS)
    indptr_ptr,  # [B+1] int64
    idx_ptr,  # [CAP]
    val_ptr,  # [CAP] fp32
    rw_ptr,  # [B] fp32 row weights (unused without HAS_RW)
    stats_ptr,  # [N_STATS, n_gene_tiles, B] fp32 out (STATS)
    rowstat_ptr,  # [2, B] fp32: 1/s_b, off_b (DZ and HAS_KL)
    coef_ptr,  # [2] fp32: c_r, c_k (DZ)
    dz_ptr,  # [CHUNK, M] out (DZ), row r of the chunk is batch row row0 + r
    row0,
    row_end,
    B,
    M,
    W,
    stride_hb,
    stride_wm,
    kl_eps,
    STATS: tl.constexpr,
    DZ: tl.constexpr,
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
    target tile from CSR; writes its per-row statistics (STATS) and/or its dz tile (DZ)."""
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = row0 + pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < row_end
    g0 = pid_m * BLOCK_M
    genes = g0 + tl.arange(0, BLOCK_M)
    g_ok = genes < M
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
    pred, sig = _softplus_and_sigmoid(z)
    t = _csr_target_tile(indptr_ptr, idx_ptr, val_ptr, rows, row_ok, g0, SEARCH_STEPS, KCH, BLOCK_B, BLOCK_M)
    ok = row_ok[:, None] & g_ok[None, :]
    diff = tl.where(ok, pred - t, 0.0)
    if HAS_KL:
        q = pred + kl_eps
        log_q = tl.log(q)
        log_p = tl.log(t + kl_eps)
    if STATS:
        base = stats_ptr + pid_m * B + rows
        tile_stride = tl.num_programs(1) * B
        tl.store(base, tl.sum(diff * diff, axis=1), mask=row_ok)
        if HAS_KL:
            tl.store(base + tile_stride, tl.sum(tl.where(ok, q, 0.0), axis=1), mask=row_ok)
            tl.store(base + 2 * tile_stride, tl.sum(tl.where(ok, q * log_q, 0.0), axis=1), mask=row_ok)
            tl.store(base + 3 * tile_stride, tl.sum(tl.where(ok, q * log_p, 0.0), axis=1), mask=row_ok)
    if DZ:
        dpred = tl.load(coef_ptr) * diff
        if HAS_KL:
            inv_s = tl.load(rowstat_ptr + rows, mask=row_ok, other=0.0)
            off = tl.load(rowstat_ptr + B + rows, mask=row_ok, other=0.0)
            dpred += tl.load(coef_ptr + 1) * inv_s[:, None] * (log_q - log_p + off[:, None])
        dz = dpred * sig
        if HAS_RW:
            dz = dz * tl.load(rw_ptr + rows, mask=row_ok, other=0.0)[:, None]
        dz = tl.where(ok, dz, 0.0)
        tl.store(
            dz_ptr + (rows - row0)[:, None] * M + genes[None, :],
            _cast(dz, out_dtype, UPCAST),
            mask=ok,
        )


# ------------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseHeadBlocks:
    """Tile sizes; ``block_k``: width slice per step of the logits' K loop; ``kch``: non-zeros per row read
    per step of the target-tile loop; ``chunk_rows``: rows per dz chunk (None: as many as fit in 64 MiB)."""

    block_b: int
    block_m: int
    kch: int = 4
    block_k: int = 64
    num_warps: int = 4
    num_stages: int | None = None
    chunk_rows: int | None = None


def default_blocks(device: torch.device, width: int, dtype: torch.dtype) -> SparseHeadBlocks:
    """Interpreter: few large programs (its cost is per program). GPU: 64 × 64 tiles, 8 warps, K slices of
    64 and KCH = 4 (bf16) or 32 and 2 (fp32): compiled for sm_90 without spills (143–188 registers per
    thread, 16 KiB of shared memory; ``python -m inrscrecon.kernels.aot`` reports it). Chosen by resource
    count, not yet tuned by time on a GPU (``blocks`` overrides it)."""
    if device.type != "cuda":
        return SparseHeadBlocks(block_b=64, block_m=256, kch=8, block_k=1024)
    if dtype == torch.float32:  # KCH = 4 or K slices of 64 spill in fp32 (≈ 180 B of stack per thread)
        return SparseHeadBlocks(block_b=64, block_m=64, kch=2, block_k=32, num_warps=8, num_stages=2)
    return SparseHeadBlocks(block_b=64, block_m=64, kch=4, block_k=64, num_warps=8, num_stages=2)


BLOCKS_ENV = "INRSCRECON_SPARSE_HEAD_BLOCKS"


def env_blocks() -> SparseHeadBlocks | None:
    """Tile override for tuning runs: ``INRSCRECON_SPARSE_HEAD_BLOCKS="block_b,block_m,kch,block_k,num_warps"``
    (e.g. ``64,64,4,64,8``; what ``benchmarks/bench_kernels.py --sweep-sparse`` tries). None when unset."""
    spec = os.environ.get(BLOCKS_ENV, "").strip()
    if not spec:
        return None
    try:
        bb, bm, kch, bk, warps = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(
            f"{BLOCKS_ENV} must be 'block_b,block_m,kch,block_k,num_warps', got {spec!r}"
        ) from None
    return SparseHeadBlocks(block_b=bb, block_m=bm, kch=kch, block_k=bk, num_warps=warps, num_stages=2)


def _check(hidden: torch.Tensor) -> None:
    if hidden.shape[1] > 1024:
        raise ValueError(f"hidden width {hidden.shape[1]} > 1024 is not supported (tiles hold a whole row)")
    if hidden.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "triton sparse head needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)"
        )


def _launch(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    row_weight: torch.Tensor | None,
    stats: torch.Tensor | None,
    rowstat: torch.Tensor | None,
    coef: torch.Tensor | None,
    dz: torch.Tensor | None,
    row0: int,
    row_end: int,
    kl_eps: float,
    has_kl: bool,
    cfg: SparseHeadBlocks,
) -> None:
    n_rows, width = h.shape
    n_genes = w.shape[0]
    grid = (triton.cdiv(row_end - row0, cfg.block_b), triton.cdiv(n_genes, cfg.block_m))
    opts: dict[str, int] = {"num_warps": cfg.num_warps}
    if cfg.num_stages is not None:
        opts["num_stages"] = cfg.num_stages
    any_f32 = values  # any valid pointer for arguments a mode does not read
    _sparse_head_kernel[grid](
        h,
        w,
        b if b is not None else w,
        indptr,
        indices,
        values,
        row_weight if row_weight is not None else any_f32,
        stats if stats is not None else any_f32,
        rowstat if rowstat is not None else any_f32,
        coef if coef is not None else any_f32,
        dz if dz is not None else h,
        row0,
        row_end,
        n_rows,
        n_genes,
        width,
        h.stride(0),
        w.stride(0),
        float(kl_eps),
        STATS=stats is not None,
        DZ=dz is not None,
        HAS_BIAS=b is not None,
        HAS_KL=has_kl,
        HAS_RW=row_weight is not None,
        UPCAST=h.device.type != "cuda" or h.dtype == torch.float32,
        PRECISION=dot_precision(h.dtype),
        SEARCH_STEPS=max(1, n_genes).bit_length() + 1,
        KCH=cfg.kch,
        BLOCK_B=cfg.block_b,
        BLOCK_M=cfg.block_m,
        BLOCK_K=min(cfg.block_k, max(16, triton.next_power_of_2(width))),
        **opts,
    )


def chunk_rows(n_genes: int, elem: int, cfg: SparseHeadBlocks) -> int:
    """Rows per dz chunk: ``cfg.chunk_rows`` or what fits in CHUNK_BYTES, a multiple of BLOCK_B."""
    rows = cfg.chunk_rows or CHUNK_BYTES // max(1, n_genes * elem)
    return max(cfg.block_b, rows // cfg.block_b * cfg.block_b)


def _chunks(n_rows: int, n_genes: int, elem: int, cfg: SparseHeadBlocks) -> list[tuple[int, int]]:
    rows = chunk_rows(n_genes, elem, cfg)
    return [(r, min(n_rows, r + rows)) for r in range(0, max(n_rows, 1), rows)]


def _grads_from_dz(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    row_weight: torch.Tensor | None,
    stats: torch.Tensor | None,
    rowstat: torch.Tensor | None,
    coef: torch.Tensor,
    kl_eps: float,
    has_kl: bool,
    cfg: SparseHeadBlocks,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunk by chunk: dz tile kernel → ∂h = dz·W and ∂W += dzᵀ·h, ∂b += Σ dz (fp32 results)."""
    n_rows, width = h.shape
    n_genes = w.shape[0]
    gh = torch.empty(n_rows, width, device=h.device, dtype=torch.float32)
    gw = torch.zeros(n_genes, width, device=h.device, dtype=torch.float32)
    gb = torch.zeros(n_genes, device=h.device, dtype=torch.float32)
    chunks = _chunks(n_rows, n_genes, h.element_size(), cfg)
    dz = torch.empty(chunks[0][1] - chunks[0][0], n_genes, device=h.device, dtype=h.dtype)
    for r0, r1 in chunks:
        if r1 <= r0:
            continue
        _launch(
            h,
            w,
            b,
            indptr,
            indices,
            values,
            row_weight,
            stats,
            rowstat,
            coef,
            dz,
            r0,
            r1,
            kl_eps,
            has_kl,
            cfg,
        )
        d = dz[: r1 - r0]
        gh[r0:r1] = torch.mm(d, w).float()
        gw += torch.mm(d.t(), h[r0:r1]).float()
        gb += d.sum(0, dtype=torch.float32)
    return gh, gw, gb


def sparse_head_forward(
    hidden: torch.Tensor,  # [B, W] compute dtype
    weight: torch.Tensor,  # [M, W] compute dtype
    bias: torch.Tensor | None,  # [M]
    indptr: torch.Tensor,  # [B+1] int64
    indices: torch.Tensor,  # [CAP], sorted within rows
    values: torch.Tensor,  # [CAP] fp32
    row_weight: torch.Tensor | None,  # [B] fp32
    lambda_kl: float,
    kl_eps: float,
    grad_in_forward: bool,
    blocks: SparseHeadBlocks | None = None,
) -> tuple[torch.Tensor, ...]:
    """→ (loss, rmse, kl, rowstat [2, B], wsum, gh_u, gw_u, gb_u).

    rowstat = (1/s_b, off_b) for the backward (zeros without KL); wsum = Σ w_b. With ``grad_in_forward``
    (only valid for λ = 0) gh_u, gw_u, gb_u are the fp32 gradients for c_r = 1 (the backward scales them);
    otherwise they are empty."""
    _check(hidden)
    h, w = hidden.contiguous(), weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    n_rows, width = h.shape
    n_genes = w.shape[0]
    cfg = blocks or env_blocks() or default_blocks(h.device, width, h.dtype)
    has_kl = lambda_kl != 0.0
    if grad_in_forward and has_kl:
        raise ValueError("grad_in_forward needs lambda_kl == 0")
    dev = h.device
    n_tiles = triton.cdiv(n_genes, cfg.block_m)
    stats = torch.zeros(N_STATS, n_tiles, n_rows, device=dev, dtype=torch.float32)
    rw = row_weight.float().contiguous() if row_weight is not None else None
    if grad_in_forward:
        one = torch.zeros(2, device=dev, dtype=torch.float32)  # (c_r, c_k) = (1, 0): no host copy
        one[0] = 1.0
        gh, gw, gb = _grads_from_dz(
            h, w, b, indptr, indices, values, rw, stats, None, one, kl_eps, False, cfg
        )
    else:
        if n_rows:
            _launch(
                h, w, b, indptr, indices, values, rw, stats, None, None, None, 0, n_rows, kl_eps, has_kl, cfg
            )
        gh, gw, gb = (torch.zeros(0, device=dev, dtype=torch.float32) for _ in range(3))
    sse, s, a, c = stats.sum(1).unbind(0)  # [B] each
    wts = rw if rw is not None else torch.ones(n_rows, device=dev, dtype=torch.float32)
    wsum = wts.sum().clamp_min(1e-30)
    rmse = torch.sqrt(((wts * sse).sum() / (n_genes * wsum)).clamp_min(1e-30))
    if has_kl:
        # S_b = Σ_nz t + M ε; slots past indptr[B] fall in the spare bin B (dropped). 32-bit slot ids: 8 bytes
        # of temporaries per slot instead of 29 (int64 ids twice, a mask, a copy), i.e. 131 MB instead of
        # 475 MB at B = 65 536 and 5 % of 5000 genes
        cap = values.shape[0]
        small = cap < 2**31
        slots = torch.arange(cap, device=dev, dtype=torch.int32 if small else torch.int64)
        rows = torch.searchsorted(
            indptr[1:].contiguous(), slots, right=True, out_int32=slots.dtype == torch.int32
        )  # [CAP]
        bins = torch.zeros(n_rows + 1, device=dev, dtype=torch.float32).index_add(0, rows, values.float())
        s_t = bins[:n_rows] + n_genes * kl_eps
        kl_rows = a / s - torch.log(s) - c / s + torch.log(s_t)
        kl = (wts * kl_rows).sum() / wsum
        rowstat = torch.stack([1.0 / s, torch.log(s_t) - torch.log(s) - kl_rows])
    else:
        kl = torch.zeros((), device=dev, dtype=torch.float32)
        rowstat = torch.zeros(2, n_rows, device=dev, dtype=torch.float32)
    return rmse + lambda_kl * kl, rmse, kl, rowstat, wsum, gh, gw, gb


def sparse_head_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    row_weight: torch.Tensor | None,
    rowstat: torch.Tensor,  # [2, B]
    coef: torch.Tensor,  # [2] fp32 (c_r, c_k)
    kl_eps: float,
    has_kl: bool,
    blocks: SparseHeadBlocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂h [B, W], ∂W [M, W], ∂b [M]) in fp32: logits recomputed once per tile, dz reused by both GEMMs."""
    _check(hidden)
    h, w = hidden.contiguous(), weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    cfg = blocks or env_blocks() or default_blocks(h.device, h.shape[1], h.dtype)
    rw = row_weight.float().contiguous() if row_weight is not None else None
    return _grads_from_dz(
        h,
        w,
        b,
        indptr,
        indices,
        values,
        rw,
        None,
        rowstat.contiguous(),
        coef.float().contiguous(),
        kl_eps,
        has_kl,
        cfg,
    )
