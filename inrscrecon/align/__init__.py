"""Alignment stage: expression-matched, robust rigid registration of consecutive sections into one 3D frame."""

from inrscrecon.align.pipeline import AlignConfig, AlignmentResult, PairResult, align

__all__ = ["AlignConfig", "AlignmentResult", "PairResult", "align"]
