"""The training objective on one batch: RMSE + λ1·RC + λ2·KL (DESIGN §3), through the selected backend."""

from __future__ import annotations

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


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Dtype of the head's matmul: ``auto`` = bf16 on CUDA (fp32 accumulation in the kernels), fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def loss_terms(
    model: INRField,
    coords: torch.Tensor,  # [B, 3] normalised
    target: torch.Tensor,  # [B, M] log1p-normalised
    loss_cfg: LossConfig,
    extractor: nn.Module | None = None,
    impl: str = "torch",
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(RMSE, KL, RC) scalars with gradients; KL / RC are 0 when their λ is 0.

    With RC off the head and loss go through the fused ``head_loss`` of the chosen backend (the [B, M]
    prediction is never materialised in fp32 on the fused paths); with RC on, the prediction is needed by the
    extractor and the plain torch path is used. Mixed precision casts the head's inputs (hidden, weight,
    bias) to bf16; the fp32 master weights receive the gradients through the cast.
    """
    enc = model.cfg.encoding
    if impl == "torch" or enc.kind != "fourier" or not enc.include_input:
        hidden = model.hidden(coords)
    else:
        from inrscrecon.field.fused import trunk_forward

        hidden = trunk_forward(coords, enc.n_bands, model.trunk, impl=impl)
    dtype = compute_dtype(precision, coords.device)
    w, b = model.head.weight.to(dtype), model.head.bias.to(dtype)
    hidden = hidden.to(dtype)
    zero = torch.zeros((), device=coords.device)
    if loss_cfg.lambda_rc > 0 and extractor is not None:
        pred = torch.nn.functional.softplus(torch.nn.functional.linear(hidden, w, b)).float()
        k = kl_divergence(pred, target, loss_cfg.kl_eps) if loss_cfg.lambda_kl else zero
        return rmse(pred, target), k, representation_consistency(extractor, pred, target)
    if impl == "torch":
        _, r, k = head_loss_reference(hidden, w, b, target, loss_cfg.lambda_kl, loss_cfg.kl_eps)
    else:
        from inrscrecon.field.fused import head_loss

        _, r, k = head_loss(hidden, w, b, target.to(dtype), loss_cfg.lambda_kl, loss_cfg.kl_eps, impl=impl)
    return r, k, zero


def objective(
    model: INRField,
    coords: torch.Tensor,  # [B, 3] normalised
    target: torch.Tensor,  # [B, M] log1p-normalised
    loss_cfg: LossConfig,
    extractor: nn.Module | None = None,
    impl: str = "torch",
    precision: str = "fp32",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss RMSE + λ_KL·KL + λ_RC·RC (scalar with grad) and its parts as floats."""
    r, k, rc = loss_terms(model, coords, target, loss_cfg, extractor, impl, precision)
    loss = r + loss_cfg.lambda_kl * k + loss_cfg.lambda_rc * rc
    return loss, {"loss": loss.item(), "rmse": r.item(), "kl": k.item(), "rc": rc.item()}
