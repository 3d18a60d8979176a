"""Rigid 2D poses, weighted Kabsch and a RANSAC loop over expression matches.

Pose convention (shared with ``inrscrecon.data.synthetic``): ``y = R @ (S @ x) + t`` with ``S = diag(1, -1)``
when ``reflected`` else the identity; R is a proper rotation (det +1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLIP = np.diag([1.0, -1.0])


def rotation(theta: float | np.ndarray) -> np.ndarray:
    """Rotation matrix for an angle in radians: [2, 2], or [..., 2, 2] for an array of angles."""
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


@dataclass
class Pose:
    """A rigid motion of the plane, possibly with a reflection applied first: ``x ↦ R S x + t``."""

    R: np.ndarray  # [2, 2], det +1
    t: np.ndarray  # [2]
    reflected: bool = False

    @staticmethod
    def identity() -> Pose:
        return Pose(np.eye(2), np.zeros(2), False)

    @property
    def linear(self) -> np.ndarray:
        """R S, [2, 2] (det −1 when reflected)."""
        return self.R @ FLIP if self.reflected else self.R.copy()

    @property
    def angle_deg(self) -> float:
        return float(np.degrees(np.arctan2(self.R[1, 0], self.R[0, 0])))

    def apply(self, xy: np.ndarray) -> np.ndarray:
        """Map points [n, 2] → [n, 2]."""
        return xy @ self.linear.T + self.t

    def matrix(self) -> np.ndarray:
        """Homogeneous [3, 3] matrix."""
        m = np.eye(3)
        m[:2, :2] = self.linear
        m[:2, 2] = self.t
        return m

    @staticmethod
    def from_matrix(m: np.ndarray) -> Pose:
        """Inverse of ``matrix()``; the linear part must be orthogonal."""
        lin = m[:2, :2]
        reflected = bool(np.linalg.det(lin) < 0)
        r = lin @ FLIP if reflected else lin
        u, _, vt = np.linalg.svd(r)  # re-orthogonalise against round-off
        return Pose(u @ vt, m[:2, 2].copy(), reflected)

    def compose(self, other: Pose) -> Pose:
        """``self ∘ other``: apply ``other`` first."""
        return Pose.from_matrix(self.matrix() @ other.matrix())

    def inverse(self) -> Pose:
        return Pose.from_matrix(np.linalg.inv(self.matrix()))


def weighted_kabsch(
    p: np.ndarray, q: np.ndarray, w: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Proper rotation R [2, 2] and translation t [2] minimising Σ w_i ‖R p_i + t − q_i‖² (p, q: [n, 2]).

    H = Σ w (p − p̄)(q − q̄)ᵀ = U Σ Vᵀ, R = V diag(1, det(V Uᵀ)) Uᵀ, t = q̄ − R p̄.
    """
    w = np.ones(len(p)) if w is None else np.asarray(w, dtype=np.float64)
    total = w.sum()
    if len(p) < 2 or total <= 0:
        raise ValueError("weighted_kabsch needs at least 2 points with positive total weight")
    pc = (w @ p) / total
    qc = (w @ q) / total
    h = ((p - pc) * w[:, None]).T @ (q - qc)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, d]) @ u.T
    return r, qc - r @ pc


def fit_pose(p: np.ndarray, q: np.ndarray, w: np.ndarray | None = None, reflected: bool = False) -> Pose:
    """Weighted Kabsch for a pose with a fixed reflection flag."""
    r, t = weighted_kabsch(p @ FLIP if reflected else p, q, w)
    return Pose(r, t, reflected)


def _residuals(p: np.ndarray, q: np.ndarray, theta: np.ndarray, t: np.ndarray) -> np.ndarray:
    """‖R(θ_h) p_i + t_h − q_i‖ for H hypotheses and n matches → [H, n]."""
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    dx = c * p[None, :, 0] - s * p[None, :, 1] + t[:, 0:1] - q[None, :, 0]
    dy = s * p[None, :, 0] + c * p[None, :, 1] + t[:, 1:2] - q[None, :, 1]
    return np.hypot(dx, dy)


@dataclass
class Hypothesis:
    pose: Pose
    score: float  # summed weight of inlier matches
    inlier_fraction: float


def ransac_poses(
    p: np.ndarray,
    q: np.ndarray,
    w: np.ndarray,
    threshold: float,
    *,
    n_iter: int = 2000,
    allow_reflection: bool = False,
    top: int = 6,
    rng: np.random.Generator,
    chunk: int = 128,
) -> list[Hypothesis]:
    """Distinct best poses mapping matched points p → q ([m, 2] each, weights w [m]) by 2-point RANSAC.

    Each sample of two matches whose lengths agree (rigid motions keep distances) gives one proper pose (and one
    reflected pose when allowed); a hypothesis scores the summed weight of matches with residual < ``threshold``.
    The ``top`` best distinct hypotheses are re-fitted by weighted Kabsch on their inliers (local optimisation).
    """
    m = len(p)
    prob = w / w.sum()
    i = rng.choice(m, size=n_iter, p=prob)
    j = rng.choice(m, size=n_iter, p=prob)
    hyps: list[tuple[float, Pose]] = []
    for refl in [False, True] if allow_reflection else [False]:
        pp = p @ FLIP if refl else p
        u, v = pp[j] - pp[i], q[j] - q[i]
        lu, lv = np.hypot(*u.T), np.hypot(*v.T)
        ok = (lu > 2 * threshold) & (np.abs(lu - lv) < 0.5 * threshold)
        if not ok.any():
            continue
        theta = np.arctan2(v[ok, 1], v[ok, 0]) - np.arctan2(u[ok, 1], u[ok, 0])
        rot = rotation(theta)  # [H, 2, 2]
        mid_p = (pp[i[ok]] + pp[j[ok]]) / 2
        mid_q = (q[i[ok]] + q[j[ok]]) / 2
        t = mid_q - np.einsum("hab,hb->ha", rot, mid_p)
        for s in range(0, len(theta), chunk):
            res = _residuals(pp, q, theta[s : s + chunk], t[s : s + chunk])
            scores = (res < threshold) @ w
            for h in np.flatnonzero(scores > 0):
                hyps.append((float(scores[h]), Pose(rot[s + h], t[s + h], refl)))
    hyps.sort(key=lambda x: -x[0])
    chosen: list[Pose] = []
    out: list[Hypothesis] = []
    for _, pose in hyps:
        if len(chosen) >= top:
            break
        if any(_close(pose, c, threshold) for c in chosen):
            continue
        chosen.append(pose)
        out.append(_local_refit(p, q, w, pose, threshold))
    return sorted(out, key=lambda h: -h.score)


def _close(a: Pose, b: Pose, threshold: float) -> bool:
    if a.reflected != b.reflected:
        return False
    dang = abs((a.angle_deg - b.angle_deg + 180) % 360 - 180)
    return dang < 10 and float(np.hypot(*(a.t - b.t))) < 2 * threshold


def _local_refit(p: np.ndarray, q: np.ndarray, w: np.ndarray, pose: Pose, threshold: float) -> Hypothesis:
    """Iterated weighted Kabsch on the inliers of ``pose`` (LO-RANSAC)."""
    for tau in (threshold, threshold, 0.75 * threshold):
        inl = np.hypot(*(pose.apply(p) - q).T) < tau
        if inl.sum() < 3:
            break
        pose = fit_pose(p[inl], q[inl], w[inl], pose.reflected)
    inl = np.hypot(*(pose.apply(p) - q).T) < threshold
    return Hypothesis(pose, float(w[inl].sum()), float(inl.mean()))
