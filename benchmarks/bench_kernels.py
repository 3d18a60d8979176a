"""Benchmark of the hot path in the configuration ``fit`` runs, and the writer of the backend table.

What ``fit`` runs: fp32 master weights, bf16 autocast of trunk and head on CUDA (fp32 on CPU), targets as
CSR rows of the batch, Adam. Per (B, W) this script times, *in the same run*:

* ``sparse-fused`` — fused trunk op + fused sparse head + loss (Triton; the interpreter with ``--smoke``);
* ``sparse-torch`` — torch trunk + ``sparse_head_loss_reference`` (the CPU path of ``fit``);
* ``sparse-compile`` — ``torch.compile`` of that sparse torch step;
* ``dense-eager``  — torch trunk + the dense ``head_loss_reference`` on a dense [B, M] target;
* ``dense-compile`` — ``torch.compile`` of that dense step (the reference to beat). The dense rows get
  their [B, M] target for free (built before timing); in ``fit`` building it is host work per step.
* ``sparse-cuda`` — fused trunk op + the compiled extension's sparse head (cuBLAS GEMMs + one fused CUDA loss
  pass, 3 GEMM passes at λ = 0; ``inrscrecon.kernels.cuda_head_loss``); on CPU the torch trunk + its CPU op;
* ``dense-triton`` / ``dense-cuda`` — the dense fused heads (``--impls`` to add them).

``--loss rmse poisson nb`` (default on a GPU: all three; elsewhere rmse) runs every impl with that loss: the
count likelihoods fit raw counts with the library size as offset (NB with a learned gene-wise log θ), through
``sparse_count_head_loss`` / ``count_head_loss`` and their torch references; ``dense-cuda`` has no count
kernel (its rows say so).

Modes: ``train`` (forward + backward + Adam step) and ``eval`` (loss under no_grad). Reports ms per step,
cells/s, peak device memory, TFLOP/s on model FLOPs (forward 2·(D·W + (n−1)·W² + W·M) per cell, train = 3×;
recomputation not counted), % of the bf16 peak (``--peak-tflops``) and the ratios to dense eager and
dense compile. Appends a markdown table to benchmarks/RESULTS.md (``--results``) with device and date.

``--write-table`` also times each op alone (forward + backward under the fit precision) for every impl
that runs here and writes the fastest per device kind, dtype and shape bucket into
``inrscrecon/field/backend_table.json`` — the table ``backend="auto"`` reads. Run it on the GPU itself.

    python benchmarks/bench_kernels.py                                  # GPU: full grid
    python benchmarks/bench_kernels.py --write-table                    # GPU: also refresh the table
    python benchmarks/bench_kernels.py --batch 65536 --width 256 --impls sparse-fused --sweep-sparse
                                                                        # GPU: tile configs of the sparse head
    python benchmarks/bench_kernels.py --loss nb --impls sparse-fused sparse-compile
                                                                        # GPU: the NB count loss only
    python benchmarks/bench_kernels.py --cpu                            # CPU rows (small, no Triton)
    python benchmarks/bench_kernels.py --smoke                          # tiny CPU check (interpreter)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "inrscrecon" / "field" / "backend_table.json"
IMPLS = (
    "sparse-fused",
    "sparse-cuda",
    "sparse-torch",
    "sparse-compile",
    "dense-eager",
    "dense-compile",
    "dense-triton",
    "dense-cuda",
)
LOSSES = ("rmse", "poisson", "nb")
TARGET_SUM = 1e4  # counts per unit of the log-rate (the count model's convention)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=None, help="cells per step (B)")
    p.add_argument("--width", type=int, nargs="+", default=None, help="trunk width (W)")
    p.add_argument("--genes", type=int, default=5000, help="head outputs (M)")
    p.add_argument("--layers", type=int, default=4, help="trunk layers")
    p.add_argument("--bands", type=int, default=4, help="Fourier bands L (D = 3 + 6L)")
    p.add_argument("--density", type=float, default=0.05, help="fraction of non-zero targets")
    p.add_argument("--lambda-kl", type=float, default=0.0, help="KL weight (fit's default loss: 0)")
    p.add_argument(
        "--loss",
        nargs="+",
        default=None,
        choices=LOSSES,
        help="loss likelihoods to time (GPU default: all; else rmse)",
    )
    p.add_argument("--impls", nargs="+", default=None, choices=IMPLS)
    p.add_argument("--modes", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    p.add_argument("--iters", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile happens here)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 matmul peak (H200 measured ≈ 790)")
    p.add_argument("--results", type=Path, default=None, help="markdown file to append to")
    p.add_argument(
        "--write-table", action="store_true", help="time each op alone and write the backend table"
    )
    p.add_argument("--table", type=Path, default=TABLE, help="backend table to update")
    p.add_argument(
        "--sweep-sparse",
        nargs="*",
        default=None,
        metavar="BB,BM,KCH,BK,WARPS",
        help="time the fused sparse head + loss (fwd + bwd) per tile config (default: a small built-in grid)",
    )
    p.add_argument("--cpu", action="store_true", help="CPU rows: small shapes, torch impls (+ compile)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU config with Triton in its interpreter")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not (args.cpu or args.smoke)
    if args.smoke:
        args.batch, args.width, args.genes, args.layers = args.batch or [64], args.width or [16], 37, 2
        args.iters, args.warmup = 2, 1
        args.impls = args.impls or ["sparse-fused", "sparse-torch", "dense-eager"]
        args.loss = args.loss or ["rmse"]
    elif not cuda:
        args.batch, args.width = args.batch or [1024], args.width or [256]
        args.iters, args.warmup = min(args.iters, 5), min(args.warmup, 2)
        args.impls = args.impls or ["sparse-torch", "sparse-compile", "dense-eager", "dense-compile"]
        args.loss = args.loss or ["rmse"]
    else:
        args.batch, args.width = args.batch or [4096, 16384, 65536], args.width or [128, 256]
        args.impls = args.impls or [
            "sparse-fused",
            "sparse-cuda",
            "sparse-torch",
            "sparse-compile",
            "dense-eager",
            "dense-compile",
        ]
        args.loss = args.loss or list(LOSSES)
    if args.results is None and not args.smoke:
        args.results = ROOT / "benchmarks" / "RESULTS.md"
    args.device = torch.device("cuda" if cuda else "cpu")
    return args


@dataclass
class Row:
    mode: str
    batch: int
    width: int
    impl: str
    loss: str = "rmse"
    ms: float | None = None
    peak_mb: float | None = None
    tflops: float | None = None
    note: str = ""


class Model(torch.nn.Module):
    """Trunk + head with fp32 (master) parameters, as ``fit`` holds them."""

    def __init__(self, n_bands: int, width: int, n_layers: int, n_genes: int, nb: bool = False):
        super().__init__()
        from inrscrecon.field.mlp import Trunk

        self.n_bands = n_bands
        self.trunk = Trunk(3 + 6 * n_bands, width, n_layers)
        self.head = torch.nn.Linear(width, n_genes)
        self.log_theta = torch.nn.Parameter(torch.zeros(n_genes)) if nb else None  # NB dispersion


@dataclass
class Batch:
    coords: torch.Tensor  # [B, 3]
    indptr: torch.Tensor  # [B+1] int64
    indices: torch.Tensor  # [nnz] int32, sorted within rows
    values: torch.Tensor  # [nnz] fp32 (log1p-normalised, or raw counts for the count losses)
    dense: torch.Tensor | None  # [B, M] (dense impls only)
    log_offset: torch.Tensor  # [B] log(L / 1e4) of the rows' library sizes


def make_batch(
    n_rows: int, n_genes: int, density: float, device: torch.device, dense: bool, counts: bool = False
) -> Batch:
    """A batch of random rows at ``density``: log1p-normalised values, or raw counts (``counts``)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    coords = (torch.rand(n_rows, 3, generator=g) * 2 - 1).to(device)
    mask = torch.rand(n_rows, n_genes, generator=g) < density
    if counts:
        t = torch.where(
            mask, torch.poisson(torch.rand(n_rows, n_genes, generator=g) * 8, generator=g) + 1, 0.0
        )
    else:
        t = torch.where(mask, torch.log1p(torch.rand(n_rows, n_genes, generator=g) * 8), 0.0)
    log_offset = torch.log(t.sum(1).clamp_min(1.0) / TARGET_SUM)
    csr = t.to_sparse_csr()  # rows sorted by gene
    return Batch(  # clones: plain tensors, not views into the sparse tensor (torch.compile cannot fake those)
        coords,
        csr.crow_indices().to(device=device, dtype=torch.int64).clone(),
        csr.col_indices().to(device=device, dtype=torch.int32).clone(),
        csr.values().to(device=device, dtype=torch.float32).clone(),
        t.to(device) if dense else None,
        log_offset.to(device),
    )


def autocast_ctx(device: torch.device):
    """fit's precision: bf16 autocast on CUDA, fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def loss_fn_for(
    model: Model, impl: str, lambda_kl: float, loss: str = "rmse"
) -> Callable[[Batch], torch.Tensor]:
    from inrscrecon.field import fused
    from inrscrecon.field.encoding import fourier_encode
    from inrscrecon.field.losses import head_loss_reference, sparse_head_loss_reference

    w, b = model.head.weight, model.head.bias

    def torch_hidden(x: Batch) -> torch.Tensor:
        return model.trunk(fourier_encode(x.coords, model.n_bands))

    if loss != "rmse":
        return count_loss_fn_for(model, impl, lambda_kl, loss, torch_hidden)
    if impl == "sparse-fused":
        fused.resolve_impl("triton", x_dev(model), "sparse_head_loss")  # raises with the reason

        def f(x: Batch) -> torch.Tensor:
            h = fused.trunk_forward(x.coords, model.n_bands, model.trunk, impl="triton")
            csr = (x.indptr, x.indices, x.values)
            return fused.sparse_head_loss(h, w, b, *csr, lambda_kl, impl="triton", indices_sorted=True)[0]

    elif impl == "sparse-cuda":
        fused.resolve_impl("cuda", x_dev(model), "sparse_head_loss")  # raises with the reason
        trunk = "triton" if x_dev(model).type == "cuda" else "torch"

        def f(x: Batch) -> torch.Tensor:
            h = fused.trunk_forward(x.coords, model.n_bands, model.trunk, impl=trunk)
            csr = (x.indptr, x.indices, x.values)
            return fused.sparse_head_loss(h, w, b, *csr, lambda_kl, impl="cuda")[0]

    elif impl in ("sparse-torch", "sparse-compile"):

        def f(x: Batch) -> torch.Tensor:
            return sparse_head_loss_reference(
                torch_hidden(x), w, b, x.indptr, x.indices, x.values, lambda_kl
            )[0]

    elif impl in ("dense-eager", "dense-compile"):

        def f(x: Batch) -> torch.Tensor:
            assert x.dense is not None
            return head_loss_reference(torch_hidden(x), w, b, x.dense, lambda_kl)[0]

    else:
        head = "triton" if impl == "dense-triton" else "cuda"
        fused.resolve_impl(head, x_dev(model), "head_loss")

        def f(x: Batch) -> torch.Tensor:
            assert x.dense is not None
            h = fused.trunk_forward(x.coords, model.n_bands, model.trunk, impl="triton")
            return fused.head_loss(h, w, b, x.dense, lambda_kl, impl=head)[0]

    return f


def count_loss_fn_for(
    model: Model,
    impl: str,
    lambda_kl: float,
    loss: str,
    torch_hidden: Callable[[Batch], torch.Tensor],
) -> Callable[[Batch], torch.Tensor]:
    """The impl's step with a Poisson / NB likelihood on raw counts (library-size offset)."""
    from inrscrecon.field import fused
    from inrscrecon.field.losses import count_head_loss_reference, sparse_count_head_loss_reference

    w, b, lt = model.head.weight, model.head.bias, model.log_theta
    if impl in ("dense-cuda", "sparse-cuda"):
        raise ValueError("no CUDA-extension kernel for the count losses (impl='cuda' runs Triton)")
    if impl in ("sparse-fused", "dense-triton"):
        fused.resolve_impl("triton", x_dev(model), "sparse_count_head_loss")  # raises with the reason
    if impl == "sparse-fused":

        def f(x: Batch) -> torch.Tensor:
            h = fused.trunk_forward(x.coords, model.n_bands, model.trunk, impl="triton")
            csr = (x.indptr, x.indices, x.values)
            return fused.sparse_count_head_loss(
                h, w, b, *csr, x.log_offset, loss, lt, lambda_kl, impl="triton", indices_sorted=True
            )[0]

    elif impl in ("sparse-torch", "sparse-compile"):

        def f(x: Batch) -> torch.Tensor:
            csr = (x.indptr, x.indices, x.values)
            return sparse_count_head_loss_reference(
                torch_hidden(x), w, b, *csr, x.log_offset, loss, lt, lambda_kl
            )[0]

    elif impl in ("dense-eager", "dense-compile"):

        def f(x: Batch) -> torch.Tensor:
            assert x.dense is not None
            return count_head_loss_reference(
                torch_hidden(x), w, b, x.dense, x.log_offset, loss, lt, lambda_kl
            )[0]

    else:  # dense-triton

        def f(x: Batch) -> torch.Tensor:
            assert x.dense is not None
            h = fused.trunk_forward(x.coords, model.n_bands, model.trunk, impl="triton")
            return fused.count_head_loss(h, w, b, x.dense, x.log_offset, loss, lt, lambda_kl, impl="triton")[
                0
            ]

    return f


def x_dev(model: Model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object], device: torch.device, warmup: int, iters: int
) -> tuple[float, float | None]:
    """ms per call (CUDA: mean over the timed calls; CPU: median) and peak allocated MB (CUDA)."""
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
    times = []
    for _ in range(iters):  # CPU: the median call (shared machines: a mean is dominated by stalls)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3, None


def model_flops(mode: str, batch: int, width: int, args: argparse.Namespace) -> float:
    d_in = 3 + 6 * args.bands
    fwd = 2.0 * (d_in * width + (args.layers - 1) * width * width + width * args.genes)
    return batch * fwd * (3.0 if mode == "train" else 1.0)


def bench_one(
    mode: str, batch: int, width: int, impl: str, args: argparse.Namespace, loss: str = "rmse"
) -> Row:
    dev = args.device
    row = Row(mode, batch, width, impl, loss)
    torch.manual_seed(0)
    model = Model(args.bands, width, args.layers, args.genes, nb=loss == "nb").to(dev)
    x = make_batch(batch, args.genes, args.density, dev, impl.startswith("dense"), counts=loss != "rmse")
    try:
        loss_fn = loss_fn_for(model, impl, args.lambda_kl, loss)
    except Exception as err:  # e.g. the CUDA extension is not built, Triton cannot run here
        row.note = f"skipped: {str(err)[:100]}"
        return row
    if impl.endswith("-compile"):
        loss_fn = torch.compile(loss_fn)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step() -> None:
        with autocast_ctx(dev):
            loss = loss_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def eval_step() -> None:
        with torch.no_grad(), autocast_ctx(dev):
            loss_fn(x)

    try:
        row.ms, row.peak_mb = time_fn(
            train_step if mode == "train" else eval_step, dev, args.warmup, args.iters
        )
        row.tflops = model_flops(mode, batch, width, args) / (row.ms * 1e-3) / 1e12
    except torch.cuda.OutOfMemoryError:
        row.note = "OOM"
    except Exception as err:
        row.note = f"error: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
        traceback.print_exc(limit=3)
    return row


# ------------------------------------------------------------------------------------------------------------
# per-op timings → backend table
# ------------------------------------------------------------------------------------------------------------


def op_times(batch: int, width: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """{op: {impl: ms}} for forward + backward of each op alone under the fit precision."""
    from inrscrecon.field import fused

    dev = args.device
    torch.manual_seed(0)
    model = Model(args.bands, width, args.layers, args.genes).to(dev)
    x = make_batch(batch, args.genes, args.density, dev, dense=True)
    h = torch.relu(torch.randn(batch, width, device=dev)).requires_grad_()
    w, b = model.head.weight, model.head.bias
    count_loss = "nb" if "nb" in args.loss else "poisson"  # the table keys ops, not likelihoods
    xc = make_batch(batch, args.genes, args.density, dev, dense=True, counts=True)
    lt = torch.zeros(args.genes, device=dev, requires_grad=count_loss == "nb")
    csr_c = (xc.indptr, xc.indices, xc.values)
    cases: dict[str, dict[str, Callable[[], torch.Tensor]]] = {
        "sparse_head_loss": {
            impl: (
                lambda impl=impl: fused.sparse_head_loss(
                    h, w, b, x.indptr, x.indices, x.values, args.lambda_kl, impl=impl, indices_sorted=True
                )[0]
            )
            for impl in ("torch", "triton", "cuda")
        },
        "head_loss": {
            impl: (lambda impl=impl: fused.head_loss(h, w, b, x.dense, args.lambda_kl, impl=impl)[0])
            for impl in ("torch", "triton", "cuda")
        },
        "sparse_count_head_loss": {
            impl: (
                lambda impl=impl: fused.sparse_count_head_loss(
                    h,
                    w,
                    b,
                    *csr_c,
                    xc.log_offset,
                    count_loss,
                    lt,
                    args.lambda_kl,
                    impl=impl,
                    indices_sorted=True,
                )[0]
            )
            for impl in ("torch", "triton")
        },
        "count_head_loss": {
            impl: (
                lambda impl=impl: fused.count_head_loss(
                    h, w, b, xc.dense, xc.log_offset, count_loss, lt, args.lambda_kl, impl=impl
                )[0]
            )
            for impl in ("torch", "triton")
        },
        "trunk": {
            impl: (
                lambda impl=impl: (
                    fused.trunk_forward(x.coords, args.bands, model.trunk, impl=impl).float().sum()
                )
            )
            for impl in ("torch", "triton")
        },
    }
    if not any(loss != "rmse" for loss in args.loss):
        cases.pop("sparse_count_head_loss")
        cases.pop("count_head_loss")
    out: dict[str, dict[str, float]] = {}
    for op, impls in cases.items():
        out[op] = {}
        for impl, fn in impls.items():

            def step(fn: Callable[[], torch.Tensor] = fn) -> None:
                with autocast_ctx(dev):
                    loss = fn()
                loss.backward()

            try:
                out[op][impl], _ = time_fn(step, dev, args.warmup, args.iters)
            except Exception as err:  # not available here: not a candidate
                print(f"  {op} {impl}: skipped ({type(err).__name__}: {str(err)[:80]})", flush=True)
    return out


SWEEP = ["64,64,4,64,8", "64,64,2,64,8", "64,128,2,64,8", "128,64,2,64,8", "64,64,4,32,4", "128,128,2,64,8"]


def sweep_sparse(
    batch: int, width: int, configs: list[str], args: argparse.Namespace
) -> list[tuple[str, float | None]]:
    """ms of the fused sparse head + loss (fwd + bwd, fit precision) per tile config, via the env override."""
    from inrscrecon.field import fused
    from inrscrecon.kernels.triton_sparse_head_loss import BLOCKS_ENV

    dev = args.device
    torch.manual_seed(0)
    model = Model(args.bands, width, args.layers, args.genes).to(dev)
    x = make_batch(batch, args.genes, args.density, dev, dense=False)
    h = torch.relu(torch.randn(batch, width, device=dev)).requires_grad_()
    w, b = model.head.weight, model.head.bias
    csr = (x.indptr, x.indices, x.values)
    out: list[tuple[str, float | None]] = []
    for cfg in configs:
        os.environ[BLOCKS_ENV] = cfg

        def step() -> None:
            with autocast_ctx(dev):
                loss = fused.sparse_head_loss(
                    h, w, b, *csr, args.lambda_kl, impl="triton", indices_sorted=True
                )[0]
            loss.backward()

        try:
            out.append((cfg, time_fn(step, dev, args.warmup, args.iters)[0]))
        except Exception as err:  # out of resources, …
            print(f"  sweep {cfg}: {type(err).__name__}: {str(err)[:100]}", flush=True)
            out.append((cfg, None))
        finally:
            os.environ.pop(BLOCKS_ENV, None)
        print(f"sweep B={batch} W={width} blocks {cfg}: {_fmt(out[-1][1], '.3f')} ms", flush=True)
    return out


def device_kind(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_table(path: Path, measured: list[tuple[int, int, dict[str, dict[str, float]]]], args) -> int:
    """Replace this device's entries for the measured buckets; keep everything else. → entries written."""
    from inrscrecon.field.fused import shape_bucket

    data = json.loads(path.read_text()) if path.exists() else {"entries": []}
    kind = device_kind(args.device)
    dtype = "bf16" if args.device.type == "cuda" else "fp32"
    command = "python benchmarks/bench_kernels.py " + " ".join(sys.argv[1:])
    new = []
    for batch, width, ops in measured:
        for op, ms in ops.items():
            if not ms:
                continue
            bucket = shape_bucket(batch, width, 0 if op == "trunk" else args.genes)
            rounded = {k: round(v, 4) for k, v in ms.items()}
            best = min(rounded, key=lambda k: rounded[k])
            today = _dt.date.today().isoformat()
            new.append(
                dict(op=op, device=kind, dtype=dtype, bucket=bucket, best=best, ms=rounded, date=today)
            )
            new[-1]["command"] = command

    def key(e: dict) -> tuple:
        return e.get("op"), e.get("device"), e.get("dtype"), json.dumps(e.get("bucket"), sort_keys=True)

    keys = {key(e) for e in new}
    kept = [e for e in data.get("entries", []) if key(e) not in keys]
    data["entries"] = kept + new
    path.write_text(json.dumps(data, indent=1) + "\n")
    return len(new)


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def to_markdown(rows: list[Row], args: argparse.Namespace) -> str:
    dev = args.device
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        name += " (smoke: Triton interpreter, numbers meaningless)" if args.smoke else ""
    try:
        import triton

        tri = triton.__version__
    except ImportError:
        tri = "absent"
    prec = "bf16 autocast, fp32 master weights" if dev.type == "cuda" else "fp32"
    head = (
        f"\n## bench_kernels — {name} — {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
        f"`python benchmarks/bench_kernels.py {' '.join(sys.argv[1:])}`; fit configuration ({prec}, Adam), "
        f"M = {args.genes}, {args.layers} layers, L = {args.bands}, target density {args.density}, λ_KL = "
        f"{args.lambda_kl}; torch {torch.__version__}, triton {tri}; {args.iters} timed steps after {args.warmup} "
        f"warm-up. TFLOP/s on model FLOPs (train = 3× forward), % of {args.peak_tflops} TFLOP/s.\n\n"
        "| mode | loss | B | W | impl | ms | cells/s | peak MB | TFLOP/s | % peak | × dense eager | × dense compile | note |\n"
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    base = {(r.mode, r.loss, r.batch, r.width, r.impl): r.ms for r in rows}
    lines = []
    for r in rows:
        eager = base.get((r.mode, r.loss, r.batch, r.width, "dense-eager"))
        comp = base.get((r.mode, r.loss, r.batch, r.width, "dense-compile"))
        x_e = eager / r.ms if eager and r.ms else None
        x_c = comp / r.ms if comp and r.ms else None
        cells = r.batch / (r.ms * 1e-3) if r.ms else None
        pct = 100 * r.tflops / args.peak_tflops if r.tflops is not None and dev.type == "cuda" else None
        lines.append(
            f"| {r.mode} | {r.loss} | {r.batch} | {r.width} | {r.impl} | {_fmt(r.ms, '.3f')} | {_fmt(cells, '.3g')} | "
            f"{_fmt(r.peak_mb, '.0f')} | {_fmt(r.tflops, '.3f')} | {_fmt(pct, '.1f')} | {_fmt(x_e, '.2f')} | "
            f"{_fmt(x_c, '.2f')} | {r.note} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if "--smoke" in (argv if argv is not None else sys.argv):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels (and triton) are imported
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows: list[Row] = []
    measured = []
    for batch in args.batch:
        for width in args.width:
            for mode in args.modes:
                for loss in args.loss:
                    for impl in args.impls:
                        row = bench_one(mode, batch, width, impl, args, loss)
                        ms, peak = _fmt(row.ms, ".3f"), _fmt(row.peak_mb, ".0f")
                        print(
                            f"{mode:6s} {loss:7s} B={batch:6d} W={width:4d} {impl:14s} ms={ms} peak={peak}MB "
                            f"{row.note}",
                            flush=True,
                        )
                        rows.append(row)
                        if args.device.type == "cuda":
                            torch.cuda.empty_cache()
            if args.sweep_sparse is not None:
                sweep_sparse(batch, width, args.sweep_sparse or SWEEP, args)
            if args.write_table:
                measured.append((batch, width, op_times(batch, width, args)))
                print(f"ops B={batch} W={width}: {measured[-1][2]}", flush=True)
    table = to_markdown(rows, args)
    print(table)
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write(table)
        print(f"appended to {args.results}")
    if args.write_table:
        n = write_table(args.table, measured, args)
        print(f"wrote {n} entries for {device_kind(args.device)} to {args.table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
