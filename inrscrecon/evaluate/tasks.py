"""Evaluation tasks (DESIGN §4–5): splits, and every method run on the same split.

* **inter**: hold out one whole section of an aligned stack (default: each middle section in turn), train on
  the others, predict at the held-out cells' aligned coordinates.
* **intra**: drop a seeded random ``drop_fraction`` (50 %) of one section's cells, train on the rest, predict
  the dropped ones; setting ``intra_neighbours`` also trains on the adjacent sections of the stack.
* **3d**: hold out the cells of a z-band (quantiles ``band`` of z; default the middle 20 %) of a 3D point cloud
  or stack, train on the rest, predict the band; cluster the prediction into domains.

* **paper protocol** (``EvalConfig.protocol = "paper"``, intra only; task key ``intra_paper``): the same
  50 % split, scored on the *complete* section (training and dropped cells), as the INRScrecon paper scores
  intra-slice completion (with ``n_genes = 3000``, ``n_pcs = 30`` and GMM + k-means in the command's defaults).

Methods on every split: the INR variants of ``EvalConfig.ablations`` (:data:`inrscrecon.evaluate.inr.
INR_METHODS`: full loss ``inr``, w/o RC ``inr_no_rc``, w/o RC & KL ``inr_rmse``, count likelihoods, z-stretch,
section codes, hash grid); baselines ``gaussian``, ``gaussian_pca`` (its prediction projected onto the top-r
principal components of the training expression, r chosen on the bandwidth's validation data), ``knn``,
``linear_z`` (stacks only), ``mean_profile``; and ``true_expression``, the same clustering applied to the measured expression (ARI reference). Every INR knob
(encoding bandwidth, early-stopping epoch, variant options) and each baseline's k / bandwidth are chosen on
the same validation data: for inter splits by leave-one-section-out among the interior training sections,
otherwise on a seeded 10 % of the training cells; test cells are never used for a choice.

Labels for ARI: ``label_key`` (e.g. DLPFC ``layer``; "unknown" dropped) or, without labels, domains =
k-means (k = ``n_domains``) on PCA of the measured expression of *all* cells of the dataset, seed 0.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import torch

from inrscrecon.data.preprocess import is_counts, select_genes
from inrscrecon.data.stack import CellTable, build_cell_table
from inrscrecon.errors import InputError
from inrscrecon.evaluate import metrics
from inrscrecon.evaluate.inr import (
    INR_METHODS,
    candidates,
    choose_and_fit,
    interior_sections,
    predictive_log1p_mean,
)
from inrscrecon.evaluate.tuning import tuned_baselines, tuned_baselines_sections, validation_split
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.query.predict import predict
from inrscrecon.train.fit import TrainConfig
from inrscrecon.train.select import DEFAULT_CANDIDATES

TASKS = ("inter", "intra", "3d")
PROTOCOLS = ("ours", "paper")
METHOD_ORDER = (
    *INR_METHODS,
    "gaussian",
    "gaussian_pca",
    "knn",
    "linear_z",
    "mean_profile",
    "true_expression",
)


@dataclass
class EvalConfig:
    """Everything that defines an evaluation run besides the data. Defaults = the benchmark's settings."""

    n_genes: int = 500  # top variable shared genes (all metrics are on this gene set)
    width: int = 256
    n_layers: int = 4
    steps: int | None = (
        1000  # optimizer steps per fit (epochs follow from the training-set size); None: epochs
    )
    epochs: int = 60  # used when ``steps`` is None, and as the cap otherwise (× 10)
    batch_size: int = 64
    lr: float = 2e-3
    patience: int = 8  # epochs; with ``steps`` it is max(patience, epochs // 6)
    val_fraction: float = 0.1
    candidates: tuple[EncodingConfig, ...] = DEFAULT_CANDIDATES  # encodings tried on validation cells
    select_loss: str = "rmse"  # loss preset used while choosing the encoding (its winner is ``inr_rmse``)
    ablations: tuple[str, ...] = ("inr", "inr_no_rc", "inr_rmse")  # INR method keys (evaluate.inr)
    inter_selection: str = "sections"  # inter: choose on held-out training sections ("spots": random cells)
    gene_selection: str = "pooled"  # select_genes method: "pooled" | "batch"
    protocol: str = "ours"  # "paper": intra scored on the complete section (see evaluate.tasks docs)
    n_pcs: int = metrics.N_PCS  # PCA components before clustering (the paper protocol uses 30)
    drop_fraction: float = 0.5
    band: tuple[float, float] = (0.4, 0.6)
    n_domains: int = 7
    cluster_methods: tuple[str, ...] = ("kmeans", "gmm")
    intra_settings: tuple[str, ...] = ("alone", "neighbours")  # intra: without / with the adjacent sections
    baselines: bool = True  # False: INR rows (and true_expression) only, e.g. to add INR rows to a run
    max_cells: int | None = None  # subsample each section (tests / quick runs)
    threads: int | None = None
    progress: bool = False


@dataclass
class Split:
    """One train/test split. ``labels`` belong to the test cells."""

    task: str
    name: str
    seed: int
    train: CellTable
    test: CellTable
    labels: np.ndarray


@dataclass
class SplitResult:
    """Metrics per method, predictions (for figures) and what each method chose on validation."""

    split: Split
    metrics: dict[str, dict[str, float]]
    predictions: dict[str, np.ndarray] = field(repr=False)
    truth: np.ndarray = field(repr=False)
    chosen: dict[str, dict] = field(default_factory=dict)


# ---------------------------------------------------------------- data


def _is_3d_cloud(s: ad.AnnData) -> bool:
    return "spatial" in s.obsm and np.asarray(s.obsm["spatial"]).shape[1] == 3


def stack_sections(
    sections: Sequence[ad.AnnData],
    genes: Sequence[str],
    spacing: float | None = None,
    z_key: str | None = None,
    label_key: str | None = None,
    seed: int = 0,
) -> tuple[CellTable, dict]:
    """One CellTable in a common 3D frame (µm). Sections without ``obsm['spatial_3d']`` (and not 3D clouds)
    are aligned first with :func:`inrscrecon.align.align`. Returns (table, alignment info for the report)."""
    sections = list(sections)
    keys = (label_key,) if label_key else ()
    for i, s in enumerate(sections):
        if label_key and label_key not in s.obs:
            name = s.uns.get("section", i)
            raise InputError(
                f"section {name!r}: no labels at obs[{label_key!r}] (available: {list(s.obs.columns)})"
            )
    info: dict = {"aligned": False}
    needs_align = len(sections) > 1 and not all("spatial_3d" in s.obsm or _is_3d_cloud(s) for s in sections)
    if needs_align:
        from inrscrecon.align import align

        t0 = time.time()
        res = align(sections, spacing=spacing, z_key=z_key, seed=seed)
        aligned = res.aligned
        aligned.uns["X_kind"] = "raw_counts" if is_counts(sections[0]) else "normalized_expression"
        info = {"aligned": True, "seconds": time.time() - t0, "transforms": res.transforms}
        return build_cell_table([aligned], genes, label_keys=keys), info
    return build_cell_table(sections, genes, spacing=spacing, z_key=z_key, label_keys=keys), info


def reference_labels(table: CellTable, label_key: str | None, n_domains: int) -> tuple[np.ndarray, str]:
    """Ground-truth labels of every cell: ``table.labels[label_key]`` or clusters of the measured expression."""
    if label_key:
        return table.labels[label_key], f"obs[{label_key!r}]"
    expr = table.targets(np.arange(table.n_cells))
    lab = metrics.cluster(expr, n_domains, "kmeans", seed=0).astype(str)
    return lab, f"k-means (k={n_domains}) on PCA-{metrics.N_PCS} of the measured expression of all cells"


def _subsample(table: CellTable, max_cells: int | None, seed: int) -> np.ndarray:
    """Rows kept when each section is capped at ``max_cells`` (all rows when None)."""
    if max_cells is None:
        return np.arange(table.n_cells)
    rng = np.random.default_rng(seed)
    keep = []
    for name in table.sections():
        rows = np.flatnonzero(table.section == name)
        keep.append(np.sort(rng.choice(rows, min(max_cells, len(rows)), replace=False)))
    return np.sort(np.concatenate(keep))


# ---------------------------------------------------------------- splits


def section_order(table: CellTable) -> list[str]:
    """Section names ordered by median z."""
    names = table.sections()
    return sorted(names, key=lambda n: float(np.median(table.coords[table.section == n, 2])))


def _check_holdout(holdout: Sequence[str], names: list[str]) -> list[str]:
    unknown = [h for h in holdout if h not in names]
    if unknown:
        raise InputError(f"unknown holdout section {unknown[0]!r}; sections are {names}")
    return list(holdout)


def inter_splits(
    table: CellTable, labels: np.ndarray, holdout: Sequence[str] | None, seeds: Sequence[int]
) -> list[Split]:
    """Hold out each section of ``holdout`` (default: every section but the first and last in z) in turn."""
    order = section_order(table)
    if len(order) < 2:
        raise InputError(f"inter-slice evaluation needs at least 2 sections, got {len(order)}")
    if holdout:
        held = _check_holdout(holdout, order)
    else:
        if len(order) < 3:
            raise InputError("with 2 sections there is no middle section; name one with --holdout")
        held = order[1:-1]
    out = []
    for name in held:
        test = table.section == name
        for seed in seeds:
            out.append(Split("inter", name, seed, table.subset(~test), table.subset(test), labels[test]))
    return out


def intra_splits(
    table: CellTable,
    labels: np.ndarray,
    holdout: Sequence[str] | None,
    seeds: Sequence[int],
    drop_fraction: float = 0.5,
    neighbours: bool = False,
    complete: bool = False,
) -> list[Split]:
    """Drop a seeded ``drop_fraction`` of each section's cells; train on the rest (and with ``neighbours``, on
    the adjacent sections in z, all their cells). ``complete``: score on the whole section (training and
    dropped cells; the paper's intra-slice protocol) instead of the dropped cells only."""
    if not 0 < drop_fraction < 1:
        raise InputError(f"drop fraction must be in (0, 1), got {drop_fraction}")
    order = section_order(table)
    held = _check_holdout(holdout, order) if holdout else order
    task = "intra_neighbours" if neighbours else "intra"
    task += "_paper" if complete else ""
    out = []
    for name in held:
        rows = np.flatnonzero(table.section == name)
        i = order.index(name)
        nb = [order[j] for j in (i - 1, i + 1) if 0 <= j < len(order)] if neighbours else []
        extra = np.flatnonzero(np.isin(table.section, nb))
        for seed in seeds:
            perm = np.random.default_rng(seed).permutation(len(rows))
            n_drop = int(round(drop_fraction * len(rows)))
            test, kept = np.sort(rows[perm[:n_drop]]), np.sort(rows[perm[n_drop:]])
            train = np.sort(np.concatenate([kept, extra]))
            if complete:
                test = rows
            out.append(Split(task, name, seed, table.subset(train), table.subset(test), labels[test]))
    return out


def band_splits(
    table: CellTable, labels: np.ndarray, band: tuple[float, float], seeds: Sequence[int]
) -> list[Split]:
    """Hold out the cells whose z lies between the ``band`` quantiles of z."""
    lo_q, hi_q = band
    if not 0 <= lo_q < hi_q <= 1:
        raise InputError(f"z-band must be two quantiles 0 ≤ lo < hi ≤ 1, got {band}")
    z = table.coords[:, 2]
    lo, hi = np.quantile(z, [lo_q, hi_q])
    test = (z >= lo) & (z <= hi)
    if test.all() or not test.any():
        raise InputError(f"z-band {band} selects {int(test.sum())} of {len(z)} cells; need a proper subset")
    name = f"z∈[{lo:.4g}, {hi:.4g}]"
    return [Split("3d", name, seed, table.subset(~test), table.subset(test), labels[test]) for seed in seeds]


# ---------------------------------------------------------------- one split


def _scores(
    pred: np.ndarray, true: np.ndarray, xyz: np.ndarray, labels: np.ndarray, cfg: EvalConfig, seed: int
) -> dict:
    top = metrics.top_variable(true, metrics.SSIM_GENES)
    out = {
        "pearson": metrics.median_pearson(pred, true),
        "rmse": metrics.rmse(pred, true),
        "ssim": metrics.ssim_maps(pred[:, top], true[:, top], metrics.project_2d(xyz), bins=None),
    }
    out.update(_aris(pred, labels, cfg, seed))
    return out


def _aris(expr: np.ndarray, labels: np.ndarray, cfg: EvalConfig, seed: int) -> dict[str, float]:
    out = {}
    for m in cfg.cluster_methods:
        key = "ari" if m == "kmeans" else f"ari_{m}"
        out[key] = metrics.ari(expr, labels, m, seed=seed, n_pcs=cfg.n_pcs)
    return out


def train_config(cfg: EvalConfig, n_fit: int, seed: int) -> TrainConfig:
    """TrainConfig for ``n_fit`` training cells: with ``cfg.steps`` the epoch count gives about that many
    optimizer steps whatever the data size (capped at 10 × ``cfg.epochs``)."""
    epochs, patience = cfg.epochs, cfg.patience
    if cfg.steps is not None:
        per_epoch = max(n_fit // min(cfg.batch_size, max(n_fit, 1)), 1)
        epochs = int(np.clip(int(np.ceil(cfg.steps / per_epoch)), 1, 10 * cfg.epochs))
        patience = max(cfg.patience, epochs // 6)
    return TrainConfig(
        epochs=epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        patience=patience,
        val_fraction=cfg.val_fraction,
        seed=seed,
        progress=cfg.progress,
    )


def _inr_order(methods: Sequence[str], cfg: EvalConfig) -> list[str]:
    """INR methods with the encoding-selecting one (loss ``cfg.select_loss``) first."""
    sel = [m for m in methods if INR_METHODS[m] == INR_METHODS.get("inr_" + cfg.select_loss)]
    return sel[:1] + [m for m in methods if m not in sel[:1]]


def run_split(split: Split, cfg: EvalConfig) -> SplitResult:
    """Train / tune every method on ``split.train`` and score it on ``split.test``.

    Inter-slice splits with ``cfg.inter_selection == "sections"`` choose every knob by leave-one-section-out
    among the interior training sections (:mod:`inrscrecon.evaluate.inr`), the final fits use all training
    cells; otherwise (and when no training section is interior) choices are made on ``fit``'s seeded
    validation cells, as every method's final fit leaves them out."""
    tr, te = split.train, split.test
    y_tr = tr.targets(np.arange(tr.n_cells))
    y_te = te.targets(np.arange(te.n_cells))
    if cfg.inter_selection not in ("sections", "spots"):
        raise InputError(f"inter selection must be 'sections' or 'spots', got {cfg.inter_selection!r}")
    folds = interior_sections(tr) if split.task == "inter" and cfg.inter_selection == "sections" else []
    fit_rows, val_rows = validation_split(tr.n_cells, cfg.val_fraction, split.seed)
    if not folds and len(val_rows) == 0:
        raise InputError(f"split {split.name!r}: too few training cells ({tr.n_cells}) for validation")
    preds: dict[str, np.ndarray] = {}
    chosen: dict[str, dict] = {"selection": {"mode": "sections" if folds else "spots", "folds": folds}}
    wall: dict[str, float] = {}
    unknown = [m for m in cfg.ablations if m not in INR_METHODS]
    if unknown:
        raise InputError(f"unknown INR method {unknown[0]!r}; choose from {list(INR_METHODS)}")
    selected_enc: EncodingConfig | None = None
    fitted: dict = {}  # variant without its summary → its fit (methods differing only in summary share it)
    for method in _inr_order(cfg.ablations, cfg):
        variant = INR_METHODS[method]
        got = fitted.get(variant.fit_key())
        if got is None:
            cands = candidates(variant, cfg.candidates, selected_enc)
            got = choose_and_fit(
                tr, variant, cands, cfg.width, cfg.n_layers, lambda n: train_config(cfg, n, split.seed), folds
            )
            fitted[variant.fit_key()] = got
        if selected_enc is None and variant.encoding == "fourier":
            selected_enc = got.candidate.encoding
            chosen["inr_selection"] = {"method": method, **got.record}
        preds[method] = predict(got.result.model, te.coords)
        chosen[method] = dict(got.record)
        if variant.summary == "mean_log1p" and variant.likelihood != "rmse":
            lib = float(np.median(tr.totals)) if tr.target_sum > 0 else 0.0
            if lib > 0:
                lt = got.result.model.log_theta
                theta = None if lt is None else lt.detach().cpu().numpy()
                preds[method] = predictive_log1p_mean(preds[method], lib, theta, tr.target_sum)
                chosen[method]["library_size"] = lib
        if variant.summary == "measured" and variant.likelihood != "rmse":
            from inrscrecon.field.expectation import expected_log1p

            preds[method] = expected_log1p(got.result.model, te.coords).cpu().numpy()
            chosen[method]["library_size"] = "field"
        wall[method] = got.seconds
    t0 = time.time()
    if not cfg.baselines:
        tuned = {}
    elif folds:
        tuned = tuned_baselines_sections(tr.coords, y_tr, tr.section, folds, te.coords)
    else:
        tuned = tuned_baselines(
            tr.coords[fit_rows],
            y_tr[fit_rows],
            tr.section[fit_rows],
            tr.coords[val_rows],
            y_tr[val_rows],
            te.coords,
        )
    per = (time.time() - t0) / max(len(tuned), 1)
    for name, t in tuned.items():
        preds[name] = t.prediction
        wall[name] = per
        chosen[name] = {"params": t.params, "val_rmse": t.val_rmse, "scores": t.scores}
    scores: dict[str, dict[str, float]] = {}
    for name, p in preds.items():
        scores[name] = _scores(p, y_te, te.coords, split.labels, cfg, split.seed)
        scores[name]["wall_s"] = wall.get(name, float("nan"))
    scores["true_expression"] = _aris(y_te, split.labels, cfg, split.seed)
    return SplitResult(split, scores, preds, y_te, chosen)


# ---------------------------------------------------------------- driver


@dataclass
class Prepared:
    """A dataset ready for splitting: the stacked table, per-cell labels and provenance for the report."""

    table: CellTable
    labels: np.ndarray
    label_source: str
    genes: list[str]
    info: dict


def prepare(
    sections: Sequence[ad.AnnData],
    label_key: str | None = None,
    spacing: float | None = None,
    z_key: str | None = None,
    cfg: EvalConfig | None = None,
) -> Prepared:
    """Select genes, align / stack the sections, subsample (``cfg.max_cells``) and attach labels."""
    cfg = cfg or EvalConfig()
    if not sections:
        raise InputError("no sections to evaluate")
    genes = select_genes(list(sections), cfg.n_genes, method=cfg.gene_selection)
    table, info = stack_sections(sections, genes, spacing, z_key, label_key)
    table = table.subset(_subsample(table, cfg.max_cells, 0))
    labels, source = reference_labels(table, label_key, cfg.n_domains)
    return Prepared(table, labels, source, genes, info)


def make_splits(
    task: str, prep: Prepared, holdout: Sequence[str] | None, seeds: Sequence[int], cfg: EvalConfig
) -> list[Split]:
    """Every split of ``task`` ("inter", "intra" — plus "intra_neighbours" for stacks — or "3d")."""
    t, lab = prep.table, prep.labels
    if cfg.protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {cfg.protocol!r}; choose from {list(PROTOCOLS)}")
    if cfg.protocol == "paper":
        if task != "intra":
            raise InputError(
                f"--protocol paper scores intra-slice completion; use --task intra, not {task!r}"
            )
        return intra_splits(t, lab, holdout, seeds, cfg.drop_fraction, complete=True)
    if task == "inter":
        return inter_splits(t, lab, holdout, seeds)
    if task == "intra":
        bad = set(cfg.intra_settings) - {"alone", "neighbours"}
        if bad or not cfg.intra_settings:
            raise InputError(f"intra settings must be 'alone' and/or 'neighbours', got {cfg.intra_settings}")
        out = []
        if "alone" in cfg.intra_settings:
            out += intra_splits(t, lab, holdout, seeds, cfg.drop_fraction)
        if "neighbours" in cfg.intra_settings and len(t.sections()) > 1:
            out += intra_splits(t, lab, holdout, seeds, cfg.drop_fraction, neighbours=True)
        return out
    if task == "3d":
        if holdout:
            raise InputError("--holdout names sections; the 3d task holds out a z-band (see --band)")
        return band_splits(t, lab, cfg.band, seeds)
    raise InputError(f"unknown task {task!r}; choose from {list(TASKS)}")


def run_task(
    task: str,
    prep: Prepared,
    holdout: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    cfg: EvalConfig | None = None,
    log=None,
) -> list[SplitResult]:
    """All splits of a task, one after the other (``log``: optional callable taking a progress line)."""
    cfg = cfg or EvalConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = []
    splits = make_splits(task, prep, holdout, seeds, cfg)
    for i, sp in enumerate(splits):
        t0 = time.time()
        res = run_split(sp, cfg)
        out.append(res)
        if log is not None:
            m = res.metrics
            best = {k: f"{m[k]['pearson']:.3f}/{m[k]['ari']:.3f}" for k in m if "pearson" in m[k]}
            log(
                f"[{sp.task} {sp.name} seed {sp.seed}] {i + 1}/{len(splits)} {time.time() - t0:.0f}s "
                f"pearson/ari {best}"
            )
    return out
