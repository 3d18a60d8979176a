"""Results of an evaluation: ``results.json`` (mean ± s.d. over seeds), ``details.json`` (every split), a
markdown table and figures.

Aggregation: for each task, method, metric and seed the metric is averaged over the task's splits (held-out
sections); mean and sample s.d. (ddof = 1; 0 with one seed) are then taken over seeds.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inrscrecon.evaluate import figures, metrics
from inrscrecon.evaluate.tasks import INR_METHODS, METHOD_ORDER, SplitResult

METRICS = ("ari", "ari_gmm", "ssim", "pearson", "rmse", "wall_s")
METRIC_TITLES = {
    "ari": "ARI k-means",
    "ari_gmm": "ARI GMM",
    "ssim": "SSIM",
    "pearson": "Pearson (median)",
    "rmse": "RMSE",
    "wall_s": "wall s / fit",
}
HIGHER_IS_BETTER = {"ari": True, "ari_gmm": True, "ssim": True, "pearson": True, "rmse": False}

#: The paper's Table 1 (ARI / SSIM), printed beside ours as *reported, not reproduced*.
PAPER_REPORTED = {
    "dlpfc": {
        "INRScrecon (paper)": (0.65, 0.70),
        "STitch3D (paper)": (0.46, 0.55),
        "STAGE (paper)": (0.33, 0.45),
    },
    "drosophila": {
        "INRScrecon (paper)": (0.60, 0.68),
        "STitch3D (paper)": (0.49, 0.66),
        "STAGE (paper)": (0.44, 0.36),
    },
}


#: What each method key of results.json is, for tables and figures (the JSON keys stay as they are).
METHOD_LABELS = {
    "inr": "INR, paper loss (RMSE + RC + KL)",
    "inr_no_rc": "INR, RMSE + KL (paper loss w/o RC)",
    "inr_rmse": "INR, RMSE loss",
    "inr_poisson": "INR, Poisson count loss",
    "inr_nb": "INR, negative-binomial count loss",
    "inr_poisson_mean": "INR, Poisson count loss, predictive mean of log1p",
    "inr_nb_mean": "INR, negative-binomial count loss, predictive mean of log1p",
    "inr_poisson_measured": "INR, Poisson count loss, expected measured log1p (library-size field)",
    "inr_nb_measured": "INR, negative-binomial count loss, expected measured log1p (library-size field)",
    "inr_zstretch": "INR, RMSE loss, z-stretch chosen on validation",
    "inr_codes": "INR, RMSE loss + per-section codes (D = 8)",
    "inr_hashgrid": "INR, RMSE loss, hash-grid encoding",
    "inr_rank": "INR, RMSE loss, gene head full or rank 32 (chosen on validation)",
    "gaussian": "Gaussian-kernel smoother (tuned bandwidth)",
    "gaussian_pca": "Gaussian-kernel smoother + PCA projection (tuned bandwidth, r)",
    "knn": "k-NN, inverse distance (tuned k)",
    "linear_z": "linear-z between neighbouring sections",
    "mean_profile": "mean profile",
    "true_expression": "true expression (clustering reference)",
}


#: Readable titles of task keys (``<task>[_<dataset>]``) for table headings.
TASK_TITLES = {
    "inter": "Inter-slice prediction (held-out section)",
    "intra": "Intra-slice completion (50 % of a section's spots dropped)",
    "intra_neighbours": "Intra-slice completion, adjacent sections also trained on",
    "intra_paper": "Intra-slice completion, paper protocol (scored on the complete section)",
    "3d": "3D: held-out z-band",
}
DATASET_TITLES = {"dlpfc": "DLPFC", "breast": "breast cancer (PASTE)", "drosophila": "Drosophila (BDTNP)"}


def task_title(key: str) -> str:
    """Heading of a task key, e.g. ``inter_dlpfc`` → ``Inter-slice prediction (held-out section) — DLPFC``."""
    for task in sorted(TASK_TITLES, key=len, reverse=True):
        if key == task:
            return TASK_TITLES[task]
        if key.startswith(task + "_") and key[len(task) + 1 :] in DATASET_TITLES:
            return f"{TASK_TITLES[task]} — {DATASET_TITLES[key[len(task) + 1 :]]}"
    return key


def fit_default_method() -> str | None:
    """The INR method key that ``fit`` reproduces with its default settings (None if none does)."""
    return next((k for k, v in INR_METHODS.items() if v.is_fit_default()), None)


def method_label(method: str) -> str:
    """Human label of a method key; the row that equals ``fit``'s default says so."""
    label = METHOD_LABELS.get(method, method)
    return f"{label} (fit default)" if method == fit_default_method() else label


def _clean(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def aggregate(results: Sequence[SplitResult], suffix: str = "") -> dict[str, dict[str, dict[str, dict]]]:
    """{task key: {method: {metric: {"mean": x, "sd": y}}}} over seeds of split-averaged metrics.

    The task key is each split's task (``inter``, ``intra``, ``intra_neighbours``, ``3d``) + ``suffix``."""
    per: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for r in results:
        task = r.split.task + suffix
        for method, ms in r.metrics.items():
            for metric, v in ms.items():
                per[task][method][metric][r.split.seed].append(v)
    return _summarise(per)


def _summarise(per: dict) -> dict:
    """{task: {method: {metric: {seed: [values over splits]}}}} → mean ± s.d. over seeds of split means."""
    out: dict = {}
    for task, methods in per.items():
        out[task] = {}
        for method in sorted(methods, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99):
            out[task][method] = {}
            for metric in sorted(methods[method], key=lambda m: METRICS.index(m) if m in METRICS else 99):
                seeds = [float(np.nanmean(v)) for v in methods[method][metric].values()]
                mean = float(np.mean(seeds))
                sd = float(np.std(seeds, ddof=1)) if len(seeds) > 1 else 0.0
                out[task][method][metric] = {"mean": _clean(mean), "sd": _clean(sd)}
    return out


def aggregate_details(records: Sequence[dict], suffix: str = "") -> dict[str, dict[str, dict[str, dict]]]:
    """:func:`aggregate` from :func:`details` records (e.g. merged from several runs of the same task)."""
    per: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for rec in records:
        for method, ms in rec["metrics"].items():
            for metric, v in ms.items():
                per[rec["task"] + suffix][method][metric][rec["seed"]].append(np.nan if v is None else v)
    return _summarise(per)


def details(results: Sequence[SplitResult]) -> list[dict]:
    """One record per split: task, held-out name, seed, sizes, metrics per method, what was chosen."""
    return [
        {
            "task": r.split.task,
            "holdout": r.split.name,
            "seed": r.split.seed,
            "n_train": r.split.train.n_cells,
            "n_test": r.split.test.n_cells,
            "metrics": {m: {k: _clean(v) for k, v in ms.items()} for m, ms in r.metrics.items()},
            "chosen": r.chosen,
        }
        for r in results
    ]


def _fmt(cell: dict | None, digits: int = 3) -> str:
    if not cell or cell.get("mean") is None:
        return "–"
    sd = cell.get("sd") or 0.0
    return f"{cell['mean']:.{digits}f} ± {sd:.{digits}f}"


def markdown_table(results: dict, reported: dict | None = None, metric_names: Sequence[str] = METRICS) -> str:
    """One markdown table per task; ``reported`` rows ({name: (ari, ssim)}) are appended per task key (the
    reported ARI, clustering unspecified, under each ARI column)."""
    lines = []
    for task, methods in results.items():
        present = [m for m in metric_names if any(m in ms for ms in methods.values())]
        lines += [
            f"### {task_title(task)}" + (f" (`{task}`)" if task_title(task) != task else ""),
            "",
            "| method | " + " | ".join(METRIC_TITLES.get(m, m) for m in present) + " |",
            "|---" * (len(present) + 1) + "|",
        ]
        best = _best(methods, present)
        for method, ms in methods.items():
            cells = []
            for m in present:
                c = _fmt(ms.get(m), 1 if m == "wall_s" else 3)
                cells.append(f"**{c}**" if best.get(m) == method else c)
            lines.append(f"| {method_label(method)} | " + " | ".join(cells) + " |")
        for name, (a, s) in (reported or {}).get(task, {}).items():
            cells = [
                f"{a:.2f} (reported)"
                if m in ("ari", "ari_gmm")
                else f"{s:.2f} (reported)"
                if m == "ssim"
                else ""
                for m in present
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _best(methods: dict, present: Sequence[str]) -> dict[str, str]:
    """The best predicting method per metric (bold in the table)."""
    out = {}
    for m in present:
        if m not in HIGHER_IS_BETTER:
            continue
        vals = {
            k: ms[m]["mean"]
            for k, ms in methods.items()
            if k != "true_expression" and m in ms and ms[m]["mean"] is not None
        }
        if vals:
            out[m] = (max if HIGHER_IS_BETTER[m] else min)(vals, key=lambda k: vals[k])
    return out


def split_figures(res: SplitResult, out_dir: str | Path, prefix: str) -> list[Path]:
    """Gene maps (true vs INR vs the best baseline by Pearson) and domain maps of one split."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    te = res.split.test
    xyz = te.coords
    xy = xyz[:, :2] if np.ptp(xyz[:, 2]) < 1e-6 else metrics.project_2d(xyz)
    base = [m for m in res.predictions if not m.startswith("inr") and m != "mean_profile"]
    best = max(base, key=lambda m: res.metrics[m]["pearson"]) if base else None
    panels = {"measured": res.truth}
    default = fit_default_method()
    inr = (
        default
        if default in res.predictions
        else next((m for m in res.predictions if m.startswith("inr")), None)
    )
    if inr:
        panels[_short(inr)] = res.predictions[inr]
    if best:
        panels[_short(best)] = res.predictions[best]
    top = list(metrics.top_variable(res.truth, 3))
    genes = [te.genes[i] for i in top]
    paths = [figures.gene_maps(xy, panels, genes, top, out_dir / f"{prefix}_genes.png")]
    k = len(np.unique(res.split.labels[np.asarray(res.split.labels).astype(str) != "unknown"]))
    truth_lab = np.asarray(res.split.labels).astype(str)
    lab = {"ground truth": truth_lab}
    seed = res.split.seed
    lab["clusters of measured"] = figures.match_labels(truth_lab, metrics.cluster(res.truth, k, seed=seed))
    for name, p in panels.items():
        if name != "measured":
            lab[f"clusters of {name}"] = figures.match_labels(truth_lab, metrics.cluster(p, k, seed=seed))
    paths.append(figures.label_maps(xy, lab, out_dir / f"{prefix}_domains.png"))
    return paths


def _short(method: str) -> str:
    """A figure-panel title: the method label, wrapped before its parenthesis."""
    return method_label(method).replace(" (", "\n(", 1)


def write_results(
    out_dir: str | Path, results: dict, records: list[dict], meta: dict, reported: dict | None = None
) -> dict[str, Path]:
    """Write ``results.json``, ``details.json``, ``run.json`` and ``results.md`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": out / "results.json",
        "details": out / "details.json",
        "run": out / "run.json",
        "markdown": out / "results.md",
    }
    if reported:
        meta = {**meta, "reported": reported}
    paths["results"].write_text(json.dumps(results, indent=2))
    paths["details"].write_text(json.dumps(records, indent=1, default=str))
    paths["run"].write_text(json.dumps(meta, indent=2, default=str))
    paths["markdown"].write_text(markdown_report(results, meta))
    return paths


def render_markdown(out_dir: str | Path) -> Path:
    """Rewrite ``results.md`` from the ``results.json`` and ``run.json`` under ``out_dir`` (current labels and
    titles; the JSON files are read, never rewritten)."""
    out = Path(out_dir)
    results = json.loads((out / "results.json").read_text())
    meta = json.loads((out / "run.json").read_text())
    path = out / "results.md"
    path.write_text(markdown_report(results, meta))
    return path


def markdown_report(results: dict, meta: dict) -> str:
    """The results.md text: header from ``meta`` (command, machine, date, wall times, ``reported`` rows,
    ``notes``) and one table per task."""
    reported = meta.get("reported")
    head = [
        "# inrscrecon evaluation",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        f"Machine: {meta.get('machine', '')}; date: {meta.get('date', '')}; "
        f"{meta.get('wall_label', 'total wall time')} {meta.get('wall_s', float('nan')):.0f} s",
        "",
    ]
    if meta.get("task_wall_s"):
        head += [
            "Wall time per task: " + ", ".join(f"{k} {v:.0f} s" for k, v in meta["task_wall_s"].items()),
            "",
        ]
    head += [
        "Values: mean ± s.d. over seeds (each seed averaged over the task's held-out sections). "
        "Bold: best predicting method. Rows are labelled by what they are (results.json keeps the method "
        'keys, e.g. `inr_rmse`, and each heading names its task key); "fit default" marks the row that '
        "`inrscrecon fit` reproduces. `wall s / fit` of an INR row includes the choice of its knobs "
        "(candidates fitted on validation data, details.json).",
        "",
    ]
    return "\n".join(head) + "\n" + markdown_table(results, reported) + meta.get("notes", "")
