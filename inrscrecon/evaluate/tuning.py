"""Baseline hyper-parameters chosen on validation cells, with the same budget as the INR.

The INR's ``fit`` holds out a seeded fraction of the training cells for early stopping (and
:mod:`inrscrecon.train.select` picks its encoding bandwidth on them). Here every baseline sees the same split:
it is fitted on the remaining cells, scored on the validation cells by RMSE (the INR's criterion), and the best
setting is then applied to the test cells **using the same fitting cells the INR trained on** (validation cells
are not added back), so no method sees data the others do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from inrscrecon.evaluate import baselines
from inrscrecon.evaluate.metrics import median_pearson, rmse

# Grids reach far enough that a held-out section's preference for heavy smoothing is not cut off: k beyond the
# training cells (linear-z: the smallest training section) is replaced by that cap, so the largest candidate
# is then "every cell" and a choice there is a data limit (``at_cap``), not a grid edge (``at_grid_edge``).
KNN_KS = (3, 6, 10, 20, 40, 80, 160, 320, 640, 1280, 2560)
BANDWIDTH_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # × median NN spacing
LINEAR_Z_KS = KNN_KS
PCA_RANKS = (4, 8, 16, 32, 64)  # gaussian_pca: principal components of the training expression kept


def validation_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) exactly as ``inrscrecon.train.fit`` splits a table of ``n`` cells."""
    from inrscrecon.train.fit import _split

    return _split(n, val_fraction, seed)


def spacing(xyz: np.ndarray) -> float:
    """Median distance from a cell to its nearest other cell (µm). For a stack of sections (few z levels) it is
    measured within each section in xy, so that a 10 µm section gap does not set the scale of xy smoothing."""
    levels = np.round(xyz[:, 2], 6)
    if _layered(xyz) and len(np.unique(levels)) > 1:
        ds = []
        for z in np.unique(levels):
            pts = xyz[levels == z, :2]
            if len(pts) > 1:
                d, _ = baselines.neighbours(pts, pts[: min(len(pts), 5000)], 2)
                ds.append(d[:, 1])
        s = float(np.median(np.concatenate(ds))) if ds else 0.0
    else:
        dist, _ = baselines.neighbours(xyz, xyz[: min(len(xyz), 5000)], 2)
        s = float(np.median(dist[:, 1]))
    return s if s > 0 else 1.0


@dataclass
class Tuned:
    """One baseline after tuning: its test prediction, the chosen setting and the validation scores."""

    name: str
    prediction: np.ndarray
    params: dict[str, float] = field(default_factory=dict)
    val_rmse: float = float("nan")
    scores: dict[str, float] = field(default_factory=dict)  # candidate → validation RMSE


def _score(pred: np.ndarray, true: np.ndarray) -> float:
    return rmse(pred, true)


def tune_knn(
    xyz: np.ndarray,
    expr: np.ndarray,
    val_xyz: np.ndarray,
    val_expr: np.ndarray,
    query: np.ndarray,
    ks: tuple[int, ...] = KNN_KS,
) -> Tuned:
    """Inverse-distance k-NN in 3D; k chosen on validation cells by RMSE."""
    ks, capped = _capped(ks, len(xyz))
    dist, idx = baselines.neighbours(xyz, val_xyz, max(ks))
    scores = {str(k): _score(baselines.idw_from_neighbours(dist, idx, expr, k), val_expr) for k in ks}
    best = min(ks, key=lambda k: scores[str(k)])
    pred = baselines.knn_interpolate(xyz, expr, query, best)
    return Tuned("knn", pred, _k_params(best, ks, capped), scores[str(best)], scores)


def tune_gaussian(
    xyz: np.ndarray,
    expr: np.ndarray,
    val_xyz: np.ndarray,
    val_expr: np.ndarray,
    query: np.ndarray,
    factors: tuple[float, ...] = BANDWIDTH_FACTORS,
) -> Tuned:
    """Gaussian-kernel smoother in 3D; bandwidth (a multiple of the cell spacing) chosen on validation cells."""
    s = spacing(xyz)
    planar = bool(np.ptp(xyz[:, 2]) < 1e-9)
    dim = 2 if planar or _layered(xyz) else 3
    hs = [f * s for f in factors]
    k = min(len(xyz), baselines.smoother_k(max(hs), s, dim))
    dist, idx = baselines.neighbours(xyz, val_xyz, k)
    scores = {
        f"{h:.4g}": _score(baselines.gaussian_from_neighbours(dist, idx, expr, h), val_expr) for h in hs
    }
    best = min(hs, key=lambda h: scores[f"{h:.4g}"])
    kb = min(len(xyz), baselines.smoother_k(best, s, dim))
    pred = baselines.gaussian_smoother(xyz, expr, query, best, kb)
    params = {"bandwidth_um": best, "k": float(kb), "at_grid_edge": _edge(best, hs)}
    return Tuned("gaussian", pred, params, scores[f"{best:.4g}"], scores)


def _edge(best: float, grid, capped: bool = False) -> float:
    """1.0 when the chosen value is the smallest or largest of its grid (the grid may be too narrow); the
    largest does not count when it is the data cap (``capped``: nothing larger exists)."""
    top = max(grid) if not capped else None
    return float(len(grid) > 1 and best in (min(grid), top))


def _capped(ks: tuple[int, ...], cap: int) -> tuple[tuple[int, ...], bool]:
    """Grid ``ks`` limited to ``cap`` (cells available); when values were cut the cap itself is the last
    candidate. Returns (candidates, whether the grid was cut)."""
    cap = max(1, int(cap))
    kept = tuple(k for k in ks if k < cap)
    if len(kept) == len(ks):
        return ks, False
    return kept + (cap,), True


def _k_params(best: int, ks, capped: bool) -> dict[str, float]:
    """A neighbour count's record: k, whether it sits on the grid's edge, whether it is the data cap."""
    return {
        "k": float(best),
        "at_grid_edge": _edge(best, ks, capped),
        "at_cap": float(capped and best == max(ks)),
    }


def _layered(xyz: np.ndarray) -> bool:
    """True when the cells lie on few z levels (a stack of sections), so the kernel support is ~2D."""
    return len(np.unique(np.round(xyz[:, 2], 6))) <= max(2, len(xyz) // 50)


def tune_linear_z(
    xyz: np.ndarray,
    expr: np.ndarray,
    section: np.ndarray,
    val_xyz: np.ndarray,
    val_expr: np.ndarray,
    query: np.ndarray,
    ks: tuple[int, ...] = LINEAR_Z_KS,
) -> Tuned:
    """Linear-z interpolation between the nearest sections; the in-section k chosen on validation cells."""
    smallest = min(int((section == n).sum()) for n in np.unique(section))
    ks, capped = _capped(ks, smallest)
    scores = {str(k): _score(baselines.linear_z(xyz, expr, section, val_xyz, k), val_expr) for k in ks}
    best = min(ks, key=lambda k: scores[str(k)])
    pred = baselines.linear_z(xyz, expr, section, query, best)
    return Tuned("linear_z", pred, _k_params(best, ks, capped), scores[str(best)], scores)


def tuned_baselines(
    xyz: np.ndarray,
    expr: np.ndarray,
    section: np.ndarray,
    val_xyz: np.ndarray,
    val_expr: np.ndarray,
    query: np.ndarray,
    with_linear_z: bool = True,
) -> dict[str, Tuned]:
    """Every baseline tuned on (val_xyz, val_expr) and fitted on (xyz, expr); predictions at ``query``.

    ``linear_z`` needs at least two training sections; it is left out otherwise (or when asked to)."""
    out = {
        "mean_profile": Tuned(
            "mean_profile",
            baselines.mean_profile(expr, len(query)),
            {},
            rmse(baselines.mean_profile(expr, len(val_xyz)), val_expr),
        ),
        "knn": tune_knn(xyz, expr, val_xyz, val_expr, query),
        "gaussian": tune_gaussian(xyz, expr, val_xyz, val_expr, query),
    }
    if with_linear_z and len(np.unique(section)) >= 2:
        out["linear_z"] = tune_linear_z(xyz, expr, section, val_xyz, val_expr, query)
    out["gaussian_pca"] = tune_gaussian_pca(out["gaussian"], xyz, expr, val_xyz, val_expr)
    return out


def projection_scores(
    val_pred: np.ndarray, val_expr: np.ndarray, train_expr: np.ndarray, ranks: tuple[int, ...] = PCA_RANKS
) -> dict[str, float]:
    """Validation RMSE of val_pred [V, G] projected onto the top-r principal axes of train_expr [N, G], per r
    of ``ranks`` (limited to the axes available: min(N, G), which is then the last candidate)."""
    mean, axes = baselines.pca_axes(train_expr, max(ranks))
    rs = dict.fromkeys(min(r, axes.shape[1]) for r in ranks)
    return {str(r): _score(baselines.pca_project(val_pred, mean, axes[:, :r]), val_expr) for r in rs}


def _pca_tuned(gauss: Tuned, expr: np.ndarray, scores: dict[str, float]) -> Tuned:
    """gaussian_pca from the tuned smoother ``gauss``: its test prediction projected onto the top-r axes of
    the training expression expr [N, G], r the lowest-RMSE candidate of ``scores``."""
    r = int(min(scores, key=lambda c: scores[c]))
    mean, axes = baselines.pca_axes(expr, r)
    params = {**{k: v for k, v in gauss.params.items() if k != "at_grid_edge"}, "rank": float(r),
              "at_grid_edge": _edge(r, [int(c) for c in scores])}  # fmt: skip
    pred = baselines.pca_project(gauss.prediction, mean, axes)
    return Tuned("gaussian_pca", pred, params, scores[str(r)], scores)


def tune_gaussian_pca(
    gauss: Tuned,
    xyz: np.ndarray,
    expr: np.ndarray,
    val_xyz: np.ndarray,
    val_expr: np.ndarray,
    ranks: tuple[int, ...] = PCA_RANKS,
) -> Tuned:
    """The tuned Gaussian smoother ``gauss`` (fitted on xyz [N, 3], expr [N, G]) projected onto the top-r
    principal axes of expr; r chosen by RMSE on the validation cells the bandwidth was chosen on."""
    h, kb = gauss.params["bandwidth_um"], int(gauss.params["k"])
    val_pred = baselines.gaussian_smoother(xyz, expr, val_xyz, h, kb)
    return _pca_tuned(gauss, expr, projection_scores(val_pred, val_expr, expr, ranks))


def validation_pearson(pred: np.ndarray, true: np.ndarray) -> float:
    """Median per-gene Pearson on validation cells (reported beside the RMSE used for the choice)."""
    return median_pearson(pred, true)


def tuned_baselines_sections(
    xyz: np.ndarray,
    expr: np.ndarray,
    section: np.ndarray,
    folds: list[str],
    query: np.ndarray,
    with_linear_z: bool = True,
) -> dict[str, Tuned]:
    """Every baseline tuned by leave-one-section-out: for each section of ``folds`` the baselines are fitted
    on the other sections and scored (RMSE) on it; the setting with the lowest mean RMSE over the folds is
    then fitted on *all* cells (xyz [N, 3], expr [N, G], section [N]) and predicts ``query`` [Q, 3]. Grids
    as in :func:`tuned_baselines` (the Gaussian bandwidth as a multiple of each fit's own spacing)."""
    grids: dict[str, list[dict[str, float]]] = {"knn": [], "gaussian": [], "linear_z": []}
    means: dict[str, list[float]] = {"mean_profile": []}
    for held in folds:
        fit, val = section != held, section == held
        args = (xyz[fit], expr[fit], xyz[val], expr[val], xyz[val][:1])
        grids["knn"].append(tune_knn(*args).scores)
        g = tune_gaussian(*args).scores
        grids["gaussian"].append({f"{f:g}": v for f, v in zip(BANDWIDTH_FACTORS, g.values())})
        if with_linear_z and len(np.unique(section[fit])) >= 2:
            lz = tune_linear_z(xyz[fit], expr[fit], section[fit], xyz[val], expr[val], xyz[val][:1])
            grids["linear_z"].append(lz.scores)
        means["mean_profile"].append(rmse(baselines.mean_profile(expr[fit], int(val.sum())), expr[val]))
    mean_scores = {name: _mean_scores(runs) for name, runs in grids.items() if runs}
    out = {
        "mean_profile": Tuned(
            "mean_profile",
            baselines.mean_profile(expr, len(query)),
            {"folds": float(len(folds))},
            float(np.mean(means["mean_profile"])),
        )
    }
    s = mean_scores["knn"]
    k = int(min(s, key=lambda c: s[c]))
    ks = [int(c) for c in s]
    out["knn"] = Tuned(
        "knn",
        baselines.knn_interpolate(xyz, expr, query, k),
        _k_params(k, ks, _cut(ks, KNN_KS)),
        s[str(k)],
        s,
    )
    s = mean_scores["gaussian"]
    f = float(min(s, key=lambda c: s[c]))
    sp_all = spacing(xyz)
    h = f * sp_all
    dim = 2 if bool(np.ptp(xyz[:, 2]) < 1e-9) or _layered(xyz) else 3
    kb = min(len(xyz), baselines.smoother_k(h, sp_all, dim))
    params = {"bandwidth_um": h, "factor": f, "k": float(kb), "at_grid_edge": _edge(f, BANDWIDTH_FACTORS)}
    out["gaussian"] = Tuned(
        "gaussian", baselines.gaussian_smoother(xyz, expr, query, h, kb), params, s[f"{f:g}"], s
    )
    if "linear_z" in mean_scores:
        s = mean_scores["linear_z"]
        k = int(min(s, key=lambda c: s[c]))
        ks = [int(c) for c in s]
        out["linear_z"] = Tuned(
            "linear_z",
            baselines.linear_z(xyz, expr, section, query, k),
            _k_params(k, ks, _cut(ks, LINEAR_Z_KS)),
            s[str(k)],
            s,
        )
    runs = []  # gaussian_pca: the chosen bandwidth factor on each fold, r scored on the held-out section
    for held in folds:
        fit, val = section != held, section == held
        sf = spacing(xyz[fit])
        dim_f = 2 if bool(np.ptp(xyz[fit, 2]) < 1e-9) or _layered(xyz[fit]) else 3
        kf = min(int(fit.sum()), baselines.smoother_k(f * sf, sf, dim_f))
        val_pred = baselines.gaussian_smoother(xyz[fit], expr[fit], xyz[val], f * sf, kf)
        runs.append(projection_scores(val_pred, expr[val], expr[fit]))
    out["gaussian_pca"] = _pca_tuned(out["gaussian"], expr, _mean_scores(runs))
    return out


def _mean_scores(runs: list[dict[str, float]]) -> dict[str, float]:
    """Mean RMSE per candidate over folds (candidates every fold scored)."""
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: float(np.mean([r[k] for r in runs])) for k in keys}


def _cut(ks: list[int], grid: tuple[int, ...]) -> bool:
    """True when the largest candidate every fold scored is a data cap, not a grid value (folds whose caps
    differ drop their cap candidates, and the largest grid value left then counts as an edge)."""
    return max(ks) not in grid
