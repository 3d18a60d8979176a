"""Global poses of a stack from many pairwise alignments (a pose graph), solved jointly.

Each edge is a pairwise alignment i → j (a pose mapping section i's µm coordinates into section j's), with a
confidence weight and sample points of section i. The unknown poses P_k map each section into the common frame
(the reference's, P_ref = identity). The cost is

    Σ_edges w_e Σ_{p ∈ points_i} ‖P_j(T_e p) − P_i(p)‖²,

i.e. the disagreement, over the tissue, between where section i lands directly and where it lands through j.
Reflection flags are fixed first from the consecutive edges (a chain from the reference); an edge whose flag
disagrees with them is dropped. With the flags removed (y = S^r x) every pose is a proper rigid motion
(θ_k, t_k) and Gauss–Newton from the chained poses solves the cost (3 unknowns per section, dense normal
equations: a stack has at most a few hundred sections). Chaining alone lets the error of section k grow with
its distance to the reference; edges to further neighbours tie the chain together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inrscrecon.align.kabsch import FLIP, Pose, rotation

ROT90 = np.array([[0.0, -1.0], [1.0, 0.0]])


@dataclass
class Edge:
    """One pairwise alignment: ``pose`` maps section ``i``'s µm coordinates into section ``j``'s."""

    i: int
    j: int
    pose: Pose
    weight: float
    points: np.ndarray  # [m, 2] sample of section i's µm coordinates


def chain_poses(n: int, ref: int, edges: dict[tuple[int, int], Edge]) -> list[Pose]:
    """Poses by composing consecutive edges outward from ``ref`` (either direction of an edge is used)."""

    def step(a: int, b: int) -> Pose:  # pose of a in b's frame
        if (a, b) in edges:
            return edges[(a, b)].pose
        return edges[(b, a)].pose.inverse()

    poses: list[Pose | None] = [None] * n
    poses[ref] = Pose.identity()
    for k in range(ref + 1, n):
        poses[k] = poses[k - 1].compose(step(k, k - 1))  # type: ignore[union-attr]
    for k in range(ref - 1, -1, -1):
        poses[k] = poses[k + 1].compose(step(k, k + 1))  # type: ignore[union-attr]
    return [p for p in poses if p is not None]


def solve_pose_graph(n: int, ref: int, edges: list[Edge], iters: int = 20) -> tuple[list[Pose], list[Edge]]:
    """Global poses of ``n`` sections (``ref`` fixed at identity) from ``edges``, which must include every
    consecutive pair (k, k ± 1) in one direction. Returns (poses, the edges used)."""
    by_pair = {(e.i, e.j): e for e in edges}
    for k in range(n - 1):
        if (k, k + 1) not in by_pair and (k + 1, k) not in by_pair:
            raise ValueError(f"pose graph needs the consecutive pair ({k}, {k + 1})")
    init = chain_poses(n, ref, by_pair)
    refl = [p.reflected for p in init]
    used = [e for e in edges if e.pose.reflected == (refl[e.i] != refl[e.j]) and e.weight > 0]
    # in flag-free coordinates y = S^r x: y_j = Q y_i + u with Q = S^{r_j} L S^{r_i}, u = S^{r_j} t
    s = [FLIP if r else np.eye(2) for r in refl]
    theta = np.array([np.arctan2(p.R[1, 0], p.R[0, 0]) for p in init])
    trans = np.array([p.t for p in init])
    rel = []
    for e in used:
        q = s[e.j] @ e.pose.linear @ s[e.i]
        u = s[e.j] @ e.pose.t
        y = e.points @ s[e.i].T  # [m, 2]
        rel.append((e.i, e.j, y, y @ q.T + u, np.sqrt(e.weight / len(y))))
    free = [k for k in range(n) if k != ref]
    col = {k: 3 * c for c, k in enumerate(free)}
    for _ in range(iters):
        hess = np.zeros((3 * len(free), 3 * len(free)))
        grad = np.zeros(3 * len(free))
        for i, j, y, yj, sw in rel:
            ri, rj = rotation(theta[i]), rotation(theta[j])
            a, b = yj @ rj.T, y @ ri.T  # section i's points through j, and directly
            res = (a + trans[j] - b - trans[i]) * sw  # [m, 2]
            blocks = {}  # d res / d (θ, tx, ty) of each end, [m, 2, 3]
            for k, pts, sign in ((j, a, 1.0), (i, b, -1.0)):
                if k == ref:
                    continue
                jac = np.zeros((len(y), 2, 3))
                jac[:, :, 0] = pts @ ROT90.T
                jac[:, 0, 1] = jac[:, 1, 2] = 1.0
                blocks[k] = sign * sw * jac
            for k, jk in blocks.items():
                flat_k = jk.reshape(-1, 3)
                grad[col[k] : col[k] + 3] += flat_k.T @ res.reshape(-1)
                for m, jm in blocks.items():
                    hess[col[k] : col[k] + 3, col[m] : col[m] + 3] += flat_k.T @ jm.reshape(-1, 3)
        if not free:
            break
        step = np.linalg.solve(hess + 1e-9 * np.trace(hess) * np.eye(len(grad)), -grad)
        for k in free:
            theta[k] += step[col[k]]
            trans[k] += step[col[k] + 1 : col[k] + 3]
        if np.abs(step).max() < 1e-9 * (1 + np.abs(trans).max()):
            break
    poses = [Pose(rotation(theta[k]), trans[k].copy(), refl[k]) for k in range(n)]
    # a pose of the flag-free coordinates, R y + t with y = S^r x, is exactly Pose(R, t, reflected=r)
    return poses, used
