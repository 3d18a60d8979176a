"""Read sections (h5ad, backed or in memory; counts-CSV + coordinates-CSV) and query coordinates, checked at
the boundary; write AnnData atomically. The atomic-output machinery lives in :mod:`inrscrecon.data.atomic` and
is re-exported here (``atomic_path``, ``atomic_output``, ``check_writable``, ``commit``, ``discard``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from inrscrecon.data.atomic import atomic_output, atomic_path, check_writable, commit, discard
from inrscrecon.data.preprocess import is_counts
from inrscrecon.data.validate import (
    check_counts,
    microns_per_pixel,
    pixel_like,
    resolve_input,
    validate_section,
)
from inrscrecon.errors import InputError, InputWarning


def _section_name(adata: ad.AnnData, path: Path) -> str:
    if "section" in adata.uns and np.ndim(adata.uns["section"]) == 0:
        return str(adata.uns["section"])
    if "section" in adata.obs and adata.obs["section"].nunique() == 1:
        return str(adata.obs["section"].iloc[0])
    return path.stem


def _read(path: Path, backed: bool) -> ad.AnnData:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .h5ad file")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # h5py/anndata raise many types on a non-h5ad file
        raise InputError(f"{path}: not a readable .h5ad file ({type(exc).__name__}: {exc})") from None


def _warn(message: str) -> None:
    warnings.warn(message, InputWarning, stacklevel=3)


def read_section(
    path: str | Path,
    spatial_key: str = "spatial",
    backed: bool = False,
    input_kind: str = "auto",
    microns_per_unit: float | None = None,
    warn: bool = True,
) -> ad.AnnData:
    """Read and validate one section from ``.h5ad``; ``uns['section']`` is set to its name.

    ``input_kind``: what X holds (``auto | counts | normalized | lognorm``, see
    :func:`~inrscrecon.data.validate.resolve_input`); the result's ``uns['X_kind']`` says how the pipeline
    reads it. ``microns_per_unit`` sets ``uns['microns_per_pixel']`` (µm per coordinate unit); without it a
    given ``uns['microns_per_pixel']`` must be a positive number. Doubtful input (pixel-like coordinates
    without a scale, an X taken to be log-normalised) gives an :class:`InputWarning` unless ``warn=False``.
    ``backed=True`` keeps X on disk (read-only); checks on X then run chunk by chunk.
    """
    adata, notes = _read_checked(Path(path), spatial_key, backed, input_kind, microns_per_unit)
    for note in notes if warn else []:
        _warn(f"{path}: {note}")
    return adata


def _read_checked(
    path: Path, spatial_key: str, backed: bool, input_kind: str, microns_per_unit: float | None
) -> tuple[ad.AnnData, list[str]]:
    """:func:`read_section` without the warnings: (section, notes on doubtful input)."""
    adata = _read(path, backed)
    where = f"{path}"
    name = _section_name(adata, path)
    if microns_per_unit is not None:
        if not np.isfinite(microns_per_unit) or microns_per_unit <= 0:
            raise InputError(f"--microns-per-unit must be a positive number, got {microns_per_unit}")
        adata.uns["microns_per_pixel"] = float(microns_per_unit)
    else:
        microns_per_pixel(adata, where)
    validate_section(adata, where, spatial_key)
    given = adata
    adata, note = resolve_input(adata, where, input_kind)
    notes = [note] if note else []
    if adata is not given and adata.X is not given.X:  # counts from layers['counts'] / .raw: check them too
        validate_section(adata, where, spatial_key)
    if is_counts(adata):
        check_counts(adata, where)
    reason = pixel_like(adata, spatial_key) if "spatial_3d" not in adata.obsm else None
    if reason:
        notes.append(_pixel_message(reason, spatial_key))
    adata.uns["section"] = name  # backed objects keep uns in memory too
    return adata, notes


def _pixel_message(reason: str, spatial_key: str) -> str:
    return (
        f"obsm[{spatial_key!r}] looks like pixels ({reason}) and no scale is given; treating 1 unit as 1 µm — "
        "pass --microns-per-unit UM or set uns['microns_per_pixel']"
    )


def _warn_grouped(notes: list[tuple[str, str]]) -> None:
    """One warning per kind of note (its text before the first parenthesis), naming the first file."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for where, note in notes:
        groups.setdefault(note.split(" (")[0], []).append((where, note))
    for items in groups.values():
        where, note = items[0]
        more = f" and {len(items) - 1} more section(s)" if len(items) > 1 else ""
        _warn(f"{where}{more}: {note}")


def read_csv_pair(counts_csv: str | Path, coords_csv: str | Path, name: str | None = None) -> ad.AnnData:
    """Read a counts CSV (rows = cells, first column = cell id, columns = genes) and a coordinates CSV
    (first column = cell id, then x, y[, z]) into one AnnData with ``obsm['spatial']``."""
    counts_csv, coords_csv = Path(counts_csv), Path(coords_csv)
    for p in (counts_csv, coords_csv):
        if not p.exists():
            raise InputError(f"{p}: file not found")
    try:
        counts = pd.read_csv(counts_csv, index_col=0)
        coords = pd.read_csv(coords_csv, index_col=0)
    except Exception as exc:
        raise InputError(f"{counts_csv} / {coords_csv}: not readable as CSV ({exc})") from None
    counts.index = counts.index.astype(str)
    coords.index = coords.index.astype(str)
    missing = counts.index.difference(coords.index)
    if len(missing):
        raise InputError(f"{coords_csv}: no coordinates for {len(missing)} cells, e.g. {missing[0]!r}")
    num = coords.loc[counts.index].select_dtypes("number")
    if num.shape[1] < 2:
        raise InputError(f"{coords_csv}: expected at least two numeric columns (x, y), found {num.shape[1]}")
    try:
        values = counts.to_numpy(dtype=np.float32)
    except ValueError:
        raise InputError(f"{counts_csv}: counts must be numeric") from None
    adata = ad.AnnData(
        X=sp.csr_matrix(values),
        obs=pd.DataFrame(index=counts.index),
        var=pd.DataFrame(index=counts.columns.astype(str)),
    )
    adata.obsm["spatial"] = num.to_numpy(dtype=np.float64)[:, :3]
    adata.uns["section"] = name or counts_csv.stem
    validate_section(adata, f"{counts_csv}", "spatial")
    return adata


def read_sections(
    paths: Sequence[str | Path],
    spatial_key: str = "spatial",
    backed: bool = False,
    input_kind: str = "auto",
    microns_per_unit: float | None = None,
) -> list[ad.AnnData]:
    """Read several sections (see :func:`read_section`); names (``uns['section']``) are made unique by
    suffixing the index. Coordinate widths must agree (all 2-column xy, or all 3-column xyz); doubtful input
    gives one warning per kind for the whole stack, naming the first file."""
    if not paths:
        raise InputError("no section files given")
    read = [_read_checked(Path(p), spatial_key, backed, input_kind, microns_per_unit) for p in paths]
    sections = [a for a, _ in read]
    check_widths(sections, [str(p) for p in paths], spatial_key)
    _warn_grouped([(str(p), note) for p, (_, notes) in zip(paths, read) for note in notes])
    names = [s.uns["section"] for s in sections]
    if len(set(names)) < len(names):
        for i, s in enumerate(sections):
            s.uns["section"] = f"{names[i]}_{i}"
    return sections


def check_widths(sections: Sequence[ad.AnnData], where: Sequence[str], spatial_key: str = "spatial") -> None:
    """InputError when some sections have 2-column and others 3-column ``obsm[spatial_key]`` (a third column
    would silently become z for those sections only)."""
    widths = [
        3 if "spatial_3d" in s.obsm else np.shape(s.obsm[spatial_key])[1] if spatial_key in s.obsm else 0
        for s in sections
    ]
    if len(set(widths)) > 1:
        majority = max(set(widths), key=widths.count)
        odd = next(i for i, w in enumerate(widths) if w != majority)
        raise InputError(
            f"{where[odd]}: obsm[{spatial_key!r}] has {widths[odd]} columns but the other sections have {majority}; "
            "give every section xy (z from --spacing / --z-key) or every section xyz"
        )


def section_names(sections: Sequence[ad.AnnData]) -> list[str]:
    """Names of the sections of a stack: ``uns['section']`` per AnnData, or the ``obs['section']`` values of one
    aligned AnnData (``obsm['spatial_3d']``)."""
    if len(sections) == 1 and "spatial_3d" in sections[0].obsm and "section" in sections[0].obs:
        return list(dict.fromkeys(sections[0].obs["section"].astype(str)))
    return [str(s.uns.get("section", i)) for i, s in enumerate(sections)]


def parse_names(values: Sequence[str] | None) -> list[str]:
    """Names from a repeatable, comma-separated option (``--holdout A --holdout B,C``)."""
    return [v.strip() for item in (values or []) for v in item.split(",") if v.strip()]


def drop_sections(sections: Sequence[ad.AnnData], holdout: Sequence[str]) -> list[ad.AnnData]:
    """The stack without the sections named in ``holdout`` (see :func:`section_names`); InputError naming an
    unknown section, or when nothing would be left."""
    names = section_names(sections)
    unknown = [h for h in holdout if h not in names]
    if unknown:
        raise InputError(f"--holdout {unknown[0]!r}: no such section; sections are {names}")
    if set(names) <= set(holdout):
        raise InputError(f"--holdout {list(holdout)} leaves no section to train on")
    if len(sections) == 1 and "spatial_3d" in sections[0].obsm and "section" in sections[0].obs:
        a = sections[0]
        return [a[~a.obs["section"].astype(str).isin(list(holdout)).to_numpy()].copy()]
    return [s for s, n in zip(sections, names) if n not in set(holdout)]


def check_stream_files(
    paths: Sequence[str | Path], spatial_key: str = "spatial", holdout: Sequence[str] = ()
) -> list[Path]:
    """Checks for files that are read from disk in chunks (``fit --stream``), before the streaming pass: the
    scale ``uns['microns_per_pixel']``, what X holds (declared or integer counts; a transformed X has to be
    loaded in memory), coordinate widths, pixel-like units (one warning). Returns the paths whose section is
    not in ``holdout``."""
    from inrscrecon.data.streaming import _Source
    from inrscrecon.data.validate import SNIFF_ROWS, _first_non_integer, declared_kind

    shells, names = [], []
    for p in paths:
        src = _Source(p)
        try:
            shell = src.shell(None)
            where = str(src.path)
            microns_per_pixel(shell, where)
            kind = declared_kind(shell, where) or "raw_counts"
            if kind == "log_normalized":
                raise InputError(f"{where}: log-normalised X cannot be streamed; fit without --stream")
            bad = _first_non_integer(src.rows(0, min(src.shape[0], SNIFF_ROWS)), shell.obs_names)
            if kind == "raw_counts" and bad is not None:
                raise InputError(
                    f"{where}: X must hold non-negative integer counts but has {bad[1]:g} in cell {bad[0]!r}; "
                    "declare uns['X_kind'] or fit without --stream (reads layers['counts'] / .raw)"
                )
        finally:
            src.close()
        shells.append(shell)
        names.append(str(shell.uns["section"]))
    check_widths(shells, [str(p) for p in paths], spatial_key)
    pixels = [(str(p), r) for p, s in zip(paths, shells) if (r := pixel_like(s, spatial_key))]
    _warn_grouped([(p, _pixel_message(r, spatial_key)) for p, r in pixels])
    unknown = [h for h in holdout if h not in names]
    if unknown:
        raise InputError(f"--holdout {unknown[0]!r}: no such section; sections are {names}")
    kept = [Path(p) for p, n in zip(paths, names) if n not in set(holdout)]
    if not kept:
        raise InputError(f"--holdout {list(holdout)} leaves no section to train on")
    return kept


def write_h5ad(adata: ad.AnnData, path: str | Path) -> Path:
    """Write AnnData atomically (temp file + rename): a failed write leaves nothing behind."""
    with atomic_output(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def read_coords(path: str | Path) -> tuple[np.ndarray, list[str] | None]:
    """Query coordinates [N, 3] (µm) from .csv/.tsv (columns x, y, z or the first three numeric), .npy, or .h5ad
    (``obsm['spatial_3d']``, or a 3-column ``obsm['spatial']``). Returns (coords, point ids or None).

    InputError for an empty file, no points, text in a coordinate column, a wrong shape, or NaN / inf."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a coordinates file")
    ids: list[str] | None = None
    if path.suffix == ".npy":
        try:
            xyz = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise InputError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from None
        if not np.issubdtype(xyz.dtype, np.number):
            raise InputError(f"{path}: coordinates must be numbers, got dtype {xyz.dtype}")
    elif path.suffix in (".csv", ".tsv", ".txt"):
        xyz = _coords_table(path)
    elif path.suffix == ".h5ad":
        a = read_section(path, "spatial_3d" if _has_3d(path) else "spatial", warn=False)
        key = "spatial_3d" if "spatial_3d" in a.obsm else "spatial"
        xyz, ids = np.asarray(a.obsm[key], np.float64), list(a.obs_names)
    else:
        raise InputError(f"{path}: coordinates must be .csv, .tsv, .npy or .h5ad, got {path.suffix!r}")
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise InputError(f"{path}: coordinates must have shape (N, 3), got {xyz.shape}")
    if len(xyz) == 0:
        raise InputError(f"{path}: no query points (0 rows)")
    if not np.isfinite(xyz).all():
        raise InputError(
            f"{path}: coordinates contain NaN or inf (row {int(np.flatnonzero(~np.isfinite(xyz).all(1))[0])})"
        )
    return xyz, ids


def _coords_table(path: Path) -> np.ndarray:
    """x, y, z columns (or the first three columns) of a delimited text file as float64 [N, 3]."""
    if not path.read_text(errors="replace").strip():
        raise InputError(f"{path}: empty file; expected a header x,y,z and one row per query point")
    sep = {".csv": ",", ".tsv": "\t"}.get(path.suffix)
    try:
        df = pd.read_csv(path, sep=sep, engine="python")
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file; expected a header x,y,z and one row per query point") from None
    except Exception as exc:
        raise InputError(f"{path}: not readable as CSV ({type(exc).__name__}: {exc})") from None
    lower = {str(c).strip().lower(): c for c in df.columns}
    if {"x", "y", "z"} <= set(lower):
        cols = [lower["x"], lower["y"], lower["z"]]
    else:
        numeric = list(df.select_dtypes("number").columns)
        cols = numeric[:3] if len(numeric) >= 3 else list(df.columns[:3])
        if len(cols) < 3:
            raise InputError(
                f"{path}: need columns x, y, z (or three numeric columns), found {list(df.columns)}"
            )
    if df.empty:
        raise InputError(f"{path}: no query points (header only)")
    out = np.empty((len(df), 3))
    for j, c in enumerate(cols):
        values = pd.to_numeric(df[c], errors="coerce")
        bad = values.isna() & df[c].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{path}: column {c!r} row {i + 1}: {df[c].iloc[i]!r} is not a number")
        out[:, j] = values.to_numpy(np.float64)
    return out


def _has_3d(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "obsm" in f and "spatial_3d" in f["obsm"]
    except OSError:
        return False


__all__ = [
    "atomic_output",
    "atomic_path",
    "check_stream_files",
    "check_widths",
    "check_writable",
    "commit",
    "discard",
    "drop_sections",
    "parse_names",
    "read_coords",
    "read_csv_pair",
    "read_section",
    "read_sections",
    "section_names",
    "write_h5ad",
]
