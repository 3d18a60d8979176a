"""Render the field on a dense grid (DESIGN "Scale"): a :class:`GridSpec` over the tissue, an optional tissue
mask (convex hull or alpha shape of the training cells), streamed through the model slab by slab computing
only the requested genes' head rows, written as OME-Zarr (axes c, z, y, x in µm, multiscale pyramid) that
napari and ome-zarr-py open, plus PNG orthogonal slices. ``domains=K`` adds a label volume of expression
clusters under ``labels/domains``.

Memory is bounded by one slab (``slab`` z-planes × Y × X × channels × 4 bytes) and one prediction chunk, not
by the grid: a 256³ grid of 10 genes streams through in 32-plane slabs (≈ 84 MB each).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from inrscrecon.data.io import check_writable
from inrscrecon.errors import InputError
from inrscrecon.field.model import INRField
from inrscrecon.query.predict import gene_indices, predict
from inrscrecon.query.predict_stream import replace_dir

AXES = [
    {"name": "c", "type": "channel"},
    {"name": "z", "type": "space", "unit": "micrometer"},
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]


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
        voxel: float | None = None,
        shape: Sequence[int] | None = None,  # (Z, Y, X)
    ) -> GridSpec:
        """Cover ``bounds`` with isotropic voxels of ``voxel`` µm, or split it into ``shape`` voxels (then the
        voxel size may differ per axis). Neither: 128 voxels along the longest axis. A flat axis (one section)
        gets one voxel."""
        if len(bounds) != 6 or not np.isfinite(bounds).all():
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
                voxel = ext.max() / 128 if ext.max() > 0 else 1.0
            if not np.isfinite(voxel) or voxel <= 0:
                raise InputError(f"voxel size must be a positive number of µm, got {voxel}")
            vox = np.full(3, float(voxel))
            zyx = np.maximum(np.ceil(ext / vox - 1e-9), 1).astype(np.int64)[::-1]
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


def bounds_of(xyz: np.ndarray, margin: float = 0.0) -> list[float]:
    """(xmin, xmax, ymin, ymax, zmin, zmax) of points [N, 3], widened by ``margin`` µm."""
    lo, hi = xyz.min(axis=0) - margin, xyz.max(axis=0) + margin
    return [float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]), float(lo[2]), float(hi[2])]


def model_bounds(model: INRField) -> list[float]:
    """The cube the model was normalised to (its training cells' bounding cube), as bounds."""
    c, h = np.array(model.cfg.center), model.cfg.scale / 1.02
    return [
        float(c[0] - h),
        float(c[0] + h),
        float(c[1] - h),
        float(c[1] + h),
        float(c[2] - h),
        float(c[2] + h),
    ]


def _circumradius(p: np.ndarray) -> np.ndarray:
    """Circumradii of tetrahedra p [T, 4, 3] → [T] (inf for flat ones)."""
    a, b, c = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]
    num = (
        (a * a).sum(1)[:, None] * np.cross(b, c) + (b * b).sum(1)[:, None] * np.cross(c, a)
        + (c * c).sum(1)[:, None] * np.cross(a, b)
    )  # fmt: skip
    den = 2 * (a * np.cross(b, c)).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.linalg.norm(num, axis=1) / np.abs(den)
    return np.where(np.isfinite(r), r, np.inf)


@dataclass
class TissueMask:
    """Where the tissue is: the convex hull (``kind="hull"``) or the alpha shape (``kind="alpha"``: Delaunay
    tetrahedra of circumradius ≤ ``alpha`` µm) of the training cells. A flat stack (one section) is masked in
    x, y only. ``contains(xyz [N, 3]) → [N] bool``."""

    kind: str
    alpha: float | None = None
    _tri: object = field(default=None, repr=False)
    _keep: np.ndarray | None = field(default=None, repr=False)
    _axes: np.ndarray = field(default_factory=lambda: np.arange(3), repr=False)

    @classmethod
    def build(cls, xyz: np.ndarray, kind: str = "alpha", alpha: float | None = None, max_points: int = 20000,
              seed: int = 0) -> TissueMask:  # fmt: skip
        """Mask from training coordinates [N, 3] µm. ``alpha=None``: twice the median circumradius (a
        heuristic that bridges the gap between sections); points are subsampled to ``max_points`` for alpha."""
        from scipy.spatial import ConvexHull, Delaunay, QhullError

        if kind not in ("hull", "alpha"):
            raise InputError(f"mask must be 'hull' or 'alpha' (tissue), got {kind!r}")
        xyz = np.asarray(xyz, dtype=np.float64)
        ext = np.ptp(xyz, axis=0) if len(xyz) else np.zeros(3)
        axes = np.flatnonzero(ext > 1e-9 * max(ext.max(), 1.0))
        if len(axes) < 2 or len(xyz) < len(axes) + 2:
            raise InputError(f"tissue mask needs cells spread over at least two axes, got {len(xyz)} cells")
        pts = xyz[:, axes]
        try:
            if kind == "hull":
                hull = ConvexHull(pts)
                tri = Delaunay(pts[hull.vertices])
                return cls(kind, None, tri, None, axes)
            if len(pts) > max_points:
                pts = pts[np.random.default_rng(seed).choice(len(pts), max_points, replace=False)]
            tri = Delaunay(pts)
        except QhullError as exc:
            raise InputError(
                f"tissue mask: cannot triangulate the training cells ({str(exc).splitlines()[0]})"
            ) from None
        simp = tri.points[tri.simplices]
        if len(axes) == 3:
            r = _circumradius(simp)
        else:  # triangles: R = abc / (4 area)
            e = [np.linalg.norm(simp[:, i] - simp[:, (i + 1) % 3], axis=1) for i in range(3)]
            d1, d2 = simp[:, 1] - simp[:, 0], simp[:, 2] - simp[:, 0]
            area = np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) / 2
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.where(area > 0, e[0] * e[1] * e[2] / (4 * area), np.inf)
        if alpha is None:
            alpha = 2.0 * float(np.median(r[np.isfinite(r)]))
        if not np.isfinite(alpha) or alpha <= 0:
            raise InputError(f"alpha must be a positive number of µm, got {alpha}")
        return cls(kind, float(alpha), tri, r <= alpha, axes)

    def contains(self, xyz: np.ndarray) -> np.ndarray:
        s = self._tri.find_simplex(np.asarray(xyz, dtype=np.float64)[:, self._axes])  # type: ignore[attr-defined]
        inside = s >= 0
        if self._keep is not None:
            inside &= self._keep[np.where(inside, s, 0)]
        return inside


@dataclass
class DomainModel:
    """Expression domains of the field: head rows ``genes`` → PCA → k-means. ``labels(pred)`` → 1..K."""

    genes: list[str]
    pca: object
    kmeans: object

    @classmethod
    def fit(
        cls, model: INRField, points: np.ndarray, k: int, n_genes: int = 100, seed: int = 0
    ) -> DomainModel:
        """Cluster predicted expression at sample ``points`` [n, 3] into ``k`` domains on the ``n_genes`` most
        variable predicted genes."""
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        if k < 2:
            raise InputError(f"--domains needs at least 2 clusters, got {k}")
        if len(points) < k:
            raise InputError(f"only {len(points)} voxels inside the mask; cannot form {k} domains")
        full = predict(model, points, batch_size=4096)
        top = np.sort(np.argsort(-full.var(axis=0), kind="stable")[: min(n_genes, full.shape[1])])
        genes = [model.cfg.genes[i] for i in top]
        x = full[:, top]
        pca = PCA(n_components=min(15, x.shape[1], len(x)), random_state=seed).fit(x)
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(pca.transform(x))
        return cls(genes, pca, km)

    def labels(self, pred: np.ndarray) -> np.ndarray:
        """Predicted expression of ``genes`` [n, len(genes)] → labels [n] in 1..K (uint16)."""
        if not len(pred):
            return np.zeros(0, dtype=np.uint16)
        return (self.kmeans.predict(self.pca.transform(pred)) + 1).astype(np.uint16)  # type: ignore[attr-defined]


@dataclass
class RenderResult:
    """What :func:`render` wrote."""

    path: Path
    grid: GridSpec
    channels: list[str]
    levels: int
    voxels_inside: int
    pngs: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _levels(shape: tuple[int, int, int], max_levels: int, min_size: int = 32) -> list[tuple[int, int, int]]:
    """Per-level downsampling factors (fz, fy, fx) relative to level 0: 2× on every axis still ≥ 2 voxels,
    until the largest axis drops below ``min_size`` or ``max_levels`` levels exist."""
    out = [(1, 1, 1)]
    cur = np.array(shape)
    while len(out) < max_levels and cur.max() // 2 >= min_size:
        step = np.where(cur >= 2, 2, 1)
        cur = np.maximum(cur // step, 1)
        out.append(tuple(int(a * b) for a, b in zip(out[-1], step)))  # type: ignore[arg-type]
    return out


def _downsample(block: np.ndarray, f: Sequence[int], labels: bool) -> np.ndarray:
    """[..., Z, Y, X] → mean (or nearest for labels) over f-blocks of the last three axes (remainders cropped)."""
    fz, fy, fx = f
    z, y, x = (block.shape[-3] // fz) * fz, (block.shape[-2] // fy) * fy, (block.shape[-1] // fx) * fx
    b = block[..., :z, :y, :x]
    if labels:
        return b[..., ::fz, ::fy, ::fx]
    lead = b.shape[:-3]
    return b.reshape(*lead, z // fz, fz, y // fy, fy, x // fx, fx).mean(axis=(-5, -3, -1)).astype(block.dtype)


def _create_pyramid(group, shape: tuple[int, ...], factors, chunks: tuple[int, ...], dtype: str) -> list:
    arrays = []
    for lvl, f in enumerate(factors):
        lshape = (*shape[:-3], *(max(s // k, 1) for s, k in zip(shape[-3:], f)))
        lchunks = tuple(min(c, s) for c, s in zip(chunks, lshape))
        arrays.append(group.create_array(str(lvl), shape=lshape, chunks=lchunks, dtype=dtype, fill_value=0))
    return arrays


def _fill_pyramid(arrays: list, factors, slab: int, labels: bool) -> None:
    """Build levels 1.. from level 0, reading ``slab``·fz source planes at a time."""
    for lvl in range(1, len(arrays)):
        src, dst = arrays[lvl - 1], arrays[lvl]
        rel = [a // b for a, b in zip(factors[lvl], factors[lvl - 1])]
        for z0 in range(0, dst.shape[-3], slab):
            z1 = min(z0 + slab, dst.shape[-3])
            block = np.asarray(src[..., z0 * rel[0] : z1 * rel[0], :, :])
            out = _downsample(block, rel, labels)
            dst[..., z0:z1, :, :] = out[..., : z1 - z0, : dst.shape[-2], : dst.shape[-1]]


def _datasets(grid: GridSpec, factors, channel_axis: bool) -> list[dict]:
    out = []
    for lvl, (fz, fy, fx) in enumerate(factors):
        vz, vy, vx = grid.voxel[2] * fz, grid.voxel[1] * fy, grid.voxel[0] * fx
        tz, ty, tx = grid.origin[2] + vz / 2, grid.origin[1] + vy / 2, grid.origin[0] + vx / 2
        scale, trans = [vz, vy, vx], [tz, ty, tx]
        if channel_axis:
            scale, trans = [1.0, *scale], [0.0, *trans]
        out.append({"path": str(lvl), "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": trans}]})  # fmt: skip
    return out


def render(
    model: INRField,
    genes: Sequence[str],
    grid: GridSpec,
    out: str | Path,
    mask: TissueMask | None = None,
    domains: int = 0,
    domain_genes: int = 100,
    chunk_points: int = 65536,
    slab: int = 32,
    max_levels: int = 4,
    png: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> RenderResult:
    """Predict ``genes`` at every voxel centre of ``grid`` (0 outside ``mask``) and write OME-Zarr ``out``.

    Image: array per level, axes (c, z, y, x), float32 log1p-normalised expression, channel names in
    ``omero``. ``domains=K`` (≥ 2) also writes ``labels/domains`` (z, y, x; uint16, 0 = outside the mask, 1..K
    = clusters); with no genes the image holds one channel, the domain labels. Returns what was written.
    """
    import time

    import zarr
    from ome_zarr.writer import add_metadata, write_label_metadata, write_multiscales_metadata

    t0 = time.time()
    out = check_writable(out)
    genes = list(genes)
    if not genes and domains <= 0:
        raise InputError("nothing to render: give --genes and/or --domains")
    gene_indices(model, genes)
    device_model = model.eval()
    factors = _levels(grid.shape, max_levels)
    nz, ny, nx = grid.shape
    slab = max(1, min(slab, nz))
    dom = None
    if domains > 0:
        sample = _sample_inside(grid, mask, 8000, seed)
        dom = DomainModel.fit(device_model, sample, domains, domain_genes, seed)
    channels = genes if genes else ["domains"]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)) / out.name
    inside_total = 0
    try:
        root = zarr.open_group(str(tmp), mode="w")
        chunks = (1, slab, min(ny, 256), min(nx, 256))
        img = _create_pyramid(
            root, (len(channels), nz, ny, nx), factors, chunks, "uint16" if not genes else "float32"
        )
        lab = None
        if dom is not None:
            lgroup = root.create_group("labels").create_group("domains")
            lab = _create_pyramid(lgroup, (nz, ny, nx), factors, chunks[1:], "uint16")
        for z0 in tqdm(range(0, nz, slab), desc="render", unit="slab", disable=not progress):
            z1 = min(z0 + slab, nz)
            pts = grid.points(z0, z1)
            inside = mask.contains(pts) if mask is not None else np.ones(len(pts), dtype=bool)
            idx = np.flatnonzero(inside)
            inside_total += len(idx)
            vals = np.zeros((len(pts), len(genes)), dtype=np.float32)
            labs = np.zeros(len(pts), dtype=np.uint16)
            for s in range(0, len(idx), chunk_points):
                sel = idx[s : s + chunk_points]
                want = genes + ([g for g in dom.genes if g not in genes] if dom is not None else [])
                pred = predict(device_model, pts[sel], want, batch_size=chunk_points)
                vals[sel] = pred[:, : len(genes)]
                if dom is not None:
                    col = {g: i for i, g in enumerate(want)}
                    labs[sel] = dom.labels(pred[:, [col[g] for g in dom.genes]])
            shape = (z1 - z0, ny, nx)
            if genes:
                img[0][:, z0:z1] = vals.T.reshape(len(genes), *shape)
            else:
                img[0][:, z0:z1] = labs.reshape(1, *shape)
            if lab is not None:
                lab[0][z0:z1] = labs.reshape(shape)
        _fill_pyramid(img, factors, slab, labels=not genes)
        write_multiscales_metadata(
            root, _datasets(grid, factors, True), axes=AXES, name=out.name.split(".")[0]
        )
        omero = {"channels": [{"label": c, "active": i < 3, "color": ["FF00FF", "00FF00", "00FFFF", "FFFF00"][i % 4]}
                              for i, c in enumerate(channels)]}  # fmt: skip
        add_metadata(root, {"omero": omero, "inrscrecon": {
            "values": "log1p(normalised expression, target_sum 1e4); 0 outside the tissue mask" if genes
            else "domain labels", "mask": mask.kind if mask is not None else "none",
            "alpha_um": mask.alpha if mask is not None else None, "genes": channels}})  # fmt: skip
        if lab is not None:
            dom_genes = dom.genes if dom is not None else []
            _fill_pyramid(lab, factors, slab, labels=True)
            write_multiscales_metadata(lgroup, _datasets(grid, factors, False), axes=AXES[1:], name="domains")
            write_label_metadata(
                root["labels"],
                "domains",
                source={"image": "../../"},
                properties=[
                    {"label-value": i + 1, "genes": ",".join(dom_genes[:10])} for i in range(domains)
                ],
            )
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    pngs = write_slices_png(out, _png_path(out)) if png else []
    return RenderResult(out, grid, channels, len(factors), inside_total, pngs, time.time() - t0)


def _sample_inside(grid: GridSpec, mask: TissueMask | None, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` random voxel centres inside ``mask`` (µm), drawn slab-free from flat indices."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(grid.n_points, size=min(grid.n_points, 4 * n), replace=False)
    k, rem = np.divmod(flat, grid.shape[1] * grid.shape[2])
    j, i = np.divmod(rem, grid.shape[2])
    zc, yc, xc = grid.axis_centres()
    pts = np.column_stack([xc[i], yc[j], zc[k]])
    if mask is not None:
        pts = pts[mask.contains(pts)]
    return pts[:n]


def _png_path(out: Path) -> Path:
    stem = out.name[: -len(".ome.zarr")] if out.name.endswith(".ome.zarr") else out.stem
    return out.with_name(f"{stem}_slices.png")


def write_slices_png(volume: str | Path, png: str | Path, max_channels: int = 6) -> list[Path]:
    """Orthogonal slices through the centre (xy, xz, yz) of each channel (≤ ``max_channels``) and of the domain
    labels of an OME-Zarr written by :func:`render`, at physical aspect ratio → one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr

    root: Any = zarr.open_group(str(volume), mode="r")
    meta: Any = root.attrs.get("ome", root.attrs.asdict())
    ds = meta["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    _, vz, vy, vx = ds[0]["scale"]
    _, tz, ty, tx = ds[1]["translation"]
    img = root["0"]
    names = [c["label"] for c in meta.get("omero", {}).get("channels", [])]
    rows: list[tuple[str, tuple[Any, int | None], bool]] = [(names[c] if c < len(names) else f"c{c}", (img, c), False)
                                            for c in range(min(img.shape[0], max_channels))]  # fmt: skip
    if "labels" in root and "domains" in root["labels"]:
        rows.append(("domains", (root["labels"]["domains"]["0"], None), True))
    _, nz, ny, nx = img.shape
    ext_xy = [tx - vx / 2, tx + (nx - 0.5) * vx, ty - vy / 2, ty + (ny - 0.5) * vy]
    ext_xz = [tx - vx / 2, tx + (nx - 0.5) * vx, tz - vz / 2, tz + (nz - 0.5) * vz]
    ext_yz = [ty - vy / 2, ty + (ny - 0.5) * vy, tz - vz / 2, tz + (nz - 0.5) * vz]
    fig, axs = plt.subplots(len(rows), 3, figsize=(12, 3.4 * len(rows)), squeeze=False, layout="constrained")
    for r, (name, (arr, c), is_label) in enumerate(rows):
        pre = (c,) if c is not None else ()
        planes = [np.asarray(arr[(*pre, nz // 2)]), np.asarray(arr[(*pre, slice(None), ny // 2)]),
                  np.asarray(arr[(*pre, slice(None), slice(None), nx // 2)])]  # fmt: skip
        cmap = "tab20" if is_label else "magma"
        vmax = max(float(max(p.max() for p in planes)), 1e-6)
        for a, plane, ext, title in zip(axs[r], planes, (ext_xy, ext_xz, ext_yz), ("xy", "xz", "yz")):
            im = a.imshow(plane, origin="lower", extent=ext, cmap=cmap, vmin=0, vmax=vmax, aspect="equal",
                          interpolation="nearest")  # fmt: skip
            a.set_title(f"{name}: {title} (centre)", fontsize=9)
            a.set_xlabel(f"{title[0]} (µm)", fontsize=8)
            a.set_ylabel(f"{title[1]} (µm)", fontsize=8)
        fig.colorbar(im, ax=axs[r].tolist(), shrink=0.8)
    png = check_writable(png)
    fd, tmp = tempfile.mkstemp(prefix=f".{png.name}.", suffix=".png", dir=png.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, png)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return [png]


def voxel_count_ok(grid: GridSpec, limit: float = 2e10) -> None:
    """Refuse absurd grids early (a typo in --voxel) with a clear message."""
    if grid.n_points > limit or not math.isfinite(grid.n_points):
        raise InputError(
            f"grid of {grid.shape} = {grid.n_points:.3g} voxels is too large; use a larger --voxel"
        )


__all__ = ["DomainModel", "GridSpec", "RenderResult", "TissueMask", "bounds_of", "model_bounds", "render",
           "write_slices_png"]  # fmt: skip
