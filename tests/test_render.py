"""Rendering: grid spec (anisotropic voxels, ≥ 2 z planes), per-section tissue masks, default bounds from the
model file, valid NGFF 0.5 OME-Zarr (ome-zarr-models) that ome-zarr-py reads back with the right axes /
scales and values equal to ``predict`` at the voxel centres, domain labels with per-label markers, PNG
views, the ``render`` CLI with its cost estimate and ``--max-voxels`` budget, and SIGTERM cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from inrscrecon.errors import InputError
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.model import FieldConfig, INRField
from inrscrecon.query.domain_check import OutOfDomainWarning
from inrscrecon.query.predict import predict
from inrscrecon.query.render import GridSpec, TissueMask, estimate, model_bounds, render
from inrscrecon.query.tissue import tissue_frame

GENES = [f"g{i}" for i in range(12)]


def _discs(radii, zs, n=1600, hole=0.0, seed=0):
    """Disc-shaped sections (radius per section, optional empty centre of radius ``hole``): [n, 3] µm."""
    rng = np.random.default_rng(seed)
    out = []
    for r, z in zip(radii, zs):
        xy = rng.uniform(-r, r, size=(n, 2))
        rr = np.sqrt((xy**2).sum(1))
        xy = xy[(rr < r) & (rr >= hole)]
        out.append(np.column_stack([xy, np.full(len(xy), z)]))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def cells():
    """Four disc-shaped sections 40 µm apart, radius 100 µm: [n, 3] µm."""
    return _discs([100] * 4, [0.0, 40.0, 80.0, 120.0], n=500)


@pytest.fixture(scope="module")
def model(cells):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = FieldConfig(len(GENES), EncodingConfig(n_bands=3), 24, 2, (0.0, 0.0, 60.0), 110.0, GENES)
    return INRField(cfg).eval()


@pytest.fixture(scope="module")
def framed(cells):
    """The same field with its training tissue stored, as fit writes it."""
    torch.manual_seed(0)
    cfg = FieldConfig(
        len(GENES), EncodingConfig(n_bands=3), 24, 2, (0.0, 0.0, 60.0), 110.0, GENES, **tissue_frame(cells)
    )
    return INRField(cfg).eval()


def _read(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    nodes = list(Reader(parse_url(str(path)))())
    return [n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs)]


def _validate(path):
    """Validate image, labels group and every label image with ome-zarr-models (NGFF 0.5)."""
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    root = zarr.open_group(str(path), mode="r")
    Image.from_zarr(root)
    names = []
    if "labels" in root:
        Labels.from_zarr(root["labels"])
        names = root["labels"].attrs.asdict()["ome"]["labels"]
        for n in names:
            ImageLabel.from_zarr(root["labels"][n])
    return root, names


def test_grid_spec():
    g = GridSpec.from_bounds([0, 100, 0, 50, 0, 20], voxel=10)
    assert g.shape == (2, 5, 10) and g.voxel == (10.0, 10.0, 10.0)
    zc, yc, xc = g.axis_centres()
    assert xc[0] == 5 and xc[-1] == 95 and zc.tolist() == [5, 15]
    pts = g.points(1, 2)
    assert pts.shape == (50, 3) and (pts[:, 2] == 15).all() and pts[1].tolist() == [15, 5, 15]
    flat = GridSpec.from_bounds([0, 100, 0, 100, 30, 30], shape=(1, 4, 4))  # one section: one plane at z = 30
    assert flat.axis_centres()[0].tolist() == [30.0]
    aniso = GridSpec.from_bounds([0, 100, 0, 50, 0, 20], voxel=(10, 2))  # XY 10 µm, Z 2 µm
    assert aniso.shape == (10, 5, 10) and aniso.voxel == (10.0, 10.0, 2.0)
    thin = GridSpec.from_bounds([0, 1000, 0, 1000, 0, 20], voxel=100)  # thinner than a voxel: still 2 planes
    assert thin.shape[0] == 2 and thin.voxel[2] == 10.0
    auto = GridSpec.from_bounds([0, 1280, 0, 640, 0, 40])
    assert auto.shape == (4, 64, 128) and auto.voxel == (10.0, 10.0, 10.0)
    with pytest.raises(InputError, match="either a voxel size or a grid shape"):
        GridSpec.from_bounds([0, 1, 0, 1, 0, 1], voxel=1, shape=(1, 1, 1))
    with pytest.raises(InputError, match="min ≤ max"):
        GridSpec.from_bounds([1, 0, 0, 1, 0, 1], voxel=1)
    with pytest.raises(InputError, match="voxel size Z"):
        GridSpec.from_bounds([0, 1, 0, 1, 0, 1], voxel=(1, -2))


def test_default_bounds_are_the_tissue_not_the_normalisation_cube(model, framed, cells):
    with pytest.raises(InputError, match="--cells"):
        model_bounds(model)  # an older file without the stored extent says what to pass
    b = model_bounds(framed)
    lo, hi = cells.min(0), cells.max(0)
    np.testing.assert_allclose(b[:4], [lo[0], hi[0], lo[1], hi[1]], atol=0.01)
    np.testing.assert_allclose(b[4:], [lo[2] - 20, hi[2] + 20], atol=0.01)  # half the 40 µm spacing
    grid = GridSpec.from_bounds(b)
    assert grid.shape[0] >= 2 and grid.voxel[0] == pytest.approx((hi[:2] - lo[:2]).max() / 128, rel=1e-3)


def test_ome_zarr_valid_and_reads_back_with_axes_scales_and_predict_values(model, tmp_path):
    grid = GridSpec.from_bounds([-100, 100, -100, 100, 0, 120], shape=(6, 70, 66))
    genes = ["g3", "g0", "g7"]
    res = render(model, genes, grid, tmp_path / "v.ome.zarr", mask=None, slab=4, chunk_points=1000, png=False)
    assert res.levels == 2 and res.channels == genes
    root, labels = _validate(res.path)
    assert labels == []  # no mask, no domains: no label images
    arr = root[root.attrs.asdict()["ome"]["multiscales"][0]["datasets"][0]["path"]]
    assert arr.metadata.dimension_names == ("c", "z", "y", "x")
    (img,) = _read(res.path)
    assert [a["name"] for a in img.metadata["axes"]] == ["c", "z", "y", "x"]
    assert [a.get("unit") for a in img.metadata["axes"][1:]] == ["micrometer"] * 3
    assert img.metadata["channel_names"] == genes
    ct = img.metadata["coordinateTransformations"]
    dx, dy, dz = grid.voxel
    np.testing.assert_allclose(ct[0][0]["scale"], [1, dz, dy, dx])
    np.testing.assert_allclose(ct[0][1]["translation"], [0, grid.origin[2] + dz / 2, grid.origin[1] + dy / 2,
                                                         grid.origin[0] + dx / 2])  # fmt: skip
    np.testing.assert_allclose(ct[1][0]["scale"], [1, dz, 2 * dy, 2 * dx])  # 6 planes: z kept at level 1
    np.testing.assert_allclose(ct[1][1]["translation"][2:], [grid.origin[1] + dy, grid.origin[0] + dx])
    level0 = np.asarray(img.data[0])
    assert level0.shape == (3, 6, 70, 66) and level0.dtype == np.float32
    want = predict(model, grid.points(), genes)  # voxel centres in C order (z, y, x)
    np.testing.assert_allclose(level0.reshape(3, -1).T, want, rtol=1e-5, atol=1e-6)
    level1 = np.asarray(img.data[1])
    np.testing.assert_allclose(level1, level0.reshape(3, 6, 35, 2, 33, 2).mean(axis=(3, 5)), rtol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_coarse_levels_average_only_the_tissue(framed, tmp_path):
    grid = GridSpec.from_bounds([-120, 120, -120, 120, 0, 120], shape=(4, 64, 64))
    res = render(framed, ["g4"], grid, tmp_path / "c.ome.zarr", slab=3, png=False)
    img, tissue = _read(res.path)[0], _read(res.path)[1]
    v0, v1 = np.asarray(img.data[0])[0], np.asarray(img.data[1])[0]
    t0 = np.asarray(tissue.data[0]).astype(float)
    num = (v0 * t0).reshape(4, 32, 2, 32, 2).sum(axis=(2, 4))
    den = t0.reshape(4, 32, 2, 32, 2).sum(axis=(2, 4))
    want = np.where(den > 0, num / np.maximum(den, 1), 0)
    np.testing.assert_allclose(v1, want, rtol=1e-5, atol=1e-6)
    edge = (den > 0) & (den < 4)  # blocks on the tissue's edge: the inside mean, not diluted by outside zeros
    assert edge.any() and (v1[edge] >= 0.9 * v0[t0 > 0].min()).all()


def test_mask_follows_each_section_and_fills_holes():
    # radius 100 at z = 0 shrinking to 40 at z = 120; the top section has an empty centre (a hole)
    cells = _discs([100, 80, 60, 40], [0.0, 40.0, 80.0, 120.0], n=900)
    holed = _discs([40], [120.0], n=900, hole=15, seed=1)
    cells = np.concatenate([cells[cells[:, 2] < 120], holed])
    m = TissueMask.build(cells, "alpha")
    assert m.section_z.tolist() == [0, 40, 80, 120] and m.pad == 20
    probe = np.array([
        [90.0, 0, 0], [90, 0, 120],  # inside the wide bottom section, outside the narrow top one
        [0, 0, 120],  # the hole in the top section is filled
        [70, 0, 40], [70, 0, 80],  # r = 70: inside at z = 40 (radius 80), outside at z = 80 (radius 60)
        [0, 0, 135], [0, 0, 150],  # within half a spacing above the top section / beyond it
    ])  # fmt: skip
    assert m.contains(probe).tolist() == [True, False, True, True, False, True, False]
    # between sections the outline is interpolated: at z = 60 the radius is ≈ 70
    ring = np.array([[r, 0, 60.0] for r in (60, 66, 74, 80)])
    assert m.contains(ring).tolist() == [True, True, False, False]
    hull = TissueMask.build(cells, "hull")
    grid = GridSpec.from_bounds([-110, 110, -110, 110, 0, 120], voxel=10)
    pts = grid.points()
    a_in, h_in = m.contains(pts), hull.contains(pts)
    assert 0.3 < a_in.mean() <= h_in.mean() and (a_in & ~h_in).mean() < 0.005  # alpha shape ⊆ hull


def test_masks_and_domain_labels(framed, cells, tmp_path):
    grid = GridSpec.from_bounds([-110, 110, -110, 110, -20, 140], voxel=10)
    pts = grid.points()
    mask = TissueMask.from_config(framed.cfg)
    inside = mask.contains(pts)
    res = render(
        framed, ["g1"], grid, tmp_path / "m.ome.zarr", domains=3, slab=5, png=False
    )  # the model's mask
    root, labels = _validate(res.path)
    assert sorted(labels) == ["domains", "tissue"]
    images = _read(res.path)
    img = images[0]
    vol = np.asarray(img.data[0])[0].ravel()
    want = predict(framed, pts, ["g1"])[:, 0]
    np.testing.assert_allclose(vol[inside], want[inside], rtol=1e-5, atol=1e-6)
    assert (vol[~inside] == 0).all() and res.voxels_inside == int(inside.sum())
    by_name = {n.metadata["name"]: n for n in images[1:]}
    tissue = np.asarray(by_name["tissue"].data[0]).ravel()
    assert (tissue.astype(bool) == inside).all()
    lab = by_name["domains"]
    labels_v = np.asarray(lab.data[0]).ravel()
    assert [a["name"] for a in lab.metadata["axes"]] == ["z", "y", "x"]
    assert ((labels_v == 0) == ~inside).all() and set(np.unique(labels_v[inside])) <= {1, 2, 3}
    props = root["labels"]["domains"].attrs.asdict()["ome"]["image-label"]["properties"]
    assert [p["label-value"] for p in props] == [1, 2, 3]
    markers = [p["markers"] for p in props]
    assert len(set(markers)) == 3 and all(markers)  # each domain its own marker genes
    assert res.out_of_domain is not None and res.out_of_domain["fraction"] == 0.0


def test_png_shows_masked_area_distinct_from_low_expression(framed, tmp_path):
    from PIL import Image

    from inrscrecon.query.figures import OUTSIDE

    grid = GridSpec.from_bounds([-150, 150, -150, 150, -20, 140], voxel=(6, 10))
    res = render(framed, ["g2"], grid, tmp_path / "p.ome.zarr", slab=8, domains=3)  # + the domains block
    rgb = np.asarray(Image.open(res.pngs[0]).convert("RGB")).reshape(-1, 3)
    grey = np.array([int(OUTSIDE[i : i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(rgb - grey).sum(1) == 0).mean() > 0.02  # outside the tissue: the grey, a visible area
    with pytest.warns(OutOfDomainWarning):  # the box reaches beyond the tissue, and nothing masks it
        res = render(framed, ["g2"], grid, tmp_path / "n.ome.zarr", mask=None, slab=8)  # no mask: no grey
    rgb = np.asarray(Image.open(res.pngs[0]).convert("RGB")).reshape(-1, 3)
    assert (np.abs(rgb - grey).sum(1) == 0).mean() < 0.001


def test_estimate_measures_rate_and_inside_fraction(framed):
    grid = GridSpec.from_bounds([-110, 110, -110, 110, -20, 140], voxel=10)
    est = estimate(framed, ["g1", "g2"], grid)
    inside = TissueMask.from_config(framed.cfg).contains(grid.points()).mean()
    assert est.voxels == grid.n_points and abs(est.voxels_inside / grid.n_points - inside) < 0.05
    assert est.points_per_s > 0 and est.seconds == pytest.approx(est.voxels_inside / est.points_per_s)
    assert est.level0_bytes == grid.n_points * 2 * 4 and "voxels" in est.line()


def test_render_cli(model, framed, cells, tmp_path, capsys):
    from inrscrecon.cli import main

    model.save(tmp_path / "m.safetensors")
    framed.save(tmp_path / "f.safetensors")
    np.save(tmp_path / "cells.npy", cells)
    out = tmp_path / "vol.ome.zarr"
    rc = main(["render", str(tmp_path / "m.safetensors"), "--genes", "g2,g5", "--voxel", "20", "--cells",
               str(tmp_path / "cells.npy"), "--mask", "tissue", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0 and "2 channel(s)" in capsys.readouterr().out
    (img, *_) = _read(out)
    assert np.asarray(img.data[0]).shape == (2, 8, 10, 10)  # 20 µm over the cells' box, z padded 20 µm
    assert (tmp_path / "vol_slices.png").exists()
    # the model's stored tissue, anisotropic voxels, estimate printed
    rc = main(["render", str(tmp_path / "f.safetensors"), "--genes", "g1", "--voxel", "20", "10", "--no-png",
               "--out", str(tmp_path / "a.ome.zarr")])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and "estimate:" in text and "inside the tissue mask" in text
    (img, *_) = _read(tmp_path / "a.ome.zarr")
    assert np.asarray(img.data[0]).shape == (1, 16, 10, 10)
    bad = tmp_path / "bad.ome.zarr"
    assert main(["render", str(tmp_path / "m.safetensors"), "--genes", "nope", "--out", str(bad)]) == 2
    assert "not in the model" in capsys.readouterr().err and not bad.exists()
    rc = main(
        ["render", str(tmp_path / "m.safetensors"), "--genes", "g1", "--mask", "hull", "--out", str(bad)]
    )
    assert rc == 2 and "--cells" in capsys.readouterr().err and not bad.exists()
    rc = main(["render", str(tmp_path / "m.safetensors"), "--genes", "g1", "--out", str(bad)])
    assert rc == 2 and "--cells" in capsys.readouterr().err and not bad.exists()  # no stored extent


def test_render_budget_refuses_without_force(framed, tmp_path, capsys):
    from inrscrecon.cli import main

    framed.save(tmp_path / "f.safetensors")
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "big.ome.zarr"
    argv = ["render", str(tmp_path / "f.safetensors"), "--genes", "g1", "--shape", "2000", "2000", "2000",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("inrscrecon: error:") == 1 and "8e+09 voxels" in err and "--force" in err
    assert "estimate:" in err and "model time ≈" in err and "measured here" in err  # the cost up front
    assert sorted(os.listdir(tmp_path)) == before
    small = ["render", str(tmp_path / "f.safetensors"), "--genes", "g1", "--shape", "4", "8", "8", "--no-png",
             "--max-voxels", "100", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(small) == 2 and not out.exists()
    assert main([*small, "--force"]) == 0 and out.exists()


@pytest.mark.parametrize("delay", [0.3, 2.5], ids=["in-the-slab-loop", "later"])
def test_sigterm_leaves_old_or_new_volume_and_no_temporary(framed, tmp_path, delay):
    framed.save(tmp_path / "f.safetensors")
    out = tmp_path / "t.ome.zarr"
    old = GridSpec.from_bounds([-100, 100, -100, 100, 0, 120], shape=(2, 4, 4))
    render(framed, ["g1"], old, out, png=False)  # the old state
    cmd = [sys.executable, "-m", "inrscrecon", "render", str(tmp_path / "f.safetensors"), "--genes", "g1,g2",
           "--shape", "200", "100", "100", "--slab", "1", "--chunk-points", "512", "--quiet", "--out", str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.startswith(".")], names  # no .t.ome.zarr.*.tmp left behind
    _validate(out)
    shape = np.asarray(_read(out)[0].data[0]).shape
    if proc.returncode == 0:  # finished before the signal: the complete new volume
        assert shape == (2, 200, 100, 100)
    else:
        assert proc.returncode == 143 and b"terminated" in err and shape == (1, 2, 4, 4)  # the old one


def test_domains_only_volume(framed, tmp_path):
    grid = GridSpec.from_bounds([-110, 110, -110, 110, -20, 140], voxel=20)
    res = render(framed, [], grid, tmp_path / "d.ome.zarr", domains=2, slab=4)
    root, labels = _validate(res.path)
    assert res.channels == ["domains"] and sorted(labels) == ["domains", "tissue"]
    img = np.asarray(_read(res.path)[0].data[0])
    lab = np.asarray(root["labels"]["domains"]["s0"])
    assert img.dtype == np.uint16 and (img[0] == lab).all() and set(np.unique(lab)) == {0, 1, 2}
    assert res.pngs[0].exists()


@pytest.mark.realdata
def test_dlpfc_section_outline_covers_its_spots():
    import anndata as ad
    from conftest import require_data

    from inrscrecon.query.domain_check import check_domain

    data = require_data("dlpfc_151673.h5ad")
    a = ad.read_h5ad(data / "dlpfc_151673.h5ad", backed="r")
    xy = np.asarray(a.obsm["spatial"], dtype=np.float64) * float(a.uns["microns_per_pixel"])
    cells = np.column_stack([xy, np.zeros(len(xy))])
    frame = tissue_frame(cells)
    mask = TissueMask.build(cells)
    assert mask.contains(cells).mean() > 0.999  # the outline follows the spots, stray ones included
    hull = TissueMask.build(cells, "hull")
    box = GridSpec.from_bounds(model_bounds_like(frame), voxel=(50, 5)).points()
    assert 0.6 < mask.contains(box).mean() <= hull.contains(box).mean()
    cfg = FieldConfig(1, genes=["g"], **frame)
    far = cells[:50] + [20000.0, 0.0, 0.0]  # another tissue's coordinates
    model = INRField(cfg)
    assert check_domain(model, cells, warn=False)["fraction"] == 0.0  # its own spots are in its domain
    d = TissueMask.from_config(cfg).distance(far)
    assert (d > 15000).all()


def model_bounds_like(frame: dict) -> list[float]:
    (x0, y0, z0), (x1, y1, z1) = frame["bounds"]
    return [x0, x1, y0, y1, z0 - 5, z1 + 5]


@pytest.mark.parametrize(
    "flag", [["--chunk-points", "0"], ["--slab", "-1"], ["--voxel", "0"], ["--max-voxels", "-5"]]
)
def test_render_flags_are_range_checked(framed, tmp_path, capsys, flag):
    from inrscrecon.cli import main

    framed.save(tmp_path / "f.safetensors")
    out = tmp_path / "r.ome.zarr"
    with pytest.raises(SystemExit) as exc:  # argparse's error, in the one-line form
        main(["render", str(tmp_path / "f.safetensors"), "--genes", "g1", *flag, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("inrscrecon: error:") == 1 and flag[0] in err and not out.exists()
