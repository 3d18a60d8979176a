"""Alignment speed and memory vs section size: synthetic pairs of 10k, 30k, 100k, 300k cells per section.

Each size runs in its own subprocess: it generates the pair (200 genes, random cell positions, random rotation
and translation), then aligns it while a thread samples the process RSS every 20 ms. Printed per size: wall
time of ``align``, RSS before ``align`` (input data), peak RSS during ``align`` and the increment, pose errors.
Target: the 100k-cell pair in ≤ 30 s on 2 cores; peak RSS growing linearly with N.

    python benchmarks/bench_align_speed.py [--sizes 10000,30000,100000,300000] [--genes 200]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import psutil


def run_one(n: int, genes: int, seed: int) -> dict:
    from inrscrecon.align import align
    from inrscrecon.align.kabsch import Pose
    from inrscrecon.align.metrics import pose_errors
    from inrscrecon.data.synthetic import SynthConfig, iter_sections

    cfg = SynthConfig(
        n_sections=161,
        spacing=10.0,
        cells_per_section=n,
        n_genes=genes,
        grid="random",
        overlap_jitter=0.05,
        seed=seed,
    )
    recs = list(itertools.islice(iter_sections(cfg), 2))
    sections = [r[0] for r in recs]
    poses = [Pose(r[1]["rotation"], r[1]["translation"], r[1]["reflected"]) for r in recs]
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = align(sections, spacing=10.0, seed=seed)
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    e = res.transforms[1]
    est = Pose(np.array(e["rotation"]), np.array(e["translation"]), e["reflected"])
    rot, trans = pose_errors(est, poses[0].inverse().compose(poses[1]), sections[1].obsm["spatial"])
    return {
        "cells": n,
        "seconds": seconds,
        "rss_before_mb": before / 2**20,
        "peak_rss_mb": peak[0] / 2**20,
        "align_increment_mb": (peak[0] - before) / 2**20,
        "rot_err_deg": rot,
        "trans_err_um": trans,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,30000,100000,300000")
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_one(args.worker, args.genes, args.seed)))
        return 0
    print(f"cpu cores {psutil.cpu_count()}, load average {psutil.getloadavg()}")
    print(
        f"{'cells/section':>13s} {'align s':>8s} {'RSS before':>11s} {'peak RSS':>9s} {'increment':>9s} {'rot°':>6s} {'trans µm':>8s}"
    )
    for n in [int(s) for s in args.sizes.split(",")]:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            str(n),
            "--genes",
            str(args.genes),
            "--seed",
            str(args.seed),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{n}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[0][7:])
        print(
            f"{r['cells']:13d} {r['seconds']:8.1f} {r['rss_before_mb']:9.0f}MB {r['peak_rss_mb']:7.0f}MB "
            f"{r['align_increment_mb']:7.0f}MB {r['rot_err_deg']:6.2f} {r['trans_err_um']:8.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
