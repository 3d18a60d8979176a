"""``align``: pairwise rigid alignment of sections (each pair guarded against making things worse), combined into
one common frame by a pose graph or a chain of consecutive pairs.

Units: every section's ``obsm[spatial_key]`` is converted to µm with ``uns['microns_per_pixel']`` (1 when
absent) before alignment, so x, y and z share units. A section's pose maps its observed coordinates into the
common frame (the reference section's µm frame):

    common_xy = R @ (S @ (microns_per_unit * observed_xy)) + t,   S = diag(1, −1) if reflected else I.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from inrscrecon.align.embedding import joint_embedding, section_name, spatial_smooth, unit_rows
from inrscrecon.align.export import AlignmentResult, affines, stack_sections
from inrscrecon.align.guard import centroid_pose, overlay_score, score_context
from inrscrecon.align.kabsch import Pose, ransac_poses, rotation
from inrscrecon.align.matching import mutual_nn
from inrscrecon.align.nonrigid import DisplacementField, NonrigidConfig, fit_displacement
from inrscrecon.align.posegraph import Edge, chain_poses, solve_pose_graph
from inrscrecon.align.refine import (
    agreement_score,
    fit_stats,
    hard_matches,
    hard_pairs,
    icp_refine,
    polish_pose,
    snap_refine,
    snap_score,
)
from inrscrecon.data.stack import section_z
from inrscrecon.data.validate import coordinates
from inrscrecon.errors import InputError


@dataclass
class AlignConfig:
    """Tuning knobs (defaults work for Visium spots and single cells)."""

    n_genes: int = 2000  # top variable shared genes in the joint PCA
    # joint PCA dimensions. On DLPFC the spectrum of the standardised genes reaches its noise floor (variance
    # ≈ 2, flat) after ~10 components; each further one adds only noise to the cosine similarities
    n_comps: int = 15
    smooth_k: int = 7  # cells averaged (within a section) before matching: the cell and its ~6 neighbours
    mnn_k: int = 5  # mutual k-NN in expression space
    max_pair_cells: int = 150000  # cells per section that estimate a pair's pose (random subset beyond it)
    max_match_cells: int = 3000  # cells per section used for MNN + RANSAC
    max_icp_cells: int = 20000  # moving cells used in the ICP refinement
    max_polish_cells: int = 10000  # cells per direction in the Gauss-Newton polish
    polish_bandwidths: tuple[float, ...] = (2.0, 1.0)  # kernel bandwidths of the polish, in cell spacings
    # snap onto one-to-one counterparts when this fraction of moving cells has one (> 1: never)
    snap_min_mutual: float = 0.8
    ransac_iter: int = 1000
    n_hypotheses: int = 4  # distinct RANSAC poses refined and compared
    ransac_threshold: float = 0.06  # inlier residual, fraction of the fixed section's extent
    min_score: float = 0.3  # overlay score (align.guard) below which a pair is low-confidence
    # without reflection allowed, a mirrored pose with this many times the matches is low-confidence
    max_mirror_support: float = 1.25
    guard_margin: float = 0.01  # identity / centroid must beat the aligned pose's score by this much
    pose_window: int = 3  # global poses: pairs up to this many sections apart enter the pose graph
    nonrigid: NonrigidConfig = field(default_factory=NonrigidConfig)  # the optional non-rigid step


@dataclass
class PairResult:
    """One pairwise alignment: ``pose`` maps the moving section's µm coordinates into the fixed one's µm frame."""

    moving: str
    fixed: str
    pose: Pose
    inlier_fraction: float  # MNN expression matches within the RANSAC threshold after refinement
    residual_um: float  # RMS ICP residual
    agreement: float  # mean cos similarity with the spatially nearest fixed cell (overlap only)
    overlap: float  # fraction of moving cells with a fixed cell within 2 spacings
    n_mnn: int
    seconds: float
    matches: pd.DataFrame = field(repr=False)
    score: float = float("nan")  # overlay score of the kept pose (inrscrecon.align.guard)
    pose_source: str = "aligned"  # which pose the guard kept: aligned, identity or centroid
    scores: dict = field(default_factory=dict)  # overlay score of each candidate pose
    mirror_support: float = (
        0.0  # RANSAC support of the best mirrored pose over the best proper one (no flips)
    )

    def low_confidence_message(self, threshold: float, max_mirror: float, allow_reflection: bool) -> str:
        """What a user reads when this pair is low-confidence: the pair, its score and threshold, what to try."""
        tries = []
        if not allow_reflection:
            hint = (
                f" (a mirrored pose explains {self.mirror_support:.2f}× the expression matches of the best "
                f"proper one; limit {max_mirror:.2f})"
                if self.mirror_support >= max_mirror
                else ""
            )
            tries.append(f"--allow-reflection{hint}")
        tries += ["another --reference section", "--accept-low-confidence to keep this pose anyway"]
        others = ", ".join(f"{k} {v:.2f}" for k, v in self.scores.items())
        return (
            f"pair {self.moving!r} → {self.fixed!r}: low alignment confidence: overlay score {self.score:.2f} "
            f"(threshold {threshold:.2f}; kept the {self.pose_source} pose; scores: {others}; inlier_fraction "
            f"{self.inlier_fraction:.2f}); try " + ", ".join(tries)
        )


def _check_geometry(xy: np.ndarray, name: str, key: str) -> None:
    if len(xy) < 3:
        raise InputError(f"section {name!r}: only {len(xy)} cells; need at least 3 matchable cells to align")
    sv = np.linalg.svd(xy - xy.mean(axis=0), compute_uv=False)
    if sv[0] == 0 or sv[1] / sv[0] < 1e-6:
        raise InputError(
            f"section {name!r}: obsm[{key!r}] coordinates are collinear (all {len(xy)} cells on one line, "
            f"singular values {sv.round(6).tolist()}); a 2D pose is undefined"
        )


def _spacing(xy: np.ndarray) -> float:
    """Median distance to the nearest other cell (µm)."""
    d, _ = cKDTree(xy).query(xy[: min(len(xy), 20000)], k=2)
    return float(np.median(d[:, 1])) or 1.0


def _extent(xy: np.ndarray) -> float:
    """Rotation-invariant section size (µm): 4 √λ_max of the coordinate covariance (a disc's diameter)."""
    return float(4 * np.sqrt(np.linalg.eigvalsh(np.cov(xy.T))[-1]))


def align_pair(
    a: ad.AnnData,
    b: ad.AnnData,
    xy_a: np.ndarray,
    xy_b: np.ndarray,
    *,
    allow_reflection: bool,
    seed: int,
    cfg: AlignConfig,
) -> PairResult:
    """Align section a (moving) onto b (fixed); xy in µm, [n_a, 2] and [n_b, 2]. Sections larger than
    ``cfg.max_pair_cells`` are represented by a random subset of that many cells (the exported matches then
    cover that subset)."""
    t0 = time.perf_counter()
    na, nb = section_name(a, "a"), section_name(b, "b")
    sub = np.random.default_rng([seed, 1])  # its own stream: small sections are not touched by it
    if len(xy_a) > cfg.max_pair_cells:  # a random subset carries the pose of a huge section: O(max) work
        keep = np.sort(sub.choice(len(xy_a), cfg.max_pair_cells, replace=False))
        a, xy_a = a[keep], xy_a[keep]
    if len(xy_b) > cfg.max_pair_cells:
        keep = np.sort(sub.choice(len(xy_b), cfg.max_pair_cells, replace=False))
        b, xy_b = b[keep], xy_b[keep]
    rng = np.random.default_rng(seed)
    emb_a, emb_b, _ = joint_embedding(a, b, cfg.n_genes, cfg.n_comps, seed)  # float32
    fa = unit_rows(spatial_smooth(xy_a, emb_a, cfg.smooth_k))
    fb = unit_rows(spatial_smooth(xy_b, emb_b, cfg.smooth_k))
    spacing, extent = _spacing(xy_b), _extent(xy_b)
    sa = np.sort(rng.choice(len(xy_a), min(len(xy_a), cfg.max_match_cells), replace=False))
    sb = np.sort(rng.choice(len(xy_b), min(len(xy_b), cfg.max_match_cells), replace=False))
    ia, ib, sim = mutual_nn(fa[sa], fb[sb], cfg.mnn_k)
    if len(ia) < 3:
        raise InputError(f"pair {na!r} → {nb!r}: only {len(ia)} mutual expression matches; need at least 3")
    p, q, w = xy_a[sa][ia], xy_b[sb][ib], np.clip(sim, 1e-3, None)
    thr = cfg.ransac_threshold * extent
    hyps = ransac_poses(
        p, q, w, thr, n_iter=cfg.ransac_iter, allow_reflection=allow_reflection, top=cfg.n_hypotheses, rng=rng
    )
    tree = cKDTree(xy_b)
    if not hyps:  # degenerate geometry of the matches: start from centroid alignment, both flips
        c = Pose(np.eye(2), xy_b.mean(0) - xy_a.mean(0))
        starts = [c] + (
            [Pose(np.eye(2), xy_b.mean(0) - xy_a.mean(0) * [1, -1], True)] if allow_reflection else []
        )
    else:
        starts = [h.pose for h in hyps]
    # pick the hypothesis with the best expression agreement after a short, coarse refinement
    scored = []
    for start in starts:
        pose, _ = icp_refine(
            xy_a[sa], fa[sa], xy_b, fb, start, spacing, sigmas=(3.0, 2.0), iters=3, tree=tree
        )
        scored.append((agreement_score(xy_a[sa], fa[sa], fb, pose, spacing, tree), pose))
    pose = max(scored, key=lambda s: s[0])[1]
    si = np.sort(rng.choice(len(xy_a), min(len(xy_a), cfg.max_icp_cells), replace=False))
    pose, _ = icp_refine(xy_a[si], fa[si], xy_b, fb, pose, spacing, sigmas=(2.0, 1.0), iters=6, tree=tree)
    polished = _polish_both(xy_a, emb_a, xy_b, emb_b, pose, spacing, _spacing(xy_a), tree, rng, cfg)
    pose = _snap_best(xy_a, emb_a, xy_b, emb_b, [pose, polished], spacing, tree, rng, cfg)
    # the guard: never return a pose that overlays worse than leaving the section where it is, or centring it
    ctx = score_context(xy_a, fa, xy_b, fb, spacing, np.random.default_rng(seed), tree)
    options = {"aligned": pose, "identity": Pose.identity(), "centroid": centroid_pose(xy_a, xy_b)}
    scores = {k: overlay_score(ctx, v).score for k, v in options.items()}
    chosen = max(scores, key=lambda k: scores[k] + (cfg.guard_margin if k == "aligned" else 0.0))
    pose = options[chosen]
    mirror = 0.0
    if not allow_reflection and hyps:  # would a mirrored section explain the matches far better?
        both = ransac_poses(
            p,
            q,
            w,
            thr,
            n_iter=cfg.ransac_iter,
            allow_reflection=True,
            top=2 * cfg.n_hypotheses,
            rng=np.random.default_rng(seed + 1),
        )
        refl = [h.score for h in both if h.pose.reflected]
        mirror = max(refl, default=0.0) / max(hyps[0].score, 1e-12)
    stats = fit_stats(xy_a[si], fa[si], xy_b, fb, pose, spacing, tree)
    inl = float((np.hypot(*(pose.apply(p) - q).T) < thr).mean())
    rows, cols, dist = hard_matches(pose.apply(xy_a), fa, tree, fb, spacing)
    ea, eb = unit_rows(emb_a), unit_rows(emb_b)
    matches = pd.DataFrame(
        {
            "section_a": na,
            "section_b": nb,
            "cell_a": a.obs_names[rows],
            "cell_b": b.obs_names[cols],
            "similarity": np.einsum("nc,nc->n", ea[rows], eb[cols]).astype(np.float32),
            "distance_um": dist.astype(np.float32),
        }
    )
    return PairResult(
        na,
        nb,
        pose,
        inl,
        stats.residual,
        stats.agreement,
        stats.overlap,
        len(ia),
        time.perf_counter() - t0,
        matches,
        score=scores[chosen],
        pose_source=chosen,
        scores=scores,
        mirror_support=mirror,
    )


def _snap_best(
    xy_a: np.ndarray,
    emb_a: np.ndarray,
    xy_b: np.ndarray,
    emb_b: np.ndarray,
    starts: list[Pose],
    spacing: float,
    tree: cKDTree,
    rng: np.random.Generator,
    cfg: AlignConfig,
) -> Pose:
    """Snap onto one-to-one counterparts where they exist, else keep the last of ``starts``.

    Each start is refined by hard-match ICP (``snap_refine``). When at least ``cfg.snap_min_mutual`` of the
    moving cells then have a mutual hard match (the cells correspond one to one: a re-imaged or re-posed
    section; different sections stay near 0.5–0.7), the best of starts and snaps by ``snap_score`` wins.
    Otherwise hard matches would only find chance coincidences of different cells, and the soft result stays.
    """
    if cfg.snap_min_mutual > 1:
        return starts[-1]
    si = np.sort(rng.choice(len(xy_a), min(len(xy_a), cfg.max_icp_cells), replace=False))
    ea, eb = unit_rows(emb_a[si]), unit_rows(emb_b)
    start_mutual = [len(hard_pairs(p.apply(xy_a[si]), ea, tree, eb, spacing)[0]) / len(si) for p in starts]
    if max(start_mutual) < cfg.snap_min_mutual - 0.2:  # far from one-to-one even before snapping: skip it
        return starts[-1]
    snaps = [snap_refine(xy_a[si], ea, xy_b, eb, p, spacing, tree=tree) for p in starts]
    mutual = [len(hard_pairs(p.apply(xy_a[si]), ea, tree, eb, spacing)[0]) / len(si) for p in snaps]
    if max(mutual) < cfg.snap_min_mutual:
        return starts[-1]
    cands = list(starts) + snaps
    scores = [snap_score(p.apply(xy_a[si]), ea, tree, eb, spacing) for p in cands]
    return cands[int(np.argmax(scores))]


def _polish_both(
    xy_a: np.ndarray,
    emb_a: np.ndarray,
    xy_b: np.ndarray,
    emb_b: np.ndarray,
    pose: Pose,
    spacing_b: float,
    spacing_a: float,
    tree_b: cKDTree,
    rng: np.random.Generator,
    cfg: AlignConfig,
) -> Pose:
    """Gauss–Newton polish in both directions (a's cells in b's field, b's cells in a's field), averaged:
    the two estimates use disjoint noise, so the mean has about half the variance."""
    sa = np.sort(rng.choice(len(xy_a), min(len(xy_a), cfg.max_polish_cells), replace=False))
    sb = np.sort(rng.choice(len(xy_b), min(len(xy_b), cfg.max_polish_cells), replace=False))
    tree_a = cKDTree(xy_a)
    fwd, back = pose, pose.inverse()
    for bw in cfg.polish_bandwidths:
        fwd = polish_pose(xy_a[sa], emb_a[sa], xy_b, emb_b, fwd, spacing_b, tree=tree_b, bandwidth=bw)
        back = polish_pose(xy_b[sb], emb_b[sb], xy_a, emb_a, back, spacing_a, tree=tree_a, bandwidth=bw)
    back = back.inverse()
    d = np.arctan2(*(back.R @ fwd.R.T)[[1, 0], [0, 0]])  # angle from fwd to back
    if abs(d) > np.radians(5) or np.hypot(*(back.t - fwd.t)) > 3 * spacing_b:
        return fwd  # the directions disagree (e.g. one has too little interior overlap): keep the forward one
    r = rotation(d / 2) @ fwd.R
    c = xy_a.mean(axis=0)  # average the two poses' images of a's centroid
    mid = (fwd.apply(c[None]) + back.apply(c[None]))[0] / 2
    sc = c * [1.0, -1.0] if fwd.reflected else c
    return Pose(r, mid - r @ sc, fwd.reflected)


def _reference_index(names: list[str], reference: int | str | None) -> int:
    if reference is None:
        return 0
    if isinstance(reference, int | np.integer):
        if not 0 <= int(reference) < len(names):
            raise InputError(f"reference index {reference} out of range for {len(names)} sections")
        return int(reference)
    if reference not in names:
        raise InputError(f"reference section {reference!r} not among {names}")
    return names.index(reference)


def align(
    sections: Sequence[ad.AnnData],
    spacing: float | None = None,
    reference: int | str | None = None,
    allow_reflection: bool = False,
    seed: int = 0,
    *,
    z_key: str | None = None,
    spatial_key: str = "spatial",
    config: AlignConfig | None = None,
    progress: bool = False,
    accept_low_confidence: bool = False,
    poses: str = "global",
    nonrigid: bool = False,
) -> AlignmentResult:
    """Align consecutive sections pairwise and stack them in the reference section's frame.

    sections: AnnData with ``obsm[spatial_key]`` [n, 2] and raw counts (or ``uns['X_kind']`` normalised values).
    spacing: µm between consecutive sections, or ``z_key`` (``uns``/``obs``), else ``uns['z_um']`` of each.
    reference: index or name of the section whose frame is kept (identity); default the first.
    poses: ``"global"`` solves a pose graph over every pair within ``config.pose_window`` neighbours, weighted
    by each pair's overlay score (``inrscrecon.align.posegraph``); ``"chained"`` composes consecutive pairs.
    Each pair keeps the best of its aligned, identity and centroid poses by the overlay score
    (``inrscrecon.align.guard``). A pair whose kept score is below ``config.min_score`` raises InputError naming
    the pair, its score and what to try, unless ``accept_low_confidence`` (then it warns).
    nonrigid: after the rigid poses, warp each section onto its (already warped) neighbour on the reference
    side by a smooth displacement field (``inrscrecon.align.nonrigid``); ``obsm['spatial_aligned']`` and
    ``spatial_3d`` then hold the warped coordinates and each transforms entry gains a ``nonrigid`` record.
    """
    cfg = config or AlignConfig()
    sections = list(sections)
    if len(sections) < 2:
        raise InputError(f"align needs at least 2 sections, got {len(sections)}")
    names = [section_name(s, f"section_{i}") for i, s in enumerate(sections)]
    if len(set(names)) < len(names):
        raise InputError(f"section names (uns['section']) must be unique, got {names}")
    ref = _reference_index(names, reference)
    zs = section_z(sections, spacing, z_key)
    mpu = [float(s.uns.get("microns_per_pixel", 1.0)) for s in sections]
    xys = []
    for s, name, m in zip(sections, names, mpu):
        xy = coordinates(s, f"section {name!r}", spatial_key)[:, :2] * m
        _check_geometry(xy, name, spatial_key)
        xys.append(xy)
    # consecutive pairs move each section onto its neighbour on the reference side
    order = [(k, k - 1) for k in range(ref + 1, len(sections))] + [(k, k + 1) for k in range(ref - 1, -1, -1)]
    extra = []
    if poses == "global":
        extra = [(i, i - d) for d in range(2, cfg.pose_window + 1) for i in range(d, len(sections))]
    elif poses != "chained":
        raise InputError(f"poses={poses!r}: use 'global' or 'chained'")
    pairs: dict[int, PairResult] = {}
    edges: list[Edge] = []
    rng = np.random.default_rng(seed)
    for k, nb in tqdm(order + extra, desc="align pairs", disable=not progress, unit="pair"):
        consecutive = abs(k - nb) == 1
        # the BLAS work here is on thin matrices: one thread is faster, and far faster on a busy machine
        with threadpool_limits(limits=1, user_api="blas"):
            try:
                pr = align_pair(
                    sections[k],
                    sections[nb],
                    xys[k],
                    xys[nb],
                    allow_reflection=allow_reflection,
                    seed=seed + k + (0 if consecutive else 7919 * abs(k - nb)),
                    cfg=cfg,
                )
            except InputError:
                if consecutive:
                    raise
                continue  # a further neighbour that cannot be matched only loses its edge
        low = pr.score < cfg.min_score or pr.mirror_support >= cfg.max_mirror_support
        if consecutive:
            if low:
                message = pr.low_confidence_message(cfg.min_score, cfg.max_mirror_support, allow_reflection)
                if not accept_low_confidence:
                    raise InputError(message)
                warnings.warn(message, stacklevel=2)
            pairs[k] = pr
        elif low or pr.pose_source != "aligned":
            continue
        pts = xys[k][rng.choice(len(xys[k]), min(len(xys[k]), 64), replace=False)]
        edges.append(Edge(k, nb, pr.pose, max(pr.score, 1e-3), pts))
    if poses == "global":
        solved, _ = solve_pose_graph(len(sections), ref, edges)
    else:
        solved = chain_poses(len(sections), ref, {(e.i, e.j): e for e in edges})
    poses_of = dict(enumerate(solved))
    fields = _nonrigid_fields(sections, xys, poses_of, order, ref, seed, cfg, progress) if nonrigid else {}
    transforms = []
    for k, name in enumerate(names):
        pose = poses_of[k]
        z = float(np.mean(zs[k]))
        entry = {
            "name": name,
            "rotation": pose.R.tolist(),
            "translation": pose.t.tolist(),
            "reflected": bool(pose.reflected),
            "z": z,
            "inlier_fraction": 1.0 if k == ref else pairs[k].inlier_fraction,
            "microns_per_unit": mpu[k],
            "aligned_to": None if k == ref else pairs[k].fixed,
            **affines(pose, mpu[k], z),
        }
        if k != ref:
            entry.update(
                agreement=pairs[k].agreement,
                residual_um=pairs[k].residual_um,
                overlap=pairs[k].overlap,
                score=pairs[k].score,
                pose_source=pairs[k].pose_source,
            )
        if fields:
            entry["nonrigid"] = nonrigid_record(fields[k])
        transforms.append(entry)
    aligned = stack_sections(sections, names, xys, poses_of, zs, fields or None)
    aligned.uns["align"] = {
        "reference": names[ref],
        "poses": poses,
        "transforms_json": json.dumps(transforms),
    }
    return AlignmentResult(
        names[ref],
        transforms,
        [pairs[k] for k, _ in order],
        aligned,
        poses,
        len(edges),
        {names[k]: f for k, f in fields.items()},
    )


def nonrigid_record(f: DisplacementField) -> dict:
    """The transforms.json record of a section's displacement field (the file name is added on writing)."""
    d = np.hypot(*f.displacement.reshape(-1, 2).T)
    return {
        "interpolation": "bilinear",
        "grid_origin_um": f.origin.tolist(),
        "grid_spacing_um": f.spacing.tolist(),
        "grid_shape": list(f.displacement.shape[:2]),
        "max_displacement_um": float(d.max()),
        **{k: v for k, v in f.info.items() if k in ("lambda", "held_out_gain", "kept")},
    }


def _nonrigid_fields(
    sections: list[ad.AnnData],
    xys: list[np.ndarray],
    poses_of: dict[int, Pose],
    order: list[tuple[int, int]],
    ref: int,
    seed: int,
    cfg: AlignConfig,
    progress: bool,
) -> dict[int, DisplacementField]:
    """Displacement field of every section (zero for the reference), fitted outward from the reference so
    that each section is warped onto its neighbour's warped cells."""
    xy_ref = poses_of[ref].apply(xys[ref])
    lo, hi = xy_ref.min(axis=0), xy_ref.max(axis=0)
    fields = {ref: DisplacementField.zeros(lo, np.maximum(hi - lo, 1.0), (2, 2))}
    warped = {ref: xy_ref}
    n_max = cfg.nonrigid.max_cells
    for k, nb in tqdm(order, desc="non-rigid", disable=not progress, unit="section"):
        rng = np.random.default_rng([seed, k, 2])
        xa, xb = poses_of[k].apply(xys[k]), warped[nb]
        ia = np.sort(rng.choice(len(xa), min(len(xa), n_max), replace=False))
        ib = np.sort(rng.choice(len(xb), min(len(xb), n_max), replace=False))
        with threadpool_limits(limits=1, user_api="blas"):
            ea, eb, _ = joint_embedding(sections[k][ia], sections[nb][ib], cfg.n_genes, cfg.n_comps, seed + k)
            fields[k] = fit_displacement(xa[ia], ea, xb[ib], eb, _spacing(xb[ib]), rng, cfg.nonrigid)
        warped[k] = fields[k].apply(xa)
    return fields
