"""Alignment quality: pose errors against ground truth, and layer agreement between aligned sections."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from inrscrecon.align.kabsch import Pose


def pose_errors(est: Pose, true: Pose, points: np.ndarray) -> tuple[float, float]:
    """(rotation error in degrees, translation error) of an estimated pose vs the true one.

    Translation error is the displacement of the centroid of ``points`` [n, 2] (the section's observed cells)
    between the two poses, in the poses' output units, which decouples it from the choice of origin. A wrong
    reflection counts as 180°.
    """
    if est.reflected != true.reflected:
        return 180.0, float("inf")
    d = est.R @ true.R.T
    rot = abs(float(np.degrees(np.arctan2(d[1, 0], d[0, 0]))))
    c = points.mean(axis=0, keepdims=True)
    return rot, float(np.hypot(*(est.apply(c) - true.apply(c))[0]))


def layer_agreement(
    xy_a: np.ndarray, labels_a: np.ndarray, xy_b: np.ndarray, labels_b: np.ndarray, ignore: str = "unknown"
) -> float:
    """Mean over both directions of the fraction of cells whose nearest cell in the other section has the same
    label; cells labelled ``ignore`` are dropped from both sides first. xy in one common frame, [n, 2]."""
    ka, kb = labels_a != ignore, labels_b != ignore
    xa, la, xb, lb = xy_a[ka], np.asarray(labels_a)[ka], xy_b[kb], np.asarray(labels_b)[kb]
    _, ja = cKDTree(xb).query(xa, k=1)
    _, jb = cKDTree(xa).query(xb, k=1)
    return float((np.mean(la == lb[ja]) + np.mean(lb == la[jb])) / 2)


def composition_ceiling(labels_a: np.ndarray, labels_b: np.ndarray, ignore: str = "unknown") -> float:
    """Largest fraction of mass any coupling with equal mass per spot can put on same-label pairs:
    Σ_l min(p_a(l), p_b(l)) over the label proportions of both sections (``ignore`` dropped)."""
    la, lb = np.asarray(labels_a), np.asarray(labels_b)
    la, lb = la[la != ignore], lb[lb != ignore]
    labels = np.union1d(la, lb)
    pa = np.array([np.mean(la == v) for v in labels])
    pb = np.array([np.mean(lb == v) for v in labels])
    return float(np.minimum(pa, pb).sum())


def paste_accuracy(
    xy_a: np.ndarray, labels_a: np.ndarray, xy_b: np.ndarray, labels_b: np.ndarray, ignore: str = "unknown"
) -> tuple[float, float]:
    """PASTE's alignment accuracy (fraction of matched mass joining same-label spots) for the matching that
    sends each spot's mass to its nearest spot in the other section, both directions, equal mass per spot
    (half the mass from each side), with its ceiling from label composition: (accuracy, ceiling).

    With that matching the accuracy equals ``layer_agreement``; the ceiling is ``composition_ceiling``.
    """
    return layer_agreement(xy_a, labels_a, xy_b, labels_b, ignore), composition_ceiling(
        labels_a, labels_b, ignore
    )


def centroid_only(xy: np.ndarray) -> np.ndarray:
    """Naive baseline: translate the section's centroid to the origin."""
    return xy - xy.mean(axis=0)
