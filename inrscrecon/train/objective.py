"""The training objective on one batch: RMSE + λ1·RC + λ2·KL (DESIGN §3), through the selected backend.

The target is either a dense [B, M] tensor (streaming tables, references) or the batch's sparse CSR rows
(:class:`~inrscrecon.data.device_table.SparseBatch` from the device-resident table): with RC off, the sparse
target goes straight into the sparse-target head + loss, and no [B, M] target exists. Parts are returned as
device tensors so that a training step never waits for the host.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from inrscrecon.field.losses import (
    LossConfig,
    head_loss_reference,
    kl_divergence,
    representation_consistency,
    rmse,
)
from inrscrecon.field.model import INRField

PRECISIONS = ("auto", "fp32", "bf16")
PARTS = ("loss", "rmse", "kl", "rc")  # order of the parts tensor


class SparseTarget(Protocol):
    """CSR targets of a batch: indptr [B+1] int64, indices [CAP] int32 gene, values [CAP] fp32 (padding past
    indptr[B] is ignored)."""

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor

    def dense(self, n_genes: int) -> torch.Tensor: ...


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Dtype of the head's matmul: ``auto`` = bf16 on CUDA (fp32 accumulation in the kernels), fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def _autocast_trunk(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the trunk runs under bf16 autocast: with a bf16 head on CUDA (fit's default there)."""
    return dtype == torch.bfloat16 and device.type == "cuda"


def loss_terms(
    model: INRField,
    coords: torch.Tensor,  # [B, 3] normalised
    target: torch.Tensor | SparseTarget,  # [B, M] log1p-normalised, or the batch's CSR rows
    loss_cfg: LossConfig,
    extractor: nn.Module | None = None,
    impl: str = "torch",
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(RMSE, KL, RC) scalars with gradients; KL / RC are 0 when their λ is 0.

    A sparse target uses the sparse-target head + loss (``field.fused.sparse_head_loss``) unless RC is on
    (the extractor needs the dense profile, which is then built from the CSR rows).

    With RC off the head and loss go through the fused ``head_loss`` of the chosen backend (the [B, M]
    prediction is never materialised in fp32 on the fused paths); with RC on, the prediction is needed by the
    extractor and the plain torch path is used. Mixed precision casts the head's inputs (hidden, weight,
    bias) to bf16 and, on CUDA, runs the trunk under bf16 autocast; the fp32 master weights receive the
    gradients through the casts.
    """
    enc = model.cfg.encoding
    dtype = compute_dtype(precision, coords.device)
    # bf16 on CUDA: the trunk's matmuls run under autocast (tensor cores, fp32 accumulation, fp32 masters)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=_autocast_trunk(dtype, coords.device)):
        if impl == "torch" or enc.kind != "fourier" or not enc.include_input:
            hidden = model.hidden(coords)
        else:
            from inrscrecon.field.fused import trunk_forward

            hidden = trunk_forward(coords, enc.n_bands, model.trunk, impl=impl)
    w, b = model.head.weight.to(dtype), model.head.bias.to(dtype)
    hidden = hidden.to(dtype)
    zero = torch.zeros((), device=coords.device)
    rc_on = loss_cfg.lambda_rc > 0 and extractor is not None
    if not isinstance(target, torch.Tensor):  # CSR rows (a SparseTarget; duck-typed: traceable)
        if not rc_on:
            from inrscrecon.field.fused import sparse_head_loss

            _, r, k = sparse_head_loss(
                hidden,
                w,
                b,
                target.indptr,
                target.indices,
                target.values,
                loss_cfg.lambda_kl,
                loss_cfg.kl_eps,
                impl=impl,
                indices_sorted=bool(getattr(target, "indices_sorted", False)),
            )
            return r, k, zero
        target = target.dense(model.cfg.n_genes)
    if rc_on and extractor is not None:
        pred = torch.nn.functional.softplus(torch.nn.functional.linear(hidden, w, b)).float()
        k = kl_divergence(pred, target, loss_cfg.kl_eps) if loss_cfg.lambda_kl else zero
        return rmse(pred, target), k, representation_consistency(extractor, pred, target)
    if impl == "torch":
        _, r, k = head_loss_reference(hidden, w, b, target, loss_cfg.lambda_kl, loss_cfg.kl_eps)
    else:
        from inrscrecon.field.fused import head_loss

        _, r, k = head_loss(hidden, w, b, target.to(dtype), loss_cfg.lambda_kl, loss_cfg.kl_eps, impl=impl)
    return r, k, zero


def objective_tensors(
    model: INRField,
    coords: torch.Tensor,  # [B, 3] normalised
    target: torch.Tensor | SparseTarget,  # [B, M] or CSR rows
    loss_cfg: LossConfig,
    extractor: nn.Module | None = None,
    impl: str = "torch",
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total loss RMSE + λ_KL·KL + λ_RC·RC (scalar with grad) and its detached parts [4] (order ``PARTS``),
    on the device: nothing here waits for the host."""
    r, k, rc = loss_terms(model, coords, target, loss_cfg, extractor, impl, precision)
    loss = r + loss_cfg.lambda_kl * k + loss_cfg.lambda_rc * rc
    return loss, torch.stack([loss, r, k, rc]).detach().float()


def objective(
    model: INRField,
    coords: torch.Tensor,  # [B, 3] normalised
    target: torch.Tensor | SparseTarget,  # [B, M] log1p-normalised, or CSR rows
    loss_cfg: LossConfig,
    extractor: nn.Module | None = None,
    impl: str = "torch",
    precision: str = "fp32",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss (scalar with grad) and its parts as floats (reads them back: one host sync)."""
    loss, parts = objective_tensors(model, coords, target, loss_cfg, extractor, impl, precision)
    return loss, dict(zip(PARTS, parts.tolist()))
