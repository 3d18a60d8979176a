"""Multi-resolution hash-grid encoding (Müller et al. 2022, instant-NGP; the tiny-cuda-nn ``HashGrid``).

Definition (tiny-cuda-nn's conventions, so its encoding can share the table):

* coordinates c ∈ [−1, 1]³ are **clamped** to the cube and mapped to u = (c + 1) / 2 ∈ [0, 1]³ — a point
  outside the cube takes the features of the nearest point on its faces (the encoding is constant along the
  outward normal). With ``FieldConfig.z_stretch`` choose the stretch so that the stretched z extent stays
  inside [−1, 1] (z_stretch · z-half-extent ≤ 1), or z beyond ±1 collapses onto the faces;
* level l = 0..L−1 has scale s_l = N_0·b^l − 1 with b = (N_max / N_0)^(1/(L−1)) (geometric between
  ``base_resolution`` N_0 and ``max_resolution`` N_max) and R_l = ⌈s_l⌉ + 1 vertices per axis;
* p = s_l·u + 0.5, corner g = ⌊p⌋, weights = trilinear in p − g over the 8 corners g + {0, 1}³;
* level l owns P_l = min(next multiple of 8 of R_l³, T) rows of the table (T = 2^log2_table_size); the
  corner's row is ``x + y·R + z·R²`` (dense) when R_l³ ≤ P_l, else the spatial hash
  ``(x·1) ⊕ (y·2654435761) ⊕ (z·805459861)`` (uint32 products), both mod P_l;
* output [B, 3 + L·F] = [c (raw, when ``include_input``), level 0's F features, level 1's, …].

The table is one parameter [ΣP_l, F] (level-major rows), initialised U(−1e−4, 1e−4).

Implementations: ``hashgrid_reference`` (torch, vectorised over levels and corners; the CPU path and ground
truth), the Triton kernels of :mod:`inrscrecon.kernels.triton_hashgrid` registered here as the
``inrscrecon::hashgrid`` op (forward + backward: table gradient by fp32 scatter-add, coordinate gradient
optional), and tiny-cuda-nn's encoding when ``tinycudann`` is importable (checked against the reference once
per configuration before ``auto`` uses it). ``impl="auto"``: CPU → torch; CUDA → tiny-cuda-nn if it passed
its check, else Triton when importable, else torch. ``fit`` sets ``impl`` from ``TrainConfig.backend``
(torch / triton as asked; auto and cuda → auto); a loaded model starts at auto.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: coherent prime hash factors of instant-NGP / tiny-cuda-nn (x, y, z)
PRIMES = (1, 2654435761, 805459861)
IMPLS = ("auto", "torch", "triton", "tcnn")
# looked up once at import, so that ``auto`` is a constant for torch.compile
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_HAS_TCNN = importlib.util.find_spec("tinycudann") is not None


@dataclass(frozen=True)
class GridLevels:
    """Per-level geometry: scale s_l, vertices per axis R_l, first table row, rows P_l, dense flag."""

    scale: tuple[float, ...]
    resolution: tuple[int, ...]
    offset: tuple[int, ...]
    size: tuple[int, ...]
    dense: tuple[bool, ...]
    per_level_scale: float

    @property
    def n_rows(self) -> int:
        """Rows of the whole table (ΣP_l)."""
        return self.offset[-1] + self.size[-1]


def grid_levels(levels: int, log2_table_size: int, base_resolution: int, max_resolution: int) -> GridLevels:
    """The geometry of a hash grid; ValueError on sizes outside the supported ranges."""
    if levels < 1:
        raise ValueError(f"hashgrid levels must be ≥ 1, got {levels}")
    if not 4 <= log2_table_size <= 30:
        raise ValueError(f"hashgrid log2_table_size must be in [4, 30], got {log2_table_size}")
    if base_resolution < 2 or max_resolution < base_resolution:
        raise ValueError(
            f"hashgrid needs 2 ≤ base_resolution ≤ max_resolution, got {base_resolution}, {max_resolution}"
        )
    b = math.exp(math.log(max_resolution / base_resolution) / (levels - 1)) if levels > 1 else 1.0
    t = 1 << log2_table_size
    scale, res, off, size, dense = [], [], [], [], []
    row = 0
    for lvl in range(levels):
        s = base_resolution * b**lvl - 1.0
        s = float(round(s)) if abs(s - round(s)) < 1e-6 else s  # the finest level lands on N_max exactly
        r = math.ceil(s) + 1
        p = min(-(-(r**3) // 8) * 8, t)
        scale.append(s)
        res.append(r)
        off.append(row)
        size.append(p)
        dense.append(r**3 <= p)
        row += p
    return GridLevels(tuple(scale), tuple(res), tuple(off), tuple(size), tuple(dense), b)


def level_tensors(g: GridLevels, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(scale fp32 [L], resolution int64 [L], offset int64 [L], size int64 [L]) on ``device`` (cached)."""
    key = (g, str(device))
    if key not in _LEVEL_TENSORS:
        _LEVEL_TENSORS[key] = (
            torch.tensor(g.scale, dtype=torch.float32, device=device),
            torch.tensor(g.resolution, dtype=torch.int64, device=device),
            torch.tensor(g.offset, dtype=torch.int64, device=device),
            torch.tensor(g.size, dtype=torch.int64, device=device),
        )
    return _LEVEL_TENSORS[key]


_LEVEL_TENSORS: dict[tuple[GridLevels, str], tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _corners(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-axis (lower, upper) pairs [B, L, 3, 2] → the x, y, z views that broadcast to the corners
    [B, L, 2(z), 2(y), 2(x)]; flattened, corner c = bx + 2·by + 4·bz (bit a = upper along axis a)."""
    return x[:, :, 0, None, None, :], x[:, :, 1, None, :, None], x[:, :, 2, :, None, None]


def hashgrid_reference(
    coords: Tensor,  # [B, 3] normalised, any real values (clamped to [−1, 1])
    table: Tensor,  # [ΣP_l, F]
    g: GridLevels,
) -> Tensor:
    """Level features [B, L·F] in the table's dtype (torch; autograd to the table and the coordinates).

    Dense levels come first (R_l grows with l), so the level axis splits into a dense prefix and a hashed
    suffix; the hashed levels have P_l = T, a power of two (mod = mask). The 8 corners' rows are gathered
    by ``index_select`` (its backward is one ``index_add`` into the table) and summed by a batched matmul."""
    n = coords.shape[0]
    scale, res, off, size = level_tensors(g, coords.device)
    n_dense = sum(g.dense)
    u = (coords.to(table.dtype).clamp(-1.0, 1.0) + 1.0) * 0.5  # [B, 3]
    p = u[:, None, :] * scale.to(table.dtype)[None, :, None] + 0.5  # [B, L, 3]
    base = torch.floor(p.detach())
    frac = p - base  # [B, L, 3] (differentiable in the coordinates)
    lo = base.long()
    cx, cy, cz = _corners(torch.stack([lo, lo + 1], dim=-1))  # corner coordinates per axis
    parts = []
    if n_dense:  # x + y·R + z·R², mod P_l
        r = res[:n_dense, None, None, None]
        lin = cx[:, :n_dense] + cy[:, :n_dense] * r + cz[:, :n_dense] * (r * r)
        parts.append(lin % size[:n_dense, None, None, None])
    if n_dense < len(g.dense):  # (x·1) ⊕ (y·π₂) ⊕ (z·π₃) mod T (low bits of the uint32 products)
        h = cx[:, n_dense:] ^ (cy[:, n_dense:] * PRIMES[1]) ^ (cz[:, n_dense:] * PRIMES[2])
        parts.append(h & (g.size[-1] - 1))
    idx = torch.cat(parts, dim=1).flatten(2) + off[None, :, None]  # [B, L, 8] table rows
    wx, wy, wz = _corners(torch.stack([1.0 - frac, frac], dim=-1))
    w = (wx * wy * wz).flatten(2)  # [B, L, 8] trilinear weights
    feats = table.index_select(0, idx.view(-1)).view(-1, 8, table.shape[1])  # [B·L, 8, F]
    return torch.bmm(w.reshape(-1, 1, 8), feats).view(n, -1)


# ------------------------------------------------------------------------------------------------------------
# Triton op (torch.library, traceable); the kernel module is looked up at call time (tests reload it)
# ------------------------------------------------------------------------------------------------------------


def _kernels() -> ModuleType:
    return importlib.import_module("inrscrecon.kernels.triton_hashgrid")


@torch.library.custom_op("inrscrecon::hashgrid", mutates_args=())
def _hashgrid_fwd(
    coords: Tensor, table: Tensor, scale: Tensor, res: Tensor, off: Tensor, size: Tensor
) -> Tensor:
    return _kernels().hashgrid_forward(coords, table, scale, res, off, size)


@_hashgrid_fwd.register_fake
def _hashgrid_fwd_fake(coords, table, scale, res, off, size):
    return coords.new_empty(coords.shape[0], scale.shape[0] * table.shape[1], dtype=torch.float32)


@torch.library.custom_op("inrscrecon::hashgrid_backward", mutates_args=())
def _hashgrid_bwd(
    coords: Tensor,
    table: Tensor,
    scale: Tensor,
    res: Tensor,
    off: Tensor,
    size: Tensor,
    grad: Tensor,
    coord_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _kernels().hashgrid_backward(coords, table, scale, res, off, size, grad, coord_grad)


@_hashgrid_bwd.register_fake
def _hashgrid_bwd_fake(coords, table, scale, res, off, size, grad, coord_grad):
    gc = coords.new_empty(coords.shape if coord_grad else (0,), dtype=torch.float32)
    return table.new_empty(table.shape, dtype=torch.float32), gc


def _hashgrid_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _hashgrid_backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    coords, table, scale, res, off, size = ctx.saved_tensors
    need_c, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g_table, g_coords = torch.ops.inrscrecon.hashgrid_backward(
        coords, table, scale, res, off, size, grad.float().contiguous(), bool(need_c)
    )
    return (
        g_coords.to(coords.dtype) if need_c else None,
        g_table.to(table.dtype) if need_t else None,
        None,
        None,
        None,
        None,
    )


_hashgrid_fwd.register_autograd(_hashgrid_backward, setup_context=_hashgrid_setup)


def hashgrid_triton(
    coords: Tensor,  # [B, 3]
    table: Tensor,  # [ΣP_l, F] fp32
    g: GridLevels,
) -> Tensor:
    """Level features [B, L·F] fp32 from the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
    scale, res, off, size = level_tensors(g, coords.device)
    return torch.ops.inrscrecon.hashgrid(coords.float().contiguous(), table, scale, res, off, size)


# ------------------------------------------------------------------------------------------------------------
# tiny-cuda-nn (optional)
# ------------------------------------------------------------------------------------------------------------


def tcnn_config(levels: int, features: int, log2_table_size: int, base: int, per_level_scale: float) -> dict:
    """tiny-cuda-nn's encoding config of the same grid."""
    return {
        "otype": "HashGrid",
        "n_levels": levels,
        "n_features_per_level": features,
        "log2_hashmap_size": log2_table_size,
        "base_resolution": base,
        "per_level_scale": per_level_scale,
        "interpolation": "Linear",
    }


@functools.lru_cache(maxsize=1)
def _tcnn() -> Any:
    if not _HAS_TCNN:
        return None
    try:
        return importlib.import_module("tinycudann")
    except Exception as err:  # installed but not loadable (no GPU, ABI mismatch)
        log.info("inrscrecon hashgrid: tinycudann is installed but not importable (%s)", err)
        return None


def hashgrid_tcnn(coords: Tensor, table: Tensor, native: Any) -> Tensor:
    """Level features [B, L·F] fp32 from tiny-cuda-nn's encoding run on our table (its params, flattened).

    ``native``: a ``tinycudann.Encoding`` of the same grid (:func:`tcnn_config`); its own parameters are
    unused: its autograd function gets our table, so the gradient lands in ``table``. The batch is padded
    to tiny-cuda-nn's granularity (128) as its module does."""
    mod = _tcnn()
    if native.params.numel() != table.numel():  # another layout: never let it read past our table
        raise ValueError(
            f"tiny-cuda-nn expects {native.params.numel()} parameters, the table has {table.numel()}"
        )
    n = coords.shape[0]
    u = (coords.float().clamp(-1.0, 1.0) + 1.0) * 0.5
    pad = -n % 128
    if pad:
        u = nn.functional.pad(u, (0, 0, 0, pad))
    params = table.reshape(-1).contiguous()
    out = mod.modules._module_function.apply(
        native.native_tcnn_module, u.contiguous(), params, native.loss_scale
    )
    return out[:n, : native.n_output_dims].float()


# ------------------------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------------------------


class HashGrid(nn.Module):
    """Hash-grid features of normalised coords: [B, 3] → [B, L·F]. ``impl`` ∈ :data:`IMPLS` (not saved)."""

    def __init__(
        self,
        levels: int = 8,
        features_per_level: int = 2,
        log2_table_size: int = 15,
        base_resolution: int = 4,
        max_resolution: int = 32,
        seed: int = 0,
        impl: str = "auto",
    ):
        super().__init__()
        if features_per_level not in (1, 2, 4, 8):
            raise ValueError(f"hashgrid features_per_level must be 1, 2, 4 or 8, got {features_per_level}")
        self.levels = grid_levels(levels, log2_table_size, base_resolution, max_resolution)
        self.n_levels, self.features = levels, features_per_level
        self.log2_table_size, self.base_resolution = log2_table_size, base_resolution
        gen = torch.Generator().manual_seed(seed)
        init = torch.rand(self.levels.n_rows, features_per_level, generator=gen) * 2e-4 - 1e-4
        self.table = nn.Parameter(init)
        self.impl = impl
        self._tcnn_native: dict[int, Any] = {}  # device index → tiny-cuda-nn module (no parameters of ours)
        self._tcnn_verdict: dict[int, bool] = {}  # device index → passed the check against the reference

    @property
    def out_dim(self) -> int:
        return self.n_levels * self.features

    def resolve(self, coords: Tensor) -> str:
        """The implementation a call on ``coords`` runs (``auto`` resolved; explicit requests checked)."""
        if self.impl not in IMPLS:
            raise ValueError(f"hashgrid impl must be one of {IMPLS}, got {self.impl!r}")
        if self.impl != "auto":
            return self.impl
        if coords.device.type != "cuda":
            return "torch"
        if _HAS_TCNN and self._tcnn_ok(coords.device):
            return "tcnn"
        if _HAS_TRITON and self.table.dtype == torch.float32:
            return "triton"
        return "torch"

    def _tcnn_module(self, device: torch.device) -> Any:
        key = device.index or 0
        if key not in self._tcnn_native:
            cfg = tcnn_config(
                self.n_levels,
                self.features,
                self.log2_table_size,
                self.base_resolution,
                self.levels.per_level_scale,
            )
            with torch.cuda.device(device):
                self._tcnn_native[key] = _tcnn().Encoding(3, cfg, dtype=torch.float32)
        return self._tcnn_native[key]

    def _tcnn_ok(self, device: torch.device) -> bool:
        """tiny-cuda-nn is importable and matches the reference on random points (checked once, eagerly:
        inside a torch.compile trace only an earlier verdict counts)."""
        if torch.compiler.is_compiling():
            return self._tcnn_verdict.get(device.index or 0, False)
        return _tcnn_check(self, device) if _tcnn() is not None else False

    def forward(self, coords: Tensor) -> Tensor:  # coords: [B, 3] → [B, L·F]
        which = self.resolve(coords)
        if which == "torch":
            return hashgrid_reference(coords, self.table, self.levels)
        if which == "triton":
            return hashgrid_triton(coords, self.table, self.levels)
        return hashgrid_tcnn(coords, self.table, self._tcnn_module(coords.device))


def _tcnn_check(grid: HashGrid, device: torch.device) -> bool:
    """Once per grid and device: tiny-cuda-nn's output on 4096 random points within 1e−4 of the reference
    (on a random table); any failure (error, other conventions, other layout) disables it for this grid."""
    key = device.index or 0
    if key in grid._tcnn_verdict:
        return grid._tcnn_verdict[key]
    ok, why = False, ""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        pts = (torch.rand(4096, 3, generator=gen) * 2 - 1).to(device)
        table = torch.rand(grid.table.shape, generator=gen).to(device)
        want = hashgrid_reference(pts, table, grid.levels)
        got = hashgrid_tcnn(pts, table, grid._tcnn_module(device))
        err = float((got - want).abs().max())
        ok, why = err <= 1e-4, f"max |tcnn − reference| = {err:.3g}"
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
    log.info("inrscrecon hashgrid: tiny-cuda-nn %s (%s)", "used" if ok else "not used", why)
    grid._tcnn_verdict[key] = ok
    return ok


__all__ = ["GridLevels", "HashGrid", "grid_levels", "hashgrid_reference", "hashgrid_triton", "tcnn_config"]
