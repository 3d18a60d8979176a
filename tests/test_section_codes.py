"""Per-section appearance codes and the anisotropic frame: the interpolation rule, the knots fit takes from
the stack, a batch-effect stack where codes help on a held-out section, the predict-time record, the CLI
flags, and the fused (Triton) trunk path agreeing with the torch one with z stretched and codes on."""

from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` that decorates our kernels

from inrscrecon.errors import InputWarning  # noqa: E402
from inrscrecon.field.encoding import EncodingConfig  # noqa: E402
from inrscrecon.field.model import (  # noqa: E402
    FieldConfig,
    INRField,
    InterpolatedCodesWarning,
    interpolate_codes,
    section_code_settings,
)

KNOTS = [0.0, 40.0, 120.0, 160.0]  # µm, uneven on purpose


def _coded_model(z_stretch: float = 2.5, dim: int = 3, width: int = 16, seed: int = 0) -> INRField:
    torch.manual_seed(seed)
    cfg = FieldConfig(
        7,
        EncodingConfig(n_bands=2),
        width,
        2,
        center=(10.0, -5.0, 80.0),
        scale=300.0,
        genes=[f"g{i}" for i in range(7)],
        z_stretch=z_stretch,
        section_code_dim=dim,
        section_knots_z=list(KNOTS),
    )
    m = INRField(cfg)
    with torch.no_grad():
        assert m.section_codes is not None
        m.section_codes.copy_(torch.randn(len(KNOTS), dim))
    return m


# ------------------------------------------------------------------------------------------------------------
# the interpolation rule
# ------------------------------------------------------------------------------------------------------------


def test_interpolation_exact_at_knots_linear_between_clamped_outside():
    knots = torch.tensor([-0.5, 0.0, 0.2, 0.9], dtype=torch.float64)
    codes = torch.randn(4, 3, dtype=torch.float64)
    # exact at every knot: the weights are 1 and 0, so the code is the knot's own, bit for bit
    torch.testing.assert_close(interpolate_codes(knots, knots, codes), codes, rtol=0, atol=0)
    # linear between two knots
    t = torch.tensor([0.0, 0.25, 0.5, 0.9])
    z = (0.2 + t * 0.7).double()
    expect = (1 - t.double())[:, None] * codes[2] + t.double()[:, None] * codes[3]
    torch.testing.assert_close(interpolate_codes(z, knots, codes), expect)
    mid = interpolate_codes(torch.tensor([-0.25], dtype=torch.float64), knots, codes)
    torch.testing.assert_close(mid[0], (codes[0] + codes[1]) / 2)
    # clamped outside: the first / last code
    out = interpolate_codes(torch.tensor([-3.0, -0.50001, 0.90001, 7.0], dtype=torch.float64), knots, codes)
    torch.testing.assert_close(out, codes[[0, 0, 3, 3]], rtol=0, atol=0)
    # one knot: one code everywhere
    one = interpolate_codes(torch.tensor([-1.0, 0.0, 5.0]), torch.tensor([0.3]), codes[:1].float())
    torch.testing.assert_close(one, codes[:1].float().expand(3, 3))


def test_interpolation_is_differentiable_in_the_codes():
    knots = torch.tensor([0.0, 1.0, 3.0])
    codes = torch.zeros(3, 2, requires_grad=True)
    interpolate_codes(torch.tensor([0.5, 2.0, 9.0]), knots, codes).sum().backward()
    # z=0.5 → ½·c0 + ½·c1; z=2 → ½·c1 + ½·c2; z=9 → c2
    torch.testing.assert_close(codes.grad, torch.tensor([[0.5, 0.5], [1.0, 1.0], [1.5, 1.5]]))


def test_training_cells_get_exactly_their_sections_code():
    m = _coded_model()
    rng = np.random.default_rng(0)
    xyz = np.column_stack([rng.uniform(-200, 200, (8, 2)), np.repeat(KNOTS, 2)])  # two cells per section
    c = m.normalize(torch.as_tensor(xyz))
    assert m.section_codes is not None and m.code_proj is not None
    code = interpolate_codes(c[:, 2], m.knots, m.section_codes)
    torch.testing.assert_close(code, m.section_codes[np.repeat(np.arange(4), 2)], rtol=0, atol=0)
    # the features are trunk(encoding) plus that code through the projection
    with torch.no_grad():
        base = m.trunk(m.encoding(c))
        torch.testing.assert_close(m.hidden(c), base + code @ m.code_proj.weight.T)
    # halfway between the sections at 40 and 120 µm: the mean of their codes
    half = m.normalize(torch.tensor([[0.0, 0.0, 80.0]], dtype=torch.float64))
    torch.testing.assert_close(
        interpolate_codes(half[:, 2], m.knots, m.section_codes)[0],
        (m.section_codes[1] + m.section_codes[2]) / 2,
    )


def test_codes_start_at_zero_and_old_models_have_none():
    cfg = FieldConfig(3, section_code_dim=4, section_knots_z=[0.0, 10.0])
    m = INRField(cfg)
    assert m.section_codes is not None and m.code_proj is not None
    assert m.section_codes.shape == (2, 4) and not m.section_codes.any()
    assert m.code_proj.weight.shape == (cfg.width, 4) and m.code_proj.bias is None
    c = torch.rand(5, 3) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(m.hidden(c), m.trunk(m.encoding(c)), rtol=0, atol=0)  # codes start at 0
    plain = INRField(FieldConfig(3))
    assert (
        plain.section_codes is None and plain.code_proj is None and plain.code_use(np.zeros((2, 3))) is None
    )
    with pytest.raises(ValueError, match="section_knots_z"):
        INRField(FieldConfig(3, section_code_dim=2))


# ------------------------------------------------------------------------------------------------------------
# the anisotropic frame
# ------------------------------------------------------------------------------------------------------------


def test_z_stretch_multiplies_normalised_z_only():
    iso = _coded_model(z_stretch=1.0)
    aniso = _coded_model(z_stretch=4.0)
    xyz = torch.tensor([[100.0, 50.0, 0.0], [-30.0, 7.0, 160.0], [0.0, 0.0, 80.0]], dtype=torch.float64)
    a, b = iso.normalize(xyz), aniso.normalize(xyz)
    torch.testing.assert_close(b[:, :2], a[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(b[:, 2], 4.0 * a[:, 2])
    torch.testing.assert_close(a, (xyz.float() - iso.center) / iso.scale, rtol=0, atol=0)  # isotropic rule
    # the knots live in the same (stretched) normalised z
    torch.testing.assert_close(aniso.knots, 4.0 * iso.knots)
    assert aniso.knots.tolist() == sorted(aniso.knots.tolist())


def test_z_stretch_beyond_the_cube_warns_with_the_limit():
    from inrscrecon.errors import InputError
    from inrscrecon.field.model import check_z_stretch

    xyz = np.array([[0.0, 0.0, 0.0], [1000.0, 0.0, 40.0], [500.0, 800.0, 80.0]])
    center, scale = FieldConfig.frame_for(xyz)  # scale 510 µm; z reaches ±40 µm = ±0.0784
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_z_stretch(xyz, center, scale, 12.0) == 12.0  # ±0.94: inside
    with pytest.warns(InputWarning, match=r"at most 12\.8 keeps them inside") as rec:
        assert check_z_stretch(xyz, center, scale, 20.0) == 20.0
    assert "normalised z = ±1.57" in str(rec[0].message)
    with pytest.raises(InputError, match="z_stretch = 0"):
        check_z_stretch(xyz, center, scale, 0.0)


def test_z_stretch_round_trip_predicts_the_same(tmp_path):
    from inrscrecon.query.predict import predict

    m = _coded_model(z_stretch=3.0)
    m.save(tmp_path / "m.safetensors")
    back = INRField.load(tmp_path / "m.safetensors")
    assert back.cfg.z_stretch == 3.0 and back.cfg.section_knots_z == KNOTS
    xyz = np.array([[0.0, 0.0, 40.0], [20.0, -10.0, 100.0], [5.0, 5.0, 500.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InterpolatedCodesWarning)
        np.testing.assert_array_equal(predict(back, xyz), predict(m.eval(), xyz))


# ------------------------------------------------------------------------------------------------------------
# knots from the stack
# ------------------------------------------------------------------------------------------------------------


def test_knots_from_a_stack_sorted_one_per_section():
    z = np.repeat([80.0, 0.0, 40.0], 5)
    xyz = np.column_stack([np.arange(15.0), np.arange(15.0), z])
    sec = np.repeat(["b", "a", "c"], 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = section_code_settings(xyz, sec, 4)
        assert section_code_settings(xyz, sec, 0) == {"section_code_dim": 0, "section_knots_z": []}
    assert got == {"section_code_dim": 4, "section_knots_z": [0.0, 40.0, 80.0]}


@pytest.mark.parametrize(
    "z,sec,fragment",
    [
        (np.linspace(0, 100, 12), None, "no sections (a 3D point cloud)"),
        (np.linspace(0, 100, 12), np.repeat(["a", "b"], 6), "section 'a' spans z = 0..45.4545 µm"),
        (np.zeros(12), np.repeat(["a"], 12), "at least 2 sections"),
        (np.repeat([0.0, 10.0, 10.0], 4), np.repeat(["a", "b", "c"], 4), "two sections share z = 10 µm"),
    ],
)
def test_codes_turned_off_with_one_warning_where_z_does_not_name_the_section(z, sec, fragment):
    xyz = np.column_stack([np.arange(12.0), np.zeros(12), z])
    with pytest.warns(InputWarning, match="section codes turned off") as rec:
        got = section_code_settings(xyz, sec, 3)
    assert got == {"section_code_dim": 0, "section_knots_z": []}
    assert len(rec) == 1 and fragment in str(rec[0].message), str(rec[0].message)


# ------------------------------------------------------------------------------------------------------------
# a stack with a batch effect: codes help on the held-out section
# ------------------------------------------------------------------------------------------------------------


def _batch_effect_stack(seed: int, effect: float = 0.5):
    """5 synthetic sections (300 cells × 30 genes, 40 µm apart) at their true poses; each section's counts
    scaled by its own gene-wise factor exp(N(0, effect²)) (a technical batch effect)."""
    from inrscrecon.data.stack import build_cell_table
    from inrscrecon.data.synthetic import SynthConfig, make_sections

    secs, truth = make_sections(SynthConfig(n_sections=5, cells_per_section=300, n_genes=30, seed=seed))
    rng = np.random.default_rng(seed + 100)
    for k, s in enumerate(secs):
        s.obsm["spatial_3d"] = truth.xyz(k)
        x = s.X.toarray() if hasattr(s.X, "toarray") else np.asarray(s.X)
        s.X = np.round(x * np.exp(rng.normal(0.0, effect, x.shape[1]))[None]).astype(np.float32)
        s.uns["X_kind"] = "counts"
    genes = list(secs[0].var_names)
    train = build_cell_table([s for k, s in enumerate(secs) if k != 2], genes)
    return train, build_cell_table([secs[2]], genes)


def _fit_rmse(train, test, dim: int) -> tuple[float, float, INRField]:
    from inrscrecon.query.predict import predict
    from inrscrecon.train.fit import TrainConfig, fit

    tc = TrainConfig(epochs=40, patience=40, batch_size=128, progress=False, seed=0)
    res = fit(train, EncodingConfig(n_bands=3), 64, 3, None, tc, section_code_dim=dim)
    truth = test.targets(np.arange(test.n_cells))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InterpolatedCodesWarning)
        held = float(np.sqrt(((predict(res.model, test.coords) - truth) ** 2).mean()))
    return min(h["val_rmse"] for h in res.history), held, res.model


def test_codes_lower_the_heldout_section_rmse_on_a_batch_effect_stack():
    train, test = _batch_effect_stack(seed=1)
    val0, held0, _ = _fit_rmse(train, test, 0)
    val4, held4, model = _fit_rmse(train, test, 4)
    # measured (seeds 0–2 of this stack): held-out RMSE 0.949 → 0.934, 1.061 → 1.005, 0.926 → 0.907
    assert held4 < held0 - 0.02, (held0, held4)
    assert val4 <= val0 + 1e-3, (val0, val4)  # and the validation cells of the training sections do not lose
    assert model.cfg.section_knots_z == [0.0, 40.0, 120.0, 160.0]  # the held-out section (z=80) is no knot
    assert (
        model.section_codes is not None and float(model.section_codes.detach().abs().max()) > 1e-3
    )  # codes learnt


# ------------------------------------------------------------------------------------------------------------
# predict says which codes it used
# ------------------------------------------------------------------------------------------------------------


def test_code_use_counts_and_warns_once_for_interpolated_points():
    m = _coded_model()
    xyz = np.array([[0, 0, 40.0], [0, 0, 80.0], [1, 1, 80.0], [0, 0, 130.0], [0, 0, -50.0], [0, 0, 160.0]])
    with pytest.warns(InterpolatedCodesWarning) as rec:
        use = m.code_use(xyz)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "section codes interpolated in z between sections at z=40 and 120 µm (2 points)" in msg, msg
    assert "z=120 and 160 µm (1 points)" in msg and "1 points beyond the training sections" in msg
    assert use == {
        "knots_z_um": KNOTS,
        "n_at_knot": 2,
        "n_interpolated": 3,
        "n_clamped": 1,
        "interpolated_between": [[40.0, 120.0, 2], [120.0, 160.0, 1]],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # points on the knots only: nothing to say
        assert m.code_use(np.array([[0, 0, 0.0], [3, 3, 160.0]]))["n_at_knot"] == 2


def test_predict_records_the_codes_in_uns(tmp_path):
    from inrscrecon.query.predict import predict_anndata
    from inrscrecon.query.predict_stream import predict_to_file

    m = _coded_model().eval()
    xyz = np.array([[0.0, 0.0, 80.0], [10.0, 0.0, 80.0], [0.0, 5.0, 40.0]])
    with pytest.warns(InterpolatedCodesWarning, match="between sections at z=40 and 120 µm"):
        out = predict_anndata(m, xyz)
    rec = out.uns["inrscrecon"]["section_codes"]
    assert rec["n_interpolated"] == 2 and rec["interpolated_between"] == [[40.0, 120.0, 2]]
    with pytest.warns(InterpolatedCodesWarning):
        predict_to_file(m, xyz, tmp_path / "p.h5ad")
    back = ad.read_h5ad(tmp_path / "p.h5ad").uns["inrscrecon"]["section_codes"]
    np.testing.assert_array_equal(back["interpolated_between"], [[40.0, 120.0, 2]])
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "p.h5ad").X, out.X, rtol=1e-6)
    plain = predict_anndata(INRField(FieldConfig(2, genes=["a", "b"])), xyz)
    assert "section_codes" not in plain.uns["inrscrecon"]  # models without codes record nothing new


def test_render_records_the_codes_in_its_attributes(tmp_path):
    import zarr

    from inrscrecon.query.grid import GridSpec
    from inrscrecon.query.render import render

    m = _coded_model().eval()
    grid = GridSpec.from_bounds([-50, 50, -50, 50, 0, 160], shape=(5, 6, 6))  # planes at z = 16, 48, …, 144
    with pytest.warns(InterpolatedCodesWarning, match="between sections at z=0 and 40 µm"):
        res = render(m, ["g1"], grid, tmp_path / "v.ome.zarr", mask=None, slab=5, png=False)
    rec = zarr.open_group(str(res.path), mode="r").attrs.asdict()["inrscrecon"]["section_codes"]
    assert rec["knots_z_um"] == KNOTS and rec["n_interpolated"] == 5 * 6 * 6 and rec["n_at_knot"] == 0
    assert [p[:2] for p in rec["interpolated_between"]] == [[0.0, 40.0], [40.0, 120.0], [120.0, 160.0]]


# ------------------------------------------------------------------------------------------------------------
# the CLI flags
# ------------------------------------------------------------------------------------------------------------


def test_fit_flags_store_the_frame_and_codes(tmp_path):
    from conftest import write_posed_sections

    from inrscrecon.cli import main
    from inrscrecon.data.synthetic import SynthConfig

    files, _ = write_posed_sections(
        tmp_path, SynthConfig(n_sections=3, cells_per_section=150, n_genes=20, seed=4)
    )
    model = tmp_path / "m.safetensors"
    flags = ["--out", str(model), "--epochs", "1", "--width", "16", "--layers", "2", "--bands", "2"]
    flags += [
        "--spacing",
        "30",
        "--quiet",
        "--z-stretch",
        "5",
        "--section-codes",
        "2",
        "--holdout",
        "section_01",
    ]
    assert main(["fit", *files, *flags]) == 0
    m = INRField.load(model)
    assert m.cfg.z_stretch == 5.0 and m.cfg.section_code_dim == 2 and m.cfg.section_knots_z == [0.0, 60.0]
    assert m.training_record["run"]["z_stretch"] == 5.0
    assert m.section_codes is not None and m.section_codes.shape == (2, 2)
    # a changed frame is a changed fit: the finished model is not taken as already fitted
    flags[flags.index("--z-stretch") + 1] = "2"
    assert main(["fit", *files, *flags]) == 0 and INRField.load(model).cfg.z_stretch == 2.0


def test_stream_holdout_with_spacing_is_refused_not_misplaced(tmp_path, capsys):
    from inrscrecon.cli import main
    from inrscrecon.data.synthetic import SynthConfig, make_sections

    secs, _ = make_sections(SynthConfig(n_sections=3, cells_per_section=60, n_genes=10, seed=4))
    files = [str(tmp_path / f"s{k}.h5ad") for k in range(3)]
    for s, f in zip(secs, files):
        s.write_h5ad(f)
    out = tmp_path / "m.safetensors"
    argv = ["fit", *files, "--out", str(out), "--stream", "--holdout", "section_01", "--spacing", "30"]
    assert main(argv) == 2 and not out.exists()
    assert "--stream with --holdout and --spacing" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--z-stretch", "0"], ["--z-stretch", "-1"], ["--section-codes", "-2"]])
def test_fit_flag_ranges(argv, capsys, tmp_path):
    from inrscrecon.cli import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "x.h5ad", "--out", str(tmp_path / "m.safetensors"), *argv])
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# the fused trunk (Triton) with z stretched and codes on
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.triton
def test_fused_trunk_path_matches_torch_with_z_stretch_and_codes():
    pytest.importorskip("triton", reason="triton is not installed")
    from conftest import load_interpreted

    from inrscrecon.field.losses import LossConfig
    from inrscrecon.train.objective import loss_terms

    load_interpreted("inrscrecon.kernels.triton_head_loss", "_head_stats_kernel")
    load_interpreted("inrscrecon.kernels.triton_trunk", "_trunk_fused_fwd_kernel")
    dev = torch.device("cuda" if CUDA else "cpu")
    m = _coded_model(z_stretch=6.0, width=32).to(dev)
    g = torch.Generator().manual_seed(1)
    xyz = torch.cat([torch.rand(37, 2, generator=g) * 400 - 200, torch.rand(37, 1, generator=g) * 200], 1)
    coords = m.normalize(xyz.to(dev))
    assert float(coords[:, 2].abs().max()) > 1.0 / 3  # z really stretched (unstretched it spans ±0.27)
    target = torch.rand(37, 7, generator=g).to(dev)
    cfg = LossConfig(lambda_rc=0.0, lambda_kl=0.0)
    grads = {}
    for impl in ("torch", "triton"):
        m.zero_grad()
        r, _, _ = loss_terms(m, coords, target, cfg, None, impl, "fp32")
        r.backward()
        grads[impl] = (r.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    (r_t, g_t), (r_x, g_x) = grads["torch"], grads["triton"]
    torch.testing.assert_close(r_x, r_t, rtol=1e-4, atol=1e-5)
    assert set(g_x) == set(g_t) and {"section_codes", "code_proj.weight"} <= set(g_x)
    for name in g_t:
        torch.testing.assert_close(g_x[name], g_t[name], rtol=1e-3, atol=1e-5, msg=name)
    assert float(g_t["section_codes"].abs().max()) > 0  # the codes are trained on the fused path too


# ------------------------------------------------------------------------------------------------------------
# training machinery with codes: the compiled step and resume
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack_table(small_stack):
    from inrscrecon.data.preprocess import select_genes
    from inrscrecon.data.stack import build_cell_table

    sections, _ = small_stack
    return build_cell_table(sections, select_genes(sections, 30))


@pytest.mark.slow  # ~20 s: tracing the whole step (aot_eager) on a 2-core CPU
def test_step_with_codes_compiles_fullgraph_and_matches_eager(stack_table):
    from inrscrecon.data.device_table import DeviceTable
    from inrscrecon.field.losses import LossConfig
    from inrscrecon.train.objective import PARTS, objective_tensors
    from inrscrecon.train.step import TrainStep

    table = stack_table
    frame = FieldConfig.frame_for(table.coords)
    codes = section_code_settings(table.coords, table.section, 3)
    assert len(codes["section_knots_z"]) == 4

    def setup():
        torch.manual_seed(0)
        cfg = FieldConfig(len(table.genes), EncodingConfig(n_bands=2), 16, 2, *frame, z_stretch=4.0, **codes)
        model = INRField(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        dt = DeviceTable(table, "cpu")
        cap = dt.capacity(np.arange(table.n_cells), 64)

        def loss_rows(rows):
            b = dt.gather(rows, cap)
            return objective_tensors(model, model.normalize(b.coords), b, LossConfig(lambda_kl=0.5))

        return model, opt, loss_rows

    rng = np.random.default_rng(0)
    batches = torch.as_tensor(np.sort(rng.choice(table.n_cells, (3, 64)), axis=1))
    (m_e, opt_e, f_e), (m_c, opt_c, f_c) = setup(), setup()
    eager = TrainStep(f_e, opt_e, 1e-2, total=10, min_lr_ratio=0.05, compile=False)
    # fullgraph=True: a graph break in the code interpolation (searchsorted, gathers) raises here
    compiled = TrainStep(f_c, opt_c, 1e-2, 10, 0.05, compile=True, compile_backend="aot_eager")
    acc_e = torch.zeros(len(PARTS), dtype=torch.float64)
    acc_c = torch.zeros(len(PARTS), dtype=torch.float64)
    for k in range(3):
        eager(acc_e, k, batches[k])
        compiled(acc_c, k, batches[k])
    assert compiled.compiled
    torch.testing.assert_close(acc_c, acc_e, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(m_e.state_dict().items(), m_c.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert m_e.section_codes is not None and m_e.section_codes.detach().abs().max() > 0  # codes moved


def test_fit_with_codes_resumes_to_the_same_weights(stack_table, tmp_path):
    from dataclasses import replace

    from inrscrecon.train.fit import TrainConfig, fit

    tc = TrainConfig(epochs=3, batch_size=100, seed=1, progress=False, checkpoint_every=5, patience=10)

    def run(tc, ckpt, resume=False):
        enc = EncodingConfig(n_bands=2)
        return fit(stack_table, enc, 16, 2, None, tc, ckpt, resume, z_stretch=3.0, section_code_dim=2)

    full = run(tc, tmp_path / "a.ckpt")
    part = run(replace(tc, stop_after_steps=17), tmp_path / "b.ckpt")
    assert part.interrupted
    resumed = run(tc, tmp_path / "b.ckpt", resume=True)
    assert resumed.history == full.history
    assert (
        resumed.model.cfg.section_knots_z == full.model.cfg.section_knots_z
        and resumed.model.cfg.z_stretch == 3
    )
    for (k, x), y in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)


def test_tissue_frame_domain_check_and_render_bounds_do_not_depend_on_z_stretch(stack_table):
    from inrscrecon.query.domain_check import check_domain
    from inrscrecon.query.grid import model_bounds
    from inrscrecon.train.fit import TrainConfig, fit

    tc = TrainConfig(epochs=1, batch_size=256, progress=False, seed=0)
    iso, aniso = (
        fit(stack_table, EncodingConfig(n_bands=2), 16, 2, None, tc, z_stretch=zs).model for zs in (1.0, 8.0)
    )
    assert (
        aniso.cfg.z_stretch == 8.0 and iso.cfg.center == aniso.cfg.center and iso.cfg.scale == aniso.cfg.scale
    )
    for key in ("bounds", "section_z", "tissue", "spot_um"):  # µm, from the training cells alone
        assert getattr(iso.cfg, key) == getattr(aniso.cfg, key), key
    assert model_bounds(iso) == model_bounds(aniso)
    rng = np.random.default_rng(0)
    lo, hi = stack_table.coords.min(0), stack_table.coords.max(0)
    query = (
        lo
        + rng.random((500, 3)) * (hi - lo) * np.array([1.6, 1.6, 1.0])
        - (hi - lo) * np.array([0.3, 0.3, 0])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = check_domain(iso, query), check_domain(aniso, query)
    assert a == b and a is not None and 0 < a["fraction"] < 1
