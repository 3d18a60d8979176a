"""Streaming fit from disk: one epoch over 100k, 300k and 1M synthetic cells × 5000 genes (≈ 5 % non-zeros).

    python benchmarks/bench_stream_fit.py generate --out /tmp/inrscrecon_bench/stack   # once, ~15 min, 1 core
    python benchmarks/bench_stream_fit.py run --data /tmp/inrscrecon_bench/stack --cli  # each N in a fresh process

``generate`` writes 10 sections of ~100k cells (one h5ad each, sampled 2000 rows at a time, never more than one
section in memory). ``run`` fits one epoch on the first 1, 3 and 10 sections, each in its own subprocess so
that peak RSS (``ru_maxrss`` of that process) is per N, and prints cells/s and peak RSS: of the training
(``peak_rss_mb``) and once the count calibration ``fit`` runs after training is done as well
(``peak_rss_with_calibration_mb``, ``calibration_s``). The fit uses the
CLI's defaults (batch 512, RMSE loss, 10 % validation cells, ``--bands auto`` = two fits); ``run --cli`` also
runs the command users run, ``inrscrecon fit FILES --stream --epochs 1`` with the same settings, in a
subprocess and reports its peak RSS beside the in-process one (``cli_peak_rss_mb``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def generate(out: Path, sections: int, cells: int, genes: int, library: float) -> None:
    import numpy as np

    from inrscrecon.data.io import write_h5ad
    from inrscrecon.data.synthetic import SynthConfig, iter_sections

    out.mkdir(parents=True, exist_ok=True)
    cfg = SynthConfig(n_sections=sections, cells_per_section=cells, n_genes=genes, library_size=library,
                      spacing=20.0, seed=0)  # fmt: skip
    t0 = time.time()
    total = nnz = 0
    for adata, rec in iter_sections(cfg):
        adata.obsm["spatial_3d"] = np.column_stack([rec["xy"], np.full(adata.n_obs, rec["z"])])
        write_h5ad(adata, out / f"{rec['name']}.h5ad")
        total += adata.n_obs
        nnz += adata.X.nnz
        print(f"{rec['name']}: {adata.n_obs} cells, nnz {adata.X.nnz / adata.n_obs / genes:.3%}, "
              f"{time.time() - t0:.0f} s", flush=True)  # fmt: skip
    (out / "meta.json").write_text(json.dumps({"cells": total, "genes": genes, "nnz": nnz}))
    print(
        f"wrote {total} cells × {genes} genes, {nnz / total / genes:.2%} non-zeros, in {time.time() - t0:.0f} s"
    )


LAMBDAS = {"rmse": (0.0, 0.0), "no_rc": (0.0, 1.0), "full": (0.1, 1.0)}  # loss preset → CLI --lambda-rc/-kl


def one(files: list[str], a: argparse.Namespace) -> dict:
    """Fit one epoch from ``files`` in this process, with the CLI's defaults; returns timings and peak RSS."""
    import psutil

    from inrscrecon.data.streaming import open_stack
    from inrscrecon.field.encoding import EncodingConfig
    from inrscrecon.field.losses import LossConfig
    from inrscrecon.train.fit import TrainConfig, fit
    from inrscrecon.train.select import select_encoding

    proc = psutil.Process()
    t0 = time.time()
    table = open_stack(files, n_genes=5000, spatial_key="spatial_3d", chunk_rows=a.chunk_rows, window=a.window,
                       progress=False)  # fmt: skip
    t_stats = time.time() - t0
    rss_open = proc.memory_info().rss
    tc = TrainConfig(epochs=1, batch_size=a.batch_size, seed=0, progress=False)
    n_train = table.n_cells - round(table.n_cells * tc.val_fraction)
    loss = LossConfig.preset(a.loss)
    t1 = time.time()
    if a.bands == "auto":
        res = select_encoding(table, None, a.width, a.layers, loss, tc).result
    else:
        res = fit(table, EncodingConfig(n_bands=int(a.bands)), a.width, a.layers, loss, tc)
    t_fit = time.time() - t1
    peak_fit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # what `fit` runs after training: the count calibration on (up to 2000 of) the validation cells
    from inrscrecon.query.uncertainty import calibration_record
    from inrscrecon.train.fit import _split

    t2 = time.time()
    calibration_record(res.model, table, _split(table.n_cells, tc.val_fraction, tc.seed)[1], tc.seed)
    t_cal = time.time() - t2
    return {
        "cells": table.n_cells, "genes": len(table.genes), "chunk_rows": table.chunk_rows,
        "stats_pass_s": round(t_stats, 1), "fit_s": round(t_fit, 1),
        "train_cells_per_s": round(n_train * (2 if a.bands == "auto" else 1) / t_fit, 1),
        "rss_after_open_mb": round(rss_open / 2**20),
        "peak_rss_mb": round(peak_fit), "calibration_s": round(t_cal, 1),
        "peak_rss_with_calibration_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "loss": round(res.history[-1]["loss"], 4), "val_rmse": round(res.history[-1]["val_rmse"], 4),
        "chunk_reads": table.stats["chunk_reads"], "row_reads": table.stats["row_reads"],
    }  # fmt: skip


def _settings(a: argparse.Namespace) -> list[str]:
    return ["--batch-size", str(a.batch_size), "--window", str(a.window), "--chunk-rows", str(a.chunk_rows),
            "--width", str(a.width), "--layers", str(a.layers), "--bands", a.bands]  # fmt: skip


def _peak_of(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run ``cmd``; (exit status, its own peak RSS in MiB from wait4, wall seconds, output tail)."""
    import os
    import tempfile

    with tempfile.TemporaryFile("w+") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        return proc.returncode, usage.ru_maxrss / 1024, wall, log.read()[-3000:]


def cli(files: list[str], a: argparse.Namespace, out: Path) -> dict:
    """The command users run, ``inrscrecon fit FILES --stream --epochs 1``, in a subprocess: its peak RSS."""
    lrc, lkl = LAMBDAS[a.loss]
    cmd = ["inrscrecon", "fit", *files, "--stream", "--epochs", "1", "--spatial-key", "spatial_3d", "--quiet",
           "--lambda-rc", str(lrc), "--lambda-kl", str(lkl), *_settings(a), "--out", str(out)]  # fmt: skip
    rc, peak, wall, tail = _peak_of(cmd)
    if rc:
        print(tail)
        raise SystemExit(rc)
    return {"cli_peak_rss_mb": round(peak), "cli_wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--sections", type=int, default=10)
    g.add_argument("--cells", type=int, default=100_000)
    g.add_argument("--genes", type=int, default=5000)
    g.add_argument("--library", type=float, default=270.0, help="mean library size (270 → ≈ 5 %% non-zeros)")
    r = sub.add_parser("run")
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--sections", default="1,3,10", help="numbers of sections to fit on, one process each")
    r.add_argument("--cli", action="store_true", help="also run `inrscrecon fit --stream` on the same files")
    o = sub.add_parser("one")
    o.add_argument("files", nargs="+")
    for p in (r, o):
        p.add_argument("--batch-size", type=int, default=512)
        p.add_argument("--loss", default="rmse", choices=sorted(LAMBDAS))
        p.add_argument("--window", type=int, default=4)
        p.add_argument("--chunk-rows", type=int, default=16384)
        p.add_argument("--width", type=int, default=256)
        p.add_argument("--layers", type=int, default=4)
        p.add_argument("--bands", default="auto", help="Fourier bands L, or auto (two fits, as the CLI)")
    args = ap.parse_args()
    if args.cmd == "generate":
        generate(args.out, args.sections, args.cells, args.genes, args.library)
    elif args.cmd == "one":
        print(json.dumps(one(args.files, args)))
    else:
        import os
        import tempfile

        files = sorted(str(p) for p in args.data.glob("section_*.h5ad"))
        load = os.getloadavg()[0]
        print(f"# bench_stream_fit: batch {args.batch_size}, loss {args.loss}, window {args.window} chunks "
              f"of ≤ {args.chunk_rows} rows, {args.width}×{args.layers} trunk, bands {args.bands}; "
              f"{os.cpu_count()} CPUs, load {load:.1f}", flush=True)  # fmt: skip
        for k in (int(x) for x in args.sections.split(",")):
            cmd = [sys.executable, __file__, "one", *files[:k], "--loss", args.loss, *_settings(args)]
            rc, peak, _, tail = _peak_of(cmd)
            if rc:
                print(tail)
                raise SystemExit(rc)
            row = json.loads(tail.strip().splitlines()[-1])
            if args.cli:
                with tempfile.TemporaryDirectory() as tmp:
                    row.update(cli(files[:k], args, Path(tmp) / "model.safetensors"))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
