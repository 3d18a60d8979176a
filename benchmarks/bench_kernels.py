"""Benchmark of the hot path (encode → trunk → head → loss) across implementations.

Measures, per (mode, B, W) and implementation:

* modes — ``train``: forward + backward + Adam step; ``eval``: loss forward under no_grad (validation);
  ``predict``: trunk + softplus head → [B, M] prediction (inference; the fused head-loss does not apply, so
  the head is the torch GEMM for every impl and only the trunk differs).
* impls — ``eager`` (torch references), ``compile`` (torch.compile of the same function, default mode),
  ``triton`` (fused trunk + fused head/loss), ``cuda`` (CUDA-extension head/loss + Triton trunk; skipped
  with a reason when the extension is absent).

Reports ms per step, cells/s, peak allocated memory (torch.cuda.max_memory_allocated, params included),
achieved TFLOP/s on *model* FLOPs (forward 2·(D·W + (n−1)·W² + W·M) per cell, train = 3× forward; the fused
kernels' recomputation is not counted), % of the given bf16 peak, and ratios to eager and compile measured
in the same run. Appends a markdown table to benchmarks/RESULTS.md with device and date.

Parameters are held in the compute dtype (``--dtype``, pure bf16 training by default) for every impl.
Imports need torch (+ triton for the triton impl) only. ``--smoke`` runs a tiny config on CPU (Triton in its
interpreter) to check the script itself; its numbers mean nothing and are not written unless ``--results``.

    python benchmarks/bench_kernels.py                    # full grid on a GPU
    python benchmarks/bench_kernels.py --smoke            # CPU check
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[4096, 16384, 65536], help="cells per step (B)")
    p.add_argument("--width", type=int, nargs="+", default=[64, 128, 256], help="trunk width (W)")
    p.add_argument("--genes", type=int, default=5000, help="head outputs (M)")
    p.add_argument("--layers", type=int, default=4, help="trunk layers")
    p.add_argument("--bands", type=int, default=4, help="Fourier bands L (D = 3 + 6L)")
    p.add_argument("--lambda-kl", type=float, default=1.0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--impls", nargs="+", default=["eager", "compile", "triton", "cuda"])
    p.add_argument("--modes", nargs="+", default=["train", "eval", "predict"])
    p.add_argument("--iters", type=int, default=20, help="timed steps")
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed steps first (compile / autotune happen here)"
    )
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls (torch and triton)")
    p.add_argument("--results", type=Path, default=None, help="markdown file to append to")
    p.add_argument("--smoke", action="store_true", help="tiny CPU config (Triton interpreter)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.width, args.genes, args.layers = [64], [16], 37, 2
        args.iters, args.warmup = 2, 1
        if args.dtype == "bf16" and not torch.cuda.is_available():
            args.dtype = "fp32"
        if "compile" in args.impls and not torch.cuda.is_available():
            args.impls = [i for i in args.impls if i != "compile"]  # inductor on CPU: slow, needs a compiler
    elif args.results is None:
        args.results = ROOT / "benchmarks" / "RESULTS.md"
    return args


@dataclass
class Row:
    mode: str
    batch: int
    width: int
    impl: str
    ms: float | None = None
    peak_mb: float | None = None
    tflops: float | None = None
    note: str = ""


class Model(torch.nn.Module):
    """Trunk + head parameters; the step functions choose how they are applied."""

    def __init__(self, n_bands: int, width: int, n_layers: int, n_genes: int):
        super().__init__()
        from inrscrecon.field.mlp import Trunk

        self.n_bands = n_bands
        self.trunk = Trunk(3 + 6 * n_bands, width, n_layers)
        self.head = torch.nn.Linear(width, n_genes)


def _step_fns(model: Model, impl: str, lambda_kl: float) -> dict[str, Callable]:
    """loss(coords, target) and predict(coords) for one impl (uncompiled)."""
    from inrscrecon.field import fused
    from inrscrecon.field.encoding import fourier_encode
    from inrscrecon.field.losses import head_loss_reference

    if impl in ("eager", "compile"):

        def loss_fn(coords, target):
            h = model.trunk(fourier_encode(coords, model.n_bands).to(model.head.weight.dtype))
            return head_loss_reference(h, model.head.weight, model.head.bias, target, lambda_kl)[0]

        def predict_fn(coords):
            h = model.trunk(fourier_encode(coords, model.n_bands).to(model.head.weight.dtype))
            return torch.nn.functional.softplus(model.head(h))

    else:
        head_impl = "cuda" if impl == "cuda" else "triton"
        fused.resolve_impl(head_impl, next(model.parameters()).device, "head_loss")  # raises with a reason

        def loss_fn(coords, target):
            h = fused.trunk_forward(coords, model.n_bands, model.trunk, impl="triton")
            w, b = model.head.weight, model.head.bias
            return fused.head_loss(h, w, b, target, lambda_kl, impl=head_impl)[0]

        def predict_fn(coords):
            h = fused.trunk_forward(coords, model.n_bands, model.trunk, impl="triton")
            return torch.nn.functional.softplus(model.head(h))

    return {"loss": loss_fn, "predict": predict_fn}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(
    fn: Callable[[], object], device: torch.device, warmup: int, iters: int
) -> tuple[float, float | None]:
    """Mean ms per call and peak allocated MB over the timed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        _sync(device)
        return start.elapsed_time(end) / iters, torch.cuda.max_memory_allocated(device) / 2**20
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters, None


def model_flops(mode: str, batch: int, width: int, args: argparse.Namespace) -> float:
    d_in = 3 + 6 * args.bands
    fwd = 2.0 * (d_in * width + (args.layers - 1) * width * width + width * args.genes)
    return batch * fwd * (3.0 if mode == "train" else 1.0)


def bench_one(mode: str, batch: int, width: int, impl: str, args: argparse.Namespace, device) -> Row:
    row = Row(mode, batch, width, impl)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = Model(args.bands, width, args.layers, args.genes).to(device=device, dtype=dtype)
    coords = torch.rand(batch, 3, device=device) * 2 - 1
    target = torch.log1p(torch.poisson(torch.rand(batch, args.genes, device=device) * 3))
    try:
        fns = _step_fns(model, impl, args.lambda_kl)
    except Exception as err:  # e.g. cuda extension not built
        row.note = f"skipped: {err}"
        return row
    loss_fn, predict_fn = fns["loss"], fns["predict"]
    if impl == "compile":
        loss_fn, predict_fn = torch.compile(loss_fn), torch.compile(predict_fn)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step():
        loss = loss_fn(coords, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def eval_step():
        with torch.no_grad():
            loss_fn(coords, target)

    def predict_step():
        with torch.no_grad():
            predict_fn(coords)

    step = {"train": train_step, "eval": eval_step, "predict": predict_step}[mode]
    try:
        row.ms, row.peak_mb = _time(step, device, args.warmup, args.iters)
        row.tflops = model_flops(mode, batch, width, args) / (row.ms * 1e-3) / 1e12
    except torch.cuda.OutOfMemoryError:
        row.note = "OOM"
    except Exception as err:
        row.note = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        traceback.print_exc(limit=3)
    return row


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def to_markdown(rows: list[Row], args: argparse.Namespace, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke, Triton interpreter)"
    try:
        import triton

        tri = triton.__version__
    except ImportError:
        tri = "absent"
    head = (
        f"\n## bench_kernels — {name} — {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
        f"M = {args.genes}, {args.layers} layers, L = {args.bands} bands, dtype {args.dtype}, λ_KL = "
        f"{args.lambda_kl}, torch {torch.__version__}, triton {tri}, {args.iters} timed steps after "
        f"{args.warmup} warm-up; TFLOP/s on model FLOPs (train = 3× forward), % of {args.peak_tflops} "
        "peak.\n\n"
        "| mode | B | W | impl | ms | cells/s | peak MB | TFLOP/s | % peak | × eager | × compile | note |\n"
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    base = {(r.mode, r.batch, r.width, r.impl): r.ms for r in rows}
    lines = []
    for r in rows:
        eager = base.get((r.mode, r.batch, r.width, "eager"))
        comp = base.get((r.mode, r.batch, r.width, "compile"))
        x_e = eager / r.ms if eager and r.ms else None
        x_c = comp / r.ms if comp and r.ms else None
        cells = r.batch / (r.ms * 1e-3) if r.ms else None
        pct = 100 * r.tflops / args.peak_tflops if r.tflops is not None else None
        lines.append(
            f"| {r.mode} | {r.batch} | {r.width} | {r.impl} | {_fmt(r.ms, '.3f')} | {_fmt(cells, '.3g')} | "
            f"{_fmt(r.peak_mb, '.0f')} | {_fmt(r.tflops, '.1f')} | {_fmt(pct, '.1f')} | {_fmt(x_e, '.2f')} | "
            f"{_fmt(x_c, '.2f')} | {r.note} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print("no CUDA device: run with --smoke for a CPU check of this script", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels (and triton) are imported
    sys.path.insert(0, str(ROOT))
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    rows: list[Row] = []
    for mode in args.modes:
        for batch in args.batch:
            for width in args.width:
                for impl in args.impls:
                    row = bench_one(mode, batch, width, impl, args, device)
                    print(f"{mode:8s} B={batch:6d} W={width:4d} {impl:8s} ms={_fmt(row.ms, '.3f')} "
                          f"peak={_fmt(row.peak_mb, '.0f')}MB {row.note}", flush=True)  # fmt: skip
                    rows.append(row)
                    if cuda:
                        torch.cuda.empty_cache()  # the step's tensors are gone with bench_one's frame
    table = to_markdown(rows, args, device)
    print(table)
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write(table)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
