"""Non-rigid correction after the rigid step: a smooth displacement field per section, on a regular grid.

The field d lives in the common frame (µm): a rigidly aligned cell at x lands at x + d(x), d bilinear between
the nodes of a regular grid (origin, spacing, [ny, nx, 2] displacements). It is fitted by regularised
Gauss–Newton on the expression mismatch of the moving section against the fixed one,

    Σ_i ‖e_i − F_b(x_i + d(x_i))‖² + λ ‖L d‖²,

where F_b is the kernel regression of the fixed section's expression embedding (``refine.field_and_gradient``)
and L the discrete second derivatives of the grid (d_xx, d_yy, √2 d_xy: a bending penalty whose null space is
the affine fields). Each step re-linearises at the current warp (re-matching every cell), the kernel bandwidth
shrinks from a few cell spacings to one, and λ is chosen on held-out cells. A guard keeps the zero field unless
the warp lowers the held-out mismatch: where expression cannot see a deformation (e.g. displacement along
laminar layers), none is invented beyond what the penalty allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import spsolve
from scipy.spatial import cKDTree

from inrscrecon.align.refine import field_and_gradient
from inrscrecon.errors import InputError


@dataclass
class DisplacementField:
    """Displacements [ny, nx, 2] (µm) on the grid x = origin[0] + i·spacing[0], y = origin[1] + j·spacing[1]
    of the common frame; bilinear in between, constant beyond the outermost nodes."""

    origin: np.ndarray  # [2] µm
    spacing: np.ndarray  # [2] µm
    displacement: np.ndarray  # [ny, nx, 2] µm
    info: dict = field(default_factory=dict)  # how it was fitted (lambda, held-out mismatch, ...)

    @staticmethod
    def zeros(origin: np.ndarray, spacing: np.ndarray, shape: tuple[int, int]) -> DisplacementField:
        return DisplacementField(
            np.asarray(origin, float), np.asarray(spacing, float), np.zeros((*shape, 2)), {}
        )

    def apply(self, xy: np.ndarray) -> np.ndarray:
        """Warp common-frame points [n, 2] (µm): x + d(x), [n, 2]."""
        return xy + self.sample(xy)

    def sample(self, xy: np.ndarray) -> np.ndarray:
        """d at points [n, 2] → [n, 2] µm."""
        ny, nx = self.displacement.shape[:2]
        w = bilinear_weights(xy, self.origin, self.spacing, (ny, nx))
        return np.asarray(w @ self.displacement.reshape(-1, 2))

    def save(self, path: str | Path) -> None:
        """Write an .npz: origin_um [2], spacing_um [2], displacement_um [ny, nx, 2] (y rows, x columns)."""
        np.savez(
            path,
            origin_um=self.origin,
            spacing_um=self.spacing,
            displacement_um=self.displacement,
        )

    @staticmethod
    def load(path: str | Path) -> DisplacementField:
        try:
            with np.load(path) as z:
                f = DisplacementField(z["origin_um"], z["spacing_um"], z["displacement_um"])
        except (OSError, KeyError, ValueError) as e:
            raise InputError(
                f"{path}: not a displacement field (.npz with origin_um, spacing_um, displacement_um): {e}"
            ) from e
        if f.displacement.ndim != 3 or f.displacement.shape[2] != 2 or f.origin.shape != (2,):
            raise InputError(
                f"{path}: displacement_um has shape {f.displacement.shape}; expected [ny, nx, 2]"
            )
        return f


def bilinear_weights(
    xy: np.ndarray, origin: np.ndarray, spacing: np.ndarray, shape: tuple[int, int]
) -> sp.csr_matrix:
    """Sparse [n, ny·nx] bilinear interpolation weights of points [n, 2] on a grid (row-major, y rows);
    points beyond the grid take the nearest edge value."""
    ny, nx = shape
    u = np.clip((xy[:, 0] - origin[0]) / spacing[0], 0, nx - 1)
    v = np.clip((xy[:, 1] - origin[1]) / spacing[1], 0, ny - 1)
    i0 = np.minimum(np.floor(u).astype(np.int64), max(nx - 2, 0))
    j0 = np.minimum(np.floor(v).astype(np.int64), max(ny - 2, 0))
    fu, fv = u - i0, v - j0
    i1, j1 = np.minimum(i0 + 1, nx - 1), np.minimum(j0 + 1, ny - 1)
    rows = np.repeat(np.arange(len(xy)), 4)
    cols = np.stack([j0 * nx + i0, j0 * nx + i1, j1 * nx + i0, j1 * nx + i1], 1).ravel()
    vals = np.stack([(1 - fu) * (1 - fv), fu * (1 - fv), (1 - fu) * fv, fu * fv], 1).ravel()
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(xy), ny * nx))


def bending_operator(shape: tuple[int, int]) -> sp.csr_matrix:
    """Second differences of a scalar grid field (row-major [ny, nx]): rows d_xx, d_yy and √2 d_xy at every
    node where they are defined, in node units; ‖L f‖² is the discrete thin-plate bending energy."""
    ny, nx = shape
    idx = np.arange(ny * nx).reshape(ny, nx)
    rows, cols, vals = [], [], []
    r = 0

    def add(entries: list[tuple[np.ndarray, float]], n: int) -> None:
        nonlocal r
        for node, c in entries:
            rows.append(np.arange(r, r + n))
            cols.append(node.ravel())
            vals.append(np.full(n, c))
        r += n

    if nx >= 3:
        a = idx[:, :-2]
        add([(a, 1.0), (idx[:, 1:-1], -2.0), (idx[:, 2:], 1.0)], a.size)
    if ny >= 3:
        a = idx[:-2]
        add([(a, 1.0), (idx[1:-1], -2.0), (idx[2:], 1.0)], a.size)
    if nx >= 2 and ny >= 2:
        s = np.sqrt(2.0)
        a = idx[:-1, :-1]
        add([(a, s), (idx[:-1, 1:], -s), (idx[1:, :-1], -s), (idx[1:, 1:], s)], a.size)
    if not rows:
        return sp.csr_matrix((0, ny * nx))
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, ny * nx)
    )


@dataclass
class NonrigidConfig:
    """Knobs of the non-rigid fit (lengths in cell spacings of the fixed section unless stated)."""

    grid_intervals: int = 10  # grid intervals across the longer side of the moving section's bounding box
    bandwidths: tuple[float, ...] = (4.0, 3.0, 2.0, 1.5, 1.0)  # kernel bandwidths, coarse to fine
    iters: int = 3  # Gauss–Newton steps per bandwidth
    # bending weights tried (relative to the data term, see _gauss_newton). On DLPFC the held-out expression
    # mismatch keeps falling down to λ ≈ 0.01 while layer agreement drops below the rigid one's (151674–75:
    # λ 10 −0.004, λ 30 +0.009, λ 100 +0.003): below ~30 the field also follows per-section expression
    # structure that is not deformation (held-out cells of the same section share it), so the search starts
    # at 30. Section-scale warps (wavelength ≥ the section's diameter) are recovered 6–17× at λ 30–100.
    lambdas: tuple[float, ...] = (30.0, 100.0, 300.0)
    holdout: float = 0.2  # fraction of moving cells that choose λ and guard the result
    min_gain: float = 0.002  # held-out mismatch must drop by this fraction for the warp to be kept
    # ... and by this many paired standard errors over the held-out cells: on patchy tissue without a warp
    # the gain reaches ~2.5 s.e. (the field then moves cells ≤ 0.25 spacings), a real warp gives tens
    min_z: float = 3.0
    max_cells: int = 20000  # moving cells used for the fit (random subset beyond it)
    trim: float = 0.9  # worst residuals left out of each step
    # pull of every node towards zero displacement, relative to the data term's mean strength per node: where
    # expression cannot see a direction of displacement (along layers, outside the tissue) the field stays 0
    ridge: float = 0.1
    symmetric: bool = True  # average the a → b field with the inverse of the b → a field
    n_comps: int = 30  # leading joint-PCA components the mismatch is measured in


def _mismatch(
    y: np.ndarray, ea: np.ndarray, tree: cKDTree, xy_b: np.ndarray, eb: np.ndarray, h: float
) -> tuple[np.ndarray, np.ndarray]:
    """Squared expression mismatch ‖e − F_b(y)‖² [n] and interior flags [n] at points y [n, 2]."""
    f, _, inside = field_and_gradient(y, tree, xy_b, eb, h)
    return np.sum((ea - f) ** 2, axis=1), inside


def _gauss_newton(
    xy_a: np.ndarray,
    ea: np.ndarray,
    xy_b: np.ndarray,
    eb: np.ndarray,
    tree: cKDTree,
    grid: DisplacementField,
    lam: float,
    spacing: float,
    cfg: NonrigidConfig,
) -> np.ndarray:
    """Node displacements [ny·nx, 2] minimising the penalised mismatch of cells xy_a [n, 2] (embedding ea
    [n, c]) against the fixed cells (tree over xy_b, embedding eb)."""
    shape = grid.displacement.shape[:2]
    phi = bilinear_weights(xy_a, grid.origin, grid.spacing, shape)  # [n, nodes]
    lap = bending_operator(shape)
    ltl = (lap.T @ lap).tocsr()
    nodes = phi.shape[1]
    d = np.zeros((nodes, 2))
    for bw in cfg.bandwidths:
        h = bw * spacing
        for _ in range(cfg.iters):
            y = xy_a + phi @ d
            f, g, inside = field_and_gradient(y, tree, xy_b, eb, h)
            r = ea - f  # [n, c]
            rn = np.linalg.norm(r, axis=1)
            if inside.sum() < 10:
                return d
            use = inside & (rn <= np.quantile(rn[inside], cfg.trim))
            g = g.astype(np.float64) * use[:, None, None]
            hxx = np.einsum("nc,nc->n", g[..., 0], g[..., 0])
            hxy = np.einsum("nc,nc->n", g[..., 0], g[..., 1])
            hyy = np.einsum("nc,nc->n", g[..., 1], g[..., 1])
            b = np.einsum("ncd,nc->nd", g, r)  # Gᵀ r, [n, 2]
            pt = phi.T.tocsr()
            axx, axy, ayy = (pt @ sp.diags(v) @ phi for v in (hxx, hxy, hyy))
            # λ is relative: the data term's mean diagonal per node over the penalty's
            scale = (axx.diagonal().sum() + ayy.diagonal().sum()) / (2 * max(ltl.diagonal().sum(), 1e-12))
            reg = lam * scale * ltl
            reg = reg + (cfg.ridge + 1e-8) * scale * sp.eye(nodes)
            a = sp.bmat([[axx + reg, axy], [axy, ayy + reg]], format="csc")
            rhs = np.concatenate([pt @ b[:, 0] - reg @ d[:, 0], pt @ b[:, 1] - reg @ d[:, 1]])
            step = spsolve(a, rhs).reshape(2, nodes).T
            # a step never moves a node by more than the bandwidth: the linearisation holds that far
            big = np.linalg.norm(step, axis=1).max()
            if big > h:
                step *= h / big
            d = d + step
            if big < 1e-3 * spacing:
                break
    return d


def _grid_over(xy: np.ndarray, spacing: float, cfg: NonrigidConfig) -> DisplacementField:
    """A zero field on a square grid covering points [n, 2], ``cfg.grid_intervals`` across the longer side."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    step = max(float((hi - lo).max()) / cfg.grid_intervals, spacing)
    shape = (int(np.ceil((hi[1] - lo[1]) / step)) + 1, int(np.ceil((hi[0] - lo[0]) / step)) + 1)
    return DisplacementField.zeros(lo, np.array([step, step]), shape)


class _HeldOut:
    """Held-out cells of the moving section and their mismatch against the fixed one at the finest bandwidth."""

    def __init__(
        self, xy: np.ndarray, e: np.ndarray, tree: cKDTree, xy_b: np.ndarray, eb: np.ndarray, h: float
    ):
        self.xy, self.e, self.tree, self.xy_b, self.eb, self.h = xy, e, tree, xy_b, eb, h
        self.base, self.base_in = _mismatch(xy, e, tree, xy_b, eb, h)

    def per_cell(self, f: DisplacementField) -> np.ndarray:
        """Mismatch of each held-out cell under the warp [n], capped at the rigid one's 90th percentile
        (outliers and shuffled cells weigh alike under every candidate); NaN where a cell is not interior
        with and without the warp."""
        m, inside = _mismatch(f.apply(self.xy), self.e, self.tree, self.xy_b, self.eb, self.h)
        both = inside & self.base_in
        out = np.full(len(m), np.nan)
        if both.sum() >= 10:
            out[both] = np.minimum(m[both], np.quantile(self.base[both], 0.9))
        return out

    def score(self, f: DisplacementField) -> float:
        """Mean of ``per_cell`` (inf when fewer than 10 cells are interior)."""
        v = self.per_cell(f)
        return float(np.nanmean(v)) if np.isfinite(v).sum() >= 10 else float("inf")


def _one_way(
    xy_a: np.ndarray,
    ea: np.ndarray,
    xy_b: np.ndarray,
    eb: np.ndarray,
    spacing: float,
    held: np.ndarray,
    cfg: NonrigidConfig,
) -> tuple[DisplacementField, _HeldOut, dict]:
    """Field of a's cells onto b's, fitted on the cells not ``held`` [n_a] bool, λ chosen on the held ones:
    (field, its held-out scorer, {lambda: held-out mismatch})."""
    grid = _grid_over(xy_a, spacing, cfg)
    tree = cKDTree(xy_b)
    ho = _HeldOut(xy_a[held], ea[held], tree, xy_b, eb, cfg.bandwidths[-1] * spacing)
    shape = grid.displacement.shape
    fields, cells = {}, {}
    for lam in cfg.lambdas:
        d = _gauss_newton(xy_a[~held], ea[~held], xy_b, eb, tree, grid, lam, spacing, cfg)
        fields[lam] = DisplacementField(grid.origin, grid.spacing, d.reshape(shape))
        cells[lam] = ho.per_cell(fields[lam])
    tried = {
        f"{lam:g}": float(np.nanmean(v)) if np.isfinite(v).sum() >= 10 else float("inf")
        for lam, v in cells.items()
    }
    best = min(cfg.lambdas, key=lambda lam: tried[f"{lam:g}"])
    # one-standard-error rule: the smoothest field whose held-out mismatch is within one (paired) standard
    # error of the best. Fine-scale freedom that buys a fraction of a standard error follows nuisance
    # structure (per-section technical gradients), not deformation.
    chosen = best
    for lam in sorted(cfg.lambdas, reverse=True):
        diff = cells[lam] - cells[best]
        diff = diff[np.isfinite(diff)]
        if len(diff) >= 10 and diff.mean() <= diff.std(ddof=1) / np.sqrt(len(diff)):
            chosen = lam
            break
    fields[chosen].info["lambda"] = float(chosen)
    return fields[chosen], ho, tried


def _spacing_of(xy: np.ndarray) -> float:
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1])) or 1.0


def fit_displacement(
    xy_a: np.ndarray,
    ea: np.ndarray,
    xy_b: np.ndarray,
    eb: np.ndarray,
    spacing: float,
    rng: np.random.Generator,
    cfg: NonrigidConfig | None = None,
) -> DisplacementField:
    """Smooth displacement of the moving cells xy_a [n_a, 2] (common frame µm, after the rigid pose; raw
    expression embedding ea [n_a, c]) onto the fixed cells xy_b [n_b, 2] (eb [n_b, c]); ``spacing`` is the
    fixed section's cell spacing (µm).

    Each direction (a onto b, b onto a) is fitted with its λ chosen among ``cfg.lambdas`` on held-out cells;
    with ``cfg.symmetric`` the field is the mean of the forward one and the inverse of the backward one,
    d(p) = (d_ab(p) − d_ba(p + d_ab(p))) / 2, so biases that pull both directions alike (e.g. towards regions
    whose kernel average is closest to every cell's mean) cancel while a real deformation adds up. The zero
    field is returned unless the result lowers the held-out mismatch of a's cells by ``cfg.min_gain`` and by
    ``cfg.min_z`` paired standard errors.
    ``info`` records the choices."""
    cfg = cfg or NonrigidConfig()
    ea, eb = ea[:, : cfg.n_comps], eb[:, : cfg.n_comps]
    if len(xy_a) > cfg.max_cells:
        keep = np.sort(rng.choice(len(xy_a), cfg.max_cells, replace=False))
        xy_a, ea = xy_a[keep], ea[keep]
    if len(xy_b) > cfg.max_cells:
        keep = np.sort(rng.choice(len(xy_b), cfg.max_cells, replace=False))
        xy_b, eb = xy_b[keep], eb[keep]
    held_a = rng.uniform(size=len(xy_a)) < cfg.holdout
    fwd, ho, tried = _one_way(xy_a, ea, xy_b, eb, spacing, held_a, cfg)
    info: dict = {"lambda": fwd.info["lambda"], "held_out_mismatch": tried}
    d = fwd.displacement
    if cfg.symmetric:
        held_b = rng.uniform(size=len(xy_b)) < cfg.holdout
        # a's held-out cells stay out of the backward fit too (as its target field): they judge the result
        fit_a = ~held_a
        back, _, tried_b = _one_way(xy_b, eb, xy_a[fit_a], ea[fit_a], _spacing_of(xy_a[fit_a]), held_b, cfg)
        d = _symmetric(fwd, back)
        info.update(lambda_back=back.info["lambda"], held_out_mismatch_back=tried_b)
    field = DisplacementField(fwd.origin, fwd.spacing, d)
    zero = DisplacementField.zeros(fwd.origin, fwd.spacing, d.shape[:2])
    rigid, warped = ho.score(zero), ho.score(field)
    gain = 1.0 - warped / rigid if np.isfinite(rigid) and rigid > 0 else 0.0
    diff = ho.per_cell(zero) - ho.per_cell(field)
    diff = diff[np.isfinite(diff)]
    z = float(diff.mean() / max(diff.std(ddof=1) / np.sqrt(len(diff)), 1e-12)) if len(diff) >= 10 else 0.0
    info.update(
        held_out_gain=float(gain),
        held_out_z=z,  # the gain in paired standard errors over the held-out cells
        held_out_rigid=rigid,
        grid_shape=[int(d.shape[0]), int(d.shape[1])],
        cells=int(len(xy_a)),
        kept=bool(gain >= cfg.min_gain and z >= cfg.min_z),
    )
    if not info["kept"]:
        field = zero
    else:  # judged on held-out cells; the field itself is then refitted on every cell with the chosen λ
        d_all = _gauss_newton(xy_a, ea, xy_b, eb, cKDTree(xy_b), fwd, info["lambda"], spacing, cfg)
        field = DisplacementField(fwd.origin, fwd.spacing, d_all.reshape(d.shape))
        if cfg.symmetric:
            sp_a = _spacing_of(xy_a)
            grid_b = _grid_over(xy_b, sp_a, cfg)
            d_b = _gauss_newton(xy_b, eb, xy_a, ea, cKDTree(xy_a), grid_b, info["lambda_back"], sp_a, cfg)
            back_all = DisplacementField(
                grid_b.origin, grid_b.spacing, d_b.reshape(grid_b.displacement.shape)
            )
            field = DisplacementField(fwd.origin, fwd.spacing, _symmetric(field, back_all))
    field.info = info
    return field


def _symmetric(fwd: DisplacementField, back: DisplacementField) -> np.ndarray:
    """Nodes of ``fwd``'s grid: (d_ab(p) − d_ba(p + d_ab(p))) / 2, [ny, nx, 2]."""
    d = fwd.displacement
    ny, nx = d.shape[:2]
    gx, gy = np.meshgrid(
        fwd.origin[0] + fwd.spacing[0] * np.arange(nx), fwd.origin[1] + fwd.spacing[1] * np.arange(ny)
    )
    p = np.column_stack([gx.ravel(), gy.ravel()])
    df = d.reshape(-1, 2)
    return ((df - back.sample(p + df)) / 2).reshape(d.shape)
