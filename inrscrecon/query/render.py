"""Render the field on a dense grid (DESIGN "Scale"): the grid over the training tissue (:mod:`.grid`), the
per-section tissue mask (:mod:`.tissue`), optional expression domains (:mod:`.domains`), streamed through the
model slab by slab computing only the requested genes' head rows, written as OME-Zarr (:mod:`.writers`) and
PNG orthogonal views (:mod:`.figures`).

Memory is bounded by one slab (``slab`` z-planes × Y × X × channels × 4 bytes) and one prediction chunk, not
by the grid: level 0 streams into a scratch zarr, and ome-zarr-py builds the pyramid from it chunk by chunk.
:func:`estimate` gives the cost up front (voxels × genes, seconds at the rate measured on this machine).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from inrscrecon.errors import InputError
from inrscrecon.field.model import INRField
from inrscrecon.query.domain_check import check_domain
from inrscrecon.query.domains import DomainModel
from inrscrecon.query.figures import write_slices_png
from inrscrecon.query.grid import GridSpec, bounds_of, model_bounds
from inrscrecon.query.predict import gene_indices, interval_setup, predict
from inrscrecon.query.render_command import DEFAULT_MAX_VOXELS
from inrscrecon.query.tissue import TissueMask
from inrscrecon.query.uncertainty import (
    DEFAULT_LEVEL,
    MEDIAN_RULE,
    interval_from_prediction,
    layer_names,
    record,
)
from inrscrecon.query.writers import pyramid_factors, staged_dir, write_ome_zarr


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
    out_of_domain: dict | None = None


@dataclass
class RenderEstimate:
    """Up-front cost of a render: voxels in the grid and (estimated) inside the mask, channels evaluated per
    voxel, the measured prediction rate and the resulting time, and the size of level 0 uncompressed."""

    voxels: int
    voxels_inside: int
    genes: int
    points_per_s: float
    seconds: float
    level0_bytes: int

    def line(self) -> str:
        return (
            f"estimate: {self.voxels:.3g} voxels ({self.voxels_inside:.3g} inside the mask) × {self.genes} "
            f"gene(s): model time ≈ {_duration(self.seconds)} at {self.points_per_s:.3g} voxels/s measured here; level 0 "
            f"≈ {self.level0_bytes / 1e9:.3g} GB uncompressed"
        )


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _mask_arg(model: INRField, mask: TissueMask | str | None) -> TissueMask | None:
    if mask is None or isinstance(mask, TissueMask):
        return mask
    if mask == "model":
        return TissueMask.from_config(model.cfg)
    raise InputError(f"mask must be a TissueMask, 'model' or None, got {mask!r}")


def _sample(grid: GridSpec, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` random voxel centres of ``grid`` (µm), drawn from flat indices without building the grid."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(grid.n_points, size=min(grid.n_points, n), replace=False)
    k, rem = np.divmod(flat, grid.shape[1] * grid.shape[2])
    j, i = np.divmod(rem, grid.shape[2])
    zc, yc, xc = grid.axis_centres()
    return np.column_stack([xc[i], yc[j], zc[k]])


def estimate(
    model: INRField,
    genes: Sequence[str],
    grid: GridSpec,
    mask: TissueMask | str | None = "model",
    domain_genes: int = 0,
    chunk_points: int = 65536,
    seed: int = 0,
    intervals: bool = False,
) -> RenderEstimate:
    """Cost of rendering ``genes`` (+ ``domain_genes`` for domains) on ``grid``: the inside fraction from 4096
    sampled voxels, the rate from timing one prediction chunk of up to 8192 points (``intervals``: three
    channels per gene, and the interval end points in the timing)."""
    m = _mask_arg(model, mask)
    sample = _sample(grid, 4096, seed)
    frac = float(m.contains(sample).mean()) if m is not None else 1.0
    want = list(genes) + list(model.cfg.genes[: max(domain_genes - len(genes), 0)])
    probe = sample[: min(len(sample), 8192)]
    predict(model, probe[:64], want or None)  # warm-up
    t0 = time.perf_counter()
    pred = predict(model, probe, want or None, batch_size=chunk_points)
    if intervals and genes:
        dist = interval_setup(model, genes, DEFAULT_LEVEL)
        assert dist is not None
        interval_from_prediction(pred[:, : len(genes)], dist, DEFAULT_LEVEL)
    rate = len(probe) / max(time.perf_counter() - t0, 1e-9)
    inside = int(round(frac * grid.n_points))
    channels = max(len(genes) * (3 if intervals else 1), 1)
    return RenderEstimate(grid.n_points, inside, len(want), rate, inside / rate, grid.n_points * channels * 4)


def check_budget(grid: GridSpec, max_voxels: float, force: bool, est: RenderEstimate | None = None) -> None:
    """InputError when ``grid`` has more than ``max_voxels`` voxels and ``force`` is not set."""
    if grid.n_points > max_voxels and not force:
        cost = f" ({est.line()})" if est is not None else ""
        raise InputError(
            f"grid {grid.shape} (Z Y X) = {grid.n_points:.3g} voxels exceeds --max-voxels {max_voxels:.3g}{cost}; "
            "use a larger --voxel, raise --max-voxels, or pass --force"
        )


def render(
    model: INRField,
    genes: Sequence[str],
    grid: GridSpec | None = None,
    out: str | Path = "volume.ome.zarr",
    mask: TissueMask | str | None = "model",
    domains: int = 0,
    domain_genes: int = 100,
    chunk_points: int = 65536,
    slab: int = 32,
    max_levels: int = 4,
    png: bool = True,
    seed: int = 0,
    progress: bool = False,
    level: float | None = None,
) -> RenderResult:
    """Predict ``genes`` at every voxel centre of ``grid`` (0 outside ``mask``) and write OME-Zarr ``out``.

    grid: default 128 voxels across the training cells' bounding box stored in the model (z padded by half a
    section spacing). mask: ``"model"`` (default) the tissue outlines stored in the model file (none if it has
    none), a :class:`TissueMask`, or None (every voxel). Image: axes (c, z, y, x), float32 log1p-normalised
    expression, channel names in ``omero``; ``labels/tissue`` (1 inside the mask) when masked; ``domains=K``
    (≥ 2) adds ``labels/domains`` (0 outside, 1..K clusters, marker genes per label). With no genes the image
    holds one channel, the domain labels. ``level`` (e.g. 0.9): after the gene channels, channels
    ``"<gene> lower_90"`` for every gene, then ``"<gene> upper_90"``: the predictive interval of a voxel's
    counts at the training median library size, in the same units (:mod:`inrscrecon.query.uncertainty`).
    Returns what was written.
    """
    t0 = time.time()
    genes = list(genes)
    if not genes and domains <= 0:
        raise InputError("nothing to render: give --genes and/or --domains")
    gene_indices(model, genes)
    if level is not None and not genes:
        raise InputError("--uncertainty needs --genes (intervals are per gene)")
    dist = interval_setup(model, genes, level)
    model = model.eval()
    grid = grid or GridSpec.from_bounds(model_bounds(model))
    tmask = _mask_arg(model, mask)
    factors = pyramid_factors(grid.shape, max_levels)
    nz, ny, nx = grid.shape
    slab = max(1, min(slab, nz))
    probe = _sample(grid, 20000, seed)
    probe = probe[tmask.contains(probe)] if tmask is not None else probe  # voxels that will be evaluated
    ood = check_domain(model, probe, "the voxels rendered")
    codes = model.code_use(probe)  # which section codes the voxels get (one warning when interpolated)
    dom = DomainModel.fit(model, probe[:8000], domains, domain_genes, seed) if domains > 0 else None
    channels = genes if genes else ["domains"]
    if dist is not None and level is not None:
        lo_name, hi_name = layer_names(level)
        channels = genes + [f"{g} {lo_name}" for g in genes] + [f"{g} {hi_name}" for g in genes]
    want = genes + ([g for g in dom.genes if g not in genes] if dom is not None else [])
    col = {g: i for i, g in enumerate(want)}
    inside_total = 0
    with staged_dir(out) as (tmp, scratch):
        import dask.array as da
        import zarr

        chunks = (1, slab, min(ny, 256), min(nx, 256))
        raw = zarr.open_group(str(scratch), mode="w")
        img = raw.create_array(
            "image",
            shape=(len(channels), nz, ny, nx),
            chunks=chunks,
            dtype="float32" if genes else "uint16",
            fill_value=0,
        )
        tis = raw.create_array("tissue", shape=(nz, ny, nx), chunks=chunks[1:], dtype="uint8", fill_value=0)
        lab = raw.create_array("domains", shape=(nz, ny, nx), chunks=chunks[1:], dtype="uint16", fill_value=0)
        for z0 in tqdm(range(0, nz, slab), desc="render", unit="slab", disable=not progress):
            z1 = min(z0 + slab, nz)
            pts = grid.points(z0, z1)
            inside = tmask.contains(pts) if tmask is not None else np.ones(len(pts), dtype=bool)
            idx = np.flatnonzero(inside)
            inside_total += len(idx)
            vals = np.zeros((len(pts), len(channels) if genes else 0), dtype=np.float32)
            labs = np.zeros(len(pts), dtype=np.uint16)
            for s in range(0, len(idx), chunk_points):
                sel = idx[s : s + chunk_points]
                pred = predict(model, pts[sel], want, batch_size=chunk_points)
                vals[sel, : len(genes)] = pred[:, : len(genes)]
                if dist is not None and level is not None:
                    lo, hi = interval_from_prediction(pred[:, : len(genes)], dist, level)
                    vals[sel, len(genes) : 2 * len(genes)], vals[sel, 2 * len(genes) :] = lo, hi
                if dom is not None:
                    labs[sel] = dom.labels(pred[:, [col[g] for g in dom.genes]])
            shape = (z1 - z0, ny, nx)
            img[:, z0:z1] = vals.T.reshape(len(channels), *shape) if genes else labs.reshape(1, *shape)
            tis[z0:z1] = inside.reshape(shape)
            if dom is not None:
                lab[z0:z1] = labs.reshape(shape)
        labels = {}
        if tmask is not None:
            labels["tissue"] = (da.from_zarr(tis), [{"label-value": 1, "name": "tissue"}])
        if dom is not None:
            props = [
                {"label-value": d + 1, "name": f"domain {d + 1}", "markers": ", ".join(dom.markers[d])}
                for d in range(domains)
            ]
            labels["domains"] = (da.from_zarr(lab), props)
        attrs = {
            "values": "log1p(normalised expression, target_sum 1e4); 0 outside the tissue mask"
            if genes
            else "domain labels",
            "mask": tmask.kind if tmask is not None else "none",
            "genes": channels[: len(genes)] if genes else channels,
            "domain_genes": dom.genes if dom is not None else [],
            "section_z": [float(z) for z in (tmask.section_z if tmask is not None else model.cfg.section_z)],
            "out_of_domain": ood,
        }
        if dist is not None and level is not None:
            attrs["uncertainty"] = record(dist, level, MEDIAN_RULE)
        if codes is not None:
            attrs["section_codes"] = codes  # counts are of the probe sample of voxels
        write_ome_zarr(
            Path(tmp),
            da.from_zarr(img),
            channels,
            grid,
            factors,
            labels,
            chunks,
            attrs,
            image_is_label=not genes,
            weights=da.from_zarr(tis) if tmask is not None else None,
        )
    out = Path(out)
    pngs = write_slices_png(out, _png_path(out)) if png else []
    return RenderResult(out, grid, channels, len(factors), inside_total, pngs, time.time() - t0, ood)


def _png_path(out: Path) -> Path:
    stem = out.name[: -len(".ome.zarr")] if out.name.endswith(".ome.zarr") else out.stem
    return out.with_name(f"{stem}_slices.png")


def voxel_count_ok(grid: GridSpec, limit: float = 2e10) -> None:
    """Refuse absurd grids early (a typo in --voxel) with a clear message, whatever --force says."""
    if grid.n_points > limit:
        raise InputError(
            f"grid of {grid.shape} = {grid.n_points:.3g} voxels is too large; use a larger --voxel"
        )


__all__ = [
    "DEFAULT_MAX_VOXELS",
    "DomainModel",
    "GridSpec",
    "RenderEstimate",
    "RenderResult",
    "TissueMask",
    "bounds_of",
    "check_budget",
    "estimate",
    "model_bounds",
    "render",
    "write_slices_png",
]
