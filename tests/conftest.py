"""Shared fixtures: a small synthetic stack, the real-data folder, and the skip reasons."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("INRSCRECON_DATA", REPO.parent / "shared" / "data"))


def require_data(*names: str) -> Path:
    """Skip (with the reason) unless the shared real-data files are present."""
    missing = [n for n in names if not (DATA_DIR / n).exists()]
    if missing:
        pytest.skip(
            f"real data not found: {DATA_DIR}/{missing[0]} (set INRSCRECON_DATA or run from a checkout with ../shared/data)"
        )
    return DATA_DIR


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Each test starts from torch.compile's state in a fresh process: compiled code left by earlier tests
    would count against dynamo's recompile limit and turn sizes symbolic (automatic dynamic shapes)."""
    yield
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


def write_posed_sections(folder: Path, cfg) -> tuple[list[str], object]:
    """Synthetic sections of ``cfg`` (a SynthConfig) at their true poses (``obsm['spatial']`` = true x, y),
    written as ``folder/s{k}.h5ad`` → (paths, truth)."""
    from inrscrecon.data.synthetic import make_sections

    sections, truth = make_sections(cfg)
    files = []
    for k, s in enumerate(sections):
        s.obsm["spatial"] = truth.xyz(k)[:, :2]
        files.append(str(folder / f"s{k}.h5ad"))
        s.write_h5ad(files[-1])
    return files, truth


@pytest.fixture(scope="session")
def small_stack():
    """(sections, truth) of a small 4-section synthetic stack, 400 cells × 60 genes each, at true poses."""
    from inrscrecon.data.synthetic import SynthConfig, make_sections

    sections, truth = make_sections(SynthConfig(n_sections=4, cells_per_section=400, n_genes=60, seed=3))
    for k, s in enumerate(sections):
        s.obsm["spatial_3d"] = truth.xyz(k)
    return sections, truth


def assert_no_worse_than_bf16(name: str, impl, torch_bf16, fp32, tol: float = 2e-2) -> None:
    """The bf16 rule: |impl − fp32| ≤ |torch_bf16 − fp32| + tol·max|fp32| elementwise, and impl finite (the
    fp32 reference and torch's bf16 computed on the same rounded inputs)."""
    import torch

    a, lo, r = (x.detach().float().cpu() for x in (impl, torch_bf16, fp32))
    assert torch.isfinite(a).all(), f"{name}: NaN/Inf"
    excess = (a - r).abs() - (lo - r).abs() - tol * r.abs().max()
    assert (excess <= 0).all(), f"{name}: worse than torch bf16 by {excess.max().item():.3g}"


def load_interpreted(name: str, kernel: str):
    """Import a Triton kernel module; where its kernels were decorated before TRITON_INTERPRET=1 was set
    (no CUDA), reload it and the shared helper module so that every kernel runs in the interpreter."""
    import torch

    mod = importlib.import_module(name)
    if torch.cuda.is_available() or type(getattr(mod, kernel)).__name__ == "InterpretedFunction":
        return mod
    importlib.reload(importlib.import_module("inrscrecon.kernels._precision"))
    return importlib.reload(sys.modules[name])
