"""A short training run with each available backend reaches the torch run's validation loss, on the
device-resident sparse-target path that ``fit`` takes by default.

Without a GPU the Triton kernels run in the interpreter (tiny shapes); the CUDA run skips with its reason.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from conftest import load_interpreted  # noqa: E402

from inrscrecon.data.preprocess import select_genes  # noqa: E402
from inrscrecon.data.stack import build_cell_table  # noqa: E402
from inrscrecon.field.encoding import EncodingConfig  # noqa: E402
from inrscrecon.field.losses import LossConfig  # noqa: E402
from inrscrecon.train.fit import TrainConfig, fit  # noqa: E402


def _interpreted() -> None:
    load_interpreted("inrscrecon.kernels.triton_sparse_head_loss", "_sparse_head_kernel")
    load_interpreted("inrscrecon.kernels.triton_head_loss", "_head_stats_kernel")
    load_interpreted("inrscrecon.kernels.triton_trunk", "_trunk_fused_fwd_kernel")


@pytest.fixture(scope="module")
def table():
    from inrscrecon.data.synthetic import SynthConfig, make_sections

    sections, truth = make_sections(SynthConfig(n_sections=3, cells_per_section=160, n_genes=24, seed=5))
    for k, s in enumerate(sections):
        s.obsm["spatial_3d"] = truth.xyz(k)
    return build_cell_table(sections, select_genes(sections, 24))


def _run(table, backend: str):
    device = "cuda" if CUDA else "cpu"
    tc = TrainConfig(
        epochs=3, batch_size=96, seed=0, device=device, backend=backend, progress=False, patience=10
    )
    res = fit(
        table,
        EncodingConfig(n_bands=2),
        width=16,
        n_layers=2,
        loss_cfg=LossConfig.preset("no_rc"),
        train_cfg=tc,
    )
    assert res.data_info["placement"].startswith("CSR resident")  # the sparse-target (device-table) path
    return [h["val_rmse"] for h in res.history], [h["loss"] for h in res.history]


@pytest.mark.triton
def test_triton_training_matches_torch(table):
    pytest.importorskip("triton", reason="triton is not installed")
    _interpreted()
    val_t, loss_t = _run(table, "torch")
    val_k, loss_k = _run(table, "triton")
    # same seed, same batches: curves agree to float tolerance (kernel reductions run in another order)
    assert val_k == pytest.approx(val_t, rel=1e-3, abs=1e-4)
    assert loss_k == pytest.approx(loss_t, rel=1e-3, abs=1e-4)


@pytest.mark.gpu
def test_cuda_training_matches_torch(table):
    if not CUDA:
        pytest.skip("no CUDA device: the CUDA extension backend needs a GPU")
    from inrscrecon.kernels.cuda_head_loss import is_available

    if not is_available("cuda"):
        pytest.skip("inrscrecon._C was built without CUDA ops")
    val_t, _ = _run(table, "torch")
    val_c, _ = _run(table, "cuda")
    assert val_c == pytest.approx(val_t, rel=1e-3, abs=1e-4)
