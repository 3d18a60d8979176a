"""``inrscrecon bench``: a quick train-step benchmark of each available backend on this device, in the
configuration ``fit`` runs: sparse CSR targets (5 % non-zeros), mixed precision as ``fit`` picks it
(``precision="auto"``: bf16 head on CUDA, fp32 on CPU), fp32 master weights, Adam.

The full sweeps are ``benchmarks/bench_fit.py`` (end-to-end ``fit``, data path included, beside torch eager and
torch.compile) and ``benchmarks/bench_kernels.py``; this command answers "how fast is my machine with this
model size" in seconds.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from inrscrecon.data.device_table import SparseBatch
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.fused import resolve_impl
from inrscrecon.field.losses import LossConfig
from inrscrecon.field.model import FieldConfig, INRField
from inrscrecon.train.objective import objective_tensors


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_step(
    impl: str, batch: int, width: int, n_genes: int, device: torch.device, steps: int = 5, warmup: int = 2
) -> float:
    """Median seconds of one train step (objective forward + backward + Adam) with backend ``impl``."""
    torch.manual_seed(0)
    model = INRField(FieldConfig(n_genes, EncodingConfig(n_bands=4), width, 4)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    coords = torch.rand(batch, 3, device=device) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(batch, n_genes, generator=gen) < 0.05  # the batch's targets as CSR rows
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    values = torch.rand(int(mask.sum()), generator=gen) * 3
    target = SparseBatch(
        coords,
        indptr.to(device),
        mask.nonzero()[:, 1].int().to(device),
        values.to(device),
        indices_sorted=True,
    )
    cfg = LossConfig.preset("no_rc")
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        loss, _ = objective_tensors(model, coords, target, cfg, None, impl, precision="auto")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_bench(
    device: str = "cpu", batch: int = 4096, width: int = 256, n_genes: int = 5000
) -> list[dict[str, Any]]:
    """Time every backend that can run on ``device``; returns rows with ms and cells/s."""
    dev = torch.device(device)
    rows: list[dict[str, Any]] = []
    for impl in ("torch", "triton", "cuda"):
        try:
            resolved = resolve_impl(impl, dev, "sparse_head_loss")
        except Exception as exc:  # unavailable backends are reported, not fatal
            rows.append({"backend": impl, "status": f"unavailable: {exc}"})
            continue
        sec = time_train_step(resolved, batch, width, n_genes, dev)
        rows.append({"backend": impl, "status": "ok", "ms": 1e3 * sec, "cells_per_s": batch / sec})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`run_bench` rows."""
    out = ["| backend | train step ms | cells/s | note |", "|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            out.append(f"| {r['backend']} | {r['ms']:.1f} | {r['cells_per_s']:.0f} | |")
        else:
            out.append(f"| {r['backend']} | | | {r['status']} |")
    return "\n".join(out)
