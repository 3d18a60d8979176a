"""Fused Fourier encoding + MLP trunk in Triton: coords [B, 3] → hidden [B, W].

Reference: ``Trunk(3 + 6L, W, n)(fourier_encode(coords, L, include_input=True))`` (:mod:`inrscrecon.field`).
The encoding is never written to memory: its features (layout ``[x, y, z, sin(2^k π c_j) (j-major,
k-minor), cos(...) same order]``) are computed in registers from the coordinates wherever a tile is needed.

What is built:

* forward, **fully fused** (``_trunk_fused_fwd_kernel``): one program per row block runs encoding → layer 0
  → … → layer n−1 with the [BLOCK_B, W] activation slab kept in registers across layers (tiny-cuda-nn
  style); each layer's weights are read whole (padded to a power of two by masked loads). In training it
  also writes each layer's output once (the backward needs them); under ``torch.no_grad()`` (or when no
  parameter needs a gradient) only the last, and nothing is saved for a backward.
* forward, **per layer** (``_linear_relu_fwd_kernel``; used when a whole weight tile exceeds
  ``FUSED_TILE_BYTES`` = 8 KiB, i.e. W > 64 in bf16, W > 32 in fp32 — wider fused tiles spill on sm_90):
  tiled Linear + bias + ReLU, the encoding fused into layer 0's K loop.
* backward, per layer, from the stored post-ReLU activations y_l (stored, not recomputed)::

      y_l = relu(x_l W_lᵀ + b_l),  x_0 = enc(coords),  x_l = y_{l−1}
      ∂pre_l = ∂y_l ⊙ 1[y_l > 0]       (ReLU' read off the stored output, as torch does)
      ∂W_l   = ∂pre_lᵀ · x_l   [N, K]   _relu_linear_bwd_weight_kernel (rows reduced; layer 0 re-encodes)
      ∂b_l   = Σ_rows ∂pre_l            same kernel
      ∂x_l   = ∂pre_l · W_l    [B, K]   _relu_linear_bwd_input_kernel (not for layer 0: coords need none)

  ∂pre_l is formed on the fly from (∂y_l, y_l) in both kernels and never stored.

Memory: saves n activations [B, W] in the compute dtype. The torch reference saves the same plus the
encoding [B, 3 + 6L] and its sin/cos intermediates; inter-layer gradients here are fp32 [B, W], one live at a
time. Half-precision weights: dots in the weight dtype with fp32 accumulation, bias/ReLU/encoding in fp32,
activations stored in the weight dtype (as torch stores them). Coordinates are always read as fp32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inrscrecon.kernels import interpreting
from inrscrecon.kernels._precision import _cast, dot_precision

__all__ = ["TrunkBlocks", "TritonTrunk", "triton_trunk"]


# ------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _encode_tile(c_ptr, rows, row_ok, cols, D, n_bands):
    """Fourier features [BB, BK] (fp32) of rows × feature columns ``cols``; zero outside [B) × [D)."""
    col_ok = cols < D
    j = cols - 3
    n_sin = 3 * n_bands
    is_in = cols < 3
    is_sin = (j >= 0) & (j < n_sin)
    jj = tl.where(j >= n_sin, j - n_sin, j)
    jj = tl.where(jj < 0, 0, jj)
    axis = tl.where(is_in, cols, jj // n_bands)
    band = jj % n_bands
    ok = row_ok[:, None] & col_ok[None, :]
    c = tl.load(c_ptr + rows[:, None] * 3 + axis[None, :], mask=ok, other=0.0).to(tl.float32)
    freq = tl.exp2(band.to(tl.float32)) * 3.141592653589793  # 2^k π, exact scaling of fp32 π as in torch
    ang = c * freq[None, :]
    val = tl.where(is_in[None, :], c, tl.where(is_sin[None, :], tl.sin(ang), tl.cos(ang)))
    return tl.where(ok, val, 0.0)


@triton.jit
def _trunk_fused_fwd_kernel(
    c_ptr,  # [B, 3] fp32
    w0_ptr,  # [W, D] first layer
    b0_ptr,  # [W]
    wh_ptr,  # [n_layers − 1, W, W] hidden layers stacked (any valid pointer when n_layers == 1)
    bh_ptr,  # [n_layers − 1, W]
    y_ptr,  # [n_layers, B, W] when STORE_ALL, else [1, B, W]
    B,
    D,
    W,
    n_bands,
    n_hidden,
    STORE_ALL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """encode → n × (Linear + ReLU) for one row block, activations in registers between layers."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cd = tl.arange(0, BLOCK_D)
    cw = tl.arange(0, BLOCK_W)
    d_ok = cd < D
    w_ok = cw < W
    out_ok = row_ok[:, None] & w_ok[None, :]
    out_off = rows[:, None] * W + cw[None, :]

    w0t = tl.load(w0_ptr + cw[None, :] * D + cd[:, None], mask=d_ok[:, None] & w_ok[None, :], other=0.0)
    x = _cast(_encode_tile(c_ptr, rows, row_ok, cd, D, n_bands), w0t.dtype, UPCAST)
    if UPCAST:
        w0t = w0t.to(tl.float32)
        x = x.to(tl.float32)
    acc = tl.dot(x, w0t, input_precision=PRECISION)
    acc += tl.load(b0_ptr + cw, mask=w_ok, other=0.0).to(tl.float32)[None, :]
    act = _cast(tl.maximum(acc, 0.0), y_ptr.dtype.element_ty, UPCAST)  # rounded as torch stores it
    if STORE_ALL:
        tl.store(y_ptr + out_off, act, mask=out_ok)
    for layer in range(n_hidden):
        wt = tl.load(
            wh_ptr + layer * W * W + cw[None, :] * W + cw[:, None],
            mask=w_ok[:, None] & w_ok[None, :],
            other=0.0,
        )
        a_op = act
        if UPCAST:
            wt = wt.to(tl.float32)
            a_op = act.to(tl.float32)
        acc = tl.dot(a_op, wt, input_precision=PRECISION)
        acc += tl.load(bh_ptr + layer * W + cw, mask=w_ok, other=0.0).to(tl.float32)[None, :]
        act = _cast(tl.maximum(acc, 0.0), y_ptr.dtype.element_ty, UPCAST)
        if STORE_ALL:
            tl.store(y_ptr + (layer + 1) * B * W + out_off, act, mask=out_ok)
    if not STORE_ALL:
        tl.store(y_ptr + out_off, act, mask=out_ok)


@triton.jit
def _linear_relu_fwd_kernel(
    x_ptr,  # [B, K] input activations (unused with ENCODE)
    c_ptr,  # [B, 3] fp32 coordinates (used with ENCODE)
    w_ptr,  # [N, K]
    b_ptr,  # [N]
    y_ptr,  # [B, N] out
    B,
    K,
    N,
    n_bands,
    ENCODE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One layer y = relu(x Wᵀ + b); with ENCODE, x tiles are Fourier features computed from coords."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cn < N
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ck = k0 + tl.arange(0, BLOCK_K)
        k_ok = ck < K
        wt = tl.load(w_ptr + cn[None, :] * K + ck[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if ENCODE:
            x = _cast(_encode_tile(c_ptr, rows, row_ok, ck, K, n_bands), wt.dtype, UPCAST)
        else:
            x = tl.load(
                x_ptr + rows[:, None] * K + ck[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
        if UPCAST:
            wt = wt.to(tl.float32)
            x = x.to(tl.float32)
        acc += tl.dot(x, wt, input_precision=PRECISION)
    acc += tl.load(b_ptr + cn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = tl.maximum(acc, 0.0)
    y = _cast(y, y_ptr.dtype.element_ty, UPCAST)
    tl.store(y_ptr + rows[:, None] * N + cn[None, :], y, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _relu_linear_bwd_input_kernel(
    gy_ptr,  # [B, N] ∂y (any float dtype)
    y_ptr,  # [B, N] stored post-ReLU output
    w_ptr,  # [N, K]
    gx_ptr,  # [B, K] fp32 out
    B,
    K,
    N,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """∂x = (∂y ⊙ 1[y > 0]) · W, reduced over N in the loop."""
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    ck = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ck < K
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cn = n0 + tl.arange(0, BLOCK_N)
        n_ok = cn < N
        ok = row_ok[:, None] & n_ok[None, :]
        gy = tl.load(gy_ptr + rows[:, None] * N + cn[None, :], mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * N + cn[None, :], mask=ok, other=0.0)
        w = tl.load(w_ptr + cn[:, None] * K + ck[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        g = _cast(tl.where(y > 0, gy, 0.0), w.dtype, UPCAST)
        if UPCAST:
            g = g.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(g, w, input_precision=PRECISION)
    tl.store(gx_ptr + rows[:, None] * K + ck[None, :], acc, mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _relu_linear_bwd_weight_kernel(
    gy_ptr,  # [B, N] ∂y
    y_ptr,  # [B, N] stored post-ReLU output
    x_ptr,  # [B, K] layer input; with ENCODE any tensor of the compute dtype (only its dtype is used)
    c_ptr,  # [B, 3] fp32 coordinates (ENCODE)
    gw_ptr,  # [N, K] fp32 out (zeroed when ATOMIC)
    gb_ptr,  # [N] fp32 out (zeroed when ATOMIC)
    B,
    K,
    N,
    n_bands,
    tiles_per_prog,  # row tiles per program along grid axis 2
    ENCODE: tl.constexpr,
    ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """∂W = (∂y ⊙ 1[y > 0])ᵀ · x and ∂b = Σ_rows (∂y ⊙ 1[y > 0]), reduced over a slice of rows."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cn < N
    ck = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ck < K
    acc_w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(tiles_per_prog):
        rows = (pid_s * tiles_per_prog + i) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        ok = row_ok[:, None] & n_ok[None, :]
        gy = tl.load(gy_ptr + rows[:, None] * N + cn[None, :], mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * N + cn[None, :], mask=ok, other=0.0)
        g = tl.where(y > 0, gy, 0.0)
        acc_b += tl.sum(g, axis=0)
        if ENCODE:
            x = _cast(_encode_tile(c_ptr, rows, row_ok, ck, K, n_bands), x_ptr.dtype.element_ty, UPCAST)
        else:
            x = tl.load(
                x_ptr + rows[:, None] * K + ck[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
        g_op = _cast(g, x.dtype, UPCAST)
        if UPCAST:
            g_op = g_op.to(tl.float32)
            x = x.to(tl.float32)
        acc_w += tl.dot(tl.trans(g_op), x, input_precision=PRECISION)
    out = gw_ptr + cn[:, None] * K + ck[None, :]
    ok_w = n_ok[:, None] & k_ok[None, :]
    ok_b = n_ok & ((cn * 0 + pid_k) == 0)  # one K block owns the bias
    if ATOMIC:
        tl.atomic_add(out, acc_w, mask=ok_w)
        tl.atomic_add(gb_ptr + cn, acc_b, mask=ok_b)
    else:
        tl.store(out, acc_w, mask=ok_w)
        tl.store(gb_ptr + cn, acc_b, mask=ok_b)


# ------------------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrunkBlocks:
    """Tiles. ``fuse_layers``: all layers in one kernel (None: when a whole weight tile fits); ``splits``: row
    splits of the weight-gradient reduction (None: from the SM count)."""

    block_b: int
    block_n: int
    block_k: int
    fused_block_b: int
    num_warps: int = 4
    fuse_layers: bool | None = None
    splits: int | None = None
    num_stages: int | None = None


def _default_blocks(device: torch.device, width: int) -> TrunkBlocks:
    if device.type != "cuda":  # interpreter: few, large programs
        return TrunkBlocks(block_b=128, block_n=256, block_k=256, fused_block_b=128, splits=1)
    w_pad = max(16, triton.next_power_of_2(width))
    return TrunkBlocks(
        block_b=64, block_n=64, block_k=32, fused_block_b=64 if w_pad <= 128 else 32, num_warps=4
    )


def _launch_opts(cfg: TrunkBlocks) -> dict[str, int]:
    opts = {"num_warps": cfg.num_warps}
    if cfg.num_stages is not None:
        opts["num_stages"] = cfg.num_stages
    return opts


# Largest weight tile the fused forward stages whole. Compiled for sm_90 (``inrscrecon.kernels.aot`` style,
# registers / stack bytes per thread): bf16 W = 64: 188 / 0 (fused, no spill); bf16 W = 128: 255 / 296–1320
# (spills at every block size and warp count tried); bf16 W = 256: 144 KiB of shared memory and 10.9 KB of
# stack; fp32 W = 64: 255 / 80. So by design only tiles ≤ 8 KiB (bf16 W ≤ 64, fp32 W ≤ 32) run fused; wider
# trunks run the per-layer kernels, whose [64, 32] bf16 tiles reach tensor cores (168 registers, no spill;
# the encoding layer 173 / 32).
FUSED_TILE_BYTES = 8 * 1024

_FUSE_WARNED: set[str] = set()


def _forward(
    coords: torch.Tensor,  # [B, 3] fp32
    n_bands: int,
    weights: list[torch.Tensor],  # [W, D], [W, W], ...
    biases: list[torch.Tensor],  # [W] ...
    cfg: TrunkBlocks,
    store_all: bool,
) -> torch.Tensor:
    """Run the forward → every layer's output [n_layers, B, W] when ``store_all``, else the hidden [1, B, W]
    (one allocation; under ``store_all=False`` the per-layer path keeps at most two activations alive)."""
    n_rows = coords.shape[0]
    width, d_in = weights[0].shape
    dt = weights[0].dtype
    dev = coords.device
    upcast = dev.type != "cuda" or dt == torch.float32
    precision = dot_precision(dt)
    w_pad = max(16, triton.next_power_of_2(width))
    d_pad = max(16, triton.next_power_of_2(d_in))
    fuse = cfg.fuse_layers
    if fuse is None:  # whole [W, W] (and [W, D]) weight tiles staged in shared memory: ≤ FUSED_TILE_BYTES
        fuse = max(w_pad, d_pad) * w_pad * weights[0].element_size() <= FUSED_TILE_BYTES
    if fuse:
        n_hidden = len(weights) - 1
        wh = torch.stack(weights[1:]).contiguous() if n_hidden else weights[0]
        bh = torch.stack(biases[1:]).contiguous() if n_hidden else biases[0]
        ys = torch.empty(len(weights) if store_all else 1, n_rows, width, device=dev, dtype=dt)
        try:
            _trunk_fused_fwd_kernel[(triton.cdiv(n_rows, cfg.fused_block_b),)](
                coords,
                weights[0],
                biases[0],
                wh,
                bh,
                ys,
                n_rows,
                d_in,
                width,
                max(n_bands, 1),
                n_hidden,
                STORE_ALL=store_all,
                UPCAST=upcast,
                PRECISION=precision,
                BLOCK_B=cfg.fused_block_b,
                BLOCK_D=d_pad,
                BLOCK_W=w_pad,
                **_launch_opts(cfg),
            )
            return ys
        except triton.runtime.OutOfResources as err:  # said once, then the per-layer kernels
            key = f"{width}/{dt}"
            if key not in _FUSE_WARNED:
                _FUSE_WARNED.add(key)
                warnings.warn(
                    f"fused trunk kernel does not fit (W={width}, {dt}): {err}; using per-layer kernels",
                    RuntimeWarning,
                    stacklevel=3,
                )
    n_layers = len(weights)
    out = torch.empty(n_layers if store_all else 1, n_rows, weights[-1].shape[0], device=dev, dtype=dt)
    x = coords
    for i, (w, b) in enumerate(zip(weights, biases)):
        n_out, k_in = w.shape
        if store_all or i == n_layers - 1:
            y = out[i if store_all else 0]  # contiguous slice of the one output
        else:
            y = torch.empty(n_rows, n_out, device=dev, dtype=dt)
        grid = (triton.cdiv(n_rows, cfg.block_b), triton.cdiv(n_out, cfg.block_n))
        _linear_relu_fwd_kernel[grid](
            x,
            coords,
            w,
            b,
            y,
            n_rows,
            k_in,
            n_out,
            max(n_bands, 1),
            ENCODE=i == 0,
            UPCAST=upcast,
            PRECISION=precision,
            BLOCK_B=cfg.block_b,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            **_launch_opts(cfg),
        )
        x = y  # without store_all, the previous activation is freed here
    return out


def _backward(
    coords: torch.Tensor,  # [B, 3] fp32
    n_bands: int,
    weights: list[torch.Tensor],  # as in the forward
    ys: list[torch.Tensor],  # every layer's stored post-ReLU output [B, W]
    g_hidden: torch.Tensor,  # [B, W] ∂hidden
    cfg: TrunkBlocks,
) -> list[torch.Tensor]:
    """→ fp32 [∂W_0, ∂b_0, ∂W_1, ∂b_1, …], last layer first in time, from the stored activations."""
    n = len(weights)
    n_rows = coords.shape[0]
    dev = coords.device
    dt = weights[0].dtype
    upcast = dev.type != "cuda" or dt == torch.float32
    common = dict(UPCAST=upcast, PRECISION=dot_precision(dt), BLOCK_B=cfg.block_b, **_launch_opts(cfg))
    gy = g_hidden.contiguous()
    grads: list[torch.Tensor] = [coords] * (2 * n)
    for i in range(n - 1, -1, -1):
        w, y = weights[i], ys[i]
        n_out, k_in = w.shape
        row_tiles = triton.cdiv(n_rows, cfg.block_b)
        nb, kb = triton.cdiv(n_out, cfg.block_n), triton.cdiv(k_in, cfg.block_k)
        splits = cfg.splits
        if splits is None:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
            splits = max(1, math.ceil(4 * sms / (nb * kb)))
        per_prog = math.ceil(row_tiles / max(1, min(splits, row_tiles)))
        splits = math.ceil(row_tiles / per_prog)
        alloc = torch.zeros if splits > 1 else torch.empty
        gw = alloc(n_out, k_in, device=dev, dtype=torch.float32)
        gb = alloc(n_out, device=dev, dtype=torch.float32)
        x = ys[i - 1] if i > 0 else w
        _relu_linear_bwd_weight_kernel[(nb, kb, splits)](
            gy,
            y,
            x,
            coords,
            gw,
            gb,
            n_rows,
            k_in,
            n_out,
            max(n_bands, 1),
            per_prog,
            ENCODE=i == 0,
            ATOMIC=splits > 1,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            **common,
        )
        grads[2 * i], grads[2 * i + 1] = gw, gb
        if i > 0:
            gx = torch.empty(n_rows, k_in, device=dev, dtype=torch.float32)
            _relu_linear_bwd_input_kernel[(row_tiles, kb)](
                gy, y, w, gx, n_rows, k_in, n_out, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, **common
            )
            gy = gx
    return grads


class TritonTrunk(torch.autograd.Function):
    """autograd Function (explicit tiles); the registered op ``inrscrecon::trunk``
    (:mod:`inrscrecon.kernels.ops`) is the traceable twin. Inputs after ``store``: w_0, b_0, w_1, b_1, …
    ``store``: keep every layer's activation for the backward (False under ``torch.no_grad()``)."""

    @staticmethod
    def forward(ctx, coords, n_bands, cfg, store, *params):  # type: ignore[override]
        weights = [p.contiguous() for p in params[0::2]]
        biases = [p.contiguous() for p in params[1::2]]
        ys = list(_forward(coords, n_bands, weights, biases, cfg, store_all=store).unbind(0))
        if store:
            ctx.save_for_backward(coords, *weights, *ys)
        ctx.n_layers, ctx.n_bands, ctx.cfg, ctx.store = len(weights), n_bands, cfg, store
        ctx.b_dtypes = [b.dtype for b in biases]
        return ys[-1]

    @staticmethod
    def backward(ctx, g_hidden):  # type: ignore[override]
        if not ctx.store:
            raise RuntimeError("trunk forward ran without storing activations; cannot differentiate")
        n = ctx.n_layers
        saved = ctx.saved_tensors
        coords, weights, ys = saved[0], list(saved[1 : 1 + n]), list(saved[1 + n :])
        raw = _backward(coords, ctx.n_bands, weights, ys, g_hidden, ctx.cfg)
        grads: list[torch.Tensor | None] = []
        for i in range(n):
            grads.append(raw[2 * i].to(weights[i].dtype) if ctx.needs_input_grad[4 + 2 * i] else None)
            grads.append(raw[2 * i + 1].to(ctx.b_dtypes[i]) if ctx.needs_input_grad[5 + 2 * i] else None)
        return (None, None, None, None, *grads)


def triton_trunk(
    coords: torch.Tensor,  # [B, 3], normalised to [-1, 1]
    n_bands: int,
    weights: Sequence[torch.Tensor],  # [W, 3 + 6·n_bands], then [W, W] × (n_layers − 1)
    biases: Sequence[torch.Tensor],  # [W] × n_layers
    blocks: TrunkBlocks | None = None,
) -> torch.Tensor:
    """Fourier encoding (include_input=True) + n × (Linear + ReLU) → hidden [B, W] in the weights' dtype.

    Gradients flow to every weight and bias (not to coords). Widths up to 256 (any value; padded internally).
    ``blocks`` overrides the tile configuration (tests, tuning).
    """
    if coords.dim() != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must be [B, 3], got {tuple(coords.shape)}")
    if not weights or len(weights) != len(biases):
        raise ValueError("need one bias per weight and at least one layer")
    d_in = 3 + 6 * n_bands
    width = weights[0].shape[0]
    if weights[0].shape[1] != d_in:
        raise ValueError(
            f"first weight must be [W, 3 + 6·n_bands] = [W, {d_in}], got {tuple(weights[0].shape)}"
        )
    for w, b in zip(weights, biases):
        if w.shape[0] != width or b.shape != (width,) or w.dtype != weights[0].dtype:
            raise ValueError("all layers must have width W, bias [W] and one weight dtype")
    if any(w.shape[1] != width for w in weights[1:]):
        raise ValueError(f"hidden layers must be [W, W] = [{width}, {width}]")
    if width > 256 or d_in > 256:
        raise ValueError(f"triton_trunk supports W ≤ 256 and 3 + 6·n_bands ≤ 256, got W={width}, D={d_in}")
    if coords.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "triton_trunk needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)"
        )
    cfg = blocks or _default_blocks(coords.device, width)
    params = [t for wb in zip(weights, biases) for t in wb]
    store = torch.is_grad_enabled() and any(p.requires_grad for p in params)  # nothing kept under no_grad
    out = TritonTrunk.apply(coords.detach().float().contiguous(), int(n_bands), cfg, store, *params)
    return out
