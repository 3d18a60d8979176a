"""Streaming fit from disk: one epoch over 100k, 300k and 1M synthetic cells × 5000 genes (≈ 5 % non-zeros).

    python benchmarks/bench_stream_fit.py generate --out /tmp/inrscrecon_bench/stack   # once, ~15 min, 1 core
    python benchmarks/bench_stream_fit.py run --data /tmp/inrscrecon_bench/stack        # each N in a fresh process

``generate`` writes 10 sections of ~100k cells (one h5ad each, sampled 2000 rows at a time, never more than one
section in memory). ``run`` fits one epoch on the first 1, 3 and 10 sections, each in its own subprocess so
that peak RSS (``ru_maxrss`` of that process) is per N, and prints cells/s and peak RSS.
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


def one(files: list[str], batch: int, loss: str, window: int, chunk_rows: int) -> dict:
    """Fit one epoch from ``files`` in this process; returns timings and peak RSS."""
    import psutil

    from inrscrecon.data.streaming import open_stack
    from inrscrecon.field.encoding import EncodingConfig
    from inrscrecon.field.losses import LossConfig
    from inrscrecon.train.fit import TrainConfig, fit

    proc = psutil.Process()
    t0 = time.time()
    table = open_stack(files, n_genes=5000, spatial_key="spatial_3d", chunk_rows=chunk_rows, window=window,
                       progress=False)  # fmt: skip
    t_stats = time.time() - t0
    rss_open = proc.memory_info().rss
    n_train = table.n_cells - round(table.n_cells * 0.05)
    tc = TrainConfig(epochs=1, batch_size=batch, seed=0, progress=False, val_fraction=0.05)
    t1 = time.time()
    res = fit(table, EncodingConfig(n_bands=4), 256, 4, LossConfig.preset(loss), tc)
    t_fit = time.time() - t1
    return {
        "cells": table.n_cells, "genes": len(table.genes), "stats_pass_s": round(t_stats, 1),
        "epoch_s": round(t_fit, 1), "train_cells_per_s": round(n_train / t_fit, 1),
        "rss_after_open_mb": round(rss_open / 2**20), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "loss": round(res.history[-1]["loss"], 4), "val_rmse": round(res.history[-1]["val_rmse"], 4),
        "chunk_reads": table.stats["chunk_reads"], "row_reads": table.stats["row_reads"],
    }  # fmt: skip


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
    r.add_argument("--batch-size", type=int, default=1024)
    r.add_argument("--loss", default="no_rc", choices=["full", "no_rc", "rmse"])
    r.add_argument("--window", type=int, default=4)
    r.add_argument("--chunk-rows", type=int, default=16384)
    o = sub.add_parser("one")
    o.add_argument("files", nargs="+")
    o.add_argument("--batch-size", type=int, default=1024)
    o.add_argument("--loss", default="no_rc")
    o.add_argument("--window", type=int, default=4)
    o.add_argument("--chunk-rows", type=int, default=16384)
    args = ap.parse_args()
    if args.cmd == "generate":
        generate(args.out, args.sections, args.cells, args.genes, args.library)
    elif args.cmd == "one":
        print(json.dumps(one(args.files, args.batch_size, args.loss, args.window, args.chunk_rows)))
    else:
        files = sorted(str(p) for p in args.data.glob("section_*.h5ad"))
        print(f"# bench_stream_fit: batch {args.batch_size}, loss {args.loss}, window {args.window} chunks "
              f"of {args.chunk_rows} rows, 256×4 trunk, 4 bands")  # fmt: skip
        for k in (int(x) for x in args.sections.split(",")):
            cmd = [sys.executable, __file__, "one", *files[:k], "--batch-size", str(args.batch_size), "--loss",
                   args.loss, "--window", str(args.window), "--chunk-rows", str(args.chunk_rows)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                print(res.stderr[-3000:])
                raise SystemExit(res.returncode)
            print(res.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
