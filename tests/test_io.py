"""Every bad input ends in one InputError naming the problem, and writes nothing."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from inrscrecon.data.io import read_csv_pair, read_section, read_sections, write_h5ad
from inrscrecon.data.preprocess import select_genes, shared_genes
from inrscrecon.errors import InputError


def _section(n=20, g=5, name="s0", seed=0):
    rng = np.random.default_rng(seed)
    a = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(2, (n, g)).astype(np.float32)),
        obs=pd.DataFrame(index=[f"{name}_{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(g)]),
    )
    a.obsm["spatial"] = rng.uniform(0, 100, (n, 2))
    return a


def test_roundtrip_and_named_key(tmp_path):
    a = _section()
    a.obsm["coord"] = a.obsm.pop("spatial")
    write_h5ad(a, tmp_path / "a.h5ad")
    b = read_section(tmp_path / "a.h5ad", spatial_key="coord")
    assert b.uns["section"] == "a" and b.n_obs == 20
    c = read_section(tmp_path / "a.h5ad", spatial_key="coord", backed=True)
    assert c.isbacked


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_section(tmp_path / "nope.h5ad")


def test_not_h5ad(tmp_path):
    p = tmp_path / "x.h5ad"
    p.write_text("hello")
    with pytest.raises(InputError, match="not a readable .h5ad"):
        read_section(p)


def test_no_coordinates(tmp_path):
    a = _section()
    del a.obsm["spatial"]
    write_h5ad(a, tmp_path / "a.h5ad")
    with pytest.raises(InputError, match=r"no coordinates at obsm\['spatial'\]"):
        read_section(tmp_path / "a.h5ad")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_coordinates(tmp_path, bad):
    a = _section()
    a.obsm["spatial"][3, 1] = bad
    write_h5ad(a, tmp_path / "a.h5ad")
    with pytest.raises(InputError, match="non-finite rows, first at cell 's0_3'"):
        read_section(tmp_path / "a.h5ad")


def test_empty_section(tmp_path):
    write_h5ad(_section()[:0].copy(), tmp_path / "a.h5ad")
    with pytest.raises(InputError, match="empty"):
        read_section(tmp_path / "a.h5ad")


def test_no_shared_genes():
    a, b = _section(), _section()
    b.var_names = [f"h{j}" for j in range(b.n_vars)]
    with pytest.raises(InputError, match="share no gene"):
        shared_genes([a, b])


@pytest.mark.parametrize(
    "value,match", [(-1.0, "negative values, first in cell 's0_4'"), (np.nan, "non-finite")]
)
def test_bad_counts(tmp_path, value, match):
    a = _section()
    x = a.X.toarray()
    x[4, 2] = value
    a.X = sp.csr_matrix(x)
    write_h5ad(a, tmp_path / "a.h5ad")
    with pytest.raises(InputError, match=match):
        read_section(tmp_path / "a.h5ad")


def test_duplicate_ids(tmp_path):
    a = _section()
    a.obs_names = ["same"] * a.n_obs
    write_h5ad(a, tmp_path / "a.h5ad")
    with pytest.raises(InputError, match="duplicate cell ids"):
        read_section(tmp_path / "a.h5ad")


def test_fewer_genes_than_asked_warns():
    with pytest.warns(UserWarning, match="only 5 are shared"):
        genes = select_genes([_section(), _section(seed=1)], n_genes=5000)
    assert len(genes) == 5


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot create output folder"):
        write_h5ad(_section(), blocker / "sub" / "a.h5ad")
    assert list(tmp_path.iterdir()) == [blocker]


def test_duplicate_section_names_made_unique(tmp_path):
    write_h5ad(_section(), tmp_path / "a.h5ad")
    secs = read_sections([tmp_path / "a.h5ad", tmp_path / "a.h5ad"])
    assert [s.uns["section"] for s in secs] == ["a_0", "a_1"]


def test_csv_pair(tmp_path):
    a = _section(n=6, g=3)
    pd.DataFrame(a.X.toarray(), index=a.obs_names, columns=a.var_names).to_csv(tmp_path / "counts.csv")
    pd.DataFrame(a.obsm["spatial"], index=a.obs_names, columns=["x", "y"]).to_csv(tmp_path / "coords.csv")
    b = read_csv_pair(tmp_path / "counts.csv", tmp_path / "coords.csv")
    np.testing.assert_allclose(b.X.toarray(), a.X.toarray())
    np.testing.assert_allclose(b.obsm["spatial"], a.obsm["spatial"])
    pd.DataFrame(a.obsm["spatial"][:3], index=a.obs_names[:3], columns=["x", "y"]).to_csv(
        tmp_path / "short.csv"
    )
    with pytest.raises(InputError, match="no coordinates for 3 cells"):
        read_csv_pair(tmp_path / "counts.csv", tmp_path / "short.csv")


def test_atomic_output_commits_whole_or_nothing(tmp_path):
    from inrscrecon.data.io import atomic_output

    (tmp_path / "out.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"] and (tmp_path / "out.txt").read_text() == "old"
    with atomic_output(tmp_path / "vol.zarr", directory=True) as tmp:
        (tmp / "0").write_text("chunk")
    with atomic_output(tmp_path / "vol.zarr", directory=True) as tmp:  # a folder replaces the old one whole
        (tmp / "1").write_text("chunk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "vol.zarr"]
    assert [p.name for p in (tmp_path / "vol.zarr").iterdir()] == ["1"]


def test_check_writable_refuses_folders_and_undoes_new_folders(tmp_path):
    from inrscrecon.data.atomic import check_writable, discard_created, forget_created

    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="is an existing directory"):
        check_writable(tmp_path / "d")
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="exists and is not a directory"):
        check_writable(tmp_path / "f", directory=True)
    forget_created()
    check_writable(tmp_path / "new" / "deeper" / "out.h5ad")
    assert (tmp_path / "new" / "deeper").is_dir() and not list((tmp_path / "new" / "deeper").iterdir())
    discard_created()  # the command failed: the folders it made go again, the older ones stay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]


def test_drop_sections_of_a_stack_and_of_one_aligned_file():
    from inrscrecon.data.io import drop_sections, parse_names, section_names

    secs = [_section(name=f"s{k}", seed=k) for k in range(3)]
    for k, s in enumerate(secs):
        s.uns["section"] = f"s{k}"
    assert parse_names(["s0", "s1, s2", ""]) == ["s0", "s1", "s2"]
    assert [s.uns["section"] for s in drop_sections(secs, ["s1"])] == ["s0", "s2"]
    aligned = ad.concat(secs)
    aligned.obs["section"] = np.repeat(["s0", "s1", "s2"], 20)
    aligned.obsm["spatial_3d"] = np.zeros((60, 3))
    assert section_names([aligned]) == ["s0", "s1", "s2"]
    (kept,) = drop_sections([aligned], ["s0", "s2"])
    assert kept.n_obs == 20 and set(kept.obs["section"]) == {"s1"}
    with pytest.raises(InputError, match="'s7': no such section; sections are"):
        drop_sections(secs, ["s7"])


def test_stream_files_checked_before_the_pass(tmp_path):
    from inrscrecon.data.io import check_stream_files

    paths = []
    for k in range(3):
        a = _section(name=f"s{k}", seed=k)
        a.uns["section"] = f"s{k}"
        paths.append(tmp_path / f"s{k}.h5ad")
        write_h5ad(a, paths[-1])
    assert check_stream_files(paths, holdout=["s1"]) == [paths[0], paths[2]]
    with pytest.raises(InputError, match="no such section"):
        check_stream_files(paths, holdout=["zz"])
    a = _section(name="s3", seed=3)
    a.X = sp.csr_matrix(a.X.toarray() * 0.5 + 0.25)
    write_h5ad(a, tmp_path / "float.h5ad")
    with pytest.raises(InputError, match="float.h5ad: X must hold non-negative integer counts"):
        check_stream_files([paths[0], tmp_path / "float.h5ad"])


def test_declared_kinds_and_bad_declarations(tmp_path):
    from inrscrecon.data.preprocess import is_counts

    a = _section()
    a.uns["X_kind"] = "something_else"
    write_h5ad(a, tmp_path / "a.h5ad")
    with pytest.raises(InputError, match=r"uns\['X_kind'\] = 'something_else' is not one of"):
        read_section(tmp_path / "a.h5ad")
    b = _section()
    b.X = b.X * 1.5  # normalised values, declared
    b.uns["X_kind"] = "normalized_expression"
    write_h5ad(b, tmp_path / "b.h5ad")
    assert not is_counts(read_section(tmp_path / "b.h5ad"))
    assert not is_counts(read_section(tmp_path / "b.h5ad", input_kind="normalized"))
    with pytest.raises(InputError, match="X must hold non-negative integer counts"):
        read_section(tmp_path / "b.h5ad", input_kind="counts")
    c = _section()
    c.X = c.X * 100.5  # not counts, far above log1p values, undeclared
    write_h5ad(c, tmp_path / "c.h5ad")
    with pytest.raises(InputError, match="neither counts nor log-normalised; pass --input normalized"):
        read_section(tmp_path / "c.h5ad")
