"""``inrscrecon demo``: synthetic 6-section stack with scrambled poses → align → hold out a middle section →
fit → predict it → metrics beside baselines → table, ``metrics.json`` and PNGs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inrscrecon.align import align
from inrscrecon.data.preprocess import select_genes
from inrscrecon.data.stack import build_cell_table
from inrscrecon.data.synthetic import FLIP, SynthConfig, SynthTruth, make_sections
from inrscrecon.evaluate import baselines, figures, metrics
from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.losses import LossConfig
from inrscrecon.query.predict import predict
from inrscrecon.train.fit import TrainConfig, fit


@contextmanager
def thread_policy(n_threads: int | None) -> Iterator[None]:
    """Run the body with ``n_threads`` torch intra-op threads and as many BLAS / OpenMP threads (threadpoolctl);
    the previous settings come back afterwards. ``None`` leaves everything as it is.

    Small matrices gain nothing from a second thread, and on a machine whose cores are busy with other work
    every parallel region waits for a thread the scheduler has parked: on a shared 2-core machine the demo took
    more than 240 s with two threads against 32 s with one (``benchmarks/bench_demo.py``)."""
    if n_threads is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        with threadpool_limits(limits=n_threads):
            yield
    finally:
        torch.set_num_threads(before)


@dataclass
class DemoConfig:
    """Size of the demo; the defaults finish in ≈ 30 s on an idle 2-core CPU. ``threads``: torch / BLAS threads
    while it runs (1: fastest for these small matrices, and robust when the cores are shared; None: leave
    the process's settings)."""

    n_sections: int = 6
    cells_per_section: int = 1500
    n_genes: int = 300
    holdout: int = 3
    epochs: int = 60
    batch_size: int = 256
    width: int = 128
    n_layers: int = 4
    n_bands: int = 4
    knn_k: int = 10
    seed: int = 0
    progress: bool = True
    threads: int | None = 1


def run_demo(out_dir: str | Path, cfg: DemoConfig | None = None) -> dict[str, dict[str, float]]:
    """Run the demo, write ``metrics.json`` and figures under ``out_dir``, return the metrics."""
    cfg = cfg or DemoConfig()
    with thread_policy(cfg.threads):
        return _run(out_dir, cfg)


def _run(out_dir: str | Path, cfg: DemoConfig) -> dict[str, dict[str, float]]:
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections, truth = make_sections(
        SynthConfig(
            n_sections=cfg.n_sections,
            cells_per_section=cfg.cells_per_section,
            n_genes=cfg.n_genes,
            seed=cfg.seed,
        )
    )
    # each section lies on its own slide at a random pose: align them by expression into section 0's frame
    aligned = align(sections, seed=cfg.seed, progress=cfg.progress)
    aligned.plot_pairs(out / "alignment")
    align_err = _alignment_error_um(aligned.aligned, truth)
    names = aligned.aligned.obs["section"].astype(str).to_numpy()
    held_name = truth.names[cfg.holdout]
    train = [aligned.aligned[names != held_name]]
    held = aligned.aligned[names == held_name]
    genes = select_genes(train, cfg.n_genes)
    table = build_cell_table(train, genes, label_keys=("domain",))
    test = build_cell_table([held], genes, label_keys=("domain",))
    truth_xyz = truth.xyz(cfg.holdout)  # true common-frame positions, for the noiseless expression
    true = test.targets(np.arange(test.n_cells))
    result = fit(
        table,
        EncodingConfig(n_bands=cfg.n_bands),
        width=cfg.width,
        n_layers=cfg.n_layers,
        loss_cfg=LossConfig(),
        train_cfg=TrainConfig(
            epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress
        ),
    )
    train_expr = table.targets(np.arange(table.n_cells))
    preds = {
        "inr": predict(result.model, test.coords),
        "mean_profile": baselines.mean_profile(train_expr, test.n_cells),
        "knn": baselines.knn_interpolate(table.coords, train_expr, test.coords, k=cfg.knn_k),
        "linear_z": baselines.linear_z(table.coords, train_expr, table.section, test.coords),
    }
    labels = test.labels["domain"]
    noiseless = truth.tissue.expected(truth_xyz)[:, [truth.tissue.gene_names.index(g) for g in genes]]
    results: dict[str, dict[str, float]] = {}
    for name, p in preds.items():
        results[name] = {
            "pearson": _median(metrics.pearson_per_gene(p, true)),
            "rmse": metrics.rmse(p, true),
            "ari": metrics.ari(p, labels, seed=cfg.seed) if name != "mean_profile" else 0.0,
            "pearson_noiseless": _median(metrics.pearson_per_gene(p, noiseless)),
        }
    results["observed"] = {"ari": metrics.ari(true, labels, seed=cfg.seed)}
    results["alignment"] = {"max_rms_error_um": align_err}
    results["_run"] = {"wall_s": time.time() - t0, "epochs_run": float(len(result.history))}
    top = metrics.top_variable(true, 3)
    xy = test.coords[:, :2]
    figures.gene_maps(
        xy,
        {"observed": true, "INR": preds["inr"], "k-NN": preds["knn"]},
        [genes[i] for i in top],
        list(top),
        out / "genes_true_vs_pred.png",
    )
    clusters = metrics.cluster(preds["inr"], len(np.unique(labels)), seed=cfg.seed)
    figures.label_maps(xy, {"true domains": labels, "INR clusters": clusters}, out / "domains.png")
    # NaN (e.g. Pearson of the constant mean profile) is written as null: strict JSON readers reject NaN
    clean = {m: {k: (v if np.isfinite(v) else None) for k, v in d.items()} for m, d in results.items()}
    (out / "metrics.json").write_text(json.dumps(clean, indent=2))
    return results


def _median(values: np.ndarray) -> float:
    """Median over genes, NaN (not a warning) when no gene has a defined correlation (constant prediction)."""
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if len(finite) else float("nan")


def _alignment_error_um(aligned, truth: SynthTruth) -> float:
    """Largest RMS distance (µm) between aligned and true positions, both in section 0's observed frame."""
    r0, t0, s0 = truth.rotations[0], truth.translations[0], FLIP if truth.reflected[0] else np.eye(2)
    names = aligned.obs["section"].astype(str).to_numpy()
    worst = 0.0
    for k, name in enumerate(truth.names):
        true_ref = (truth.xy_common[k] - t0) @ r0 @ s0  # common → section 0's observed frame
        est = aligned.obsm["spatial_3d"][names == name, :2]
        worst = max(worst, float(np.sqrt(((est - true_ref) ** 2).sum(axis=1).mean())))
    return worst


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table of the demo metrics."""
    rows = ["| method | pearson (median/gene) | rmse | ari | pearson vs noiseless |", "|---|---|---|---|---|"]
    for name, m in results.items():
        if name.startswith("_") or "pearson" not in m:
            continue
        rows.append(
            f"| {name} | {m['pearson']:.3f} | {m['rmse']:.3f} | {m['ari']:.3f} | {m['pearson_noiseless']:.3f} |"
        )
    rows.append(f"| observed (ceiling) | | | {results['observed']['ari']:.3f} | |")
    if "alignment" in results:
        rows.append(
            f"\nalignment: largest RMS position error {results['alignment']['max_rms_error_um']:.2f} µm"
        )
    return "\n".join(rows)
