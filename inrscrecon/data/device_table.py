"""The stack on the training device (DESIGN "The data path is part of the hot path").

A :class:`DeviceTable` holds a :class:`~inrscrecon.data.stack.CellTable`'s raw CSR (indptr, gene indices, values),
library sizes and coordinates as tensors on the training device (CPU or CUDA). A batch is gathered there from a
[B] tensor of row ids into *fixed-capacity* CSR buffers, normalised to ``target_sum`` and log1p'd on the way:

    values[j] = log1p(x[rows[b], c] · target_sum / total[rows[b]])   for the j-th non-zero, row b of the batch

(in *raw* mode, for the count losses, values stay the stored counts and each row's offset
``log_offset[b] = log(total[rows[b]] / target_sum)`` comes beside them), so every step has the same shapes
(capacity = the largest number of non-zeros any batch of B training rows can hold; slots past ``indptr[B]``
are zero padding) and nothing of size [B, M] is built. All ops are static-shape
torch ops (searchsorted, gather, where): no host synchronisation, traceable by ``torch.compile(fullgraph=True)``.
The arithmetic follows the C++ CPU gather (scale and product in float64, rounded to float32, log1p in float64),
so a batch equals ``CellTable.targets`` of the same rows.

On CUDA, :meth:`DeviceTable.gather` can route the gather + normalise + log1p to a Triton kernel
(:mod:`inrscrecon.kernels.triton_csr_gather`). A stack that does not fit the device's free memory is not
placed there: :func:`device_table_or_none` says so once and the caller streams host batches instead
(:class:`HostBatchFeeder`: sparse rows gathered on the host, pinned, copied on a side stream one batch ahead).
The same feeder serves a :class:`~inrscrecon.data.streaming.StreamingTable`, whose rows come as CSR from its
disk chunks (:meth:`~inrscrecon.data.streaming.StreamingTable.csr_rows`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from inrscrecon.data.stack import CellTable

if TYPE_CHECKING:
    from inrscrecon.data.streaming import StreamingTable

log = logging.getLogger(__name__)

#: Fraction of the device's free memory the resident stack may take (the rest: model, activations, workspace).
DEVICE_FRACTION = 0.6


@dataclass
class SparseBatch:
    """One batch on the device: coords [B, 3] µm (fp32) and its targets as CSR with a fixed capacity:
    indptr [B+1] int64, indices [CAP] int32 gene, values [CAP] fp32 (slots ≥ indptr[B] are 0). The values are
    log1p-normalised, or raw counts when ``log_offset`` [B] fp32 (log(L / target_sum), −inf where L = 0) is
    set (raw mode, for the count losses)."""

    coords: torch.Tensor  # [B, 3]
    indptr: torch.Tensor  # [B+1]
    indices: torch.Tensor  # [CAP]
    values: torch.Tensor  # [CAP]
    indices_sorted: bool = False  # each row's genes ascending (the fused loss then skips its per-row sort)
    log_offset: torch.Tensor | None = None  # [B] raw mode only

    def dense(self, n_genes: int) -> torch.Tensor:
        """The targets as a dense [B, M] fp32 tensor (reference / RC path; static shapes)."""
        return densify(self.indptr, self.indices, self.values, n_genes)


def densify(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_genes: int) -> torch.Tensor:
    """CSR batch (indptr [B+1], indices / values [CAP], padding past indptr[B]) → dense [B, M] fp32."""
    n_rows = indptr.shape[0] - 1
    cap = indices.shape[0]
    slots = torch.arange(cap, device=indptr.device, dtype=torch.int64)
    row = torch.searchsorted(indptr[1:].contiguous(), slots, right=True)  # [CAP] in [0, B]
    flat = torch.where(row < n_rows, row * n_genes + indices.long(), n_rows * n_genes)  # padding → spare slot
    out = torch.zeros(n_rows * n_genes + 1, device=values.device, dtype=torch.float32)
    out.index_put_((flat,), values.float(), accumulate=True)  # in place: one [B, M] buffer, not two
    return out[: n_rows * n_genes].view(n_rows, n_genes)


def squared_error_(pred: torch.Tensor, batch: SparseBatch) -> torch.Tensor:
    """Σ (pred − t)² over the whole [B, M] grid against the batch's sparse targets t, as a float64 scalar,
    without a dense target: Σ p² − 2 Σ_nz p·t + Σ_nz t². ``pred`` [B, M] fp32 is overwritten (squared in
    place), so no [B, M] temporary exists; for validation (no autograd)."""
    n_rows, n_genes = pred.shape
    cap = batch.indices.shape[0]
    slots = torch.arange(cap, device=pred.device, dtype=torch.int64)
    row = torch.searchsorted(batch.indptr[1:].contiguous(), slots, right=True)  # [CAP] in [0, B]
    live = row < n_rows
    flat = row.clamp(max=max(n_rows - 1, 0)) * n_genes + batch.indices.long()
    t = torch.where(live, batch.values.float(), 0.0)  # [CAP]
    p_nz = torch.where(live, pred.reshape(-1)[flat], 0.0)  # [CAP]
    cross = (p_nz.double() * t.double()).sum()
    return pred.square_().sum().double() - 2.0 * cross + t.double().square().sum()


def csr_bytes(n_cells: int, nnz: int) -> int:
    """Device bytes of a resident stack: indptr int64, indices int32, values fp32, totals fp32, coords fp32."""
    return 8 * (n_cells + 1) + 8 * nnz + 4 * n_cells + 12 * n_cells


def batch_capacity(counts: sp.csr_matrix, rows: np.ndarray, batch: int) -> int:
    """Non-zeros a batch of ``batch`` rows drawn from ``rows`` can hold at most (sum of the largest lengths)."""
    lens = np.diff(counts.indptr)[rows]
    if len(lens) == 0:
        return 1
    k = min(batch, len(lens))
    return max(int(np.partition(lens, len(lens) - k)[len(lens) - k :].sum()), 1)


class DeviceTable:
    """A CellTable's CSR, library sizes and coordinates resident on ``device`` (module docstring)."""

    def __init__(
        self,
        table: CellTable,
        device: str | torch.device,
        rows: np.ndarray | None = None,
        raw: bool = False,
    ):
        """The whole table, or only ``rows`` of it (local row k = ``rows[k]``; a DDP rank's shard).
        ``raw``: batches carry raw counts + offsets (count losses) instead of log1p-normalised values."""
        self.device = torch.device(device)
        self.raw = raw
        counts = table.counts.tocsr() if not sp.isspmatrix_csr(table.counts) else table.counts
        coords, totals = table.coords, table.totals
        if rows is not None:
            counts, coords, totals = counts[rows], coords[rows], totals[rows]
        if not counts.has_sorted_indices:  # genes ascending within each row, once, so batches arrive sorted
            counts = counts.sorted_indices()
        self.n_cells = counts.shape[0]
        self.n_genes = len(table.genes)
        self.genes = list(table.genes)
        self.target_sum = float(table.target_sum)
        self.host_indptr = np.asarray(counts.indptr, dtype=np.int64)
        self._counts = counts
        dev = self.device
        self.indptr = torch.as_tensor(self.host_indptr, device=dev)  # [N+1]
        self.indices = torch.as_tensor(np.asarray(counts.indices, dtype=np.int32), device=dev)  # [NNZ]
        self.data = torch.as_tensor(np.asarray(counts.data, dtype=np.float32), device=dev)  # [NNZ]
        self.totals = torch.as_tensor(np.asarray(totals, dtype=np.float32), device=dev)  # [N]
        self.coords = torch.as_tensor(np.asarray(coords, dtype=np.float32), device=dev)  # [N, 3]
        if self.data.numel() == 0:  # gathers index into data; keep one zero so an empty stack still works
            self.indices = torch.zeros(1, dtype=torch.int32, device=dev)
            self.data = torch.zeros(1, dtype=torch.float32, device=dev)

    @property
    def nbytes(self) -> int:
        """Bytes the resident tensors take on the device."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.indptr, self.indices, self.data, self.totals, self.coords)
        )

    @property
    def bytes_per_cell(self) -> float:
        return self.nbytes / max(self.n_cells, 1)

    def capacity(self, rows: np.ndarray, batch: int) -> int:
        """Fixed CSR capacity for batches of ``batch`` rows drawn from ``rows`` (host arithmetic, once)."""
        return batch_capacity(self._counts, rows, batch)

    def exact_capacity(self, rows: np.ndarray) -> int:
        """Non-zeros of exactly these ``rows`` (for fixed chunks such as the validation cells)."""
        return max(int(np.diff(self.host_indptr)[rows].sum()), 1)

    def gather(
        self, rows: torch.Tensor, cap: int, impl: str = "torch", raw: bool | None = None
    ) -> SparseBatch:
        """Batch of ``rows`` ([B] int64 on the device) with CSR capacity ``cap`` (≥ the rows' non-zeros).

        ``impl="triton"`` normalises with the Triton kernel (CUDA, or the interpreter); ``"torch"`` everywhere.
        ``raw`` (default: the table's mode): raw counts + ``log_offset`` instead of normalised values.
        """
        raw = self.raw if raw is None else raw
        rows = rows.to(torch.int64)
        starts = self.indptr[rows]  # [B]
        lens = self.indptr[rows + 1] - starts  # [B]
        indptr = torch.cat([torch.zeros(1, dtype=torch.int64, device=rows.device), torch.cumsum(lens, 0)])
        n = rows.shape[0]
        slots = torch.arange(cap, device=rows.device, dtype=torch.int64)
        row = torch.searchsorted(indptr[1:].contiguous(), slots, right=True)  # [CAP] in [0, B]
        live = row < n
        rc = row.clamp(max=max(n - 1, 0))
        if impl == "triton" and not raw:
            from inrscrecon.kernels.triton_csr_gather import triton_csr_gather

            genes, values = triton_csr_gather(
                row, indptr, starts.contiguous(), self.indices, self.data, self.totals[rows], self.target_sum
            )
            return SparseBatch(self.coords[rows], indptr, genes, values, indices_sorted=True)
        src = torch.where(live, starts[rc] + (slots - indptr[rc]), 0)  # [CAP] position in the stack's CSR
        genes = torch.where(live, self.indices[src], 0)
        stored = torch.where(live, self.data[src], 0.0)
        if raw:
            offset = log_offset_torch(self.totals[rows], self.target_sum)
            return SparseBatch(
                self.coords[rows], indptr, genes, stored, indices_sorted=True, log_offset=offset
            )
        values = normalize_log1p_torch(stored, rc, live, self.totals[rows], self.target_sum)
        return SparseBatch(self.coords[rows], indptr, genes, values, indices_sorted=True)


def log_offset_torch(totals: torch.Tensor, target_sum: float) -> torch.Tensor:
    """log(L / target_sum) of library sizes [B] fp32 → [B] fp32 (−inf where L = 0); float64 arithmetic as
    :func:`inrscrecon.data.stack.log_offsets`, so the sparse and dense paths see the same offsets."""
    return torch.log(totals.double() / target_sum).float()


def normalize_log1p_torch(
    raw: torch.Tensor,  # [CAP] fp32 raw values
    row: torch.Tensor,  # [CAP] int64 batch row of each slot (clamped)
    live: torch.Tensor,  # [CAP] bool, False = padding slot
    totals: torch.Tensor,  # [B] fp32 library sizes of the batch rows
    target_sum: float,
) -> torch.Tensor:
    """log1p(raw · target_sum / total) per slot, 0 in padding slots and rows with total 0 → [CAP] fp32.

    ``target_sum <= 0``: log1p(raw) only (values already normalised). float64 arithmetic as in the C++ gather.
    """
    x = raw.double()
    if target_sum > 0:
        tot = totals.double()
        scale = torch.where(tot > 0, target_sum / torch.where(tot > 0, tot, 1.0), 0.0)  # [B]
        x = (x * scale[row]).float().double()
    return torch.where(live, torch.log1p(x), 0.0).float()


def device_table_or_none(
    table: CellTable, device: str | torch.device, free_bytes: int | None = None, raw: bool = False
) -> DeviceTable | None:
    """A DeviceTable of ``table`` on ``device``, or None — said once, as a logged warning — when the stack
    would take more than ``DEVICE_FRACTION`` of the device's free memory (``free_bytes``; default: what CUDA
    reports; on CPU the table's arrays are already in memory and are shared, not copied, so it always fits)."""
    dev = torch.device(device)
    need = csr_bytes(table.n_cells, int(table.counts.nnz))
    if free_bytes is None and dev.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(dev)
    if free_bytes is not None and need > DEVICE_FRACTION * free_bytes:
        log.warning(
            "stack needs %.2f GB on %s but %.2f GB are free: streaming CSR batches from host memory instead",
            need / 1e9,
            dev,
            free_bytes / 1e9,
        )
        return None
    return DeviceTable(table, dev, raw=raw)


@dataclass
class _InFlight:
    """A batch on its way to the device: host (pinned) buffers kept alive until the copy is consumed."""

    rows: np.ndarray
    asked: int  # the capacity the caller asked for
    cap: int  # the capacity of the buffers (``asked``, or larger once grown)
    host: list[torch.Tensor]
    dev: list[torch.Tensor]
    event: torch.cuda.Event | None


class _InMemoryRows:
    """A CellTable's rows read as CSR, as a StreamingTable's are (``csr_rows``; genes sorted once when they
    are not)."""

    def __init__(self, table: CellTable):
        counts = table.counts.tocsr()
        self.counts = counts if counts.has_sorted_indices else counts.sorted_indices()
        self.coords, self.totals = table.coords, table.totals

    def csr_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sub = self.counts[rows]
        return (
            np.asarray(sub.indptr, dtype=np.int64),
            np.asarray(sub.indices, dtype=np.int32),
            np.asarray(sub.data, dtype=np.float32),
        )

    def lens(self, rows: np.ndarray) -> np.ndarray:
        return np.diff(self.counts.indptr)[rows]


class HostBatchFeeder:
    """Batches for a stack kept on the host — an in-memory CellTable, or a StreamingTable whose X stays on
    disk — through one host CSR gather (``csr_rows``: sparse, never dense): each batch's rows are gathered on
    the host, put in pinned buffers and sent to the device on a side stream one batch ahead (double buffer);
    only the batch's non-zeros travel, the padding is zeroed on the device.

    ``gather_host`` has the DeviceTable's contract (same SparseBatch, same ``raw`` mode) given host row ids.
    Capacity: exact bounds for a CellTable (:func:`batch_capacity`); for a streaming table an estimate from its
    nnz statistics (:meth:`~inrscrecon.data.streaming.StreamingTable.csr_capacity`). A batch with more
    non-zeros than its capacity is never truncated: the buffers for that capacity grow (to 1.25 × the batch's
    non-zeros), said once per growth in the log, and later batches keep the grown size (static again).
    """

    def __init__(self, table: CellTable | StreamingTable, device: str | torch.device, raw: bool = False):
        self.device = torch.device(device)
        self.raw = raw
        self.table = table
        self.n_genes = len(table.genes)
        self.n_cells = table.n_cells
        self.genes = list(table.genes)
        self.target_sum = float(table.target_sum)
        self.rows: _InMemoryRows | StreamingTable = (
            _InMemoryRows(table) if isinstance(table, CellTable) else table
        )
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._next: _InFlight | None = None
        self.grown: dict[int, int] = {}  # capacity asked for → buffer capacity, where a batch outgrew it

    def capacity(self, rows: np.ndarray, batch: int) -> int:
        """CSR capacity for batches of ``batch`` rows drawn from ``rows``."""
        if isinstance(self.rows, _InMemoryRows):
            return batch_capacity(self.rows.counts, rows, batch)
        return self.rows.csr_capacity(min(batch, len(rows)))

    def exact_capacity(self, rows: np.ndarray) -> int:
        """Capacity for exactly these ``rows`` (exact in memory; the streaming estimate otherwise)."""
        if isinstance(self.rows, _InMemoryRows):
            return max(int(self.rows.lens(rows).sum()), 1)
        return self.rows.csr_capacity(len(rows))

    def _host(self, rows: np.ndarray, asked: int) -> tuple[int, list[torch.Tensor]]:
        """(buffer capacity, host tensors: indptr [B+1], indices, raw values, totals [B], coords [B, 3]).
        For the CPU device indices / values are padded to the capacity; for CUDA they hold the non-zeros."""
        indptr, genes, stored = self.rows.csr_rows(rows)
        nnz = int(indptr[-1])
        cap = self.grown.get(asked, asked)
        if nnz > cap:
            new = max(math.ceil(1.25 * nnz), cap + 1)
            log.info(
                "a batch of %d rows holds %d non-zeros, over its CSR capacity %d: buffers grown to %d",
                len(rows),
                nnz,
                cap,
                new,
            )
            self.grown[asked] = cap = new
        if not self._cuda:
            pad_genes, pad_stored = np.zeros(cap, dtype=np.int32), np.zeros(cap, dtype=np.float32)
            pad_genes[:nnz], pad_stored[:nnz] = genes, stored
            genes, stored = pad_genes, pad_stored
        parts = [
            torch.from_numpy(indptr),
            torch.from_numpy(genes),
            torch.from_numpy(stored),
            torch.from_numpy(np.asarray(self.rows.totals[rows], dtype=np.float32)),
            torch.from_numpy(np.asarray(self.rows.coords[rows], dtype=np.float32)),
        ]
        return cap, [p.pin_memory() for p in parts] if self._cuda else parts

    def _send(self, rows: np.ndarray, asked: int) -> _InFlight:
        """Host gather into pinned buffers, then the copy on the side stream: returns without waiting."""
        cap, host = self._host(rows, asked)
        if self._stream is None:
            return _InFlight(rows, asked, cap, host, host, None)
        with torch.cuda.stream(self._stream):
            indptr, totals, coords = (host[k].to(self.device, non_blocking=True) for k in (0, 3, 4))
            nnz = host[1].shape[0]
            genes = torch.zeros(cap, dtype=torch.int32, device=self.device)  # padding zeroed on the device
            stored = torch.zeros(cap, dtype=torch.float32, device=self.device)
            genes[:nnz].copy_(host[1], non_blocking=True)  # only the non-zeros cross the bus
            stored[:nnz].copy_(host[2], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return _InFlight(rows, asked, cap, host, [indptr, genes, stored, totals, coords], event)

    def _finish(self, f: _InFlight, raw: bool) -> SparseBatch:
        """The main stream waits for ``f``'s copy (on the device: the host runs on), then normalises (or, raw,
        attaches the offsets)."""
        if f.event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(f.event)  # type: ignore[arg-type]
            for t in f.dev:  # made on the side stream, used on the main one: not to be reused early
                t.record_stream(main)
        indptr, genes, stored, totals, coords = f.dev
        if raw:
            offset = log_offset_torch(totals, self.target_sum)
            return SparseBatch(coords, indptr, genes, stored, indices_sorted=True, log_offset=offset)
        n = len(f.rows)
        if f.event is None:  # on the host: normalise only the non-zeros, whose rows the indptr gives directly
            nnz = int(indptr[-1])
            row = torch.repeat_interleave(torch.arange(n), torch.diff(indptr), output_size=nnz)  # [NNZ]
            values = torch.zeros(f.cap, dtype=torch.float32)
            live = torch.ones(nnz, dtype=torch.bool)
            values[:nnz] = normalize_log1p_torch(stored[:nnz], row, live, totals, self.target_sum)
            return SparseBatch(coords, indptr, genes, values, indices_sorted=True)
        slots = torch.arange(f.cap, device=indptr.device, dtype=torch.int64)
        row = torch.searchsorted(indptr[1:].contiguous(), slots, right=True)
        live = row < n
        rc = row.clamp(max=max(n - 1, 0))
        values = normalize_log1p_torch(stored, rc, live, totals, self.target_sum)
        return SparseBatch(coords, indptr, genes, values, indices_sorted=True)

    def gather_host(
        self,
        rows: np.ndarray,
        cap: int,
        next_rows: np.ndarray | None = None,
        raw: bool | None = None,
    ) -> SparseBatch:
        """Batch of host ``rows``; ``next_rows`` (the following batch) starts its copy now and is finished
        when it is asked for, so its transfer overlaps this batch's step. ``raw``: as in DeviceTable.gather."""
        f = self._next
        if f is None or f.asked != cap or not np.array_equal(f.rows, rows):
            f = self._send(rows, cap)
        self._next = self._send(next_rows, cap) if next_rows is not None else None
        return self._finish(f, self.raw if raw is None else raw)
