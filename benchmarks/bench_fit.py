"""End-to-end ``fit`` throughput on a synthetic stack, beside bare torch steps of the same network, in one run.

What it times (one process, the same model, seed and batches), for each loss of ``--loss rmse poisson nb``
(default: rmse); every row carries its ``loss``:

* ``fit-device-csr`` — ``inrscrecon.train.fit.fit`` for one epoch on an in-memory stack: the stack placed on
  the device as CSR, per-step gather (+ normalise + log1p for RMSE; raw counts + library offsets for the count
  losses) there, the sparse-target loss, backward, Adam, the validation pass: everything a user's ``fit``
  epoch does (``end_to_end_cells_per_s`` = training cells / wall of the whole call). Its
  ``step_cells_per_s`` is the steady-state rate of the same step without the loop; the per-phase breakdown
  (sample, gather, forward, backward, optimizer; synchronised) is printed.
* ``torch-eager-dense`` — the bare loop: a dense [N, M] target tensor already on the device (log1p-normalised
  for RMSE, raw counts + [N] log offsets for a count loss), rows indexed per step, the dense reference loss
  (``head_loss_reference`` / ``count_head_loss_reference``), backward, ``torch.optim.Adam`` (the CPU target's
  reference).
* ``torch-compile-dense`` — the same dense step compiled whole (``torch.compile(fullgraph=True)``).
* ``fit-device-csr-compiled`` (CUDA, or ``--compile-fit [LOSS ...]``) — ``fit`` with its whole step compiled
  (``compile="on"``; CUDA graphs on CUDA); its end-to-end wall includes the compilation, as a user pays it.

The count losses fit the same network as ``fit`` builds for them (the library-size head; NB's gene-wise log θ).
Losses run one after the other, each with its own dense target (one [N, M] tensor resident at a time); within
a loss every measurement is repeated in ``--rounds`` interleaved rounds and the best kept (a shared machine).
A loss's rows are appended as soon as it is done. ``--defaults-check [H5AD ...]`` instead compares ``fit``
with the CPU defaults and the device defaults.

FLOPs per cell = 3 · 2 · (the network's weight count) (forward + backward, no recomputation); ``pct_of_peak``
is against the bf16 matmul rate measured here (8192² GEMM) on a GPU, null on CPU. Rows (keys ``KEYS``) are
appended to ``benchmarks/results/bench_fit.json``; a markdown table is printed (paste into RESULTS.md).

    python benchmarks/bench_fit.py                                   # CPU: 50k × 5000, batch 2048, RMSE
    python benchmarks/bench_fit.py --loss rmse poisson nb            # CPU: every loss
    python benchmarks/bench_fit.py --device cuda --cells 1000000     # GPU target run (batch: GPU default)
    python benchmarks/bench_fit.py --device cuda --defaults-check ../shared/data/dlpfc_1516*.h5ad
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from inrscrecon.data.device_table import DeviceTable
from inrscrecon.data.stack import CellTable
from inrscrecon.evaluate import cpu_name
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.losses import LIKELIHOODS, LossConfig
from inrscrecon.field.model import FieldConfig, INRField
from inrscrecon.train.fit import (
    CPU_BATCH,
    CPU_LR,
    TrainConfig,
    _split,
    fit,
    library_settings,
    resolved_batch_lr,
)
from inrscrecon.train.objective import PARTS, objective_tensors
from inrscrecon.train.step import TrainStep

RESULTS = Path(__file__).resolve().parent / "results" / "bench_fit.json"
KEYS = ("device", "date", "command", "backend", "batch", "cells", "genes", "end_to_end_cells_per_s",
        "step_cells_per_s", "step_tflops", "pct_of_peak", "loss")  # fmt: skip


def synthetic_table(n: int, m: int, density: float, seed: int = 0, chunk: int = 8192) -> CellTable:
    """n cells × m genes, each entry non-zero with probability ``density`` (0 < density ≤ 1; integer counts
    1 + Poisson(1), so the count losses see raw counts), 4 sections 10 µm apart. The non-zero positions of a
    chunk are drawn by geometric gaps over its flattened [rows, m] grid: the same Bernoulli pattern law as a
    dense random mask, at ~1/density fewer draws."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    rng = np.random.default_rng(seed)
    indptr, indices, data = [np.zeros(1, np.int64)], [], []
    total = 0
    for s in range(0, n, chunk):
        rows = min(chunk, n - s)
        size = rows * m
        mean = size * density
        gaps = [rng.geometric(density, int(mean + 6.0 * math.sqrt(mean) + 16))]
        reach = int(gaps[0].sum())
        while reach <= size:  # rare (6 s.d. of headroom): draw on until the chunk's grid is passed
            gaps.append(rng.geometric(density, max(int(mean) // 8, 16)))
            reach += int(gaps[-1].sum())
        pos = np.cumsum(np.concatenate(gaps)) - 1
        pos = pos[pos < size]
        r, c = pos // m, pos % m
        indices.append(c.astype(np.int32))
        data.append((1 + rng.poisson(1.0, len(c))).astype(np.float32))
        indptr.append(total + np.cumsum(np.bincount(r, minlength=rows)))
        total += len(c)
    csr = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)), shape=(n, m))
    xy = rng.random((n, 2)) * 2000.0
    z = (np.arange(n) * 4 // n) * 10.0
    totals = np.asarray(csr.sum(axis=1), dtype=np.float32).ravel() * 1.25  # genes outside the panel
    return CellTable(np.column_stack([xy, z]), csr, totals, [f"g{i}" for i in range(m)],
                     np.array([f"s{int(v // 10)}" for v in z], dtype=object), np.arange(n).astype(str))  # fmt: skip


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def bf16_peak_tflops(dev: torch.device) -> float | None:
    """Measured bf16 GEMM rate (8192³) on CUDA; None on CPU."""
    if dev.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    _sync(dev)
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def _model(table: CellTable, width: int, layers: int, dev: torch.device, loss: str = "rmse") -> INRField:
    """The network ``fit`` builds for ``loss`` (a count loss: + the library-size head, NB's log θ; the head
    bias at the mean rate), seed 0."""
    count = loss != "rmse"
    train_rows = _split(table.n_cells, 0.1, 0)[0]
    torch.manual_seed(0)
    cfg = FieldConfig(
        len(table.genes),
        EncodingConfig(n_bands=4),
        width,
        layers,
        *FieldConfig.frame_for(table.coords),
        likelihood=loss,
        **(library_settings(table, train_rows) if count else {}),
    )
    model = INRField(cfg)
    if count:
        rows = np.sort(train_rows[:4096])
        tot = np.asarray(table.totals[rows], dtype=np.float64)
        has = tot > 0
        rates = table.raw_targets(rows[has]) * (table.target_sum / tot[has])[:, None]
        with torch.no_grad():
            model.init_count_bias(torch.as_tensor(rates.mean(axis=0)))
    return model.to(dev)


def dense_targets(dt: DeviceTable, chunk: int = 32768) -> torch.Tensor:
    """The resident table as one dense [N, M] fp32 tensor on its device, in the table's mode
    (log1p-normalised, or raw counts): each row chunk gathered and densified there (the values the fit path
    reads), so nothing dense crosses from the host."""
    out = torch.empty((dt.n_cells, dt.n_genes), dtype=torch.float32, device=dt.device)
    for s in range(0, dt.n_cells, chunk):
        e = min(s + chunk, dt.n_cells)
        rows = torch.arange(s, e, device=dt.device)
        out[s:e] = dt.gather(rows, dt.exact_capacity(np.arange(s, e)), "torch").dense(dt.n_genes)
    return out


def flops_per_cell(model: INRField) -> float:
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    return 3 * 2 * float(weights)


def _peak_mem_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # process peak RSS (KB → MB)


def time_steps(step, acc, args_for, n: int, warmup: int, dev: torch.device) -> float:
    """Seconds per step, steady state (one sync at the end)."""
    for i in range(warmup):
        step(acc, i, *args_for(i))
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(n):
        step(acc, warmup + i, *args_for(warmup + i))
    _sync(dev)
    return (time.perf_counter() - t0) / n


def defaults_check(files: list[str], device: str, epochs: int) -> None:
    """Best validation RMSE and wall time of ``fit`` with the CPU defaults (512 rows, 2e-3) and with the
    device defaults (``batch_size=None, lr=None``: the GPU batch and scaled rate on CUDA), same data and seed."""
    from inrscrecon.data.io import read_sections
    from inrscrecon.data.preprocess import select_genes
    from inrscrecon.data.stack import build_cell_table
    from inrscrecon.data.synthetic import SynthConfig, make_sections

    if files:
        sections = read_sections(files)
        what = ", ".join(Path(f).name for f in files)
    else:
        sections, truth = make_sections(
            SynthConfig(n_sections=6, cells_per_section=20000, n_genes=2000, seed=0)
        )
        for k, sec in enumerate(sections):
            sec.obsm["spatial_3d"] = truth.xyz(k)
        what = "synthetic 6 × 20000 cells × 2000 genes"
    table = build_cell_table(sections, select_genes(sections, 5000))
    print(f"defaults check on {what}: {table.n_cells} cells, {len(table.genes)} genes, device {device}")
    best = {}
    for name, bs, lr in (("CPU defaults", CPU_BATCH, CPU_LR), ("device defaults", None, None)):
        tc = TrainConfig(epochs=epochs, batch_size=bs, lr=lr, device=device, progress=False)
        _sync(torch.device(device))
        t0 = time.perf_counter()
        res = fit(table, EncodingConfig(n_bands=2), 256, 4, LossConfig(), tc)
        _sync(torch.device(device))
        wall = time.perf_counter() - t0
        best[name] = min(h["val_rmse"] for h in res.history)
        print(f"| {name} | batch {res.data_info['batch_size']} | lr {res.data_info['lr']:.2e} | "
              f"{len(res.history)} epochs | best val RMSE {best[name]:.5f} | {wall:.1f} s |")  # fmt: skip
    rel = best["device defaults"] / best["CPU defaults"] - 1
    print(f"device defaults vs CPU defaults: {100 * rel:+.2f} % validation RMSE (target: within 1 %)")


def bench_loss(loss: str, table: CellTable, args: argparse.Namespace, ctx: dict) -> list[dict]:
    """Rows (keys ``KEYS``) of every backend for one loss; prints its table, ratio line and notes."""
    dev, batch, peak = ctx["dev"], ctx["batch"], ctx["peak"]
    count = loss != "rmse"
    precision = "auto"
    loss_cfg = LossConfig(likelihood=loss)
    rows: list[dict] = []
    notes: list[str] = []
    gc.collect()  # the previous loss's dense target and steppers
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)

    def row(backend: str, e2e: float, step_rate: float, fpc: float) -> None:
        tflops = step_rate * fpc / 1e12
        rows.append(dict(device=_device_name(dev), date=ctx["date"], command=ctx["command"], backend=backend,
                         batch=batch, cells=args.cells, genes=args.genes, end_to_end_cells_per_s=e2e,
                         step_cells_per_s=step_rate, step_tflops=tflops,
                         pct_of_peak=None if peak is None else 100 * tflops / peak, loss=loss))  # fmt: skip

    small = TrainConfig(epochs=1, batch_size=64, device=args.device, progress=False)
    fit(synthetic_table(300, 20, 0.2, seed=1), EncodingConfig(n_bands=4), 8, 1, loss_cfg, small)  # imports
    tc = TrainConfig(epochs=1, batch_size=batch, lr=None, seed=0, device=args.device, backend=args.backend,
                     precision=precision, progress=False, val_fraction=0.1)  # fmt: skip
    n_train = (int(round(args.cells * 0.9)) // batch) * batch
    n_ep = n_train // batch
    perm = torch.randperm(args.cells, generator=torch.Generator().manual_seed(0)).numpy()
    n_batches = args.cells // batch
    rows_dev = torch.as_tensor(
        np.sort(perm[: n_batches * batch].reshape(n_batches, batch), axis=1), device=dev
    )
    t0 = time.perf_counter()
    dt = DeviceTable(table, dev, raw=count)
    cap = dt.capacity(np.arange(args.cells), batch)
    targets = dense_targets(dt)  # [N, M] dense, on the device (raw counts for a count loss)
    offsets = torch.as_tensor(table.log_offsets(np.arange(args.cells)), device=dev) if count else None  # [N]
    coords = torch.as_tensor(table.coords, dtype=torch.float32, device=dev)
    notes.append(f"placement of the CSR + dense [N, M] targets: {time.perf_counter() - t0:.1f} s")
    backend = args.backend

    gather_impl = "triton" if dev.type == "cuda" and backend != "torch" else "torch"  # as fit picks it

    def make(kind: str):
        model = _model(table, args.width, args.layers, dev, loss)
        compiled = kind in ("torch-compile-dense", "fit-device-csr-compiled")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=compiled and dev.type == "cuda")
        if kind.startswith("fit-device-csr"):

            def loss_fn(r, model=model):
                b = dt.gather(r, cap, gather_impl)
                return objective_tensors(
                    model, model.normalize(b.coords), b, loss_cfg, None, backend, precision
                )

        else:

            def loss_fn(r, model=model):
                x, t = coords[r], targets[r]
                off = None if offsets is None else offsets[r]
                return objective_tensors(
                    model, model.normalize(x), t, loss_cfg, None, "torch", precision, off
                )

        step = TrainStep(loss_fn, opt, 1e-3, 10**6, 0.05, compile=compiled,
                         cuda_graphs=compiled and dev.type == "cuda")  # fmt: skip
        return model, opt, step

    kinds = ["fit-device-csr", "torch-eager-dense"]
    if not args.no_compile:
        kinds += ["torch-compile-dense"] + (
            ["fit-device-csr-compiled"] if loss in ctx["fit_compiled"] else []
        )
    steppers = {}
    for kind in kinds:
        t0 = time.perf_counter()
        steppers[kind] = make(kind)
        acc = torch.zeros(len(PARTS), dtype=torch.float64, device=dev)
        time_steps(steppers[kind][2], acc, lambda i: (rows_dev[i % n_batches],), 1, 2, dev)
        notes.append(f"{kind}: warm-up (incl. compile) {time.perf_counter() - t0:.1f} s")
    step_sec = {k: math.inf for k in kinds}
    epoch_sec = {k: math.inf for k in kinds}
    info: dict = {}
    # Every measurement is repeated in --rounds interleaved rounds and the best is kept: on a shared machine
    # the least disturbed run is the closest to the machine's rate, and interleaving exposes each variant to
    # the same background load.
    for _ in range(args.rounds):
        for kind in kinds:
            acc = torch.zeros(len(PARTS), dtype=torch.float64, device=dev)
            sec = time_steps(steppers[kind][2], acc, lambda i: (rows_dev[i % n_batches],), args.steps, 0, dev)
            step_sec[kind] = min(step_sec[kind], sec)
            _sync(dev)
            t0 = time.perf_counter()
            if kind.startswith("fit-device-csr"):  # the whole fit call: placement, setup, epoch, validation
                run_tc = replace(tc, compile="on" if kind.endswith("compiled") else "off")
                res = fit(table, EncodingConfig(n_bands=4), args.width, args.layers, loss_cfg, run_tc)
                info = res.data_info if kind == "fit-device-csr" else info
            else:  # the bare loop's epoch
                for i in range(n_ep):
                    steppers[kind][2](acc, i, rows_dev[i % n_batches])
            _sync(dev)
            epoch_sec[kind] = min(epoch_sec[kind], time.perf_counter() - t0)
    fpc = flops_per_cell(steppers[kinds[0]][0])
    for kind in kinds:
        row(kind, n_train / epoch_sec[kind], batch / step_sec[kind], fpc)
    fit_e2e = n_train / epoch_sec["fit-device-csr"]
    notes.append(f"fit: {epoch_sec['fit-device-csr']:.2f} s (best of {args.rounds}) for the whole call: one epoch "
                 f"of {n_train} training cells + validation of {args.cells - int(round(args.cells * 0.9))}; "
                 f"{info.get('placement')}, {info.get('bytes_per_cell', float('nan')):.0f} B/cell on device, "
                 f"compiled={info.get('compiled')}, peak mem {_peak_mem_mb(dev):.0f} MB")  # fmt: skip
    model, opt, _ = steppers["fit-device-csr"]
    phases = {k: 0.0 for k in ("sample", "gather", "forward", "backward", "optimizer")}
    for i in range(3):  # eager phases of the fit step, synchronised after each
        marks = [time.perf_counter()]
        r = rows_dev[i % n_batches]
        _sync(dev)
        marks.append(time.perf_counter())
        b = dt.gather(r, cap, gather_impl)
        _sync(dev)
        marks.append(time.perf_counter())
        lo, _ = objective_tensors(model, model.normalize(b.coords), b, loss_cfg, None, backend, precision)
        _sync(dev)
        marks.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        lo.backward()
        _sync(dev)
        marks.append(time.perf_counter())
        opt.step()
        _sync(dev)
        marks.append(time.perf_counter())
        for k, a, z in zip(phases, marks[:-1], marks[1:]):
            phases[k] += (z - a) / 3
    notes.append("fit step phases (ms, eager, synchronised): "
                 + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in phases.items()) + f"; CSR capacity {cap} slots")  # fmt: skip
    print(
        f"device: {_device_name(dev)}; bf16 peak: {'n/a' if peak is None else f'{peak:.0f} TFLOP/s'}; loss {loss}"
    )
    print("| loss | backend | batch | end-to-end cells/s | step cells/s | step TFLOP/s | % of bf16 peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        pct = "–" if r["pct_of_peak"] is None else f"{r['pct_of_peak']:.1f}"
        print(f"| {loss} | {r['backend']} | {r['batch']} | {r['end_to_end_cells_per_s']:.3g} "
              f"| {r['step_cells_per_s']:.3g} | {r['step_tflops']:.3g} | {pct} |")  # fmt: skip
    eager = next(r for r in rows if r["backend"] == "torch-eager-dense")
    ratio = [f"fit epoch / bare torch step rate ({loss}): {fit_e2e / eager['step_cells_per_s']:.2f} "
             f"(vs the bare epoch: {fit_e2e / eager['end_to_end_cells_per_s']:.2f})"]  # fmt: skip
    comp = next((r for r in rows if r["backend"] == "torch-compile-dense"), None)
    for name in ("fit-device-csr", "fit-device-csr-compiled"):
        r = next((r for r in rows if r["backend"] == name), None)
        if comp is not None and r is not None:
            ratio.append(
                f"{name} step / torch-compile-dense step: {r['step_cells_per_s'] / comp['step_cells_per_s']:.2f}"
            )
    ratio.append(f"1M-cell epoch at the fit rate: {1e6 / fit_e2e:.2f} s")
    print("; ".join(ratio))
    for n in notes:
        print("-", n)
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` (only the ``KEYS``) to the JSON list at ``path`` (created when absent)."""
    old = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old + [{k: r[k] for k in KEYS} for r in rows], indent=1) + "\n")
    print(f"appended {len(rows)} rows to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cells", type=int, default=50_000)
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=None, help="default: 2048 on CPU, the GPU default on CUDA")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--loss", nargs="+", default=["rmse"], choices=LIKELIHOODS,
                    help="losses to time, one after the other (default: rmse)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=10, help="timed steps per step-rate measurement")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best is kept")
    ap.add_argument(
        "--no-compile", action="store_true", help="skip every compiled row (slow to build on CPU)"
    )
    ap.add_argument("--backend", default="auto", help="fit --backend for the fit row")
    ap.add_argument(
        "--compile-fit",
        nargs="*",
        choices=LIKELIHOODS,
        default=None,
        metavar="LOSS",
        help="the compiled fit rows for these losses (none named: every --loss); default: every loss on "
        "CUDA, none on CPU (~1.5 min of compilation per loss on a 2-core CPU)",
    )
    ap.add_argument(
        "--defaults-check",
        nargs="*",
        metavar="H5AD",
        default=None,
        help="instead: fit these sections (none: a synthetic 6 × 20k-cell stack) with the CPU and with "
        "the GPU defaults on --device; print both best validation RMSEs and wall times",
    )
    ap.add_argument(
        "--epochs", type=int, default=60, help="epochs of --defaults-check fits (early stopping on)"
    )
    ap.add_argument("--results", default=str(RESULTS), help="JSON list to append rows to ('' = do not write)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.defaults_check is not None:
        defaults_check(args.defaults_check, args.device, args.epochs)
        return
    n_fit = len(_split(args.cells, 0.1, 0)[0])
    batch = args.batch or (
        resolved_batch_lr(TrainConfig(batch_size=None), "cuda", n_fit)[0] if dev.type == "cuda" else 2048
    )
    # every compiled row (and every compiled fit call) is a new TrainStep, one more guard set on the same
    # traced method: room for all of them, so that no compiled row silently falls back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if args.compile_fit is None:
        fit_compiled = set(args.loss) if dev.type == "cuda" else set()
    else:
        fit_compiled = set(args.compile_fit or args.loss)
    t0 = time.perf_counter()
    table = synthetic_table(args.cells, args.genes, args.density)
    print(
        f"synthetic stack {args.cells} × {args.genes}, {table.counts.nnz} non-zeros ({time.perf_counter() - t0:.1f} s)"
    )
    ctx = dict(dev=dev, batch=batch, peak=bf16_peak_tflops(dev), fit_compiled=fit_compiled,
               date=_dt.date.today().isoformat(),
               command="python benchmarks/bench_fit.py " + " ".join(sys.argv[1:]))  # fmt: skip
    for loss in dict.fromkeys(args.loss):
        rows = bench_loss(loss, table, args, ctx)
        if args.results:
            append_rows(Path(args.results), rows)


if __name__ == "__main__":
    main()
