"""Calibration of the count-scale predictive intervals (``--uncertainty``) on DLPFC; not part of CI.

Tasks (one seed by default): **inter** — align 151673–151676 into 3D, hold out 151674, train on the rest;
**intra** — drop a seeded 50 % of 151673's spots, train on the rest (that section alone). The top 500
variable shared genes (``evaluate.prepare``). Each model: Fourier L = 2, 4 × 256, ~1000 steps of batch 64,
one thread. For every model and dispersion source, on the held-out spots (count scale, each spot's own
library size): coverage of the 90 % interval pooled over spot × gene, and the per-gene coverage (median,
10–90 % range) — by the randomized rule the end points are built for (expected coverage of y + U(−½, ½),
:func:`inrscrecon.query.uncertainty.coverage_fraction`), and, for comparison, by the end points read as
integer bounds (mid-p) and by plain integer quantiles.

Models: ``rmse`` (the fit default) with the post-hoc validation calibration (what ``fit`` stores); ``nb``
(``--loss nb``) with its own θ and with the calibration; ``poisson`` with Poisson(μ) and with the calibration.
Count losses are skipped (said so) where this version's fit does not offer them.

Usage::

    python benchmarks/eval_calibration.py                     # → benchmarks/results/calibration.json
    python benchmarks/eval_calibration.py --tasks intra --models rmse --steps 300   # quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inrscrecon.data.io import read_sections  # noqa: E402
from inrscrecon.errors import InputError  # noqa: E402
from inrscrecon.evaluate.tasks import (  # noqa: E402
    EvalConfig,
    inter_splits,
    intra_splits,
    prepare,
    train_config,
)
from inrscrecon.field.encoding import EncodingConfig  # noqa: E402
from inrscrecon.field.losses import LossConfig  # noqa: E402
from inrscrecon.query import uncertainty as unc  # noqa: E402
from inrscrecon.query.predict import predict  # noqa: E402
from inrscrecon.train.fit import _split, fit  # noqa: E402

DATA = Path(os.environ.get("INRSCRECON_DATA", REPO.parent / "shared" / "data"))
DLPFC = [f"dlpfc_{s}.h5ad" for s in (151673, 151674, 151675, 151676)]
OUT = REPO / "benchmarks" / "results" / "calibration.json"


def coverage_table(
    y: np.ndarray, mu: np.ndarray, log_theta: np.ndarray | None, level: float
) -> dict[str, float]:
    """Coverage of the ``level`` interval: pooled and per gene (median, 10 %, 90 %) for the randomized rule,
    pooled for the mid-p reading and for plain quantiles; mean width in counts."""
    lo, hi = unc.interval_counts(mu, log_theta, level)
    frac = unc.coverage_fraction(y, lo, hi)
    per_gene = frac.mean(axis=0)
    plo, phi = unc.plain_interval_counts(mu, log_theta, level)
    jitter = y + np.random.default_rng(0).uniform(size=y.shape) - 0.5  # one draw of the randomized rule
    return {
        "pooled": float(frac.mean()),
        "pooled_one_draw": float(((lo <= jitter) & (jitter <= hi)).mean()),
        "per_gene_median": float(np.median(per_gene)),
        "per_gene_p10": float(np.percentile(per_gene, 10)),
        "per_gene_p90": float(np.percentile(per_gene, 90)),
        "pooled_midp": float(((lo <= y) & (y <= hi)).mean()),
        "pooled_plain": float(((plo <= y) & (y <= phi)).mean()),
        "mean_width_counts": float((hi - lo).mean()),
    }


def evaluate_split(split, cfg: EvalConfig, model_kind: str, steps: int, level: float) -> list[dict]:
    """Fit one model on the split's training cells; rows of coverage per dispersion source."""
    tc = train_config(cfg, split.train.n_cells, split.seed)
    tc.progress = False
    loss = LossConfig(lambda_rc=0.0, lambda_kl=0.0, likelihood=model_kind)
    t0 = time.time()
    res = fit(split.train, EncodingConfig(n_bands=2), cfg.width, cfg.n_layers, loss, tc)
    fit_s = time.time() - t0
    model = res.model
    val_rows = _split(split.train.n_cells, tc.val_fraction, tc.seed)[1]
    t0 = time.time()
    model.training_record["uncertainty"] = unc.calibration_record(model, split.train, val_rows, tc.seed)
    cal_s = time.time() - t0
    test = split.test
    y = test.raw_targets(np.arange(test.n_cells)).astype(np.float64)
    pred = predict(model, test.coords)
    sources = ["calibration"] + (["model"] if model_kind != "rmse" else [])
    rows = []
    for source in sources:
        dist = unc.predictive(model, source)
        mu = dist.mean(pred, test.totals)
        t0 = time.time()
        table = coverage_table(y, mu, dist.log_theta if dist.kind == "nb" else None, level)
        rows.append(
            {
                "task": split.task,
                "held_out": split.name,
                "seed": split.seed,
                "model": model_kind,
                "dispersion": source,
                "default": source == ("model" if model_kind == "nb" else "calibration"),
                "distribution": dist.kind,
                "n_spots": int(test.n_cells),
                "n_genes": int(y.shape[1]),
                "epochs": len(res.history),
                "fit_s": round(fit_s, 1),
                "calibration_s": round(cal_s, 2),
                "interval_s": round(time.time() - t0, 2),
                "median_theta": float(np.median(np.exp(dist.log_theta)))
                if dist.log_theta is not None
                else None,
                **table,
            }
        )
        print(
            f"{split.task:5s} {split.name:8s} seed {split.seed} {model_kind:7s} {source:11s} "
            f"pooled {table['pooled']:.4f}  per-gene median {table['per_gene_median']:.4f} "
            f"[{table['per_gene_p10']:.4f}, {table['per_gene_p90']:.4f}]  mid-p {table['pooled_midp']:.4f}  "
            f"plain {table['pooled_plain']:.4f}  (fit {fit_s:.0f} s)",
            flush=True,
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of the coverage rows."""
    head = (
        "| task | held out | model | dispersion | pooled | per-gene median | per-gene 10–90 % | "
        "mid-p (integer bounds) | plain quantiles |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['task']} | {r['held_out']} | {r['model']} | {r['dispersion']} | {r['pooled']:.3f} | "
        f"{r['per_gene_median']:.3f} | {r['per_gene_p10']:.3f}–{r['per_gene_p90']:.3f} | "
        f"{r['pooled_midp']:.3f} | {r['pooled_plain']:.3f} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def summarise(rows: list[dict]) -> str:
    """Markdown table over seeds: mean ± s.d. per (task, model, dispersion)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["held_out"], r["model"], r["dispersion"]), []).append(r)

    def ms(rs: list[dict], key: str) -> str:
        v = np.array([r[key] for r in rs])
        return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    head = (
        "| task | held out | model | dispersion | seeds | pooled | per-gene median | per-gene 10 % | "
        "per-gene 90 % | mid-p (integer bounds) | plain quantiles |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {t} | {h} | {m} | {d} | {len(rs)} | {ms(rs, 'pooled')} | {ms(rs, 'per_gene_median')} | "
        f"{ms(rs, 'per_gene_p10')} | {ms(rs, 'per_gene_p90')} | {ms(rs, 'pooled_midp')} | "
        f"{ms(rs, 'pooled_plain')} |"
        for (t, h, m, d), rs in groups.items()
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="inter,intra", help="comma-separated: inter, intra")
    ap.add_argument("--models", default="rmse,nb,poisson", help="comma-separated losses: rmse, nb, poisson")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--level", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--summarise", metavar="JSON", help="print the seed summary of an earlier run and stop")
    args = ap.parse_args(argv)
    if args.summarise:
        print(summarise(json.loads(Path(args.summarise).read_text())["rows"]))
        return 0
    torch.set_num_threads(args.threads)
    missing = [f for f in DLPFC if not (DATA / f).exists()]
    if missing:
        raise SystemExit(f"data not found: {DATA / missing[0]} (set INRSCRECON_DATA)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    cfg = EvalConfig(n_genes=500, steps=args.steps, batch_size=64)
    t0 = time.time()
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    sections = read_sections([DATA / f for f in DLPFC])
    seeds = list(range(args.seeds))
    splits = []
    if "inter" in tasks:
        prep = prepare(sections, "layer", None, None, cfg)
        print(f"inter: {prep.table.n_cells} cells, {len(prep.genes)} genes (aligned)", flush=True)
        splits += inter_splits(prep.table, prep.labels, ["151674"], seeds)
    if "intra" in tasks:
        one = [s for s in sections if str(s.uns.get("section")) == "151673"]
        prep1 = prepare(one, "layer", None, None, cfg)
        print(f"intra: {prep1.table.n_cells} cells, {len(prep1.genes)} genes", flush=True)
        splits += intra_splits(prep1.table, prep1.labels, ["151673"], seeds, cfg.drop_fraction)
    for split in splits:
        for kind in models:
            try:
                rows += evaluate_split(split, cfg, kind, args.steps, args.level)
            except (InputError, TypeError, NotImplementedError) as exc:
                skipped[kind] = f"{type(exc).__name__}: {exc}"
                print(f"skipped {kind}: {skipped[kind]}", flush=True)
    table = format_table(rows)
    print(table)
    summary = summarise(rows) if rows else ""
    print(summary)
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores, torch threads {args.threads}",
        "level": args.level,
        "steps": args.steps,
        "batch_size": 64,
        "genes": "top 500 variable shared genes",
        "coverage_rule": "expected coverage of y + U(-1/2, 1/2) by the interval (randomized rule); mid-p: "
        "the end points read as integer bounds; plain: integer quantiles",
        "rows": rows,
        "skipped": skipped,
        "wall_s": round(time.time() - t0, 1),
        "table_md": table,
        "summary_md": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
