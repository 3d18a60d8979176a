"""Every bad input ends with one clear error and leaves nothing behind; doubtful input warns once.

Each error test asserts: exit status 2, exactly one stderr line ``inrscrecon: error: …`` naming the
file / field / value, no traceback, and the folder unchanged (compared before and after). Tiny synthetic
stacks and one-epoch fits keep every test to a few seconds.

| input | outcome after the change | test |
|---|---|---|
| already log-normalised float X, `uns['X_kind']` declared or scanpy's `uns['log1p']` | used as is, never logged again (targets equal X) | test_lognormalised_x_is_not_logged_again |
| already log-normalised float X, nothing declared | one warning line (treated as log-normalised, says `--input`); `--input lognorm` → no warning; `--input counts` → error | test_undeclared_lognorm_warns_once, test_input_lognorm_is_taken_as_said, test_input_counts_refuses_float_x |
| scanpy layout: X transformed, raw counts in `layers['counts']` / `.raw` | the counts are read | test_counts_from_layers_or_raw |
| `obsm['spatial']` in pixels, no `uns['microns_per_pixel']` | one warning line; `--microns-per-unit` (fit, align, impute, evaluate) scales, no warning | test_pixel_coordinates_warn_once_and_scale_flag_applies, test_align_takes_the_unit_flag |
| `uns['microns_per_pixel']` = "abc" / −1 | error naming the file and value | test_bad_microns_per_pixel |
| one section with 3 coordinate columns, the others 2 | error naming the odd file; all 3-column + `--spacing` → error | test_mixed_coordinate_widths, test_xyz_with_spacing |
| `--z-key` whose value is a string | error naming section, key and value | test_z_key_with_text_value |
| predict CSV with strings in a coordinate column / empty CSV / header only | error naming file, column, row | test_predict_bad_csv |
| `fit --genes 0` / `--genes -5`, `--epochs 0`, `--width 0`, `--batch-size 0`, `--lr -1` | argparse error in the one-line form, exit 2 | test_numeric_flags_are_range_checked |
| `--device cuda` without a GPU; `--device gpu9` | error before any work | test_device_checked_before_work |
| `--out` is an existing directory (fit, align, impute) | error before any work, no `.L2`/`.L4` checkpoints | test_out_is_a_directory |
| unwritable output (under /proc) | error before any work | test_unwritable_output |
| model file with tampered config (n_genes, bad JSON, extra key, gene list) | one error each naming the field | test_tampered_model_file (more in tests/test_model_schema.py) |
| model file with `format: 99` or NaN weights | error naming the format / tensor | test_tampered_model_file |
| evaluate with a bad `--holdout` / `--label-key` | error before aligning or fitting, and no (empty) output folder left | test_evaluate_bad_holdout_leaves_no_folder, test_evaluate_checks_holdout_before_aligning |
| `fit --holdout SECTION` | the section is not trained on, recorded in the model; an unknown name → error | test_fit_holdout |
| `--bands auto` candidate checkpoints | removed once the model is saved (kept with `--keep-checkpoints`) | tests/test_cli.py::test_fit_then_predict |
| SIGTERM / SIGINT while an output is written | the temporary is removed: old state or the complete new one | test_signal_removes_temporary, test_sigterm_during_fit |
| kill -9 while an output is written | old state; the dead writer's temporary is swept by the next write of that output | test_kill_9_leftovers_are_swept_by_the_next_write |
| `inrscrecon --help`, `inrscrecon CMD --help` | no torch import | test_help_does_not_import_torch |
| the shared real files; a Visium section without its scale | no word; one pixel warning | test_shared_data_reads_quietly_and_visium_pixels_without_scale_warn |
| render `--shape 2000 2000 2000`; SIGTERM during render | cost estimated up front, refused beyond `--max-voxels` unless `--force` (one error line, folder unchanged); SIGTERM leaves the old or the complete new volume, no `.*.tmp` | tests/test_render.py::test_render_budget_refuses_without_force, ::test_sigterm_leaves_old_or_new_volume_and_no_temporary |
| a model queried far outside its training tissue | one warning line with the fraction outside, recorded in `uns['inrscrecon']['out_of_domain']` | tests/test_ood.py::test_cli_predict_and_render_warn_in_one_line, ::test_predict_and_impute_record_the_fraction |
| `--resume` without a checkpoint; resume of a finished run; changed settings; resumed epoch's loss | error unless `--resume-or-start`; the finished model returned unchanged, no training; a changed setting refused by name; the resumed epoch logs the uninterrupted history | tests/test_resume.py::test_resume_without_checkpoint_stops_unless_or_start, ::test_resume_of_a_finished_run_does_not_train, ::test_resume_refuses_a_changed_setting_by_name, ::test_resumed_epoch_logs_the_uninterrupted_history, ::test_kill_9_at_random_moments_then_resume |
| alignment that would make the stack worse than the input; flipped section without `--allow-reflection` | best of aligned / identity / centroid pose kept; low confidence or a mirror-looking pair → exit 2 naming pair, score, threshold and what to try (`--accept-low-confidence` keeps it); sections sharing a frame are not turned | tests/test_align_guard.py::test_guard_keeps_identity_when_the_refined_pose_is_worse, ::test_mirrored_section_without_reflection_stops_and_names_the_fix, ::test_cli_exit_2_one_line_and_no_output, ::test_merfish_slices_in_one_frame_are_not_turned |
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from inrscrecon.cli import main

TINY_FIT = ["--genes", "8", "--epochs", "1", "--width", "8", "--layers", "1", "--bands", "2", "--quiet"]


def snapshot(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def run(capsys, *argv) -> tuple[int, list[str], str]:
    """(exit status, stderr lines, stdout) of ``inrscrecon argv`` run in this process."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse exits itself
        rc = int(exc.code or 0)
    out = capsys.readouterr()
    return rc, [line for line in out.err.splitlines() if line.strip()], out.out


def assert_error(capsys, folder: Path, argv, *fragments: str) -> str:
    """Run argv; assert exit 2, one error line containing the fragments, no traceback, folder unchanged."""
    before = snapshot(folder)
    rc, err, _ = run(capsys, *argv)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("inrscrecon: error: "), err
    assert "Traceback" not in err[0]
    for f in fragments:
        assert f in err[0], (f, err[0])
    assert snapshot(folder) == before
    return err[0]


def _sections(n: int = 3, cells: int = 120, genes: int = 12, seed: int = 5) -> list[ad.AnnData]:
    from inrscrecon.data.synthetic import SynthConfig, make_sections

    secs, _ = make_sections(SynthConfig(n_sections=n, cells_per_section=cells, n_genes=genes, seed=seed))
    return secs


@pytest.fixture
def stack(tmp_path) -> list[Path]:
    """Three tiny sections with z in uns['z_um'], written to tmp_path."""
    paths = []
    for s in _sections():
        p = tmp_path / f"{s.uns['section']}.h5ad"
        s.write_h5ad(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    paths = []
    for s in _sections():
        p = d / f"{s.uns['section']}.h5ad"
        s.write_h5ad(p)
        paths.append(p)
    assert main(["fit", *map(str, paths), "--out", str(d / "m.safetensors"), *TINY_FIT]) == 0
    return d / "m.safetensors"


def _lognorm(a: ad.AnnData) -> sp.csr_matrix:
    from inrscrecon.data.preprocess import normalize_log1p

    return normalize_log1p(sp.csr_matrix(a.X))


# -- what X holds ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("marker", ["X_kind", "log1p"])
def test_lognormalised_x_is_not_logged_again(tmp_path, marker):
    from inrscrecon.data.io import read_section
    from inrscrecon.data.stack import build_cell_table

    a = _sections(n=1)[0]
    y = _lognorm(a)
    b = a.copy()
    b.X = y
    if marker == "X_kind":
        b.uns["X_kind"] = "log_normalized"
    else:
        del b.uns["X_kind"]
        b.uns["log1p"] = {"base": None}  # what sc.pp.log1p leaves behind
    b.write_h5ad(tmp_path / "b.h5ad")
    s = read_section(tmp_path / "b.h5ad")
    t = build_cell_table([s], list(s.var_names), spacing=10.0)
    np.testing.assert_allclose(t.targets(np.arange(t.n_cells)), y.toarray(), rtol=1e-5, atol=1e-6)


def test_undeclared_lognorm_warns_once(tmp_path, capsys):
    paths = []
    for s in _sections():
        s.X = _lognorm(s)
        del s.uns["X_kind"]
        paths.append(tmp_path / f"{s.uns['section']}.h5ad")
        s.write_h5ad(paths[-1])
    rc, err, _ = run(capsys, "fit", *paths, "--out", tmp_path / "m.safetensors", *TINY_FIT)
    assert rc == 0 and (tmp_path / "m.safetensors").exists()
    assert len(err) == 1 and err[0].startswith("inrscrecon: warning:"), err
    assert "treating it as log-normalised" in err[0] and "--input" in err[0] and "2 more section(s)" in err[0]


def test_input_lognorm_is_taken_as_said(tmp_path, capsys):
    paths = []
    for s in _sections():
        s.X = _lognorm(s)
        del s.uns["X_kind"]
        paths.append(tmp_path / f"{s.uns['section']}.h5ad")
        s.write_h5ad(paths[-1])
    rc, err, _ = run(
        capsys, "fit", *paths, "--out", tmp_path / "m.safetensors", "--input", "lognorm", *TINY_FIT
    )
    assert rc == 0 and err == []


def test_input_counts_refuses_float_x(tmp_path, capsys):
    a = _sections(n=1)[0]
    a.X = _lognorm(a)
    a.write_h5ad(tmp_path / "a.h5ad")
    assert_error(
        capsys,
        tmp_path,
        ["fit", tmp_path / "a.h5ad", "--out", tmp_path / "m.safetensors", "--input", "counts", *TINY_FIT],
        "a.h5ad",
        "X must hold non-negative integer counts",
        "layers['counts']",
    )


@pytest.mark.parametrize("where", ["layers", "raw"])
def test_counts_from_layers_or_raw(tmp_path, where):
    from inrscrecon.data.io import read_section
    from inrscrecon.data.stack import build_cell_table

    a = _sections(n=1)[0]
    ref = build_cell_table([a], list(a.var_names), spacing=10.0)
    b = a.copy()
    if where == "layers":
        b.layers["counts"] = a.X.copy()
    else:
        b.raw = a.copy()
    b.X = _lognorm(a) * 3.0  # e.g. scaled after log1p: not what the field should learn
    del b.uns["X_kind"]
    b.write_h5ad(tmp_path / "b.h5ad")
    with pytest.warns(UserWarning, match="reading raw counts from"):
        s = read_section(tmp_path / "b.h5ad")
    t = build_cell_table([s], list(s.var_names), spacing=10.0)
    rows = np.arange(t.n_cells)
    np.testing.assert_allclose(t.targets(rows), ref.targets(rows), rtol=1e-6)


# -- coordinates and units -------------------------------------------------------------------------------------


def test_pixel_coordinates_warn_once_and_scale_flag_applies(tmp_path, capsys):
    from inrscrecon.field.model import INRField

    paths = []
    for s in _sections():
        s.obsm["spatial"] = np.round(s.obsm["spatial"] * 20.0)  # integer "pixels", thousands wide
        paths.append(tmp_path / f"{s.uns['section']}.h5ad")
        s.write_h5ad(paths[-1])
    rc, err, _ = run(capsys, "fit", *paths, "--out", tmp_path / "px.safetensors", *TINY_FIT)
    assert rc == 0, err
    assert len(err) == 1 and err[0].startswith("inrscrecon: warning:") and "looks like pixels" in err[0]
    assert "--microns-per-unit" in err[0] and "2 more section" in err[0]
    rc, err, _ = run(
        capsys, "fit", *paths, "--out", tmp_path / "um.safetensors", "--microns-per-unit", "0.05", *TINY_FIT
    )
    assert rc == 0 and err == []
    px, um = INRField.load(tmp_path / "px.safetensors").cfg, INRField.load(tmp_path / "um.safetensors").cfg
    # z comes from uns['z_um'] (µm) in both; x, y shrink by 20 → the µm model's xy extent is 1/20
    xy_px = np.array(px.center[:2])
    np.testing.assert_allclose(np.array(um.center[:2]), xy_px * 0.05, rtol=1e-6, atol=1e-6)
    assert um.scale < px.scale / 10


def test_align_takes_the_unit_flag(tmp_path, capsys):
    """align --microns-per-unit scales pixel-like sections into µm (recorded per section), with no warning;
    a non-positive value is refused by the parser in one line."""
    paths = []
    for s in _sections(n=2):
        s.obsm["spatial"] = np.round(s.obsm["spatial"] * 20.0)
        paths.append(tmp_path / f"{s.uns['section']}.h5ad")
        s.write_h5ad(paths[-1])
    t = tmp_path / "t.json"
    argv = ["align", *paths, "--out", tmp_path / "a.h5ad", "--transforms", t, "--spacing", "10"]
    rc, err, _ = run(capsys, *argv, "--microns-per-unit", "0.05", "--accept-low-confidence", "--no-progress")
    assert rc == 0, err
    assert not any("looks like pixels" in line for line in err), err
    assert [e["microns_per_unit"] for e in json.loads(t.read_text())["sections"]] == [0.05, 0.05]
    assert_error(capsys, tmp_path, [*argv, "--microns-per-unit", "-1"], "--microns-per-unit", "-1")


@pytest.mark.parametrize("value", ["abc", -1.0, 0.0])
def test_bad_microns_per_pixel(stack, capsys, value):
    a = ad.read_h5ad(stack[1])
    a.uns["microns_per_pixel"] = value
    a.write_h5ad(stack[1])
    assert_error(
        capsys,
        stack[0].parent,
        ["fit", *stack, "--out", stack[0].parent / "m.safetensors", *TINY_FIT],
        stack[1].name,
        "uns['microns_per_pixel']",
        repr(value),
    )


def test_mixed_coordinate_widths(stack, capsys):
    a = ad.read_h5ad(stack[2])
    a.obsm["spatial"] = np.column_stack([a.obsm["spatial"], np.full(a.n_obs, 7.0)])
    a.write_h5ad(stack[2])
    argv = ["fit", *stack, "--out", stack[0].parent / "m.safetensors", *TINY_FIT]
    assert_error(capsys, stack[0].parent, argv, stack[2].name, "has 3 columns", "the other sections have 2")


def test_xyz_with_spacing(tmp_path, capsys):
    paths = []
    for k, s in enumerate(_sections()):
        s.obsm["spatial"] = np.column_stack([s.obsm["spatial"], np.full(s.n_obs, 10.0 * k)])
        paths.append(tmp_path / f"{s.uns['section']}.h5ad")
        s.write_h5ad(paths[-1])
    assert_error(
        capsys,
        tmp_path,
        ["fit", *paths, "--out", tmp_path / "m.safetensors", "--spacing", "40", *TINY_FIT],
        "already holds z (3 columns)",
        "--spacing",
    )


@pytest.mark.parametrize("where", ["uns", "obs"])
def test_z_key_with_text_value(stack, capsys, where):
    for p in stack:
        a = ad.read_h5ad(p)
        if where == "uns":
            a.uns["depth"] = "deep"
        else:
            a.obs["depth"] = "deep"
        a.write_h5ad(p)
    assert_error(
        capsys,
        stack[0].parent,
        ["fit", *stack, "--out", stack[0].parent / "m.safetensors", "--z-key", "depth", *TINY_FIT],
        f"{where}['depth']",
        "'deep'",
    )


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("x,y,z\n1,2,3\n4,abc,6\n", ["column 'y' row 2", "'abc' is not a number"]),
        ("", ["empty file"]),
        ("x,y,z\n", ["no query points"]),
    ],
)
def test_predict_bad_csv(model_file, tmp_path, capsys, text, fragments):
    q = tmp_path / "q.csv"
    q.write_text(text)
    assert_error(
        capsys, tmp_path, ["predict", model_file, q, "--out", tmp_path / "p.h5ad"], "q.csv", *fragments
    )


# -- flags -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value,fragment",
    [
        ("--genes", "0", "argument --genes: expected an integer > 0, got '0'"),
        ("--genes", "-5", "argument --genes: expected an integer > 0, got '-5'"),
        ("--epochs", "0", "argument --epochs"),
        ("--width", "0", "argument --width"),
        ("--batch-size", "0", "argument --batch-size"),
        ("--lr", "-1", "argument --lr: expected a number > 0, got '-1'"),
        ("--lr", "nan", "argument --lr"),
        ("--spacing", "-3", "argument --spacing"),
    ],
)
def test_numeric_flags_are_range_checked(stack, capsys, flag, value, fragment):
    argv = ["fit", *stack, "--out", stack[0].parent / "m.safetensors", flag, value]
    err = assert_error(capsys, stack[0].parent, argv, fragment)
    assert "inrscrecon fit --help" in err


@pytest.mark.parametrize("device", ["cuda", "gpu9", "cuda:99"])
def test_device_checked_before_work(stack, capsys, device):
    import torch

    if (
        device != "gpu9"
        and torch.cuda.is_available()
        and (device == "cuda" or torch.cuda.device_count() > 99)
    ):
        pytest.skip("this machine has the GPU the test expects to be missing")
    t0 = time.time()
    assert_error(
        capsys,
        stack[0].parent,
        ["fit", *stack, "--out", stack[0].parent / "m.safetensors", "--device", device, *TINY_FIT],
        f"--device {device!r}",
    )
    assert time.time() - t0 < 5  # before reading sections or fitting


# -- outputs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["fit", "align", "impute"])
def test_out_is_a_directory(stack, model_file, capsys, cmd):
    d = stack[0].parent
    (d / "existing").mkdir()
    argv = {
        "fit": ["fit", *stack, *TINY_FIT],
        "align": ["align", *stack, "--transforms", d / "t.json"],
        "impute": ["impute", model_file, *stack],
    }[cmd]
    assert_error(capsys, d, [*argv, "--out", d / "existing"], "existing: is an existing directory")
    assert not list(d.glob("*.ckpt"))


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc (Linux)")
def test_unwritable_output(stack, capsys):
    assert_error(
        capsys,
        stack[0].parent,
        ["fit", *stack, "--out", "/proc/m.safetensors", *TINY_FIT],
        "/proc/m.safetensors",
    )


def _tamper(src: Path, dst: Path, kind: str) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    cfg = json.loads(meta["config"])
    if kind == "n_genes":
        cfg["n_genes"] += 1
        cfg["genes"] = [*cfg["genes"], "extra_gene"]
    elif kind == "genes":
        cfg["genes"] = cfg["genes"][:-1]
    elif kind == "extra_key":
        cfg["colour"] = "blue"
    elif kind == "nan":
        state["head.weight"][0, 0] = torch.nan
    if kind == "bad_json":
        meta["config"] = meta["config"][:-3]
    else:
        meta["config"] = json.dumps(cfg)
    if kind == "format":
        meta["format"] = "99"
    save_file(state, str(dst), metadata=meta)


@pytest.mark.parametrize(
    "kind,fragment",
    [
        ("n_genes", "tensor 'head.weight' has shape"),
        ("bad_json", "config is not valid JSON"),
        ("extra_key", "unknown key 'colour'"),
        ("genes", "config.genes lists 7 genes but config.n_genes = 8"),
        ("format", "format = '99' is not supported"),
        ("nan", "tensor 'head.weight' has 1 non-finite values"),
    ],
)
def test_tampered_model_file(model_file, tmp_path, capsys, kind, fragment):
    bad = tmp_path / "bad.safetensors"
    _tamper(model_file, bad, kind)
    q = tmp_path / "q.csv"
    q.write_text("x,y,z\n0,0,0\n")
    assert_error(
        capsys, tmp_path, ["predict", bad, q, "--out", tmp_path / "p.h5ad"], "bad.safetensors", fragment
    )


def test_evaluate_bad_holdout_leaves_no_folder(tmp_path, capsys):
    from inrscrecon.data.synthetic import SynthConfig, make_sections

    secs, truth = make_sections(SynthConfig(n_sections=3, cells_per_section=120, n_genes=12, seed=5))
    for k, s in enumerate(secs):  # already aligned: evaluate goes straight to the split
        s.obsm["spatial_3d"] = truth.xyz(k)
        s.obs["section"] = s.uns["section"]
    aligned = ad.concat(secs, uns_merge="first")
    aligned.obs_names_make_unique()
    aligned.write_h5ad(tmp_path / "aligned.h5ad")
    d = tmp_path
    common = [
        "evaluate",
        d / "aligned.h5ad",
        "--task",
        "inter",
        "--seeds",
        "1",
        "--genes",
        "8",
        "--steps",
        "5",
    ]
    common += ["--width", "8", "--layers", "1", "--quiet", "--out", d / "eval" / "run1"]
    assert_error(capsys, d, [*common, "--holdout", "nosuch"], "'nosuch'")
    assert_error(capsys, d, [*common, "--label-key", "nolabel"], "'nolabel'")


def test_evaluate_checks_holdout_before_aligning(stack, capsys):
    d = stack[0].parent
    argv = ["evaluate", *stack, "--task", "intra", "--holdout", "section_01,nosuch", "--quiet"]
    t0 = time.time()
    assert_error(capsys, d, [*argv, "--out", d / "eval"], "unknown holdout section 'nosuch'", "section_00")
    assert time.time() - t0 < 5


def test_fit_holdout(stack, capsys):
    from inrscrecon.field.model import INRField

    d = stack[0].parent
    out = d / "m.safetensors"
    rc, err, stdout = run(capsys, "fit", *stack, "--out", out, "--holdout", "section_01", *TINY_FIT)
    assert rc == 0, err
    assert "from 2 sections" in stdout and "held out: section_01" in stdout
    record = INRField.load(out).training_record
    assert record["holdout"] == ["section_01"] and record["sections"] == ["section_00", "section_02"]
    # the held-out section is not in the training frame: its z (uns['z_um'] = 40) is still inside [0, 80],
    # so compare against a fit of the two other sections alone
    rc, err, _ = run(capsys, "fit", stack[0], stack[2], "--out", d / "two.safetensors", *TINY_FIT)
    assert rc == 0
    a, b = INRField.load(out), INRField.load(d / "two.safetensors")
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), b.state_dict()[k].numpy(), err_msg=k)
    out.unlink()
    fit = ["fit", *stack, "--out", out, *TINY_FIT]
    assert_error(
        capsys, d, [*fit, "--holdout", "section_09"], "--holdout 'section_09': no such section", "section_00"
    )
    assert_error(
        capsys,
        d,
        [*fit, "--holdout", "section_00,section_01", "--holdout", "section_02"],
        "leaves no section",
    )


# -- interruption ----------------------------------------------------------------------------------------------

_WRITER = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: a background job ignores SIGINT
from inrscrecon.data.io import atomic_output
with atomic_output(sys.argv[1], directory=sys.argv[2] == "dir") as tmp:
    if sys.argv[2] == "dir":
        (tmp / "part.bin").write_bytes(b"0" * 1000)
    else:
        tmp.write_bytes(b"0" * 1000)
    print("writing", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("kind,sig", [("dir", signal.SIGTERM), ("file", signal.SIGINT)])
def test_signal_removes_temporary(tmp_path, kind, sig):
    out = tmp_path / ("volume.ome.zarr" if kind == "dir" else "out.h5ad")
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), kind], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "writing"
        assert len(list(tmp_path.iterdir())) == 1  # the temporary sibling
        p.send_signal(sig)
        p.wait(timeout=30)
    finally:
        p.kill()
    assert p.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_kill_9_leftovers_are_swept_by_the_next_write(tmp_path):
    from inrscrecon.data.io import atomic_output

    out = tmp_path / "out.h5ad"
    out.write_text("old")
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), "file"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "writing"
        p.kill()  # SIGKILL: no handler runs
        p.wait(timeout=30)
    finally:
        p.kill()
    left = sorted(q.name for q in tmp_path.iterdir())
    assert len(left) == 2 and out.read_text() == "old"  # the old state, plus the dead writer's temporary
    with atomic_output(out) as tmp:
        tmp.write_text("new")
    assert [q.name for q in tmp_path.iterdir()] == ["out.h5ad"] and out.read_text() == "new"


@pytest.mark.slow
def test_sigterm_during_fit(stack):
    """SIGTERM at a random moment of a fit: no temporary and no model left; a checkpoint, if any, is whole."""
    from inrscrecon.train.checkpoint import load_checkpoint

    d = stack[0].parent
    before = set(snapshot(d))
    argv = [sys.executable, "-m", "inrscrecon", "fit", *map(str, stack), "--out", str(d / "m.safetensors")]
    argv += ["--genes", "8", "--epochs", "5000", "--width", "8", "--layers", "1", "--bands", "2", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout is not None and "cells from" in p.stdout.readline()
        time.sleep(float(np.random.default_rng().uniform(0.2, 2.0)))
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    left = set(snapshot(d)) - before
    assert not any(n.endswith(".tmp") for n in left) and "m.safetensors" not in left, left
    for n in left:
        assert n == "m.safetensors.ckpt", left
        load_checkpoint(d / n)


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom inrscrecon.cli import main\n"
        "cmds = ['demo', 'synth', 'align', 'fit', 'predict', 'impute', 'render', 'evaluate', 'bench']\n"
        "for argv in [['--help']] + [[c, '--help'] for c in cmds]:\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.realdata
def test_shared_data_reads_quietly_and_visium_pixels_without_scale_warn(tmp_path):
    """The shared real files (counts, normalised values, pixels with a scale, a 3D cloud) read without a word;
    the same Visium section without its µm-per-pixel scale warns once and reads as pixels."""
    import warnings

    from conftest import require_data

    from inrscrecon.data.io import read_section, read_sections

    names = ["dlpfc_151673.h5ad", "paste_bc_layer1.h5ad", "merfish_hypothalamus_bregma0.26.h5ad"]
    names.append("bdtnp_drosophila_stage5.h5ad")
    data = require_data(*names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in names:
            read_sections([data / n])
    assert [str(w.message) for w in caught] == []
    a = ad.read_h5ad(data / names[0])
    del a.uns["microns_per_pixel"]
    a.write_h5ad(tmp_path / "px.h5ad")
    with pytest.warns(UserWarning, match=r"looks like pixels \(uns\['spatial_units'\]") as rec:
        read_section(tmp_path / "px.h5ad")
    assert len(rec) == 1
