"""Training loop: seeded batches from the stacked sections, Adam + cosine schedule, validation split with
early stopping, progress bar, atomic checkpoints every K steps and a resume that cannot drift.

Data path (``TrainConfig.data``): an in-memory CellTable lives on the training device as CSR
(:class:`~inrscrecon.data.device_table.DeviceTable`): each epoch's batches are drawn with the seeded CPU
generator (so CPU and GPU runs see the same batches), copied to the device once, and gathered + normalised
there into fixed-capacity sparse buffers that the sparse-target loss reads; the loss parts accumulate on the
device and are read once per epoch (and at checkpoints), so a step never waits for the host and can be
compiled whole (:mod:`inrscrecon.train.step`). A stack too large for the device streams its CSR batches from
host memory instead (said once). Streaming tables (:mod:`inrscrecon.data.streaming`) keep their chunk-wise
order and feed the same sparse batches, read as CSR from their disk chunks (``data="dense"``: dense host
batches, the reference).

Data parallel: when a ``torch.distributed`` process group is initialised (``torchrun``; see
:mod:`inrscrecon.train.distributed`), every rank builds the same global batch of ``batch_size`` rows, keeps
its contiguous shard, and trains a DistributedDataParallel copy whose averaged gradient equals the global
batch's; validation is sharded and all-reduced; only rank 0 writes checkpoints; every rank resumes from them.
With an in-memory table each rank keeps on its device only its shard: the CSR rows it visits in the epoch
(copied once per epoch, in visiting order) and its validation rows.

Count likelihoods (``LossConfig.likelihood`` "poisson" | "nb"): every data path feeds raw counts and each row's
offset log(L / 1e4) instead of log1p-normalised values (the table must hold raw counts); the head starts at the
log of each gene's mean normalised rate. Each epoch's history keeps ``val_rmse`` (RMSE of the normalised
prediction, comparable across losses) and adds ``val_nll``; early stopping and the best epoch follow the
validation NLL for count losses and the validation RMSE for RMSE. Count models also learn a library-size field
(``INRField.library_head``: the standardised log L(x), MSE weight ``objective.LIBRARY_WEIGHT``, on detached
features by default (:data:`LIBRARY_DETACH`), so the gene field trains as without it), which
:func:`inrscrecon.field.expectation.expected_log1p` uses to predict what a spot there would measure.

Resume: the checkpoint records every setting that changes the result (:data:`RESULT_SETTINGS`, the model and
loss configuration) and a fingerprint of the data; resuming with any of them changed is refused, naming it.
The epoch's running loss sums are checkpointed, so a resumed epoch logs the loss the uninterrupted one does;
a finished run (early-stopped or at its last epoch) resumes to its result without training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from inrscrecon.data.device_table import (
    DeviceTable,
    HostBatchFeeder,
    SparseBatch,
    batch_capacity,
    device_table_or_none,
    squared_error_,
)
from inrscrecon.data.stack import CellTable, require_counts
from inrscrecon.data.streaming import StreamingTable
from inrscrecon.errors import InputError
from inrscrecon.field.encoding import HASHGRID_FIELDS, EncodingConfig
from inrscrecon.field.losses import (
    LossConfig,
    ProfileExtractor,
    count_head_loss_reference,
    pretrain_extractor,
    sparse_count_head_loss_reference,
)
from inrscrecon.field.model import FieldConfig, INRField, check_z_stretch, section_code_settings
from inrscrecon.train import distributed as ddp
from inrscrecon.train.checkpoint import load_checkpoint, save_checkpoint
from inrscrecon.train.objective import PARTS, count_rows, objective_tensors, part_names
from inrscrecon.train.step import TrainStep

Table = CellTable | StreamingTable  # anything with coords, targets(rows), n_cells, genes

log = logging.getLogger(__name__)

#: GPU defaults (``batch_size=None`` / ``lr=None`` on CUDA): a large batch — the largest power of two ≤ 32768
#: that still leaves ``MIN_STEPS`` steps per epoch (a small stack keeps the CPU batch: few, huge steps would
#: train less per epoch) — and the rate scaled by sqrt(B / 512) (Adam's square-root rule), capped.
#: CPU defaults: 512 rows at 2e-3.
CPU_BATCH, CPU_LR = 512, 2e-3
GPU_BATCH, GPU_LR_CAP, MIN_STEPS = 32768, 1e-2, 32

#: ``compile="auto"`` compiles the step on CUDA when the fit trains at least this many cells (steps × batch):
#: compilation costs ~0.5–1 min, an eager GPU step ~1 µs per cell, so below this it cannot pay.
COMPILE_MIN_CELLS = 10**8

#: TrainConfig fields that change the fitted result; a resume with any of them changed is refused.
RESULT_SETTINGS = (
    "epochs",
    "batch_size",
    "lr",
    "min_lr_ratio",
    "val_fraction",
    "patience",
    "seed",
    "precision",
)


@dataclass
class TrainConfig:
    """Optimisation settings. ``checkpoint_every`` is in optimizer steps; ``patience`` in epochs.

    ``batch_size`` / ``lr`` None: device defaults (512 / 2e-3 on CPU; 32768 and a scaled rate on CUDA).
    ``data``: ``auto`` (device-resident CSR for in-memory tables; for streaming tables CSR batches read from
    their disk chunks, as ``host``), ``device`` (an InputError for a streaming table: it does not fit by
    definition), ``host`` (CSR batches streamed from host memory or disk) or ``dense`` (dense host batches,
    the reference path). ``compile``: ``auto`` (on CUDA with the device table, one process, ≥ COMPILE_MIN_CELLS
    cells trained), ``on``, ``off``.
    """

    epochs: int = 60
    batch_size: int | None = CPU_BATCH
    lr: float | None = CPU_LR
    min_lr_ratio: float = 0.05
    val_fraction: float = 0.1
    patience: int = 8
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "cpu"
    backend: str = "torch"
    precision: str = "auto"  # head matmul dtype: auto = bf16 on CUDA, fp32 on CPU; or "fp32" / "bf16"
    data: str = "auto"
    compile: str = "auto"
    progress: bool = True
    stop_after_steps: int | None = None  # simulate an interruption (tests)


@dataclass
class FitResult:
    """The trained field (best validation epoch), the per-epoch history and how the data were fed."""

    model: INRField
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    interrupted: bool = False
    resumed_finished: bool = False  # the checkpoint held a finished run: returned without training
    data_info: dict[str, Any] = field(default_factory=dict)


#: whether a count model's library-size head trains on detached features (FieldConfig.library_detach)
LIBRARY_DETACH = True


def library_settings(table: Table, rows: np.ndarray) -> dict[str, Any]:
    """FieldConfig settings of a count model's library-size head: on, with the mean and s.d. of the natural
    log library size over ``rows`` with counts (the head predicts the standardised value)."""
    tot = np.asarray(table.totals[rows], dtype=np.float64)
    logs = np.log(tot[tot > 0]) if (tot > 0).any() else np.zeros(1)
    sd = float(logs.std())
    return {
        "library_head": True,
        "library_mean": float(logs.mean()),
        "library_sd": sd if sd > 1e-6 else 1.0,
        "library_detach": LIBRARY_DETACH,
    }


def _split(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * frac)) if n >= 20 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def resolved_batch_lr(tc: TrainConfig, device: str, n_train: int | None = None) -> tuple[int, float]:
    """(batch size, learning rate) after the device defaults (:data:`GPU_BATCH`) for ``n_train`` training
    cells (None: a stack large enough for the full GPU batch)."""
    cuda = torch.device(device).type == "cuda"
    if tc.batch_size is not None:
        bs = tc.batch_size
    elif not cuda:
        bs = CPU_BATCH
    else:
        room = GPU_BATCH if n_train is None else max(n_train // MIN_STEPS, 1)
        bs = max(CPU_BATCH, min(GPU_BATCH, 1 << max(room.bit_length() - 1, 0)))
    if tc.lr is not None:
        return bs, tc.lr
    return bs, min(CPU_LR * math.sqrt(bs / CPU_BATCH), GPU_LR_CAP) if bs > CPU_BATCH else CPU_LR


def data_fingerprint(table: Table) -> str:
    """BLAKE2 digest of what the fit sees: genes, coordinates, library sizes, the normalisation and, for
    in-memory tables, every stored count (streaming tables: coordinates + library sizes stand for them).
    Cached on the table (tables are not modified after they are built)."""
    cached = getattr(table, "_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([list(table.genes), float(table.target_sum), int(table.n_cells)]).encode())
    for arr in (table.coords, table.totals):
        h.update(np.ascontiguousarray(arr).data.cast("B"))  # the buffer itself: no copy
    if isinstance(table, CellTable):
        c = table.counts
        for arr in (c.indptr, c.indices, c.data):
            h.update(np.ascontiguousarray(arr).data.cast("B"))  # the buffer itself: no copy
    digest = h.hexdigest()
    table._fingerprint = digest  # type: ignore[union-attr]
    return digest


def run_record(
    table: Table,
    encoding: EncodingConfig | str | None,
    width: int,
    n_layers: int,
    loss_cfg: LossConfig | None,
    tc: TrainConfig,
    *,
    z_stretch: float = 1.0,
    section_code_dim: int = 0,
    head_rank: int = 0,
) -> dict[str, Any]:
    """Every setting that changes a fit's result, plus the data fingerprint (JSON-serialisable).

    ``z_stretch`` / ``section_code_dim`` / ``head_rank`` enter the record only when they differ from their
    defaults, so records of fits made before they existed still match."""
    n_train = len(_split(table.n_cells, tc.val_fraction, tc.seed)[0])
    bs, lr = resolved_batch_lr(tc, tc.device, n_train)
    settings = {k: getattr(tc, k) for k in RESULT_SETTINGS}
    settings.update(batch_size=bs, lr=lr)
    enc: Any = encoding if isinstance(encoding, str) else asdict(encoding or EncodingConfig())
    if isinstance(enc, dict) and enc["kind"] != "hashgrid":  # records of fits made before these fields match
        enc = {k: v for k, v in enc.items() if k not in HASHGRID_FIELDS}
    record: dict[str, Any] = {
        "settings": settings,
        "encoding": enc,
        "width": width,
        "n_layers": n_layers,
        "loss": asdict(loss_cfg or LossConfig()),
        "data": data_fingerprint(table),
    }
    if z_stretch != 1.0:
        record["z_stretch"] = float(z_stretch)
    if section_code_dim != 0:
        record["section_code_dim"] = int(section_code_dim)
    if head_rank != 0:
        record["head_rank"] = int(head_rank)
    return record


def record_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first setting that differs between two :func:`run_record` results, as ``name: old → new``."""
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    for key in sorted(set(flat_saved) | set(flat_now)):
        a, b = flat_saved.get(key, "<absent>"), flat_now.get(key, "<absent>")
        if a != b:
            name = "data fingerprint (the input data changed)" if key == "data" else key
            return f"{name}: {a!r} in the checkpoint, {b!r} now"
    return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = k if prefix in ("", "settings.") else f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{name}."))
        else:
            out[name] = v
    return out


def finished_model(model_path: str | Path, record: dict[str, Any]) -> INRField | None:
    """The model at ``model_path`` when it exists and was fitted with exactly ``record`` (its training record's
    ``run``), else None: a resume of a finished run returns it unchanged."""
    saved = _saved_run(model_path)
    if saved is None or saved != json.loads(json.dumps(record)):
        return None
    return INRField.load(model_path)


def plan_resume(
    model_path: str | Path,
    checkpoints: list[Path],
    record: dict[str, Any],
    resume: bool,
    resume_or_start: bool = False,
) -> str | None:
    """What ``fit --resume`` / ``--resume-or-start`` does: None when ``model_path`` already holds this very run
    (same :func:`run_record`: nothing to train, the file stays as it is); else the ``resume`` mode for
    :func:`fit`. ``--resume`` with none of ``checkpoints`` present (and no finished model) is an InputError."""
    if not (resume or resume_or_start):
        return "no"
    if finished_model(model_path, record) is not None:
        return None
    if not resume_or_start and not any(Path(c).exists() for c in checkpoints):
        why = f"{model_path} is not a finished fit with these settings"
        saved = _saved_run(model_path)
        diff = record_mismatch(saved, json.loads(json.dumps(record))) if saved is not None else None
        if diff is not None:
            why = f"{model_path} was fitted with other settings: {diff.replace('in the checkpoint', 'there')}"
        raise InputError(
            f"{checkpoints[0]}: --resume but there is no checkpoint to resume from ({why}); run without "
            "--resume, or pass --resume-or-start"
        )
    return "or_start"


def _saved_run(model_path: str | Path) -> dict[str, Any] | None:
    """The run record kept in a model file, or None (no file, not a model, no record)."""
    path = Path(model_path)
    if not path.is_file():
        return None
    try:
        return INRField.load(path).training_record.get("run")
    except InputError:
        return None


def _count_nll_sums(
    model: INRField, hidden: torch.Tensor, target: Any, log_offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_b w_b · mean-over-genes NLL_b, Σ_b w_b) of one validation chunk (torch reference, fp32); ``target``
    is dense raw counts [B, M] or a raw-count SparseBatch."""
    lik = model.cfg.likelihood
    off, w = count_rows(log_offset)
    head, theta = model.head, model.log_theta
    if isinstance(target, torch.Tensor):
        _, nll, _ = count_head_loss_reference(
            hidden, head.weight, head.bias, target, off, lik, theta, row_weight=w
        )
    else:
        csr = (target.indptr, target.indices, target.values, off, lik, theta)
        _, nll, _ = sparse_count_head_loss_reference(hidden, head.weight, head.bias, *csr, row_weight=w)
    return nll.double() * w.sum().double(), w.sum().double()


@torch.no_grad()
def _val_sums(model: INRField, table: Table, rows: np.ndarray, device: str, chunk: int) -> np.ndarray:
    """[SSE, n values, Σ w·NLL, Σ w] of the field on ``rows`` (the NLL entries 0 for an RMSE model)."""
    out = torch.zeros(4, dtype=torch.float64, device=device)
    model.eval()
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]
        xyz = model.normalize(torch.as_tensor(table.coords[r], device=device))
        hidden = model.hidden(xyz)
        pred = model.head_out(hidden)
        out[0] += ((pred - torch.as_tensor(table.targets(r), device=device)) ** 2).sum().double()
        out[1] += pred.numel()
        if model.cfg.likelihood != "rmse":
            counts = torch.as_tensor(table.raw_targets(r), device=device)
            offset = torch.as_tensor(table.log_offsets(r), device=device)
            nll, w = _count_nll_sums(model, hidden, counts, offset)
            out[2] += nll
            out[3] += w
    model.train()
    return out.cpu().numpy()


def _scores(sums: np.ndarray, count: bool) -> tuple[float, float | None]:
    """(RMSE, NLL or None) from all-reduced :func:`_val_sums`-style sums."""
    rmse = math.sqrt(float(sums[0]) / max(float(sums[1]), 1.0))
    return rmse, (float(sums[2]) / max(float(sums[3]), 1e-30) if count else None)


def validation_scores(
    model: INRField, table: Table, rows: np.ndarray, device: str, chunk: int = 1024
) -> tuple[float, float | None]:
    """(RMSE of the normalised prediction in log1p units, count NLL per value or None for an RMSE model) of
    the field on ``rows`` of ``table``; sharded and all-reduced over ranks when a process group is set up."""
    di = ddp.info()
    sums = _val_sums(model, table, ddp.shard(rows, di), device, chunk)
    if di.world > 1:
        sums = ddp.allreduce_numpy(sums)
    return _scores(sums, model.cfg.likelihood != "rmse")


def validation_rmse(model: INRField, table: Table, rows: np.ndarray, device: str, chunk: int = 1024) -> float:
    """RMSE of the field on ``rows`` of ``table`` (log1p-normalised units); see :func:`validation_scores`."""
    return validation_scores(model, table, rows, device, chunk)[0]


class _SparseValidation:
    """Validation sums on the sparse data path (:func:`_val_sums`' four entries): the chunks (rows, capacity)
    are fixed once; the sums stay on the device until the epoch's one read. A count model's chunks are
    gathered twice: normalised for the RMSE, raw for the NLL."""

    def __init__(
        self, source: DeviceTable | HostBatchFeeder, rows: np.ndarray, device: str, chunk: int = 4096
    ):
        self.source = source
        self.device = device
        self.chunks = [
            (rows[s : s + chunk], source.exact_capacity(rows[s : s + chunk]))
            for s in range(0, len(rows), chunk)
        ]
        self.dev_rows = (
            [torch.as_tensor(r, device=device) for r, _ in self.chunks]
            if isinstance(source, DeviceTable)
            else []
        )
        self.n = sum(len(r) for r, _ in self.chunks) * source.n_genes

    def _batch(self, k: int, raw: bool) -> SparseBatch:
        rows, cap = self.chunks[k]
        if isinstance(self.source, DeviceTable):
            return self.source.gather(self.dev_rows[k], cap, raw=raw)
        return self.source.gather_host(rows, cap, raw=raw)

    @torch.no_grad()
    def sums(self, model: INRField) -> torch.Tensor:
        """[SSE, n values, Σ w·NLL, Σ w] float64 on the device."""
        total = torch.zeros(4, dtype=torch.float64, device=self.device)
        total[1] = self.n
        count = model.cfg.likelihood != "rmse"
        model.eval()
        for k in range(len(self.chunks)):
            b = self._batch(k, raw=False)
            hidden = model.hidden(model.normalize(b.coords))
            total[0] += squared_error_(model.head_out(hidden), b)  # no dense [B, M] target
            if count:
                rb = self._batch(k, raw=True)
                assert rb.log_offset is not None
                nll, w = _count_nll_sums(model, hidden, rb, rb.log_offset)
                total[2] += nll
                total[3] += w
        model.train()
        return total


def _epoch_rows(table: Table, train_rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Training rows in this epoch's visiting order: the table's own (chunk-wise) order when it has one,
    else a seeded uniform permutation (CPU generator: the same on every device)."""
    sampler = getattr(table, "epoch_order", None)
    order = sampler(train_rows, seed, epoch) if sampler is not None else None
    if order is None:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = train_rows[torch.randperm(len(train_rows), generator=gen).numpy()]
    return order


def epoch_batches(order: np.ndarray, steps: int, bs: int, di: ddp.DistInfo) -> np.ndarray:
    """[steps, B_k] this rank's sorted rows of each step's global batch (contiguous shard of the sorted batch)."""
    batches = np.sort(order[: steps * bs].reshape(steps, bs), axis=1)
    return batches if di.world == 1 else np.array_split(batches, di.world, axis=1)[di.rank]


def _rng_state() -> dict:
    return {"torch": torch.random.get_rng_state()}


def _resume_mode(resume: bool | str) -> str:
    modes = {False: "no", True: "yes", "no": "no", "yes": "yes", "or_start": "or_start"}
    if resume not in modes:
        raise InputError(f"resume must be True, False or 'or_start', got {resume!r}")
    return modes[resume]


def _data_source(
    table: Table, tc: TrainConfig, device: str, raw: bool = False
) -> tuple[DeviceTable | HostBatchFeeder | None, dict]:
    if tc.data not in ("auto", "device", "host", "dense"):
        raise InputError(f"TrainConfig.data must be auto, device, host or dense, got {tc.data!r}")
    if tc.data == "dense":
        return None, {"placement": "dense host batches"}
    if not isinstance(table, CellTable):  # a streaming table: CSR rows read from its disk chunks
        if tc.data == "device":
            raise InputError(
                "data='device' needs an in-memory table: a streaming table's X stays on disk; use "
                "data='auto' or 'host' (CSR batches streamed from disk chunks) or 'dense'"
            )
        log.info("CSR batches streamed from disk chunks")
        return HostBatchFeeder(table, device, raw=raw), {"placement": "CSR batches streamed from disk chunks"}
    source: DeviceTable | None = None
    if tc.data in ("auto", "device"):
        source = device_table_or_none(table, device, raw=raw)
    if source is None:
        return HostBatchFeeder(table, device, raw=raw), {"placement": "CSR batches streamed from host memory"}
    info = {
        "placement": f"CSR resident on {device}",
        "device_bytes": source.nbytes,
        "bytes_per_cell": source.bytes_per_cell,
    }
    log.info(
        "stack resident on %s: %.1f MB, %.0f bytes per cell",
        device,
        source.nbytes / 1e6,
        source.bytes_per_cell,
    )
    return source, info


def fit(
    table: Table,
    encoding: EncodingConfig | None = None,
    width: int = 256,
    n_layers: int = 4,
    loss_cfg: LossConfig | None = None,
    train_cfg: TrainConfig | None = None,
    checkpoint: str | Path | None = None,
    resume: bool | str = False,
    *,
    z_stretch: float = 1.0,
    section_code_dim: int = 0,
    head_rank: int = 0,
) -> FitResult:
    """Fit a field to ``table``; returns the model at its best validation epoch (lowest validation RMSE, or
    validation NLL under a count likelihood).

    ``checkpoint``: path written atomically every ``checkpoint_every`` steps and at each epoch end.
    ``resume=True`` continues from it (InputError when it does not exist or was made with other settings or
    data) and reaches the same result, weights and logged history as an uninterrupted run; ``"or_start"``
    starts afresh when there is no checkpoint. The model's ``training_record["run"]`` holds
    :func:`run_record` of this fit. ``z_stretch`` (normalised z multiplied by it) and ``section_code_dim``
    (per-section appearance codes, 0 = off) and ``head_rank`` (a low-rank gene head: features → Linear(W, r) →
    head, 0 = full) go into the model's FieldConfig; ``loss_cfg.likelihood`` too
    (a count likelihood needs a table of raw counts: InputError otherwise).
    """
    loss_cfg = loss_cfg or LossConfig()
    tc = train_cfg or TrainConfig()
    count = loss_cfg.likelihood != "rmse"
    require_counts(table, loss_cfg.likelihood)
    mode = _resume_mode(resume)
    if isinstance(head_rank, bool) or not isinstance(head_rank, int | np.integer) or head_rank < 0:
        raise InputError(f"head_rank must be a whole number >= 0 (0 = a full gene head), got {head_rank!r}")
    di = ddp.info()
    device = ddp.device_for(tc.device, di)
    train_rows, val_rows = _split(table.n_cells, tc.val_fraction, tc.seed)
    center, scale = FieldConfig.frame_for(table.coords)
    from inrscrecon.query.tissue import tissue_frame  # the training tissue, kept in the model file

    cfg = FieldConfig(
        len(table.genes),
        encoding or EncodingConfig(),
        width,
        n_layers,
        center,
        scale,
        list(table.genes),
        **tissue_frame(table.coords),
        z_stretch=check_z_stretch(table.coords, center, scale, z_stretch),
        **section_code_settings(
            table.coords, getattr(table, "section", None) if section_code_dim > 0 else None, section_code_dim
        ),  # a streaming table builds its [N] section labels on demand: only when codes need them
        likelihood=loss_cfg.likelihood,
        **(library_settings(table, train_rows) if count else {}),
        head_rank=int(head_rank),
    )
    record = run_record(
        table,
        cfg.encoding,
        width,
        n_layers,
        loss_cfg,
        tc,
        z_stretch=z_stretch,
        section_code_dim=section_code_dim,
        head_rank=head_rank,
    )
    ckpt = Path(checkpoint) if checkpoint else None
    if mode == "yes" and (ckpt is None or not ckpt.exists()):
        raise InputError(
            f"{ckpt}: no checkpoint to resume from; run without --resume, or pass --resume-or-start"
            if ckpt is not None
            else "resume needs a checkpoint path"
        )
    torch.manual_seed(tc.seed)
    model = INRField(cfg).to(device)
    if cfg.encoding.kind == "hashgrid":  # the lookup follows the backend switch (auto/cuda: a kernel on CUDA)
        model.encoding.hashgrid.impl = tc.backend if tc.backend in ("torch", "triton") else "auto"
    init_rows = np.sort(
        np.random.default_rng(tc.seed).choice(train_rows, min(len(train_rows), 4096), replace=False)
    )
    if count:  # log of each gene's mean rate per target_sum counts, over the sampled cells with counts
        tot = np.asarray(table.totals[init_rows], dtype=np.float64)
        has = tot > 0
        rates = table.raw_targets(init_rows[has]) * (table.target_sum / tot[has])[:, None]
        model.init_count_bias(
            torch.as_tensor(rates.mean(axis=0) if has.any() else np.zeros(len(table.genes)))
        )
    else:
        model.init_head_bias(torch.as_tensor(table.targets(init_rows).mean(axis=0)))
    extractor: ProfileExtractor | None = None
    if loss_cfg.lambda_rc > 0:
        sample = np.random.default_rng(tc.seed).choice(train_rows, min(len(train_rows), 2048), replace=False)
        extractor = pretrain_extractor(
            torch.as_tensor(table.targets(np.sort(sample))), loss_cfg.rc_dim, seed=tc.seed
        )
        extractor = extractor.to(device)
    bs_req, lr = resolved_batch_lr(tc, device, len(train_rows))
    bs = min(bs_req, len(train_rows))
    if bs < di.world:
        raise InputError(f"batch size {bs} is smaller than the number of processes ({di.world})")
    # under DDP each rank keeps on its device only the rows it visits this epoch (and its validation shard)
    shard_resident = di.world > 1 and isinstance(table, CellTable) and tc.data in ("auto", "device")
    source: DeviceTable | HostBatchFeeder | None
    if shard_resident:
        assert isinstance(table, CellTable)
        source = DeviceTable(
            table, device, rows=np.zeros(0, dtype=np.int64), raw=count
        )  # replaced each epoch
        data_info: dict[str, Any] = {
            "placement": f"CSR shard resident on {device} (rank {di.rank} of {di.world})"
        }
    else:
        source, data_info = _data_source(table, tc, device, raw=count)
    ddp_loss = None
    if di.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        ddp_loss = DistributedDataParallel(
            ddp.ShardLoss(model, loss_cfg, extractor, tc.backend, di.world, tc.precision), device_ids=ids
        )
    steps_per_epoch = max(len(train_rows) // bs, 1)
    total = steps_per_epoch * tc.epochs
    cuda = torch.device(device).type == "cuda"
    if tc.compile not in ("auto", "on", "off"):
        raise InputError(f"TrainConfig.compile must be auto, on or off, got {tc.compile!r}")
    compiled = tc.compile == "on" or (
        tc.compile == "auto"
        and cuda
        and di.world == 1
        and isinstance(source, DeviceTable)
        and total * bs >= COMPILE_MIN_CELLS
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr, capturable=bool(compiled and cuda))
    gather_impl = "torch"
    if cuda and tc.backend != "torch":
        from inrscrecon.field.fused import _triton_importable

        gather_impl = "triton" if _triton_importable() else "torch"
    shard_bs = ddp.shard(np.arange(bs), di).shape[0]
    if shard_resident:
        assert isinstance(table, CellTable)
        cap = batch_capacity(table.counts, train_rows, shard_bs)
    else:
        cap = source.capacity(train_rows, shard_bs) if source is not None else 0

    def loss_of(
        xyz: torch.Tensor, target: Any, n_global: int, log_offset: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if ddp_loss is not None:
            return ddp_loss(xyz, target, n_global, log_offset)
        return objective_tensors(
            model, xyz, target, loss_cfg, extractor, tc.backend, tc.precision, log_offset
        )

    def loss_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # device-table step: rows [B_k]
        assert isinstance(source, DeviceTable)
        b = source.gather(rows, cap, gather_impl)
        return loss_of(model.normalize(b.coords), b, bs)

    def loss_batch(b: SparseBatch) -> tuple[torch.Tensor, torch.Tensor]:  # host-fed sparse step
        return loss_of(model.normalize(b.coords), b, bs)

    def loss_dense(
        xyz: torch.Tensor, target: torch.Tensor, n_global: int, log_offset: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # target: log1p-normalised, or raw counts + log_offset [B_k]
        return loss_of(model.normalize(xyz), target, n_global, log_offset)

    fn = loss_rows if isinstance(source, DeviceTable) else loss_batch if source is not None else loss_dense
    stepper = TrainStep(
        fn, opt, lr, total, tc.min_lr_ratio, compile=compiled, cuda_graphs=compiled and cuda, strict=False
    )
    data_info.update(compiled=compiled, batch_size=bs, lr=lr, capacity=cap)
    val_sparse = None
    if source is not None and len(val_rows):
        val_mine = ddp.shard(val_rows, di)
        if shard_resident:
            assert isinstance(table, CellTable)
            val_source = DeviceTable(table, device, rows=val_mine, raw=count)
            val_sparse = _SparseValidation(val_source, np.arange(len(val_mine)), device)
        else:  # a streaming fit validates in the dense path's chunks: its [chunk, M] temporaries stay as small
            chunk = 1024 if isinstance(table, StreamingTable) else 4096
            val_sparse = _SparseValidation(source, val_mine, device, chunk)
    st: dict[str, Any] = {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "best_val": math.inf,
        "bad_epochs": 0,
        "finished": False,
        "stopped": False,
    }
    history: list[dict[str, float]] = []
    acc = torch.zeros(len(PARTS), dtype=torch.float64, device=device)  # running loss sums of the epoch
    best_state = copy.deepcopy(model.state_dict())
    if mode != "no" and ckpt is not None and ckpt.exists():
        saved = load_checkpoint(ckpt)
        if "run" not in saved:
            raise InputError(
                f"{ckpt}: checkpoint was made by an older version (no run record); cannot resume"
            )
        saved_run = json.loads(saved["run"])
        diff = record_mismatch(saved_run, json.loads(json.dumps(record)))
        if diff is not None or saved["field_config"] != cfg.to_json():
            what = diff or "model configuration"
            raise InputError(
                f"{ckpt}: checkpoint was made with another configuration ({what}); cannot resume"
            )
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if extractor is not None:
            extractor.load_state_dict(saved["extractor"])
        best_state = saved["best_model"]
        st = saved["counters"]
        history = saved["history"]
        acc.copy_(saved["acc"])
        torch.random.set_rng_state(saved["rng"]["torch"])
        if st["finished"]:
            model.load_state_dict(best_state)
            model.eval()
            model.training_record = {**getattr(model, "training_record", {}), "run": record}
            return FitResult(
                model, history, stopped_early=st["stopped"], resumed_finished=True, data_info=data_info
            )

    def save() -> None:
        if ckpt is None:
            return
        if not di.main:  # rank 0 writes; the others wait so that nobody reads a checkpoint being replaced
            ddp.barrier()
            return
        save_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "extractor": extractor.state_dict() if extractor is not None else {},
                "best_model": best_state,
                "counters": dict(st),
                "history": history,
                "rng": _rng_state(),
                "acc": acc.cpu(),
                "field_config": cfg.to_json(),
                "loss_config": json.dumps(asdict(loss_cfg)),
                "run": json.dumps(record),
            },
            ckpt,
        )
        if di.world > 1:
            ddp.barrier()

    interrupted = False
    show = tc.progress and di.main
    bar = tqdm(total=tc.epochs, initial=st["epoch"], desc="fit", unit="epoch", disable=not show)
    model.train()
    while st["epoch"] < tc.epochs and not st["stopped"]:
        order = _epoch_rows(table, train_rows, tc.seed, st["epoch"])
        mine = epoch_batches(order, steps_per_epoch, bs, di) if source is not None else None
        if (
            shard_resident and mine is not None
        ):  # this epoch's rows of this rank, copied once, in visiting order
            assert isinstance(table, CellTable)
            source = DeviceTable(table, device, rows=mine.ravel(), raw=count)
            local = np.arange(mine.size).reshape(mine.shape)
            rows_dev: torch.Tensor | None = torch.as_tensor(local, device=device)
        else:
            rows_dev = torch.as_tensor(mine, device=device) if isinstance(source, DeviceTable) else None
        for step in range(st["step_in_epoch"], steps_per_epoch):
            if rows_dev is not None:
                stepper(acc, st["global_step"], rows_dev[step])
            elif isinstance(source, HostBatchFeeder) and mine is not None:
                nxt = mine[step + 1] if step + 1 < steps_per_epoch else None
                stepper(acc, st["global_step"], source.gather_host(mine[step], cap, nxt))
            else:
                rows = np.sort(order[step * bs : (step + 1) * bs])
                shard = ddp.shard(rows, di)
                xyz = torch.as_tensor(table.coords[shard], device=device)
                if count:
                    target = torch.as_tensor(table.raw_targets(shard), device=device)
                    off = torch.as_tensor(table.log_offsets(shard), device=device)
                    stepper(acc, st["global_step"], xyz, target, len(rows), off)
                else:
                    target = torch.as_tensor(table.targets(shard), device=device)
                    stepper(acc, st["global_step"], xyz, target, len(rows))
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
        scores: tuple[float, float | None] | None = None
        if val_sparse is not None:
            both = torch.cat([acc, val_sparse.sums(model)]).tolist()  # the epoch's one read
            sums, vsums = both[: len(PARTS)], np.array(both[len(PARTS) :])
            if di.world > 1:
                vsums = ddp.allreduce_numpy(vsums)
            scores = _scores(vsums, count)
        else:
            sums = acc.tolist()
        names = part_names(loss_cfg.likelihood)
        record_ep = {k: v / n_steps for k, v in zip(PARTS, sums) if k in names}
        if scores is None:
            if len(val_rows):
                scores = validation_scores(model, table, val_rows, device)
            else:  # no validation cells: the training loss stands in
                scores = (record_ep.get("rmse", math.nan), record_ep.get("nll") if count else None)
        val_rmse, val_nll = scores
        record_ep.update(epoch=float(st["epoch"]), val_rmse=val_rmse)
        if val_nll is not None:
            record_ep["val_nll"] = val_nll
        val = val_nll if val_nll is not None else val_rmse  # the fit's own criterion
        history.append(record_ep)
        acc.zero_()
        if val < st["best_val"] - 1e-6:
            st["best_val"], st["bad_epochs"] = val, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            st["bad_epochs"] += 1
            st["stopped"] = st["bad_epochs"] >= tc.patience
        st["epoch"] += 1
        st["step_in_epoch"] = 0
        st["finished"] = st["stopped"] or st["epoch"] >= tc.epochs
        save()
        bar.update(1)
        shown = {"val_nll": f"{val_nll:.4f}"} if val_nll is not None else {}
        bar.set_postfix(loss=f"{record_ep.get('loss', 0):.4f}", val_rmse=f"{val_rmse:.4f}", **shown)
    bar.close()
    if not interrupted:
        model.load_state_dict(best_state)
    model.eval()
    model.training_record = {**getattr(model, "training_record", {}), "run": record}
    data_info["compiled"] = stepper.compiled  # False when compilation failed and the step ran eager
    return FitResult(
        model, history, stopped_early=st["stopped"], interrupted=interrupted, data_info=data_info
    )
