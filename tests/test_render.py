"""Rendering: grid spec, tissue masks, OME-Zarr that ome-zarr-py reads back with the right axes / scales and
values equal to ``predict`` at the voxel centres, domain labels, PNG slices, the ``render`` CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inrscrecon.errors import InputError
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.model import FieldConfig, INRField
from inrscrecon.query.predict import predict
from inrscrecon.query.render import GridSpec, TissueMask, render

GENES = [f"g{i}" for i in range(12)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return INRField(
        FieldConfig(len(GENES), EncodingConfig(n_bands=3), 24, 2, (0.0, 0.0, 60.0), 110.0, GENES)
    ).eval()


@pytest.fixture(scope="module")
def cells():
    """Four disc-shaped sections 40 µm apart, radius 100 µm: [n, 3] µm."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(-100, 100, size=(1600, 2))
    xy = xy[(xy**2).sum(1) < 100**2]
    return np.column_stack([xy, np.repeat([0.0, 40.0, 80.0, 120.0], len(xy) // 4 + 1)[: len(xy)]])


def _read(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    nodes = list(Reader(parse_url(str(path)))())
    images = [n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs)]
    return images


def test_grid_spec():
    g = GridSpec.from_bounds([0, 100, 0, 50, 0, 20], voxel=10)
    assert g.shape == (2, 5, 10) and g.voxel == (10.0, 10.0, 10.0)
    zc, yc, xc = g.axis_centres()
    assert xc[0] == 5 and xc[-1] == 95 and zc.tolist() == [5, 15]
    pts = g.points(1, 2)
    assert pts.shape == (50, 3) and (pts[:, 2] == 15).all() and pts[1].tolist() == [15, 5, 15]
    flat = GridSpec.from_bounds([0, 100, 0, 100, 30, 30], shape=(1, 4, 4))  # one section: one plane at z = 30
    assert flat.axis_centres()[0].tolist() == [30.0]
    with pytest.raises(InputError, match="either a voxel size or a grid shape"):
        GridSpec.from_bounds([0, 1, 0, 1, 0, 1], voxel=1, shape=(1, 1, 1))
    with pytest.raises(InputError, match="min ≤ max"):
        GridSpec.from_bounds([1, 0, 0, 1, 0, 1], voxel=1)


def test_ome_zarr_reads_back_with_axes_scales_and_predict_values(model, tmp_path):
    grid = GridSpec.from_bounds([-100, 100, -100, 100, 0, 120], shape=(6, 70, 66))
    genes = ["g3", "g0", "g7"]
    res = render(model, genes, grid, tmp_path / "v.ome.zarr", slab=4, chunk_points=1000, png=False)
    assert res.levels == 2 and res.channels == genes
    (img,) = _read(res.path)
    assert [a["name"] for a in img.metadata["axes"]] == ["c", "z", "y", "x"]
    assert [a.get("unit") for a in img.metadata["axes"][1:]] == ["micrometer"] * 3
    assert img.metadata["channel_names"] == genes
    ct = img.metadata["coordinateTransformations"]
    dx, dy, dz = grid.voxel
    np.testing.assert_allclose(ct[0][0]["scale"], [1, dz, dy, dx])
    np.testing.assert_allclose(ct[0][1]["translation"], [0, grid.origin[2] + dz / 2, grid.origin[1] + dy / 2,
                                                         grid.origin[0] + dx / 2])  # fmt: skip
    np.testing.assert_allclose(ct[1][0]["scale"], [1, 2 * dz, 2 * dy, 2 * dx])
    level0 = np.asarray(img.data[0])
    assert level0.shape == (3, 6, 70, 66) and level0.dtype == np.float32
    want = predict(model, grid.points(), genes)  # voxel centres in C order (z, y, x)
    np.testing.assert_allclose(level0.reshape(3, -1).T, want, rtol=1e-5, atol=1e-6)
    level1 = np.asarray(img.data[1])
    np.testing.assert_allclose(level1, level0.reshape(3, 3, 2, 35, 2, 33, 2).mean(axis=(2, 4, 6)), rtol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_masks_and_domain_labels(model, cells, tmp_path):
    alpha = TissueMask.build(cells, "alpha")
    hull = TissueMask.build(cells, "hull")
    grid = GridSpec.from_bounds([-110, 110, -110, 110, 0, 120], voxel=10)
    pts = grid.points()
    a_in, h_in = alpha.contains(pts), hull.contains(pts)
    assert 0.3 < a_in.mean() < h_in.mean() + 1e-9 and not (a_in & ~h_in).any()  # alpha shape ⊆ hull
    corner = np.array([[105.0, 105.0, 60.0], [0.0, 0.0, 60.0]])  # outside the disc / at the centre
    assert alpha.contains(corner).tolist() == [False, True]
    res = render(model, ["g1"], grid, tmp_path / "m.ome.zarr", mask=alpha, domains=3, slab=5)
    images = _read(res.path)
    img, lab = images[0], images[-1]
    vol = np.asarray(img.data[0])[0].ravel()
    want = predict(model, pts, ["g1"])[:, 0]
    np.testing.assert_allclose(vol[a_in], want[a_in], rtol=1e-5, atol=1e-6)
    assert (vol[~a_in] == 0).all() and res.voxels_inside == int(a_in.sum())
    labels = np.asarray(lab.data[0]).ravel()
    assert lab.metadata["name"] == "domains" and [a["name"] for a in lab.metadata["axes"]] == ["z", "y", "x"]
    assert ((labels == 0) == ~a_in).all() and set(np.unique(labels[a_in])) <= {1, 2, 3}
    assert res.pngs and res.pngs[0].stat().st_size > 1000


def test_render_cli(model, cells, tmp_path, capsys):
    from inrscrecon.cli import main

    model.save(tmp_path / "m.safetensors")
    np.save(tmp_path / "cells.npy", cells)
    out = tmp_path / "vol.ome.zarr"
    rc = main(["render", str(tmp_path / "m.safetensors"), "--genes", "g2,g5", "--voxel", "20", "--cells",
               str(tmp_path / "cells.npy"), "--mask", "tissue", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0 and "2 channel(s)" in capsys.readouterr().out
    (img,) = _read(out)
    assert np.asarray(img.data[0]).shape == (2, 6, 10, 10)  # 20 µm voxels over the cells' bounding box
    assert (tmp_path / "vol_slices.png").exists()
    bad = tmp_path / "bad.ome.zarr"
    assert main(["render", str(tmp_path / "m.safetensors"), "--genes", "nope", "--out", str(bad)]) == 2
    assert "not in the model" in capsys.readouterr().err and not bad.exists()
    assert (
        main(
            ["render", str(tmp_path / "m.safetensors"), "--genes", "g1", "--mask", "hull", "--out", str(bad)]
        )
        == 2
    )
    assert "--cells" in capsys.readouterr().err and not bad.exists()
