"""``inrscrecon render MODEL --genes G1,G2 [--voxel UM | --shape Z Y X] [--bounds …] [--mask tissue]
[--domains K] --out VOLUME.ome.zarr``: a dense grid streamed through the model into OME-Zarr + PNG slices."""

from __future__ import annotations

import argparse
import time


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the ``render`` subcommand on an argparse subparsers object."""
    p = sub.add_parser(
        "render", help="render the field on a dense 3D grid → OME-Zarr (c, z, y, x) + PNG slices"
    )
    p.add_argument("model", help="model file written by `inrscrecon fit`")
    p.add_argument("--genes", help="comma-separated gene names (channels of the volume)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--voxel", type=float, help="isotropic voxel size in µm")
    size.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="grid shape in voxels")
    p.add_argument("--bounds", type=float, nargs=6, metavar=("XMIN", "XMAX", "YMIN", "YMAX", "ZMIN", "ZMAX"),
                   help="grid box in µm (default: bounding box of --cells, else the model's training cube)")  # fmt: skip
    p.add_argument("--cells", help="training cell coordinates (.h5ad with obsm['spatial_3d'], .npy, .csv): "
                   "bounds and tissue mask")  # fmt: skip
    p.add_argument("--mask", choices=["none", "hull", "tissue"], default="none",
                   help="evaluate only inside the convex hull or the alpha shape (tissue) of --cells; 0 outside")  # fmt: skip
    p.add_argument(
        "--alpha", type=float, help="alpha-shape radius in µm for --mask tissue (default: automatic)"
    )
    p.add_argument("--domains", type=int, default=0, metavar="K",
                   help="also write a label volume of K expression domains (labels/domains)")  # fmt: skip
    p.add_argument(
        "--domain-genes", type=int, default=100, help="most variable predicted genes used for domains"
    )
    p.add_argument("--chunk-points", type=int, default=65536, help="voxels per model call")
    p.add_argument("--slab", type=int, default=32, help="z-planes per written slab (and zarr chunk depth)")
    p.add_argument("--levels", type=int, default=4, help="multiscale pyramid levels (at most)")
    p.add_argument("--no-png", action="store_true", help="skip the PNG orthogonal slices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder, e.g. VOLUME.ome.zarr")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from inrscrecon.data.io import check_writable, read_coords
    from inrscrecon.errors import InputError
    from inrscrecon.field.model import INRField
    from inrscrecon.query.render import GridSpec, TissueMask, bounds_of, model_bounds, render, voxel_count_ok

    t0 = time.time()
    check_writable(args.out)
    model = INRField.load(args.model, device=args.device)
    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else []
    cells = read_coords(args.cells)[0] if args.cells else None
    if args.mask != "none" and cells is None:
        raise InputError("--mask needs --cells (the training cell coordinates)")
    bounds = args.bounds or (bounds_of(cells) if cells is not None else model_bounds(model))
    grid = GridSpec.from_bounds(bounds, voxel=args.voxel, shape=args.shape)
    voxel_count_ok(grid)
    mask = None
    if args.mask != "none" and cells is not None:
        mask = TissueMask.build(
            cells, "hull" if args.mask == "hull" else "alpha", alpha=args.alpha, seed=args.seed
        )
    res = render(model, genes, grid, args.out, mask=mask, domains=args.domains, domain_genes=args.domain_genes,
                 chunk_points=args.chunk_points, slab=args.slab, max_levels=args.levels, png=not args.no_png,
                 seed=args.seed, progress=not args.quiet)  # fmt: skip
    n = grid.n_points
    print(f"wrote {res.path}: {len(res.channels)} channel(s) × {grid.shape} voxels of "
          f"{'×'.join(f'{v:.3g}' for v in grid.voxel[::-1])} µm (z×y×x), {res.levels} levels, "
          f"{res.voxels_inside}/{n} voxels inside the mask; {time.time() - t0:.1f} s")  # fmt: skip
    for p in res.pngs:
        print(f"slices: {p}")
    return 0
