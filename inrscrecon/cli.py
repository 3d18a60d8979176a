"""Command line: ``inrscrecon demo | synth | align | fit | predict | impute | render | evaluate | bench``.

Bad input ends with one line ``inrscrecon: error: …`` naming the file, field and value, exit status 2,
and no partial output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from inrscrecon.errors import InputError


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
    from inrscrecon.data.io import check_writable, write_h5ad
    from inrscrecon.data.synthetic import SynthConfig, iter_sections

    out = Path(args.out)
    check_writable(out / "truth.json")
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
    from tqdm.auto import tqdm

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
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    print(f"wrote {len(records)} sections and truth.json to {out}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from inrscrecon.data.io import check_writable, read_sections
    from inrscrecon.data.preprocess import select_genes
    from inrscrecon.data.stack import build_cell_table
    from inrscrecon.field.encoding import EncodingConfig
    from inrscrecon.field.losses import LossConfig
    from inrscrecon.train.fit import Table, TrainConfig, fit

    out = check_writable(args.out)
    # -- issue 7 (scale): torchrun / DDP process group and --stream (backed sections) ------------------------
    from inrscrecon.train import distributed

    di = distributed.init_from_env(args.device)  # no-op unless launched by torchrun with WORLD_SIZE > 1
    table: Table
    if args.stream:
        from inrscrecon.data.streaming import open_stack

        table = open_stack(args.sections, n_genes=args.genes, spacing=args.spacing, z_key=args.z_key,
                           spatial_key=args.spatial_key, chunk_rows=args.chunk_rows, window=args.window,
                           progress=not args.quiet and di.main, shard=(di.rank, di.world),
                           allreduce=distributed.allreduce_numpy)  # fmt: skip
        genes = table.genes
    else:  # -- end issue 7 block (continues below: rank-0 save)
        sections = read_sections(args.sections, spatial_key=args.spatial_key)
        genes = select_genes(sections, args.genes)
        table = build_cell_table(
            sections, genes, spacing=args.spacing, z_key=args.z_key, spatial_key=args.spatial_key
        )
    if di.main:
        print(f"{table.n_cells} cells from {len(table.sections())} sections, {len(genes)} genes")
    loss = LossConfig(lambda_rc=args.lambda_rc, lambda_kl=args.lambda_kl)
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
    if args.bands == "auto":  # bandwidth (and stopping epoch) chosen on the validation cells
        from inrscrecon.train.select import describe, select_encoding

        sel = select_encoding(
            table, None, args.width, args.layers, loss, tc,
            checkpoint_for=lambda e: ckpt.with_name(f"{ckpt.stem}.L{e.n_bands}{ckpt.suffix}"),
            resume=args.resume,
        )  # fmt: skip
        result = sel.result
        if di.main:
            scores = ", ".join(f"{c['name']}: {c['val_rmse']:.4f}" for c in sel.candidates)
            print(f"encoding chosen on validation RMSE: {describe(sel.encoding)} ({scores})")
    else:
        enc = EncodingConfig(kind=args.encoding, n_bands=int(args.bands), sigma=args.sigma, seed=args.seed)
        result = fit(table, enc, args.width, args.layers, loss, tc, checkpoint=ckpt, resume=args.resume)
    distributed.barrier()
    if not di.main:  # issue 7: rank 0 alone writes the model and reports
        distributed.cleanup()
        return 0
    result.model.save(out)
    distributed.cleanup()
    last = result.history[-1] if result.history else {}
    print(
        f"saved {out} (epochs {len(result.history)}, best val RMSE {min(h['val_rmse'] for h in result.history):.4f}, "
        f"last loss {last.get('loss', float('nan')):.4f})"
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from inrscrecon.data.io import check_writable
    from inrscrecon.field.model import INRField
    from inrscrecon.query.predict_stream import predict_to_file

    check_writable(args.out)
    model = INRField.load(args.model, device=args.device)
    from inrscrecon.data.io import read_coords

    xyz, ids = read_coords(args.coords)
    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None
    predict_to_file(model, xyz, args.out, genes, ids, progress=True)  # chunk by chunk, renamed when complete
    print(f"wrote {args.out}: {len(xyz)} points × {len(genes) if genes else model.cfg.n_genes} genes")
    return 0


def _impute(args: argparse.Namespace) -> int:
    from inrscrecon.data.io import check_writable, read_sections, write_h5ad
    from inrscrecon.field.model import INRField
    from inrscrecon.query.impute import impute_sections

    check_writable(args.out)
    model = INRField.load(args.model, device=args.device)
    sections = read_sections(args.sections, spatial_key=args.spatial_key)
    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None
    out = impute_sections(model, sections, genes, args.spacing, args.z_key, args.spatial_key)
    write_h5ad(out, args.out)
    print(f"wrote {args.out}: {out.n_obs} spots × {out.n_vars} genes")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from inrscrecon.bench import format_rows, run_bench

    print(f"train step, B={args.batch}, W={args.width}, M={args.genes}, device {args.device}")
    print(format_rows(run_bench(args.device, args.batch, args.width, args.genes)))
    return 0


def _bands(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) <= 16):
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer 0..16, got {text!r}")
    return text


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="fit the field to sections (h5ad files, or one aligned h5ad)")
    p.add_argument("sections", nargs="+", help="section .h5ad files (raw counts in X, coordinates in obsm)")
    p.add_argument("--out", required=True, help="model file to write (.safetensors)")
    z = p.add_mutually_exclusive_group()
    z.add_argument("--spacing", type=float, help="µm between consecutive sections (z = index × spacing)")
    z.add_argument("--z-key", help="z per section from uns[KEY] or per cell from obs[KEY]")
    p.add_argument("--spatial-key", default="spatial", help="obsm key of the coordinates (default: spatial)")
    p.add_argument("--genes", type=int, default=5000, help="top-M variable shared genes (default 5000)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--encoding", choices=["fourier", "gaussian"], default="fourier")
    p.add_argument(
        "--bands",
        type=_bands,
        default="auto",
        help="Fourier bands L, or auto (default): try L = 2 and 4 and keep the lower validation RMSE "
        "(high L fits spot noise; see benchmarks/results)",
    )
    p.add_argument("--sigma", type=float, default=1.0, help="scale of Gaussian random Fourier features")
    p.add_argument(
        "--lambda-rc",
        type=float,
        default=0.0,
        help="weight of representation consistency (default 0 = off; the paper's full loss: 0.1)",
    )
    p.add_argument(
        "--lambda-kl", type=float, default=0.0, help="weight of the KL term (default 0 = off; paper: 1.0)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
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
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # -- issue 7 (scale): streaming from backed files; see docs/scale.md --------------------------------------
    p.add_argument("--stream", action="store_true",
                   help="read X from disk in CSR chunks (backed .h5ad / AnnData .zarr) instead of loading it")  # fmt: skip
    p.add_argument("--chunk-rows", type=int, default=16384, help="rows per read with --stream")
    p.add_argument("--window", type=int, default=4, help="chunks shuffled together with --stream")
    p.set_defaults(func=_fit)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="inrscrecon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="synthetic stack → fit → predict a held-out section, beside baselines")
    p.add_argument("--out", default="demo_out", help="output folder (metrics.json, PNGs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_demo)
    p = sub.add_parser(
        "synth", help="write a synthetic serial-section stack (one h5ad per section + truth.json)"
    )
    p.add_argument("--sections", type=int, default=6)
    p.add_argument("--cells", type=int, default=1500, help="cells (spots) per section")
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--spacing", type=float, default=40.0, help="µm between sections")
    p.add_argument("--grid", choices=["hex", "square", "random"], default="hex")
    p.add_argument("--flip-prob", type=float, default=0.0, help="probability that a section lands flipped")
    p.add_argument("--seed", type=int, default=0)
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
    p.set_defaults(func=_predict)
    p = sub.add_parser("impute", help="impute (denoise/complete) expression at every spot of sections")
    p.add_argument("model", help="model file written by `inrscrecon fit`")
    p.add_argument(
        "sections", nargs="+", help="section .h5ad files (or one aligned h5ad with obsm['spatial_3d'])"
    )
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--genes", help="comma-separated gene names (default: all)")
    z = p.add_mutually_exclusive_group()
    z.add_argument("--spacing", type=float, help="µm between consecutive sections")
    z.add_argument("--z-key", help="z per section from uns[KEY] or per cell from obs[KEY]")
    p.add_argument("--spatial-key", default="spatial")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_impute)
    p = sub.add_parser("bench", help="quick train-step benchmark of each available backend on a device")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--genes", type=int, default=5000)
    p.set_defaults(func=_bench)
    for register in _optional_commands():
        register(sub)
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


STAGE_COMMANDS = (
    "inrscrecon.align.command",
    "inrscrecon.evaluate.command",
    "inrscrecon.query.render_command",
)


def _optional_commands() -> list[Callable]:
    """Subcommands defined next to their stage: each module has ``add_parser(sub)`` (returning the parser)
    and ``run(args) -> int``."""
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


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"inrscrecon: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
