"""Non-rigid alignment (``align(..., nonrigid=True)`` / ``inrscrecon align --nonrigid``): grid operators, recovery
of a known smooth warp on patchy tissue, no invented deformation without a warp, export round trip, CLI flag.

The known-warp tissue has 2D structure (``inrscrecon.align.warpcase``): on laminar tissue a displacement along
the layers does not change expression, so no estimator could recover it and the test would measure nothing.
"""

from __future__ import annotations

import argparse
import json
import warnings

import anndata as ad
import numpy as np
import pytest

from inrscrecon.align import align
from inrscrecon.align.kabsch import Pose
from inrscrecon.align.nonrigid import DisplacementField, bending_operator, bilinear_weights
from inrscrecon.align.warpcase import warp_case
from inrscrecon.errors import InputError

CELLS = 1500


def _aligned_xy(res, name: str) -> np.ndarray:
    sec = res.aligned.obs["section"].astype(str).to_numpy()
    return res.aligned.obsm["spatial_aligned"][sec == name]


def _run(case, nonrigid: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return align([case.fixed, case.moving], spacing=10.0, seed=0, nonrigid=nonrigid)


@pytest.fixture(scope="module")
def warped():
    case = warp_case(seed=0, cells=CELLS, amplitude_um=40.0)
    return case, _run(case, False), _run(case, True)


# ---------------------------------------------------------------- grid operators


def test_bilinear_weights_reproduce_affine_fields_and_clamp_outside():
    rng = np.random.default_rng(0)
    origin, spacing, shape = np.array([-10.0, 5.0]), np.array([4.0, 3.0]), (6, 7)
    gx = origin[0] + spacing[0] * np.arange(shape[1])
    gy = origin[1] + spacing[1] * np.arange(shape[0])
    nodes = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)  # row-major, y rows
    f = nodes @ np.array([[0.3, -1.2], [2.0, 0.5]]) + [1.0, -4.0]  # an affine field on the nodes
    pts = rng.uniform([gx[0], gy[0]], [gx[-1], gy[-1]], size=(200, 2))
    w = bilinear_weights(pts, origin, spacing, shape)
    np.testing.assert_allclose(w.sum(axis=1).A.ravel(), 1.0)
    np.testing.assert_allclose(w @ f, pts @ np.array([[0.3, -1.2], [2.0, 0.5]]) + [1.0, -4.0], atol=1e-9)
    far = np.array([[gx[-1] + 100.0, gy[0] - 100.0]])  # beyond the grid: the corner node's value
    np.testing.assert_allclose(bilinear_weights(far, origin, spacing, shape) @ f, f[[shape[1] - 1]])


def test_bending_operator_annihilates_affine_and_sees_curvature():
    ny, nx = 5, 6
    lap = bending_operator((ny, nx))
    j, i = np.mgrid[0:ny, 0:nx]
    assert np.abs(lap @ (2.0 * i - 3.0 * j + 1.0).ravel()).max() < 1e-12
    bent = lap @ (i.astype(float) ** 2).ravel()
    assert np.abs(bent).max() == pytest.approx(2.0)  # d_xx of i² is 2 at every interior node


def test_field_save_load_and_bad_file(tmp_path):
    f = DisplacementField(np.array([1.0, 2.0]), np.array([5.0, 5.0]), np.arange(24.0).reshape(3, 4, 2))
    f.save(tmp_path / "f.npz")
    g = DisplacementField.load(tmp_path / "f.npz")
    pts = np.array([[3.0, 4.0], [100.0, -7.0]])
    np.testing.assert_allclose(g.apply(pts), f.apply(pts))
    (tmp_path / "bad.npz").write_text("not a field")
    with pytest.raises(InputError, match="bad.npz"):
        DisplacementField.load(tmp_path / "bad.npz")


# ---------------------------------------------------------------- recovery


def test_known_warp_error_drops_at_least_5x(warped):
    """Median distance of true correspondences after rigid vs after rigid + non-rigid: ≤ 1/5."""
    case, rigid, nonrigid = warped
    before = np.median(np.hypot(*(_aligned_xy(rigid, "moving") - case.true_xy).T))
    after = np.median(np.hypot(*(_aligned_xy(nonrigid, "moving") - case.true_xy).T))
    assert before > case.spacing  # the rigid step cannot absorb this warp
    assert after <= before / 5, f"median error {before:.2f} µm rigid → {after:.2f} µm non-rigid"
    rec = nonrigid.transforms[1]["nonrigid"]
    assert rec["kept"] and rec["held_out_gain"] > 0.3
    # the fixed (reference) section is left as it is
    np.testing.assert_allclose(_aligned_xy(nonrigid, "fixed"), _aligned_xy(rigid, "fixed"))


def test_no_warp_invents_no_deformation():
    case = warp_case(seed=1, cells=CELLS, amplitude_um=0.0)
    rigid, nonrigid = _run(case, False), _run(case, True)
    d = np.hypot(*(_aligned_xy(nonrigid, "moving") - _aligned_xy(rigid, "moving")).T)  # what moved the cells
    assert d.max() <= 0.25 * case.spacing, f"invented up to {d.max():.2f} µm (spacing {case.spacing:.1f})"
    before = np.median(np.hypot(*(_aligned_xy(rigid, "moving") - case.true_xy).T))
    after = np.median(np.hypot(*(_aligned_xy(nonrigid, "moving") - case.true_xy).T))
    assert after <= before + 0.1 * case.spacing


# ---------------------------------------------------------------- export and CLI


def test_cli_nonrigid_export_round_trip(warped, tmp_path):
    """``--nonrigid`` writes one field per section; observed coords → affine_xy → field = spatial_aligned;
    obsm['spatial'] stays observed and every rigid key of transforms.json is kept as it was."""
    from inrscrecon.align import command

    case, rigid, _ = warped
    paths = []
    for s in (case.fixed, case.moving):
        paths.append(str(tmp_path / f"{s.uns['section']}.h5ad"))
        s.write_h5ad(paths[-1])
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    out, tj = tmp_path / "aligned.h5ad", tmp_path / "t.json"
    args = parser.parse_args(
        ["align", *paths, "--out", str(out), "--transforms", str(tj), "--spacing", "10", "--no-progress"]
        + ["--nonrigid"]
    )
    assert args.nonrigid and args.func(args) == 0
    doc = json.loads(tj.read_text())
    back = ad.read_h5ad(out)
    sec = back.obs["section"].astype(str).to_numpy()
    rigid_doc = rigid.transforms_json()
    assert not rigid.fields and all("nonrigid" not in e for e in rigid_doc["sections"])  # off by default
    assert set(doc) == set(rigid_doc)
    for entry, rigid_entry in zip(doc["sections"], rigid_doc["sections"]):
        assert set(entry) - {"nonrigid"} == set(rigid_entry)
        nr = entry["nonrigid"]
        f = DisplacementField.load(tj.parent / nr["file"])
        assert nr["file"] == f"t_nonrigid/{entry['name']}.npz"
        assert list(f.displacement.shape[:2]) == nr["grid_shape"]
        np.testing.assert_allclose(f.origin, nr["grid_origin_um"])
        observed = (case.fixed if entry["name"] == "fixed" else case.moving).obsm["spatial"]
        np.testing.assert_allclose(back.obsm["spatial"][sec == entry["name"]], observed)
        m = np.array(entry["affine_xy"])
        rigid_xy = observed @ m[:2, :2].T + m[:2, 2]
        np.testing.assert_allclose(f.apply(rigid_xy), back.obsm["spatial_aligned"][sec == entry["name"]])
        np.testing.assert_allclose(back.obsm["spatial_3d"][sec == entry["name"], :2], f.apply(rigid_xy))
    moving = next(e for e in doc["sections"] if e["name"] == "moving")
    assert moving["nonrigid"]["kept"] and moving["nonrigid"]["max_displacement_um"] > case.spacing
    pose = Pose(np.array(moving["rotation"]), np.array(moving["translation"]), moving["reflected"])
    assert (
        np.abs(pose.apply(case.moving.obsm["spatial"]) - back.obsm["spatial_aligned"][sec == "moving"]).max()
        > 1
    )


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
def test_dlpfc_nonrigid_keeps_layer_agreement():
    """151673 → 151674 (adjacent sections): --nonrigid must not lower layer agreement by more than 0.005."""
    from conftest import require_data

    from inrscrecon.align.metrics import layer_agreement

    data = require_data("dlpfc_151673.h5ad", "dlpfc_151674.h5ad")
    a, b = ad.read_h5ad(data / "dlpfc_151673.h5ad"), ad.read_h5ad(data / "dlpfc_151674.h5ad")
    a.uns["section"], b.uns["section"] = "151673", "151674"
    la, lb = a.obs["layer"].astype(str).to_numpy(), b.obs["layer"].astype(str).to_numpy()
    score = {}
    for nonrigid in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = align([a, b], spacing=10.0, seed=0, nonrigid=nonrigid)
        score[nonrigid] = layer_agreement(_aligned_xy(res, "151673"), la, _aligned_xy(res, "151674"), lb)
    assert score[True] >= score[False] - 0.005, (
        f"layer agreement rigid {score[False]:.4f} → {score[True]:.4f}"
    )


def test_three_sections_middle_reference_fields_every_section():
    """With the middle section as reference, both outer sections get a field (fitted outward) and the
    reference stays where the rigid step put it; a field that is not kept moves nothing."""
    import itertools

    from inrscrecon.data.synthetic import SynthConfig, iter_sections

    cfg = SynthConfig(n_sections=81, spacing=10.0, cells_per_section=600, n_genes=100, seed=7)
    sections = [r[0] for r in itertools.islice(iter_sections(cfg), 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rigid = align(sections, spacing=10.0, reference=1, poses="chained")
        res = align(sections, spacing=10.0, reference=1, poses="chained", nonrigid=True)
    names = ["section_00", "section_01", "section_02"]
    assert set(res.fields) == set(names)
    assert not res.fields["section_01"].displacement.any()
    np.testing.assert_allclose(_aligned_xy(res, "section_01"), _aligned_xy(rigid, "section_01"))
    for name in ("section_00", "section_02"):
        rec = next(e for e in res.transforms if e["name"] == name)["nonrigid"]
        moved = np.hypot(*(_aligned_xy(res, name) - _aligned_xy(rigid, name)).T)
        if not rec["kept"]:
            assert moved.max() == 0.0
        else:  # bilinear weights are convex: no cell moves further than the largest node displacement
            assert 0 < moved.max() <= rec["max_displacement_um"] + 1e-6
