"""Choose the encoding bandwidth (and, through ``fit``'s early stopping, the number of epochs) on held-out
validation cells.

High-frequency encodings fit spot-level noise (DESIGN §2): each candidate encoding is fitted with the same
seed, hence the same validation split (``TrainConfig.val_fraction``) and initialisation stream, and the one
with the lowest best-epoch validation RMSE wins. ``fit`` already keeps the best-validation epoch, so the
returned model is both the chosen bandwidth and the chosen early-stopping point.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.losses import LossConfig
from inrscrecon.train.fit import FitResult, Table, TrainConfig, fit

#: Candidates tried by ``fit --bands auto``. Measured on DLPFC 151673 (benchmarks/results/results.md,
#: validation RMSE): L = 10 and 6 fit spot noise, L = 2–4 are within 0.001 of each other, so the two ends of
#: that range are tried (log-spaced bands 2^k π on [−1, 1] coordinates).
DEFAULT_CANDIDATES: tuple[EncodingConfig, ...] = (
    EncodingConfig("fourier", n_bands=2),
    EncodingConfig("fourier", n_bands=4),
)


def describe(enc: EncodingConfig) -> str:
    """Short name of an encoding, e.g. ``fourier L=4``, ``gaussian σ=1`` or ``hashgrid 8×2 4–64``."""
    if enc.kind == "hashgrid":
        return f"hashgrid {enc.levels}×{enc.features_per_level} {enc.base_resolution}–{enc.max_resolution}"
    return f"fourier L={enc.n_bands}" if enc.kind == "fourier" else f"gaussian σ={enc.sigma:g}"


@dataclass
class Selection:
    """The chosen encoding, its fitted model (best validation epoch) and every candidate's score."""

    encoding: EncodingConfig
    result: FitResult
    val_rmse: float
    candidates: list[dict] = field(default_factory=list)  # name, val_rmse, epochs, best_epoch, seconds
    checkpoints: list[Path] = field(
        default_factory=list
    )  # each candidate's checkpoint (the caller removes them)

    @property
    def model(self):
        return self.result.model


def best_val(result: FitResult) -> tuple[float, int]:
    """(lowest validation score, its epoch) of a fit's history: the fit's own criterion, i.e. the validation
    NLL of a count likelihood (``val_nll``), else the validation RMSE."""
    if not result.history:
        return math.inf, -1
    key = "val_nll" if "val_nll" in result.history[0] else "val_rmse"
    i = min(range(len(result.history)), key=lambda j: result.history[j][key])
    return float(result.history[i][key]), i


def select_encoding(
    table: Table,
    candidates: Sequence[EncodingConfig] | None = None,
    width: int = 256,
    n_layers: int = 4,
    loss_cfg: LossConfig | None = None,
    train_cfg: TrainConfig | None = None,
    checkpoint_for: Callable[[EncodingConfig], Path] | None = None,
    resume: bool | str = False,
    **fit_kwargs: Any,  # passed on to fit (z_stretch, section_code_dim)
) -> Selection:
    """Fit ``table`` once per candidate encoding and keep the one with the lowest validation RMSE.

    All candidates share ``train_cfg`` (hence the validation split); the encoding seed follows
    ``train_cfg.seed``. ``checkpoint_for(encoding)`` gives each candidate its own checkpoint path (``resume``
    continues each from it, ``"or_start"`` starts a candidate that has none; see ``train.fit.fit``).
    Raises ValueError when ``train_cfg.val_fraction`` leaves no validation cells.
    """
    tc = train_cfg or TrainConfig()
    if tc.val_fraction <= 0:
        raise ValueError("bandwidth selection needs validation cells: set TrainConfig.val_fraction > 0")
    cands = list(candidates or DEFAULT_CANDIDATES)
    best: Selection | None = None
    rows = []
    written: list[Path] = []
    for enc in cands:
        enc = replace(enc, seed=tc.seed)
        t0 = time.time()
        ckpt = checkpoint_for(enc) if checkpoint_for is not None else None
        if ckpt is not None:
            written.append(Path(ckpt))
        res = fit(table, enc, width, n_layers, loss_cfg, tc, checkpoint=ckpt, resume=resume, **fit_kwargs)
        val, epoch = best_val(res)
        seconds = time.time() - t0
        crit = "val_nll" if "val_nll" in (res.history[0] if res.history else {}) else "val_rmse"
        rows.append(
            {
                "name": describe(enc),
                "val_rmse": float(res.history[epoch]["val_rmse"]) if epoch >= 0 else val,
                **({crit: val} if crit == "val_nll" else {}),
                "epochs": len(res.history),
                "best_epoch": epoch,
                "seconds": seconds,
            }
        )
        if best is None or val < best.val_rmse:
            best = Selection(enc, res, val)
    assert best is not None
    best.candidates = rows
    best.checkpoints = written
    return best
