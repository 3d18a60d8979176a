"""Hash-grid lookup + trilinear interpolation in Triton: coords [B, 3] → level features [B, L·F].

Reference: ``hashgrid_reference`` (:mod:`inrscrecon.field.hashgrid`, which states the grid's definition and
registers these host functions as the ``inrscrecon::hashgrid`` op). One program per (row block, level):
it reads the block's coordinates, forms the level's 8 corners in registers, gathers their F features from
the table and writes the interpolated [BLOCK, F] slice. Nothing but the output is written.

Backward (same program grid), with w_c the trilinear weight of corner c and T[i_c] its table row::

    out[b, l, f] = Σ_c w_c(p) · T[i_c, f],     p = s_l · (clamp(x) + 1) / 2 + 0.5
    ∂T[i_c, f]  += w_c · ∂out[b, l, f]                       fp32 atomic adds (rows collide across points)
    ∂x_a[b]      = Σ_l Σ_c Σ_f ∂out · T[i_c, f] · ∂w_c/∂p_a · s_l / 2   (0 where x_a is clamped)
    ∂w_c/∂p_a    = ±Π_{a'≠a} (trilinear factor of axis a'),  + for the upper corner along a

The coordinate gradient (only when asked) is written per level [L, B, 3] and summed on the host (no
atomics). Memory: the table gradient [ΣP_l, F] fp32 is the only buffer besides the outputs; the torch
reference also keeps the [B, L, 8] row indices and weights and the [B, L, 8, F] gathered features for its
backward. fp32 only (the interpreter has no bf16 atomics; the table is an fp32 master either way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inrscrecon.kernels import interpreting

__all__ = ["hashgrid_backward", "hashgrid_forward"]

#: instant-NGP's coherent prime hash factors of y and z (x's is 1); constexpr so that jit code may read them
PRIME_Y = tl.constexpr(2654435761)
PRIME_Z = tl.constexpr(805459861)


@triton.jit
def _axis(c_ptr, rows, ok, a: tl.constexpr, scale):
    """(floor corner int64, fraction, dp/dx or 0 where clamped) of axis ``a`` at one level."""
    x = tl.load(c_ptr + rows * 3 + a, mask=ok, other=0.0)
    inside = (x >= -1.0) & (x <= 1.0)
    x = tl.minimum(tl.maximum(x, -1.0), 1.0)
    p = (x + 1.0) * 0.5 * scale + 0.5
    g = tl.floor(p)
    return g.to(tl.int64), p - g, tl.where(inside, 0.5 * scale, 0.0)


@triton.jit
def _corner(gx, gy, gz, fx, fy, fz, c: tl.constexpr, res, size, off):
    """Table row and trilinear factors of corner ``c`` (bit a = upper along axis a)."""
    bx: tl.constexpr = c & 1
    by: tl.constexpr = (c >> 1) & 1
    bz: tl.constexpr = (c >> 2) & 1
    ix = gx + bx
    iy = gy + by
    iz = gz + bz
    wx = fx if bx else 1.0 - fx
    wy = fy if by else 1.0 - fy
    wz = fz if bz else 1.0 - fz
    lin = ix + iy * res + iz * res * res
    hashed = ix ^ (iy * PRIME_Y) ^ (iz * PRIME_Z)
    idx = tl.where(res * res * res <= size, lin, hashed) % size + off
    return idx, wx, wy, wz


@triton.jit
def _hashgrid_fwd_kernel(
    c_ptr,  # [B, 3] fp32
    t_ptr,  # [P, F] fp32
    scale_ptr,  # [L] fp32
    res_ptr,  # [L] int64
    off_ptr,  # [L] int64
    size_ptr,  # [L] int64
    out_ptr,  # [B, L·F] fp32
    B,
    L,
    F: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    lvl = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < B
    scale = tl.load(scale_ptr + lvl)
    res = tl.load(res_ptr + lvl)
    off = tl.load(off_ptr + lvl)
    size = tl.load(size_ptr + lvl)
    gx, fx, _ = _axis(c_ptr, rows, ok, 0, scale)
    gy, fy, _ = _axis(c_ptr, rows, ok, 1, scale)
    gz, fz, _ = _axis(c_ptr, rows, ok, 2, scale)
    cols = tl.arange(0, F)
    acc = tl.zeros((BLOCK, F), dtype=tl.float32)
    for c in tl.static_range(8):
        idx, wx, wy, wz = _corner(gx, gy, gz, fx, fy, fz, c, res, size, off)
        feat = tl.load(t_ptr + idx[:, None] * F + cols[None, :], mask=ok[:, None], other=0.0)
        acc += (wx * wy * wz)[:, None] * feat
    tl.store(out_ptr + rows[:, None] * (L * F) + lvl * F + cols[None, :], acc, mask=ok[:, None])


@triton.jit
def _hashgrid_bwd_kernel(
    c_ptr,  # [B, 3] fp32
    t_ptr,  # [P, F] fp32
    scale_ptr,
    res_ptr,
    off_ptr,
    size_ptr,
    g_ptr,  # [B, L·F] fp32 ∂out
    gt_ptr,  # [P, F] fp32 ∂table (zeroed; atomically accumulated)
    gc_ptr,  # [L, B, 3] fp32 ∂coords per level (when COORD_GRAD)
    B,
    L,
    F: tl.constexpr,
    BLOCK: tl.constexpr,
    COORD_GRAD: tl.constexpr,
):
    pid = tl.program_id(0)
    lvl = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < B
    scale = tl.load(scale_ptr + lvl)
    res = tl.load(res_ptr + lvl)
    off = tl.load(off_ptr + lvl)
    size = tl.load(size_ptr + lvl)
    gx, fx, dx = _axis(c_ptr, rows, ok, 0, scale)
    gy, fy, dy = _axis(c_ptr, rows, ok, 1, scale)
    gz, fz, dz = _axis(c_ptr, rows, ok, 2, scale)
    cols = tl.arange(0, F)
    g = tl.load(g_ptr + rows[:, None] * (L * F) + lvl * F + cols[None, :], mask=ok[:, None], other=0.0)
    ax = tl.zeros((BLOCK,), dtype=tl.float32)
    ay = tl.zeros((BLOCK,), dtype=tl.float32)
    az = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in tl.static_range(8):
        idx, wx, wy, wz = _corner(gx, gy, gz, fx, fy, fz, c, res, size, off)
        ptrs = gt_ptr + idx[:, None] * F + cols[None, :]
        tl.atomic_add(ptrs, (wx * wy * wz)[:, None] * g, mask=ok[:, None])
        if COORD_GRAD:
            feat = tl.load(t_ptr + idx[:, None] * F + cols[None, :], mask=ok[:, None], other=0.0)
            gf = tl.sum(g * feat, axis=1)  # [BLOCK] ∂out · T[i_c]
            sx: tl.constexpr = 1.0 if (c & 1) else -1.0
            sy: tl.constexpr = 1.0 if ((c >> 1) & 1) else -1.0
            sz: tl.constexpr = 1.0 if ((c >> 2) & 1) else -1.0
            ax += gf * (sx * wy * wz)
            ay += gf * (sy * wx * wz)
            az += gf * (sz * wx * wy)
    if COORD_GRAD:
        base = gc_ptr + (lvl * B + rows) * 3
        tl.store(base + 0, ax * dx, mask=ok)
        tl.store(base + 1, ay * dy, mask=ok)
        tl.store(base + 2, az * dz, mask=ok)


def _check(coords: torch.Tensor, table: torch.Tensor) -> None:
    if coords.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "triton_hashgrid needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)"
        )
    if coords.dim() != 2 or coords.shape[1] != 3 or coords.dtype != torch.float32:
        raise ValueError(f"coords must be fp32 [B, 3], got {coords.dtype} {tuple(coords.shape)}")
    if table.dim() != 2 or table.dtype != torch.float32:
        raise ValueError(f"table must be fp32 [P, F], got {table.dtype} {tuple(table.shape)}")


def _block(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 1024  # interpreter: few, large programs


def hashgrid_forward(
    coords: torch.Tensor,  # [B, 3] fp32
    table: torch.Tensor,  # [P, F] fp32
    scale: torch.Tensor,  # [L] fp32
    res: torch.Tensor,  # [L] int64
    off: torch.Tensor,  # [L] int64
    size: torch.Tensor,  # [L] int64
) -> torch.Tensor:
    """Level features [B, L·F] fp32."""
    _check(coords, table)
    n, n_lv, f = coords.shape[0], scale.shape[0], table.shape[1]
    out = torch.empty(n, n_lv * f, device=coords.device, dtype=torch.float32)
    if n == 0:
        return out
    blk = _block(coords.device)
    _hashgrid_fwd_kernel[(triton.cdiv(n, blk), n_lv)](
        coords.contiguous(), table.contiguous(), scale, res, off, size, out, n, n_lv, F=f, BLOCK=blk
    )
    return out


def hashgrid_backward(
    coords: torch.Tensor,  # [B, 3] fp32
    table: torch.Tensor,  # [P, F] fp32
    scale: torch.Tensor,
    res: torch.Tensor,
    off: torch.Tensor,
    size: torch.Tensor,
    grad: torch.Tensor,  # [B, L·F] fp32
    coord_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂table [P, F] fp32, ∂coords [B, 3] fp32 — or an empty [0] tensor unless ``coord_grad``)."""
    _check(coords, table)
    n, n_lv, f = coords.shape[0], scale.shape[0], table.shape[1]
    g_table = torch.zeros_like(table, dtype=torch.float32)
    g_lvl = torch.zeros((n_lv, n, 3) if coord_grad else (1, 1, 3), device=coords.device, dtype=torch.float32)
    if n > 0:
        blk = _block(coords.device)
        _hashgrid_bwd_kernel[(triton.cdiv(n, blk), n_lv)](
            coords.contiguous(),
            table.contiguous(),
            scale,
            res,
            off,
            size,
            grad.float().contiguous(),
            g_table,
            g_lvl,
            n,
            n_lv,
            F=f,
            BLOCK=blk,
            COORD_GRAD=bool(coord_grad),
        )
    g_coords = g_lvl.sum(0) if coord_grad else coords.new_empty(0, dtype=torch.float32)
    return g_table, g_coords
