"""Hash-grid encoding: the lookup's forward + backward (torch reference vs the Triton kernels) and ``fit``'s
wall time per epoch with the hash grid beside the Fourier encoding on the same synthetic stack.

* ``lookup`` — ``HashGrid`` (default geometry, or ``--levels`` / ``--log2-table-size`` / ``--max-resolution``)
  on B random points: forward, then forward + backward of the table (best of ``--repeats``, synchronised);
  ms, points/s and the table-gradient bytes; on CUDA also the reference under ``torch.compile`` (on CPU with
  ``--compile``). Triton needs CUDA: on CPU only the torch rows are timed and the GPU numbers are reported
  as pending.
* ``fit`` — ``inrscrecon.train.fit.fit`` on a synthetic stack (``--sections`` × ``--cells`` cells,
  ``--genes`` genes), ``--epochs`` epochs at batch ``--batch``, hash grid vs Fourier L = 4 with the same
  trunk, seed and batches; wall per epoch and the best validation RMSE.

    OMP_NUM_THREADS=1 python benchmarks/bench_hashgrid.py                    # CPU: lookup B=8192, fit 4×3500×500
    python benchmarks/bench_hashgrid.py --device cuda --points 65536 --skip-fit
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import time

import torch

from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.hashgrid import HashGrid


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (Triton compile, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_lookup(args: argparse.Namespace) -> list[dict]:
    dev = torch.device(args.device)
    cfg = EncodingConfig(kind="hashgrid")
    grid = HashGrid(
        args.levels or cfg.levels,
        cfg.features_per_level,
        args.log2_table_size or cfg.log2_table_size,
        cfg.base_resolution,
        args.max_resolution or cfg.max_resolution,
    ).to(dev)
    pts = (torch.rand(args.points, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dev)
    impls = ["torch"] + (["torch-compile", "triton"] if dev.type == "cuda" else [])
    if args.compile and dev.type != "cuda":
        impls.append("torch-compile")
    rows = []
    for impl in impls:
        grid.impl = "torch" if impl == "torch-compile" else impl
        enc = torch.compile(grid) if impl == "torch-compile" else grid

        def fwd(enc=enc) -> None:
            with torch.no_grad():
                enc(pts)

        def fwd_bwd(enc=enc) -> None:
            grid.table.grad = None
            enc(pts).square().sum().backward()

        try:
            t_f, t_fb = _best(fwd, dev, args.repeats), _best(fwd_bwd, dev, args.repeats)
        except Exception as err:  # e.g. no C++ compiler for inductor on this machine
            print(f"{impl}: not timed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
            continue
        rows.append(
            dict(
                op="hashgrid_lookup",
                impl=impl,
                device=str(dev),
                B=args.points,
                levels=grid.n_levels,
                table_rows=grid.levels.n_rows,
                fwd_ms=round(t_f * 1e3, 3),
                fwd_bwd_ms=round(t_fb * 1e3, 3),
                points_per_s_fwd_bwd=round(args.points / t_fb),
                table_grad_mb=round(grid.table.numel() * 4 / 2**20, 2),
            )
        )
    if dev.type != "cuda":
        print("triton lookup: GPU numbers pending (needs CUDA; CPU runs the torch reference only)")
    return rows


def bench_fit(args: argparse.Namespace) -> list[dict]:
    from inrscrecon.data.preprocess import select_genes
    from inrscrecon.data.stack import build_cell_table
    from inrscrecon.data.synthetic import SynthConfig, make_sections
    from inrscrecon.field.losses import LossConfig
    from inrscrecon.train.fit import TrainConfig, fit

    sections, truth = make_sections(
        SynthConfig(n_sections=args.sections, cells_per_section=args.cells, n_genes=args.genes, seed=0)
    )
    for k, s in enumerate(sections):
        s.obsm["spatial_3d"] = truth.xyz(k)
    table = build_cell_table(sections, select_genes(sections, args.genes))
    rows = []
    for name, enc in (
        ("hashgrid", EncodingConfig(kind="hashgrid")),
        ("fourier L=4", EncodingConfig(n_bands=4)),
    ):
        tc = TrainConfig(
            epochs=args.epochs, batch_size=args.batch, progress=False, seed=0, device=args.device, patience=99
        )
        t0 = time.perf_counter()
        res = fit(table, enc, args.width, args.layers, LossConfig.preset("no_rc"), tc)
        wall = time.perf_counter() - t0
        n_train = int(round(table.n_cells * (1 - tc.val_fraction)))
        rows.append(
            dict(
                op="fit",
                encoding=name,
                device=args.device,
                cells=table.n_cells,
                genes=len(table.genes),
                batch=args.batch,
                epochs=len(res.history),
                steps_per_epoch=-(-n_train // args.batch),
                s_per_epoch=round(wall / max(len(res.history), 1), 3),
                best_val_rmse=round(min(h["val_rmse"] for h in res.history), 4),
                first_val_rmse=round(res.history[0]["val_rmse"], 4),
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--points", type=int, default=None, help="lookup batch (default 65536 GPU, 8192 CPU)")
    ap.add_argument("--levels", type=int, default=0)
    ap.add_argument("--log2-table-size", type=int, default=0)
    ap.add_argument("--max-resolution", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the reference on CPU")
    ap.add_argument("--skip-fit", action="store_true")
    ap.add_argument("--sections", type=int, default=4)
    ap.add_argument("--cells", type=int, default=3500, help="cells per section")
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    if args.points is None:
        args.points = 65536 if args.device.startswith("cuda") else 8192
    rows = bench_lookup(args)
    if not args.skip_fit:
        rows += bench_fit(args)
    stamp = dict(date=_dt.date.today().isoformat(), threads=torch.get_num_threads())
    for r in rows:
        print(json.dumps(r | stamp))


if __name__ == "__main__":
    main()
