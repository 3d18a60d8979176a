"""DLPFC alignment benchmark: ours vs centroid-only vs PASTE, sections as given and perturbed.

For each consecutive pair (151673-74, 74-75, 75-76) and each mode — ``given`` (as in the files) and
``perturbed`` (the second section rotated by a random angle about its centroid, flipped and translated) — it
prints the layer agreement (fraction of spots whose nearest spot in the other section has the same
``obs['layer']``, mean of both directions, 'unknown' excluded — PASTE's accuracy measure for that matching with
equal mass per spot), its ceiling from layer composition, wall time and peak RSS of each method. Every run
is its own subprocess so that peak RSS is per run. PASTE (``pip install paste-bio==1.4.0 pot==0.9.4``, the
``bench`` extra) runs with its defaults; it is skipped with a note when not installed. ``nonrigid`` is ours
with ``--nonrigid`` (rigid poses, then a smooth displacement field per section).

    python benchmarks/bench_align_dlpfc.py [--data DIR] [--methods ours,nonrigid,centroid,paste] [--png ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("INRSCRECON_DATA", REPO.parent / "shared" / "data"))
IDS = ["151673", "151674", "151675", "151676"]


def load_pair(data: Path, k: int, mode: str):
    import anndata as ad

    from inrscrecon.align.kabsch import rotation

    a = ad.read_h5ad(data / f"dlpfc_{IDS[k]}.h5ad")
    b = ad.read_h5ad(data / f"dlpfc_{IDS[k + 1]}.h5ad")
    a.uns["section"], b.uns["section"] = IDS[k], IDS[k + 1]
    if mode == "perturbed":
        rng = np.random.default_rng(k)  # same perturbation as tests/test_align_realdata.py
        xy = b.obsm["spatial"]
        c = xy.mean(axis=0)
        moved = (xy - c) @ rotation(rng.uniform(0, 2 * np.pi)).T
        moved[:, 1] *= -1
        b.obsm["spatial"] = moved + c + rng.uniform(-3000, 3000, size=2)
    return a, b


def run_one(method: str, data: Path, k: int, mode: str, png: str | None) -> dict:
    """Align one pair with one method in this process; returns the result record."""
    from inrscrecon.align.metrics import centroid_only, composition_ceiling, layer_agreement

    a, b = load_pair(data, k, mode)
    la, lb = a.obs["layer"].astype(str).to_numpy(), b.obs["layer"].astype(str).to_numpy()
    t0 = time.perf_counter()
    if method in ("ours", "nonrigid"):
        from inrscrecon.align import align

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = align(
                [a, b],
                spacing=10.0,
                allow_reflection=mode == "perturbed",
                seed=0,
                nonrigid=method == "nonrigid",
            )
        xyz = res.aligned.obsm["spatial_3d"]
        sec = res.aligned.obs["section"].astype(str).to_numpy()
        xa, xb = xyz[sec == IDS[k], :2], xyz[sec == IDS[k + 1], :2]
        if png:
            res.plot_pairs(Path(png).parent / "_pairs")
            (Path(png).parent / "_pairs" / f"pair_{IDS[k + 1]}__{IDS[k]}.png").replace(png)
            (Path(png).parent / "_pairs").rmdir()
    elif method == "centroid":
        xa, xb = centroid_only(a.obsm["spatial"]), centroid_only(b.obsm["spatial"])
    elif method == "paste":
        import paste as pst

        pi = pst.pairwise_align(a, b)
        out = pst.stack_slices_pairwise([a, b], [pi])
        xa, xb = out[0].obsm["spatial"], out[1].obsm["spatial"]
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - t0
    return {
        "method": method,
        "pair": f"{IDS[k]}-{IDS[k + 1]}",
        "mode": mode,
        "agreement": layer_agreement(xa, la, xb, lb),
        "ceiling": composition_ceiling(la, lb),
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--methods", default="ours,centroid,paste")
    p.add_argument(
        "--png", default=str(REPO / "docs" / "align_pair.png"), help="overlay of one perturbed pair"
    )
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "PAIR", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        method, k, mode = args.worker[0], int(args.worker[1]), args.worker[2]
        png = args.png if (method, k, mode) == ("ours", 0, "perturbed") and args.png else None
        print("RESULT " + json.dumps(run_one(method, args.data, k, mode, png)))
        return 0
    if not (args.data / f"dlpfc_{IDS[0]}.h5ad").exists():
        print(f"DLPFC data not found in {args.data}; set INRSCRECON_DATA or --data")
        return 1
    methods = args.methods.split(",")
    if "paste" in methods:
        try:
            import paste  # noqa: F401
        except ImportError:
            print("PASTE not installed (pip install paste-bio==1.4.0 pot==0.9.4): skipping it")
            methods.remove("paste")
    rows = []
    for k in range(3):
        for mode in ("given", "perturbed"):
            for method in methods:
                cmd = [sys.executable, __file__, "--data", str(args.data), "--png", args.png]
                proc = subprocess.run(
                    cmd + ["--worker", method, str(k), mode], capture_output=True, text=True
                )
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(f"{method} {IDS[k]}-{IDS[k + 1]} {mode} failed:\n{proc.stderr[-2000:]}")
                    continue
                r = json.loads(line[0][7:])
                rows.append(r)
                print(
                    f"{r['pair']:14s} {r['mode']:9s} {r['method']:9s} agreement {r['agreement']:.3f}  "
                    f"{r['seconds']:7.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB",
                    flush=True,
                )
    print(
        "\nlayer agreement = PASTE's accuracy for nearest-spot matching, both directions, equal mass per spot"
    )
    print("| pair | mode | ceiling (layer composition) | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for k in range(3):
        for mode in ("given", "perturbed"):
            cells = []
            for m in methods:
                r = next(
                    (
                        r
                        for r in rows
                        if r["pair"] == f"{IDS[k]}-{IDS[k + 1]}" and r["mode"] == mode and r["method"] == m
                    ),
                    None,
                )
                cells.append(
                    "—"
                    if r is None
                    else f"{r['agreement']:.3f} ({r['seconds']:.1f} s, {r['peak_rss_mb']:.0f} MB)"
                )
            ceiling = next(
                (r["ceiling"] for r in rows if r["pair"] == f"{IDS[k]}-{IDS[k + 1]}"), float("nan")
            )
            print(f"| {IDS[k]}-{IDS[k + 1]} | {mode} | {ceiling:.3f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
