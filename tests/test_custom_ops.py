"""The fused kernels as ``torch.library`` ops: ``opcheck`` (schema, fake tensors, autograd registration,
AOT dispatch) for every registered op, a train step compiled with ``fullgraph=True`` (no graph break, so
no host sync inside the step), and the no-grad trunk storing no activations.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)
on small shapes; with CUDA the same tests run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` that decorates our kernels

pytest.importorskip("triton", reason="triton is not installed")

from conftest import load_interpreted  # noqa: E402

from inrscrecon.field import fused  # noqa: E402
from inrscrecon.field.losses import sparse_head_loss_reference  # noqa: E402
from inrscrecon.field.mlp import Trunk  # noqa: E402
from inrscrecon.kernels import ops  # noqa: E402

pytestmark = pytest.mark.triton
DEV = torch.device("cuda" if CUDA else "cpu")

load_interpreted("inrscrecon.kernels.triton_sparse_head_loss", "_sparse_head_kernel")
load_interpreted("inrscrecon.kernels.triton_head_loss", "_head_stats_kernel")
tt = load_interpreted("inrscrecon.kernels.triton_trunk", "_trunk_fused_fwd_kernel")


def _sparse_inputs(n_rows=20, width=16, n_genes=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, width, generator=g).to(DEV).requires_grad_()
    w = (torch.randn(n_genes, width, generator=g) / width**0.5).to(DEV).requires_grad_()
    b = (torch.randn(n_genes, generator=g) * 0.3).to(DEV).requires_grad_()
    dense = (torch.rand(n_rows, n_genes, generator=g) < 0.3) * torch.rand(n_rows, n_genes, generator=g) * 3
    dense[2] = 0
    nz = dense.nonzero()
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    indptr[1:] = torch.bincount(nz[:, 0], minlength=n_rows).cumsum(0)
    indices = torch.cat([nz[:, 1].int(), torch.tensor([1, 5], dtype=torch.int32)])  # 2 unused slots
    values = torch.cat([dense[nz[:, 0], nz[:, 1]], torch.tensor([9.0, 9.0])])
    return h, w, b, indptr.to(DEV), indices.to(DEV), values.to(DEV), dense.to(DEV)


@pytest.mark.parametrize("lam,grad_in_forward", [(0.0, True), (0.0, False), (0.7, False)])
def test_opcheck_sparse_head_loss(lam, grad_in_forward):
    h, w, b, indptr, indices, values, _ = _sparse_inputs()
    rw = torch.ones(h.shape[0], device=DEV)
    rw[-3:] = 0
    torch.library.opcheck(
        torch.ops.inrscrecon.sparse_head_loss.default,
        (h, w, b, indptr, indices, values, rw, lam, 1e-2, grad_in_forward),
    )
    rowstat = torch.rand(2, h.shape[0], device=DEV) + 0.1
    coef = torch.tensor([0.01, 0.02], device=DEV)
    torch.library.opcheck(
        torch.ops.inrscrecon.sparse_head_loss_backward.default,
        (h.detach(), w.detach(), None, indptr, indices, values, None, rowstat, coef, 1e-2, lam != 0),
    )


def test_opcheck_dense_head_loss():
    h, w, b, *_, dense = _sparse_inputs(seed=1)
    torch.library.opcheck(torch.ops.inrscrecon.head_loss.default, (h, w, b, dense, 0.5, 1e-2))
    torch.library.opcheck(torch.ops.inrscrecon.head_loss.default, (h, w, None, dense, 0.0, 1e-2))
    rowstat = torch.rand(2, h.shape[0], device=DEV) + 0.1
    coef = torch.tensor([0.01, 0.02], device=DEV)
    torch.library.opcheck(
        torch.ops.inrscrecon.head_loss_backward.default,
        (h.detach(), w.detach(), b.detach(), dense, rowstat, coef, 1e-2, True),
    )


def _trunk(width=32, n_bands=2, n_layers=3, seed=0):
    torch.manual_seed(seed)
    trunk = Trunk(3 + 6 * n_bands, width, n_layers).to(DEV)
    coords = (torch.rand(40, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(DEV)
    return trunk, coords


def test_opcheck_trunk():
    trunk, coords = _trunk()
    ws = [lay.weight for lay in trunk.layers]
    bs = [lay.bias for lay in trunk.layers]
    torch.library.opcheck(torch.ops.inrscrecon.trunk.default, (coords, ws, bs, 2, True))
    torch.library.opcheck(
        torch.ops.inrscrecon.trunk.default,
        (coords, ws, bs, 2, False),
        test_utils=("test_schema", "test_faketensor"),
    )
    ys = torch.ops.inrscrecon.trunk(coords, [w.detach() for w in ws], [b.detach() for b in bs], 2, True)
    g = torch.randn(40, 32, device=DEV)
    torch.library.opcheck(
        torch.ops.inrscrecon.trunk_backward.default, (coords, [w.detach() for w in ws], ys, g, 2)
    )


def test_trunk_op_matches_torch_and_stores_nothing_under_no_grad(monkeypatch):
    trunk, coords = _trunk(seed=2)
    h_triton = fused.trunk_forward(coords, 2, trunk, impl="triton")
    h_triton.square().sum().backward()
    g_triton = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad()
    h_torch = fused.trunk_forward(coords, 2, trunk, impl="torch")
    h_torch.square().sum().backward()
    torch.testing.assert_close(h_triton, h_torch, rtol=1e-4, atol=1e-5)
    for a, e in zip(g_triton, [p.grad for p in trunk.parameters()]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)

    seen: list[tuple[bool, int]] = []
    real = tt._forward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs.get("store_all", args[-1]), out.shape[0]))
        return out

    monkeypatch.setattr(tt, "_forward", spy)
    with torch.no_grad():
        h = fused.trunk_forward(coords, 2, trunk, impl="triton")
        h2 = tt.triton_trunk(
            coords, 2, [lay.weight for lay in trunk.layers], [lay.bias for lay in trunk.layers]
        )
    assert seen == [(False, 1), (False, 1)]  # one [1, B, W] buffer, no per-layer activations kept
    assert not h.requires_grad and not h2.requires_grad
    torch.testing.assert_close(h, h_torch.detach(), rtol=1e-4, atol=1e-5)
    seen.clear()
    fused.trunk_forward(coords, 2, trunk, impl="triton").sum().backward()
    assert seen == [(True, 3)]


@pytest.mark.parametrize("lam", [0.0, 0.5])  # λ = 0: gradients from the forward; λ ≠ 0: backward kernel
def test_train_step_compiles_fullgraph_with_fused_ops(lam):
    """Trunk → sparse head + loss under torch.compile(fullgraph=True) (a graph break raises), then its AOT
    backward; values and every gradient equal the eager torch reference."""
    trunk, coords = _trunk(width=16, seed=3)
    h, w, b, indptr, indices, values, _ = _sparse_inputs(n_rows=40, width=16, n_genes=29, seed=3)
    head_w = w.detach().clone().requires_grad_()
    head_b = b.detach().clone().requires_grad_()
    rw = torch.ones(40, device=DEV)

    def step(coords, indptr, indices, values, rw):
        hidden = fused.trunk_forward(coords, 2, trunk, impl="triton")
        loss, rmse, kl = fused.sparse_head_loss(
            hidden, head_w, head_b, indptr, indices, values, lam, row_weight=rw, impl="triton"
        )
        return loss, rmse, kl

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # forward + AOT backward graph
    out = compiled(coords, indptr, indices, values, rw)
    out[0].backward()
    grads = [p.grad.clone() for p in [*trunk.parameters(), head_w, head_b]]
    for p in [*trunk.parameters(), head_w, head_b]:
        p.grad = None
    hidden = trunk(ops_fourier(coords))
    ref = sparse_head_loss_reference(hidden, head_w, head_b, indptr, indices, values, lam, row_weight=rw)
    ref[0].backward()
    torch.testing.assert_close(out[0].detach(), ref[0].detach(), rtol=1e-4, atol=1e-5)
    for a, p in zip(grads, [*trunk.parameters(), head_w, head_b]):
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-4)


def test_dense_head_loss_compiles_fullgraph():
    h, w, b, *_, dense = _sparse_inputs(seed=4)

    def f(h, w, b, t):
        return fused.head_loss(h, w, b, t, 0.5, impl="triton")[0]

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(h, w, b, dense)
    ref = fused.head_loss(h, w, b, dense, 0.5, impl="torch")[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def ops_fourier(coords: torch.Tensor) -> torch.Tensor:
    from inrscrecon.field.encoding import fourier_encode

    return fourier_encode(coords, 2, include_input=True)


def test_compute_dtype_follows_autocast():
    x = torch.zeros(2, 2, device=DEV)
    assert ops.compute_dtype(x, x) == torch.float32
    assert ops.compute_dtype(x.bfloat16(), x) == torch.float32
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        assert ops.compute_dtype(x, x) == torch.bfloat16


def test_trunk_autocast_bf16_with_fp32_masters():
    """Under bf16 autocast the fused trunk runs its matmuls in bf16 (tensor cores on a GPU) and the fp32
    master weights get fp32 gradients no worse than torch's own autocast."""
    trunk, coords = _trunk(width=48, seed=5)
    g = torch.randn(40, 48, device=DEV)

    def run(impl, autocast):
        trunk.zero_grad(set_to_none=True)
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=autocast):
            h = fused.trunk_forward(coords, 2, trunk, impl=impl)
        (h.float() * g).sum().backward()
        return h.detach().float(), [p.grad.clone() for p in trunk.parameters()], h.dtype

    h_t, g_t, dt_t = run("triton", True)
    h_lo, g_lo, dt_lo = run("torch", True)
    h_32, g_32, _ = run("torch", False)
    assert dt_t == torch.bfloat16 == dt_lo
    assert all(x.dtype == torch.float32 for x in g_t)
    for name, a, lo, r in [("hidden", h_t, h_lo, h_32), *zip(["grad"] * len(g_t), g_t, g_lo, g_32)]:
        excess = (a - r).abs() - (lo - r).abs() - 2e-2 * r.abs().max()
        assert (excess <= 0).all(), f"{name}: worse than torch autocast by {excess.max().item():.3g}"


def test_wide_bf16_trunk_runs_per_layer_by_design(monkeypatch):
    """W = 256 and 128 in bf16 (weight tiles that spill when staged whole) take the per-layer kernels;
    W = 64 stays fused."""
    launched: list[str] = []
    for name in ("_trunk_fused_fwd_kernel", "_linear_relu_fwd_kernel"):
        kernel = getattr(tt, name)

        class Spy:
            def __init__(self, k, n):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                launched.append(self.n)
                return self.k[grid]

        monkeypatch.setattr(tt, name, Spy(kernel, name))
    for width, expect in (
        (256, "_linear_relu_fwd_kernel"),
        (128, "_linear_relu_fwd_kernel"),
        (64, "_trunk_fused_fwd_kernel"),
    ):
        launched.clear()
        ws = [torch.randn(width, 15, device=DEV).bfloat16(), torch.randn(width, width, device=DEV).bfloat16()]
        bs = [torch.zeros(width, device=DEV).bfloat16() for _ in ws]
        coords = torch.rand(8, 3, device=DEV) * 2 - 1
        with torch.no_grad():
            tt.triton_trunk(coords, 2, ws, bs)
        assert set(launched) == {expect}, (width, launched)
