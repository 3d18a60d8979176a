"""Command line: ``inrscrecon demo | synth | align | fit | predict | impute | render | evaluate | bench``.

Bad input ends with one line ``inrscrecon: error: …`` naming the file, field and value, exit status 2,
and no partial output: flags are range-checked while parsing, the device and every output path are checked
before any work, and outputs appear only when complete. ``--help`` imports neither torch nor the data stack.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from inrscrecon.errors import InputError
from inrscrecon.query.render_command import add_uncertainty_flags, uncertainty_level


class Parser(argparse.ArgumentParser):
    """argparse with its errors in the CLI's one-line form ``inrscrecon: error: …`` (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"inrscrecon: error: {message} (see `{self.prog} --help`)\n")


def _number(kind: type, low: float, strict: bool) -> Callable[[str], Any]:
    """argparse type: a ``kind`` number ``> low`` (``strict``) or ``≥ low``."""
    rel = ">" if strict else "≥"
    name = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name} {rel} {low:g}, got {text!r}") from None
        if (
            value != value
            or value in (float("inf"), float("-inf"))
            or (value <= low if strict else value < low)
        ):
            raise argparse.ArgumentTypeError(f"expected {name} {rel} {low:g}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__}{rel}{low:g}"
    return parse


positive_int = _number(int, 0, strict=True)
count = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)
non_negative_float = _number(float, 0.0, strict=False)


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def _bands(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) <= 16):
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer 0..16, got {text!r}")
    return text


def _demo(args: argparse.Namespace) -> int:
    from inrscrecon.demo import DemoConfig, format_table, run_demo

    t0 = time.time()
    results = run_demo(args.out, DemoConfig(seed=args.seed, progress=not args.quiet))
    print(format_table(results))
    print(
        f"wall time {time.time() - t0:.1f} s; metrics in {Path(args.out) / 'metrics.json'}, figures beside it"
    )
    return 0


def _synth(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    from tqdm.auto import tqdm

    from inrscrecon.data.io import atomic_output, write_h5ad
    from inrscrecon.data.synthetic import SynthConfig, iter_sections

    out = Path(args.out)
    cfg = SynthConfig(
        n_sections=args.sections,
        cells_per_section=args.cells,
        n_genes=args.genes,
        seed=args.seed,
        spacing=args.spacing,
        grid=args.grid,
        flip_prob=args.flip_prob,
    )
    records = []
    for adata, rec in tqdm(iter_sections(cfg), total=cfg.n_sections, desc="synth", unit="section"):
        adata.obsm["spatial_true"] = np.column_stack([rec["xy"], np.full(adata.n_obs, rec["z"])])
        write_h5ad(adata, out / f"{rec['name']}.h5ad")
        records.append(
            {
                "name": rec["name"],
                "rotation": rec["rotation"].tolist(),
                "translation": rec["translation"].tolist(),
                "reflected": rec["reflected"],
                "z": rec["z"],
                "n_cells": adata.n_obs,
            }
        )
    truth = {
        "convention": "common = R @ (S @ observed) + t, S = diag(1,-1) if reflected",
        "config": vars(cfg),
        "sections": records,
    }
    with atomic_output(out / "truth.json") as tmp:
        tmp.write_text(json.dumps(truth, indent=2))
    print(f"wrote {len(records)} sections and truth.json to {out}")
    return 0


def _load_stack(args: argparse.Namespace, holdout: list[str]):
    """Sections of ``fit`` / ``impute`` read as the flags say, without the ``holdout`` sections."""
    from inrscrecon.data.io import drop_sections, read_sections
    from inrscrecon.data.validate import check_z_source

    sections = read_sections(
        args.sections,
        spatial_key=args.spatial_key,
        input_kind=getattr(args, "input", "auto"),
        microns_per_unit=args.microns_per_unit,
    )
    check_z_source(sections, args.spacing, args.z_key, args.spatial_key)
    if holdout and args.spacing is not None and args.z_key is None:
        for i, s in enumerate(sections):  # z = index × spacing in the whole stack: held-out slots stay empty
            s.uns["z_um"] = i * float(args.spacing)
    return drop_sections(sections, holdout) if holdout else sections


def _fit(args: argparse.Namespace) -> int:
    from inrscrecon.data.io import check_stream_files, parse_names
    from inrscrecon.data.preprocess import select_genes
    from inrscrecon.data.stack import build_cell_table
    from inrscrecon.field.encoding import EncodingConfig
    from inrscrecon.field.losses import LossConfig
    from inrscrecon.train import distributed
    from inrscrecon.train.fit import Table, TrainConfig, fit

    out = Path(args.out)
    holdout = parse_names(args.holdout)
    di = distributed.init_from_env(args.device)  # no-op unless launched by torchrun with WORLD_SIZE > 1
    table: Table
    if args.stream and args.hvg != "pooled":
        raise InputError("--hvg batch needs in-memory sections; --stream selects genes by pooled variance")
    if args.stream:  # X stays on disk, read in CSR chunks
        from inrscrecon.data.streaming import open_stack

        if args.input != "auto" or args.microns_per_unit is not None:
            raise InputError(
                "--input and --microns-per-unit need in-memory sections; drop --stream "
                "(or set uns['X_kind'] / uns['microns_per_pixel'] in the files)"
            )
        if holdout and args.spacing is not None and args.z_key is None:
            raise InputError(  # z = index × spacing would count only the kept files: the stack would shift
                "--stream with --holdout and --spacing would re-space the kept sections; give each file its "
                "z as uns['z_um'] (or use --z-key), or drop --stream"
            )
        paths = check_stream_files(args.sections, args.spatial_key, holdout)
        table = open_stack(
            paths,
            n_genes=args.genes,
            spacing=args.spacing,
            z_key=args.z_key,
            spatial_key=args.spatial_key,
            chunk_rows=args.chunk_rows,
            window=args.window,
            progress=not args.quiet and di.main,
            shard=(di.rank, di.world),
            allreduce=distributed.allreduce_numpy,
        )
        genes = table.genes
    else:
        sections = _load_stack(args, holdout)
        genes = select_genes(sections, args.genes, method=args.hvg)
        spacing = None if holdout and args.z_key is None else args.spacing  # z_um set by _load_stack
        table = build_cell_table(
            sections, genes, spacing=spacing, z_key=args.z_key, spatial_key=args.spatial_key
        )
    trained_on = table.sections()
    if di.main:
        held = f"; held out: {', '.join(holdout)}" if holdout else ""
        print(f"{table.n_cells} cells from {len(trained_on)} sections, {len(genes)} genes{held}")
    loss = LossConfig(lambda_rc=args.lambda_rc, lambda_kl=args.lambda_kl, likelihood=args.loss)
    tc = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        backend=args.backend,
        precision=args.precision,
        progress=not args.quiet,
    )
    ckpt = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".ckpt")
    candidates: list[Path] = []
    # resume: a finished fit with the same settings and data stays as it is; --resume needs a checkpoint
    from inrscrecon.train.fit import plan_resume, run_record
    from inrscrecon.train.select import DEFAULT_CANDIDATES

    def checkpoint_for(e: EncodingConfig) -> Path:
        return ckpt.with_name(f"{ckpt.stem}.L{e.n_bands}{ckpt.suffix}")

    auto = args.bands == "auto" and args.encoding != "hashgrid"  # a hash grid has no bands to choose
    n_bands = 4 if args.bands == "auto" else int(args.bands)
    spec = "auto" if auto else EncodingConfig(args.encoding, n_bands, sigma=args.sigma, seed=args.seed)
    frame = {"z_stretch": args.z_stretch, "section_code_dim": args.section_codes, "head_rank": args.head_rank}
    run = run_record(table, spec, args.width, args.layers, loss, tc, **frame)
    ckpts = [checkpoint_for(e) for e in DEFAULT_CANDIDATES] if auto else [ckpt]
    resume = plan_resume(out, ckpts, run, args.resume, args.resume_or_start)
    if resume is None:
        if di.main:
            print(f"{out} is already fitted with these settings and data: nothing to do (file unchanged)")
            for p in ckpts if auto and not args.keep_checkpoints else []:
                p.unlink(missing_ok=True)
        distributed.cleanup()
        return 0
    if auto:  # bandwidth (and stopping epoch) chosen on the validation cells
        from inrscrecon.train.select import describe, select_encoding

        enc_args = (table, None, args.width, args.layers, loss, tc)
        sel = select_encoding(*enc_args, checkpoint_for=checkpoint_for, resume=resume, **frame)
        result, candidates = sel.result, sel.checkpoints
        if di.main:
            crit = "val_nll" if args.loss != "rmse" else "val_rmse"
            scores = ", ".join(f"{c['name']}: {c.get(crit, c['val_rmse']):.4f}" for c in sel.candidates)
            what = "NLL" if args.loss != "rmse" else "RMSE"
            print(f"encoding chosen on validation {what}: {describe(sel.encoding)} ({scores})")
    else:
        enc = EncodingConfig(kind=args.encoding, n_bands=n_bands, sigma=args.sigma, seed=args.seed)
        result = fit(table, enc, args.width, args.layers, loss, tc, checkpoint=ckpt, resume=resume, **frame)
    distributed.barrier()
    if not di.main:  # rank 0 alone writes the model and reports
        distributed.cleanup()
        return 0
    from inrscrecon.query.uncertainty import calibration_record  # count intervals: NB fitted on val cells
    from inrscrecon.train.fit import _split

    val_rows = _split(table.n_cells, tc.val_fraction, tc.seed)[1]
    uncertainty = calibration_record(result.model, table, val_rows, tc.seed)
    result.model.save(
        out,
        training={
            **{"sections": trained_on, "holdout": holdout, "input": args.input, "run": run},
            "uncertainty": uncertainty,
        },
    )
    distributed.cleanup()
    if not args.keep_checkpoints:  # the candidates' checkpoints served the selection; the model is complete
        for p in candidates:
            p.unlink(missing_ok=True)
    info = result.data_info  # where the stack lived while training, and its size there
    if "bytes_per_cell" in info:
        print(f"training data: {info['placement']}, {info['bytes_per_cell']:.0f} bytes per cell")
    elif info:
        print(f"training data: {info['placement']}")
    last = result.history[-1] if result.history else {}
    crit = "val_nll" if args.loss != "rmse" else "val_rmse"
    best_h = min(result.history, key=lambda h: h[crit], default={})
    nll = f", val NLL {best_h['val_nll']:.4f}" if "val_nll" in best_h else ""
    print(
        f"saved {out} (epochs {len(result.history)}, best val RMSE {best_h.get('val_rmse', float('nan')):.4f}"
        f"{nll}, last loss {last.get('loss', float('nan')):.4f})"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from inrscrecon.data.io import read_coords
    from inrscrecon.field.model import INRField
    from inrscrecon.query.predict_stream import predict_to_file, query_obs

    model = INRField.load(args.model, device=args.device)
    xyz, ids = read_coords(args.coords)
    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None
    obs = query_obs(args.coords)  # the query's own columns are kept in the output
    level = uncertainty_level(args)  # --uncertainty: interval layers beside X
    predict_to_file(model, xyz, args.out, genes, ids, progress=True, obs=obs, level=level)
    print(f"wrote {args.out}: {len(xyz)} points × {len(genes) if genes else model.cfg.n_genes} genes")
    return 0


def _impute(args: argparse.Namespace) -> int:
    from inrscrecon.data.io import write_h5ad
    from inrscrecon.field.model import INRField
    from inrscrecon.query.impute import impute_sections

    model = INRField.load(args.model, device=args.device)
    sections = _load_stack(args, [])
    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None
    level = uncertainty_level(args)  # --uncertainty: interval layers beside X
    if level is not None:
        from inrscrecon.query.predict import interval_setup

        interval_setup(model, genes, level)  # a model that cannot give intervals fails before reading
    out = impute_sections(model, sections, genes, args.spacing, args.z_key, args.spatial_key, level=level)
    write_h5ad(out, args.out)
    print(f"wrote {args.out}: {out.n_obs} spots × {out.n_vars} genes")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from inrscrecon.bench import format_rows, run_bench

    print(f"train step, B={args.batch}, W={args.width}, M={args.genes}, device {args.device}")
    print(format_rows(run_bench(args.device, args.batch, args.width, args.genes)))
    return 0


def add_units_flag(p: argparse.ArgumentParser) -> None:
    """``--microns-per-unit``: µm per coordinate unit (every command that reads sections)."""
    p.add_argument(
        "--microns-per-unit",
        type=positive_float,
        help="µm per coordinate unit (e.g. 0.57 for Visium full-resolution pixels); overrides "
        "uns['microns_per_pixel']",
    )


def add_input_flag(p: argparse.ArgumentParser) -> None:
    """``--input``: what X holds (every command that reads expression from sections)."""
    p.add_argument(
        "--input",
        choices=["auto", "counts", "normalized", "lognorm"],
        default="auto",
        help="what X holds: counts (non-negative integers; else layers['counts'] or .raw), normalized "
        "(library-size normalised; log1p applied), lognorm (already log1p-normalised; used as is), or auto "
        "(default: uns['X_kind'], else integer X as counts, else the kept counts, else log-normalised with a warning)",
    )


def _add_stack_flags(p: argparse.ArgumentParser) -> None:
    """z placement, coordinate key and units: shared by fit and impute."""
    z = p.add_mutually_exclusive_group()
    z.add_argument(
        "--spacing", type=positive_float, help="µm between consecutive sections (z = index × spacing)"
    )
    z.add_argument("--z-key", help="z (µm) per section from uns[KEY] or per cell from obs[KEY]")
    p.add_argument("--spatial-key", default="spatial", help="obsm key of the coordinates (default: spatial)")
    add_units_flag(p)


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="fit the field to sections (h5ad files, or one aligned h5ad)")
    p.add_argument("sections", nargs="+", help="section .h5ad files (raw counts in X, coordinates in obsm)")
    p.add_argument("--out", required=True, help="model file to write (.safetensors)")
    _add_stack_flags(p)
    add_input_flag(p)
    p.add_argument(
        "--holdout",
        action="append",
        metavar="SECTION",
        help="leave this section out of training (repeatable or comma-separated; recorded in the model)",
    )
    p.add_argument(
        "--genes", type=positive_int, default=5000, help="top-M variable shared genes (default 5000)"
    )
    p.add_argument(
        "--hvg",
        choices=["pooled", "batch"],
        default="pooled",
        help="gene selection: variance pooled over sections (default), or per section and combined "
        "(Seurat v3 rule, scanpy's seurat_v3 with batch_key; in-memory sections only)",
    )
    p.add_argument("--epochs", type=positive_int, default=60)
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="rows per step (default: 512 on CPU; on CUDA up to 32768, keeping >= 32 steps per epoch)",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="Adam rate (default: 2e-3; on CUDA scaled to the batch)",
    )
    p.add_argument("--width", type=positive_int, default=256)
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--encoding", choices=["fourier", "gaussian", "hashgrid"], default="fourier")
    p.add_argument(
        "--bands",
        type=_bands,
        default="auto",
        help="Fourier bands L, or auto (default): try L = 2 and 4 and keep the lower validation RMSE "
        "(high L fits spot noise; see benchmarks/results)",
    )
    p.add_argument(
        "--sigma", type=positive_float, default=1.0, help="scale of Gaussian random Fourier features"
    )
    p.add_argument(
        "--z-stretch",
        type=positive_float,
        default=1.0,
        help="multiply normalised z by this (x, y unchanged): gives z more of the encoding's bandwidth on a "
        "flat stack; 1 = isotropic (docs/coordinates.md)",
    )
    p.add_argument(
        "--section-codes",
        type=count,
        default=0,
        metavar="D",
        help="per-section appearance codes of width D (0 = off) absorbing batch effects between sections; "
        "a held-out section gets its neighbours' codes interpolated in z",
    )
    p.add_argument(
        "--head-rank",
        type=count,
        default=0,
        metavar="R",
        help="low-rank gene head: features → R → genes, tying the genes to R shared spatial factors "
        "(0 = a full head, default); helped on the small breast-cancer stack, not on DLPFC (benchmarks/results)",
    )
    p.add_argument(
        "--loss",
        choices=["rmse", "poisson", "nb"],
        default="rmse",
        help="data term: rmse (log1p-normalised expression, default), poisson or nb (negative binomial with "
        "gene-wise dispersion): raw counts with the library size as offset; needs raw counts in the input. "
        "Predictions stay log1p-normalised; early stopping and --bands auto use the validation NLL",
    )
    p.add_argument(
        "--lambda-rc",
        type=non_negative_float,
        default=0.0,
        help="weight of representation consistency (default 0 = off; the paper's full loss: 0.1)",
    )
    p.add_argument(
        "--lambda-kl",
        type=non_negative_float,
        default=0.0,
        help="weight of the KL term (default 0 = off; paper: 1.0)",
    )
    p.add_argument("--seed", type=count, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, … (checked before any work)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "triton", "cuda"],
        help="kernels for encode+trunk and head+loss; auto = fused on CUDA when available, else torch",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="head matmul dtype: auto = bf16 inputs with fp32 accumulation on CUDA, fp32 on CPU",
    )
    p.add_argument("--checkpoint", help="checkpoint path (default: OUT.ckpt)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint (an error when there is none); a finished fit with the same "
        "settings and data is left as it is; a changed setting is refused by name",
    )
    p.add_argument(
        "--resume-or-start", action="store_true", help="like --resume, but start afresh without a checkpoint"
    )
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the checkpoints of the --bands auto candidates (removed once the model is saved)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--stream",
        action="store_true",
        help="read X from disk in CSR chunks (backed .h5ad / AnnData .zarr) instead of loading it",
    )
    p.add_argument("--chunk-rows", type=positive_int, default=16384, help="rows per read with --stream")
    p.add_argument("--window", type=positive_int, default=4, help="chunks shuffled together with --stream")
    p.set_defaults(func=_fit)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand (builds without importing torch)."""
    parser = Parser(prog="inrscrecon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="synthetic stack → fit → predict a held-out section, beside baselines")
    p.add_argument("--out", default="demo_out", help="output folder (metrics.json, PNGs)")
    p.add_argument("--seed", type=count, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_demo)
    p = sub.add_parser(
        "synth", help="write a synthetic serial-section stack (one h5ad per section + truth.json)"
    )
    p.add_argument("--sections", type=positive_int, default=6)
    p.add_argument("--cells", type=positive_int, default=1500, help="cells (spots) per section")
    p.add_argument("--genes", type=positive_int, default=500)
    p.add_argument("--spacing", type=positive_float, default=40.0, help="µm between sections")
    p.add_argument("--grid", choices=["hex", "square", "random"], default="hex")
    p.add_argument(
        "--flip-prob", type=probability, default=0.0, help="probability that a section lands flipped"
    )
    p.add_argument("--seed", type=count, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_synth)
    _add_fit(sub)
    p = sub.add_parser("predict", help="predict expression at coordinates with a fitted model")
    p.add_argument("model", help="model file written by `inrscrecon fit`")
    p.add_argument(
        "coords", help="coordinates (µm): .csv/.tsv with x,y,z, .npy [N,3], or .h5ad (obsm['spatial_3d'])"
    )
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--genes", help="comma-separated gene names (default: all)")
    p.add_argument("--device", default="cpu")
    add_uncertainty_flags(p, "layers['lower_90'] / layers['upper_90'] at the training median library size")
    p.set_defaults(func=_predict)
    p = sub.add_parser("impute", help="impute (denoise/complete) expression at every spot of sections")
    p.add_argument("model", help="model file written by `inrscrecon fit`")
    p.add_argument(
        "sections", nargs="+", help="section .h5ad files (or one aligned h5ad with obsm['spatial_3d'])"
    )
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--genes", help="comma-separated gene names (default: all)")
    _add_stack_flags(p)
    p.add_argument("--device", default="cpu")
    add_uncertainty_flags(p, "layers['lower_90'] / layers['upper_90'] given each spot's total counts")
    p.set_defaults(func=_impute)
    p = sub.add_parser("bench", help="quick train-step benchmark of each available backend on a device")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, …")
    p.add_argument("--batch", type=positive_int, default=4096)
    p.add_argument("--width", type=positive_int, default=256)
    p.add_argument("--genes", type=positive_int, default=5000)
    p.set_defaults(func=_bench)
    for register in _optional_commands():
        register(sub)
    return parser


STAGE_COMMANDS = (
    "inrscrecon.align.command",
    "inrscrecon.evaluate.command",
    "inrscrecon.query.render_command",
)


def _optional_commands() -> list[Callable]:
    """Subcommands defined next to their stage: each module has ``add_parser(sub)`` (returning the parser)
    and ``run(args) -> int``. These modules import their heavy dependencies inside ``run``."""
    import importlib

    found = []
    for name in STAGE_COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue

        def register(sub, mod=mod) -> None:
            p = mod.add_parser(sub)
            if p is not None and p.get_default("func") is None:
                p.set_defaults(func=mod.run)

        found.append(register)
    return found


# -- checks before any work ------------------------------------------------------------------------------------

#: Output paths of each command: (attribute, is a folder). Checked (not an existing folder where a file is
#: meant; the folder above writable) before the command starts.
OUTPUTS: dict[str, tuple[tuple[str, bool], ...]] = {
    "demo": (("out", True),),
    "synth": (("out", True),),
    "fit": (("out", False), ("checkpoint", False)),
    "predict": (("out", False),),
    "impute": (("out", False),),
    "align": (("out", False), ("transforms", False), ("matches", False), ("plots", True)),
    "render": (("out", True),),
    "evaluate": (("out", True),),
}


def check_device(text: str) -> str:
    """The device string if torch can use it here; InputError naming it otherwise. ``auto`` → cuda or cpu."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {text!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {text!r}: no CUDA GPU is available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {text!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"--device {text!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise InputError(f"--device {text!r}: unsupported device type {dev.type!r}; use cpu or cuda")
    return text


def preflight(args: argparse.Namespace) -> None:
    """Everything that can be checked before work starts: the device, and each output path."""
    from inrscrecon.data.io import check_writable

    if getattr(args, "device", None) is not None:
        args.device = check_device(args.device)
    for attr, is_dir in OUTPUTS.get(args.command, ()):
        value = getattr(args, attr, None)
        if value is not None:
            check_writable(value, directory=is_dir)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings raised while a command runs are printed as one line ``inrscrecon: warning: …``."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"inrscrecon: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, 130 / 128+N when interrupted by a signal)."""
    args = build_parser().parse_args(argv)
    from inrscrecon.data import atomic as io

    io.forget_created()
    io.install_cleanup()
    try:
        with _one_line_warnings():
            preflight(args)
            return int(args.func(args) or 0)
    except InputError as exc:
        io.remove_pending()
        io.discard_created()
        print(f"inrscrecon: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        io.remove_pending()
        io.discard_created()
        print("inrscrecon: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except io.Terminated as exc:
        io.remove_pending()
        io.discard_created()
        print("inrscrecon: terminated; no partial output was kept", file=sys.stderr)
        return int(exc.code or 143)


if __name__ == "__main__":
    raise SystemExit(main())
