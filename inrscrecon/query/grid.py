"""The render grid: a regular box of voxels over the tissue, voxel sizes per axis (µm)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inrscrecon.errors import InputError
from inrscrecon.field.model import INRField
from inrscrecon.query.tissue import z_pad

DEFAULT_XY_VOXELS = 128  # voxels along the longest x/y side when neither a voxel size nor a shape is given


@dataclass(frozen=True)
class GridSpec:
    """A regular grid of voxels. ``origin`` (x, y, z) µm is the corner of voxel (0, 0, 0); ``voxel`` (dx, dy, dz)
    µm; ``shape`` (Z, Y, X). Voxel (k, j, i) has its centre at origin + (i + ½, j + ½, k + ½) · voxel."""

    origin: tuple[float, float, float]
    voxel: tuple[float, float, float]
    shape: tuple[int, int, int]

    @classmethod
    def from_bounds(
        cls,
        bounds: Sequence[float],  # (xmin, xmax, ymin, ymax, zmin, zmax) µm
        voxel: float | Sequence[float] | None = None,  # XY, or (XY, Z) µm
        shape: Sequence[int] | None = None,  # (Z, Y, X)
    ) -> GridSpec:
        """Cover ``bounds`` with voxels of ``voxel`` µm (one number: isotropic; two: XY and Z), or split it into
        ``shape`` voxels. Neither: 128 voxels along the longest x/y side, z at the same size. With a voxel
        size, a box thicker than nothing gets at least two z planes; a flat box (one plane) gets one."""
        if len(bounds) != 6 or not np.isfinite(np.asarray(bounds, dtype=float)).all():
            raise InputError(
                f"bounds must be six finite numbers xmin xmax ymin ymax zmin zmax, got {list(bounds)}"
            )
        lo = np.array(bounds[0::2], dtype=np.float64)
        hi = np.array(bounds[1::2], dtype=np.float64)
        if (hi < lo).any():
            raise InputError(f"bounds must have min ≤ max on every axis, got {list(bounds)}")
        ext = hi - lo
        if shape is not None:
            if voxel is not None:
                raise InputError("give either a voxel size or a grid shape, not both")
            if len(shape) != 3 or min(shape) < 1:
                raise InputError(f"grid shape must be three positive integers Z Y X, got {list(shape)}")
            zyx = np.array(shape, dtype=np.int64)
            vox = ext / zyx[::-1]
            flat = vox <= 0
            vox[flat] = (ext.max() / max(zyx.max(), 1)) if ext.max() > 0 else 1.0
        else:
            if voxel is None:
                xy = float(ext[:2].max() / DEFAULT_XY_VOXELS) if ext[:2].max() > 0 else 1.0
                vxy, vz = xy, xy
            else:
                v = [float(voxel)] if isinstance(voxel, int | float) else [float(x) for x in voxel]
                if len(v) not in (1, 2):
                    raise InputError(f"voxel size must be XY or XY Z (µm), got {v}")
                vxy, vz = v[0], v[-1]
            for name, val in (("XY", vxy), ("Z", vz)):
                if not np.isfinite(val) or val <= 0:
                    raise InputError(f"voxel size {name} must be a positive number of µm, got {val}")
            vox = np.array([vxy, vxy, vz])
            zyx = np.maximum(np.ceil(ext / vox - 1e-9), 1).astype(np.int64)[::-1]
            if ext[2] > 0 and zyx[0] < 2:  # a thick box gets two planes at least
                zyx[0], vox[2] = 2, ext[2] / 2
        # centre the grid on the bounds (a flat axis gets its one voxel centred on the plane)
        origin = (lo + hi) / 2 - zyx[::-1] * vox / 2
        return cls(tuple(origin.tolist()), tuple(vox.tolist()), tuple(int(v) for v in zyx))  # type: ignore[arg-type]

    @property
    def n_points(self) -> int:
        return int(np.prod(self.shape))

    def axis_centres(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates along z [Z], y [Y], x [X] (µm)."""
        o, v, (nz, ny, nx) = self.origin, self.voxel, self.shape
        return (
            o[2] + (np.arange(nz) + 0.5) * v[2],
            o[1] + (np.arange(ny) + 0.5) * v[1],
            o[0] + (np.arange(nx) + 0.5) * v[0],
        )

    def points(self, z0: int = 0, z1: int | None = None) -> np.ndarray:
        """Voxel centres of planes z0..z1−1 as (x, y, z) µm, [nz · Y · X, 3] in C order (z, y, x)."""
        zc, yc, xc = self.axis_centres()
        zz, yy, xx = np.meshgrid(zc[z0:z1], yc, xc, indexing="ij")
        return np.column_stack([xx.ravel(), yy.ravel(), zz.ravel()])


def bounds_of(xyz: np.ndarray, margin: float = 0.0, z_margin: float | None = None) -> list[float]:
    """(xmin, xmax, ymin, ymax, zmin, zmax) of points [N, 3], widened by ``margin`` µm in x, y and by
    ``z_margin`` (default ``margin``) in z."""
    zm = margin if z_margin is None else z_margin
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    return [
        float(lo[0] - margin),
        float(hi[0] + margin),
        float(lo[1] - margin),
        float(hi[1] + margin),
        float(lo[2] - zm),
        float(hi[2] + zm),
    ]


def model_bounds(model: INRField) -> list[float]:
    """The training cells' bounding box stored in the model file, z padded by half a section spacing, as
    bounds. InputError for a model file written before the box was stored (pass --cells or --bounds)."""
    b = getattr(model.cfg, "bounds", None)
    if not b:
        raise InputError(
            "this model file does not record its training cells' extent; pass --cells (the training "
            "coordinates) or --bounds XMIN XMAX YMIN YMAX ZMIN ZMAX"
        )
    (x0, y0, z0), (x1, y1, z1) = b
    pad = z_pad(getattr(model.cfg, "section_z", None) or [z0, z1], getattr(model.cfg, "spot_um", 0.0))
    return [float(x0), float(x1), float(y0), float(y1), float(z0) - pad, float(z1) + pad]


__all__ = ["GridSpec", "bounds_of", "model_bounds"]
