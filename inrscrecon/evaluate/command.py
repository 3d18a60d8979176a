"""``inrscrecon evaluate``: inter / intra / 3d evaluation of the INR, its ablations and tuned baselines."""

from __future__ import annotations

import argparse
import shlex
import sys

from inrscrecon.errors import InputError


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the CLI's subparsers; returns the parser."""
    from inrscrecon.cli import add_input_flag, add_units_flag, count, positive_float, positive_int

    p = sub.add_parser(
        "evaluate",
        help="evaluate the INR, its ablations and tuned baselines (inter / intra / 3d) → results.json, table, PNGs",
        description="Hold out sections (inter), 50%% of a section's spots (intra) or a z-band (3d); fit the INR "
        "(encoding bandwidth chosen on validation spots) and tuned baselines on the rest; report ARI, SSIM, "
        "Pearson and RMSE as mean ± s.d. over seeds. Sections that are not aligned are aligned first.",
    )
    p.add_argument(
        "sections", nargs="+", help="section .h5ad files (or one aligned .h5ad / one 3D point cloud)"
    )
    p.add_argument("--task", required=True, choices=["inter", "intra", "3d"])
    p.add_argument(
        "--out", required=True, help="results folder (results.json, results.md, details.json, PNGs)"
    )
    p.add_argument(
        "--label-key", help="obs column with ground-truth domains for ARI (default: k-means domains)"
    )
    z = p.add_mutually_exclusive_group()
    z.add_argument(
        "--spacing", type=positive_float, help="µm between consecutive sections (z = index × spacing)"
    )
    z.add_argument("--z-key", help="z per section from uns[KEY] or per cell from obs[KEY]")
    p.add_argument(
        "--holdout", action="append", help="section to hold out / thin out (repeatable or comma-separated)"
    )
    add_input_flag(p)
    add_units_flag(p)
    p.add_argument("--seeds", type=positive_int, default=3, help="number of seeds (default 3)")
    p.add_argument(
        "--genes",
        type=positive_int,
        help="top variable shared genes evaluated (default 500; 3000 with --protocol paper)",
    )
    p.add_argument(
        "--protocol",
        choices=["ours", "paper"],
        default="ours",
        help="paper: intra-slice completion scored on the complete section (training + dropped spots), "
        "3000 genes, PCA 30 + GMM and k-means, as the INRScrecon paper scores it (default: ours)",
    )
    p.add_argument(
        "--hvg",
        choices=["pooled", "batch"],
        default="pooled",
        help="gene selection: pooled variance, or per section and combined (Seurat v3 rule; default pooled)",
    )
    p.add_argument(
        "--inter-selection",
        choices=["sections", "spots"],
        default="sections",
        help="inter: choose knobs on held-out interior training sections (default) or on random spots",
    )
    p.add_argument("--steps", type=count, default=1000, help="optimizer steps per fit (0: use --epochs)")
    p.add_argument("--epochs", type=positive_int, default=60)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--width", type=positive_int, default=256)
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument(
        "--bands", default="2,4", help="Fourier band counts L tried on validation spots (default 2,4)"
    )
    p.add_argument(
        "--band", default="0.4,0.6", help="3d task: held-out z-band as quantiles LO,HI (default 0.4,0.6)"
    )
    p.add_argument(
        "--domains",
        type=positive_int,
        default=7,
        help="k of the k-means domains when there is no --label-key",
    )
    p.add_argument(
        "--ablations",
        default="inr,inr_no_rc,inr_rmse",
        help="INR methods (comma-separated): inr, inr_no_rc, inr_rmse, inr_poisson, inr_nb, inr_zstretch, "
        "inr_codes, inr_hashgrid, inr_rank",
    )
    p.add_argument(
        "--no-neighbours", action="store_true", help="intra: skip the with-neighbouring-sections setting"
    )
    p.add_argument(
        "--max-cells", type=positive_int, help="subsample each section to this many cells (quick runs)"
    )
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")
    return p


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 0:
        raise InputError(f"{what} must be non-negative integers, got {text!r}")
    return vals


def run(args: argparse.Namespace) -> int:
    """Run the evaluation and print the markdown table."""
    from inrscrecon.data.io import parse_names, read_sections, section_names
    from inrscrecon.evaluate import evaluate
    from inrscrecon.evaluate.report import markdown_table
    from inrscrecon.evaluate.tasks import INR_METHODS, EvalConfig
    from inrscrecon.field.encoding import EncodingConfig

    try:
        band = tuple(float(v) for v in args.band.split(","))
    except ValueError:
        raise InputError(f"--band must be two quantiles LO,HI, got {args.band!r}") from None
    if len(band) != 2:
        raise InputError(f"--band must be two quantiles LO,HI, got {args.band!r}")
    ablations = tuple(a.strip() for a in args.ablations.split(",") if a.strip())
    bad = [a for a in ablations if a not in INR_METHODS]
    if bad:
        raise InputError(f"unknown ablation {bad[0]!r}; choose from {list(INR_METHODS)}")
    holdout = parse_names(args.holdout) or None
    paper = args.protocol == "paper"
    if paper and args.task != "intra":
        raise InputError(
            f"--protocol paper scores intra-slice completion; use --task intra, not {args.task!r}"
        )
    cfg = EvalConfig(
        n_genes=args.genes or (3000 if paper else 500),
        protocol=args.protocol,
        n_pcs=30 if paper else EvalConfig.n_pcs,
        gene_selection=args.hvg,
        inter_selection=args.inter_selection,
        width=args.width,
        n_layers=args.layers,
        epochs=args.epochs,
        lr=args.lr,
        steps=args.steps or None,
        batch_size=args.batch_size,
        candidates=tuple(EncodingConfig("fourier", n_bands=L) for L in _ints(args.bands, "--bands")),
        ablations=ablations,
        band=(band[0], band[1]),
        n_domains=args.domains,
        intra_settings=("alone",) if args.no_neighbours or paper else ("alone", "neighbours"),
        max_cells=args.max_cells,
        threads=args.threads,
    )
    log = None if args.quiet else (lambda line: print(line, flush=True))
    command = "inrscrecon " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    sections = read_sections(args.sections, input_kind=args.input, microns_per_unit=args.microns_per_unit)
    names = section_names(sections)
    unknown = [h for h in holdout or [] if h not in names]
    if unknown and args.task in ("inter", "intra"):  # before aligning and fitting, not after
        raise InputError(f"unknown holdout section {unknown[0]!r}; sections are {names}")
    res = evaluate(
        sections,
        args.task,
        args.label_key,
        args.spacing,
        args.z_key,
        holdout,
        args.seeds,
        args.out,
        cfg,
        command=command,
        log=log,
    )
    print(markdown_table(res.results))
    print(
        f"wall time {res.wall_s:.0f} s; results in {res.paths.get('results')}, table in {res.paths.get('markdown')}"
    )
    return 0
