"""Calibrated predictive intervals on the count scale (``predict`` / ``impute`` / ``render --uncertainty``).

**Predictive distribution.** A spot with library size L (total counts) has, for gene g, counts
Y ~ NB(μ, θ_g) (variance μ + μ²/θ_g) or Poisson(μ), with the mean from the field's normalised prediction
p = softplus(η): r = expm1(p) is the rate per 1e4 counts (for count models exactly exp(η); for an RMSE
model, whose p estimates the *mean of log1p* expression, the rate that p implies, biased by Jensen's gap),
and μ = (L / 1e4) · r uncalibrated, or μ = (L / 1e4) · exp(a_g) · (r + ε)^b_g calibrated (ε = 1e-3).

**Dispersion source** (:func:`predictive`, ``source="auto"``): an NB model's own ``log_theta`` (learned
with the field; the best calibrated on DLPFC, ``benchmarks/eval_calibration.py``), else the *validation
calibration*, computed by ``inrscrecon fit`` on (up to :data:`CALIBRATION_CELLS` of) the fit's own
validation cells and stored in the model's training record under ``uncertainty`` (:func:`calibration_record`):
per gene the mean map (a_g, b_g) by Poisson maximum likelihood with the offset log(L / 1e4) (so Σμ = Σy on
those cells), then the maximum-likelihood θ_g given it. For an RMSE model the map undoes the Jensen bias (on
DLPFC b_g ≈ 0.5: a mean-only factor left the 90 % interval at 88 %); for a count model it stays near the
identity. Estimated on cells the field did not train on, θ_g absorbs the field's prediction error as well as
the counting noise, which is what a predictive interval needs (a Poisson model's own Poisson(μ) is too
narrow for overdispersed counts: 88 % on DLPFC). Without a calibration a Poisson model falls back to
Poisson(μ); an RMSE model has no count distribution of its own.

**Library size.** The spot's own total counts where the query is a spot with counts (``impute``); else — query
points (``predict``, ``render``) or sections without counts — the median library size of the training table,
stored in the same record. ``uns['inrscrecon']['uncertainty']`` says which rule applied.

**Interval end points (discreteness).** Plain quantiles of a count distribution over-cover: at μ = 0.05 the
95 % quantile is 0 and the interval [0, 0] covers 95 % instead of 90 %, and most spot × gene values of
Visium data are such low counts. The end points here are quantiles of the *jittered* count Y + V − ½,
V ~ U(0, 1) independent of Y (randomized PIT): its CDF is F linearly interpolated between half-integers, so
Q*(p) = k − ½ + (p − F(k − 1)) / f(k) with k = F⁻¹(p), continuous and monotone in p, never an empty interval.
The randomized rule "y is covered when y + V − ½ ∈ [Q*(α/2), Q*(1 − α/2)]" then covers exactly 1 − α under
the model; :func:`coverage_fraction` gives its expectation over V for observed counts (no randomness needed).
Reading the end points as deterministic integer bounds (y covered when Q*(α/2) ≤ y ≤ Q*(1 − α/2)) is the
mid-p interval, which still over-covers low counts; both are reported by ``benchmarks/eval_calibration.py``.

Outputs are in the units of X: log1p(max(q, 0) / L · 1e4), as ``layers['lower_90']`` / ``layers['upper_90']``
(names from the level) or render channels ``"<gene> lower_90"`` / ``"<gene> upper_90"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse, stats

from inrscrecon.data.preprocess import TARGET_SUM
from inrscrecon.errors import InputError
from inrscrecon.field.model import INRField

DEFAULT_LEVEL = 0.9
#: Validation cells used for the calibration (a seeded subset when the split has more).
CALIBRATION_CELLS = 2000
#: log θ search: a coarse grid, then a fine grid around the best point (θ from e^−4 ≈ 0.02 to e^10 ≈ 2e4).
_COARSE = np.arange(-4.0, 10.0001, 0.5)
_FINE = np.arange(-0.5, 0.5001, 0.05)
#: Genes per block in the calibration (its float64 temporaries are [cells, 256]).
GENE_BLOCK = 256
#: Validation rows gathered at a time for the calibration (dense [256, G] float32 before CSR).
ROW_BLOCK = 256
#: Values per block when interval end points are computed (≈ 100 MB of float64 temporaries).
BLOCK_VALUES = 1_000_000
#: Rate floor ε (per 1e4 counts) inside the calibrated mean map's log.
RATE_EPS = 1e-3
MEDIAN_RULE = "median library size of the training cells (query points have no counts)"
SPOT_RULE = "each spot's own total counts (the training median for a spot with none)"


def check_level(level: float) -> float:
    """``level`` if it is a probability strictly between 0 and 1, else InputError naming it."""
    if not (isinstance(level, int | float) and 0.0 < float(level) < 1.0 and math.isfinite(level)):
        raise InputError(f"interval level must lie strictly between 0 and 1 (e.g. 0.9), got {level!r}")
    return float(level)


def layer_names(level: float) -> tuple[str, str]:
    """Layer / channel suffixes of the interval at ``level``: 0.9 → ("lower_90", "upper_90")."""
    pct = f"{check_level(level) * 100:.6g}".replace(".", "_")
    return f"lower_{pct}", f"upper_{pct}"


# ---------------------------------------------------------------------------------------------- distribution


@dataclass
class Predictive:
    """Count-scale predictive distribution of a field: NB(μ, θ_g) or Poisson(μ) per gene, μ from
    :func:`mean_counts` with the calibrated map (a_g, b_g) when there is one."""

    kind: str  # "nb" | "poisson"
    log_theta: np.ndarray | None  # [M] (nb)
    log_scale: np.ndarray | None  # [M] a_g (None: uncalibrated mean)
    power: np.ndarray | None  # [M] b_g
    library_size: float  # median training library size (used for query points)
    source: str  # where θ (and the mean map) came from, for the output's record

    def genes(self, idx: np.ndarray | None) -> Predictive:
        """The distribution restricted to head rows ``idx`` (None: all)."""
        if idx is None:
            return self

        def pick(v: np.ndarray | None) -> np.ndarray | None:
            return None if v is None else v[idx]

        return Predictive(
            self.kind,
            pick(self.log_theta),
            pick(self.log_scale),
            pick(self.power),
            self.library_size,
            self.source,
        )

    def mean(self, pred: np.ndarray, library: np.ndarray) -> np.ndarray:
        """Mean counts μ [N, K] of predictions ``pred`` [N, K] at library sizes [N]."""
        return mean_counts(pred, library, self.log_scale, self.power)


def predictive(model: INRField, source: str = "auto") -> Predictive:
    """The predictive distribution of ``model`` (see the module docstring). ``source``: "auto" (an NB
    model's own θ, else the validation calibration when stored, else a Poisson model's Poisson(μ)),
    "calibration" or "model". InputError when the model file cannot give one (an RMSE model without
    calibration, a model fitted on normalised values)."""
    if source not in ("auto", "calibration", "model"):
        raise InputError(f"dispersion source must be auto, calibration or model, got {source!r}")
    rec = model.training_record.get("uncertainty") or {}
    likelihood = getattr(model.cfg, "likelihood", "rmse")
    median = rec.get("library_size_median")
    if median is None:
        why = rec.get("why", "its file has no uncertainty record (fitted by an older version)")
        raise InputError(f"this model cannot give count intervals: {why}; refit with `inrscrecon fit`")
    m = model.cfg.n_genes
    cal = rec.get("calibration")
    own_nb = likelihood == "nb" and getattr(model, "log_theta", None) is not None
    if (source == "calibration" or (source == "auto" and not own_nb)) and cal is not None:
        parts = [np.asarray(cal[k], dtype=np.float64) for k in ("log_theta", "log_scale", "power")]
        if any(v.shape != (m,) for v in parts):
            raise InputError(f"model uncertainty record holds {parts[0].shape} dispersions for {m} genes")
        where = f"NB θ_g and mean map (a_g, b_g) fitted on {cal['cells']} validation cells of the fit"
        return Predictive("nb", parts[0], parts[1], parts[2], float(median), where)
    if source == "calibration":
        raise InputError("this model file holds no validation calibration of its dispersion")
    if own_nb:
        lt = model.log_theta.detach().double().cpu().numpy()  # type: ignore[union-attr]
        return Predictive("nb", lt, None, None, float(median), "the NB model's own θ_g (log_theta)")
    if likelihood == "poisson":
        return Predictive("poisson", None, None, None, float(median), "Poisson model")
    raise InputError(
        "an RMSE model has no count distribution of its own and this file holds no validation "
        "calibration; refit with `inrscrecon fit` (it stores one) or use --loss nb"
    )


def mean_counts(
    pred: np.ndarray,  # [N, K] log1p-normalised prediction softplus(η)
    library: np.ndarray,  # [N] library sizes L
    log_scale: np.ndarray | None = None,  # [K] a_g
    power: np.ndarray | None = None,  # [K] b_g
) -> np.ndarray:
    """μ = (L / 1e4) · r with r = expm1(pred), or (L / 1e4) · exp(a_g) · (r + ε)^b_g with a calibrated map
    → [N, K] float64 (≥ 0)."""
    r = np.expm1(np.maximum(np.asarray(pred, dtype=np.float64), 0.0))
    if power is not None:
        a = np.zeros(r.shape[1]) if log_scale is None else np.asarray(log_scale, dtype=np.float64)
        r = np.exp(a[None, :] + np.asarray(power, dtype=np.float64)[None, :] * np.log(r + RATE_EPS))
    elif log_scale is not None:
        r *= np.exp(np.asarray(log_scale, dtype=np.float64))[None, :]
    return r * (np.asarray(library, dtype=np.float64) / TARGET_SUM)[:, None]


def _dist(mu: np.ndarray, log_theta: np.ndarray | None) -> Any:
    """scipy frozen distribution of counts with mean ``mu`` [N, K] (and NB log θ [K])."""
    if log_theta is None:
        return stats.poisson(mu)
    theta = np.exp(np.asarray(log_theta, dtype=np.float64))[None, :]
    return stats.nbinom(theta, theta / (theta + mu))


def count_quantiles(mu: np.ndarray, log_theta: np.ndarray | None, p: float) -> np.ndarray:
    """Quantile Q*(p) of the jittered count Y + V − ½ (Y ~ NB(μ, θ) or Poisson(μ), V ~ U(0, 1)) → [N, K]:
    k − ½ + (p − F(k − 1)) / f(k) with k = F⁻¹(p) (scipy's ppf). Continuous, increasing in p."""
    d = _dist(np.asarray(mu, dtype=np.float64), log_theta)
    k = d.ppf(p)
    below = d.cdf(k - 1)
    mass = d.pmf(k)
    frac = np.clip(np.divide(p - below, mass, out=np.ones_like(mass), where=mass > 0), 0.0, 1.0)
    return k - 0.5 + frac


def interval_counts(
    mu: np.ndarray, log_theta: np.ndarray | None, level: float = DEFAULT_LEVEL
) -> tuple[np.ndarray, np.ndarray]:
    """Central ``level`` interval (Q*(α/2), Q*(1 − α/2)) of the jittered counts, mean ``mu`` [N, K]."""
    a = 1.0 - check_level(level)
    return count_quantiles(mu, log_theta, a / 2), count_quantiles(mu, log_theta, 1 - a / 2)


def plain_interval_counts(
    mu: np.ndarray, log_theta: np.ndarray | None, level: float = DEFAULT_LEVEL
) -> tuple[np.ndarray, np.ndarray]:
    """The plain integer interval [F⁻¹(α/2), F⁻¹(1 − α/2)] (over-covers discrete counts; for comparison)."""
    a = 1.0 - check_level(level)
    d = _dist(np.asarray(mu, dtype=np.float64), log_theta)
    return d.ppf(a / 2), d.ppf(1 - a / 2)


def to_log1p(q: np.ndarray, library: np.ndarray) -> np.ndarray:
    """Count-scale values q [N, K] → log1p(max(q, 0) / L · 1e4) [N, K] float32 (the units of X)."""
    lib = np.asarray(library, dtype=np.float64)[:, None]
    scale = np.divide(TARGET_SUM, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(np.maximum(q, 0.0) * scale).astype(np.float32)


def coverage_fraction(y: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Expected coverage of observed counts y [N, K] by the randomized rule (y + V − ½ ∈ [lower, upper],
    V ~ U(0, 1)), i.e. the length of [y − ½, y + ½] ∩ [lower, upper] → [N, K] in [0, 1]."""
    y = np.asarray(y, dtype=np.float64)
    return np.clip(np.minimum(upper, y + 0.5) - np.maximum(lower, y - 0.5), 0.0, 1.0)


def interval_from_prediction(
    pred: np.ndarray,  # [N, K] log1p-normalised prediction
    dist: Predictive,  # restricted to the K genes (Predictive.genes)
    level: float,
    library: np.ndarray | None = None,  # [N] per-spot library sizes; None: the training median
) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) [N, K] float32 in the units of X: the ``level`` interval of each point's counts,
    computed in row blocks of about :data:`BLOCK_VALUES` values (the float64 temporaries stay bounded).
    Spots with no counts (library size 0) get the training median."""
    n, k = pred.shape
    lib = np.full(n, dist.library_size) if library is None else np.asarray(library, dtype=np.float64)
    if lib.shape != (n,):
        raise InputError(f"{lib.shape[0]} library sizes for {n} points")
    lib = np.where(lib > 0, lib, dist.library_size)
    lower, upper = np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.float32)
    step = max(1, BLOCK_VALUES // max(k, 1))
    for s in range(0, n, step):
        rows = slice(s, s + step)
        mu = dist.mean(pred[rows], lib[rows])
        lo, hi = interval_counts(mu, dist.log_theta if dist.kind == "nb" else None, level)
        lower[rows], upper[rows] = to_log1p(lo, lib[rows]), to_log1p(hi, lib[rows])
    return lower, upper


def record(dist: Predictive, level: float, library_rule: str) -> dict[str, Any]:
    """``uns['inrscrecon']['uncertainty']`` of an output with intervals."""
    lo, hi = layer_names(level)
    return {
        "level": float(level),
        "layers": [lo, hi],
        "distribution": "negative binomial" if dist.kind == "nb" else "Poisson",
        "dispersion": dist.source,
        "library_size": library_rule,
        "library_size_median": float(dist.library_size),
        "end_points": "quantiles of the jittered count y + U(-1/2, 1/2) (randomized PIT), as "
        "log1p(q / L * 1e4); exact coverage under the randomized rule, mid-p when read as integer bounds",
    }


def spot_library_sizes(sections: Sequence[Any]) -> np.ndarray | None:
    """Total counts per spot of every section, stacked [N] (as the training table sums them), or None when a
    section holds no counts (``uns['X_kind']``)."""
    from inrscrecon.data.preprocess import is_counts

    parts = []
    for s in sections:
        if not is_counts(s):
            return None
        parts.append(np.asarray(s.X.sum(axis=1), dtype=np.float64).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


# ---------------------------------------------------------------------------------------------- calibration


def nb_nll_by_gene(
    log_mu: torch.Tensor,  # [n, K] log mean counts
    y: torch.Tensor,  # [n, K] counts
    log_theta: torch.Tensor,  # [K]
) -> torch.Tensor:
    """Σ over cells of the NB NLL (the count losses' formula, without its constant lgamma(y + 1)) → [K]
    float64. The lgamma(y + θ) − lgamma(θ) term is 0 where y = 0, so it is evaluated on the non-zeros only
    (most counts of a spot × gene matrix are zeros)."""
    return _nb_nll(log_mu, y)(log_theta)


def _nb_nll(log_mu: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`nb_nll_by_gene` of fixed (log_mu [n, K], y [n, K]) as a function of log θ [K]: the non-zeros
    are found once, not once per θ of a grid search."""
    rows, cols = torch.nonzero(y > 0, as_tuple=True)
    yv, lm = y[rows, cols].double(), log_mu[rows, cols]

    def nll(log_theta: torch.Tensor) -> torch.Tensor:
        lt = log_theta.double()
        theta = torch.exp(lt)
        dense = (theta[None, :] * F.softplus(log_mu - lt[None, :])).sum(dim=0)
        th, ltc = theta[cols], lt[cols]
        sparse = yv * F.softplus(ltc - lm) - torch.lgamma(yv + th) + torch.lgamma(th)
        return dense + torch.zeros_like(dense).index_add_(0, cols, sparse)

    return nll


def fit_dispersion(
    mu: np.ndarray,  # [n, K] predicted mean counts
    y: np.ndarray,  # [n, K] observed counts
) -> np.ndarray:
    """Gene-wise maximum-likelihood NB log θ [K] given the means (:func:`nb_nll_by_gene`): a coarse grid
    over log θ, then a fine one (step 0.05) around the best point. A gene with no counts at all (whose
    likelihood grows as θ → 0) gets the largest θ of the grid (Poisson-like) instead."""
    out = np.empty(np.shape(mu)[1])
    for g0 in range(0, len(out), GENE_BLOCK):
        block = slice(g0, g0 + GENE_BLOCK)
        m = torch.log(torch.as_tensor(np.maximum(mu[:, block], 1e-8), dtype=torch.float64))
        nll = _nb_nll(m, torch.as_tensor(np.asarray(y[:, block]), dtype=torch.float64))
        k = m.shape[1]
        coarse = torch.stack([nll(torch.full((k,), float(t), dtype=torch.float64)) for t in _COARSE])
        best = torch.as_tensor(_COARSE, dtype=torch.float64)[coarse.argmin(dim=0)]
        fine_t = best[None, :] + torch.as_tensor(_FINE, dtype=torch.float64)[:, None]  # [F, K]
        fine = torch.stack([nll(t) for t in fine_t])
        out[g0 : g0 + k] = fine_t.gather(0, fine.argmin(dim=0)[None]).squeeze(0).numpy()
    out[np.asarray(y).sum(axis=0) == 0] = _COARSE[-1]
    return out


def fit_mean_map(
    pred: np.ndarray,  # [n, K] log1p-normalised predictions
    y: Any,  # [n, K] observed counts (ndarray or scipy sparse)
    library: np.ndarray,  # [n] library sizes
    iters: int = 30,
    prior_sd: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Per gene (a_g, b_g) maximising the Poisson likelihood of y under μ = (L / 1e4)·exp(a + b·x),
    x = log(expm1(pred) + ε), with a weak N(1, ``prior_sd``²) prior on b (it decides only where the
    prediction hardly varies over the cells, e.g. an undertrained field). Newton on the 2 × 2 system per gene
    with x centred (a and b decouple), steps clipped to ±1, b kept in [0, 3]; a gene stops once both of its
    steps are below 1e-7, so each gene's result depends on its own column alone. Works in blocks of
    :data:`GENE_BLOCK` genes (float64 temporaries [n, block]). Genes without counts keep the identity map
    (a, b) = (0, 1)."""
    k_all = np.shape(pred)[1]
    a, b = np.zeros(k_all), np.ones(k_all)
    off = np.log(np.asarray(library, dtype=np.float64) / TARGET_SUM)[:, None]
    for s in range(0, k_all, GENE_BLOCK):
        k = slice(s, min(s + GENE_BLOCK, k_all))
        a[k], b[k] = _mean_map_block(pred[:, k], _dense_columns(y, k), off, iters, 1.0 / prior_sd**2)
    return a, b


def _dense_columns(y: Any, cols: slice) -> np.ndarray:
    """Columns ``cols`` of y [n, K] (ndarray or scipy sparse) → dense [n, k] float64."""
    part = y[:, cols]
    return np.asarray(part.toarray() if sparse.issparse(part) else part, dtype=np.float64)


def _mean_map_block(
    pred: np.ndarray,  # [n, k]
    y: np.ndarray,  # [n, k] float64
    off: np.ndarray,  # [n, 1] log(L / 1e4)
    iters: int,
    lam: float,  # prior precision on b
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fit_mean_map` on one block of genes → (a [k], b [k]). In-place arithmetic: two [n, k]
    temporaries beside x and y."""
    xc = np.array(pred, dtype=np.float64)  # x = log(expm1(max(pred, 0)) + ε), then centred
    np.log(np.expm1(np.maximum(xc, 0.0, out=xc), out=xc) + RATE_EPS, out=xc)
    xbar = xc.mean(axis=0)
    xc -= xbar[None, :]
    tot = y.sum(axis=0)
    b = np.ones(xc.shape[1])
    a = np.log(np.maximum(tot, 1e-3) / np.exp(off + xc).sum(axis=0))  # intercept at the centred x
    live = np.ones(xc.shape[1], dtype=bool)  # genes still iterating (every column is computed: no copies)
    for _ in range(iters):
        mu = off + a
        mu += b * xc
        np.exp(np.clip(mu, -50.0, 50.0, out=mu), out=mu)
        r = y - mu
        g0 = r.sum(axis=0)
        r *= xc
        g1 = r.sum(axis=0) - lam * (b - 1.0)
        del r
        h00 = mu.sum(axis=0)
        mu *= xc
        h01 = mu.sum(axis=0)
        mu *= xc
        h11 = mu.sum(axis=0) + lam
        del mu
        det = np.maximum(h00 * h11 - h01**2, 1e-12)
        da = np.where(live, np.clip((h11 * g0 - h01 * g1) / det, -1.0, 1.0), 0.0)
        db = np.where(live, np.clip((h00 * g1 - h01 * g0) / det, -1.0, 1.0), 0.0)
        a, b = a + da, np.where(live, np.clip(b + db, 0.0, 3.0), b)
        live &= np.maximum(np.abs(da), np.abs(db)) >= 1e-7
        if not live.any():
            break
    a = a - b * xbar  # back to the uncentred x
    none = tot == 0
    a[none], b[none] = 0.0, 1.0
    return a, b


def calibrate(
    model: INRField,
    xyz: np.ndarray,  # [n, 3] µm, validation cells
    counts: Any,  # [n, M] raw counts on the model genes (ndarray or scipy sparse)
    library: np.ndarray,  # [n] library sizes
) -> dict[str, Any]:
    """The mean map (a_g, b_g) (:func:`fit_mean_map`) and the ML dispersion log θ_g given it, on validation
    cells → the ``calibration`` entry of the record (JSON-serialisable). Runs in blocks of
    :data:`GENE_BLOCK` genes (prediction, counts and temporaries [n, block]; every step is per gene, so the
    blocks do not change the result)."""
    a, b, log_theta = calibration_arrays(model, xyz, counts, library)
    return {
        "cells": int(np.shape(counts)[0]),
        "log_scale": [float(v) for v in np.round(a, 5)],
        "power": [float(v) for v in np.round(b, 5)],
        "log_theta": [float(v) for v in np.round(log_theta, 4)],
    }


def calibration_arrays(
    model: INRField,
    xyz: np.ndarray,  # [n, 3] µm
    counts: Any,  # [n, M] raw counts (ndarray or scipy sparse)
    library: np.ndarray,  # [n]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a_g, b_g, log θ_g) [M] each, unrounded: :func:`calibrate`'s numbers, gene block by gene block."""
    from inrscrecon.query.predict import predict

    if sparse.issparse(counts):
        counts = sparse.csc_array(counts)  # cheap column blocks
    genes = list(model.cfg.genes)
    lib = np.asarray(library, dtype=np.float64)
    a, b, log_theta = (np.empty(len(genes)) for _ in range(3))
    for s in range(0, len(genes), GENE_BLOCK):
        k = slice(s, min(s + GENE_BLOCK, len(genes)))
        pred = predict(model, xyz, genes[k])  # [n, block]
        y = _dense_columns(counts, k)
        a[k], b[k] = fit_mean_map(pred, y, lib)
        log_theta[k] = fit_dispersion(mean_counts(pred, lib, a[k], b[k]), y)
    return a, b, log_theta


def calibration_record(
    model: INRField, table: Any, val_rows: np.ndarray, seed: int = 0, max_cells: int = CALIBRATION_CELLS
) -> dict[str, Any]:
    """The model's ``training_record['uncertainty']``: the training table's median library size and the
    validation calibration on up to ``max_cells`` of ``val_rows`` (the fit's validation split). A table of
    normalised values (no counts) gives a record that says why there are no count intervals."""
    if float(getattr(table, "target_sum", 0.0)) <= 0:
        return {"library_size_median": None, "why": "it was fitted on normalised values, not raw counts"}
    median = float(np.median(np.asarray(table.totals, dtype=np.float64)))
    rec: dict[str, Any] = {"library_size_median": median, "calibration": None}
    rows = np.asarray(val_rows, dtype=np.int64)
    if len(rows) > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    lib = np.asarray(table.totals, dtype=np.float64)[rows]
    rows = rows[lib > 0]
    if len(rows) == 0:
        return rec
    rec["calibration"] = calibrate(
        model, np.asarray(table.coords[rows]), raw_counts_csr(table, rows), np.asarray(table.totals)[rows]
    )
    return rec


def raw_counts_csr(table: Any, rows: np.ndarray, block: int = ROW_BLOCK) -> sparse.csr_array:
    """Raw counts of table ``rows`` [n] on the model genes → CSR [n, G] float32, gathered ``block`` rows at a
    time (no dense [n, G] array; counts are mostly zeros)."""
    rows = np.asarray(rows, dtype=np.int64)
    parts = [sparse.csr_array(table.raw_targets(rows[s : s + block])) for s in range(0, len(rows), block)]
    if not parts:
        return sparse.csr_array((0, len(table.genes)), dtype=np.float32)
    return sparse.csr_array(sparse.vstack(parts, format="csr"))


__all__ = [
    "CALIBRATION_CELLS",
    "DEFAULT_LEVEL",
    "Predictive",
    "calibrate",
    "calibration_arrays",
    "calibration_record",
    "check_level",
    "count_quantiles",
    "coverage_fraction",
    "fit_dispersion",
    "fit_mean_map",
    "interval_counts",
    "interval_from_prediction",
    "nb_nll_by_gene",
    "layer_names",
    "mean_counts",
    "plain_interval_counts",
    "predictive",
    "raw_counts_csr",
    "record",
    "spot_library_sizes",
    "to_log1p",
]
