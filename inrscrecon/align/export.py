"""Alignment outputs: the result object (transforms JSON, matches, stacked AnnData), spatialdata-style affines,
atomic writing and the per-pair overlays."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from inrscrecon.align.kabsch import Pose
from inrscrecon.align.nonrigid import DisplacementField

if TYPE_CHECKING:
    from inrscrecon.align.pipeline import PairResult


@dataclass
class AlignmentResult:
    """Output of ``align``: per-section transforms (JSON layout), pairwise results, matches and stacked AnnData."""

    reference: str
    transforms: list[dict]
    pairs: list[PairResult]  # the consecutive pairs
    aligned: ad.AnnData
    poses: str = "chained"  # how section poses were combined: global (pose graph) or chained
    n_edges: int = 0  # pairwise alignments the poses were solved from
    fields: dict[str, DisplacementField] | None = None  # per-section non-rigid displacement (when fitted)

    @property
    def matches(self) -> pd.DataFrame:
        """Final correspondences of every pair: section_a, section_b, cell_a, cell_b, similarity, distance_um."""
        return pd.concat([p.matches for p in self.pairs], ignore_index=True)

    def field_files(self) -> dict[str, str]:
        """File name of each section's displacement field inside the non-rigid folder ({} without fields)."""
        out: dict[str, str] = {}
        for name in self.fields or {}:
            base = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "section"
            stem, i = base, 1
            while f"{stem}.npz" in out.values():
                stem, i = f"{base}_{i}", i + 1
            out[name] = f"{stem}.npz"
        return out

    def transforms_json(self, nonrigid_dir: str | None = None) -> dict:
        """The transforms.json document; with fields, each section's ``nonrigid`` record names its .npz as
        ``nonrigid_dir/NAME.npz`` (relative to the JSON file)."""
        sections = self.transforms
        if self.fields and nonrigid_dir is not None:
            files = self.field_files()
            sections = [
                {**e, "nonrigid": {**e["nonrigid"], "file": f"{nonrigid_dir}/{files[e['name']]}"}}
                if "nonrigid" in e
                else e
                for e in self.transforms
            ]
        return {
            "reference": self.reference,
            "units": "µm",
            "poses": self.poses,
            "n_edges": self.n_edges,
            "sections": sections,
        }

    @staticmethod
    def nonrigid_dir(transforms_path: str | Path) -> Path:
        """Folder of the displacement fields: ``STEM_nonrigid`` beside the transforms JSON."""
        p = Path(transforms_path)
        return p.with_name(p.stem + "_nonrigid")

    def write(
        self, aligned_path: str | Path, transforms_path: str | Path, matches_path: str | Path | None = None
    ) -> None:
        """Write aligned .h5ad, transforms .json and (optionally) matches .csv; all or nothing (temp + rename).
        With non-rigid fields, one .npz per section goes into ``nonrigid_dir(transforms_path)``
        (``DisplacementField.save``), referenced from each section's ``nonrigid`` record."""
        from inrscrecon.data.io import atomic_path

        targets = [(aligned_path, "h5ad"), (transforms_path, "json")] + (
            [(matches_path, "csv")] if matches_path else []
        )
        temps: list[tuple[Path, Path]] = []
        field_dir = self.nonrigid_dir(transforms_path) if self.fields else None
        tmp_dir = None
        try:
            if field_dir is not None and self.fields:
                tmp_dir = Path(tempfile.mkdtemp(prefix=f".{field_dir.name}.", dir=field_dir.parent))
                for name, file in self.field_files().items():
                    self.fields[name].save(tmp_dir / file)
            for path, kind in targets:
                final, tmp = atomic_path(path)
                temps.append((final, tmp))
                if kind == "h5ad":
                    self.aligned.write_h5ad(tmp)
                elif kind == "json":
                    doc = self.transforms_json(field_dir.name if field_dir is not None else None)
                    tmp.write_text(json.dumps(doc, indent=2))
                else:
                    self.matches.to_csv(tmp, index=False)
            if field_dir is not None and tmp_dir is not None:
                old = field_dir.with_name(tmp_dir.name + ".old")
                if field_dir.exists():
                    os.replace(field_dir, old)
                os.replace(tmp_dir, field_dir)
                tmp_dir = None
                shutil.rmtree(old, ignore_errors=True)
            for final, tmp in temps:
                os.replace(tmp, final)
        finally:
            for _, tmp in temps:
                if tmp.exists():
                    tmp.unlink()
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)

    def plot_pairs(self, out_dir: str | Path, max_points: int = 20000) -> list[Path]:
        """One PNG per pair: both sections in the common frame (fixed grey, moving orange). Returns the paths."""
        from inrscrecon.align.plots import plot_pair

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        xyz = self.aligned.obsm["spatial_3d"]
        sec = self.aligned.obs["section"].astype(str).to_numpy()
        paths = []
        for pr in self.pairs:
            path = out_dir / f"pair_{pr.moving}__{pr.fixed}.png"
            title = (
                f"{pr.moving} → {pr.fixed}: overlay score {pr.score:.2f} ({pr.pose_source} pose), "
                f"inliers {pr.inlier_fraction:.2f}"
            )
            plot_pair(
                xyz[sec == pr.fixed, :2],
                xyz[sec == pr.moving, :2],
                pr.fixed,
                pr.moving,
                title,
                path,
                max_points,
            )
            paths.append(path)
        return paths


def affines(pose: Pose, microns_per_unit: float, z: float) -> dict:
    """spatialdata-style homogeneous matrices of a section's pose: ``affine_xy`` [3, 3] maps observed (x, y, 1)
    in the section's own units to common-frame µm; ``affine_xyz`` [4, 4] maps (x, y, 0, 1) to (x, y, z, 1) µm.
    ``spatialdata.transformations.Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))`` takes the
    first as it is."""
    m2 = pose.matrix()
    m2[:2, :2] *= microns_per_unit
    m3 = np.eye(4)
    m3[:2, :2], m3[:2, 3], m3[2, 3] = m2[:2, :2], m2[:2, 2], z
    return {"affine_xy": m2.tolist(), "affine_xyz": m3.tolist()}


def stack_sections(
    sections: list[ad.AnnData],
    names: list[str],
    xys: list[np.ndarray],
    poses: dict[int, Pose],
    zs: list,
    fields: dict[int, DisplacementField] | None = None,
) -> ad.AnnData:
    """Concatenate sections (genes: inner join) with obs['section'] and obsm['spatial_3d'] (µm, common frame);
    with ``fields``, each section's rigidly posed xy is then warped by its displacement field."""
    parts = []
    for k, (s, name) in enumerate(zip(sections, names)):
        part = s.to_memory() if s.isbacked else s.copy()
        xy = poses[k].apply(xys[k])
        if fields is not None:
            xy = fields[k].apply(xy)
        z = np.broadcast_to(np.asarray(zs[k], dtype=np.float64), (len(xy),))
        part.obsm["spatial_aligned"] = (
            xy  # aligned xy (µm), for spatial plots; obsm['spatial'] stays observed
        )
        part.obsm["spatial_3d"] = np.column_stack([xy, z])
        part.obs["section"] = name
        parts.append(part)
    ids = np.concatenate([p.obs_names.to_numpy() for p in parts])
    unique = len(set(ids)) == len(ids)
    out = ad.concat(parts, join="inner", index_unique=None if unique else "-", keys=None if unique else names)
    out.obs["section"] = pd.Categorical(out.obs["section"].astype(str), categories=names)
    return out
