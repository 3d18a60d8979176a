"""The one switch between implementations of the hot path (DESIGN "Backends and kernels").

``impl`` / ``--backend`` ∈ {"auto", "torch", "triton", "cuda"}:

* ``torch``  — the plain references (``head_loss_reference``, ``Trunk(fourier_encode(...))``); any device.
* ``triton`` — the fused kernels of ``inrscrecon.kernels`` (sparse head + loss, dense head + loss, head +
  Poisson / NB likelihood on CSR or dense counts, encode + trunk), called through their ``torch.library``
  ops (:mod:`inrscrecon.kernels.ops`) so that ``torch.compile(fullgraph=True)`` traces them; CUDA tensors,
  or CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported (tests).
* ``cuda``   — the compiled extension's head + loss (``inrscrecon.kernels.cuda_head_loss``: cuBLAS / MKL GEMMs
  and one fused C++ / CUDA loss pass on the CSR targets), on CUDA or CPU tensors, for ``sparse_head_loss``
  and ``head_loss`` (its dense target turned into CSR rows, eager only); the other ops (the count
  likelihoods among them) have no extension kernel and use Triton.
* ``auto``   — CPU tensors: torch. CUDA tensors: the fastest impl *measured* on this device kind, dtype and
  shape bucket, read from ``backend_table.json`` beside this module (written by
  ``benchmarks/bench_kernels.py --write-table``); with no entry for the device: triton when importable,
  else torch. What was picked and why is logged once per process (logger ``inrscrecon.field.fused``, INFO).

Under autocast (bf16 on CUDA, as ``fit`` runs) the fused ops cast their float inputs to the autocast dtype
(casts are differentiable: fp32 master weights receive the gradients) and accumulate in fp32.

An explicit request that cannot be honoured raises :class:`~inrscrecon.errors.InputError` with the reason;
only ``auto`` falls back. Kernel modules are imported lazily: importing this module needs torch only.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from inrscrecon.errors import InputError
from inrscrecon.field.encoding import fourier_encode
from inrscrecon.field.losses import (
    COUNT_LIKELIHOODS,
    KL_EPS,
    count_head_loss_reference,
    head_loss_reference,
    sparse_count_head_loss_reference,
    sparse_head_loss_reference,
)
from inrscrecon.field.mlp import Trunk
from inrscrecon.kernels.ops import compute_dtype

IMPLS = ("auto", "torch", "triton", "cuda")
OPS = ("head_loss", "sparse_head_loss", "trunk", "count_head_loss", "sparse_count_head_loss")

log = logging.getLogger(__name__)


def _interpreting() -> bool:
    from inrscrecon.kernels import interpreting

    return interpreting()


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=1)
def _cuda_ext() -> tuple[Any, str]:
    """The cached CUDA extension handle (module or None) and, when None, why it is unavailable."""
    try:
        mod = importlib.import_module("inrscrecon.kernels.cuda_head_loss")
    except Exception as err:  # not written yet, not built, no CUDA toolkit...
        return None, f"CUDA extension not importable ({type(err).__name__}: {err})"
    available = getattr(mod, "is_available", None)
    if callable(available):
        try:
            if not available():
                return None, "CUDA extension reports it is not available (not built for this machine)"
        except Exception as err:
            return None, f"CUDA extension check failed ({type(err).__name__}: {err})"
    if not hasattr(mod, "cuda_head_loss") or not hasattr(mod, "gemm_sparse_head_loss"):
        return None, "inrscrecon.kernels.cuda_head_loss lacks cuda_head_loss / gemm_sparse_head_loss"
    return mod, ""


CUDA_OPS = ("head_loss", "sparse_head_loss")  # the ops the compiled extension implements


def _cuda_unavailable(device: torch.device) -> str:
    """Why the compiled extension cannot run on ``device`` ("" when it can)."""
    mod, why = _cuda_ext()
    if mod is None:
        return why
    check = getattr(mod, "unavailable", None)
    return check(device) if callable(check) else ""


def _triton_unavailable(device: torch.device) -> str:
    """Why Triton cannot run on ``device`` ("" when it can)."""
    if not _triton_importable():
        return "triton is not installed"
    if device.type == "cuda":
        return ""
    if _interpreting():
        return ""
    return f"tensors are on {device.type}; Triton needs CUDA (or TRITON_INTERPRET=1 for the interpreter)"


@functools.cache
def _announce(op: str, picked: str, why: str) -> None:
    """Log the auto choice once per (op, choice, reason) per process."""
    log.info("inrscrecon %s backend: auto picked %r (%s)", op, picked, why)


# ------------------------------------------------------------------------------------------------------------
# The measured backend table (what ``auto`` picks on a GPU)
# ------------------------------------------------------------------------------------------------------------

TABLE_PATH = Path(__file__).with_name("backend_table.json")
B_BUCKETS = (256, 65536)  # batch buckets are powers of two clipped to this range


def shape_bucket(n_rows: int, width: int, n_genes: int = 0) -> dict[str, int]:
    """Bucket of a problem shape: each size rounded up to a power of two (B clipped to B_BUCKETS)."""

    def up(n: int) -> int:
        return 1 << max(0, int(n) - 1).bit_length()

    b = min(max(up(n_rows), B_BUCKETS[0]), B_BUCKETS[1])
    return {"B": b, "W": up(width), "M": up(n_genes) if n_genes else 0}


@functools.lru_cache(maxsize=4)
def load_table(path: str = str(TABLE_PATH)) -> tuple[dict[str, Any], ...]:
    """Entries of the backend table: ``{"op", "device", "dtype", "bucket": {"B", "W", "M"}, "best",
    "ms": {impl: ms}, "date", "command"}``; an absent or unreadable file is an empty table (said once)."""
    try:
        data = json.loads(Path(path).read_text())
        return tuple(data.get("entries", []))
    except (OSError, ValueError) as err:
        log.warning("inrscrecon backend table %s unreadable (%s); auto uses its fallback", path, err)
        return ()


@torch.compiler.assume_constant_result
def _device_kind(device: str) -> str:
    """The device kind the table is keyed by: the CUDA device name (e.g. "NVIDIA H200"), else "cpu"."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return dev.type


def table_lookup(
    op: str,
    device_kind: str,
    dtype: str,
    bucket: dict[str, int],
    entries: tuple[dict[str, Any], ...] | None = None,
) -> dict[str, Any] | None:
    """The entry for ``op`` on ``device_kind`` / ``dtype`` whose bucket is nearest to ``bucket`` (sum of
    |log2| differences over B, W, M); None when the table has nothing for this op, device and dtype."""
    rows = [
        e
        for e in (load_table() if entries is None else entries)
        if e.get("op") == op and e.get("device") == device_kind and e.get("dtype") == dtype
    ]
    if not rows:
        return None

    def dist(e: dict[str, Any]) -> float:
        eb = e.get("bucket", {})
        return sum(abs(math.log2(max(1, eb.get(k, 1))) - math.log2(max(1, bucket.get(k, 1)))) for k in "BWM")

    return min(rows, key=dist)


def _available(which: str, op: str, dev: torch.device) -> str:
    """Why ``which`` cannot run ``op`` on ``dev`` ("" when it can)."""
    if which == "torch":
        return ""
    if which == "triton":
        return _triton_unavailable(dev)
    if which == "cuda":
        if op not in CUDA_OPS:
            return f"no CUDA kernel for {op}"
        return _cuda_unavailable(dev)
    return f"unknown impl {which!r} in the backend table"


def resolve_impl(
    impl: str,
    device: torch.device | str,
    op: str = "head_loss",
    shape: dict[str, int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> str:
    """The concrete impl ("torch" | "triton" | "cuda") for ``op`` ∈ OPS on ``device``.

    ``auto`` never fails. CPU tensors → torch. CUDA tensors → the fastest *measured* impl for this device
    kind, dtype and shape bucket (``shape`` = :func:`shape_bucket`) in ``backend_table.json`` (written by
    ``benchmarks/bench_kernels.py --write-table``), skipping impls that cannot run here; without an entry
    for the device, the documented fallback: triton when importable, else torch. The compiled CUDA
    extension is never picked for merely existing. The choice and its reason are logged once.
    Explicit choices raise InputError when unavailable, except ``cuda`` for ops without a CUDA kernel,
    which means triton.
    """
    if impl not in IMPLS:
        raise InputError(f"backend must be one of {IMPLS}, got {impl!r}")
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if impl == "torch":
        return "torch"
    bucket = tuple(sorted((shape or {}).items()))
    return _resolve(impl, str(torch.device(device)), op, bucket, str(dtype))


@torch.compiler.assume_constant_result
def _resolve(impl: str, device: str, op: str, bucket: tuple[tuple[str, int], ...], dtype_name: str) -> str:
    """resolve_impl's decision; run eagerly even while torch.compile traces (its result is a constant, so
    the table lookup and the once-only log never break the graph)."""
    dev = torch.device(device)
    shape = dict(bucket)
    dtype = getattr(torch, dtype_name.replace("torch.", ""))
    if impl == "auto":
        if dev.type != "cuda":
            _announce(op, "torch", f"tensors are on {dev.type}; fused kernels are used on CUDA only")
            return "torch"
        kind = _device_kind(str(dev))
        dname = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
        entry = table_lookup(op, kind, dname, shape or {})
        if entry is not None:
            ranked = sorted(entry.get("ms", {}).items(), key=lambda kv: kv[1])
            for which, ms in ranked:
                if which in ("torch", "triton", "cuda") and not _available(which, op, dev):
                    _announce(
                        op,
                        which,
                        f"measured fastest on {kind} {dname} bucket {entry.get('bucket')}: {ms:.3g} ms",
                    )
                    return which
        why_not_triton = _triton_unavailable(dev)
        if not why_not_triton:
            _announce(op, "triton", f"no measured entry for {kind} {dname}; fallback triton")
            return "triton"
        _announce(op, "torch", f"no measured entry for {kind}; {why_not_triton}")
        return "torch"
    if impl == "cuda" and op in CUDA_OPS:
        why = _cuda_unavailable(dev)
        if why:
            raise InputError(f"backend 'cuda' requested for {op} on {dev} but {why}")
        return "cuda"
    # impl == "triton", or "cuda" for an op without a CUDA kernel (served by Triton)
    why = _triton_unavailable(dev)
    if why:
        raise InputError(f"backend {impl!r} requested for {op} but {why}")
    return "triton"


def head_loss(
    hidden: torch.Tensor,  # [B, W]
    weight: torch.Tensor,  # [M, W]
    bias: torch.Tensor | None,  # [M]
    target: torch.Tensor,  # [B, M]
    lambda_kl: float = 1.0,
    kl_eps: float = KL_EPS,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softplus(h Wᵀ + b) → (RMSE + λ·KL, RMSE, KL) as fp32 scalars; fused impls never build [B, M] pred.

    All three outputs carry gradients to hidden, weight and bias.
    """
    shape = shape_bucket(hidden.shape[0], hidden.shape[1], weight.shape[0])
    which = resolve_impl(impl, hidden.device, "head_loss", shape, compute_dtype(hidden, weight))
    if which == "torch":
        return head_loss_reference(hidden, weight, bias, target, lambda_kl, kl_eps)
    if which == "triton":
        from inrscrecon.kernels.ops import triton_dense_head_loss

        return triton_dense_head_loss(hidden, weight, bias, target, lambda_kl, kl_eps)
    mod, _ = _cuda_ext()
    return mod.cuda_head_loss(hidden, weight, bias, target, lambda_kl, kl_eps)  # casts under autocast


def _check_sparse(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    row_weight: torch.Tensor | None,
) -> None:
    """Shape / dtype checks of :func:`sparse_head_loss` (metadata only: no device sync)."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise InputError(
            f"hidden [B, W] and weight [M, W] must be 2-D, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    n_rows, width = hidden.shape
    n_genes = weight.shape[0]
    if weight.shape[1] != width:
        raise InputError(f"weight width {weight.shape[1]} != hidden width {width}")
    if bias is not None and tuple(bias.shape) != (n_genes,):
        raise InputError(f"bias must be [M] = [{n_genes}], got {tuple(bias.shape)}")
    if tuple(indptr.shape) != (n_rows + 1,) or indptr.dtype != torch.int64:
        raise InputError(
            f"indptr must be int64 [B+1] = [{n_rows + 1}], got {indptr.dtype} {tuple(indptr.shape)}"
        )
    if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise InputError(f"indices must be int32/int64 [CAP], got {indices.dtype} {tuple(indices.shape)}")
    if tuple(values.shape) != tuple(indices.shape):
        raise InputError(f"values {tuple(values.shape)} must match indices {tuple(indices.shape)}")
    if row_weight is not None and tuple(row_weight.shape) != (n_rows,):
        raise InputError(f"row_weight must be [B] = [{n_rows}], got {tuple(row_weight.shape)}")


def sparse_head_loss(
    hidden: torch.Tensor,  # [B, W] fp32 or bf16
    weight: torch.Tensor,  # [M, W]
    bias: torch.Tensor | None,  # [M]
    indptr: torch.Tensor,  # [B+1] int64 CSR row offsets, indptr[0] == 0
    indices: torch.Tensor,  # [CAP] int32/int64 gene of each non-zero (unique within a row, any order)
    values: torch.Tensor,  # [CAP] fp32 log1p-normalised target of each non-zero
    lambda_kl: float = 0.0,
    kl_eps: float = KL_EPS,
    row_weight: torch.Tensor | None = None,  # [B] fp32, 1 = real row, 0 = padding row
    impl: str = "auto",
    indices_sorted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softplus(h Wᵀ + b) against a sparse CSR target → (RMSE + λ·KL, RMSE, KL) fp32 scalars.

    Equals :func:`head_loss` on the densified target (rows weighted by ``row_weight``; see
    :func:`~inrscrecon.field.losses.sparse_head_loss_reference`). Slots at positions ≥ indptr[B] are
    ignored, so fixed-capacity buffers keep shapes static from step to step. Gradients flow to hidden,
    weight and bias. The fused impls never build a [B, M] target or prediction in global memory; they
    sort each row's non-zeros by gene on the device unless ``indices_sorted`` says they already are. Under
    autocast the matmuls run in the autocast dtype with fp32 accumulation.
    """
    _check_sparse(hidden, weight, bias, indptr, indices, values, row_weight)
    shape = shape_bucket(hidden.shape[0], hidden.shape[1], weight.shape[0])
    which = resolve_impl(impl, hidden.device, "sparse_head_loss", shape, compute_dtype(hidden, weight))
    if which == "torch":
        return sparse_head_loss_reference(
            hidden, weight, bias, indptr, indices, values, lambda_kl, kl_eps, row_weight
        )
    if which == "cuda":
        mod, _ = _cuda_ext()
        return mod.gemm_sparse_head_loss(
            hidden, weight, bias, indptr, indices, values, lambda_kl, kl_eps, row_weight
        )
    from inrscrecon.kernels.ops import triton_sparse_head_loss

    return triton_sparse_head_loss(
        hidden, weight, bias, indptr, indices, values, lambda_kl, kl_eps, row_weight, indices_sorted
    )


def _check_count(
    n_rows: int,
    n_genes: int,
    log_offset: torch.Tensor,
    likelihood: str,
    log_theta: torch.Tensor | None,
) -> None:
    """Checks of the count-specific arguments (metadata only: no device sync)."""
    if likelihood not in COUNT_LIKELIHOODS:
        raise InputError(f"count likelihood must be one of {COUNT_LIKELIHOODS}, got {likelihood!r}")
    if tuple(log_offset.shape) != (n_rows,):
        raise InputError(f"log_offset must be [B] = [{n_rows}], got {tuple(log_offset.shape)}")
    if likelihood == "nb":
        if log_theta is None:
            raise InputError("likelihood 'nb' needs log_theta [M] (gene-wise log dispersion)")
        if tuple(log_theta.shape) != (n_genes,):
            raise InputError(f"log_theta must be [M] = [{n_genes}], got {tuple(log_theta.shape)}")


def count_head_loss(
    hidden: torch.Tensor,  # [B, W]
    weight: torch.Tensor,  # [M, W]
    bias: torch.Tensor | None,  # [M]
    counts: torch.Tensor,  # [B, M] raw counts
    log_offset: torch.Tensor,  # [B] log(L / 1e4), L the row's library size
    likelihood: str,
    log_theta: torch.Tensor | None = None,  # [M] NB log dispersion
    lambda_kl: float = 0.0,
    kl_eps: float = KL_EPS,
    row_weight: torch.Tensor | None = None,  # [B] fp32, 0 = padding row
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """η = h Wᵀ + b under a Poisson / NB likelihood with offset → (NLL + λ·KL, NLL, KL) fp32 scalars.

    Contract of :func:`~inrscrecon.field.losses.count_head_loss_reference`; gradients to hidden, weight,
    bias and log_theta. The fused impl never builds the [B, M] prediction. There is no CUDA-extension kernel
    for the count losses: ``impl="cuda"`` runs the Triton kernel.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise InputError(
            f"hidden [B, W] and weight [M, W] must be 2-D with one W, got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}"
        )
    n_rows, n_genes = hidden.shape[0], weight.shape[0]
    if tuple(counts.shape) != (n_rows, n_genes):
        raise InputError(f"counts must be [B, M] = [{n_rows}, {n_genes}], got {tuple(counts.shape)}")
    if row_weight is not None and tuple(row_weight.shape) != (n_rows,):
        raise InputError(f"row_weight must be [B] = [{n_rows}], got {tuple(row_weight.shape)}")
    _check_count(n_rows, n_genes, log_offset, likelihood, log_theta)
    shape = shape_bucket(n_rows, hidden.shape[1], n_genes)
    which = resolve_impl(impl, hidden.device, "count_head_loss", shape, compute_dtype(hidden, weight))
    if which == "torch":
        return count_head_loss_reference(
            hidden, weight, bias, counts, log_offset, likelihood, log_theta, lambda_kl, kl_eps, row_weight
        )
    from inrscrecon.kernels.ops import triton_count_head_loss

    return triton_count_head_loss(
        hidden, weight, bias, counts, log_offset, likelihood, log_theta, lambda_kl, kl_eps, row_weight
    )


def sparse_count_head_loss(
    hidden: torch.Tensor,  # [B, W] fp32 or bf16
    weight: torch.Tensor,  # [M, W]
    bias: torch.Tensor | None,  # [M]
    indptr: torch.Tensor,  # [B+1] int64 CSR row offsets, indptr[0] == 0
    indices: torch.Tensor,  # [CAP] int32/int64 gene of each non-zero (unique within a row, any order)
    values: torch.Tensor,  # [CAP] raw count of each non-zero
    log_offset: torch.Tensor,  # [B] log(L / 1e4)
    likelihood: str,
    log_theta: torch.Tensor | None = None,  # [M] NB log dispersion
    lambda_kl: float = 0.0,
    kl_eps: float = KL_EPS,
    row_weight: torch.Tensor | None = None,  # [B] fp32, 1 = real row, 0 = padding row
    impl: str = "auto",
    indices_sorted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Poisson / NB head loss against sparse CSR counts → (NLL + λ·KL, NLL, KL) fp32 scalars.

    Equals :func:`count_head_loss` on the densified counts (see
    :func:`~inrscrecon.field.losses.sparse_count_head_loss_reference`). Slots at positions ≥ indptr[B] are
    ignored. Gradients to hidden, weight, bias and log_theta. The fused impl builds neither the [B, M] target
    nor the prediction in global memory and sorts each row's non-zeros unless ``indices_sorted``. There is no
    CUDA-extension kernel for the count losses: ``impl="cuda"`` runs the Triton kernel.
    """
    _check_sparse(hidden, weight, bias, indptr, indices, values, row_weight)
    n_rows, n_genes = hidden.shape[0], weight.shape[0]
    _check_count(n_rows, n_genes, log_offset, likelihood, log_theta)
    shape = shape_bucket(n_rows, hidden.shape[1], n_genes)
    which = resolve_impl(impl, hidden.device, "sparse_count_head_loss", shape, compute_dtype(hidden, weight))
    if which == "torch":
        return sparse_count_head_loss_reference(
            hidden,
            weight,
            bias,
            indptr,
            indices,
            values,
            log_offset,
            likelihood,
            log_theta,
            lambda_kl,
            kl_eps,
            row_weight,
        )
    from inrscrecon.kernels.ops import triton_sparse_count_head_loss

    return triton_sparse_count_head_loss(
        hidden,
        weight,
        bias,
        indptr,
        indices,
        values,
        log_offset,
        likelihood,
        log_theta,
        lambda_kl,
        kl_eps,
        row_weight,
        indices_sorted,
    )


def trunk_forward(
    coords: torch.Tensor,  # [B, 3] in [-1, 1]
    n_bands: int,
    trunk: Trunk,
    impl: str = "auto",
) -> torch.Tensor:
    """Fourier encoding (include_input=True, ``n_bands`` log-spaced bands) + ``trunk`` → hidden [B, W].

    The fused path needs the Fourier encoding with include_input=True, widths ≤ 256 and one weight dtype; for
    other encodings call the torch modules directly.
    """
    linears = [cast(nn.Linear, layer) for layer in trunk.layers]
    shape = shape_bucket(coords.shape[0], linears[-1].out_features)
    which = resolve_impl(impl, coords.device, "trunk", shape, compute_dtype(*[lin.weight for lin in linears]))
    widths = {cast(nn.Linear, layer).out_features for layer in trunk.layers}
    if which == "triton" and impl == "auto" and (max(widths) > 256 or 3 + 6 * n_bands > 256):
        _announce("trunk", "torch", "width or encoding above the fused kernel's 256 limit")
        which = "torch"
    if which == "torch":
        return trunk(fourier_encode(coords, n_bands, include_input=True))
    from inrscrecon.kernels.ops import triton_trunk_op

    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears]
    return triton_trunk_op(coords, n_bands, weights, biases)


__all__ = [
    "IMPLS",
    "count_head_loss",
    "head_loss",
    "resolve_impl",
    "sparse_count_head_loss",
    "sparse_head_loss",
    "trunk_forward",
]
