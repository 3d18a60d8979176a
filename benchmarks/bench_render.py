"""Render a dense grid (default 256³) for 10 genes of a 5000-gene field (4 × 256 trunk, 4 bands) to OME-Zarr.

    python benchmarks/bench_render.py --size 256 --genes 10 --out /tmp/inrscrecon_bench/render.ome.zarr

Prints wall time, points × genes per second, peak RSS (``ru_maxrss`` of this process) and the up-front
estimate ``render`` prints (so its accuracy can be read off). The weights are random: the cost of a forward
pass does not depend on training. No mask (every voxel is evaluated).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from inrscrecon.field.encoding import EncodingConfig
from inrscrecon.field.model import FieldConfig, INRField
from inrscrecon.query.render import GridSpec, estimate, render


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="grid edge in voxels (size³ voxels)")
    ap.add_argument("--genes", type=int, default=10)
    ap.add_argument("--model-genes", type=int, default=5000)
    ap.add_argument("--chunk-points", type=int, default=65536)
    ap.add_argument("--slab", type=int, default=32)
    ap.add_argument("--out", default="/tmp/inrscrecon_bench/render.ome.zarr")
    args = ap.parse_args()
    torch.manual_seed(0)
    names = [f"gene_{i:05d}" for i in range(args.model_genes)]
    model = INRField(
        FieldConfig(args.model_genes, EncodingConfig(n_bands=4), 256, 4, (0.0, 0.0, 100.0), 520.0, names)
    )
    grid = GridSpec.from_bounds([-500, 500, -500, 500, 0, 200], shape=(args.size,) * 3)
    genes = names[:: args.model_genes // args.genes][: args.genes]
    est = estimate(model.eval(), genes, grid, mask=None, chunk_points=args.chunk_points)
    t0 = time.time()
    res = render(
        model.eval(),
        genes,
        grid,
        args.out,
        mask=None,
        chunk_points=args.chunk_points,
        slab=args.slab,
        png=True,
    )
    wall = time.time() - t0
    n = grid.n_points
    print(
        json.dumps(
            {
                "grid": list(grid.shape), "genes": len(genes), "levels": res.levels, "wall_s": round(wall, 1),
                "points_per_s": round(n / wall), "points_x_genes_per_s": round(n * len(genes) / wall),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "threads": torch.get_num_threads(), "estimated_s": round(est.seconds, 1),
            }
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
