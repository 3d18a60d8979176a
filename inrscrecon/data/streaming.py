"""Train from sections too large to densify (DESIGN "Scale"): a :class:`StreamingTable` with the
:class:`~inrscrecon.data.stack.CellTable` interface over backed ``.h5ad`` files or AnnData ``.zarr`` stores.

* Only per-cell metadata lives in memory: coordinates [N, 3] (µm), library sizes [N] and the per-file
  ``indptr`` — about 36 bytes a cell. X (CSR) stays on disk and is read in row chunks through anndata's
  backed sparse dataset (``anndata.io.sparse_dataset``), for ``.h5ad`` and ``.zarr`` alike.
* The chunk cache has a byte budget (``cache_mb``): chunks shrink below ``chunk_rows`` when the data are so
  dense that ``2 · window + 1`` chunks would not fit in it, so peak memory is set by the budget, not by N or
  by the density of X.
* :func:`open_stack` makes one streaming pass over X: it checks the values (finite, non-negative, column
  indices in range), records library sizes over all genes, non-zeros per gene, and the per-gene moments that pick the top-M
  variable genes (same rule as :func:`~inrscrecon.data.preprocess.select_genes`).
* :meth:`StreamingTable.targets` gathers rows from cached chunks (LRU) and normalises them on the fly with
  :func:`~inrscrecon.data.csr_gather.gather_normalized`; a chunk with only a few requested rows is read row by
  row instead of whole. :meth:`StreamingTable.csr_rows` reads the same way but returns the rows' raw values on
  the model genes as CSR (what training feeds, through
  :class:`~inrscrecon.data.device_table.HostBatchFeeder`): no dense [B, G] block. Its batch capacity comes from
  the pass's per-gene non-zero counts (:meth:`StreamingTable.csr_capacity`).
* :meth:`StreamingTable.epoch_order` shuffles across chunks while reading chunk-wise: chunks in random order,
  rows shuffled within windows of ``window`` chunks, so consecutive batches touch at most two windows.
  ``shuffle="global"`` reproduces the in-memory table's uniform permutation (and its loss curve) exactly.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from inrscrecon.data.csr_gather import gather_normalized
from inrscrecon.data.preprocess import TARGET_SUM, is_counts, normalize_log1p, shared_genes
from inrscrecon.data.stack import CellTable, log_offsets, section_xyz, section_z
from inrscrecon.data.validate import coordinates
from inrscrecon.errors import InputError

CHUNK_ROWS = 16384
CACHE_MB = 256.0  # default memory budget (MiB) of the chunk cache
H5_CHUNK_CACHE = 2**17  # bytes of HDF5 chunk cache per dataset
DIRECT_FRACTION = 1 / 16  # fewer requested rows than this fraction of a chunk: read them row by row
CAPACITY_SCALE, CAPACITY_SIGMAS = 1.25, 6.0  # CSR batch capacity: mean rows × 1.25 + 6·sqrt(B) rows


def _read_elem(node: Any) -> Any:
    from anndata.io import read_elem

    return read_elem(node)


def _sparse_dataset(group: Any) -> Any:
    """anndata's backed CSR/CSC reader (``anndata.io.sparse_dataset``; ``anndata.experimental`` before 0.11)."""
    try:
        from anndata.io import sparse_dataset
    except ImportError:  # pragma: no cover - anndata < 0.11
        from anndata.experimental import sparse_dataset
    return sparse_dataset(group)


class _Source:
    """One section file: an open h5py file or zarr group and its X, read through anndata's backed sparse
    dataset (CSR rows without loading the matrix; anndata caches the ``indptr``) or as a dense array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        p = self.path
        if not p.exists():
            raise InputError(f"{p}: file not found")
        try:
            if p.is_dir() or p.suffix == ".zarr":
                import zarr

                self.root: Any = zarr.open_group(str(p), mode="r")
                self.kind = "zarr"
            else:
                import h5py

                # rows are read a chunk at a time, so HDF5's chunk cache buys nothing; its default 1 MiB per
                # dataset cost ≈ 16 MB of RSS per open file (measured), which grows with the number of sections
                self.root = h5py.File(p, "r", rdcc_nbytes=H5_CHUNK_CACHE)
                self.kind = "h5ad"
        except Exception as exc:
            raise InputError(
                f"{p}: not a readable AnnData .h5ad / .zarr ({type(exc).__name__}: {exc})"
            ) from None
        for key in ("X", "obs", "var"):
            if key not in self.root:
                raise InputError(
                    f"{p}: not an AnnData file (no {key!r} element); file truncated or corrupted?"
                )
        x = self.root["X"]
        enc = str(x.attrs.get("encoding-type", "array"))
        try:
            if enc == "csr_matrix":
                self.sparse = True
                self.X: Any = _sparse_dataset(x)
                self.shape = tuple(int(v) for v in self.X.shape)
                self._check_structure(x)
            elif enc == "csc_matrix":
                raise InputError(
                    f"{p}: X is stored column-major (CSC); rows cannot be streamed. Rewrite it as CSR, e.g. "
                    "adata.X = adata.X.tocsr(); adata.write_h5ad(...)"
                )
            elif hasattr(x, "shape") and len(x.shape) == 2:
                self.sparse = False
                self.shape = (int(x.shape[0]), int(x.shape[1]))
                self.X = x
            else:
                raise InputError(f"{p}: X has encoding {enc!r}; expected a CSR matrix or a dense array")
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"{p}: cannot read X ({type(exc).__name__}: {exc}); file truncated or corrupted?"
            ) from None

    def _check_structure(self, x: Any) -> None:
        """indptr against data/indices (one read of indptr, not kept: anndata caches its own)."""
        ip = np.asarray(x["indptr"][:])
        n_data, n_idx = int(x["data"].shape[0]), int(x["indices"].shape[0])
        if (
            ip.shape[0] != self.shape[0] + 1
            or ip[0] != 0
            or ip[-1] != n_data
            or n_idx != n_data
            or (np.diff(ip) < 0).any()
        ):
            raise InputError(
                f"{self.path}: X/indptr is inconsistent with X/data (indptr has {ip.shape[0]} entries ending at "
                f"{ip[-1] if ip.size else None}, data has {n_data}); file truncated or corrupted?"
            )
        self.nnz = n_data
        self.entry_bytes = x["data"].dtype.itemsize + x["indices"].dtype.itemsize

    def row_bytes(self) -> float:
        """Mean bytes one row of X takes in memory as CSR (data + indices, as stored)."""
        if not self.sparse:
            return float(self.shape[1] * self.X.dtype.itemsize)
        return self.nnz * self.entry_bytes / max(self.shape[0], 1)

    def _read(self, index: Any, what: str) -> sp.csr_matrix:
        try:
            if not self.sparse:
                return sp.csr_matrix(np.asarray(self.X[index]))
            block = self.X[index]
        except Exception as exc:
            raise InputError(
                f"{self.path}: cannot read X {what} ({type(exc).__name__}: {exc}); file truncated or corrupted?"
            ) from None
        return block if isinstance(block, sp.csr_matrix) else sp.csr_matrix(block)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) of X as CSR with all columns, dtype as stored."""
        return self._read(slice(start, stop), f"rows {start}..{stop - 1}")

    def pick(self, local: np.ndarray) -> sp.csr_matrix:
        """Sorted unique local rows [K] → CSR [K, n_vars] (anndata reads contiguous runs in one go)."""
        local = np.asarray(local, dtype=np.int64)
        if not self.sparse:
            return sp.csr_matrix(np.asarray(self.X[local]))
        mask = np.zeros(self.shape[0], dtype=bool)
        mask[local] = True
        return self._read(mask, f"rows {int(local[0])}..{int(local[-1])}")

    def elem(self, key: str) -> Any:
        try:
            return _read_elem(self.root[key])
        except Exception as exc:
            raise InputError(
                f"{self.path}: cannot read {key} ({type(exc).__name__}: {exc}); file corrupted?"
            ) from None

    def obs_names(self) -> pd.Index:
        obs = self.root["obs"]
        return pd.Index(self.elem(f"obs/{obs.attrs.get('_index', '_index')}")).astype(str)

    def shell(self, z_key: str | None) -> ad.AnnData:
        """An AnnData without X: obs names (+ ``obs[z_key]``), var names, obsm, uns, for the metadata checks."""
        var = self.root["var"]
        var_names = pd.Index(self.elem(f"var/{var.attrs.get('_index', '_index')}")).astype(str)
        obs = pd.DataFrame(index=self.obs_names())
        if z_key is not None and z_key in self.root["obs"]:
            obs[z_key] = np.asarray(self.elem(f"obs/{z_key}"))
        if "section" in self.root["obs"]:
            obs["section"] = pd.Categorical(np.asarray(self.elem("obs/section")).astype(str))  # not N strings
        obsm = (
            {k: np.asarray(self.elem(f"obsm/{k}")) for k in self.root["obsm"]} if "obsm" in self.root else {}
        )
        uns = self.elem("uns") if "uns" in self.root else {}
        if self.kind == "h5ad":
            self._reopen()
        if len(obs) != self.shape[0] or len(var_names) != self.shape[1]:
            raise InputError(
                f"{self.path}: X has shape {self.shape} but obs/var have {len(obs)}/{len(var_names)} entries"
            )
        a = ad.AnnData(obs=obs, var=pd.DataFrame(index=var_names), obsm=obsm, uns=dict(uns))
        if "section" in uns and np.ndim(uns["section"]) == 0:
            a.uns["section"] = str(uns["section"])
        elif "section" in obs and obs["section"].nunique() == 1:
            a.uns["section"] = str(obs["section"].iloc[0])
        else:
            a.uns["section"] = self.path.name.split(".")[0]
        return a

    def _reopen(self) -> None:
        """Close and reopen the h5py file: the strings just read (obs names) stay in HDF5's metadata cache of an
        open file, ≈ 70 bytes a cell (measured), for as long as it is open — the whole fit."""
        import h5py

        self.root.close()
        self.root = h5py.File(self.path, "r", rdcc_nbytes=H5_CHUNK_CACHE)
        self.X = _sparse_dataset(self.root["X"]) if self.sparse else self.root["X"]

    def close(self) -> None:
        if self.kind == "h5ad":
            self.root.close()


def _libc_function(name: str) -> Any:
    """A glibc function by name, or None (another C library, or none found)."""
    import ctypes
    import ctypes.util

    lib = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(lib), name) if lib else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand memory that the allocator keeps after large temporary arrays back to the system (glibc
    ``malloc_trim``; a no-op elsewhere). Called after the streaming pass, whose per-chunk temporaries
    otherwise stay in the process's RSS for the whole fit."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 1 << 20  # bytes: larger allocations get their own pages, returned to the system when freed


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations above ``threshold`` bytes from their own memory maps for the rest of the process
    (glibc ``mallopt(M_MMAP_THRESHOLD)``; a no-op elsewhere); True when set.

    glibc otherwise raises its threshold to the size of the last large block freed (up to 32 MiB), so the
    chunks, batches and validation slices of a streaming fit — all below that — come from the heap, whose
    fragments are not returned: measured, the RSS of a 300k-cell fit crept up by ≈ 200 MB over one epoch."""
    mallopt = _libc_function("mallopt")
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1)


def fitted_chunk_rows(sources: Sequence[_Source], chunk_rows: int, n_chunks: int, cache_mb: float) -> int:
    """Rows per chunk so that ``n_chunks`` chunks of the densest file fit in ``cache_mb`` MiB (≤ ``chunk_rows``)."""
    row_bytes = max(s.row_bytes() for s in sources)
    budget_rows = int(cache_mb * 2**20 / max(n_chunks * row_bytes, 1.0))
    return max(1, min(chunk_rows, budget_rows))


def _check_block(block: sp.csr_matrix, src: _Source, start: int) -> None:
    stop = start + block.shape[0] - 1
    if block.nnz:
        if not np.isfinite(block.data).all():
            raise InputError(f"{src.path}: X has non-finite values (NaN/inf) in rows {start}..{stop}")
        if (block.data < 0).any():
            raise InputError(f"{src.path}: X has negative values in rows {start}..{stop}")
        if block.indices.min() < 0 or block.indices.max() >= src.shape[1]:
            raise InputError(
                f"{src.path}: X has column indices outside [0, {src.shape[1]}) in rows {start}..{stop}"
            )


def _model_rows(block: sp.csr_matrix, idx: np.ndarray, col_map: np.ndarray, n_genes: int) -> sp.csr_matrix:
    """Rows ``idx`` [K] of a file block [R, n_vars] on the model genes: CSR [K, n_genes] float32, columns
    through ``col_map`` (−1 dropped), canonical (each row's genes ascending, duplicates summed)."""
    sub = block[idx]
    cols = col_map[sub.indices]
    keep = cols >= 0
    kept = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    out = sp.csr_matrix(
        (sub.data[keep].astype(np.float32, copy=False), cols[keep].astype(np.int32), kept[sub.indptr]),
        shape=(len(idx), n_genes),
    )
    out.sum_duplicates()  # sorts each row's genes (col_map need not be monotone); no-op when canonical
    return out


@dataclass
class StreamingTable:
    """Cells of a stack whose X stays on disk. Same interface as CellTable for training and prediction:
    ``coords`` [N, 3] µm, ``totals`` [N] library sizes, ``genes``, ``target_sum``, ``n_cells``,
    ``targets(rows)`` → [len(rows), G] float32 log1p-normalised, ``sections()``, ``section``, ``obs_names``;
    ``csr_rows(rows)`` → the same rows' raw values as CSR on the model genes (training batches).

    ``chunk_rows``: rows per read; ``window``: chunks shuffled together; ``cache_chunks``: chunks kept in memory
    (default ``2 · window + 1``, so a batch straddling two windows never rereads). Memory ≈ cache_chunks ·
    chunk_rows · nnz-per-row · (bytes of one value + one index); :func:`open_stack` sizes ``chunk_rows`` so
    that this stays within its ``cache_mb``.
    """

    sources: list[_Source]
    col_maps: list[np.ndarray]  # per source: [n_vars] model column of each file gene, −1 to drop
    offsets: np.ndarray  # [n_sources + 1] first global row of each source
    coords: np.ndarray
    totals: np.ndarray
    genes: list[str]
    section_names: list[str]
    target_sum: float = TARGET_SUM
    chunk_rows: int = CHUNK_ROWS
    window: int = 4
    shuffle: str = "window"  # "window" | "global"
    cache_chunks: int | None = None
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"chunk_reads": 0, "row_reads": 0})
    col_nnz: list[np.ndarray] | None = None  # per source: [n_vars] stored entries of each file gene

    def __post_init__(self) -> None:
        if self.shuffle not in ("window", "global"):
            raise InputError(f"shuffle must be 'window' or 'global', got {self.shuffle!r}")
        self._cache: OrderedDict[tuple[int, int], sp.csr_matrix] = OrderedDict()
        n_chunks = [
            -(-(int(b) - int(a)) // self.chunk_rows) for a, b in zip(self.offsets[:-1], self.offsets[1:])
        ]
        self._chunk_base = np.concatenate([[0], np.cumsum(n_chunks)]).astype(np.int64)

    @property
    def n_cells(self) -> int:
        return int(self.coords.shape[0])

    @property
    def section(self) -> np.ndarray:
        """[N] section name of every cell (built on demand)."""
        idx = np.repeat(np.arange(len(self.sources)), np.diff(self.offsets))
        return np.asarray(self.section_names, dtype=object)[idx]

    @property
    def obs_names(self) -> np.ndarray:
        """[N] cell ids, read from the files on demand."""
        return np.concatenate([s.obs_names().to_numpy(dtype=object) for s in self.sources])

    def sections(self) -> list[str]:
        return list(self.section_names)

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global rows [B] → (source index [B], local row [B])."""
        src = np.searchsorted(self.offsets, rows, side="right") - 1
        return src, rows - self.offsets[src]

    def _capacity(self) -> int:
        return self.cache_chunks or 2 * self.window + 1

    def _chunk(self, s: int, c: int) -> sp.csr_matrix:
        key = (s, c)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        n = int(self.offsets[s + 1] - self.offsets[s])
        block = self.sources[s].rows(c * self.chunk_rows, min((c + 1) * self.chunk_rows, n))
        self.stats["chunk_reads"] += 1
        self._cache[key] = block
        while len(self._cache) > self._capacity():
            self._cache.popitem(last=False)
        return block

    def targets(self, rows: np.ndarray) -> np.ndarray:
        """log1p-normalised expression of global ``rows`` [B] (any order) → [B, G] float32."""
        return self._gather(rows, raw=False)

    def raw_targets(self, rows: np.ndarray) -> np.ndarray:
        """Raw values (counts as stored) of global ``rows`` [B] on the model genes → [B, G] float32."""
        return self._gather(rows, raw=True)

    def log_offsets(self, rows: np.ndarray) -> np.ndarray:
        """Count-model offsets log(L / target_sum) of ``rows`` → [B] float32 (−inf where L = 0)."""
        return log_offsets(self.totals[np.asarray(rows, dtype=np.int64)], self.target_sum)

    def _gather(self, rows: np.ndarray, raw: bool) -> np.ndarray:
        out = np.empty((len(rows), len(self.genes)), dtype=np.float32)
        for pos, s, block, idx, tot in self._blocks(rows):
            out[pos] = gather_normalized(
                block,
                idx,
                col_map=self.col_maps[s],
                n_out=len(self.genes),
                target_sum=0.0 if raw else self.target_sum,
                log1p=not raw,
                row_totals=tot,
            )
        return out

    def _blocks(
        self, rows: np.ndarray
    ) -> Iterator[tuple[np.ndarray, int, sp.csr_matrix, np.ndarray, np.ndarray]]:
        """Where global ``rows`` [B] (any order) are read from: per (source, chunk) touched, ``(positions in
        rows [K], source s, CSR block with all file columns, row of the block for each position [K], library
        sizes of the block's rows)``. The block is the cached chunk, or just the requested rows (row reads)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_cells):
            raise InputError(f"rows out of range [0, {self.n_cells})")
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        src, local = self.locate(srt)
        chunk = local // self.chunk_rows
        key = src * (1 << 40) + chunk
        bounds = np.flatnonzero(np.diff(key)) + 1
        # a request that fits in the cache (a windowed batch, a validation slice) loads whole chunks; one spread
        # over many chunks (a random sample) reads sparse chunks row by row instead of thrashing the cache
        fits = len(bounds) + 1 <= self._capacity()
        for part in np.split(np.arange(len(srt)), bounds):
            if not len(part):
                continue
            s, c = int(src[part[0]]), int(chunk[part[0]])
            loc = local[part]
            if fits or (s, c) in self._cache or len(np.unique(loc)) >= DIRECT_FRACTION * self.chunk_rows:
                block = self._chunk(s, c)
                idx = loc - c * self.chunk_rows
                tot = self.totals[self.offsets[s] + c * self.chunk_rows + np.arange(block.shape[0])]
            else:
                uniq, idx = np.unique(loc, return_inverse=True)
                block = self.sources[s].pick(uniq)
                self.stats["row_reads"] += len(uniq)
                tot = self.totals[self.offsets[s] + uniq]
            yield order[part], s, block, idx, tot

    def csr_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw values of global ``rows`` [B] (any order, repeats allowed) on the model genes as CSR, without a
        dense [B, G] block: ``(indptr [B+1] int64, indices [NNZ] int32 model gene, values [NNZ] float32)``,
        each row's genes ascending (file genes that ``col_maps`` drops are left out; duplicates summed).
        Read through the same chunk cache / row reads as :meth:`targets`."""
        rows = np.asarray(rows, dtype=np.int64)
        n_genes = len(self.genes)
        lens = np.zeros(len(rows), dtype=np.int64)
        pieces: list[tuple[np.ndarray, sp.csr_matrix]] = []
        for pos, s, block, idx, _ in self._blocks(rows):
            sub = _model_rows(block, idx, self.col_maps[s], n_genes)
            lens[pos] = np.diff(sub.indptr)
            pieces.append((pos, sub))
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
        indices = np.empty(int(indptr[-1]), dtype=np.int32)
        values = np.empty(int(indptr[-1]), dtype=np.float32)
        for pos, sub in pieces:  # each piece's rows into their request positions (vectorised copy)
            dst = np.repeat(indptr[pos] - sub.indptr[:-1], np.diff(sub.indptr)) + np.arange(sub.nnz)
            indices[dst], values[dst] = sub.indices, sub.data
        return indptr, indices, values

    def mean_row_nnz(self) -> float:
        """Largest mean number of model-gene non-zeros per row over the sources (from the streaming pass's
        per-gene counts; without them, the files' own nnz per row, an upper bound)."""
        means = []
        for s, src in enumerate(self.sources):
            n = max(int(self.offsets[s + 1] - self.offsets[s]), 1)
            if self.col_nnz is not None:
                means.append(float(self.col_nnz[s][self.col_maps[s] >= 0].sum()) / n)
            else:
                means.append(float(src.nnz) / n if src.sparse else float(len(self.genes)))
        return max(means) if means else 0.0

    def csr_capacity(self, batch: int) -> int:
        """CSR slots for a batch of ``batch`` rows, from the nnz statistics: the densest source's mean row
        times ``batch`` plus a margin of ``CAPACITY_SIGMAS`` · sqrt(batch) rows (≈ its spread when the row
        s.d. is about the mean), at most batch × genes. An estimate: a denser batch grows the buffer
        (:class:`~inrscrecon.data.device_table.HostBatchFeeder`), it is never truncated."""
        mu = self.mean_row_nnz()
        est = math.ceil(mu * (CAPACITY_SCALE * batch + CAPACITY_SIGMAS * math.sqrt(batch))) + 1
        return max(1, min(batch * len(self.genes), est))

    def epoch_order(self, train_rows: np.ndarray, seed: int, epoch: int) -> np.ndarray | None:
        """Visiting order of ``train_rows`` for one epoch: chunks in random order, rows shuffled within windows
        of ``window`` chunks. None with ``shuffle="global"`` (the trainer then draws a uniform permutation)."""
        if self.shuffle == "global":
            return None
        rng = np.random.default_rng([seed, epoch, 7919])
        src, local = self.locate(np.asarray(train_rows, dtype=np.int64))
        gchunk = self._chunk_base[src] + local // self.chunk_rows
        rank = np.empty(int(self._chunk_base[-1]), dtype=np.int64)
        rank[rng.permutation(len(rank))] = np.arange(len(rank))
        win = rank[gchunk] // max(self.window, 1)
        return np.asarray(train_rows)[np.lexsort((rng.random(len(train_rows)), win))]

    def to_cell_table(self) -> CellTable:
        """Materialise in memory (small stacks only: tests, evaluation)."""
        counts = []
        for s, src in enumerate(self.sources):
            keep = np.flatnonzero(self.col_maps[s] >= 0)
            block = src.rows(0, src.shape[0])[:, keep]
            perm = np.argsort(self.col_maps[s][keep])
            counts.append(sp.csr_matrix(block[:, perm], dtype=np.float32))
        return CellTable(
            self.coords,
            sp.vstack(counts, format="csr"),
            self.totals,
            list(self.genes),
            self.section,
            self.obs_names,
            self.target_sum,
        )

    def close(self) -> None:
        self._cache.clear()
        for s in self.sources:
            s.close()

    def __enter__(self) -> StreamingTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stats_pass(
    sources: Sequence[_Source],
    shared: Sequence[str],
    shells: Sequence[ad.AnnData],
    target_sum: float,
    moments: bool,
    chunk_rows: int,
    progress: bool,
    shard: tuple[int, int],
    allreduce: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray | None]:
    """One pass over X: checks, library sizes and stored entries per gene per file, and (``moments``) the variance of log-normalised
    expression of the ``shared`` genes. ``shard=(rank, world)`` splits the chunks over ranks and ``allreduce``
    (sum) combines their results."""
    rank, world = shard
    totals = [np.zeros(s.shape[0], dtype=np.float32) for s in sources]
    col_nnz = [np.zeros(s.shape[1], dtype=np.int64) for s in sources]
    g = len(shared)
    acc = np.zeros(2 * g + 1)
    jobs = [(i, a) for i, s in enumerate(sources) for a in range(0, s.shape[0], chunk_rows)]
    for j, (i, a) in enumerate(tqdm(jobs, desc="scan", unit="chunk", disable=not progress)):
        if j % world != rank:
            continue
        src = sources[i]
        block = src.rows(a, min(a + chunk_rows, src.shape[0]))
        _check_block(block, src, a)
        totals[i][a : a + block.shape[0]] = np.asarray(block.sum(axis=1), dtype=np.float32).ravel()
        col_nnz[i] += np.bincount(block.indices, minlength=src.shape[1])[: src.shape[1]]
        if moments:
            cols = shells[i].var_names.get_indexer(list(shared))
            ts = target_sum if is_counts(shells[i]) else 0.0
            y = normalize_log1p(block[:, cols], ts, np.asarray(block.sum(axis=1)).ravel())
            acc[:g] += np.asarray(y.sum(axis=0)).ravel()
            acc[g : 2 * g] += np.asarray(y.multiply(y).sum(axis=0)).ravel()
            acc[-1] += block.shape[0]
    if world > 1 and allreduce is not None:
        flat = allreduce(np.concatenate(totals).astype(np.float32))
        totals = np.split(flat, np.cumsum([s.shape[0] for s in sources])[:-1])
        acc = allreduce(acc)
        nnz = allreduce(np.concatenate(col_nnz).astype(np.float64))  # exact below 2**53 entries
        col_nnz = [a.astype(np.int64) for a in np.split(nnz, np.cumsum([s.shape[1] for s in sources])[:-1])]
    if not moments:
        return totals, col_nnz, None
    n = max(acc[-1], 1)
    mean = acc[:g] / n
    return totals, col_nnz, np.maximum(acc[g : 2 * g] / n - mean**2, 0.0)


def open_stack(
    paths: Sequence[str | Path],
    *,
    n_genes: int = 5000,
    genes: Sequence[str] | None = None,
    spacing: float | None = None,
    z_key: str | None = None,
    spatial_key: str = "spatial",
    chunk_rows: int = CHUNK_ROWS,
    window: int = 4,
    shuffle: str = "window",
    cache_chunks: int | None = None,
    cache_mb: float = CACHE_MB,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    allreduce: Callable[[np.ndarray], np.ndarray] | None = None,
) -> StreamingTable:
    """Open sections for training without loading X: the streaming counterpart of
    ``build_cell_table(read_sections(paths), select_genes(sections, n_genes, genes), ...)``.

    Args:
        paths: section files, ``.h5ad`` or AnnData ``.zarr`` (raw counts in X as CSR or dense rows;
            coordinates in ``obsm[spatial_key]``, or ``obsm['spatial_3d']`` in µm).
        n_genes: keep the top-``n_genes`` variable genes shared by every section (all when fewer).
        genes: restrict to these gene names (all must be shared).
        spacing, z_key: z of each section, as in :func:`~inrscrecon.data.stack.build_cell_table`
            (µm between sections, or ``uns[z_key]`` / ``obs[z_key]``; default ``uns['z_um']``).
        spatial_key: obsm key of the xy coordinates.
        chunk_rows: most rows read at once; ``window``: chunks shuffled together each epoch;
            ``shuffle``: ``"window"`` (chunk-wise) or ``"global"`` (uniform permutation, random reads).
        cache_chunks: chunks kept in memory (default ``2 · window + 1``).
        cache_mb: memory budget (MiB) of the chunk cache; ``chunk_rows`` shrinks so that the cached chunks fit.
        progress: progress bar for the streaming pass.
        shard, allreduce: ``(rank, world)`` and a sum over ranks, to split the pass under DDP.

    Returns:
        a :class:`StreamingTable` (a context manager; ``close()`` closes the files). One streaming pass over X
        has checked its values and recorded library sizes and gene moments.

    Raises:
        InputError: missing, truncated or corrupted files, bad values (naming file and rows), inconsistent
            metadata, or genes not shared.
    """
    if not paths:
        raise InputError("no section files given")
    if chunk_rows < 1 or window < 1:
        raise InputError(f"chunk_rows and window must be ≥ 1, got {chunk_rows}, {window}")
    if not cache_mb > 0:
        raise InputError(f"cache_mb must be > 0, got {cache_mb}")
    map_large_allocations()
    sources = [_Source(p) for p in paths]
    try:
        chunk_rows = fitted_chunk_rows(sources, chunk_rows, cache_chunks or 2 * window + 1, cache_mb)
        shells = []
        for src in sources:
            a = src.shell(z_key)
            where = str(src.path)
            if a.n_obs == 0:
                raise InputError(f"{where}: section is empty (0 cells)")
            if a.n_vars == 0:
                raise InputError(f"{where}: section has no genes (0 columns in X)")
            if not a.obs_names.is_unique:
                raise InputError(
                    f"{where}: duplicate cell ids in obs_names, e.g. {a.obs_names[a.obs_names.duplicated()][0]!r}"
                )
            if not a.var_names.is_unique:
                raise InputError(
                    f"{where}: duplicate gene names in var_names, e.g. {a.var_names[a.var_names.duplicated()][0]!r}"
                )
            key = "spatial_3d" if "spatial_3d" in a.obsm else spatial_key
            coordinates(a, where, key)
            shells.append(a)
        names = [str(s.uns["section"]) for s in shells]
        if len(set(names)) < len(names):
            names = [f"{n}_{i}" for i, n in enumerate(names)]
            for s, n in zip(shells, names):
                s.uns["section"] = n
        kinds = {is_counts(s) for s in shells}
        if len(kinds) > 1:
            raise InputError("sections mix raw counts and normalised values (uns['X_kind']); use one kind")
        target_sum = TARGET_SUM if kinds.pop() else 0.0
        shared = shared_genes(shells)
        if genes is not None:
            missing = sorted(set(genes) - set(shared))
            if missing:
                raise InputError(f"requested genes not present in every section: {missing[:5]}")
            wanted = set(genes)
            shared = [g for g in shared if g in wanted]
        need_moments = n_genes < len(shared)
        if n_genes > len(shared) and genes is None:
            warnings.warn(
                f"asked for {n_genes} genes but only {len(shared)} are shared; using all {len(shared)}",
                stacklevel=2,
            )
        totals, col_nnz, var = _stats_pass(
            sources, shared, shells, target_sum, need_moments, chunk_rows, progress, shard, allreduce
        )
        release_freed_memory()
        if var is not None:
            if not np.any(var > 0):
                raise InputError("all shared genes have identical expression in every cell (zero variance)")
            keep = np.sort(np.argsort(-var, kind="stable")[:n_genes])
            chosen = [shared[i] for i in keep]
        else:
            chosen = list(shared)
        zs = (
            [0.0] * len(shells)
            if all("spatial_3d" in s.obsm for s in shells)
            else section_z(shells, spacing, z_key)
        )
        coords = np.concatenate([section_xyz(s, z, spatial_key) for s, z in zip(shells, zs)])
        col_maps = []
        lookup = {g: i for i, g in enumerate(chosen)}
        for s in shells:
            col_maps.append(np.array([lookup.get(g, -1) for g in s.var_names], dtype=np.int32))
        offsets = np.concatenate([[0], np.cumsum([s.n_obs for s in shells])]).astype(np.int64)
    except BaseException:
        for src in sources:
            src.close()
        raise
    table = StreamingTable(
        sources=sources,
        col_maps=col_maps,
        offsets=offsets,
        coords=coords,
        totals=np.concatenate(totals),
        genes=chosen,
        section_names=names,
        target_sum=target_sum,
        chunk_rows=chunk_rows,
        window=window,
        shuffle=shuffle,
        cache_chunks=cache_chunks,
        col_nnz=col_nnz,
    )
    # the shells' per-cell strings (obs names: ≈ 160 bytes a cell) are garbage now; hand their pages back so
    # that they do not stay in the RSS of the whole fit
    del shells
    release_freed_memory()
    return table
