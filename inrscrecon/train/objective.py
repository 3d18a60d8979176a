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


def objective(
    model: INRField,
    coords: torch.Tensor,  # [B, 3] normalised
    target: torch.Tensor,  # [B, M] log1p-normalised
    loss_cfg: LossConfig,
    extractor: nn.Module | None = None,
    impl: str = "torch",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss (scalar with grad) and its parts as floats.

    With RC off the head and loss go through the fused ``head_loss`` of the chosen backend (the [B, M]
    prediction is never materialised in fp32 on the fused paths); with RC on, the prediction is needed by the
    extractor and the plain torch path is used.
    """
    enc = model.cfg.encoding
    if impl == "torch" or enc.kind != "fourier" or not enc.include_input:
        hidden = model.hidden(coords)
    else:
        from inrscrecon.field.fused import trunk_forward

        hidden = trunk_forward(coords, enc.n_bands, model.trunk, impl=impl)
    w, b = model.head.weight, model.head.bias
    if loss_cfg.lambda_rc > 0 and extractor is not None:
        pred = model.head_out(hidden)
        r = rmse(pred, target)
        k = (
            kl_divergence(pred, target, loss_cfg.kl_eps)
            if loss_cfg.lambda_kl
            else torch.zeros((), device=pred.device)
        )
        rc = representation_consistency(extractor, pred, target)
        loss = r + loss_cfg.lambda_kl * k + loss_cfg.lambda_rc * rc
        return loss, {"loss": loss.item(), "rmse": r.item(), "kl": k.item(), "rc": rc.item()}
    if impl == "torch":
        loss, r, k = head_loss_reference(hidden, w, b, target, loss_cfg.lambda_kl, loss_cfg.kl_eps)
    else:
        from inrscrecon.field.fused import head_loss

        loss, r, k = head_loss(hidden, w, b, target, loss_cfg.lambda_kl, loss_cfg.kl_eps, impl=impl)
    return loss, {"loss": loss.item(), "rmse": r.item(), "kl": k.item(), "rc": 0.0}
