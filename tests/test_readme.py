"""The README's Python section runs as written (in a temporary folder), and its outputs are what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str = "## Python") -> list[str]:
    """The ```python blocks of one README section."""
    text = README.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


@pytest.mark.slow  # aligns, fits and renders a small stack (≈ 30 s on 2 cores)
def test_readme_python_section_runs(tmp_path, monkeypatch):
    import torch

    torch.set_num_threads(1)
    blocks = python_blocks()
    assert blocks, "README has no python block under '## Python'"
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the README's own code
    assert ns["expr"].shape == (5, 2)
    assert ns["adata"].obsm["spatial"].shape == (5, 2) and "log1p" in ns["adata"].uns
    assert "spatial_aligned" in ns["imputed"].obsm
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "volume.ome.zarr").is_dir()
    assert (tmp_path / "volume_slices.png").exists()
    grid = ns["volume"].grid
    assert grid.shape[0] >= 2 and 0 < ns["volume"].voxels_inside < grid.n_points  # masked to the tissue
