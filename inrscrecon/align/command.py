"""``inrscrecon align``: the sub-command's parser (``add_parser``) and its action (``run``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``align`` sub-command to an ``argparse`` sub-parsers object; returns the new parser."""
    from inrscrecon.cli import add_input_flag, add_units_flag, positive_float  # the CLI's shared flags

    p = subparsers.add_parser(
        "align",
        help="align consecutive sections into one 3D frame",
        description=(
            "Align consecutive sections pairwise (expression matches + robust rigid fit + refinement) and stack "
            "them along z. x, y are converted to µm with uns['microns_per_pixel'] when present."
        ),
    )
    p.add_argument("sections", nargs="+", help="section .h5ad files, in z order")
    p.add_argument("--out", required=True, help="aligned AnnData (.h5ad) with obsm['spatial_3d'] (µm)")
    p.add_argument(
        "--transforms", required=True, help="transforms JSON (rotation, translation, reflected, z, ...)"
    )
    p.add_argument("--matches", default=None, help="optional CSV of the final cell matches of each pair")
    p.add_argument(
        "--plots", default=None, help="folder for one PNG overlay per pair (default: next to --out)"
    )
    z = p.add_mutually_exclusive_group()
    z.add_argument("--spacing", type=positive_float, default=None, help="µm between consecutive sections")
    z.add_argument("--z-key", default=None, help="per-section z (µm) in uns[KEY] or obs[KEY]")
    p.add_argument(
        "--reference", default=None, help="name or index of the section whose frame is kept (default 0)"
    )
    p.add_argument("--allow-reflection", action="store_true", help="allow a section to be flipped")
    p.add_argument(
        "--poses",
        choices=["global", "chained"],
        default="global",
        help="global (default): solve all section poses jointly from every pair up to 3 sections apart, "
        "weighted by each pair's overlay score; chained: compose consecutive pairs only (faster)",
    )
    p.add_argument(
        "--nonrigid",
        action="store_true",
        help="after the rigid poses, warp each section onto its neighbour by a smooth displacement field "
        "(bending penalty chosen on held-out cells); fields go to STEM_nonrigid/SECTION.npz beside "
        "--transforms, obsm['spatial_aligned'] / 'spatial_3d' get the warped coordinates",
    )
    p.add_argument(
        "--accept-low-confidence",
        action="store_true",
        help="keep pairs whose overlay score is below the threshold (default: stop with exit status 2)",
    )
    p.add_argument("--spatial-key", default="spatial", help="obsm key of the 2D coordinates")
    add_input_flag(p)
    add_units_flag(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Read, align, write (all outputs or none), plot. Returns 0; bad input raises InputError."""
    from inrscrecon.align.pipeline import align
    from inrscrecon.data.io import read_sections

    sections = read_sections(
        args.sections,
        spatial_key=args.spatial_key,
        input_kind=args.input,
        microns_per_unit=args.microns_per_unit,
    )
    reference = args.reference
    if reference is not None and str(reference).lstrip("-").isdigit():
        reference = int(reference)
    result = align(
        sections,
        spacing=args.spacing,
        reference=reference,
        allow_reflection=args.allow_reflection,
        seed=args.seed,
        z_key=args.z_key,
        spatial_key=args.spatial_key,
        progress=not args.no_progress,
        accept_low_confidence=args.accept_low_confidence,
        poses=args.poses,
        nonrigid=args.nonrigid,
    )
    result.write(args.out, args.transforms, args.matches)
    out = Path(args.out)
    plots = Path(args.plots) if args.plots else out.with_name(out.stem + "_pairs")
    paths = result.plot_pairs(plots)
    for pr in result.pairs:
        print(
            f"{pr.moving} → {pr.fixed}: overlay score {pr.score:.2f} ({pr.pose_source} pose), inlier_fraction "
            f"{pr.inlier_fraction:.3f}, overlap {pr.overlap:.2f}, {pr.seconds:.1f} s"
        )
    for e in result.transforms:
        if "nonrigid" in e and e["name"] != result.reference:
            nr = e["nonrigid"]
            print(
                f"{e['name']}: non-rigid {'kept' if nr.get('kept') else 'not kept (rigid is as good)'}, "
                f"largest displacement {nr['max_displacement_um']:.1f} µm, held-out mismatch "
                f"{-100 * nr.get('held_out_gain', 0.0):+.1f} %"
            )
    print(
        f"wrote {out}, {args.transforms}"
        + (f", {args.matches}" if args.matches else "")
        + (f", {result.nonrigid_dir(args.transforms)}/" if result.fields else "")
        + f"; {len(paths)} PNGs in {plots}"
    )
    return 0
