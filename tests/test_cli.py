"""The CLI end to end on tiny synthetic data, and its one-line errors with no partial output."""

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from inrscrecon.cli import build_parser, main

COMMANDS = ["demo", "synth", "align", "fit", "predict", "impute", "render", "evaluate", "bench"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: inrscrecon " + cmd in capsys.readouterr().out


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    assert (
        main(["synth", "--sections", "3", "--cells", "250", "--genes", "30", "--seed", "2", "--out", str(d)])
        == 0
    )
    return d


def test_synth_writes_sections_and_truth(synth_dir):
    files = sorted(synth_dir.glob("section_*.h5ad"))
    assert len(files) == 3
    truth = json.loads((synth_dir / "truth.json").read_text())
    assert [s["name"] for s in truth["sections"]] == ["section_00", "section_01", "section_02"]
    a = ad.read_h5ad(files[0])
    assert a.obsm["spatial_true"].shape == (a.n_obs, 3) and a.uns["z_um"] == 0.0


def test_fit_then_predict(synth_dir, tmp_path):
    files = [str(p) for p in sorted(synth_dir.glob("section_*.h5ad"))]
    # sections are in their own observed frames; place them with their true xy for this end-to-end check
    for f in files:
        a = ad.read_h5ad(f)
        a.obsm["spatial"] = a.obsm["spatial_true"][:, :2]
        a.write_h5ad(tmp_path / f.split("/")[-1])
    staged = sorted(str(p) for p in tmp_path.glob("section_*.h5ad"))
    model = tmp_path / "m.safetensors"
    flags = ["--out", str(model), "--genes", "20", "--epochs", "2", "--width", "16", "--layers", "2"]
    flags += ["--spacing", "40", "--lambda-rc", "0", "--quiet"]
    assert main(["fit", *staged, *flags, "--keep-checkpoints"]) == 0 and model.exists()
    # --bands auto (default): one checkpoint per candidate bandwidth, kept on request
    ckpts = [tmp_path / "m.safetensors.L2.ckpt", tmp_path / "m.safetensors.L4.ckpt"]
    assert all(p.exists() for p in ckpts)
    coords = tmp_path / "q.csv"
    np.savetxt(coords, np.array([[0, 0, 10], [5, 5, 40.0]]), delimiter=",", header="x,y,z", comments="")
    from inrscrecon.field.model import INRField

    gene = INRField.load(model).cfg.genes[0]
    assert main(["predict", str(model), str(coords), "--out", str(tmp_path / "p.h5ad"), "--genes", gene]) == 0
    p = ad.read_h5ad(tmp_path / "p.h5ad")
    assert p.shape == (2, 1) and list(p.var_names) == [gene]
    np.testing.assert_allclose(p.obsm["spatial_3d"][1], [5, 5, 40])
    # resuming from the kept checkpoints; without --keep-checkpoints they are removed once the model is saved
    assert main(["fit", *staged, *flags, "--resume"]) == 0 and model.exists()
    assert not any(p.exists() for p in ckpts)


def test_impute_and_bench(synth_dir, tmp_path):
    files = sorted(str(p) for p in synth_dir.glob("section_*.h5ad"))
    model = tmp_path / "m.safetensors"
    flags = ["--genes", "10", "--epochs", "1", "--width", "8", "--layers", "1", "--lambda-rc", "0", "--quiet"]
    assert main(["fit", *files, "--out", str(model), *flags]) == 0
    assert main(["impute", str(model), files[0], "--out", str(tmp_path / "imp.h5ad")]) == 0
    imp = ad.read_h5ad(tmp_path / "imp.h5ad")
    src = ad.read_h5ad(files[0])
    assert imp.n_obs == src.n_obs and imp.n_vars == 10 and (imp.X >= 0).all()
    np.testing.assert_allclose(imp.obsm["spatial_3d"][:, :2], src.obsm["spatial"])
    from inrscrecon.bench import run_bench

    rows = run_bench("cpu", batch=64, width=16, n_genes=20)
    assert rows[0]["backend"] == "torch" and rows[0]["ms"] > 0
    assert all(r["status"] == "ok" or r["status"].startswith("unavailable") for r in rows)


def test_errors_are_one_line_and_write_nothing(synth_dir, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["fit", str(tmp_path / "missing.h5ad"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("inrscrecon: error:") and "missing.h5ad: file not found" in err[0]
    )
    assert not out.exists()
    assert (
        main(["predict", str(tmp_path / "none.safetensors"), "x.csv", "--out", str(tmp_path / "p.h5ad")]) == 2
    )
    assert "model file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y,z\n1,2,nan\n")
    (tmp_path / "fake.safetensors").write_bytes(b"not a model")
    assert (
        main(["predict", str(tmp_path / "fake.safetensors"), str(bad), "--out", str(tmp_path / "p.h5ad")])
        == 2
    )
    assert "not an inrscrecon model file" in capsys.readouterr().err
    assert not (tmp_path / "p.h5ad").exists()


def test_fit_without_z_is_clear(synth_dir, tmp_path, capsys):
    files = sorted(synth_dir.glob("section_*.h5ad"))
    for f in files:
        a = ad.read_h5ad(f)
        del a.uns["z_um"]
        a.write_h5ad(tmp_path / f.name)
    rc = main(
        [
            "fit",
            *map(str, sorted(tmp_path.glob("*.h5ad"))),
            "--out",
            str(tmp_path / "m.safetensors"),
            "--quiet",
        ]
    )
    assert rc == 2 and "pass --spacing UM or --z-key KEY" in capsys.readouterr().err


def test_module_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "inrscrecon", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "demo" in r.stdout


def test_parser_lists_commands():
    text = build_parser().format_help()
    for cmd in COMMANDS:
        assert cmd in text


@pytest.mark.parametrize(
    "argv,fragment",
    [
        ([], "the following arguments are required: command"),
        (["fitt"], "invalid choice: 'fitt'"),
        (["fit", "a.h5ad", "--out", "m.safetensors", "--input", "bogus"], "argument --input: invalid choice"),
        (["synth", "--out", "d", "--flip-prob", "1.5"], "expected a probability in [0, 1], got '1.5'"),
        (["evaluate", "a.h5ad", "--task", "inter", "--out", "d", "--seeds", "0"], "argument --seeds"),
    ],
)
def test_argparse_errors_are_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        e.value.code == 2
        and len(err) == 1
        and err[0].startswith("inrscrecon: error: ")
        and fragment in err[0]
    )
    assert "usage:" not in err[0]


def test_stream_fit_with_holdout(synth_dir, tmp_path, capsys):
    from inrscrecon.field.model import INRField

    files = sorted(str(p) for p in synth_dir.glob("section_*.h5ad"))
    out = tmp_path / "m.safetensors"
    flags = ["--genes", "10", "--epochs", "1", "--width", "8", "--layers", "1", "--bands", "2", "--quiet"]
    assert main(["fit", *files, "--out", str(out), "--stream", "--holdout", "section_02", *flags]) == 0
    assert "from 2 sections" in capsys.readouterr().out
    assert INRField.load(out).training_record["holdout"] == ["section_02"]
