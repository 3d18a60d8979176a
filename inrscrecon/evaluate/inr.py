"""The INR methods of an evaluation and how their knobs are chosen.

Each method key (``inr``, ``inr_rmse``, ``inr_nb``, …) is an :class:`INRVariant`: a loss (preset +
likelihood), frame and code options, and the encodings / z-stretch values it may choose between.

Choices are made on validation data only, in one of two ways:

* **spots** (intra, 3d; inter without an interior training section): ``fit``'s seeded 10 % of the training
  cells; each candidate is fitted with early stopping on them and the best-validation fit is the model.
* **sections** (inter): leave-one-section-out among the training sections. Each *interior* training section
  (one with training sections above and below it in z) is held out in turn, every candidate is fitted on the
  other training sections with early stopping on the held-out one, and the candidate with the lowest mean
  best-epoch RMSE wins, with the mean number of optimizer steps to its best epoch. The winner is then refitted
  on *all* training sections for that many steps (no cells held back). Test cells are never used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from inrscrecon.data.preprocess import TARGET_SUM
from inrscrecon.data.stack import CellTable
from inrscrecon.errors import InputError
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.losses import LossConfig
from inrscrecon.train.fit import FitResult, TrainConfig, _split, fit
from inrscrecon.train.select import best_val, describe


@dataclass(frozen=True)
class INRVariant:
    """How one INR method is fitted. ``z_stretch``, ``head_rank`` (0 = full gene head): candidate values chosen
    on validation (one value: fixed);
    ``encoding``: ``"fourier"`` (the evaluation's band candidates) or ``"hashgrid"``; ``own_encoding``: choose
    the Fourier bands for this variant itself instead of reusing the choice of the selecting method."""

    loss: str = "rmse"  # LossConfig preset: "full" | "no_rc" | "rmse"
    likelihood: str = "rmse"  # "rmse" | "poisson" | "nb"
    z_stretch: tuple[float, ...] = (1.0,)
    section_code_dim: int = 0
    head_rank: tuple[int, ...] = (0,)
    encoding: str = "fourier"
    own_encoding: bool = False
    # count models: "plugin" log1p(E[rate]), "mean_log1p" E[log1p] at the median library (see below), or
    # "measured" E[log1p] at the model's library-size field (inrscrecon.field.expectation)
    summary: str = "plugin"

    def loss_config(self) -> LossConfig:
        return replace(LossConfig.preset(self.loss), likelihood=self.likelihood)

    def fit_key(self) -> INRVariant:
        """The variant without its point summary: methods with equal keys share one fit."""
        return replace(self, summary="plugin")

    def is_fit_default(self) -> bool:
        """True when this variant is what ``inrscrecon fit`` trains with its default settings."""
        return (
            self.loss_config() == LossConfig()
            and self.z_stretch == (1.0,)
            and self.section_code_dim == 0
            and self.head_rank == (0,)
            and self.encoding == "fourier"
            and self.summary == "plugin"
        )


#: Method key → variant. The first three are the paper's ablation (full loss, w/o RC, w/o RC & KL).
INR_METHODS: dict[str, INRVariant] = {
    "inr": INRVariant("full"),
    "inr_no_rc": INRVariant("no_rc"),
    "inr_rmse": INRVariant("rmse"),
    "inr_poisson": INRVariant(likelihood="poisson"),
    "inr_nb": INRVariant(likelihood="nb"),
    "inr_poisson_mean": INRVariant(likelihood="poisson", summary="mean_log1p"),
    "inr_nb_mean": INRVariant(likelihood="nb", summary="mean_log1p"),
    "inr_poisson_measured": INRVariant(likelihood="poisson", summary="measured"),
    "inr_nb_measured": INRVariant(likelihood="nb", summary="measured"),
    "inr_zstretch": INRVariant(z_stretch=(1.0, 4.0, 16.0)),
    "inr_codes": INRVariant(section_code_dim=8),
    "inr_hashgrid": INRVariant(encoding="hashgrid"),
    "inr_rank": INRVariant(head_rank=(0, 32)),  # full or rank-32 gene head, chosen on validation
}


@dataclass
class Candidate:
    """One setting a variant may choose: an encoding and fit keyword options."""

    encoding: EncodingConfig
    options: dict[str, Any]

    @property
    def name(self) -> str:
        extra = "".join(f", {k}={v:g}" for k, v in self.options.items())
        return describe(self.encoding) + extra if self.encoding.kind != "hashgrid" else "hashgrid" + extra


def candidates(
    variant: INRVariant, fourier: Sequence[EncodingConfig], chosen: EncodingConfig | None
) -> list[Candidate]:
    """The candidates of ``variant``: encodings (the evaluation's ``fourier`` list, or the selecting method's
    ``chosen`` one when the variant reuses it, or a hash grid) × its z-stretch values × its head ranks."""
    if variant.encoding == "hashgrid":
        encs = [EncodingConfig(kind="hashgrid")]
    elif chosen is not None and not variant.own_encoding:
        encs = [chosen]
    else:
        encs = list(fourier)
    out = []
    for enc in encs:
        for zs in variant.z_stretch:
            for rank in variant.head_rank:
                opts: dict[str, Any] = {}
                if zs != 1.0:
                    opts["z_stretch"] = float(zs)
                if variant.section_code_dim:
                    opts["section_code_dim"] = int(variant.section_code_dim)
                if rank:
                    opts["head_rank"] = int(rank)
                out.append(Candidate(enc, opts))
    return out


def _fit(table: CellTable, cand: Candidate, width: int, depth: int, loss: LossConfig, tc: TrainConfig):
    enc = replace(cand.encoding, seed=tc.seed)
    try:
        return fit(table, enc, width, depth, loss, tc, **cand.options)
    except TypeError as e:  # an option this build's fit does not know yet
        raise InputError(f"INR option {sorted(cand.options)} is not supported by fit: {e}") from None


def interior_sections(table: CellTable) -> list[str]:
    """Training sections with other training sections both below and above them in z (median z order)."""
    names = table.sections()
    order = sorted(names, key=lambda n: float(np.median(table.coords[table.section == n, 2])))
    return order[1:-1]


def fold_table(table: CellTable, held: str, seed: int) -> tuple[CellTable, float]:
    """``table`` with its rows placed so that ``fit``'s seeded validation split (``_split``) is exactly
    the cells of section ``held``; returns (table, val_fraction)."""
    val = np.flatnonzero(table.section == held)
    rest = np.flatnonzero(table.section != held)
    n = table.n_cells
    if n < 20 or len(rest) == 0 or len(val) == 0:
        raise InputError(f"section {held!r}: too few cells for a held-out-section fold ({n})")
    frac = len(val) / n
    perm = np.random.default_rng(seed).permutation(n)
    order = np.empty(n, dtype=np.int64)
    order[perm[: len(val)]] = val
    order[perm[len(val) :]] = rest
    out = table.subset(order)
    fit_rows, val_rows = _split(n, frac, seed)
    assert len(val_rows) == len(val) and (out.section[val_rows] == held).all()
    return out, frac


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps of one epoch of ``fit`` on ``n_train`` cells (same rule as ``fit``)."""
    bs = min(batch_size, max(n_train, 1))
    return max(n_train // bs, 1)


@dataclass
class Chosen:
    """The fitted model of a variant, what was chosen and how long it took."""

    result: FitResult
    candidate: Candidate
    record: dict[str, Any]
    seconds: float


def choose_and_fit(
    table: CellTable,
    variant: INRVariant,
    cands: Sequence[Candidate],
    width: int,
    depth: int,
    tc_for,  # callable n_train → TrainConfig
    folds: Sequence[str] = (),
) -> Chosen:
    """Choose among ``cands`` on validation spots (no ``folds``) or held-out sections (``folds``) and return
    the final model (see the module docstring)."""
    loss = variant.loss_config()
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    if not folds:
        best: tuple[float, FitResult, Candidate] | None = None
        tc = tc_for(len(_split(table.n_cells, tc_for(table.n_cells).val_fraction, 0)[0]))  # fit rows
        for cand in cands:
            t1 = time.time()
            res = _fit(table, cand, width, depth, loss, tc)
            val, ep = best_val(res)
            rows.append(
                {
                    "name": cand.name,
                    "val_rmse": val,
                    "epochs": len(res.history),
                    "best_epoch": ep,
                    "seconds": time.time() - t1,
                }
            )
            if best is None or val < best[0]:
                best = (val, res, cand)
        assert best is not None
        val, res, cand = best
        rec = {
            "selection": "spots",
            "chosen": cand.name,
            "encoding": describe(cand.encoding) if cand.encoding.kind != "hashgrid" else "hashgrid",
            "val_rmse": val,
            "candidates": rows,
            "epochs_run": len(res.history),
            "best_epoch": best_val(res)[1],
        }
        return Chosen(res, cand, rec, time.time() - t0)
    best_c: tuple[float, float, Candidate] | None = None
    for cand in cands:
        vals, steps = [], []
        t1 = time.time()
        for held in folds:
            n_fit = int((table.section != held).sum())
            tc = tc_for(n_fit)
            ft, frac = fold_table(table, held, tc.seed)
            res = _fit(ft, cand, width, depth, loss, replace(tc, val_fraction=frac))
            val, ep = best_val(res)
            vals.append(val)
            steps.append((ep + 1) * steps_per_epoch(n_fit, tc.batch_size or 512))
        mean_val = float(np.mean(vals))
        rows.append(
            {
                "name": cand.name,
                "val_rmse": mean_val,
                "fold_val_rmse": dict(zip(folds, vals)),
                "best_steps": steps,
                "seconds": time.time() - t1,
            }
        )
        if best_c is None or mean_val < best_c[0]:
            best_c = (mean_val, float(np.mean(steps)), cand)
    assert best_c is not None
    val, n_steps, cand = best_c
    base = tc_for(table.n_cells)
    per = steps_per_epoch(table.n_cells, base.batch_size or 512)
    epochs = max(1, math.ceil(n_steps / per))
    refit = replace(base, val_fraction=0.0, epochs=epochs, patience=epochs + 1)
    res = _fit(table, cand, width, depth, loss, refit)
    rec = {
        "selection": "sections",
        "folds": list(folds),
        "chosen": cand.name,
        "encoding": describe(cand.encoding) if cand.encoding.kind != "hashgrid" else "hashgrid",
        "val_rmse": val,
        "candidates": rows,
        "refit_epochs": epochs,
        "refit_steps": epochs * per,
    }
    return Chosen(res, cand, rec, time.time() - t0)


def predictive_log1p_mean(
    pred: np.ndarray,  # [N, G] softplus(η): log1p of the predicted rate per target_sum counts
    library: float,
    log_theta: np.ndarray | None = None,  # [G] NB log-dispersion; None: Poisson
    target_sum: float = 1e4,
    tol: float = 1e-7,
) -> np.ndarray:
    """E[log1p(Y · target_sum / L)] for counts Y ~ Poisson(μ) or NB(μ, θ), μ = (L / target_sum) · expm1(pred).

    A count model's plug-in output log1p(E[rate]) is Jensen-biased upwards against the log1p-normalised
    measurement; this predictive mean is the point prediction that minimises the expected squared error in
    those units. ``library`` L is one library size for every point (the evaluation uses the median of the
    training cells: a held-out spot's own total is not known to the model). The exact sum of
    :func:`inrscrecon.field.expectation.expected_log1p_counts`, in blocks of 256 points."""
    import torch

    from inrscrecon.field.expectation import expected_log1p_counts

    if target_sum != TARGET_SUM:
        raise ValueError(f"predictive_log1p_mean: target_sum must be {TARGET_SUM:g}, got {target_sum:g}")
    p = torch.as_tensor(np.asarray(pred), dtype=torch.float64)
    eta = torch.log(torch.expm1(p).clamp_min(1e-12)).float()  # softplus⁻¹; rate ≥ 1e-12 keeps log finite
    lt = None if log_theta is None else torch.as_tensor(np.asarray(log_theta), dtype=torch.float32)
    out = [
        expected_log1p_counts(e, torch.full((e.shape[0],), math.log(library)), lt, tol=tol)
        for e in eta.split(256)
    ]
    return torch.cat(out).numpy() if out else np.zeros(p.shape, dtype=np.float32)
