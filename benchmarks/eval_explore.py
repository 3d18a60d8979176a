"""Exploration runs behind the evaluation defaults, on validation data only. One JSON line per configuration.

* ``--inter dlpfc`` / ``--inter breast`` (default): the inter-slice task with the test section set aside
  (DLPFC 151674, breast-cancer layer 2), every INR variant (``--variants``) and the tuned baselines fitted on
  the remaining training sections *without* their interior one (DLPFC 151675, breast layer 3) and scored on
  it — the leave-one-section-out fold the evaluation chooses on. Seed 100 (not an evaluation seed); 500
  genes selected ``--hvg pooled|batch`` on the training sections. No test section is read by any model.
  ``python benchmarks/eval_explore.py --inter dlpfc > benchmarks/results/explore_inter_dlpfc.jsonl``
  Count variants also report ``<method>_measured`` (E[log1p] at the library-size field); ``--library-coupled``
  trains that field without detaching the trunk (``config`` then says "coupled library head").
* ``--structure dlpfc|breast``: structure shared across genes on the same fold (test section never read):
  every predictor projected onto the top-r principal axes (r = 4…64) of the training sections' log1p
  expression, INRs with a low-rank gene head (``fit(head_rank=…)``), trained on more genes (scored on the
  500), smaller / lower-bandwidth / weight-decayed fields; seeds ``--seeds``; ``--parts`` picks the groups.
  ``python benchmarks/eval_explore.py --structure dlpfc > benchmarks/results/explore_structure_dlpfc.jsonl``;
  ``--summary FILES`` prints mean ± s.d. over seeds.
* ``--sweep intra_151673``: the earlier sweep (DLPFC 151673 intra-slice, split seed 100, 500 genes; test
  columns printed for information) behind ``explore_151673.jsonl``.

Runs on one CPU thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inrscrecon.data.io import read_sections  # noqa: E402
from inrscrecon.data.preprocess import select_genes  # noqa: E402
from inrscrecon.data.stack import build_cell_table  # noqa: E402
from inrscrecon.evaluate import metrics as M  # noqa: E402
from inrscrecon.evaluate import tuning  # noqa: E402
from inrscrecon.field.encoding import EncodingConfig  # noqa: E402
from inrscrecon.field.losses import LossConfig  # noqa: E402
from inrscrecon.query.predict import predict  # noqa: E402
from inrscrecon.train.fit import TrainConfig, fit  # noqa: E402

DATA = Path(os.environ.get("INRSCRECON_DATA", REPO.parent / "shared" / "data"))
# inter-task datasets: (files, default test section, label key, section spacing in µm or None = from the files)
INTER_DATASETS = {
    "dlpfc": ([f"dlpfc_{s}.h5ad" for s in (151673, 151674, 151675, 151676)], "151674", "layer", None),
    "breast": ([f"paste_bc_layer{i}.h5ad" for i in (1, 2, 3, 4)], "layer2", None, 16.0),
}


def inter_sections(dataset: str, test_name: str) -> tuple[list, list]:
    """(all sections, training sections) of an inter-task dataset; breast-cancer grid units × 200 µm."""
    secs = read_sections([DATA / f for f in INTER_DATASETS[dataset][0]])
    if dataset == "breast":
        for s in secs:
            s.uns["microns_per_pixel"] = 200.0
    train_secs = [s for s in secs if str(s.uns.get("section")) != test_name]
    assert len(train_secs) == len(secs) - 1, "test section not found"
    return secs, train_secs


def sweep_intra_151673() -> None:
    torch.set_num_threads(1)
    secs = read_sections([DATA / f"dlpfc_{s}.h5ad" for s in (151673, 151674, 151675, 151676)])
    genes = select_genes(secs, 500)
    tab = build_cell_table(secs[:1], genes, label_keys=("layer",))
    perm = np.random.default_rng(100).permutation(tab.n_cells)
    half = tab.n_cells // 2
    train, test = tab.subset(np.sort(perm[:half])), tab.subset(np.sort(perm[half:]))
    y_tr, y_te = train.targets(np.arange(train.n_cells)), test.targets(np.arange(test.n_cells))
    lab = test.labels["layer"]
    fr, vr = tuning.validation_split(train.n_cells, 0.1, 0)

    def report(name: str, pv: np.ndarray, pt: np.ndarray, extra: dict | None = None) -> None:
        row = {"name": name, "val_rmse": M.rmse(pv, y_tr[vr]), "val_pearson": M.median_pearson(pv, y_tr[vr]),
               "test_pearson": M.median_pearson(pt, y_te), "test_rmse": M.rmse(pt, y_te),
               "test_ari": M.ari(pt, lab), **(extra or {})}  # fmt: skip
        print(json.dumps(row), flush=True)

    query = np.vstack([train.coords[vr], test.coords])
    for name, t in tuning.tuned_baselines(train.coords[fr], y_tr[fr], train.section[fr], train.coords[vr], y_tr[vr],
                                          query).items():  # fmt: skip
        report(name, t.prediction[: len(vr)], t.prediction[len(vr) :], {"params": t.params})
    print(json.dumps({"name": "true", "test_ari": M.ari(y_te, lab)}), flush=True)

    def run(name, enc, width=256, depth=4, lr=2e-3, epochs=60, bs=256, loss="rmse", patience=8):
        t0 = time.time()
        tc = TrainConfig(epochs=epochs, batch_size=bs, lr=lr, patience=patience, seed=0, progress=False)
        r = fit(train, enc, width, depth, LossConfig.preset(loss), tc)
        report(name, predict(r.model, train.coords[vr]), predict(r.model, test.coords),
               {"epochs": len(r.history), "s": round(time.time() - t0, 1)})  # fmt: skip

    four = lambda n: EncodingConfig("fourier", n_bands=n)  # noqa: E731
    for n in (1, 2, 3, 4, 6, 10):
        run(f"L={n}", four(n))
    for s in (0.5, 1.0, 2.0):
        run(f"sigma={s}", EncodingConfig("gaussian", sigma=s))
    run("L=3 w128", four(3), width=128)
    run("L=3 w512", four(3), width=512)
    run("L=3 d2", four(3), depth=2)
    run("L=3 d6", four(3), depth=6)
    run("L=3 lr5e-3", four(3), lr=5e-3)
    run("L=3 lr5e-4", four(3), lr=5e-4)
    run("L=3 ep150 p20", four(3), epochs=150, patience=20)
    run("L=3 bs64", four(3), bs=64)
    run("L=3 no_rc", four(3), loss="no_rc")
    run("L=3 full", four(3), loss="full")


def explore_inter(
    dataset: str, variants: list[str], hvg: str, seed: int = 100, steps: int = 1000, own_library: bool = False
) -> None:
    """Every variant and baseline on the held-out interior training section of the inter task (see top)."""
    from dataclasses import replace

    from inrscrecon.evaluate.inr import INR_METHODS, _fit, candidates, fold_table, predictive_log1p_mean
    from inrscrecon.evaluate.tasks import EvalConfig, stack_sections, train_config
    from inrscrecon.train.select import best_val

    torch.set_num_threads(1)
    test_name, label_key, spacing = INTER_DATASETS[dataset][1:]
    secs, train_secs = inter_sections(dataset, test_name)
    from inrscrecon.data.preprocess import shared_genes

    genes = select_genes(train_secs, 500, genes=shared_genes(secs), method=hvg)  # genes every section has
    table, _ = stack_sections(secs, genes, spacing, None, label_key)
    table = table.subset(table.section != test_name)  # the test section is dropped before anything is fitted
    from inrscrecon.evaluate.inr import interior_sections

    (held,) = interior_sections(table)
    val = table.section == held
    y_val = table.targets(np.flatnonzero(val))
    if label_key:
        lab = table.labels[label_key][val]
    else:  # k-means domains (k = 5) of the measured expression of the training sections
        lab = M.cluster(table.targets(np.arange(table.n_cells)), 5, "kmeans", seed=0)[val].astype(str)
    cfg = EvalConfig(steps=steps)
    base = {"dataset": dataset, "test_section_unused": test_name, "val_section": held, "hvg": hvg,
            "n_genes": len(genes), "seed": seed}  # fmt: skip

    def report(name: str, pred: np.ndarray, extra: dict) -> None:
        row = {**base, "name": name, "val_rmse": M.rmse(pred, y_val), "val_pearson": M.median_pearson(pred, y_val),
               "val_ari": M.ari(pred, lab, seed=seed), "val_ari_gmm": M.ari(pred, lab, "gmm", seed=seed), **extra}  # fmt: skip
        print(json.dumps(row), flush=True)

    fit_sel = ~val
    tuned = tuning.tuned_baselines(table.coords[fit_sel], table.targets(np.flatnonzero(fit_sel)),
                                   table.section[fit_sel], table.coords[val], y_val, table.coords[val])  # fmt: skip
    for name, t in tuned.items():
        report(name, t.prediction, {"params": t.params})
    print(json.dumps({**base, "name": "true", "val_ari": M.ari(y_val, lab, seed=seed),
                      "val_ari_gmm": M.ari(y_val, lab, "gmm", seed=seed)}), flush=True)  # fmt: skip
    n_fit = int(fit_sel.sum())
    tc = train_config(cfg, n_fit, seed)
    ft, frac = fold_table(table, held, seed)
    for method in variants:
        variant = INR_METHODS[method]
        for cand in candidates(variant, cfg.candidates, None):
            t0 = time.time()
            try:
                res = _fit(
                    ft, cand, cfg.width, cfg.n_layers, variant.loss_config(), replace(tc, val_fraction=frac)
                )
            except Exception as e:  # a variant this build cannot fit: say so and go on
                print(
                    json.dumps({**base, "name": method, "config": cand.name, "error": str(e)[:300]}),
                    flush=True,
                )
                continue
            crit, ep = best_val(res)
            pred = predict(res.model, table.coords[val])  # rows in the order of y_val / lab
            coupled = res.model.library_head is not None and not res.model.cfg.library_detach
            cname = cand.name + (", coupled library head" if coupled else "")
            report(method, pred, {"config": cname, "criterion": crit, "best_epoch": ep,
                                  "epochs": len(res.history), "s": round(time.time() - t0, 1)})  # fmt: skip
            if variant.likelihood != "rmse":  # the same fit, summarised as the predictive mean of log1p
                lt = res.model.log_theta
                theta = None if lt is None else lt.detach().cpu().numpy()
                lib = float(np.median(ft.totals[ft.section != held]))
                report(method + "_mean", predictive_log1p_mean(pred, lib, theta), {"config": cname})
                if getattr(res.model, "library_head", None) is not None:  # E[log1p] at the library field
                    from inrscrecon.field.expectation import expected_log1p

                    measured = expected_log1p(res.model, table.coords[val]).cpu().numpy()
                    report(method + "_measured", measured, {"config": cname})
                    if own_library:  # reference only: a held-out spot's own total is unknown at query time
                        own = expected_log1p(res.model, table.coords[val], table.totals[val]).cpu().numpy()
                        report(method + "_measured", own, {"config": cname + ", own library (oracle)"})


def pca_basis(y: np.ndarray, r_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean [G] and the top ``r_max`` principal axes [G, r_max] of profiles y [N, G] (centred, float64)."""
    mu = y.mean(axis=0, dtype=np.float64)
    _, _, vt = np.linalg.svd(y.astype(np.float64) - mu, full_matrices=False)
    return mu, vt[:r_max].T


def project(pred: np.ndarray, mu: np.ndarray, v: np.ndarray) -> np.ndarray:
    """mean + (pred − mean) · V Vᵀ: predictions [N, G] onto the span of the principal axes v [G, r]."""
    c = pred.astype(np.float64) - mu
    return (mu + (c @ v) @ v.T).astype(np.float32)


def explore_structure(dataset: str, seeds: list[int], ranks: tuple[int, ...] = (4, 8, 16, 32, 64),
                      steps: int = 1000, parts: str = "posthoc,base,rank,genes,small",
                      test: str | None = None, head_ranks: tuple[int, ...] = (8, 16, 32)) -> None:  # fmt: skip
    """Structure shared across genes, on the held-out interior training section (see the top): post-hoc
    projection of every predictor onto the top-r principal axes of the training sections' log1p expression
    (``posthoc``), learned low-rank heads (``rank``), the INR trained on more genes and scored on the 500
    (``genes``: all shared genes up to 2000), smaller / lower-bandwidth fields (``small``), weight decay and a
    lower learning rate (``reg``), and, for reference, a half-INR half-smoother blend (``blend``). ``base``:
    the plain RMSE INR (L = 2, 4 × 256). ``test``: the test section set aside (default DLPFC 151674, breast
    layer2; the other fold: 151675 / layer3), the validation section is then the other interior one."""
    from dataclasses import replace

    from inrscrecon.evaluate.inr import Candidate, _fit, fold_table, interior_sections
    from inrscrecon.evaluate.tasks import EvalConfig, stack_sections, train_config
    from inrscrecon.train.select import best_val

    torch.set_num_threads(1)
    default_test, label_key, spacing = INTER_DATASETS[dataset][1:]
    test_name = test or default_test
    secs, train_secs = inter_sections(dataset, test_name)
    from inrscrecon.data.preprocess import shared_genes

    shared = shared_genes(secs)
    genes = select_genes(train_secs, 500, genes=shared)  # the scored genes (pooled variance, nested in big)
    big = select_genes(train_secs, min(2000, len(shared)), genes=shared)
    big_table, _ = stack_sections(secs, big, spacing, None, label_key)
    big_table = big_table.subset(big_table.section != test_name)  # the test section is never used
    cols = big_table.genes
    idx = np.array([cols.index(g) for g in genes])
    table = replace(big_table, counts=big_table.counts[:, idx].tocsr(), genes=list(genes))
    (held,) = interior_sections(table)
    val = table.section == held
    y_val = table.targets(np.flatnonzero(val))
    y_fit = table.targets(np.flatnonzero(~val))
    lab = table.labels[label_key][val] if label_key else None
    if lab is None:  # k-means domains (k = 5) of the measured expression of the training sections
        lab = M.cluster(table.targets(np.arange(table.n_cells)), 5, "kmeans", seed=0)[val].astype(str)
    mu, axes = pca_basis(y_fit, max(ranks))
    thirds = np.array_split(np.argsort(mu, kind="stable"), 3)  # genes by mean training expression, low → high
    base = {"dataset": dataset, "test_section_unused": test_name, "val_section": held, "n_genes": len(genes),
            "pca_from": "training sections except the validation one"}  # fmt: skip

    def report(name: str, pred: np.ndarray, extra: dict, seed: int = 0) -> None:
        """One row per projection rank (r = 0: the prediction itself)."""
        for r in (0, *ranks) if "posthoc" in parts else (0,):
            p = pred if r == 0 else project(pred, mu, axes[:, :r])
            row = {**base, "name": name, "seed": seed, "projection_rank": r, "val_rmse": M.rmse(p, y_val),
                   "val_pearson": M.median_pearson(p, y_val), "val_ari": M.ari(p, lab, seed=seed),
                   "val_ari_gmm": M.ari(p, lab, "gmm", seed=seed), **extra}  # fmt: skip
            pg = M.pearson_per_gene(p, y_val)  # median Pearson per third of the genes by training mean
            for part, g in zip(("low", "mid", "high"), thirds):
                row[f"val_pearson_{part}_mean"] = float(np.nanmedian(pg[g]))
            print(json.dumps(row), flush=True)

    t0 = time.time()
    tuned = tuning.tuned_baselines(table.coords[~val], y_fit, table.section[~val], table.coords[val], y_val,
                                   table.coords[val], with_linear_z=False)  # fmt: skip
    for name in ("knn", "gaussian"):
        report(name, tuned[name].prediction, {"params": tuned[name].params, "s": round(time.time() - t0, 1)})
    report("true", y_val, {})  # the measured expression and its projection (ARI reference)
    cfg = EvalConfig(steps=steps)
    n_fit = int((~val).sum())

    def inr(name: str, tab, n_bands: int = 2, width: int = 256, rank: int = 0, seed: int = 100,
            lr: float | None = None, wd: float = 0.0, zero_head: bool = False) -> None:  # fmt: skip
        tc = train_config(cfg, n_fit, seed)
        tc = tc if lr is None else replace(tc, lr=lr)
        ft, frac = fold_table(tab, held, seed)
        cand = Candidate(EncodingConfig("fourier", n_bands=n_bands), {"head_rank": rank} if rank else {})
        t1 = time.time()
        adam = torch.optim.Adam
        if wd:  # decoupled (AdamW-style) weight decay on every parameter

            class DecayedAdam(adam):  # type: ignore[misc, valid-type]
                def __init__(self, params, **kw):
                    super().__init__(params, weight_decay=wd, decoupled_weight_decay=True, **kw)

            torch.optim.Adam = DecayedAdam  # type: ignore[misc]
        from inrscrecon.field.model import INRField

        init_bias = INRField.init_head_bias
        if zero_head:  # the field starts exactly at the mean profile: no random per-gene spatial pattern

            def zeroed(self, mean_expr):
                init_bias(self, mean_expr)
                with torch.no_grad():
                    self.head.weight.zero_()

            INRField.init_head_bias = zeroed  # type: ignore[method-assign]
        try:
            res = _fit(ft, cand, width, cfg.n_layers, LossConfig(), replace(tc, val_fraction=frac))
        finally:
            torch.optim.Adam = adam  # type: ignore[misc]
            INRField.init_head_bias = init_bias  # type: ignore[method-assign]
        crit, ep = best_val(res)
        pred = predict(res.model, table.coords[val])
        if pred.shape[1] != len(genes):  # trained on more genes: score the 500
            pred = pred[:, idx]
        extra = (f", lr={tc.lr:g}" if lr is not None else "") + (f", weight_decay={wd:g}" if wd else "")
        extra += ", zero-initialised head" if zero_head else ""
        report(name, pred, {"config": f"fourier L={n_bands}, width={width}, head_rank={rank}, "
                                      f"genes={len(tab.genes)}{extra}", "criterion": crit, "best_epoch": ep,
                            "epochs": len(res.history), "s": round(time.time() - t1, 1)}, seed)  # fmt: skip
        if "blend" in parts and name == "inr_rmse":  # a hybrid, for reference: half INR, half smoother
            blend = 0.5 * pred + 0.5 * tuned["gaussian"].prediction
            report(
                "inr_rmse+gaussian", blend, {"config": "0.5 INR (fourier L=2) + 0.5 Gaussian smoother"}, seed
            )

    for seed in seeds:
        if "base" in parts or "blend" in parts:
            inr("inr_rmse", table, seed=seed)
        if "rank" in parts:
            for r in head_ranks:
                inr("inr_rmse_rank", table, rank=r, seed=seed)
        if "genes" in parts:
            inr("inr_rmse_genes", big_table, seed=seed)
            if "rank" in parts:
                inr("inr_rmse_genes_rank", big_table, rank=16, seed=seed)
        if "small" in parts:
            inr("inr_rmse_small", table, n_bands=1, seed=seed)
            inr("inr_rmse_small", table, width=64, seed=seed)
        if "reg" in parts:
            for wd in (0.01, 0.1):
                inr("inr_rmse_reg", table, seed=seed, wd=wd)
            inr("inr_rmse_reg", table, seed=seed, lr=5e-4)
            inr("inr_rmse_reg", table, seed=seed, lr=5e-4, rank=16)
        if "zero" in parts:
            inr("inr_rmse_zero", table, seed=seed, zero_head=True)
            inr("inr_rmse_zero", table, seed=seed, zero_head=True, lr=5e-4)
            inr("inr_rmse_zero", table, seed=seed, zero_head=True, rank=32)


def structure_summary(paths: list[str]) -> str:
    """Markdown table of ``--structure`` rows: mean ± s.d. over seeds per (dataset, method, configuration,
    projection rank)."""
    groups: dict[tuple, list[dict]] = {}
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            cfg = r.get("config", str(r.get("params", "")))
            key = (r["dataset"] + " " + r["val_section"], r["name"], cfg, r["projection_rank"])
            groups.setdefault(key, []).append(r)
    out = ["| dataset | method | configuration | PCA r | seeds | val Pearson | val RMSE | val ARI k-means | val ARI GMM "
           "| Pearson by gene mean: low / mid / high third |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (ds, name, cfg, r), rows in groups.items():

        def ms(k: str, rows: list[dict] = rows) -> str:
            v = np.array([x[k] for x in rows], dtype=float)
            return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v[0]:.4f}"

        cells = " | ".join(ms(k) for k in ("val_pearson", "val_rmse", "val_ari", "val_ari_gmm"))
        keys = [f"val_pearson_{p}_mean" for p in ("low", "mid", "high")]
        thirds = (
            " / ".join(f"{np.mean([x[k] for x in rows]):.3f}" for k in keys) if keys[0] in rows[0] else ""
        )
        out.append(f"| {ds} | {name} | {cfg} | {r or '–'} | {len(rows)} | {cells} | {thirds} |")
    return "\n".join(out)


LABELS = {"mean_profile": "mean profile", "knn": "k-NN (tuned k)", "gaussian": "Gaussian smoother (tuned h)",
          "linear_z": "linear-z (tuned k)", "true": "measured expression (ARI reference)"}  # fmt: skip


def table(paths: list[str]) -> str:
    """Markdown table of explore_*.jsonl rows (validation section only)."""
    from inrscrecon.evaluate.report import method_label

    out = ["| file | method | configuration | val RMSE | val Pearson | val ARI k-means | val ARI GMM | best epoch | s |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    f = lambda r, k: f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, ""))  # noqa: E731
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            name = LABELS.get(r["name"]) or method_label(r["name"])
            cfg = r.get("config", "") if "error" not in r else "error: " + r["error"][:60]
            cells = [
                f(r, k) for k in ("val_rmse", "val_pearson", "val_ari", "val_ari_gmm", "best_epoch", "s")
            ]
            out.append(f"| {Path(path).name} | {name} | {cfg} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inter", choices=["dlpfc", "breast"])
    ap.add_argument("--sweep", choices=["intra_151673"])
    ap.add_argument(
        "--variants", default="inr_rmse,inr_poisson,inr_nb,inr_zstretch,inr_codes,inr_hashgrid,inr_rank"
    )
    ap.add_argument("--hvg", choices=["pooled", "batch"], default="pooled")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--own-library", action="store_true",
                    help="also the measured-scale rows at the validation spots' own library sizes (oracle)")  # fmt: skip
    ap.add_argument("--library-coupled", action="store_true",
                    help="count models' library-size head trains the trunk too (not detached)")  # fmt: skip
    ap.add_argument("--structure", choices=["dlpfc", "breast"],
                    help="structure shared across genes: PCA projection, low-rank heads, more genes")  # fmt: skip
    ap.add_argument("--seeds", default="100,101", help="--structure: INR seeds")
    ap.add_argument("--head-ranks", default="8,16,32", help="--structure: low-rank heads tried (part rank)")
    ap.add_argument(
        "--test-section", help="--structure: the test section set aside (151675 / layer3: other fold)"
    )
    ap.add_argument("--parts", default="posthoc,base,rank,genes,small",
                    help="--structure: posthoc, base, blend, rank, genes, small, reg")  # fmt: skip
    ap.add_argument("--table", nargs="+", help="print explore_*.jsonl files as one markdown table")
    ap.add_argument("--summary", nargs="+", help="print --structure jsonl files as mean ± s.d. over seeds")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
    elif args.summary:
        print(structure_summary(args.summary))
    elif args.structure:
        seeds = [int(v) for v in args.seeds.split(",")]
        ranks = tuple(int(v) for v in args.head_ranks.split(","))
        explore_structure(args.structure, seeds, parts=args.parts, test=args.test_section, head_ranks=ranks)
    elif args.sweep:
        sweep_intra_151673()
    else:
        if args.library_coupled:
            import inrscrecon.train.fit as fit_mod

            fit_mod.LIBRARY_DETACH = False
        variants = [v for v in args.variants.split(",") if v]
        explore_inter(args.inter or "dlpfc", variants, args.hvg, args.seed, own_library=args.own_library)


if __name__ == "__main__":
    main()
