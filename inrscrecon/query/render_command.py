"""``inrscrecon render MODEL --genes G1,G2 [--voxel XY [Z] | --shape Z Y X] [--bounds …] [--mask …]
[--domains K] --out VOLUME.ome.zarr``: a dense grid over the training tissue streamed through the model into
OME-Zarr + PNG orthogonal views. The cost is estimated first; grids beyond ``--max-voxels`` need ``--force``."""

from __future__ import annotations

import argparse
import time

DEFAULT_MAX_VOXELS = 250_000_000  # ≈ 630³; beyond it render asks for --force


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the ``render`` subcommand on an argparse subparsers object."""
    from inrscrecon.cli import count, positive_float, positive_int  # the CLI's range-checked types

    p = sub.add_parser(
        "render", help="render the field on a dense 3D grid → OME-Zarr (c, z, y, x) + PNG slices"
    )
    p.add_argument("model", help="model file written by `inrscrecon fit`")
    p.add_argument("--genes", help="comma-separated gene names (channels of the volume)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--voxel",
        type=positive_float,
        nargs="+",
        metavar="UM",
        help="voxel size in µm: XY (isotropic) or XY Z (e.g. --voxel 50 10); default 128 "
        "voxels across the tissue, at least 2 z planes",
    )
    size.add_argument(
        "--shape", type=positive_int, nargs=3, metavar=("Z", "Y", "X"), help="grid shape in voxels"
    )
    p.add_argument(
        "--bounds",
        type=float,
        nargs=6,
        metavar=("XMIN", "XMAX", "YMIN", "YMAX", "ZMIN", "ZMAX"),
        help="grid box in µm (default: the training cells' bounding box stored in the model, or that "
        "of --cells; z padded by half a section spacing)",
    )
    p.add_argument(
        "--cells",
        help="training cell coordinates (.h5ad with obsm['spatial_3d'], .npy, .csv): "
        "bounds and tissue mask, for model files that do not store them",
    )
    p.add_argument(
        "--mask",
        choices=["auto", "none", "hull", "tissue"],
        default="auto",
        help="tissue: per-section alpha-shape outlines interpolated in z (from --cells, else the "
        "model's); hull: per-section convex hulls of --cells; none: every voxel; auto (default): "
        "tissue when the model or --cells has it",
    )
    p.add_argument(
        "--alpha",
        type=positive_float,
        help="alpha-shape radius in µm for --mask tissue with --cells (default: automatic)",
    )
    p.add_argument(
        "--domains",
        type=count,
        default=0,
        metavar="K",
        help="also write a label volume of K expression domains (labels/domains)",
    )
    p.add_argument(
        "--domain-genes",
        type=positive_int,
        default=100,
        help="most variable predicted genes used for domains",
    )
    p.add_argument("--chunk-points", type=positive_int, default=65536, help="voxels per model call")
    p.add_argument(
        "--slab", type=positive_int, default=32, help="z-planes per written slab (and zarr chunk depth)"
    )
    p.add_argument("--levels", type=positive_int, default=4, help="multiscale pyramid levels (at most)")
    p.add_argument(
        "--max-voxels",
        type=positive_float,
        default=DEFAULT_MAX_VOXELS,
        help=f"refuse grids with more voxels than this unless --force (default {DEFAULT_MAX_VOXELS:.3g})",
    )
    p.add_argument("--force", action="store_true", help="render even beyond --max-voxels")
    p.add_argument("--no-png", action="store_true", help="skip the PNG orthogonal slices")
    add_uncertainty_flags(p, "channels '<gene> lower_90' / '<gene> upper_90' after the gene channels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder, e.g. VOLUME.ome.zarr")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def add_uncertainty_flags(p: argparse.ArgumentParser, where: str) -> None:
    """``--uncertainty`` and ``--level`` (predict, impute, render)."""
    from inrscrecon.cli import probability

    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="also write the predictive interval of the counts (negative binomial calibrated on the fit's "
        f"validation cells, in the units of X): {where}",
    )
    p.add_argument(
        "--level", type=probability, default=0.9, help="interval level with --uncertainty (default 0.9)"
    )


def uncertainty_level(args: argparse.Namespace) -> float | None:
    """The interval level asked for (None without --uncertainty); InputError for a level of 0 or 1."""
    if not getattr(args, "uncertainty", False):
        return None
    from inrscrecon.query.uncertainty import check_level

    return check_level(args.level)


def run(args: argparse.Namespace) -> int:
    from inrscrecon.data.io import check_writable, read_coords
    from inrscrecon.errors import InputError
    from inrscrecon.field.model import INRField
    from inrscrecon.query.predict import gene_indices
    from inrscrecon.query.render import (
        GridSpec,
        TissueMask,
        bounds_of,
        check_budget,
        estimate,
        model_bounds,
        render,
        voxel_count_ok,
    )
    from inrscrecon.query.tissue import z_pad

    t0 = time.time()
    check_writable(args.out, directory=True)
    if args.voxel is not None and len(args.voxel) > 2:
        raise InputError(f"--voxel takes XY or XY Z (µm), got {len(args.voxel)} numbers")
    model = INRField.load(args.model, device=args.device)
    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else []
    gene_indices(model, genes)  # unknown genes fail before anything else
    level = uncertainty_level(args)
    if level is not None:
        from inrscrecon.query.predict import interval_setup

        if not genes:
            raise InputError("--uncertainty needs --genes (intervals are per gene)")
        interval_setup(model, genes, level)  # a model that cannot give intervals fails here
    cells = read_coords(args.cells)[0] if args.cells else None
    if args.mask == "hull" and cells is None:
        raise InputError("--mask hull needs --cells (the training cell coordinates)")
    mask: TissueMask | str | None = None
    if args.mask in ("auto", "tissue", "hull") and cells is not None:
        mask = TissueMask.build(cells, "hull" if args.mask == "hull" else "alpha", alpha=args.alpha)
    elif args.mask in ("auto", "tissue"):
        mask = TissueMask.from_config(model.cfg)
        if mask is None and args.mask == "tissue":
            raise InputError(f"{args.model}: the model file stores no tissue outline; pass --cells")
    if args.bounds:
        bounds = args.bounds
    elif cells is not None:
        pad = mask.pad if isinstance(mask, TissueMask) else z_pad(sorted(set(cells[:, 2].round(6))))
        bounds = bounds_of(cells, 0.0, z_margin=pad)
    else:
        try:
            bounds = model_bounds(model)
        except InputError as exc:
            raise InputError(f"{args.model}: {exc}") from None
    grid = GridSpec.from_bounds(bounds, voxel=args.voxel, shape=args.shape)
    voxel_count_ok(grid)
    est = estimate(
        model,
        genes,
        grid,
        mask,
        args.domain_genes if args.domains else 0,
        args.chunk_points,
        args.seed,
        intervals=level is not None,
    )
    check_budget(grid, args.max_voxels, args.force, est)
    if not args.quiet:
        print(est.line(), flush=True)
    res = render(
        model,
        genes,
        grid,
        args.out,
        mask=mask,
        domains=args.domains,
        domain_genes=args.domain_genes,
        chunk_points=args.chunk_points,
        slab=args.slab,
        max_levels=args.levels,
        png=not args.no_png,
        seed=args.seed,
        progress=not args.quiet,
        level=level,
    )
    n = grid.n_points
    where = "inside the tissue mask" if mask is not None else "evaluated (no mask)"
    print(
        f"wrote {res.path}: {len(res.channels)} channel(s) × {grid.shape} voxels (z, y, x) of "
        f"{'×'.join(f'{v:.3g}' for v in grid.voxel[::-1])} µm, {res.levels} levels, "
        f"{res.voxels_inside}/{n} voxels {where}; {time.time() - t0:.1f} s"
    )
    for p in res.pngs:
        print(f"slices: {p}")
    return 0
