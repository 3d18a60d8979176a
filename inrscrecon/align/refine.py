"""ICP-style refinement: alternate soft matching (expression similarity × spatial proximity) and weighted Kabsch.

For each moving cell a (already mapped by the current pose) the K spatially nearest fixed cells b within 3σ are
candidates, weighted ∝ exp(−‖a − b‖² / 2σ² + β · cos(f_a, f_b)); the target is their weighted mean. The best
``trim`` fraction of cells by residual, weighted by their best similarity, re-solve the pose by weighted
Kabsch. σ anneals from a few cell spacings to one. Memory O(N · K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from inrscrecon.align.kabsch import Pose, fit_pose, rotation


@dataclass
class RefineStats:
    n_used: int  # cells that found a partner and survived trimming
    overlap: float  # fraction of moving cells with a fixed cell within 2 spacings
    residual: float  # RMS distance moving cell → its soft target, µm
    agreement: float  # mean cosine similarity with the spatially nearest fixed cell, over overlapping cells


def soft_targets(
    moved: np.ndarray,
    fa: np.ndarray,
    tree: cKDTree,
    xy_b: np.ndarray,
    fb: np.ndarray,
    sigma: float,
    k: int,
    beta: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expression-driven targets for moved cells [n, 2] with features fa [n, c]: (targets [n, 2], best
    similarity [n], valid [n]).

    target = moved + (ȳ_expr − ȳ_space), where ȳ_expr weights the K nearest fixed cells within 3σ by
    exp(−d²/2σ² + β cos) and ȳ_space by exp(−d²/2σ²) alone. The difference keeps only the pull that expression
    adds: the purely geometric pull (one-sided neighbourhoods at section edges and cuts, lattice snapping), which
    would drag the pose towards more overlap, cancels.
    """
    k = min(k, len(xy_b))
    d, j = tree.query(moved, k=k, distance_upper_bound=3 * sigma)
    d, j = d.reshape(len(moved), k), j.reshape(len(moved), k)
    ok = np.isfinite(d)
    jc = np.where(ok, j, 0)
    sim = np.einsum("nc,nkc->nk", fa, fb[jc])
    valid = ok.any(axis=1)
    xb = xy_b[jc]
    space = np.where(ok, -(d**2) / (2 * sigma**2), -np.inf)
    space[~valid] = 0.0
    out = moved.copy()
    for sign, logit in ((1.0, space + beta * sim), (-1.0, space)):
        wgt = np.exp(logit - logit.max(axis=1, keepdims=True))
        wgt /= wgt.sum(axis=1, keepdims=True)
        out += sign * np.einsum("nk,nkd->nd", wgt, xb)
    best = np.where(ok, sim, -np.inf).max(axis=1)
    return out, np.where(valid, best, 0.0), valid


def icp_refine(
    xy_a: np.ndarray,
    fa: np.ndarray,
    xy_b: np.ndarray,
    fb: np.ndarray,
    pose: Pose,
    spacing: float,
    *,
    sigmas: tuple[float, ...] = (3.0, 2.0, 1.5, 1.0),
    iters: int = 8,
    k: int = 16,
    beta: float = 8.0,
    trim: float = 0.8,
    tree: cKDTree | None = None,
) -> tuple[Pose, RefineStats]:
    """Refine ``pose`` (moving a → fixed b; xy in µm, features unit rows) keeping its reflection flag.

    ``sigmas`` are in units of the cell spacing (µm). Returns the refined pose and fit statistics.
    """
    tree = tree if tree is not None else cKDTree(xy_b)
    for sig in sigmas:
        sigma = sig * spacing
        for _ in range(iters):
            moved = pose.apply(xy_a)
            y, best, valid = soft_targets(moved, fa, tree, xy_b, fb, sigma, k, beta)
            if valid.sum() < 3:
                break
            res = np.hypot(*(moved - y).T)
            keep = valid & (res <= np.quantile(res[valid], trim)) & (best > 0)
            if keep.sum() < 3:
                break
            new = fit_pose(xy_a[keep], y[keep], best[keep], pose.reflected)
            step = abs(new.angle_deg - pose.angle_deg) * np.pi / 180 * spacing * 10 + np.hypot(
                *(new.t - pose.t)
            )
            pose = new
            if step < 1e-3 * spacing:
                break
    return pose, fit_stats(xy_a, fa, xy_b, fb, pose, spacing, tree)


def fit_stats(
    xy_a: np.ndarray,
    fa: np.ndarray,
    xy_b: np.ndarray,
    fb: np.ndarray,
    pose: Pose,
    spacing: float,
    tree: cKDTree,
) -> RefineStats:
    """Overlap, residual and expression agreement of a pose (see RefineStats)."""
    moved = pose.apply(xy_a)
    d, j = tree.query(moved, k=1, distance_upper_bound=2 * spacing)
    ok = np.isfinite(d)
    if not ok.any():
        return RefineStats(0, 0.0, float("inf"), 0.0)
    sim = np.einsum("nc,nc->n", fa[ok], fb[j[ok]])
    y, _, valid = soft_targets(moved, fa, tree, xy_b, fb, spacing, 8, 8.0)
    res = (
        float(np.sqrt(np.mean(np.sum((moved[valid] - y[valid]) ** 2, axis=1))))
        if valid.any()
        else float("inf")
    )
    return RefineStats(int(valid.sum()), float(ok.mean()), res, float(sim.mean()))


def agreement_score(
    xy_a: np.ndarray, fa: np.ndarray, fb: np.ndarray, pose: Pose, spacing: float, tree: cKDTree
) -> float:
    """Σ over moving cells of cos(f_a, f_nearest b) for pairs closer than 1.5 spacings (higher is better).

    Unrelated tissue contributes ≈ 0 (features are centred), so the score rewards large, consistent overlap.
    """
    d, j = tree.query(pose.apply(xy_a), k=1, distance_upper_bound=1.5 * spacing)
    ok = np.isfinite(d)
    return float(np.einsum("nc,nc->n", fa[ok], fb[j[ok]]).sum())


def hard_matches(
    moved: np.ndarray,
    fa: np.ndarray,
    tree: cKDTree,
    fb: np.ndarray,
    sigma: float,
    k: int = 8,
    beta: float = 8.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best partner per moved cell by the same mixed score (hard arg-max): (rows with a partner, partner, µm)."""
    k = min(k, tree.n)
    d, j = tree.query(moved, k=k, distance_upper_bound=2 * sigma)
    d, j = d.reshape(len(moved), k), j.reshape(len(moved), k)
    ok = np.isfinite(d)
    jc = np.where(ok, j, 0)
    logit = np.where(ok, -(d**2) / (2 * sigma**2) + beta * np.einsum("nc,nkc->nk", fa, fb[jc]), -np.inf)
    rows = np.flatnonzero(ok.any(axis=1))
    col = logit[rows].argmax(axis=1)
    return rows, jc[rows, col], d[rows, col]


def hard_pairs(
    moved: np.ndarray,
    ea: np.ndarray,
    tree: cKDTree,
    eb: np.ndarray,
    spacing: float,
    *,
    radius: float = 1.5,
    sigma: float = 0.5,
    beta: float = 16.0,
    k: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mutual hard matches of moved cells [n, 2] (unit features ea [n, c]) to fixed cells (tree, eb): each moved
    cell takes the fixed cell within ``radius`` spacings maximising −d²/2(σ·spacing)² + β cos(e_a, e_b); only
    pairs that are each other's best survive. Returns (rows, partners, score) of the pairs, score = the logit
    over β: cos − d² / (2 β (σ·spacing)²)."""
    k = min(k, tree.n)
    h = sigma * spacing
    d, j = tree.query(moved, k=k, distance_upper_bound=radius * spacing)
    d, j = d.reshape(len(moved), k), j.reshape(len(moved), k)
    ok = np.isfinite(d)
    jc = np.where(ok, j, 0)
    sim = np.einsum("nc,nkc->nk", ea, eb[jc])
    logit = np.where(ok, -(d**2) / (2 * h**2) + beta * sim, -np.inf)
    rows = np.flatnonzero(ok.any(axis=1))
    col = logit[rows].argmax(axis=1)
    partner, best = jc[rows, col], logit[rows, col]
    order = np.argsort(best)  # the best-scoring row of each partner is written last
    owner = np.full(tree.n, -1)
    owner[partner[order]] = rows[order]
    mutual = owner[partner] == rows
    return rows[mutual], partner[mutual], best[mutual] / beta


def snap_score(moved: np.ndarray, ea: np.ndarray, tree: cKDTree, eb: np.ndarray, spacing: float) -> float:
    """Mean over moved cells of their mutual hard match's score (``hard_pairs``; 0 for unmatched cells): high
    when many cells sit on an expression-similar counterpart."""
    _, _, score = hard_pairs(moved, ea, tree, eb, spacing)
    return float(score.sum() / max(len(moved), 1))


def snap_refine(
    xy_a: np.ndarray,
    ea: np.ndarray,
    xy_b: np.ndarray,
    eb: np.ndarray,
    pose: Pose,
    spacing: float,
    *,
    tree: cKDTree | None = None,
    trim: float = 0.8,
    iters: int = 15,
) -> Pose:
    """ICP on mutual hard matches (``hard_pairs``; moving a → fixed b, reflection kept): the closest ``trim`` of
    the pairs re-solve the pose by Kabsch, until it stops moving.

    Where cells of the two sections correspond one to one (a re-imaged or re-posed section, spots on a shared
    lattice), soft targets average over several neighbours and stop up to a spot pitch short; hard matches snap
    onto the counterparts. ``ea``/``eb`` are unit rows of the unsmoothed expression embedding.
    """
    tree = tree if tree is not None else cKDTree(xy_b)
    for _ in range(iters):
        moved = pose.apply(xy_a)
        rows, partner, _ = hard_pairs(moved, ea, tree, eb, spacing)
        if len(rows) < 3:
            break
        res = np.hypot(*(moved[rows] - xy_b[partner]).T)
        keep = res <= np.quantile(res, trim)
        new = fit_pose(xy_a[rows[keep]], xy_b[partner[keep]], None, pose.reflected)
        step = abs(new.angle_deg - pose.angle_deg) * np.pi / 180 * spacing * 10 + np.hypot(*(new.t - pose.t))
        pose = new
        if step < 1e-4 * spacing:
            break
    return pose


def field_and_gradient(
    y: np.ndarray, tree: cKDTree, xy_b: np.ndarray, eb: np.ndarray, h: float, k: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian-kernel (bandwidth h, µm) regression of the fixed section's features eb [n_b, c] at points y
    [n, 2] over their k nearest fixed cells: (F [n, c], ∇F [n, c, 2], interior [n] bool). ``interior`` marks
    points with a fixed cell within h whose kernel neighbourhood is balanced (weighted centroid within h/2),
    i.e. not at an edge or a cut.

    With w_j = exp(−‖b_j − y‖² / 2h²): F = Σ w_j e_j / Σ w_j and
    ∇F = Σ w_j (e_j − F)(b_j − y)ᵀ / (h² Σ w_j) = [Σ e_j (w_j o_j)ᵀ − F (Σ w_j o_j)ᵀ] / (h² Σ w_j), o_j = b_j − y.
    """
    k = min(k, len(xy_b))
    d, j = tree.query(y, k=k)
    d, j = d.reshape(len(y), k), j.reshape(len(y), k)
    w = np.exp(-(d**2) / (2 * h**2)).astype(np.float32)  # [n, k]
    sw = w.sum(axis=1, keepdims=True) + np.float32(1e-12)
    e = eb[j]  # [n, k, c] float32
    f = np.matmul(w[:, None, :], e)[:, 0] / sw
    wo = w[:, :, None] * (xy_b[j] - y[:, None, :]).astype(np.float32)  # w_j o_j, [n, k, 2]
    swo = wo.sum(axis=1)  # [n, 2]
    grad = (np.matmul(e.transpose(0, 2, 1), wo) - f[:, :, None] * swo[:, None, :]) / (sw[:, :, None] * h**2)
    interior = (d[:, 0] <= h) & (np.hypot(*(swo / sw).T) <= h / 2)
    return f, grad, interior


def polish_pose(
    xy_a: np.ndarray,
    ea: np.ndarray,
    xy_b: np.ndarray,
    eb: np.ndarray,
    pose: Pose,
    spacing: float,
    *,
    tree: cKDTree | None = None,
    bandwidth: float = 1.0,
    iters: int = 8,
    trim: float = 0.9,
    chunk: int = 20000,
) -> Pose:
    """Gauss–Newton on Σ_i ‖e_a,i − F_b(pose(x_i))‖² (3 rigid parameters, reflection fixed), F_b the kernel
    regression of the fixed section's expression field (bandwidth × spacing µm). Edge/cut cells and the worst
    (1 − trim) residuals are left out each step, so unmatched tissue and shuffled cells do not pull."""
    tree = tree if tree is not None else cKDTree(xy_b)
    h = bandwidth * spacing
    rot90 = np.array([[0.0, -1.0], [1.0, 0.0]])
    for _ in range(iters):
        y = pose.apply(xy_a)
        parts = [field_and_gradient(y[s : s + chunk], tree, xy_b, eb, h) for s in range(0, len(y), chunk)]
        f = np.concatenate([p[0] for p in parts])
        g = np.concatenate([p[1] for p in parts]).astype(np.float64)
        inside = np.concatenate([p[2] for p in parts])
        r = ea - f  # [n, c]
        rn = np.linalg.norm(r, axis=1)
        use = inside & (rn <= np.quantile(rn[inside], trim)) if inside.sum() >= 3 else inside
        if use.sum() < 3:
            break
        c = y[use].mean(axis=0)
        z = (y[use] - c) @ rot90.T  # ∂y/∂θ for a rotation about c, [m, 2]
        jt = np.matmul(g[use], z[:, :, None])  # [m, c, 1]
        a = np.concatenate([jt, g[use]], axis=2).reshape(-1, 3)  # rows of dF/d(θ, tx, ty), [m·c, 3]
        hess = a.T @ a
        rhs = a.T @ r[use].reshape(-1)
        step = np.linalg.solve(hess + 1e-6 * np.trace(hess) * np.eye(3), rhs)
        dr = rotation(step[0])
        new_r, new_t = dr @ pose.R, dr @ (pose.t - c) + c + step[1:]
        pose = Pose(new_r, new_t, pose.reflected)
        if abs(step[0]) * spacing * 20 + np.hypot(*step[1:]) < 5e-3 * spacing:
            break
    return pose
