"""z_stretch × section codes on DLPFC, inter-slice (bounded; not part of CI).

Aligns DLPFC 151673–151676 once (cached under ``--cache``), then for each held-out section (151674, 151675)
fits one field per (z_stretch, section_code_dim) of the grid and scores the held-out section: RMSE, median
per-gene Pearson and k-means ARI against the layer labels, beside the fit's own validation RMSE (random
cells of the training sections). Held-out numbers are reported for information only: a default must be chosen
on validation (leave-one-section-out among the training sections; ``evaluate`` does that).

    OMP_NUM_THREADS=1 python benchmarks/bench_frame_codes.py --genes 500 --epochs 20 --out frame_codes.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from inrscrecon.data.stack import CellTable  # noqa: E402

DATA = Path(os.environ.get("INRSCRECON_DATA", REPO.parent / "shared" / "data"))
DLPFC = [f"dlpfc_{s}.h5ad" for s in (151673, 151674, 151675, 151676)]


def aligned_table(n_genes: int, cache: Path) -> tuple[CellTable, np.ndarray]:
    """The aligned DLPFC stack on the top ``n_genes`` shared genes and its layer labels (cached as .npz)."""
    import scipy.sparse as sp

    path = cache / f"dlpfc_aligned_{n_genes}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=True)
        counts = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        t = CellTable(
            z["coords"], counts, z["totals"], list(z["genes"]), z["section"], z["obs_names"], float(z["ts"])
        )
        return t, z["labels"]
    from inrscrecon.data.io import read_sections
    from inrscrecon.evaluate.tasks import EvalConfig, prepare

    sections = read_sections([DATA / f for f in DLPFC])
    prep = prepare(sections, "layer", cfg=EvalConfig(n_genes=n_genes))
    t = prep.table
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        data=t.counts.data,
        indices=t.counts.indices,
        indptr=t.counts.indptr,
        shape=np.array(t.counts.shape),
        coords=t.coords,
        totals=t.totals,
        genes=np.array(t.genes, dtype=object),
        section=t.section,
        obs_names=t.obs_names,
        ts=t.target_sum,
        labels=prep.labels,
    )
    return t, prep.labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genes", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--bands", type=int, default=4)
    ap.add_argument("--stretch", default="1,4,16")
    ap.add_argument("--codes", default="0,4")
    ap.add_argument("--holdout", default="151674,151675")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/inrscrecon_bench_cache"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from inrscrecon.evaluate.metrics import ari, median_pearson, rmse
    from inrscrecon.field.encoding import EncodingConfig
    from inrscrecon.field.model import InterpolatedCodesWarning
    from inrscrecon.query.predict import predict
    from inrscrecon.train.fit import TrainConfig, fit

    t0 = time.time()
    table, labels = aligned_table(args.genes, args.cache)
    print(f"stack: {table.n_cells} cells, {len(table.genes)} genes ({time.time() - t0:.0f} s)", flush=True)
    names = table.sections()
    for held in args.holdout.split(","):
        name = next(n for n in names if held in n)
        test = table.section == name
        train = table.subset(np.flatnonzero(~test))
        rows = np.flatnonzero(test)
        truth = table.targets(rows)
        for zs in (float(s) for s in args.stretch.split(",")):
            for dim in (int(d) for d in args.codes.split(",")):
                t1 = time.time()
                tc = TrainConfig(epochs=args.epochs, patience=args.epochs, seed=args.seed, progress=False)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", InterpolatedCodesWarning)
                    res = fit(
                        train,
                        EncodingConfig(n_bands=args.bands, seed=args.seed),
                        args.width,
                        args.layers,
                        None,
                        tc,
                        z_stretch=zs,
                        section_code_dim=dim,
                    )
                    pred = predict(res.model, table.coords[rows])
                rec = {
                    "holdout": name,
                    "z_stretch": zs,
                    "section_code_dim": dim,
                    "val_rmse": min(h["val_rmse"] for h in res.history),
                    "rmse": rmse(pred, truth),
                    "median_pearson": median_pearson(pred, truth),
                    "ari_kmeans": ari(pred, labels[rows], "kmeans", seed=args.seed),
                    "epochs": len(res.history),
                    "seconds": round(time.time() - t1, 1),
                    "genes": len(table.genes),
                    "width": args.width,
                    "layers": args.layers,
                    "bands": args.bands,
                    "seed": args.seed,
                }
                print(json.dumps(rec), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
