"""Data-parallel training helpers (DESIGN "Scale"): process-group setup from ``torchrun``'s environment, the
rank's shard of a global batch, and a loss module whose DDP-averaged gradient equals the single-process
gradient of the same global batch.

Why a special loss: DDP averages gradients over ranks, which is exact for batch means (KL, RC) over
equal-size shards, but RMSE = sqrt(mean over the global batch) is not the mean of the shards' RMSEs. With
Σ_k S_k the global sum of squared errors over B rows and M genes and R = sqrt(Σ_k S_k / (B M)),

    dR/dθ = Σ_k (n_k / B) · (r_k / R) · dr_k/dθ,   r_k = sqrt(S_k / (n_k M)) the rank's own RMSE,

so rank k back-propagates ``world · (n_k / B) · (r_k / R) · r_k`` (coefficient detached) and
``world · (n_k / B) · (λ_KL · KL_k + λ_RC · RC_k)``; DDP's average over ``world`` ranks then gives exactly the
global gradient, for any shard sizes. R and the global parts come from one all-reduce of
(S_k, n_k · KL_k, n_k · RC_k) in the forward pass.

A count likelihood's NLL (and its KL) is a mean over weighted rows: with W_k the rank's row-weight sum
(cells with counts) and W = Σ_k W_k, rank k back-propagates ``world · (W_k / W) · (NLL_k + λ_KL · KL_k)``
(RC as above), which DDP's average turns into the global batch's gradient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from inrscrecon.field.losses import LossConfig
from inrscrecon.field.model import INRField
from inrscrecon.train.objective import SparseTarget, count_rows, loss_terms, split_parts


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def info() -> DistInfo:
    """Rank and world size of the initialised process group (0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        )
    return DistInfo()


def init_from_env(device: str = "cpu") -> DistInfo:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1, ``RANK``,
    ``MASTER_ADDR``…): NCCL when ``device`` is CUDA, gloo on CPU. No-op for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return info()


def device_for(device: str, di: DistInfo) -> str:
    """``cuda`` → ``cuda:LOCAL_RANK`` under a multi-process job; other devices unchanged."""
    return f"cuda:{di.local_rank}" if device == "cuda" and di.world > 1 else device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def allreduce_numpy(values: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over ranks (a copy; the input when there is no process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.from_numpy(np.ascontiguousarray(values)).clone()
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().numpy()


def shard(rows: np.ndarray, di: DistInfo) -> np.ndarray:
    """This rank's contiguous part of a global batch ``rows`` [B] (sorted rows → each rank reads its own
    range of chunks); sizes differ by at most one."""
    if di.world == 1:
        return rows
    return np.array_split(rows, di.world)[di.rank]


class ShardLoss(nn.Module):
    """RMSE + λ_KL·KL + λ_RC·RC on one rank's shard, weighted so that DDP's gradient average is the global
    batch's gradient (module docstring). Wrap in DistributedDataParallel and call with the shard."""

    def __init__(
        self,
        model: INRField,
        loss_cfg: LossConfig,
        extractor: nn.Module | None,
        impl: str,
        world: int,
        precision: str = "fp32",
    ):
        super().__init__()
        self.model = model
        self.loss_cfg = loss_cfg
        self._extractor = (extractor,)  # kept out of the module tree: frozen, identical on every rank
        self.impl = impl
        self.world = world
        self.precision = precision

    def forward(
        self,
        coords: torch.Tensor,  # [n_k, 3] normalised
        target: torch.Tensor | SparseTarget,  # [n_k, M] or the shard's CSR rows
        n_global: int,
        log_offset: torch.Tensor | None = None,  # [n_k] count losses with a dense target
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to back-propagate, global parts [5] in ``PARTS`` order, on the device)."""
        lc = self.loss_cfg
        ext = self._extractor[0]
        r, k, rc = loss_terms(self.model, coords, target, lc, ext, self.impl, self.precision, log_offset)
        n_k, m = coords.shape[0], self.model.cfg.n_genes
        if lc.likelihood != "rmse":  # r is the NLL: weighted means over rows
            off = log_offset if isinstance(target, torch.Tensor) else target.log_offset
            assert off is not None
            w_k = count_rows(off)[1].sum().double()
            stats = torch.stack(
                [r.detach().double() * w_k, k.detach().double() * w_k, rc.detach().double() * n_k, w_k]
            )
            dist.all_reduce(stats)
            big_w = stats[3].clamp_min(1e-30)
            frac_w = (self.world * w_k / big_w).float()
            loss = frac_w * (r + lc.lambda_kl * k) + self.world * n_k / n_global * lc.lambda_rc * rc
            g_nll, g_kl, g_rc = stats[0] / big_w, stats[1] / big_w, stats[2] / n_global
            total = g_nll + lc.lambda_kl * g_kl + lc.lambda_rc * g_rc
            return loss, split_parts(total, g_nll, g_kl, g_rc, lc.likelihood)
        stats = torch.stack(
            [r.detach().double() ** 2 * n_k * m, k.detach().double() * n_k, rc.detach().double() * n_k]
        )
        dist.all_reduce(stats)
        big_r = torch.sqrt(stats[0] / (n_global * m))
        frac = self.world * n_k / n_global
        coef = torch.where(big_r > 0, r.detach().double() / big_r, torch.zeros_like(big_r)).float()
        loss = frac * (coef * r + lc.lambda_kl * k + lc.lambda_rc * rc)
        g_kl, g_rc = stats[1] / n_global, stats[2] / n_global
        total = big_r + lc.lambda_kl * g_kl + lc.lambda_rc * g_rc
        return loss, split_parts(total, big_r, g_kl, g_rc, lc.likelihood)


__all__ = [
    "DistInfo",
    "ShardLoss",
    "allreduce_numpy",
    "barrier",
    "cleanup",
    "device_for",
    "info",
    "init_from_env",
    "shard",
]
