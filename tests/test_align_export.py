"""Alignment export: spatialdata-style affines in transforms.json and the scverse obsm convention of
aligned.h5ad (obsm['spatial'] observed, obsm['spatial_aligned'] aligned xy, obsm['spatial_3d'] aligned xyz)."""

from __future__ import annotations

import itertools
import json

import anndata as ad
import numpy as np
import pytest

from inrscrecon.align import align
from inrscrecon.data.synthetic import SynthConfig, iter_sections


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    cfg = SynthConfig(
        n_sections=81, spacing=10.0, cells_per_section=600, n_genes=100, overlap_jitter=0.05, seed=5
    )
    sections = [r[0] for r in itertools.islice(iter_sections(cfg), 3)]
    observed = [s.obsm["spatial"].copy() for s in sections]
    sections[1].obsm["spatial"] = sections[1].obsm["spatial"] / 0.5  # section 1 in pixels of 0.5 µm
    sections[1].uns["microns_per_pixel"] = 0.5
    observed[1] = sections[1].obsm["spatial"].copy()
    res = align(sections, spacing=10.0, reference=1)
    out = tmp_path_factory.mktemp("export")
    res.write(out / "aligned.h5ad", out / "t.json")
    return res, observed, ad.read_h5ad(out / "aligned.h5ad"), json.loads((out / "t.json").read_text())


def test_obsm_convention_read_back(written):
    _, observed, back, _ = written
    sec = back.obs["section"].astype(str).to_numpy()
    for k, name in enumerate(["section_00", "section_01", "section_02"]):
        rows = sec == name
        np.testing.assert_allclose(back.obsm["spatial"][rows], observed[k])  # observed, own units
    np.testing.assert_allclose(back.obsm["spatial_aligned"], back.obsm["spatial_3d"][:, :2])
    assert back.obsm["spatial_aligned"].shape == (back.n_obs, 2)


def test_affines_map_observed_units_to_common_um(written):
    _, observed, back, doc = written
    sec = back.obs["section"].astype(str).to_numpy()
    for k, entry in enumerate(doc["sections"]):
        a2, a3 = np.array(entry["affine_xy"]), np.array(entry["affine_xyz"])
        assert a2.shape == (3, 3) and a3.shape == (4, 4)
        np.testing.assert_allclose(a2[2], [0, 0, 1])
        np.testing.assert_allclose(a3[3], [0, 0, 0, 1])
        xy1 = np.column_stack([observed[k], np.ones(len(observed[k]))])
        rows = sec == entry["name"]
        np.testing.assert_allclose(xy1 @ a2.T[:, :2], back.obsm["spatial_aligned"][rows], atol=1e-8)
        xyz1 = np.column_stack([observed[k], np.zeros(len(observed[k])), np.ones(len(observed[k]))])
        np.testing.assert_allclose((xyz1 @ a3.T)[:, :3], back.obsm["spatial_3d"][rows], atol=1e-8)
    ref = doc["sections"][1]
    np.testing.assert_allclose(
        np.array(ref["affine_xy"])[:2, :2], 0.5 * np.eye(2)
    )  # reference: units → µm only


def test_transforms_json_keeps_its_keys(written):
    _, _, _, doc = written
    assert {"reference", "units", "sections"} <= set(doc) and doc["poses"] in ("global", "chained")
    for e in doc["sections"]:
        assert {
            "name",
            "rotation",
            "translation",
            "reflected",
            "z",
            "inlier_fraction",
            "microns_per_unit",
        } <= set(e)
