"""Pose graph: the joint solution of noisy pairwise poses keeps the stack's error from growing with its length,
where chaining the consecutive poses lets it grow with the section index."""

from __future__ import annotations

import numpy as np
import pytest

from inrscrecon.align.kabsch import Pose, rotation
from inrscrecon.align.posegraph import Edge, chain_poses, solve_pose_graph

N, WINDOW = 12, 3  # the default window of align (AlignConfig.pose_window)


def _rms(est: Pose, true: Pose, pts: np.ndarray) -> float:
    return float(np.sqrt(((est.apply(pts) - true.apply(pts)) ** 2).sum(axis=1).mean()))


def _stack(seed: int, reflected: bool = False):
    """True poses of N sections (section 0 = identity), their points and noisy pairwise edges up to WINDOW
    apart: each edge is the true relative pose perturbed by 0.5° and 4 µm (s.d.), as pairwise alignment is."""
    rng = np.random.default_rng(seed)
    pts = [rng.uniform(-500, 500, size=(200, 2)) for _ in range(N)]
    flips = [bool(reflected and k % 3 == 1) for k in range(N)]
    true = [Pose.identity()] + [
        Pose(rotation(rng.uniform(0, 2 * np.pi)), rng.uniform(-300, 300, 2), flips[k]) for k in range(1, N)
    ]
    edges = []
    for d in range(1, WINDOW + 1):
        for i in range(d, N):
            j = i - d
            rel = true[j].inverse().compose(true[i])  # i → j
            noise = Pose(rotation(np.radians(rng.normal(0, 0.5))), rng.normal(0, 4.0, 2))
            edges.append(Edge(i, j, noise.compose(rel), 1.0, pts[i][:64]))
    return true, pts, edges


def test_global_error_does_not_grow_with_the_index():
    first_g, last_g, first_c, last_c = [], [], [], []
    for seed in range(8):
        true, pts, edges = _stack(seed)
        chained = chain_poses(N, 0, {(e.i, e.j): e for e in edges if e.i - e.j == 1})
        glob, used = solve_pose_graph(N, 0, edges)
        assert len(used) == len(edges)
        first_c.append(_rms(chained[1], true[1], pts[1]))
        last_c.append(_rms(chained[-1], true[-1], pts[-1]))
        first_g.append(_rms(glob[1], true[1], pts[1]))
        last_g.append(_rms(glob[-1], true[-1], pts[-1]))
    fc, lc, fg, lg = (float(np.mean(v)) for v in (first_c, last_c, first_g, last_g))
    assert lc > 2.0 * fc, (fc, lc)  # chaining: the error of the last section grows
    assert lg <= 1.5 * fc, (fc, lg)  # global: the last section within 1.5× the first pair's chained error
    assert fg <= fc


def test_flags_follow_the_chain_and_a_contradicting_edge_is_dropped():
    true, pts, edges = _stack(0, reflected=True)
    wrong_flag = true[5].reflected == true[2].reflected  # contradicts the flags of the chain
    bad = Edge(5, 2, Pose(rotation(0.3), np.zeros(2), wrong_flag), 1.0, pts[5][:64])
    poses, used = solve_pose_graph(N, 0, edges + [bad])
    assert all(e is not bad for e in used) and len(used) == len(edges)
    assert [p.reflected for p in poses] == [t.reflected for t in true]
    assert max(_rms(p, t, x) for p, t, x in zip(poses, true, pts)) < 15.0


def test_reference_in_the_middle_and_exact_edges():
    true, pts, edges = _stack(1)
    ref = 4
    exact = [Edge(e.i, e.j, true[e.j].inverse().compose(true[e.i]), 1.0, e.points) for e in edges]
    poses, _ = solve_pose_graph(N, ref, exact)
    for k in range(N):  # common frame = the reference's: P_k = T_ref⁻¹ ∘ T_k
        want = true[ref].inverse().compose(true[k])
        assert _rms(poses[k], want, pts[k]) < 1e-6
    with pytest.raises(ValueError, match="consecutive pair"):
        solve_pose_graph(N, 0, [e for e in edges if not (e.i == 3 and e.j == 2)])


@pytest.mark.slow
def test_synthetic_12_section_stack_global_vs_chained():
    """End to end on 12 synthetic sections (400 cells, random poses; 2 seeds averaged): the global poses'
    error of the last section stays within 1.5× the first pair's, and their mean error is below chaining's."""
    import sys
    import warnings
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_align_stack import errors, stack

    from inrscrecon.align import align

    err: dict[str, list[np.ndarray]] = {"chained": [], "global": []}
    for seed in range(2):
        sections, recs = stack(seed, 400)
        for mode in err:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = align(sections, spacing=10.0, seed=seed, poses=mode, accept_low_confidence=True)
            err[mode].append(errors(res, recs))
    chained, glob = np.mean(err["chained"], axis=0), np.mean(err["global"], axis=0)
    assert glob[-1] <= 1.5 * chained[1], (chained.round(1), glob.round(1))
    assert glob[1:].mean() < chained[1:].mean(), (chained.round(1), glob.round(1))
