"""Out-of-domain queries: points farther than a margin outside the training cells' tissue (the per-section
outlines stored in the model file, interpolated in z) are extrapolations. :func:`check_domain` measures the
fraction, warns once (:class:`OutOfDomainWarning`, one line) and returns a record for ``uns`` / attributes."""

from __future__ import annotations

import warnings

import numpy as np

from inrscrecon.field.model import INRField
from inrscrecon.query.tissue import TissueMask

MAX_CHECKED = 200_000  # larger queries are checked on a seeded sample of this many points


class OutOfDomainWarning(UserWarning):
    """Some query points lie outside the tissue the model was trained on (printed as one line)."""


def margin_for(model: INRField) -> float:
    """Default margin (µm): two spot spacings of the training cells, at least 1 % of their x/y extent."""
    b = getattr(model.cfg, "bounds", None)
    ext = max(b[1][0] - b[0][0], b[1][1] - b[0][1]) if b else 0.0
    return float(max(2.0 * float(getattr(model.cfg, "spot_um", 0.0) or 0.0), 0.01 * ext, 1e-6))


def check_domain(
    model: INRField,
    xyz: np.ndarray,  # [N, 3] µm
    what: str = "query points",
    margin: float | None = None,
    warn: bool = True,
    seed: int = 0,
) -> dict | None:
    """Fraction of ``xyz`` farther than ``margin`` µm outside the training tissue. Returns ``{"fraction",
    "n_checked", "margin_um", "max_distance_um", "reference"}`` (None when the model file stores no tissue,
    i.e. was written before it did); warns once when the fraction is above zero."""
    mask = TissueMask.from_config(model.cfg)
    if mask is None or len(xyz) == 0:
        return None
    m = margin_for(model) if margin is None else float(margin)
    pts = np.asarray(xyz)
    if len(pts) > MAX_CHECKED:
        pts = pts[np.sort(np.random.default_rng(seed).choice(len(pts), MAX_CHECKED, replace=False))]
    d = mask.distance(np.asarray(pts, dtype=np.float64))
    out = d > m
    frac = float(out.mean())
    rec = {
        "fraction": frac,
        "n_checked": int(len(pts)),
        "margin_um": round(m, 3),
        "max_distance_um": round(float(d.max()), 3),
        "reference": "training cells' per-section tissue outlines, interpolated in z",
    }
    if warn and frac > 0:
        warnings.warn(
            f"{frac:.1%} of {what} lie more than {m:.3g} µm outside the training tissue (up to "
            f"{float(d.max()):.3g} µm): the field extrapolates there",
            OutOfDomainWarning,
            stacklevel=3,
        )
    return rec


__all__ = ["OutOfDomainWarning", "check_domain", "margin_for"]
