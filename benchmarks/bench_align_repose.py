"""Re-pose precision of ``align`` on every shared section (issue protocol, full-size sections).

For each section and two cases (no flip, flip): keep 80 % of the spots, thin counts binomially (p = 0.5) or
perturb normalised values multiplicatively, jitter positions by 0.2 % of the extent, rotate by a random angle in
[0, 360°), translate by up to two extents; align the copy onto the original with reflection allowed and report
the median distance of true correspondences as a percentage of the extent (jitter floor ≈ 0.24 %), with the
wall time of the pair. ``before`` is the pipeline without the one-to-one snap (``snap_min_mutual > 1``).

    OMP_NUM_THREADS=1 python benchmarks/bench_align_repose.py [--data DIR] [--cases 2] [--configs before,after]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("INRSCRECON_DATA", REPO.parent / "shared" / "data"))
SECTIONS = [
    "merfish_hypothalamus_bregma0.26",
    "merfish_hypothalamus_bregma0.21",
    "dlpfc_151673",
    "dlpfc_151674",
    "dlpfc_151675",
    "dlpfc_151676",
    "paste_bc_layer1",
    "paste_bc_layer2",
    "paste_bc_layer3",
    "paste_bc_layer4",
]
CONFIGS = {"before": {"snap_min_mutual": 2.0}, "after": {}}


def main() -> None:
    import anndata as ad

    from inrscrecon.align import AlignConfig, align
    from inrscrecon.align.repose import repose_case, repose_residual

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--configs", default="before,after")
    args = ap.parse_args()
    configs = args.configs.split(",")
    print(f"load average {os.getloadavg()[0]:.1f} (2-core machine, shared)")
    print("| section | n | case | " + " | ".join(f"{c} (% extent) | {c} s" for c in configs) + " |")
    print("|---|---|---|" + "---|---|" * len(configs))
    worst = {c: 0.0 for c in configs}
    for i, name in enumerate(SECTIONS):
        adata = ad.read_h5ad(args.data / f"{name}.h5ad")
        adata.uns["section"] = name
        for case_k in range(args.cases):
            flip = case_k % 2 == 1
            case = repose_case(adata, np.random.default_rng(1000 * i + case_k), flip=flip)
            cells = []
            for c in configs:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = align(
                        [case.original, case.moved],
                        spacing=10.0,
                        allow_reflection=True,
                        seed=0,
                        config=AlignConfig(**CONFIGS[c]),
                    )
                seconds = time.perf_counter() - t0
                r = 100 * repose_residual(case, res.transforms)
                worst[c] = max(worst[c], r)
                cells.append(f"{r:.2f} | {seconds:.1f}")
            label = "flip" if flip else "no flip"
            print(f"| {name} | {case.original.n_obs} | {label} | " + " | ".join(cells) + " |", flush=True)
    print("worst median residual: " + ", ".join(f"{c} {w:.2f} %" for c, w in worst.items()))
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
