"""PNG of a rendered volume: orthogonal views through the tissue, one block per channel (and one for the
domain labels).

Each block is the classic orthogonal-views layout: the xy plane (image convention: y grows downwards, as in
scanpy/squidpy spatial plots and the other inrscrecon figures), the yz plane to its right (sharing y) and the
xz plane below it (sharing x), with dashed lines where the planes cut each other. Planes go through the
tissue (the plane of each axis with the most tissue voxels), at equal aspect in x and y; z is stretched by a
stated factor when the stack is much thinner than it is wide. Voxels outside the tissue mask are light grey,
never the colour of low expression; domains use categorical colours with a legend of their marker genes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from inrscrecon.data.io import atomic_output

OUTSIDE = "#d0d0d0"


def _level_path(group: Any, level: int = 0) -> str:
    meta = group.attrs.asdict().get("ome", group.attrs.asdict())
    return meta["multiscales"][0]["datasets"][level]["path"]


def _frame(group: Any, level: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scale, translation) of ``level`` along z, y, x."""
    meta = group.attrs.asdict().get("ome", group.attrs.asdict())
    ct = meta["multiscales"][0]["datasets"][level]["coordinateTransformations"]
    s = np.asarray(ct[0]["scale"], dtype=float)[-3:]
    t = np.asarray(ct[1]["translation"], dtype=float)[-3:] if len(ct) > 1 else np.zeros(3)
    return s, t


def _planes(arr: Any, lead: tuple, k: int, j: int, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xy [Y, X] at z = k, xz [Z, X] at y = j, yz [Y, Z] at x = i of arr[(*lead, z, y, x)]."""
    return (
        np.asarray(arr[(*lead, k)]),
        np.asarray(arr[(*lead, slice(None), j)]),
        np.asarray(arr[(*lead, slice(None), slice(None), i)]).T,
    )


def _through_tissue(tissue: Any | None, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Plane indices (z, y, x) with the most tissue voxels (the centre without a mask), from the coarsest
    level of the tissue labels so that a large volume is never read whole."""
    nz, ny, nx = shape
    if tissue is None:
        return nz // 2, ny // 2, nx // 2
    group, coarse = tissue
    t = np.asarray(group[coarse]) > 0
    if not t.any():
        return nz // 2, ny // 2, nx // 2
    idx = []
    for ax, n in zip(range(3), shape):
        counts = t.sum(axis=tuple(a for a in range(3) if a != ax))
        best = np.flatnonzero(counts == counts.max())
        c = best[len(best) // 2]
        idx.append(int(min(n - 1, (c + 0.5) * n / t.shape[ax])))
    return idx[0], idx[1], idx[2]


def _view_level(group: Any, max_side: int) -> int:
    """The finest pyramid level whose y and x sides are at most ``max_side`` voxels (else the coarsest)."""
    meta = group.attrs.asdict().get("ome", group.attrs.asdict())
    paths = [d["path"] for d in meta["multiscales"][0]["datasets"]]
    for lvl, p in enumerate(paths):
        if max(group[p].shape[-2:]) <= max_side:
            return lvl
    return len(paths) - 1


def write_slices_png(
    volume: str | Path, png: str | Path, max_channels: int = 4, max_side: int = 1024
) -> list[Path]:
    """Orthogonal views through the tissue of each channel (≤ ``max_channels``) and of the domain labels of
    an OME-Zarr written by :func:`~inrscrecon.query.render.render` → one PNG. Views come from the finest
    pyramid level with at most ``max_side`` voxels along y and x, so a large volume is never read whole.
    Returns [png]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator

    root: Any = zarr.open_group(str(volume), mode="r")
    meta = root.attrs.asdict()
    ome = meta.get("ome", meta)
    lvl = _view_level(root, max_side)
    img = root[_level_path(root, lvl)]
    scale, trans = _frame(root, lvl)
    vz, vy, vx = (float(v) for v in scale)
    tz, ty, tx = (float(v) for v in trans)
    _, nz, ny, nx = img.shape
    names = [c["label"] for c in ome.get("omero", {}).get("channels", [])]
    labels = root["labels"] if "labels" in root else None
    tissue = None
    if labels is not None and "tissue" in labels:
        tg = labels["tissue"]
        n_lv = len(tg.attrs.asdict()["ome"]["multiscales"][0]["datasets"])
        tissue = (tg, _level_path(tg, n_lv - 1))
    k, j, i = _through_tissue(tissue, (nz, ny, nx))
    sections = [
        z for z in meta.get("inrscrecon", {}).get("section_z", []) if tz - vz / 2 <= z <= tz + (nz - 0.5) * vz
    ]
    if sections:  # the xy view on a measured section (the one nearest the middle), not between two
        mid = sections[int(np.argmin(np.abs(np.asarray(sections) - (tz + (nz - 1) * vz / 2))))]
        k = int(np.clip(round((mid - tz) / vz), 0, nz - 1))
    inside = _planes(tissue[0][_level_path(tissue[0], lvl)], (), k, j, i) if tissue is not None else None
    domains = labels["domains"] if labels is not None and "domains" in labels else None
    markers = {
        p["label-value"]: p.get("markers", "")
        for p in (domains.attrs.asdict()["ome"]["image-label"].get("properties", []) if domains else [])
    }

    x0, x1 = tx - vx / 2, tx + (nx - 0.5) * vx
    y0, y1 = ty - vy / 2, ty + (ny - 0.5) * vy
    z0, z1 = tz - vz / 2, tz + (nz - 0.5) * vz
    wx, wy, wz = x1 - x0, y1 - y0, z1 - z0
    stretch = max(1, int(round(0.2 * max(wx, wy) / wz))) if wz > 0 else 1  # z panels ≥ ~1/6 of the block
    zs = wz * stretch
    blocks: list[tuple[str, tuple[np.ndarray, ...], bool]] = []
    for c in range(min(img.shape[0], max_channels)):
        if names and names[c] == "domains" and domains is not None:
            continue  # a domains-only volume: the label block below shows it
        blocks.append((names[c] if c < len(names) else f"c{c}", _planes(img, (c,), k, j, i), False))
    if domains is not None:
        blocks.append(("domains", _planes(domains[_level_path(domains, lvl)], (), k, j, i), True))

    ncol = min(len(blocks), 3)
    nrow = -(-len(blocks) // ncol)
    bw = 4.2
    bh = bw * (wy + zs) / (wx + zs) + 0.9
    fig = plt.figure(figsize=(bw * ncol + 1.2 * ncol, bh * nrow), layout="constrained")
    subs = np.atleast_1d(fig.subfigures(nrow, ncol, squeeze=False)).ravel()
    n_dom = (
        int(max((int(p[0].max()) if p[0].size else 0) for _, p, lab in blocks if lab) or 0) if domains else 0
    )
    base = plt.get_cmap("tab10" if n_dom <= 10 else "tab20")
    dom_cmap = ListedColormap(base.colors[: max(n_dom, 1)]).with_extremes(bad=OUTSIDE)  # type: ignore[attr-defined]
    for sub, (name, planes, is_label) in zip(subs, blocks):
        # xy | yz | colour bar over xz | legend; the same layout for every block, so blocks line up
        gs = sub.add_gridspec(2, 3, width_ratios=[wx, zs, 0.05 * (wx + zs)], height_ratios=[wy, zs])
        axy, ayz, axz = sub.add_subplot(gs[0, 0]), sub.add_subplot(gs[0, 1]), sub.add_subplot(gs[1, 0])
        if is_label:
            shown = [np.ma.masked_less(p.astype(float), 1) for p in planes]
            cmap, vmin, vmax = dom_cmap, 0.5, n_dom + 0.5
        else:
            if inside is not None:
                shown = [np.ma.masked_array(p, mask=~m.astype(bool)) for p, m in zip(planes, inside)]
            else:
                shown = [np.ma.masked_invalid(p) for p in planes]
            vals = np.concatenate([s.compressed() for s in shown]) if shown else np.zeros(1)
            cmap = plt.get_cmap("magma").with_extremes(bad=OUTSIDE)  # type: ignore[assignment]
            lo_hi = np.percentile(vals, [1, 99.5]) if vals.size else np.array([0.0, 1.0])
            vmin, vmax = float(lo_hi[0]), float(max(lo_hi[1], lo_hi[0] + 1e-6))
        kw: dict[str, Any] = {
            "cmap": cmap,
            "vmin": vmin,
            "vmax": vmax,
            "interpolation": "nearest",
            "origin": "upper",
        }
        im = axy.imshow(shown[0], extent=[x0, x1, y1, y0], aspect="equal", **kw)
        axz.imshow(shown[1], extent=[x0, x1, z0 + zs, z0], aspect="equal", **kw)
        ayz.imshow(shown[2], extent=[z0, z0 + zs, y1, y0], aspect="equal", **kw)
        xc, yc, zc = tx + i * vx, ty + j * vy, tz + k * vz
        zc_s = z0 + (zc - z0) * stretch
        for a, lines in (
            (axy, [("v", xc), ("h", yc)]),
            (axz, [("v", xc), ("h", zc_s)]),
            (ayz, [("v", zc_s), ("h", yc)]),
        ):
            for kind, v in lines:
                (a.axvline if kind == "v" else a.axhline)(v, color="white", lw=0.6, ls="--", alpha=0.8)
        axy.set_title(f"{name}: xy at z = {zc:.0f} µm", fontsize=9)
        axy.set_ylabel("y (µm) ↓", fontsize=8)
        axz.set_xlabel("x (µm)", fontsize=8)
        zlab = "z (µm)" + (f", stretched ×{stretch}" if stretch > 1 else "")
        axz.set_ylabel(zlab, fontsize=7)
        ayz.set_xlabel(zlab, fontsize=7)
        ayz.set_title(f"yz at x = {xc:.0f}", fontsize=8)
        axz.set_title(f"xz at y = {yc:.0f}", fontsize=8, loc="left")
        for a in (axz, ayz):  # z tick labels in µm despite the stretch
            ticks = [t for t in MaxNLocator(nbins=3).tick_values(z0, z1) if z0 <= t <= z1]
            (a.set_yticks if a is axz else a.set_xticks)(z0 + (np.asarray(ticks) - z0) * stretch)
            (a.set_yticklabels if a is axz else a.set_xticklabels)([f"{t:.0f}" for t in ticks])
        ayz.set_yticklabels([])
        axy.set_xticklabels([])
        for a in (axy, axz, ayz):
            a.tick_params(labelsize=7)
        leg = sub.add_subplot(gs[1, 1:])
        leg.axis("off")
        if is_label:
            handles = [
                Patch(color=dom_cmap(d - 1), label=f"{d}: " + str(markers.get(d, "")).split(", ")[0])
                for d in range(1, n_dom + 1)
            ]
            handles.append(Patch(color=OUTSIDE, label="outside tissue"))
            leg.legend(
                handles=handles,
                loc="upper left",
                fontsize=5.5,
                frameon=False,
                borderaxespad=0,
                title="domain: top marker",
                title_fontsize=6,
                handlelength=1,
                labelspacing=0.3,
            )
        else:
            cb = sub.colorbar(im, cax=sub.add_subplot(gs[0, 2]))
            cb.set_label("log1p expr.", fontsize=7)
            cb.ax.tick_params(labelsize=6)
            if inside is not None:
                leg.add_patch(Rectangle((0.05, 0.6), 0.2, 0.25, color=OUTSIDE, transform=leg.transAxes))
                leg.text(0.3, 0.72, "outside\ntissue", transform=leg.transAxes, fontsize=6, va="center")
    try:
        with atomic_output(png) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return [Path(png)]


__all__ = ["write_slices_png"]
