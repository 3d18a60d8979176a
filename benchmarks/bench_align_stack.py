"""Global vs chained poses on a synthetic 12-section stack: position error against the index of the section.

Twelve consecutive 10 µm sections of a synthetic tissue (400 cells each, random rotations and translations;
the first 12 of a 161-section block, so the tissue itself barely drifts across them and the error left is the
alignment's), aligned into section 0's frame with ``--poses chained`` and ``--poses global`` (pose graph over
pairs up to 3 apart). Prints the RMS position error (µm) of every section, averaged over seeds, and writes a
figure.

    OMP_NUM_THREADS=1 python benchmarks/bench_align_stack.py [--seeds 3] [--cells 400] [--png docs/align_stack.png]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
N = 12


def stack(seed: int, cells: int):
    from inrscrecon.data.synthetic import SynthConfig, iter_sections

    cfg = SynthConfig(n_sections=161, spacing=10.0, cells_per_section=cells, n_genes=150, seed=seed)
    recs = list(itertools.islice(iter_sections(cfg), N))
    return [r[0] for r in recs], [r[1] for r in recs]


def errors(res, recs) -> np.ndarray:
    """RMS distance (µm) per section between aligned and true positions, in section 0's observed frame."""
    from inrscrecon.align.kabsch import Pose

    p0 = Pose(recs[0]["rotation"], recs[0]["translation"], recs[0]["reflected"]).inverse()
    sec = res.aligned.obs["section"].astype(str).to_numpy()
    out = []
    for r in recs:
        true = p0.apply(r["xy"])
        est = res.aligned.obsm["spatial_3d"][sec == r["name"], :2]
        out.append(float(np.sqrt(((est - true) ** 2).sum(axis=1).mean())))
    return np.array(out)


def main() -> None:
    from inrscrecon.align import align

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cells", type=int, default=400)
    ap.add_argument("--png", default=str(REPO / "docs" / "align_stack.png"))
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} (2-core machine, shared)")
    err = {"chained": [], "global": []}
    secs = {"chained": 0.0, "global": 0.0}
    for seed in range(args.seeds):
        sections, recs = stack(seed, args.cells)
        for mode in err:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = align(sections, spacing=10.0, seed=seed, poses=mode, accept_low_confidence=True)
            secs[mode] += time.perf_counter() - t0
            err[mode].append(errors(res, recs))
            print(f"seed {seed} {mode:7s} " + " ".join(f"{e:5.1f}" for e in err[mode][-1]), flush=True)
    mean = {m: np.mean(v, axis=0) for m, v in err.items()}
    print("\n| section | " + " | ".join(str(k) for k in range(1, N)) + " |")
    print("|---|" + "---|" * (N - 1))
    for m in err:
        print(f"| {m} (µm) | " + " | ".join(f"{e:.1f}" for e in mean[m][1:]) + " |")
    first = mean["chained"][1]
    for m in err:
        print(
            f"{m}: last section {mean[m][-1]:.1f} µm = {mean[m][-1] / first:.2f}× the first pair's "
            f"({first:.1f} µm, chained); mean over sections {mean[m][1:].mean():.1f} µm; "
            f"{secs[m] / args.seeds:.0f} s per stack"
        )
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        for m, style in (("chained", "o-"), ("global", "s-")):
            ax.plot(range(1, N), mean[m][1:], style, label=m)
        ax.set_xlabel("section index (0 = reference)")
        ax.set_ylabel("RMS position error (µm)")
        ax.set_title(f"12-section synthetic stack, mean of {args.seeds} seeds", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
