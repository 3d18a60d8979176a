"""Alignment stage: Kabsch / RANSAC / PCA units, synthetic accuracy (50 seeded cases per setting), export, CLI,
bad input."""

from __future__ import annotations

import argparse
import itertools
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from inrscrecon.align import AlignConfig, align
from inrscrecon.align.embedding import pca_scores
from inrscrecon.align.kabsch import FLIP, Pose, fit_pose, ransac_poses, rotation, weighted_kabsch
from inrscrecon.align.matching import mutual_nn
from inrscrecon.align.metrics import composition_ceiling, layer_agreement, paste_accuracy, pose_errors
from inrscrecon.data.synthetic import SynthConfig, iter_sections
from inrscrecon.errors import InputError

N_CASES = 50
CROP = 0.23  # each section loses 23 % on opposite sides: 30 % of each kept section lies outside the other


def _pose_of(rec: dict) -> Pose:
    return Pose(rec["rotation"], rec["translation"], rec["reflected"])


def pair_case(
    seed: int, flip: bool, cells: int = 1200, genes: int = 150
) -> tuple[list[ad.AnnData], Pose, float]:
    """Two adjacent sections (10 µm apart in a 1.6 mm block) with rotation in [0, 360°), translation, optional
    flip, a straight cut on opposite sides (30 % non-overlap), 10 % of cells with shuffled expression.
    Returns (sections, true pose of section 1 in section 0's observed frame, extent of section 1 in µm)."""
    cfg = SynthConfig(
        n_sections=161,
        spacing=10.0,
        cells_per_section=cells,
        n_genes=genes,
        max_rotation_deg=180,
        flip_prob=0.5 if flip else 0.0,
        overlap_jitter=0.05,
        seed=seed,
    )
    recs = list(itertools.islice(iter_sections(cfg), 2))
    rng = np.random.default_rng(10_000 + seed)
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    sections = []
    for k, (adata, rec) in enumerate(recs):
        proj = rec["xy"] @ direction
        keep = proj >= np.quantile(proj, CROP) if k == 0 else proj <= np.quantile(proj, 1 - CROP)
        s = adata[keep].copy()
        order = np.arange(s.n_obs)
        moved = rng.choice(s.n_obs, s.n_obs // 10, replace=False)
        order[moved] = moved[rng.permutation(len(moved))]
        s.X = sp.csr_matrix(s.X)[order]
        sections.append(s)
    true = _pose_of(recs[0][1]).inverse().compose(_pose_of(recs[1][1]))
    extent = float(np.ptp(recs[1][1]["xy"], axis=0).max())
    return sections, true, extent


def pose_from_json(entry: dict) -> Pose:
    return Pose(np.array(entry["rotation"]), np.array(entry["translation"]), bool(entry["reflected"]))


# ---------------------------------------------------------------- units


def test_weighted_kabsch_recovers_pose_and_ignores_zero_weight_outliers():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(50, 2)) * 100
    r, t = rotation(np.radians(137.0)), np.array([12.0, -40.0])
    q = p @ r.T + t
    q[:10] += rng.normal(size=(10, 2)) * 500  # outliers
    w = np.r_[np.zeros(10), np.ones(40)]
    r_est, t_est = weighted_kabsch(p, q, w)
    np.testing.assert_allclose(r_est, r, atol=1e-10)
    np.testing.assert_allclose(t_est, t, atol=1e-8)
    assert np.linalg.det(r_est) == pytest.approx(1.0)
    r_bad, _ = weighted_kabsch(p, q)  # unweighted: outliers pull it off
    assert np.abs(r_bad - r).max() > 1e-3


def test_fit_pose_reflection_and_pose_algebra():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 2))
    truth = Pose(rotation(0.7), np.array([3.0, 4.0]), True)
    y = truth.apply(x)
    proper = fit_pose(x, y, reflected=False)
    mirrored = fit_pose(x, y, reflected=True)
    assert mirrored.reflected and np.abs(mirrored.apply(x) - y).max() < 1e-9
    assert np.abs(proper.apply(x) - y).max() > 0.1  # a proper rotation cannot explain a flip
    np.testing.assert_allclose(truth.inverse().apply(y), x, atol=1e-9)
    other = Pose(rotation(-2.0), np.array([-1.0, 0.5]), False)
    np.testing.assert_allclose(truth.compose(other).apply(x), truth.apply(other.apply(x)), atol=1e-9)
    assert truth.compose(other).reflected
    np.testing.assert_allclose(truth.linear, truth.R @ FLIP)


def test_pose_errors_uses_centroid_and_flags_wrong_reflection():
    pts = np.array([[100.0, 0.0], [120.0, 10.0], [110.0, -10.0]])
    true = Pose(rotation(0.3), np.array([5.0, 5.0]))
    est = Pose(rotation(0.3 + np.radians(2.0)), np.array([5.0, 5.0]))
    rot, trans = pose_errors(est, true, pts)
    assert rot == pytest.approx(2.0)
    assert trans == pytest.approx(2 * 110 * np.sin(np.radians(1.0)), rel=0.02)
    assert pose_errors(Pose(true.R, true.t, True), true, pts)[0] == 180.0


def test_ransac_finds_pose_among_70_percent_outliers():
    rng = np.random.default_rng(2)
    p = rng.uniform(-500, 500, size=(400, 2))
    truth = Pose(rotation(np.radians(-100.0)), np.array([200.0, 50.0]), True)
    q = truth.apply(p) + rng.normal(size=p.shape) * 3
    bad = rng.choice(400, 280, replace=False)
    q[bad] = rng.uniform(-800, 800, size=(280, 2))
    hyps = ransac_poses(p, q, np.ones(400), 30.0, allow_reflection=True, rng=rng)
    best = hyps[0].pose
    rot, trans = pose_errors(best, truth, p)
    assert best.reflected and rot < 1.0 and trans < 3.0
    assert hyps[0].inlier_fraction == pytest.approx(0.3, abs=0.03)
    hyps = ransac_poses(p, q, np.ones(400), 30.0, allow_reflection=False, rng=rng)
    assert not hyps[0].pose.reflected and hyps[0].inlier_fraction < 0.15  # without the flip nothing fits well


@pytest.mark.parametrize("max_fit_rows", [None, 200], ids=["all-rows", "subsample"])
def test_pca_scores_match_dense_pca(max_fit_rows):
    rng = np.random.default_rng(3)
    signal = rng.normal(size=(300, 5)) * [9, 7, 5, 4, 3] @ np.linalg.qr(rng.normal(size=(60, 5)))[0].T
    x = sp.csr_matrix(np.maximum(signal + 10 + rng.normal(size=(300, 60)) * 0.3, 0))
    mean = np.asarray(x.mean(axis=0)).ravel()
    u, s, _ = np.linalg.svd(x.toarray() - mean, full_matrices=False)
    ref = u[:, :5] * s[:5]
    got = pca_scores(x, mean, 5, rng, max_fit_rows=max_fit_rows)
    assert got.shape == (300, 5) and got.dtype == np.float32
    tol = 1e-3 if max_fit_rows is None else 5e-2  # components fitted on 200 of 300 rows: close, not equal
    for i in range(5):  # same components up to sign
        cos = np.dot(got[:, i], ref[:, i]) / (np.linalg.norm(got[:, i]) * np.linalg.norm(ref[:, i]))
        assert abs(cos) > 1 - tol
        assert np.linalg.norm(got[:, i]) == pytest.approx(s[i], rel=tol)


def test_mutual_nn_is_mutual():
    rng = np.random.default_rng(4)
    fa = rng.normal(size=(80, 5))
    fb = rng.normal(size=(60, 5))
    fa /= np.linalg.norm(fa, axis=1, keepdims=True)
    fb /= np.linalg.norm(fb, axis=1, keepdims=True)
    ia, ib, sim = mutual_nn(fa, fb, k=3)
    d = ((fa[:, None] - fb[None]) ** 2).sum(-1)
    knn_a = np.argsort(d, axis=1)[:, :3]
    knn_b = np.argsort(d, axis=0)[:3].T
    expected = {(i, j) for i in range(80) for j in knn_a[i] if i in knn_b[j]}
    assert set(zip(ia.tolist(), ib.tolist())) == expected
    np.testing.assert_allclose(sim, (fa[ia] * fb[ib]).sum(1), atol=1e-6)


def test_layer_agreement():
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    la = np.array(["L1", "L2", "unknown"])
    assert layer_agreement(xy, la, xy + 0.1, np.array(["L1", "L2", "unknown"])) == 1.0
    # b's L3 cell finds a's L2 cell (a's unknown cell is dropped): b → a scores 2/3
    assert layer_agreement(xy, la, xy + 0.1, np.array(["L1", "L2", "L3"])) == pytest.approx((1 + 2 / 3) / 2)
    assert layer_agreement(xy, la, xy + 0.1, np.array(["L2", "L1", "L1"])) == 0.0


def test_paste_accuracy_and_composition_ceiling():
    la = np.array(["L1", "L1", "L1", "L2", "unknown"])
    lb = np.array(["L1", "L2", "L2", "L2"])
    # proportions (3/4, 1/4) and (1/4, 3/4): at most 1/4 + 1/4 of equal-mass couplings join the same layer
    assert composition_ceiling(la, lb) == pytest.approx(0.5)
    assert composition_ceiling(la, la) == 1.0
    xa = np.array([[0.0, 0], [1, 0], [2, 0], [3, 0], [9, 9]])
    xb = np.array([[0.0, 0.1], [1, 0.1], [2, 0.1], [3, 0.1]])
    acc, ceiling = paste_accuracy(xa, la, xb, lb)
    assert acc == pytest.approx(layer_agreement(xa, la, xb, lb)) and ceiling == pytest.approx(0.5)
    assert acc == pytest.approx((2 / 4 + 2 / 4) / 2)  # a: L1→L1, L1→L2, L1→L2, L2→L2; b: the same pairs


# ---------------------------------------------------------------- synthetic accuracy


@pytest.mark.parametrize("flip", [False, True], ids=["no-flip", "flip"])
def test_synthetic_accuracy_50_cases(flip):
    """Rotation error ≤ 1° and translation error ≤ 1 % of the section extent in ≥ 90 % of 50 seeded cases, median
    rotation error ≤ 0.5°. The flip cases use other seeds (a mirrored case fails exactly where its unmirrored
    twin does), so the two settings cover 100 distinct cases.

    Over 200 cases the pipeline meets the tolerance in 95 % of them (190/200 with the exact PCA, 189/200 with
    the randomized one it replaced; median rotation error ≈ 0.25–0.35°). 50 cases give that rate a binomial
    s.d. of 3 points, and the count moved 45–49 with nothing but the PCA's random draw; the bound sits 1.6 s.d.
    below the measured rate and the median checks precision directly."""
    ok, worst, rots = 0, [], []
    for seed in range(50 if flip else 0, N_CASES + (50 if flip else 0)):
        sections, true, extent = pair_case(seed, flip)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = align(sections, spacing=10.0, allow_reflection=flip, seed=seed)
        est = pose_from_json(res.transforms[1])
        rot, trans = pose_errors(est, true, sections[1].obsm["spatial"])
        rots.append(rot)
        good = rot <= 1.0 and trans <= 0.01 * extent
        ok += good
        if not good:
            worst.append((seed, round(rot, 2), round(trans / extent, 4)))
    assert ok >= 0.9 * N_CASES, f"{ok}/{N_CASES} within tolerance; failures (seed, deg, frac): {worst}"
    assert np.median(rots) <= 0.5, f"median rotation error {np.median(rots):.2f}°"


# ---------------------------------------------------------------- stacking, export, CLI


@pytest.fixture(scope="module")
def three_sections():
    cfg = SynthConfig(
        n_sections=81, spacing=10.0, cells_per_section=700, n_genes=120, overlap_jitter=0.05, seed=7
    )
    recs = list(itertools.islice(iter_sections(cfg), 3))
    return [r[0] for r in recs], [_pose_of(r[1]) for r in recs]


def test_three_sections_middle_reference(three_sections):
    sections, truth = three_sections
    res = align(sections, spacing=12.5, reference="section_01", seed=0)
    assert res.reference == "section_01"
    assert res.poses == "global" and res.n_edges == 3  # both neighbours of the reference, and 2 → 0
    t = {e["name"]: e for e in res.transforms}
    ref = t["section_01"]
    assert np.allclose(ref["rotation"], np.eye(2)) and np.allclose(ref["translation"], 0) and ref["z"] == 12.5
    for k in (0, 2):
        true = truth[1].inverse().compose(truth[k])
        rot, trans = pose_errors(pose_from_json(t[f"section_{k:02d}"]), true, sections[k].obsm["spatial"])
        assert rot < 2.0 and trans < 20.0, (k, rot, trans)
        assert t[f"section_{k:02d}"]["aligned_to"] == "section_01"
    a = res.aligned
    assert a.n_obs == sum(s.n_obs for s in sections)
    assert list(a.obs["section"].cat.categories) == ["section_00", "section_01", "section_02"]
    assert "spatial" in a.obsm and a.obsm["spatial_3d"].shape == (a.n_obs, 3)
    assert sorted(np.unique(a.obsm["spatial_3d"][:, 2])) == [0.0, 12.5, 25.0]
    s0 = (a.obs["section"] == "section_00").to_numpy()
    pose0 = pose_from_json(t["section_00"])
    np.testing.assert_allclose(a.obsm["spatial_3d"][s0, :2], pose0.apply(sections[0].obsm["spatial"]))
    m = res.matches
    assert list(m.columns[:5]) == ["section_a", "section_b", "cell_a", "cell_b", "similarity"]
    assert set(m["section_a"]) == {"section_00", "section_02"} and len(m) > 500
    assert m["cell_a"].isin(a.obs_names).all() and m["similarity"].between(-1, 1).all()


def test_large_sections_are_posed_from_a_subset(three_sections):
    sections, truth = three_sections
    res = align(sections[:2], spacing=10.0, config=AlignConfig(max_pair_cells=400))
    true = truth[0].inverse().compose(truth[1])
    rot, trans = pose_errors(pose_from_json(res.transforms[1]), true, sections[1].obsm["spatial"])
    assert rot < 2.0 and trans < 20.0, (rot, trans)
    assert res.matches["cell_a"].nunique() <= 400 < sections[1].n_obs  # matches cover the subset
    assert res.aligned.n_obs == sections[0].n_obs + sections[1].n_obs  # every cell is placed


def test_write_is_atomic_and_complete(three_sections, tmp_path, monkeypatch):
    sections, _ = three_sections
    res = align(sections[:2], spacing=10.0)
    out, tj, mc = tmp_path / "a.h5ad", tmp_path / "t.json", tmp_path / "m.csv"
    res.write(out, tj, mc)
    doc = json.loads(tj.read_text())
    assert doc["reference"] == "section_00" and len(doc["sections"]) == 2
    for e in doc["sections"]:
        assert {"name", "rotation", "translation", "reflected", "z", "inlier_fraction"} <= set(e)
        assert np.array(e["rotation"]).shape == (2, 2) and len(e["translation"]) == 2
    back = ad.read_h5ad(out)
    np.testing.assert_allclose(back.obsm["spatial_3d"], res.aligned.obsm["spatial_3d"])
    assert len(pd.read_csv(mc)) == len(res.matches)
    pngs = res.plot_pairs(tmp_path / "png")
    assert len(pngs) == 1 and pngs[0].stat().st_size > 5000

    # a failure while writing leaves no file at all (not even the ones written before it)
    import inrscrecon.align.pipeline as pl

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pl.json, "dumps", boom)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(OSError):
        res.write(fresh / "a.h5ad", fresh / "t.json", fresh / "m.csv")
    assert list(fresh.iterdir()) == []


def test_cli_command(three_sections, tmp_path):
    from inrscrecon.align import command

    paths = []
    for s in three_sections[0][:2]:
        p = tmp_path / f"{s.uns['section']}.h5ad"
        s.write_h5ad(p)
        paths.append(str(p))
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    out = tmp_path / "out" / "aligned.h5ad"
    args = parser.parse_args(
        ["align", *paths, "--out", str(out), "--transforms", str(tmp_path / "t.json"), "--spacing", "10"]
        + ["--matches", str(tmp_path / "m.csv"), "--no-progress", "--seed", "3", "--poses", "chained"]
    )
    assert args.func(args) == 0
    assert out.exists() and (tmp_path / "t.json").exists() and (tmp_path / "m.csv").exists()
    assert json.loads((tmp_path / "t.json").read_text())["poses"] == "chained"
    assert len(list((tmp_path / "out" / "aligned_pairs").glob("*.png"))) == 1
    with pytest.raises(SystemExit):  # --spacing and --z-key are exclusive
        parser.parse_args(
            ["align", *paths, "--out", "x", "--transforms", "y", "--spacing", "1", "--z-key", "z"]
        )


def test_low_confidence_pair_stops_with_its_name_score_and_what_to_try(three_sections):
    sections, _ = three_sections
    a, b = sections[0].copy(), sections[1].copy()
    rng = np.random.default_rng(0)
    b.X = sp.csr_matrix(b.X)[rng.permutation(b.n_obs)]  # expression no longer tied to position
    with pytest.raises(InputError) as err:
        align([a, b], spacing=10.0)
    msg = str(err.value)
    assert "pair 'section_01' → 'section_00': low alignment confidence: overlay score" in msg
    assert "threshold 0.30" in msg and "--allow-reflection" in msg and "--reference" in msg
    with pytest.warns(UserWarning, match="pair 'section_01' → 'section_00': low alignment confidence"):
        res = align([a, b], spacing=10.0, accept_low_confidence=True)
    assert res.transforms[1]["score"] < 0.3


# ---------------------------------------------------------------- bad input


def _tiny(name: str, n: int = 50, genes: list[str] | None = None, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    genes = genes or [f"g{i}" for i in range(20)]
    a = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(3, size=(n, len(genes))).astype(np.float32)),
        obs=pd.DataFrame(index=[f"{name}_{i}" for i in range(n)]),
        var=pd.DataFrame(index=genes),
    )
    a.obsm["spatial"] = rng.uniform(0, 100, size=(n, 2))
    a.uns["section"] = name
    return a


def test_bad_input_single_section():
    with pytest.raises(InputError, match="at least 2 sections"):
        align([_tiny("s0")], spacing=10)


def test_bad_input_no_shared_genes():
    with pytest.raises(InputError, match="share no gene"):
        align([_tiny("s0"), _tiny("s1", genes=[f"h{i}" for i in range(20)])], spacing=10)


def test_bad_input_identical_expression():
    b = _tiny("s1")
    b.X = sp.csr_matrix(np.ones((50, 20), dtype=np.float32))
    with pytest.raises(InputError, match=r"section 's1'.*identical in every cell"):
        align([_tiny("s0"), b], spacing=10)


def test_bad_input_collinear_coordinates():
    b = _tiny("s1")
    b.obsm["spatial"] = np.column_stack([np.arange(50.0), 2 * np.arange(50.0) + 1])
    with pytest.raises(InputError, match=r"section 's1'.*collinear"):
        align([_tiny("s0"), b], spacing=10)


def test_bad_input_nan_coordinates():
    b = _tiny("s1")
    b.obsm["spatial"][7, 1] = np.nan
    with pytest.raises(InputError, match=r"s1.*non-finite.*s1_7"):
        align([_tiny("s0"), b], spacing=10)


def test_bad_input_too_few_cells():
    with pytest.raises(InputError, match=r"section 's1': only 2 cells"):
        align([_tiny("s0"), _tiny("s1", n=2)], spacing=10)


def test_bad_input_no_z_and_bad_spacing():
    with pytest.raises(InputError, match="no z positions"):
        align([_tiny("s0"), _tiny("s1")])
    with pytest.raises(InputError, match="positive"):
        align([_tiny("s0"), _tiny("s1")], spacing=-1)


def test_config_is_respected():
    with pytest.warns(UserWarning, match="low alignment confidence"):  # random data: nothing to match
        res = align(
            [_tiny("s0", 200), _tiny("s1", 200, seed=1)],
            spacing=5,
            config=AlignConfig(n_comps=5),
            accept_low_confidence=True,
        )
    assert res.transforms[1]["z"] == 5.0
