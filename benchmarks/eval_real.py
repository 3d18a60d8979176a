"""Full evaluation on the real data in ../shared/data (issue 5); not part of CI.

Parts (each can run in its own process, results are merged afterwards):

* ``inter_dlpfc``  DLPFC 151673–151676 aligned into 3D; hold out 151674 and 151675 in turn (labels: layer).
* ``inter_breast`` PASTE breast-cancer layers 1–4 (ST grid units × 200 µm; 16 µm section spacing assumed, the
  source gives none); hold out layers 2 and 3 in turn (labels: k-means domains of the measured expression, k=5).
* ``intra_dlpfc``  each DLPFC section, 50 % of spots dropped (seeded), trained on the rest;
  ``intra_neighbours_dlpfc`` the same splits, trained with the adjacent sections (in z) too.
* ``3d_drosophila`` BDTNP stage-5 embryo point cloud; hold out the middle 20 % z-band (domains: k-means, k=7).
* ``paper_dlpfc``  the paper's intra-slice protocol: each DLPFC section given by ``--holdout`` (default 151673)
  on its own, 50 % of spots dropped, 3,000 genes of that section, scored on the complete section with PCA 30 +
  k-means / GMM, k = 7 layers.

Inter parts choose every knob (INR and baselines) by leave-one-section-out among the training sections
(``--inter-selection spots``: the earlier random-spot validation); ``--ablations`` names the INR methods.

Usage::

    python benchmarks/eval_real.py --part intra_dlpfc --seeds 3      # writes benchmarks/results/parts/
    python benchmarks/eval_real.py --merge                           # results.json, results.md, details.json
    python benchmarks/eval_real.py --all --seeds 1 --quick           # small smoke run
    python benchmarks/eval_real.py --render                          # results.md again from the JSON files
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from inrscrecon.data.io import read_sections  # noqa: E402
from inrscrecon.evaluate import machine, report  # noqa: E402
from inrscrecon.evaluate.tasks import EvalConfig, prepare, run_task  # noqa: E402

DATA = Path(os.environ.get("INRSCRECON_DATA", REPO.parent / "shared" / "data"))
DLPFC = [f"dlpfc_{s}.h5ad" for s in (151673, 151674, 151675, 151676)]
BREAST = [f"paste_bc_layer{i}.h5ad" for i in (1, 2, 3, 4)]
PARTS = (
    "inter_dlpfc",
    "inter_breast",
    "intra_dlpfc",
    "intra_neighbours_dlpfc",
    "3d_drosophila",
    "paper_dlpfc",
)
BREAST_SPACING_UM = 16.0
BASELINES = ("gaussian", "gaussian_pca", "knn", "linear_z", "mean_profile")
REPORTED_NOTE = (
    "Paper rows are the paper's Table 1, *reported, not reproduced*. Its DLPFC numbers are for intra-slice "
    "completion scored on the complete section (the 50 % training spots included), 3,000 genes, clustering "
    "method unspecified; its Drosophila dataset is a 16–18 h Stereo-seq embryo, not the BDTNP stage-5 atlas "
    "used here, so those rows are context only."
)


REPORTED = {
    "intra_dlpfc": report.PAPER_REPORTED["dlpfc"],
    "intra_paper_dlpfc": report.PAPER_REPORTED["dlpfc"],
    "3d_drosophila": report.PAPER_REPORTED["drosophila"],
}


def part_spec(part: str) -> dict:
    """Files, task and options of one part."""
    if part == "inter_dlpfc":
        return {
            "files": DLPFC,
            "task": "inter",
            "label_key": "layer",
            "holdout": ["151674", "151675"],
            "suffix": "_dlpfc",
        }
    if part == "inter_breast":
        return {"files": BREAST, "task": "inter", "label_key": None, "holdout": ["layer2", "layer3"],
                "spacing": BREAST_SPACING_UM, "microns_per_pixel": 200.0, "n_domains": 5, "suffix": "_breast"}  # fmt: skip
    if part in ("intra_dlpfc", "intra_neighbours_dlpfc"):
        setting = "neighbours" if "neighbours" in part else "alone"
        return {"files": DLPFC, "task": "intra", "label_key": "layer", "holdout": None, "suffix": "_dlpfc",
                "intra_settings": (setting,)}  # fmt: skip
    if part == "paper_dlpfc":
        return {"files": DLPFC, "task": "intra", "label_key": "layer", "holdout": ["151673"], "suffix": "_dlpfc",
                "protocol": "paper", "n_genes": 3000, "n_pcs": 30, "intra_settings": ("alone",)}  # fmt: skip
    if part == "3d_drosophila":
        return {"files": ["bdtnp_drosophila_stage5.h5ad"], "task": "3d", "label_key": None, "holdout": None,
                "n_domains": 7, "suffix": "_drosophila"}  # fmt: skip
    raise SystemExit(f"unknown part {part!r}; choose from {PARTS}")


def run_part(
    part: str,
    seeds: int,
    cfg: EvalConfig,
    out: Path,
    figures_only: bool = False,
    holdout: list[str] | None = None,
    baselines_only: bool = False,
    rerun: str | None = None,
) -> dict:
    """Run one part; write parts/<part>.json and its figures; return the part record. ``figures_only``: run
    only the first split (seed 0) and write its figures. ``rerun`` (a label, may be empty): write
    parts/<part>[...][.<label>].rerun.json, whose rows the merge takes in preference (see :func:`merge`)."""
    spec = part_spec(part)
    tag = part + ("." + "_".join(holdout) if holdout else "") + (".baselines" if baselines_only else "")
    tag += "" if rerun is None else ("." + rerun if rerun else "") + ".rerun"
    if baselines_only:
        cfg = replace(cfg, ablations=())
    if holdout:
        spec["holdout"] = holdout
    if figures_only:
        seeds = 1
        spec["holdout"] = (spec["holdout"] or ["151673"])[:1] if spec["task"] != "3d" else None
    missing = [f for f in spec["files"] if not (DATA / f).exists()]
    if missing:
        raise SystemExit(f"data not found: {DATA / missing[0]} (set INRSCRECON_DATA)")
    t0 = time.time()
    sections = read_sections([DATA / f for f in spec["files"]])
    for s in sections:
        if "microns_per_pixel" in spec:
            s.uns["microns_per_pixel"] = spec["microns_per_pixel"]
    cfg = replace(cfg, n_domains=spec.get("n_domains", cfg.n_domains),
                  intra_settings=spec.get("intra_settings", cfg.intra_settings))  # fmt: skip
    if spec.get("protocol") == "paper":
        cfg = replace(cfg, protocol="paper", n_genes=spec["n_genes"], n_pcs=spec["n_pcs"])
    suffix = spec["suffix"]
    log_path = out / "parts" / f"{tag}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)
        with log_path.open("a") as f:
            f.write(line + "\n")

    # the paper protocol takes each section on its own (its 3,000 genes are not shared by the stack)
    groups = (
        [[s for s in sections if str(s.uns.get("section")) == h] for h in spec["holdout"]]
        if spec.get("protocol") == "paper"
        else [sections]
    )
    results = []
    for group in groups:
        prep = prepare(group, spec["label_key"], spec.get("spacing"), None, cfg)
        log(f"{part}: {prep.table.n_cells} cells, {len(prep.genes)} genes, labels {prep.label_source}")
        results += run_task(spec["task"], prep, spec["holdout"], list(range(seeds)), cfg, log)
    wall = time.time() - t0
    figs = []
    seen = set()
    for r in results:
        if r.split.task not in seen and not baselines_only and rerun is None:
            seen.add(r.split.task)
            figs += [
                str(p.relative_to(out))
                for p in report.split_figures(r, out / "figures", r.split.task + suffix)
            ]
    if figures_only:
        log(f"{part}: figures {figs}")
        return {"figures": figs}
    by_task: dict[str, float] = {}
    for r in results:
        key = r.split.task + suffix
        spent = sum(v.get("wall_s", 0.0) or 0.0 for v in r.metrics.values())  # INR rows include their choice
        by_task[key] = by_task.get(key, 0.0) + spent
    record = {"part": part, "results": report.aggregate(results, suffix), "details": report.details(results),
              "wall_s": wall, "task_compute_s": by_task, "labels": prep.label_source, "n_genes": len(prep.genes),
              "n_cells": prep.table.n_cells, "alignment": prep.info, "figures": figs,
              "baselines_only": baselines_only, "rerun": rerun is not None,
              "methods": sorted(cfg.ablations) + (list(BASELINES) if cfg.baselines else []),
              "bands": [c.n_bands for c in cfg.candidates]}  # fmt: skip
    (out / "parts" / f"{tag}.json").write_text(json.dumps(record, indent=1, default=str))
    log(f"{part}: done in {wall:.0f} s")
    return record


MERGE_RULE = (
    "Per split (task, held-out section, seed) and method, the merge takes the row of a parts/*.rerun.json file "
    "(today's code) when one has it; otherwise a --baselines-only file's baseline rows (parts/*.baselines.json); "
    "otherwise the first part file (sorted names) that has the method. Each record of details.json names the "
    "methods it took from a rerun file under 'rerun'."
)


def _rerun_rows(out: Path) -> tuple[dict[tuple, dict], list[dict]]:
    """Splits of parts/*.rerun.json: (task key, holdout, seed) → detail record, and the part records."""
    rows: dict[tuple, dict] = {}
    recs = []
    for path in sorted((out / "parts").glob("*.rerun.json")):
        rec = json.loads(path.read_text())
        rec["_stem"] = path.stem
        recs.append(rec)
        suffix = part_spec(rec["part"])["suffix"]
        for d in rec["details"]:
            key = (d["task"] + suffix, d["holdout"], d["seed"])
            if key in rows:  # two rerun files of one split: the later (sorted) one wins per method
                rows[key]["metrics"].update(d["metrics"])
                rows[key]["chosen"].update(d["chosen"])
            else:
                rows[key] = dict(d, part=rec["part"], key=key[0])
    return rows, recs


def _take_rerun(d: dict, new: dict) -> None:
    """Replace the methods of split record ``d`` by those of rerun record ``new`` (in place)."""
    methods = sorted(new["metrics"])
    for m in methods:
        d["metrics"][m] = new["metrics"][m]
        d["chosen"][m] = new["chosen"].get(m, {})
    sel, old = new["chosen"].get("inr_selection"), d["chosen"].get("inr_selection")
    if sel is not None and (old is None or old.get("method") == sel.get("method")):
        d["chosen"]["inr_selection"] = sel
    if "selection" in new["chosen"]:
        d["chosen"]["selection"] = new["chosen"]["selection"]
    d["rerun"] = methods


def merge(out: Path, command: str, cfg: EvalConfig, notes: str = "", wall_note: str = "") -> None:
    """Combine parts/*.json into results.json, details.json, run.json and results.md (rule: ``MERGE_RULE``)."""
    results: dict = {}
    details: list = []
    task_wall: dict[str, float] = {}
    parts_meta = {}
    seen: dict[tuple, dict] = {}  # (task key, holdout, seed) → its record in details
    redone: dict[tuple, dict] = {}  # (task, holdout, seed) → baseline metrics of a --baselines-only rerun
    for path in sorted((out / "parts").glob("*.baselines.json")):
        for d in json.loads(path.read_text())["details"]:
            redone[(d["task"], d["holdout"], d["seed"])] = d
    for part in PARTS:
        for path in sorted((out / "parts").glob(f"{part}*.json")):
            rec = json.loads(path.read_text())
            if rec.get("part") != part or rec.get("baselines_only") or rec.get("rerun"):
                continue
            for d in rec["details"]:
                new = redone.get((d["task"], d["holdout"], d["seed"]))
                if new is not None:  # wider tuning grids: replace every baseline's metrics and choice
                    for m in BASELINES:
                        if m in new["metrics"]:
                            d["metrics"][m] = new["metrics"][m]
                            d["chosen"][m] = new["chosen"][m]
            suffix = part_spec(part)["suffix"]
            for d in rec["details"]:
                # the same split in an earlier part file (e.g. a run adding INR rows): keep that file's
                # methods, take only the new ones from this file
                same = seen.get((d["task"] + suffix, d["holdout"], d["seed"]))
                if same is None:
                    d = dict(d, part=part, key=d["task"] + suffix)
                    seen[(d["key"], d["holdout"], d["seed"])] = d
                    details.append(d)
                    continue
                for m, ms in d["metrics"].items():
                    if m not in same["metrics"]:
                        same["metrics"][m] = ms
                        same["chosen"][m] = d["chosen"].get(m, {})
            for k, v in rec["task_compute_s"].items():
                task_wall[k] = task_wall.get(k, 0.0) + v
            parts_meta[path.stem] = {k: rec[k] for k in ("wall_s", "labels", "n_genes", "n_cells", "figures")}
            parts_meta[path.stem]["alignment"] = {
                k: v for k, v in rec["alignment"].items() if k != "transforms"
            }
    rerun_rows, rerun_recs = _rerun_rows(out)
    for d in details:
        new = rerun_rows.pop((d["key"], d["holdout"], d["seed"]), None)
        if new is not None:
            _take_rerun(d, new)
    for new in rerun_rows.values():  # splits only a rerun has
        details.append(dict(new, rerun=sorted(new["metrics"])))
    for rec in rerun_recs:
        for k, v in rec["task_compute_s"].items():
            task_wall[k] = task_wall.get(k, 0.0) + v
        parts_meta[rec["_stem"]] = {k: rec[k] for k in ("wall_s", "labels", "n_genes", "n_cells", "figures")}
        parts_meta[rec["_stem"]].update(rerun=True, methods=rec.get("methods"))
        parts_meta[rec["_stem"]]["alignment"] = {
            k: v for k, v in rec["alignment"].items() if k != "transforms"
        }
    for key in dict.fromkeys(d["key"] for d in details):
        recs = [dict(d, task=key) for d in details if d["key"] == key]
        results.update(report.aggregate_details(recs))
    reported = REPORTED
    meta = {"command": command, "machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_s": sum(p["wall_s"] for p in parts_meta.values()), "task_wall_s": task_wall,
            "config": asdict(cfg), "parts": parts_meta, "notes": "\n" + REPORTED_NOTE + "\n\n" + wall_note + "\n" + notes,
            "wall_label": "sum of the parts' wall times (parts ran as parallel processes)",
            "merge_rule": MERGE_RULE}  # fmt: skip
    report.write_results(out, results, details, meta, reported)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", action="append", choices=PARTS)
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--merge", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument(
        "--wall-note", default="", help="sentence on the machine load, printed with the wall times"
    )
    ap.add_argument("--notes", help="markdown file appended to results.md")
    ap.add_argument(
        "--holdout", action="append", help="only these held-out sections (split a part over processes)"
    )
    ap.add_argument(
        "--figures-only", action="store_true", help="rerun the first split of each part for figures"
    )
    ap.add_argument(
        "--baselines-only", action="store_true", help="rerun only the baselines (parts/*.baselines.json)"
    )
    ap.add_argument(
        "--rerun",
        nargs="?",
        const="",
        metavar="LABEL",
        help="write parts/<part>[.LABEL].rerun.json (the merge prefers their rows)",
    )
    ap.add_argument("--ablations", default="inr,inr_no_rc,inr_rmse", help="INR methods (comma-separated)")
    ap.add_argument(
        "--bands",
        help="Fourier band candidates, e.g. 2 or 2,4 (default: the evaluation's); one value fixes the "
        "encoding, e.g. to the one the selecting method chose in an earlier run of the same splits",
    )
    ap.add_argument(
        "--no-baselines", action="store_true", help="INR rows only (baselines come from another run)"
    )
    ap.add_argument("--hvg", choices=["pooled", "batch"], default="pooled", help="gene selection rule")
    ap.add_argument("--inter-selection", choices=["sections", "spots"], default="sections")
    ap.add_argument("--render", action="store_true", help="rewrite results.md from results.json + run.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render:
        report.render_markdown(out)
        return 0
    cfg = EvalConfig(
        threads=args.threads,
        ablations=tuple(a for a in args.ablations.split(",") if a),
        gene_selection=args.hvg,
        inter_selection=args.inter_selection,
        baselines=not args.no_baselines,
    )
    if args.bands:
        cfg = replace(cfg, candidates=tuple(
            replace(cfg.candidates[0], n_bands=int(b)) for b in args.bands.split(",")))  # fmt: skip
    if args.quick:
        cfg = replace(cfg, n_genes=100, steps=60, max_cells=400)
    parts = list(PARTS) if args.all else (args.part or [])
    for part in parts:
        run_part(part, args.seeds, cfg, out, args.figures_only, args.holdout, args.baselines_only, args.rerun)
    if args.merge or args.all:
        notes = Path(args.notes).read_text() if args.notes else ""
        present = [p for p in PARTS if any((out / "parts").glob(f"{p}*.json"))]
        command = (
            "python benchmarks/eval_real.py "
            + " ".join(f"--part {p}" for p in present)
            + f" --seeds {args.seeds} --threads {args.threads} (one process per part file in parts/; the "
            "commands are under 'How these files were produced'); then --merge"
        )
        torch.set_num_threads(args.threads)
        merge(out, command, cfg, notes, args.wall_note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
