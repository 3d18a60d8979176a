"""OME-Zarr output (NGFF 0.5) through ome-zarr-py's writer: image (c, z, y, x) with a multiscale pyramid
(2× block means over the tissue voxels in x, y; in z too while it has ≥ 16 planes), ``labels/tissue`` and ``labels/domains`` label
images (nearest-neighbour pyramid), physical scales and voxel-centre translations in µm.

Everything is written under a hidden temporary folder beside the output and renamed onto it only when
complete; an exception, SIGINT or SIGTERM removes the folder (:func:`staged_dir`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from inrscrecon.data.io import atomic_output, atomic_path, discard
from inrscrecon.query.grid import GridSpec

UNITS = {"z": "micrometer", "y": "micrometer", "x": "micrometer"}
COLOURS = ["FF00FF", "00FF00", "00FFFF", "FFFF00", "FF8000", "0080FF"]
MIN_Z_FOR_DOWNSAMPLING = 16


def pyramid_factors(
    shape: tuple[int, int, int], max_levels: int, min_size: int = 32
) -> list[tuple[int, int, int]]:
    """Cumulative downsampling factors (fz, fy, fx) per level, level 0 = (1, 1, 1): 2× in y, x (and z while
    it has ≥ 16 planes) until the largest axis drops below ``min_size`` or ``max_levels`` levels exist."""
    out = [(1, 1, 1)]
    cur = np.array(shape)
    while len(out) < max_levels and cur[1:].max() // 2 >= min_size:
        step = np.array(
            [2 if cur[0] >= MIN_Z_FOR_DOWNSAMPLING else 1, 2 if cur[1] >= 2 else 1, 2 if cur[2] >= 2 else 1]
        )
        cur = np.maximum(cur // step, 1)
        out.append(tuple(int(a * b) for a, b in zip(out[-1], step)))  # type: ignore[arg-type]
    return out


def _transforms(grid: GridSpec, factors: list[tuple[int, int, int]], channel: bool) -> list[list[dict]]:
    """Per level: scale = voxel · factor, translation = centre of its first voxel (µm), axes (c,) z, y, x."""
    out = []
    for fz, fy, fx in factors:
        v = [grid.voxel[2] * fz, grid.voxel[1] * fy, grid.voxel[0] * fx]
        t = [grid.origin[2] + v[0] / 2, grid.origin[1] + v[1] / 2, grid.origin[0] + v[2] / 2]
        if channel:
            v, t = [1.0, *v], [0.0, *t]
        out.append([{"type": "scale", "scale": v}, {"type": "translation", "translation": t}])
    return out


def _set_transforms(group: Any, transforms: list[list[dict]]) -> None:
    """Replace the per-level coordinate transformations ome-zarr-py derived from array shapes with the exact
    physical ones (block means keep voxel k·f … k·f + f − 1 of level 0)."""
    attrs = group.attrs.asdict()
    for ds, ct in zip(attrs["ome"]["multiscales"][0]["datasets"], transforms):
        ds["coordinateTransformations"] = ct
    group.attrs.put(attrs)


def masked_mean_levels(image: Any, weights: Any | None, factors: list[tuple[int, int, int]]) -> list:
    """Pyramid of image [C, Z, Y, X] (dask): level k = block means over factors[k] of the voxels where
    ``weights`` [Z, Y, X] > 0 (the tissue; all voxels when None), 0 where a block holds none. Inside-only means
    keep the tissue's edge from darkening at coarse levels, as a mean over the zeros outside would."""
    import dask.array as da

    image = da.asarray(image).astype(np.float32)
    w = (
        da.ones(image.shape[1:], chunks=image.chunks[1:], dtype=np.float32)
        if weights is None
        else (da.asarray(weights) > 0).astype(np.float32)
    )
    num = image * w[None]
    levels = [image]
    for f in factors[1:]:
        trim = tuple((s // k) * k for s, k in zip(image.shape[1:], f))
        aligned = {i + 1: max(k, (c[0] // k) * k) for i, (k, c) in enumerate(zip(f, image.chunks[1:]))}
        n = num[:, : trim[0], : trim[1], : trim[2]].rechunk(aligned)
        d = w[: trim[0], : trim[1], : trim[2]].rechunk({i - 1: v for i, v in aligned.items()})
        s = da.coarsen(np.sum, n, {1: f[0], 2: f[1], 3: f[2]})
        c = da.coarsen(np.sum, d, {0: f[0], 1: f[1], 2: f[2]})[None]
        levels.append(da.where(c > 0, s / da.maximum(c, 1.0), 0.0).astype(np.float32))
    return levels


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[tuple[Path, Path]]:
    """(temporary output folder, scratch folder), both hidden siblings of ``out``: the output replaces ``out``
    when the block completes; both are removed on an exception, SIGINT / SIGTERM or exit
    (:func:`inrscrecon.data.io.atomic_output`), so an interrupted render leaves the old state or the new one."""
    out = Path(out)
    with atomic_output(out, directory=True) as tmp:
        _, scratch = atomic_path(out.with_name(out.name + ".scratch"), directory=True)
        try:
            yield tmp, scratch
        finally:
            discard(scratch)


def write_ome_zarr(
    path: Path,
    image: Any,  # dask/numpy [C, Z, Y, X] float32
    channels: list[str],
    grid: GridSpec,
    factors: list[tuple[int, int, int]],
    labels: dict[str, tuple[Any, list[dict]]],  # name → (dask/numpy [Z, Y, X] uint, properties per value)
    chunks: tuple[int, int, int, int],
    attrs: dict,
    image_is_label: bool = False,
    weights: Any | None = None,  # [Z, Y, X] > 0 inside the tissue
) -> None:
    """Write an OME-Zarr image (+ label images) at ``path`` with ome-zarr-py (NGFF 0.5, zarr v3). The image
    pyramid takes block means over the tissue (:func:`masked_mean_levels`; ``image_is_label``: nearest
    neighbours, for a label-valued image)."""
    import dask.array as da
    import zarr

    with warnings.catch_warnings():  # ome-zarr-py builds a deprecated Scaler as a default argument at import
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.format import FormatV05
        from ome_zarr.scale import Methods
        from ome_zarr.writer import write_image, write_labels, write_multiscale

    root = zarr.open_group(str(path), mode="w")
    sf = [{"z": fz, "y": fy, "x": fx} for fz, fy, fx in factors[1:]]
    scale = {"c": 1.0, "z": grid.voxel[2], "y": grid.voxel[1], "x": grid.voxel[0]}
    windows = []
    for c in range(len(channels)):  # contrast window from level 0 (a coarse sample is enough)
        sample = np.asarray(image[c, :: max(1, grid.shape[0] // 8), ::4, ::4], dtype=np.float64)
        hi = float(np.percentile(sample[sample > 0], 99.5)) if (sample > 0).any() else 1.0
        windows.append({"min": 0.0, "max": float(sample.max() or 1.0), "start": 0.0, "end": hi})
    omero = {
        "channels": [
            {"label": c, "color": COLOURS[i % len(COLOURS)], "window": windows[i], "active": i < 3}
            for i, c in enumerate(channels)
        ]
    }
    name = path.name.split(".")[0]
    if image_is_label:
        write_image(
            da.asarray(image),
            root,
            scale_factors=sf,
            method=Methods.NEAREST,
            fmt=FormatV05(),
            axes="czyx",
            scale=scale,
            axes_units=UNITS,
            storage_options={"chunks": chunks},
            name=name,
            omero=omero,
        )
        _set_transforms(root, _transforms(grid, factors, True))
    else:
        write_multiscale(
            masked_mean_levels(image, weights, factors),
            root,
            fmt=FormatV05(),
            axes="czyx",
            scale=scale,
            axes_units=UNITS,
            storage_options={"chunks": chunks},
            name=name,
        )
        _set_transforms(root, _transforms(grid, factors, True))
        meta: dict[str, Any] = root.attrs.asdict()
        meta["ome"]["omero"] = {**omero, "version": "0.5"}  # write_multiscale does not take omero
        root.attrs.put(meta)
    for name, (vol, props) in labels.items():
        write_labels(
            da.asarray(vol),
            root,
            name=name,
            scaler=None,
            scale_factors=sf,
            fmt=FormatV05(),
            axes="zyx",
            scale={k: v for k, v in scale.items() if k != "c"},
            axes_units=UNITS,
            storage_options={"chunks": chunks[1:]},
            label_metadata={"properties": props},
        )
        _set_transforms(
            zarr.open_group(str(path / "labels" / name), mode="r+"), _transforms(grid, factors, False)
        )
    if labels:  # ome-zarr-py leaves out the labels group's version, which NGFF 0.5 requires
        lgroup = zarr.open_group(str(path / "labels"), mode="r+")
        la: dict[str, Any] = lgroup.attrs.asdict()
        la.setdefault("ome", {})["version"] = "0.5"
        lgroup.attrs.put(la)
    meta = root.attrs.asdict()
    meta["inrscrecon"] = attrs
    root.attrs.put(meta)


__all__ = ["masked_mean_levels", "pyramid_factors", "staged_dir", "write_ome_zarr"]
