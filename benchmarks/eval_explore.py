"""The INR configuration sweep behind the evaluation defaults (issue 5): DLPFC 151673 intra-slice, split
seed 100 (not one of the evaluation seeds), 500 genes. Choices are read off the *validation* columns; test
columns are printed for information only. Output: one JSON line per configuration (benchmarks/results/
explore_151673.jsonl was made with the settings below on a shared 2-core CPU, ``torch.set_num_threads(1)``).

    python benchmarks/eval_explore.py > benchmarks/results/explore_151673.jsonl
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


def main() -> None:
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


if __name__ == "__main__":
    main()
