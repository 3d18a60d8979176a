"""The one switch between implementations of the hot path (DESIGN "Backends and kernels").

``impl`` / ``--backend`` ∈ {"auto", "torch", "triton", "cuda"}:

* ``torch``  — the plain references (``head_loss_reference``, ``Trunk(fourier_encode(...))``); any device.
* ``triton`` — ``inrscrecon.kernels.triton_head_loss`` / ``inrscrecon.kernels.triton_trunk``; CUDA tensors,
  or CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported (tests).
* ``cuda``   — head + loss from the compiled extension (``inrscrecon.kernels.cuda_head_loss``); the trunk
  has no CUDA kernel and uses Triton.
* ``auto``   — CPU tensors: torch. CUDA tensors: cuda extension (head + loss only) > triton > torch. What
  was picked and why is logged once per process (logger ``inrscrecon.field.fused``, level INFO).

An explicit request that cannot be honoured raises :class:`~inrscrecon.errors.InputError` with the reason;
only ``auto`` falls back. Kernel modules are imported lazily: importing this module needs torch only.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from typing import Any, cast

import torch
from torch import nn

from inrscrecon.errors import InputError
from inrscrecon.field.encoding import fourier_encode
from inrscrecon.field.losses import KL_EPS, head_loss_reference, sparse_head_loss_reference
from inrscrecon.field.mlp import Trunk

IMPLS = ("auto", "torch", "triton", "cuda")
OPS = ("head_loss", "sparse_head_loss", "trunk")

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
    if not hasattr(mod, "cuda_head_loss"):
        return None, "inrscrecon.kernels.cuda_head_loss has no function cuda_head_loss"
    return mod, ""


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


def resolve_impl(impl: str, device: torch.device | str, op: str = "head_loss") -> str:
    """The concrete impl ("torch" | "triton" | "cuda") for ``op`` ∈ {"head_loss", "trunk"} on ``device``.

    ``auto`` never fails: CPU → torch; CUDA → cuda extension (head_loss only) > triton > torch, logged once.
    Explicit choices raise InputError when unavailable, except ``cuda`` for the trunk, which means triton.
    """
    if impl not in IMPLS:
        raise InputError(f"backend must be one of {IMPLS}, got {impl!r}")
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    dev = torch.device(device)
    if impl == "torch":
        return "torch"
    if impl == "auto":
        if dev.type != "cuda":
            _announce(op, "torch", f"tensors are on {dev.type}; fused kernels are used on CUDA only")
            return "torch"
        if op == "head_loss":
            mod, why_not_cuda = _cuda_ext()
            if mod is not None:
                _announce(op, "cuda", "compiled CUDA extension found")
                return "cuda"
        else:
            why_not_cuda = f"no CUDA kernel for {op}"
        why_not_triton = _triton_unavailable(dev)
        if not why_not_triton:
            _announce(op, "triton", why_not_cuda)
            return "triton"
        _announce(op, "torch", f"{why_not_cuda}; {why_not_triton}")
        return "torch"
    if impl == "cuda" and op == "head_loss":
        mod, why = _cuda_ext()
        if mod is None:
            raise InputError(f"backend 'cuda' requested but {why}")
        if dev.type != "cuda":
            raise InputError(f"backend 'cuda' needs CUDA tensors, got device {dev}")
        return "cuda"
    # impl == "triton", or "cuda" for the trunk (served by Triton)
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

    All three outputs carry gradients to hidden, weight and bias with the torch and triton impls (the cuda
    extension defines its own contract for rmse / kl).
    """
    which = resolve_impl(impl, hidden.device, "head_loss")
    if which == "torch":
        return head_loss_reference(hidden, weight, bias, target, lambda_kl, kl_eps)
    if which == "triton":
        from inrscrecon.kernels.triton_head_loss import triton_head_loss

        return triton_head_loss(hidden, weight, bias, target, lambda_kl, kl_eps)
    mod, _ = _cuda_ext()
    return mod.cuda_head_loss(hidden, weight, bias, target, lambda_kl, kl_eps)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softplus(h Wᵀ + b) against a sparse CSR target → (RMSE + λ·KL, RMSE, KL) fp32 scalars.

    Equals :func:`head_loss` on the densified target (rows weighted by ``row_weight``; see
    :func:`~inrscrecon.field.losses.sparse_head_loss_reference`). Slots at positions ≥ indptr[B] are
    ignored, so fixed-capacity buffers keep shapes static from step to step. Gradients flow to hidden,
    weight and bias. The fused impls never build a [B, M] target or prediction in global memory.
    """
    _check_sparse(hidden, weight, bias, indptr, indices, values, row_weight)
    which = resolve_impl(impl, hidden.device, "sparse_head_loss")
    if which == "torch":
        return sparse_head_loss_reference(
            hidden, weight, bias, indptr, indices, values, lambda_kl, kl_eps, row_weight
        )
    from inrscrecon.kernels.triton_sparse_head_loss import triton_sparse_head_loss

    return triton_sparse_head_loss(
        hidden, weight, bias, indptr, indices, values, lambda_kl, kl_eps, row_weight
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
    which = resolve_impl(impl, coords.device, "trunk")
    widths = {cast(nn.Linear, layer).out_features for layer in trunk.layers}
    if which == "triton" and impl == "auto" and (max(widths) > 256 or 3 + 6 * n_bands > 256):
        _announce("trunk", "torch", "width or encoding above the fused kernel's 256 limit")
        which = "torch"
    if which == "torch":
        return trunk(fourier_encode(coords, n_bands, include_input=True))
    from inrscrecon.kernels.triton_trunk import triton_trunk

    linears = [cast(nn.Linear, layer) for layer in trunk.layers]
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears]
    return triton_trunk(coords, n_bands, weights, biases)


__all__ = ["IMPLS", "head_loss", "resolve_impl", "sparse_head_loss", "trunk_forward"]
