"""Stacked training table: every cell's 3D coordinate (µm) and its raw values on the selected genes, kept
sparse; targets are gathered, library-size normalised and log1p'd per batch (DESIGN "stream")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import scipy.sparse as sp

from inrscrecon.data.csr_gather import gather_normalized
from inrscrecon.data.preprocess import CHUNK, TARGET_SUM, is_counts
from inrscrecon.data.validate import coordinates
from inrscrecon.errors import InputError


@dataclass
class CellTable:
    """Cells of a stack. coords [N, 3] µm; counts CSR [N, G] raw values on ``genes``; totals [N] library sizes
    over all genes of the source section; ``target_sum <= 0`` means the values are already normalised."""

    coords: np.ndarray
    counts: sp.csr_matrix
    totals: np.ndarray
    genes: list[str]
    section: np.ndarray
    obs_names: np.ndarray
    target_sum: float = TARGET_SUM
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return self.coords.shape[0]

    def targets(self, rows: np.ndarray) -> np.ndarray:
        """log1p-normalised expression of ``rows`` → [len(rows), G] float32."""
        return gather_normalized(
            self.counts, rows, target_sum=self.target_sum, log1p=True, row_totals=self.totals
        )

    def raw_targets(self, rows: np.ndarray) -> np.ndarray:
        """Raw values (counts as stored) of ``rows`` on the model genes → [len(rows), G] float32."""
        return gather_normalized(self.counts, rows, target_sum=0.0, log1p=False, row_totals=self.totals)

    def log_offsets(self, rows: np.ndarray) -> np.ndarray:
        """Count-model offsets log(L / target_sum) of ``rows`` → [len(rows)] float32 (−inf where L = 0)."""
        return log_offsets(self.totals[np.asarray(rows, dtype=np.int64)], self.target_sum)

    def subset(self, rows: np.ndarray) -> CellTable:
        """The table restricted to ``rows`` (an index array or boolean mask)."""
        return CellTable(
            self.coords[rows],
            self.counts[rows],
            self.totals[rows],
            self.genes,
            self.section[rows],
            self.obs_names[rows],
            self.target_sum,
            {k: v[rows] for k, v in self.labels.items()},
        )

    def sections(self) -> list[str]:
        """Section names in order of first appearance."""
        _, first = np.unique(self.section, return_index=True)
        return [str(self.section[i]) for i in sorted(first)]


def log_offsets(totals: np.ndarray, target_sum: float) -> np.ndarray:
    """log(L / target_sum) per library size L [N] → [N] float32; −inf where L = 0 (such rows carry no
    information about the rates and get weight 0 in the count losses)."""
    tot = np.asarray(totals, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(tot / target_sum).astype(np.float32)


def require_counts(table: CellTable | object, likelihood: str) -> None:
    """InputError unless ``table`` holds raw counts (``target_sum > 0``) when ``likelihood`` is a count loss."""
    if likelihood == "rmse" or float(getattr(table, "target_sum", 0.0)) > 0:
        return
    names = table.sections() if hasattr(table, "sections") else []
    where = f"section {names[0]!r}" if names else "the table"
    raise InputError(
        f"--loss {likelihood} needs raw counts; X of {where} is normalised (uns['X_kind']); give the raw "
        "counts (X, layers['counts'] or .raw with --input counts) or use --loss rmse"
    )


def section_z(sections: Sequence[ad.AnnData], spacing: float | None = None, z_key: str | None = None) -> list:
    """z (µm) per section: ``uns[z_key]`` or ``obs[z_key]`` (per cell), else index × ``spacing``, else
    ``uns['z_um']`` when every section has it. Returns scalars or per-cell arrays."""
    names = [s.uns.get("section", str(i)) for i, s in enumerate(sections)]
    if z_key is not None:
        out: list = []
        for name, s in zip(names, sections):
            if z_key in s.uns:
                try:
                    out.append(float(s.uns[z_key]))
                except (TypeError, ValueError):
                    raise InputError(
                        f"section {name!r}: uns[{z_key!r}] = {s.uns[z_key]!r} is not a number of µm"
                    ) from None
            elif z_key in s.obs:
                try:
                    z = s.obs[z_key].to_numpy(dtype=np.float64)
                except (TypeError, ValueError):
                    first = s.obs[z_key].iloc[0]
                    raise InputError(
                        f"section {name!r}: obs[{z_key!r}] is not numeric (e.g. {first!r})"
                    ) from None
                if not np.isfinite(z).all():
                    raise InputError(f"section {name!r}: obs[{z_key!r}] has non-finite values")
                out.append(z)
            else:
                raise InputError(f"section {name!r}: no z at uns[{z_key!r}] or obs[{z_key!r}]")
        return out
    if spacing is not None:
        if not np.isfinite(spacing) or spacing <= 0:
            raise InputError(f"--spacing must be a positive number of µm, got {spacing}")
        return [i * float(spacing) for i in range(len(sections))]
    if all("z_um" in s.uns for s in sections):
        return [float(s.uns["z_um"]) for s in sections]
    if len(sections) == 1:
        return [0.0]
    raise InputError(f"sections {names}: no z positions; pass --spacing UM or --z-key KEY")


def section_xyz(adata: ad.AnnData, z, spatial_key: str = "spatial") -> np.ndarray:
    """[n, 3] coordinates in µm: 3-column ``obsm`` is used as is; 2-column xy is scaled by
    ``uns['microns_per_pixel']`` when present and stacked with ``z``."""
    name = str(adata.uns.get("section", "section"))
    if "spatial_3d" in adata.obsm:
        return coordinates(adata, name, "spatial_3d")
    xy = coordinates(adata, name, spatial_key)
    if xy.shape[1] == 3:
        return xy
    xy = xy * float(adata.uns.get("microns_per_pixel", 1.0))
    return np.column_stack([xy, np.broadcast_to(np.asarray(z, dtype=np.float64), (len(xy),))])


def _split_aligned(adata: ad.AnnData) -> tuple[list[ad.AnnData], list[str]]:
    names = adata.obs["section"].astype(str).to_numpy()
    order = list(dict.fromkeys(names))
    return [adata[names == n] for n in order], order


def build_cell_table(
    sections: Sequence[ad.AnnData],
    genes: Sequence[str],
    spacing: float | None = None,
    z_key: str | None = None,
    spatial_key: str = "spatial",
    label_keys: Sequence[str] = (),
) -> CellTable:
    """Stack sections (or one aligned AnnData with ``obsm['spatial_3d']`` and ``obs['section']``) into a
    CellTable on ``genes``, reading X in row chunks."""
    names = [str(s.uns.get("section", i)) for i, s in enumerate(sections)]
    if len(sections) == 1 and "spatial_3d" in sections[0].obsm and "section" in sections[0].obs:
        sections, names = _split_aligned(sections[0])
    kinds = {is_counts(s) for s in sections}
    if len(kinds) > 1:
        raise InputError("sections mix raw counts and normalised values (uns['X_kind']); use one kind")
    target_sum = TARGET_SUM if kinds.pop() else 0.0
    zs = (
        [0.0] * len(sections)
        if all("spatial_3d" in s.obsm for s in sections)
        else section_z(sections, spacing, z_key)
    )
    coords, blocks, totals, sec, ids = [], [], [], [], []
    labels: dict[str, list] = {k: [] for k in label_keys}
    for s, z, name in zip(sections, zs, names):
        coords.append(section_xyz(s, z, spatial_key))
        cols = s.var_names.get_indexer(list(genes))
        if (cols < 0).any():
            raise InputError(f"section {name!r}: missing gene {genes[int(np.flatnonzero(cols < 0)[0])]!r}")
        for start in range(0, s.n_obs, CHUNK):
            block = s.X[start : start + CHUNK]
            block = block.tocsr() if sp.issparse(block) else sp.csr_matrix(block)
            totals.append(np.asarray(block.sum(axis=1), dtype=np.float32).ravel())
            blocks.append(sp.csr_matrix(block[:, cols], dtype=np.float32))
        sec.append(np.full(s.n_obs, name, dtype=object))
        ids.append(s.obs_names.to_numpy())
        for k in label_keys:
            if k not in s.obs:
                raise InputError(f"section {name!r}: no labels at obs[{k!r}]")
            labels[k].append(s.obs[k].astype(str).to_numpy())
    return CellTable(
        coords=np.concatenate(coords),
        counts=sp.vstack(blocks, format="csr"),
        totals=np.concatenate(totals),
        genes=list(genes),
        section=np.concatenate(sec),
        obs_names=np.concatenate(ids),
        target_sum=target_sum,
        labels={k: np.concatenate(v) for k, v in labels.items()},
    )
