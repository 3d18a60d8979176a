"""Hash-grid encoding: the torch reference against a per-point brute force, the Triton kernels against the
reference (forward, table and coordinate gradients; under TRITON_INTERPRET=1 without a GPU), the encoding
in a field (state dict, save / load, training), and tiny-cuda-nn when it is importable.

Tolerances (fp32): forward and table gradient |a − e| ≤ 1e-5 + 1e-5·|e| (sums of ≤ 8·B products of the
same fp32 numbers, in another order); coordinate gradient 1e-4 relative to its largest entry (the s_l / 2
factor of the finest level amplifies rounding).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` that decorates our kernels

from inrscrecon.field.encoding import EncodingConfig, PositionalEncoding  # noqa: E402
from inrscrecon.field.hashgrid import HashGrid, grid_levels, hashgrid_reference  # noqa: E402
from inrscrecon.field.model import FieldConfig, INRField  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
PRIMES = (1, 2654435761, 805459861)  # instant-NGP / tiny-cuda-nn hash factors, written out independently


def _grid(levels=4, feats=2, log2_t=8, base=3, top=20, seed=0) -> HashGrid:
    """A small grid (dense coarse levels, hashed fine ones) with a table of order-1 values."""
    hg = HashGrid(levels, feats, log2_t, base, top, seed=seed)
    with torch.no_grad():
        hg.table.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    return hg


def _points(n: int, seed: int = 0, reach: float = 1.1) -> torch.Tensor:
    """n points in [−reach, reach]³ (some outside the cube when reach > 1)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g) * 2 - 1) * reach


def _brute_force(coords: torch.Tensor, table: torch.Tensor, hg: HashGrid) -> torch.Tensor:
    """One point, one level, one corner at a time with Python integers (uint32 hash as tiny-cuda-nn)."""
    g = hg.levels
    out = torch.zeros(coords.shape[0], hg.n_levels * hg.features, dtype=torch.float64)
    t = table.double()
    for i, c in enumerate(coords.double().tolist()):
        u = [(min(max(x, -1.0), 1.0) + 1.0) / 2.0 for x in c]
        for lvl in range(hg.n_levels):
            p = [x * g.scale[lvl] + 0.5 for x in u]
            base = [math.floor(x) for x in p]
            frac = [x - b for x, b in zip(p, base)]
            r, size = g.resolution[lvl], g.size[lvl]
            for corner in range(8):
                pos = [base[a] + ((corner >> a) & 1) for a in range(3)]
                w = 1.0
                for a in range(3):
                    w *= frac[a] if (corner >> a) & 1 else 1.0 - frac[a]
                if r**3 <= size:
                    idx = pos[0] + pos[1] * r + pos[2] * r * r
                else:
                    idx = 0
                    for a in range(3):
                        idx ^= (pos[a] * PRIMES[a]) & 0xFFFFFFFF
                row = g.offset[lvl] + idx % size
                out[i, lvl * hg.features : (lvl + 1) * hg.features] += w * t[row]
    return out


# ------------------------------------------------------------------------------------------------------------
# geometry and the torch reference
# ------------------------------------------------------------------------------------------------------------


def test_levels_are_geometric_and_sized():
    g = grid_levels(levels=8, log2_table_size=15, base_resolution=4, max_resolution=64)
    n = [s + 1 for s in g.scale]
    assert n[0] == pytest.approx(4) and n[-1] == pytest.approx(64)
    ratios = np.array(n[1:]) / np.array(n[:-1])
    assert np.allclose(ratios, g.per_level_scale) and g.per_level_scale == pytest.approx(16 ** (1 / 7))
    assert all(r == math.ceil(s) + 1 for r, s in zip(g.resolution, g.scale))
    for r, p, dense in zip(g.resolution, g.size, g.dense):
        assert p <= 2**15 and (p % 8 == 0)
        assert dense == (r**3 <= p)
    assert g.dense[0] and not g.dense[-1]  # coarse levels dense, fine ones hashed
    assert list(g.offset) == list(np.cumsum((0,) + g.size[:-1]))
    assert HashGrid(8, 2, 15, 4, 64).table.shape == (g.n_rows, 2)


def test_single_level_grid():
    g = grid_levels(levels=1, log2_table_size=10, base_resolution=8, max_resolution=64)
    assert g.scale == (7.0,) and g.resolution == (8,) and g.dense == (True,) and g.n_rows == 512
    hg = _grid(levels=1, log2_t=10, base=8, top=64)
    pts = _points(20, seed=8)
    torch.testing.assert_close(
        hashgrid_reference(pts, hg.table, hg.levels).double(),
        _brute_force(pts, hg.table.detach(), hg),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.skipif(not CUDA, reason="auto picks Triton only for CUDA tensors (CPU: the torch reference)")
def test_auto_picks_a_kernel_on_cuda():
    hg = HashGrid().to(DEV)
    assert hg.resolve(torch.zeros(1, 3, device=DEV)) in ("triton", "tcnn")


@pytest.mark.parametrize(
    "bad", [dict(levels=0), dict(log2_table_size=3), dict(base_resolution=1), dict(max_resolution=2)]
)
def test_bad_geometry_is_refused(bad):
    kw = dict(levels=4, log2_table_size=8, base_resolution=3, max_resolution=20) | bad
    with pytest.raises(ValueError, match="hashgrid"):
        grid_levels(**kw)
    with pytest.raises(ValueError, match="features_per_level"):
        HashGrid(features_per_level=3)


def test_table_init_is_small_uniform_and_seeded():
    a, b, c = (HashGrid(seed=s).table.detach() for s in (0, 0, 1))
    assert a.abs().max() <= 1e-4 and a.abs().max() > 9e-5 and abs(float(a.mean())) < 1e-6
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("feats", [1, 2, 4])
def test_reference_matches_brute_force(feats):
    hg = _grid(feats=feats)
    assert any(hg.levels.dense) and not all(hg.levels.dense)
    pts = torch.cat([_points(60, seed=feats), torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])])
    got = hashgrid_reference(pts, hg.table, hg.levels)
    want = _brute_force(pts, hg.table.detach(), hg)
    assert got.shape == (62, 4 * feats)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_reference_interpolates_and_clamps():
    hg = _grid()
    # continuity: the encoding moves little between nearby points (trilinear, no jumps at cell faces)
    pts = _points(200, seed=3, reach=0.95)
    near = hashgrid_reference(pts + 1e-5, hg.table, hg.levels) - hashgrid_reference(pts, hg.table, hg.levels)
    assert near.abs().max() < 1e-2
    # outside the cube: the features of the nearest face point, and no gradient along the clamped axis
    inside = torch.tensor([[0.3, -0.2, 1.0]])
    outside = torch.tensor([[0.3, -0.2, 2.5]], requires_grad=True)
    out = hashgrid_reference(outside, hg.table, hg.levels)
    torch.testing.assert_close(out, hashgrid_reference(inside, hg.table, hg.levels))
    (gc,) = torch.autograd.grad(out.sum(), outside)
    assert gc[0, 2] == 0 and gc[0, :2].abs().sum() > 0


def test_reference_coordinate_gradient_is_the_derivative():
    hg = _grid()
    table = hg.table.detach().double()
    pts = _points(20, seed=5, reach=0.9).double().requires_grad_(True)
    torch.autograd.gradcheck(lambda c: hashgrid_reference(c, table, hg.levels), (pts,), eps=1e-7, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Triton kernels against the reference
# ------------------------------------------------------------------------------------------------------------


def _kernels():
    pytest.importorskip("triton", reason="triton is not installed")
    from conftest import load_interpreted

    return load_interpreted("inrscrecon.kernels.triton_hashgrid", "_hashgrid_fwd_kernel")


@pytest.mark.triton
@pytest.mark.parametrize(("n", "feats"), [(1, 2), (37, 1), (1500, 2), (300, 4)])
def test_triton_matches_reference(n, feats):
    _kernels()
    from inrscrecon.field.hashgrid import hashgrid_triton

    hg = _grid(feats=feats, seed=n).to(DEV)
    pts = _points(n, seed=n).to(DEV).requires_grad_(True)
    ref = hashgrid_reference(pts, hg.table, hg.levels)
    out = hashgrid_triton(pts, hg.table, hg.levels)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    gc_ref, gt_ref = torch.autograd.grad(ref, (pts, hg.table), grad)
    gc, gt = torch.autograd.grad(out, (pts, hg.table), grad)
    torch.testing.assert_close(gt, gt_ref, rtol=1e-5, atol=1e-5)
    assert gt.abs().sum() > 0
    torch.testing.assert_close(gc, gc_ref, rtol=1e-4, atol=1e-4 * float(gc_ref.abs().max()))


@pytest.mark.triton
def test_triton_table_gradient_without_coordinate_gradient():
    _kernels()
    from inrscrecon.field.hashgrid import hashgrid_triton

    hg = _grid(seed=7).to(DEV)
    pts = _points(400, seed=7).to(DEV)  # coords without grad: only the table's is formed
    out = hashgrid_triton(pts, hg.table, hg.levels)
    (gt,) = torch.autograd.grad(out.square().sum(), hg.table)
    (gt_ref,) = torch.autograd.grad(hashgrid_reference(pts, hg.table, hg.levels).square().sum(), hg.table)
    torch.testing.assert_close(gt, gt_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
def test_triton_op_passes_opcheck():
    _kernels()
    from inrscrecon.field.hashgrid import level_tensors

    hg = _grid(seed=2).to(DEV)
    scale, res, off, size = level_tensors(hg.levels, DEV)
    pts = _points(50, seed=2).to(DEV).requires_grad_(True)
    table = hg.table.detach().clone().requires_grad_(True)
    torch.library.opcheck(
        torch.ops.inrscrecon.hashgrid.default,
        (pts, table, scale, res, off, size),
        test_utils=(
            "test_schema",
            "test_autograd_registration",
            "test_faketensor",
            "test_aot_dispatch_dynamic",
        ),
    )


@pytest.mark.triton
def test_module_impls_agree():
    _kernels()
    hg = _grid(seed=4).to(DEV)
    pts = _points(100, seed=4).to(DEV)
    assert HashGrid().resolve(torch.zeros(1, 3)) == "torch"  # CPU auto: the reference
    hg.impl = "triton"
    out = hg(pts)
    hg.impl = "torch"
    torch.testing.assert_close(out, hg(pts), rtol=1e-5, atol=1e-5)
    hg.impl = "nope"
    with pytest.raises(ValueError, match="impl"):
        hg(pts)


@pytest.mark.triton
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_encoding_compiles_fullgraph(impl):
    """Encoding + a linear layer, forward and backward, traced as one graph (a graph break raises)."""
    _kernels()
    enc = PositionalEncoding(EncodingConfig(kind="hashgrid", levels=4, log2_table_size=8, max_resolution=20))
    enc = enc.to(DEV)
    enc.hashgrid.impl = impl
    lin = torch.nn.Linear(enc.out_dim, 5).to(DEV)
    pts = _points(64, seed=11).to(DEV)

    def step(c):
        loss = lin(enc(c)).square().mean()
        return torch.autograd.grad(loss, [enc.hashgrid.table])[0]

    want = step(pts)
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # as fit's compiled step traces autograd
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(pts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert want.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------
# in the field
# ------------------------------------------------------------------------------------------------------------


def test_positional_encoding_hashgrid_layout():
    cfg = EncodingConfig(kind="hashgrid", levels=3, features_per_level=4, log2_table_size=10)
    enc = PositionalEncoding(cfg)
    assert enc.out_dim == 3 + 12
    assert "hashgrid.table" in dict(enc.named_parameters())
    pts = _points(10, reach=0.9)
    out = enc(pts)
    assert out.shape == (10, 15)
    torch.testing.assert_close(out[:, :3], pts)
    torch.testing.assert_close(out[:, 3:], enc.hashgrid(pts))
    bare = PositionalEncoding(EncodingConfig(kind="hashgrid", levels=3, include_input=False))
    assert bare.out_dim == 6 and bare(pts).shape == (10, 6)
    with pytest.raises(ValueError, match="hashgrid"):
        PositionalEncoding(EncodingConfig(kind="hashgird"))


def test_field_with_hashgrid_saves_and_loads(tmp_path):
    from inrscrecon.errors import InputError
    from inrscrecon.field.model import FORMAT_VERSION

    enc = EncodingConfig(kind="hashgrid", levels=4, log2_table_size=10, base_resolution=4, max_resolution=32)
    model = INRField(FieldConfig(n_genes=7, encoding=enc, width=16, n_layers=2))
    with torch.no_grad():
        model.encoding.hashgrid.table.uniform_(-0.5, 0.5)
    path = tmp_path / "hg.safetensors"
    model.save(path)
    loaded = INRField.load(path)
    assert loaded.cfg == model.cfg
    pts = _points(30, reach=0.9)
    torch.testing.assert_close(loaded(pts), model(pts).detach())
    # a table whose shape the config does not imply is refused, naming the tensor
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == str(FORMAT_VERSION)
    state = load_file(str(path))
    bad = tmp_path / "bad.safetensors"
    short = dict(state, **{"encoding.hashgrid.table": state["encoding.hashgrid.table"][:-8]})
    save_file(short, str(bad), metadata=meta)
    with pytest.raises(InputError, match="encoding.hashgrid.table"):
        INRField.load(bad)
    # hash-grid fields out of range: one InputError naming the field
    for key, value, match in (("levels", 0, "levels"), ("log2_table_size", 2, "log2_table_size")):
        cfg = json.loads(meta["config"])
        cfg["encoding"][key] = value
        save_file(state, str(bad), metadata=dict(meta, config=json.dumps(cfg)))
        with pytest.raises(InputError, match=match):
            INRField.load(bad)


def test_fit_with_hashgrid_lowers_validation_rmse(small_stack):
    from inrscrecon.data.preprocess import select_genes
    from inrscrecon.data.stack import build_cell_table
    from inrscrecon.field.losses import LossConfig
    from inrscrecon.train.fit import TrainConfig, fit

    sections, _ = small_stack
    table = build_cell_table(sections, select_genes(sections, 40))
    enc = EncodingConfig(kind="hashgrid", levels=6, log2_table_size=12, base_resolution=4, max_resolution=32)
    tc = TrainConfig(epochs=8, batch_size=64, progress=False, seed=2, val_fraction=0.15, patience=8)
    res = fit(table, enc, 32, 2, LossConfig.preset("no_rc"), tc)
    val = [h["val_rmse"] for h in res.history]
    # training starts at the mean profile (head bias init): the hash grid must learn spatial structure
    assert min(val) < val[0] - 0.01, val
    assert res.model.cfg.encoding.kind == "hashgrid"
    assert res.model.encoding.hashgrid.table.abs().max() > 1e-3  # the table itself was trained


def test_run_records_carry_grid_fields_for_the_hash_grid_only(small_stack):
    """A Fourier fit's run record is what it was before the hash-grid fields existed (old checkpoints and
    finished models still match); a hash-grid record has them, so changing the grid means a new fit."""
    from inrscrecon.data.preprocess import select_genes
    from inrscrecon.data.stack import build_cell_table
    from inrscrecon.field.encoding import HASHGRID_FIELDS
    from inrscrecon.train.fit import TrainConfig, record_mismatch, run_record

    sections, _ = small_stack
    table = build_cell_table(sections[:2], select_genes(sections[:2], 10))
    tc = TrainConfig(progress=False)
    fourier = run_record(table, EncodingConfig(n_bands=3), 8, 1, None, tc)
    assert not set(HASHGRID_FIELDS) & set(fourier["encoding"])
    grid = run_record(table, EncodingConfig(kind="hashgrid"), 8, 1, None, tc)
    assert set(HASHGRID_FIELDS) <= set(grid["encoding"])
    finer = run_record(table, EncodingConfig(kind="hashgrid", max_resolution=64), 8, 1, None, tc)
    assert "max_resolution" in (record_mismatch(grid, finer) or "")


@pytest.mark.triton
def test_fit_backend_switch_reaches_the_lookup(small_stack, monkeypatch):
    """``TrainConfig.backend`` picks the hash-grid lookup too: torch never calls the kernel, triton does."""
    _kernels()
    import inrscrecon.field.hashgrid as hgmod
    from inrscrecon.data.preprocess import select_genes
    from inrscrecon.data.stack import build_cell_table
    from inrscrecon.field.losses import LossConfig
    from inrscrecon.train.fit import TrainConfig, fit

    calls = []
    real = hgmod.hashgrid_triton
    monkeypatch.setattr(hgmod, "hashgrid_triton", lambda *a: calls.append(1) or real(*a))
    sections, _ = small_stack
    table = build_cell_table(sections[:2], select_genes(sections[:2], 10))
    enc = EncodingConfig(kind="hashgrid", levels=3, log2_table_size=8, max_resolution=16)
    for backend in ("torch", "triton"):
        calls.clear()
        tc = TrainConfig(epochs=1, batch_size=256, progress=False, backend=backend, device=str(DEV))
        res = fit(table, enc, 8, 1, LossConfig.preset("no_rc"), tc)
        assert res.model.encoding.hashgrid.impl == backend
        assert (len(calls) > 0) == (backend == "triton"), (backend, len(calls))


def test_cli_fit_hashgrid_then_predict(tmp_path):
    """``fit --encoding hashgrid`` (default --bands auto does not apply: one fit, no band candidates), then
    ``predict`` from the saved model."""
    import anndata as ad

    from inrscrecon.cli import main

    d = tmp_path / "synth"
    assert (
        main(["synth", "--sections", "2", "--cells", "150", "--genes", "20", "--seed", "4", "--out", str(d)])
        == 0
    )
    model = tmp_path / "m.safetensors"
    files = sorted(str(p) for p in d.glob("section_*.h5ad"))
    flags = ["--genes", "10", "--epochs", "2", "--width", "8", "--layers", "1", "--lambda-rc", "0", "--quiet"]
    assert main(["fit", *files, "--out", str(model), "--encoding", "hashgrid", *flags]) == 0
    assert not list(tmp_path.glob("m.safetensors.L*.ckpt"))
    loaded = INRField.load(model)
    assert loaded.cfg.encoding.kind == "hashgrid" and loaded.encoding.hashgrid.table.abs().max() > 1e-4
    q = tmp_path / "q.npy"
    np.save(q, np.array([[0.0, 0.0, 0.0], [10.0, 20.0, 40.0]]))
    assert main(["predict", str(model), str(q), "--out", str(tmp_path / "p.h5ad")]) == 0
    p = ad.read_h5ad(tmp_path / "p.h5ad")
    assert p.shape == (2, 10) and np.isfinite(np.asarray(p.X)).all()


# ------------------------------------------------------------------------------------------------------------
# tiny-cuda-nn (optional)
# ------------------------------------------------------------------------------------------------------------


def test_tinycudann_matches_reference():
    pytest.importorskip("tinycudann", reason="tinycudann is not installed (optional backend)")
    if not CUDA:
        pytest.skip("tinycudann needs CUDA")
    from inrscrecon.field.hashgrid import hashgrid_tcnn

    hg = _grid(levels=8, log2_t=14, base=4, top=64).to(DEV)
    pts = _points(4096, seed=9, reach=1.0).to(DEV)
    want = hashgrid_reference(pts, hg.table, hg.levels)
    got = hashgrid_tcnn(pts, hg.table, hg._tcnn_module(DEV))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert hg.resolve(pts) == "tcnn"
