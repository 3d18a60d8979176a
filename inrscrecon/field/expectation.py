"""What a count model expects to be *measured*: E[log1p(1e4 · Y / L)] under its predictive distribution.

A count model's point output softplus(η) = log1p(exp η) is the log1p of the library-size-free rate. A measured
value is log1p(1e4 · Y / L) with Y ~ Poisson(μ) or NB(μ, θ), μ = (L / 1e4) · exp(η): log1p being concave, its
expectation is below log1p(rate), and for a low gene it depends on the spot's library size L (detection). This
module gives the expectation in the measured units, with L given per point or taken from the model's
library-size field (``INRField.log_library``), so that a count model can be scored against measured spots on
their own scale.

Computation: an exact sum over y = 0..K_g per gene and row chunk, in fp32, vectorised over [rows, genes, y]
in blocks of y. K_g starts at the chunk's upper quantile bound max_rows(μ + 8 σ) (σ² = μ + μ²/θ) and grows
block by block until the tail beyond it is provably below ``tol`` for every row: past the mode the pmf ratio
r(y) = p(y+1) / p(y) is below 1 and bounded by max(r(K), μ / (θ + μ)), so the remaining mass is at most
p(K) · r / (1 − r) (a geometric series). The log pmf uses lgamma; the summed weights are renormalised to 1
(their fp32 rounding otherwise biases the mean by the same relative amount).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from inrscrecon.errors import InputError
from inrscrecon.field.model import INRField

#: the count models' normalisation (interface: η is the log-rate per TARGET_SUM counts)
TARGET_SUM = 1e4
#: the upper quantile bound's width in standard deviations (the tail check then extends K where needed)
QUANTILE_SD = 8.0
#: largest y summed before giving up (a failed tail bound is an error, never a silent truncation)
MAX_COUNT = 1 << 22


def _log_pmf(
    y: torch.Tensor,  # [Y] counts (float)
    mu: torch.Tensor,  # [R, A] means
    log_theta: torch.Tensor | None,  # [A] NB log dispersion, None: Poisson
) -> torch.Tensor:
    """log P(Y = y) [R, A, Y] for Poisson(μ) or NB(μ, θ)."""
    yy = y[None, None, :]
    m = mu[:, :, None]
    if log_theta is None:
        return yy * torch.log(m.clamp_min(1e-30)) - m - torch.lgamma(yy + 1)
    th = torch.exp(log_theta)[None, :, None]
    log_th_mu = torch.logaddexp(log_theta[None, :, None], torch.log(m.clamp_min(1e-30)))  # log(θ + μ)
    return (
        torch.lgamma(yy + th)
        - torch.lgamma(th)
        - torch.lgamma(yy + 1)
        + th * (log_theta[None, :, None] - log_th_mu)
        + yy * (torch.log(m.clamp_min(1e-30)) - log_th_mu)
    )


def _ratio(
    y: torch.Tensor,  # [] last summed count
    mu: torch.Tensor,  # [R, A]
    log_theta: torch.Tensor | None,  # [A]
) -> torch.Tensor:
    """Bound [R, A] on the pmf ratio p(k+1) / p(k) for every k ≥ y (valid once it is < 1)."""
    if log_theta is None:
        return mu / (y + 1)
    th = torch.exp(log_theta)[None, :]
    q = mu / (th + mu)
    r = (y + th) / (y + 1) * q  # decreasing in y for θ ≥ 1, increasing to q for θ < 1
    return torch.where(th < 1, q, r)


def expected_log1p_counts(
    eta: torch.Tensor,  # [R, M] log-rate per TARGET_SUM counts
    log_library: torch.Tensor,  # [R] natural log of the library size L
    log_theta: torch.Tensor | None = None,  # [M] NB log dispersion; None: Poisson
    tol: float = 1e-6,
    block: int = 32,
) -> torch.Tensor:
    """E[log1p(TARGET_SUM · Y / L)] [R, M] fp32 for Y ~ Poisson(μ) or NB(μ, θ), μ = (L / 1e4) · exp(η).

    Exact sum over y in blocks of ``block`` until the tail mass beyond is below ``tol`` for every row (module
    docstring); RuntimeError when that needs more than :data:`MAX_COUNT` counts."""
    eta = eta.float()
    log_lib = log_library.float().reshape(-1, 1)
    lt = None if log_theta is None else log_theta.float()
    mu = torch.exp(eta + log_lib - math.log(TARGET_SUM))  # [R, M]
    scale = torch.exp(math.log(TARGET_SUM) - log_lib)  # [R, 1] TARGET_SUM / L
    var = mu if lt is None else mu + mu.square() / torch.exp(lt)[None, :]
    k0 = (mu + QUANTILE_SD * var.sqrt()).amax(dim=0)  # [M] upper quantile bound over the rows
    num = torch.zeros_like(mu)
    mass = torch.zeros_like(mu)
    active = torch.arange(mu.shape[1], device=mu.device)
    y0 = 0
    while active.numel():
        if y0 >= MAX_COUNT:
            raise RuntimeError(f"expected_log1p: the count tail is above {tol:g} beyond y = {MAX_COUNT}")
        y = torch.arange(y0, y0 + block, device=mu.device, dtype=torch.float32)  # [Y]
        m = mu[:, active]
        la = None if lt is None else lt[active]
        p = torch.exp(_log_pmf(y, m, la))  # [R, A, Y]
        w = torch.log1p(y[None, :] * scale)  # [R, Y]
        num[:, active] += torch.einsum("ray,ry->ra", p, w)
        mass[:, active] += p.sum(dim=2)
        y0 += block
        last = y[-1]
        r = _ratio(last, m, la)
        tail = torch.where(r < 1, p[:, :, -1] * r / (1 - r).clamp_min(1e-30), torch.ones_like(r))
        done = (tail.amax(dim=0) < tol) & (k0[active] <= y0)
        active = active[~done]
    return num / mass.clamp_min(1e-30)


@torch.no_grad()
def expected_log1p(
    model: INRField,
    coords: torch.Tensor | np.ndarray,  # [N, 3] physical coordinates (µm)
    library: torch.Tensor | np.ndarray | None = None,  # [N] library sizes L (total counts); None: the model's
    gene_idx: torch.Tensor | np.ndarray | None = None,  # [K] head rows to compute; None: all M genes
    rows_chunk: int = 256,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Expected measured expression E[log1p(1e4 · Y / L)] [N, M] (or [N, K] for ``gene_idx``; fp32, on the
    model's device) at ``coords``.

    The model's predictive distribution: NB with θ = exp(log_theta) for an NB model, Poisson for a Poisson
    model. L = ``library`` (given per point) or exp(predicted log L(x)) from the model's library head.
    InputError for an RMSE model, for a model without a library head when ``library`` is None, for
    non-positive / non-finite library sizes or coordinates of the wrong shape. ``rows_chunk`` rows at a time."""
    lik = model.cfg.likelihood
    if lik not in ("poisson", "nb"):
        raise InputError(f"expected_log1p needs a count model (likelihood poisson or nb), not {lik!r}")
    device = model.center.device
    xyz = torch.as_tensor(np.asarray(coords, dtype=np.float64) if isinstance(coords, np.ndarray) else coords)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise InputError(f"expected_log1p: coordinates must have shape (N, 3), got {tuple(xyz.shape)}")
    if not torch.isfinite(xyz).all():
        raise InputError("expected_log1p: coordinates contain NaN or inf")
    log_lib: torch.Tensor | None = None
    if library is not None:
        lib = torch.as_tensor(library, dtype=torch.float64).reshape(-1)
        if lib.shape[0] != xyz.shape[0]:
            raise InputError(f"expected_log1p: library has {lib.shape[0]} values for {xyz.shape[0]} points")
        if not (torch.isfinite(lib).all() and (lib > 0).all()):
            raise InputError("expected_log1p: library sizes must be finite and > 0")
        log_lib = torch.log(lib).float().to(device)
    elif model.library_head is None:
        raise InputError(
            "expected_log1p: the model has no library-size head (fitted before it existed); pass library"
        )
    w, b = model.head.weight.float(), model.head.bias.float()
    log_theta: torch.Tensor | None = model.log_theta if lik == "nb" else None
    if gene_idx is not None:
        gi = torch.as_tensor(gene_idx, dtype=torch.long, device=device).reshape(-1)
        if gi.numel() and (gi.min() < 0 or gi.max() >= model.cfg.n_genes):
            raise InputError(f"expected_log1p: gene_idx outside 0..{model.cfg.n_genes - 1}")
        w, b = w[gi], b[gi]
        log_theta = None if log_theta is None else log_theta[gi]
    out = torch.empty(xyz.shape[0], w.shape[0], dtype=torch.float32, device=device)
    model.eval()
    for s in range(0, xyz.shape[0], rows_chunk):
        c = model.normalize(xyz[s : s + rows_chunk].to(device))
        hidden = model.hidden(c).float()
        eta = torch.nn.functional.linear(hidden, w, b)
        ll = log_lib[s : s + rows_chunk] if log_lib is not None else model.log_library(hidden)
        out[s : s + rows_chunk] = expected_log1p_counts(eta, ll, log_theta, tol)
    return out
