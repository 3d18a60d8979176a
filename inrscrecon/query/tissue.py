"""Where the tissue is: per-section outlines of the training cells, interpolated in z.

Each section (a distinct z of the training cells, or a z-slab of a 3D point cloud) gets an outline: the
alpha shape of its cells (Delaunay triangles of circumradius ≤ α; ``kind="hull"``: the convex hull),
rasterised, holes filled, traced back into polygons. Between two sections a point is inside when the
z-interpolated signed distance to the two outlines is ≤ 0, so the mask follows the tissue as it changes shape
from section to section; beyond the first and last section it extends by half a section spacing.

:func:`tissue_frame` summarises the training cells for the model file (bounding box, section z, outlines,
spot spacing); :class:`TissueMask` answers ``contains(xyz)`` and ``distance(xyz)`` from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inrscrecon.errors import InputError

RASTER = 256  # outline raster: pixels along a section's longest side
SDF_RASTER = 256  # signed-distance raster of a mask: pixels along the longest xy side of the bounds
MAX_SECTIONS = 64  # more distinct z values than this: a 3D point cloud, binned into z-slabs
MAX_VERTICES = 1000  # per outline polygon (simplified beyond)


def _sections(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group cells by section: (section z [S], section index per cell [N]). More than MAX_SECTIONS distinct z
    values (a 3D point cloud): z-slabs of equal cell count, each at its median z."""
    uz, inv = np.unique(np.round(z, 6), return_inverse=True)
    if len(uz) <= MAX_SECTIONS:
        return uz.astype(np.float64), inv
    n_bins = min(MAX_SECTIONS // 2, max(2, len(z) // 200))
    edges = np.quantile(z, np.linspace(0, 1, n_bins + 1))
    inv = np.clip(np.searchsorted(edges, z, side="right") - 1, 0, n_bins - 1)
    used = np.unique(inv)
    inv = np.searchsorted(used, inv)
    return np.array([float(np.median(z[inv == k])) for k in range(len(used))]), inv


def spot_spacing(xy: np.ndarray, max_points: int = 20000, seed: int = 0) -> float:
    """Median nearest-neighbour distance of planar points [N, 2] (µm)."""
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return 0.0
    if len(xy) > max_points:
        xy = xy[np.random.default_rng(seed).choice(len(xy), max_points, replace=False)]
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def _covered(xy: np.ndarray, kind: str, alpha: float | None, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Raster [len(gy), len(gx)] bool: pixel centres covered by the alpha shape / convex hull of xy [n, 2]."""
    from scipy.spatial import Delaunay, QhullError

    try:
        tri = Delaunay(xy)
    except QhullError:
        return np.zeros((len(gy), len(gx)), dtype=bool)
    pts = np.column_stack([np.repeat(gx[None], len(gy), 0).ravel(), np.repeat(gy, len(gx))])
    s = tri.find_simplex(pts)
    inside = s >= 0
    if kind == "alpha":
        p = tri.points[tri.simplices]
        e = [np.linalg.norm(p[:, i] - p[:, (i + 1) % 3], axis=1) for i in range(3)]
        d1, d2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
        area = np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(area > 0, e[0] * e[1] * e[2] / (4 * area), np.inf)  # circumradius abc / 4A
        a = alpha if alpha is not None else 3.0 * float(np.median(r[np.isfinite(r)]))
        inside &= (r <= a)[np.where(inside, s, 0)]
    return inside.reshape(len(gy), len(gx))


def _drop_collinear(c: np.ndarray) -> np.ndarray:
    """A closed contour [V, 2] (first point repeated last) without the vertices where it runs straight on."""
    d = np.diff(c, axis=0)  # edge i runs from vertex i to i + 1
    prev = np.roll(d, 1, axis=0)
    turn = np.abs(prev[:, 0] * d[:, 1] - prev[:, 1] * d[:, 0]) > 1e-9
    return c[:-1][turn] if turn.sum() >= 3 else c[:-1]


def outline(xy: np.ndarray, kind: str = "alpha", alpha: float | None = None) -> list[np.ndarray]:
    """Outline polygons (each [V, 2] µm, closed implicitly) of one section's cells xy [n, 2]: the alpha shape
    (``alpha`` µm; default three times the median Delaunay circumradius) or the convex hull, widened by half a
    spot spacing around every cell (so stray cells are inside too), holes filled."""
    from scipy import ndimage
    from skimage.measure import find_contours

    if kind not in ("alpha", "hull"):
        raise InputError(f"mask kind must be 'alpha' (tissue) or 'hull', got {kind!r}")
    if alpha is not None and (not np.isfinite(alpha) or alpha <= 0):
        raise InputError(f"alpha must be a positive number of µm, got {alpha}")
    if len(xy) < 3:
        return []
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    px = max(float((hi - lo).max()) / RASTER, 1e-9)
    r = max(1, int(round(0.5 * spot_spacing(xy) / px)))  # half a spot spacing, in pixels
    lo, hi = (
        lo - (r + 2) * px,
        hi + (r + 2) * px,
    )  # room for the widening and a blank border (closed contours)
    gx = np.arange(lo[0], hi[0] + px, px)
    gy = np.arange(lo[1], hi[1] + px, px)
    spots = np.zeros((len(gy), len(gx)), dtype=bool)
    spots[np.rint((xy[:, 1] - gy[0]) / px).astype(int), np.rint((xy[:, 0] - gx[0]) / px).astype(int)] = True
    disk = np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= r
    img = ndimage.binary_fill_holes(_covered(xy, kind, alpha, gx, gy) | ndimage.binary_dilation(spots, disk))
    if not img.any():
        return []
    polys = []
    for c in find_contours(np.pad(img.astype(float), 1), 0.5):  # (row, col) in padded pixels
        c = _drop_collinear(c - 1)
        if len(c) > MAX_VERTICES:
            c = c[np.linspace(0, len(c) - 1, MAX_VERTICES).astype(int)]
        if len(c) >= 4:
            polys.append(np.column_stack([gx[0] + c[:, 1] * px, gy[0] + c[:, 0] * px]))
    return polys


def tissue_frame(coords: np.ndarray, kind: str = "alpha", max_points: int = 20000, seed: int = 0) -> dict:
    """What the model file keeps about its training cells coords [N, 3] µm: ``bounds`` [[xmin, ymin, zmin],
    [xmax, ymax, zmax]], ``section_z`` [S], ``tissue`` (per section: outline polygons as [[x, y], …]),
    ``spot_um`` (median nearest-neighbour spacing within sections). JSON-ready plain lists."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3 or len(coords) == 0:
        raise InputError(f"training coordinates must have shape (N, 3) with N > 0, got {coords.shape}")
    rng = np.random.default_rng(seed)
    zs, sec = _sections(coords[:, 2])
    tissue, spacings = [], []
    for k in range(len(zs)):
        xy = coords[sec == k, :2]
        if len(xy) > max_points:
            xy = xy[rng.choice(len(xy), max_points, replace=False)]
        spacings.append(spot_spacing(xy))
        polys = outline(xy, kind)
        tissue.append([np.round(p, 2).tolist() for p in polys])
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    return {
        "bounds": [np.round(lo, 3).tolist(), np.round(hi, 3).tolist()],
        "section_z": [round(float(z), 3) for z in zs],
        "tissue": tissue,
        "spot_um": round(float(np.median(spacings)), 3) if spacings else 0.0,
    }


def z_pad(section_z: Sequence[float], spot_um: float = 0.0) -> float:
    """Half the median section spacing (one spot spacing for a single section): how far the tissue extends
    beyond the first and last section in z."""
    z = np.sort(np.asarray(section_z, dtype=np.float64))
    gaps = np.diff(z)
    gaps = gaps[gaps > 1e-9]
    return float(np.median(gaps)) / 2 if len(gaps) else max(float(spot_um), 1.0)


def _signed_distance(polys: Sequence[np.ndarray], gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Signed distance (µm; < 0 inside) to the union of ``polys`` on pixel centres gy × gx → [Y, X] float32."""
    from matplotlib.path import Path as MPath
    from scipy import ndimage

    pts = np.column_stack([np.repeat(gx[None], len(gy), 0).ravel(), np.repeat(gy, len(gx))])
    flat = np.zeros(len(pts), dtype=bool)
    for p in polys:
        flat |= MPath(np.asarray(p)).contains_points(pts)
    inside = flat.reshape(len(gy), len(gx))
    px = float(gx[1] - gx[0]) if len(gx) > 1 else 1.0
    if not inside.any():
        return np.full(inside.shape, np.inf, dtype=np.float32)
    out = ndimage.distance_transform_edt(~inside) - ndimage.distance_transform_edt(inside)
    return (out * px).astype(np.float32)


@dataclass
class TissueMask:
    """Per-section outlines interpolated in z. ``section_z`` [S] ascending; ``tissue[k]`` the polygons of
    section k; ``pad`` µm the extent beyond the end sections. ``contains(xyz [N, 3]) → [N] bool``;
    ``distance(xyz) → [N]`` µm outside the tissue (≤ 0 inside)."""

    section_z: np.ndarray
    tissue: list[list[np.ndarray]]
    pad: float
    kind: str = "alpha"
    _sdf: Any = field(default=None, repr=False)

    @classmethod
    def build(cls, xyz: np.ndarray, kind: str = "alpha", alpha: float | None = None) -> TissueMask:
        """Mask from training coordinates xyz [N, 3] µm (``kind`` "alpha" = tissue outline, or "hull")."""
        if kind not in ("alpha", "hull"):
            raise InputError(f"mask must be 'hull' or 'alpha' (tissue), got {kind!r}")
        xyz = np.asarray(xyz, dtype=np.float64)
        if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) < 3:
            raise InputError(f"tissue mask needs training cells [N, 3] with N ≥ 3, got shape {xyz.shape}")
        zs, sec = _sections(xyz[:, 2])
        tissue = [outline(xyz[sec == k, :2], kind, alpha) for k in range(len(zs))]
        keep = [i for i, t in enumerate(tissue) if t]
        if not keep:
            raise InputError(f"tissue mask: the {len(xyz)} training cells span no area in x, y")
        spot = spot_spacing(xyz[sec == keep[0], :2])
        return cls(zs[keep], [tissue[i] for i in keep], z_pad(zs.tolist(), spot), kind)

    @classmethod
    def from_config(cls, cfg: Any) -> TissueMask | None:
        """The mask stored in a model's :class:`~inrscrecon.field.model.FieldConfig` (None when absent); built
        once per config object (its signed-distance raster is reused by render, predict and the checks)."""
        cached = cfg.__dict__.get("_tissue_mask")
        if cached is not None and cached[0] == (id(cfg.tissue), len(cfg.tissue)):
            return cached[1]
        tissue = getattr(cfg, "tissue", None)
        zs = getattr(cfg, "section_z", None)
        if not tissue or not zs or len(tissue) != len(zs):
            return None
        keep = [i for i, t in enumerate(tissue) if t]
        if not keep:
            return None
        polys = [[np.asarray(p, dtype=np.float64) for p in tissue[i]] for i in keep]
        mask = cls(np.asarray(zs, dtype=np.float64)[keep], polys, z_pad(zs, getattr(cfg, "spot_um", 0.0)))
        cfg.__dict__["_tissue_mask"] = ((id(cfg.tissue), len(cfg.tissue)), mask)
        return mask

    def _raster(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x centres [X], y centres [Y], signed distance [S, Y, X]) on a raster covering every outline."""
        if self._sdf is None:
            allp = np.concatenate([p for t in self.tissue for p in t])
            lo, hi = allp.min(axis=0), allp.max(axis=0)
            px = max(float((hi - lo).max()) / SDF_RASTER, 1e-9)
            lo, hi = lo - 8 * px, hi + 8 * px
            gx, gy = np.arange(lo[0], hi[0] + px, px), np.arange(lo[1], hi[1] + px, px)
            self._sdf = (gx, gy, np.stack([_signed_distance(t, gx, gy) for t in self.tissue]))
        return self._sdf

    def distance(self, xyz: np.ndarray) -> np.ndarray:
        """Distance (µm) of points xyz [N, 3] outside the tissue: in x, y the z-interpolated signed distance
        to the neighbouring sections' outlines, beyond the end sections also the z distance (≤ 0 inside)."""
        from scipy.ndimage import map_coordinates

        xyz = np.asarray(xyz, dtype=np.float64)
        gx, gy, sdf = self._raster()
        px = gx[1] - gx[0]
        # raster lookup (bilinear); beyond the raster: distance grows with the distance to its edge
        fx, fy = (xyz[:, 0] - gx[0]) / px, (xyz[:, 1] - gy[0]) / px
        cx, cy = np.clip(fx, 0, len(gx) - 1), np.clip(fy, 0, len(gy) - 1)
        off = np.hypot(fx - cx, fy - cy) * px
        z, zs = xyz[:, 2], self.section_z
        hi = np.clip(np.searchsorted(zs, z), 1, max(len(zs) - 1, 1))
        lo = hi - 1 if len(zs) > 1 else np.zeros_like(hi)
        hi = np.minimum(hi, len(zs) - 1)
        span = zs[hi] - zs[lo]
        t = np.clip(np.where(span > 0, (z - zs[lo]) / np.where(span > 0, span, 1), 0.0), 0, 1)
        d = np.zeros(len(xyz))
        for k in np.unique(np.concatenate([lo, hi])):
            sel = (lo == k) | (hi == k)
            w = np.where(lo[sel] == k, 1 - t[sel], 0.0) + np.where(hi[sel] == k, t[sel], 0.0)
            d[sel] += w * map_coordinates(sdf[k], [cy[sel], cx[sel]], order=1, mode="nearest")
        d = d + off
        dz = np.maximum(zs[0] - z, z - zs[-1]) - self.pad  # > 0 beyond the padded end sections
        return np.where(dz > 0, np.maximum(d, 0) + dz, d)

    def contains(self, xyz: np.ndarray) -> np.ndarray:
        """Points xyz [N, 3] µm inside the tissue → [N] bool."""
        return self.distance(xyz) <= 0


__all__ = ["TissueMask", "outline", "spot_spacing", "tissue_frame", "z_pad"]
