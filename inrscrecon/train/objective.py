"""The training objective on one batch: RMSE + λ1·RC + λ2·KL (DESIGN §3), through the selected backend.

With a count likelihood (``LossConfig.likelihood`` "poisson" | "nb") the data term is the count NLL of raw
counts with the library size as an offset instead of the RMSE: the target is raw counts and each row carries
its offset o = log(L / 1e4) (−inf for a cell with no counts: such rows get weight 0); KL and RC still act on the
normalised prediction softplus(η) against the log1p-normalised target.

The target is either a dense [B, M] tensor (streaming tables, references) or the batch's sparse CSR rows
(:class:`~inrscrecon.data.device_table.SparseBatch` from the device-resident table): with RC off, the sparse
target goes straight into the sparse-target head + loss, and no [B, M] target exists. Parts are returned as
device tensors so that a training step never waits for the host.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from inrscrecon.data.preprocess import TARGET_SUM
from inrscrecon.field.losses import (
    LossConfig,
    count_head_loss_reference,
    head_loss_reference,
    kl_divergence,
    normalised_counts,
    representation_consistency,
    rmse,
    sparse_count_head_loss_reference,
)
from inrscrecon.field.model import INRField

PRECISIONS = ("auto", "fp32", "bf16")
#: weight of the library-size head's MSE (standardised log L) beside the count NLL
LIBRARY_WEIGHT = 0.1
#: order of the parts tensor; "rmse" is 0 under a count likelihood and "nll" is 0 under RMSE
PARTS = ("loss", "rmse", "kl", "rc", "nll")


class SparseTarget(Protocol):
    """CSR targets of a batch: indptr [B+1] int64, indices [CAP] int32 gene, values [CAP] fp32 (padding past
    indptr[B] is ignored); for count losses raw counts with ``log_offset`` [B] set."""

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    log_offset: torch.Tensor | None

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


def count_rows(log_offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets [B] (−inf where L = 0) → (offsets with those set to 0, row weights [B]: 0 there, else 1)."""
    finite = torch.isfinite(log_offset)
    return torch.where(finite, log_offset.float(), 0.0), finite.float()


def _batch_offset(target: torch.Tensor | SparseTarget, log_offset: torch.Tensor | None) -> torch.Tensor:
    off = log_offset if isinstance(target, torch.Tensor) else getattr(target, "log_offset", None)
    if off is None:
        raise ValueError("a count likelihood needs raw-count batches with their log offsets")
    return off


def loss_terms(
    model: INRField,
    coords: torch.Tensor,  # [B, 3] normalised
    target: torch.Tensor | SparseTarget,  # [B, M] log1p-normalised (raw counts), or the batch's CSR rows
    loss_cfg: LossConfig,
    extractor: nn.Module | None = None,
    impl: str = "torch",
    precision: str = "fp32",
    log_offset: torch.Tensor | None = None,  # [B] count losses with a dense target
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data term, KL, RC) scalars with gradients; KL / RC are 0 when their λ is 0. The data term is the RMSE,
    or the count NLL (mean over weighted rows and genes) under a count likelihood.

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
            hidden = model.with_codes(hidden, coords)  # + the section-code term, as model.hidden adds it
    w, b = model.head.weight.to(dtype), model.head.bias.to(dtype)
    hidden = hidden.to(dtype)
    zero = torch.zeros((), device=coords.device)
    rc_on = loss_cfg.lambda_rc > 0 and extractor is not None
    if loss_cfg.likelihood != "rmse":
        return _count_terms(
            model, hidden, w, b, target, loss_cfg, extractor if rc_on else None, impl, log_offset
        )
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


def _count_terms(
    model: INRField,
    hidden: torch.Tensor,  # [B, W] in the head's dtype
    w: torch.Tensor,  # [M, W]
    b: torch.Tensor,  # [M]
    target: torch.Tensor | SparseTarget,  # [B, M] raw counts, or CSR rows of raw counts
    loss_cfg: LossConfig,
    extractor: nn.Module | None,  # RC on when given
    impl: str,
    log_offset: torch.Tensor | None,  # [B] with a dense target
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(NLL, KL, RC) of a count likelihood: the count references on the torch backend, else the fused ops.
    With a library head the NLL slot also carries ``LIBRARY_WEIGHT`` × :func:`library_loss` (the validation
    NLL does not)."""
    nll, k, rc = _count_nll_terms(model, hidden, w, b, target, loss_cfg, extractor, impl, log_offset)
    if model.library_head is not None:
        off, row_w = count_rows(_batch_offset(target, log_offset))
        nll = nll + LIBRARY_WEIGHT * library_loss(model, hidden, off, row_w)
    return nll, k, rc


def library_loss(
    model: INRField,
    hidden: torch.Tensor,  # [B, W]
    log_offset: torch.Tensor,  # [B] log(L / 1e4), 0 where L = 0
    row_weight: torch.Tensor,  # [B] 0 where L = 0
) -> torch.Tensor:
    """Weighted mean squared error of the library head on the standardised log library sizes (features
    detached when ``cfg.library_detach``: the gene field then trains exactly as without the head)."""
    cfg = model.cfg
    h = hidden.detach() if cfg.library_detach else hidden
    pred = model.log_library(h.float())
    z = (pred - (log_offset.float() + math.log(TARGET_SUM))) / cfg.library_sd
    return (row_weight * z.square()).sum() / row_weight.sum().clamp_min(1.0)


def _count_nll_terms(
    model: INRField,
    hidden: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    target: torch.Tensor | SparseTarget,
    loss_cfg: LossConfig,
    extractor: nn.Module | None,
    impl: str,
    log_offset: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lik, lam, eps = loss_cfg.likelihood, loss_cfg.lambda_kl, loss_cfg.kl_eps
    off, row_w = count_rows(_batch_offset(target, log_offset))
    log_theta = model.log_theta if lik == "nb" else None
    zero = torch.zeros((), device=hidden.device)
    if extractor is not None:  # RC needs both dense profiles: the plain torch path
        counts = target if isinstance(target, torch.Tensor) else target.dense(model.cfg.n_genes)
        _, nll, k = count_head_loss_reference(hidden, w, b, counts, off, lik, log_theta, lam, eps, row_w)
        pred = torch.nn.functional.softplus(torch.nn.functional.linear(hidden, w, b)).float()
        return nll, k, representation_consistency(extractor, pred, normalised_counts(counts, off))
    if not isinstance(target, torch.Tensor):
        csr = (target.indptr, target.indices, target.values, off, lik, log_theta, lam, eps)
        if impl == "torch":
            _, nll, k = sparse_count_head_loss_reference(hidden, w, b, *csr, row_weight=row_w)
        else:
            from inrscrecon.field.fused import sparse_count_head_loss

            sorted_ = bool(getattr(target, "indices_sorted", False))
            _, nll, k = sparse_count_head_loss(
                hidden, w, b, *csr, row_weight=row_w, impl=impl, indices_sorted=sorted_
            )
        return nll, k, zero
    if impl == "torch":
        _, nll, k = count_head_loss_reference(hidden, w, b, target, off, lik, log_theta, lam, eps, row_w)
    else:
        from inrscrecon.field.fused import count_head_loss

        _, nll, k = count_head_loss(
            hidden, w, b, target.float(), off, lik, log_theta, lam, eps, row_weight=row_w, impl=impl
        )
    return nll, k, zero


def objective_tensors(
    model: INRField,
    coords: torch.Tensor,  # [B, 3] normalised
    target: torch.Tensor | SparseTarget,  # [B, M] or CSR rows
    loss_cfg: LossConfig,
    extractor: nn.Module | None = None,
    impl: str = "torch",
    precision: str = "fp32",
    log_offset: torch.Tensor | None = None,  # [B] count losses with a dense target
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total loss D + λ_KL·KL + λ_RC·RC (D = RMSE, or the count NLL) as a scalar with grad, and its detached
    parts [5] (order ``PARTS``), on the device: nothing here waits for the host."""
    d, k, rc = loss_terms(model, coords, target, loss_cfg, extractor, impl, precision, log_offset)
    loss = d + loss_cfg.lambda_kl * k + loss_cfg.lambda_rc * rc
    return loss, split_parts(loss, d, k, rc, loss_cfg.likelihood)


def split_parts(
    loss: torch.Tensor, data: torch.Tensor, k: torch.Tensor, rc: torch.Tensor, likelihood: str
) -> torch.Tensor:
    """The parts [5] fp32 (order ``PARTS``, detached) with the data term in the "rmse" or "nll" slot."""
    zero = torch.zeros_like(data)
    r, nll = (data, zero) if likelihood == "rmse" else (zero, data)
    return torch.stack([loss, r, k, rc, nll]).detach().float()


def part_names(likelihood: str) -> tuple[str, ...]:
    """The parts a history row reports: ``PARTS`` without the data-term slot the likelihood leaves empty."""
    return tuple(p for p in PARTS if p != ("nll" if likelihood == "rmse" else "rmse"))


def objective(
    model: INRField,
    coords: torch.Tensor,  # [B, 3] normalised
    target: torch.Tensor | SparseTarget,  # [B, M] log1p-normalised (raw counts), or CSR rows
    loss_cfg: LossConfig,
    extractor: nn.Module | None = None,
    impl: str = "torch",
    precision: str = "fp32",
    log_offset: torch.Tensor | None = None,  # [B] count losses with a dense target
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss (scalar with grad) and its parts as floats (reads them back: one host sync)."""
    loss, parts = objective_tensors(model, coords, target, loss_cfg, extractor, impl, precision, log_offset)
    names = part_names(loss_cfg.likelihood)
    return loss, {k: v for k, v in zip(PARTS, parts.tolist()) if k in names}
