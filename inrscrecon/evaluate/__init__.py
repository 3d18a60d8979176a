"""evaluate stage: tasks (inter / intra / 3d), tuned baselines, metrics, results tables and figures.

``evaluate(sections, task, ...)`` is the public entry point (``inrscrecon evaluate`` on the command line).
This module is itself callable as that function, so ``inrscrecon.evaluate(...)`` works whether the name is
the function or, after ``import inrscrecon.evaluate``, the subpackage. Submodules are imported lazily so
``from inrscrecon.evaluate import metrics`` stays light.
"""

from __future__ import annotations

import datetime
import platform
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import anndata as ad

    from inrscrecon.evaluate.tasks import EvalConfig, SplitResult

__all__ = ["EvalResult", "cpu_name", "evaluate", "machine"]


@dataclass
class EvalResult:
    """``results``: {task: {method: {metric: {"mean", "sd"}}}}; ``splits``: per-split results; ``paths``:
    files written (empty when no ``out`` was given)."""

    results: dict
    splits: list = field(repr=False)
    wall_s: float
    paths: dict[str, Path] = field(default_factory=dict)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where readable, else the platform's word for it)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def machine() -> str:
    """One line describing this machine (CPU, cores, torch threads, Python, torch)."""
    import os

    import torch

    return (
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {sys.version.split()[0]}"
    )


def evaluate(
    sections: Sequence[ad.AnnData | str | Path],
    task: str,
    label_key: str | None = None,
    spacing: float | None = None,
    z_key: str | None = None,
    holdout: Sequence[str] | None = None,
    seeds: int | Sequence[int] = 3,
    out: str | Path | None = None,
    cfg: EvalConfig | None = None,
    figures: bool = True,
    command: str | None = None,
    log: Any = None,
) -> EvalResult:
    """Evaluate the INR, its ablations and the tuned baselines on ``task`` ("inter", "intra" or "3d").

    sections: AnnData or .h5ad paths (raw counts or ``uns['X_kind']`` normalised values); 2D sections that are
    not yet aligned (no ``obsm['spatial_3d']``) are aligned first, z from ``spacing`` / ``z_key`` /
    ``uns['z_um']``. A single section with 3-column ``obsm['spatial']`` is a 3D point cloud.
    label_key: ``obs`` column of ground-truth domains for ARI (else k-means domains of the measured expression).
    holdout: section names to hold out (inter) or thin out (intra); default every middle section (inter) or
    every section (intra). seeds: a count (0..n-1) or explicit seeds.
    out: folder for results.json, details.json, run.json, results.md and PNG figures.
    """
    from inrscrecon.data.io import check_writable, read_sections
    from inrscrecon.errors import InputError
    from inrscrecon.evaluate import report
    from inrscrecon.evaluate.tasks import TASKS, EvalConfig, prepare, run_task

    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose from {list(TASKS)}")
    cfg = cfg or EvalConfig()
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise InputError("need at least one seed")
    if out is not None:
        check_writable(Path(out) / "results.json")
    t0 = time.time()
    if all(isinstance(s, str | Path) for s in sections):
        adatas = read_sections([Path(s) for s in sections])  # type: ignore[misc]
    else:
        adatas = list(sections)  # type: ignore[arg-type]
    prep = prepare(adatas, label_key, spacing, z_key, cfg)
    splits: list[SplitResult] = run_task(task, prep, holdout, seed_list, cfg, log)
    results = report.aggregate(splits)
    wall = time.time() - t0
    paths: dict[str, Path] = {}
    if out is not None:
        figs = []
        if figures:
            seen = set()
            for r in splits:
                if r.split.task not in seen:
                    seen.add(r.split.task)
                    figs += report.split_figures(r, out, f"{r.split.task}_{r.split.name}".replace("/", "_"))
        meta = {
            "command": command or f"evaluate(task={task!r})",
            "machine": machine(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_s": wall,
            "task_wall_s": {task: wall},
            "config": asdict(cfg),
            "labels": prep.label_source,
            "n_genes": len(prep.genes),
            "alignment": prep.info,
            "figures": [str(p) for p in figs],
        }
        paths = report.write_results(out, results, report.details(splits), meta)
    return EvalResult(results, splits, wall, paths)


class _CallableModule(types.ModuleType):
    """The subpackage, callable as :func:`evaluate` (same arguments, same result)."""

    def __call__(self, *args: Any, **kwargs: Any) -> EvalResult:
        return evaluate(*args, **kwargs)


__wrapped__ = evaluate  # inspect.signature / help of the module show the function's
sys.modules[__name__].__class__ = _CallableModule
