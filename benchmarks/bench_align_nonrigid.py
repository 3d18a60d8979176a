"""Non-rigid alignment on known warps: error of true correspondences after the rigid step and after ``--nonrigid``.

Each case is a pair of patchy synthetic sections (``inrscrecon.align.warpcase``): the moving one deformed by a
smooth warp (wavelengths 1–2 section diameters, largest displacement ``--amplitude`` µm) and a rigid motion.
It prints, per seed, the median distance between each moving cell's aligned position and its true position
(rigid only, rigid + non-rigid), their ratio, the chosen bending weights, the held-out gain and wall times;
``--amplitude 0`` measures what the step invents where there is nothing to find. DLPFC layer agreement with
and without the step: ``python benchmarks/bench_align_dlpfc.py --methods ours,nonrigid``.

    python benchmarks/bench_align_nonrigid.py [--seeds 6] [--cells 1500] [--amplitude 40]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def main() -> int:
    from inrscrecon.align import align
    from inrscrecon.align.warpcase import warp_case

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--cells", type=int, default=1500)
    p.add_argument("--amplitude", type=float, default=40.0, help="largest displacement of the warp, µm")
    args = p.parse_args()
    print(
        "| seed | spacing µm | rigid median µm | non-rigid median µm | ratio | λ (fwd, back) | gain | s rigid / nonrigid |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for seed in range(args.seeds):
        case = warp_case(seed, cells=args.cells, amplitude_um=args.amplitude)
        err, sec_s = {}, {}
        for nonrigid in (False, True):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = align([case.fixed, case.moving], spacing=10.0, seed=seed, nonrigid=nonrigid)
            sec_s[nonrigid] = time.perf_counter() - t0
            sec = res.aligned.obs["section"].astype(str).to_numpy()
            xy = res.aligned.obsm["spatial_aligned"][sec == "moving"]
            err[nonrigid] = float(np.median(np.hypot(*(xy - case.true_xy).T)))
        info = res.fields["moving"].info
        ratios.append(err[False] / max(err[True], 1e-9))
        print(
            f"| {seed} | {case.spacing:.1f} | {err[False]:.2f} | {err[True]:.2f} | {ratios[-1]:.1f} | "
            f"{info['lambda']:g}, {info.get('lambda_back', float('nan')):g} | {info['held_out_gain']:.3f}"
            f"{'' if info['kept'] else ' (not kept)'} | {sec_s[False]:.1f} / {sec_s[True]:.1f} |",
            flush=True,
        )
    print(f"\nratio rigid / non-rigid: min {min(ratios):.1f}, median {np.median(ratios):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
