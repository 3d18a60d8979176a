"""Training loop: seeded batches from the stacked sections, Adam + cosine schedule, validation split with
early stopping, progress bar, atomic checkpoints every K steps and exact resume.

Data parallel: when a ``torch.distributed`` process group is initialised (``torchrun``; see
:mod:`inrscrecon.train.distributed`), every rank builds the same global batch of ``batch_size`` rows, keeps
its contiguous shard, and trains a DistributedDataParallel copy whose averaged gradient equals the global
batch's; validation is sharded and all-reduced; only rank 0 writes checkpoints; every rank resumes from them.
With one process nothing changes. The table may be an in-memory CellTable or a streaming table that offers
``epoch_order`` (chunk-wise shuffling, :mod:`inrscrecon.data.streaming`).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from inrscrecon.data.stack import CellTable
from inrscrecon.data.streaming import StreamingTable
from inrscrecon.errors import InputError
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.losses import LossConfig, ProfileExtractor, pretrain_extractor
from inrscrecon.field.model import FieldConfig, INRField
from inrscrecon.train import distributed as ddp
from inrscrecon.train.checkpoint import load_checkpoint, save_checkpoint
from inrscrecon.train.objective import objective

Table = CellTable | StreamingTable  # anything with coords, targets(rows), n_cells, genes


@dataclass
class TrainConfig:
    """Optimisation settings. ``checkpoint_every`` is in optimizer steps; ``patience`` in epochs."""

    epochs: int = 60
    batch_size: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    val_fraction: float = 0.1
    patience: int = 8
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "cpu"
    backend: str = "torch"
    precision: str = "auto"  # head matmul dtype: auto = bf16 on CUDA, fp32 on CPU; or "fp32" / "bf16"
    progress: bool = True
    stop_after_steps: int | None = None  # simulate an interruption (tests)


@dataclass
class FitResult:
    """The trained field (best validation epoch) and the per-epoch history."""

    model: INRField
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    interrupted: bool = False


def _split(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * frac)) if n >= 20 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@torch.no_grad()
def _sse(model: INRField, table: Table, rows: np.ndarray, device: str, chunk: int) -> tuple[float, int]:
    sse, n = 0.0, 0
    model.eval()
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]
        xyz = model.normalize(torch.as_tensor(table.coords[r], device=device))
        pred = model(xyz)
        sse += float(((pred - torch.as_tensor(table.targets(r), device=device)) ** 2).sum())
        n += pred.numel()
    model.train()
    return sse, n


def validation_rmse(model: INRField, table: Table, rows: np.ndarray, device: str, chunk: int = 4096) -> float:
    """RMSE of the field on ``rows`` of ``table`` (log1p-normalised units); sharded and all-reduced over
    ranks when a process group is initialised."""
    di = ddp.info()
    sse, n = _sse(model, table, ddp.shard(rows, di), device, chunk)
    if di.world > 1:
        tot = ddp.allreduce_numpy(np.array([sse, n], dtype=np.float64))
        sse, n = float(tot[0]), int(tot[1])
    return math.sqrt(sse / max(n, 1))


def _epoch_rows(table: Table, train_rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Training rows in this epoch's visiting order: the table's own (chunk-wise) order when it has one,
    else a seeded uniform permutation."""
    sampler = getattr(table, "epoch_order", None)
    order = sampler(train_rows, seed, epoch) if sampler is not None else None
    if order is None:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = train_rows[torch.randperm(len(train_rows), generator=gen).numpy()]
    return order


def _rng_state() -> dict:
    return {"torch": torch.random.get_rng_state()}


def fit(
    table: Table,
    encoding: EncodingConfig | None = None,
    width: int = 256,
    n_layers: int = 4,
    loss_cfg: LossConfig | None = None,
    train_cfg: TrainConfig | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
) -> FitResult:
    """Fit a field to ``table``; returns the model at its best validation epoch.

    ``checkpoint``: path written atomically every ``checkpoint_every`` steps and at each epoch end;
    ``resume=True`` continues from it and reaches the same result as an uninterrupted run.
    """
    loss_cfg = loss_cfg or LossConfig()
    tc = train_cfg or TrainConfig()
    di = ddp.info()
    device = ddp.device_for(tc.device, di)
    train_rows, val_rows = _split(table.n_cells, tc.val_fraction, tc.seed)
    center, scale = FieldConfig.frame_for(table.coords)
    cfg = FieldConfig(
        len(table.genes), encoding or EncodingConfig(), width, n_layers, center, scale, list(table.genes)
    )
    torch.manual_seed(tc.seed)
    model = INRField(cfg).to(device)
    init_rows = np.sort(
        np.random.default_rng(tc.seed).choice(train_rows, min(len(train_rows), 4096), replace=False)
    )
    model.init_head_bias(torch.as_tensor(table.targets(init_rows).mean(axis=0)))
    extractor: ProfileExtractor | None = None
    if loss_cfg.lambda_rc > 0:
        sample = np.random.default_rng(tc.seed).choice(train_rows, min(len(train_rows), 2048), replace=False)
        extractor = pretrain_extractor(
            torch.as_tensor(table.targets(np.sort(sample))), loss_cfg.rc_dim, seed=tc.seed
        )
        extractor = extractor.to(device)
    bs = min(tc.batch_size, len(train_rows))
    if bs < di.world:
        raise InputError(f"batch size {bs} is smaller than the number of processes ({di.world})")
    step_fn = None
    if di.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        step_fn = DistributedDataParallel(
            ddp.ShardLoss(model, loss_cfg, extractor, tc.backend, di.world, tc.precision), device_ids=ids
        )
    steps_per_epoch = max(len(train_rows) // bs, 1)
    total = steps_per_epoch * tc.epochs
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)

    def lr_at(step: int) -> float:
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * min(step / total, 1.0))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    st: dict[str, Any] = {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "best_val": math.inf,
        "bad_epochs": 0,
    }
    history: list[dict[str, float]] = []
    best_state = copy.deepcopy(model.state_dict())
    ckpt = Path(checkpoint) if checkpoint else None
    if resume and ckpt is not None and ckpt.exists():
        saved = load_checkpoint(ckpt)
        if saved["field_config"] != cfg.to_json() or saved["loss_config"] != json.dumps(asdict(loss_cfg)):
            raise InputError(f"{ckpt}: checkpoint was made with another configuration; cannot resume")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if extractor is not None:
            extractor.load_state_dict(saved["extractor"])
        best_state = saved["best_model"]
        st = saved["counters"]
        history = saved["history"]
        torch.random.set_rng_state(saved["rng"]["torch"])

    def save() -> None:
        if ckpt is None:
            return
        if not di.main:  # rank 0 writes; the others wait so that nobody reads a checkpoint being replaced
            ddp.barrier()
            return
        save_checkpoint(
            {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "extractor": extractor.state_dict() if extractor is not None else {}, "best_model": best_state,
                "counters": dict(st), "history": history, "rng": _rng_state(),
                "field_config": cfg.to_json(), "loss_config": json.dumps(asdict(loss_cfg)),
            },
            ckpt,
        )  # fmt: skip
        if di.world > 1:
            ddp.barrier()

    stopped = interrupted = False
    show = tc.progress and di.main
    bar = tqdm(total=tc.epochs, initial=st["epoch"], desc="fit", unit="epoch", disable=not show)
    model.train()
    while st["epoch"] < tc.epochs and not stopped:
        order = _epoch_rows(table, train_rows, tc.seed, st["epoch"])
        parts_sum: dict[str, float] = {}
        for step in range(st["step_in_epoch"], steps_per_epoch):
            rows = np.sort(order[step * bs : (step + 1) * bs])
            mine = ddp.shard(rows, di)
            xyz = model.normalize(torch.as_tensor(table.coords[mine], device=device))
            target = torch.as_tensor(table.targets(mine), device=device)
            if step_fn is None:
                loss, parts = objective(model, xyz, target, loss_cfg, extractor, tc.backend, tc.precision)
            else:
                loss, parts = step_fn(xyz, target, len(rows))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
            st["global_step"] += 1
            st["step_in_epoch"] = step + 1
            if tc.stop_after_steps is not None and st["global_step"] >= tc.stop_after_steps:
                save()
                interrupted = True
                break
            if st["global_step"] % tc.checkpoint_every == 0:
                save()
        if interrupted:
            break
        n_steps = max(steps_per_epoch, 1)
        record = {k: v / n_steps for k, v in parts_sum.items()}
        val = validation_rmse(model, table, val_rows, device) if len(val_rows) else record.get("rmse", 0.0)
        record.update(epoch=float(st["epoch"]), val_rmse=val)
        history.append(record)
        if val < st["best_val"] - 1e-6:
            st["best_val"], st["bad_epochs"] = val, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            st["bad_epochs"] += 1
            stopped = st["bad_epochs"] >= tc.patience
        st["epoch"] += 1
        st["step_in_epoch"] = 0
        save()
        bar.update(1)
        bar.set_postfix(loss=f"{record.get('loss', 0):.4f}", val_rmse=f"{val:.4f}")
    bar.close()
    if not interrupted:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(model, history, stopped_early=stopped, interrupted=interrupted)
