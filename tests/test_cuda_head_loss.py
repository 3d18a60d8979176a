"""GEMM + fused-loss head of the compiled extension (csrc/sparse_head.cpp, csrc/cuda/sparse_head_kernel.cu)
against ``sparse_head_loss_reference``: values and every gradient, on CPU (always, when the extension is built)
and on CUDA (marked gpu).

Tolerances: fp32 rel 1e-5 (values elementwise; gradients relative to their largest entry: the op sums in
another order); bf16 by |impl − fp32| ≤ |torch_bf16 − fp32| + 2e-2·max|fp32| (Cut Cross-Entropy's rule).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # importing field.fused imports triton: without a GPU its kernels must be decorated for the interpreter, as
    # in the Triton test files that may run after this one
    os.environ["TRITON_INTERPRET"] = "1"

from inrscrecon.errors import InputError  # noqa: E402
from inrscrecon.field import fused  # noqa: E402
from inrscrecon.field.losses import head_loss_reference, sparse_head_loss_reference  # noqa: E402
from inrscrecon.kernels import cuda_head_loss as chl  # noqa: E402

pytestmark = pytest.mark.skipif(
    not chl.is_available("cpu"), reason=f"compiled extension unavailable: {chl.unavailable('cpu')}"
)
UPSTREAM = (1.0, 0.3, 0.2)  # d(objective)/d(loss, rmse, kl): every output's gradient is checked
GPU = pytest.mark.gpu
NEEDS_CUDA = pytest.mark.skipif(
    not chl.is_available("cuda"), reason=f"needs CUDA ops on a GPU: {chl.unavailable('cuda')}"
)


def make_csr(dense: torch.Tensor, extra: int = 0, seed: int = 0, index_dtype=torch.int32):
    """dense [B, M] → (indptr int64 [B+1], indices [CAP], values fp32 [CAP]): each row's non-zeros in random
    order, plus ``extra`` junk slots past indptr[B] (which must be ignored)."""
    gen = torch.Generator().manual_seed(seed)
    nz = dense.nonzero()
    key = nz[:, 0] * len(nz) + torch.randperm(len(nz), generator=gen)
    nz = nz[torch.argsort(key)]
    indptr = torch.zeros(dense.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = torch.bincount(nz[:, 0], minlength=dense.shape[0]).cumsum(0)
    indices = nz[:, 1].to(index_dtype)
    values = dense[nz[:, 0], nz[:, 1]].float()
    if extra:
        indices = torch.cat(
            [indices, torch.randint(0, dense.shape[1], (extra,), generator=gen).to(index_dtype)]
        )
        values = torch.cat([values, torch.rand(extra, generator=gen) * 7 + 1])
    return indptr, indices, values


def problem(n_rows: int, width: int, n_genes: int, density: float = 0.1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, width, generator=gen)
    w = torch.randn(n_genes, width, generator=gen) / width**0.5
    b = torch.randn(n_genes, generator=gen) * 0.5
    mask = torch.rand(n_rows, n_genes, generator=gen) < density
    return h, w, b, mask * (torch.rand(n_rows, n_genes, generator=gen) * 4)


def run(fn, params, csr, lam, row_weight=None, dtype=torch.float32, **kw):
    """(loss, rmse, kl, grads of the upstream mix) of ``fn`` on fresh leaves of ``params`` cast to ``dtype``."""
    leaves = [p.detach().to(dtype).requires_grad_() if p is not None else None for p in params]
    out = fn(*leaves, *csr, lambda_kl=lam, row_weight=row_weight, **kw)
    mix = sum(u * o for u, o in zip(UPSTREAM, out))
    live = [x for x in leaves if x is not None]
    return [o.detach().float() for o in out] + [g.float() for g in torch.autograd.grad(mix, live)]


def ref(h, w, b, indptr, indices, values, lambda_kl=0.0, row_weight=None, **_):
    return sparse_head_loss_reference(h, w, b, indptr, indices, values, lambda_kl, 1e-2, row_weight)


def op(*a, **kw):
    return chl.gemm_sparse_head_loss(*a, **kw)


def assert_rel_close(got, want, rtol=1e-5):
    names = ["loss", "rmse", "kl"] + [f"grad{i}" for i in range(len(want) - 3)]
    for name, g, e in zip(names, got, want):
        assert torch.isfinite(g).all(), f"{name}: NaN/Inf"
        scale = e.abs().max().item() if e.numel() else 0.0
        err = (g - e).abs().max().item() if e.numel() else 0.0
        floor = 1e-6 if name in ("loss", "rmse", "kl") else 1e-9  # KL = 0 exactly at M = 1: cancellation
        assert err <= rtol * scale + floor, f"{name}: max err {err:.3g} vs scale {scale:.3g}"


def to(device, *xs):
    return [x.to(device) if x is not None else None for x in xs]


# ------------------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.7])
@pytest.mark.parametrize(
    "b,w,m,chunk", [(37, 19, 123, 0), (37, 19, 123, 5), (1, 3, 1, 0), (5, 16, 1, 2), (64, 33, 257, 7)]
)
def test_cpu_equals_reference_fp32(b, w, m, chunk, lam):
    h, wt, bias, dense = problem(b, w, m, density=0.3, seed=b + m)
    csr = make_csr(dense, extra=4)
    got = run(op, (h, wt, bias), csr, lam, chunk_rows=chunk)
    assert_rel_close(got, run(ref, (h, wt, bias), csr, lam))


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_cpu_production_shape(lam):
    """W = 256, M = 5000 (small B), 5 % non-zeros, int64 indices, no bias, weighted rows, two chunks."""
    h, w, _, dense = problem(6, 256, 5000, density=0.05, seed=3)
    csr = make_csr(dense, extra=10, index_dtype=torch.int64)
    rw = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0])
    got = run(op, (h, w, None), csr, lam, row_weight=rw, chunk_rows=4)
    assert_rel_close(got, run(ref, (h, w, None), csr, lam, row_weight=rw))


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_cpu_empty_rows_all_zero_batch_and_padding(lam):
    h, w, b, dense = problem(9, 8, 31, density=0.3, seed=5)
    dense[[0, 4, 8]] = 0  # rows with no non-zeros
    csr = make_csr(dense, extra=2)
    assert_rel_close(run(op, (h, w, b), csr, lam), run(ref, (h, w, b), csr, lam))
    zero = make_csr(torch.zeros_like(dense))  # all-zero batch: CAP = 0
    assert zero[1].numel() == 0
    assert_rel_close(run(op, (h, w, b), zero, lam), run(ref, (h, w, b), zero, lam))
    # a batch of padding rows only: every gradient is 0, no NaN
    got = run(op, (h, w, b), csr, lam, row_weight=torch.zeros(9))
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in got[3:])


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_cpu_bf16_no_worse_than_torch_bf16(lam):
    h, w, b, dense = problem(12, 256, 5000, density=0.05, seed=7)
    csr = make_csr(dense)
    exact = run(ref, (h, w, b), csr, lam)
    lowp = run(ref, (h, w, b), csr, lam, dtype=torch.bfloat16)
    got = run(op, (h, w, b), csr, lam, dtype=torch.bfloat16)
    for name, g, e, lo in zip(("loss", "rmse", "kl", "gh", "gw", "gb"), got, exact, lowp):
        assert torch.isfinite(g).all(), name
        allowed = (lo - e).abs() + 2e-2 * e.abs().max().clamp_min(1e-6)
        assert ((g - e).abs() <= allowed).all(), f"{name}: worse than torch bf16"


def test_cpu_autocast_casts_and_keeps_fp32_master_grads():
    h, w, b, dense = problem(10, 32, 70, density=0.2, seed=9)
    csr = make_csr(dense)
    hw = [x.clone().requires_grad_() for x in (h, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = op(*hw, *csr)[0]
    loss.backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 for x in hw)
    want = run(ref, (h, w, b), csr, 0.0)
    assert abs(loss.item() - want[0].item()) < 2e-2 * want[0].item()


def test_cpu_three_gemm_path_and_no_grad():
    """λ = 0 with grad: the forward returns the unscaled gradients (3 GEMM passes); under no_grad none."""
    h, w, b, dense = problem(11, 16, 40, density=0.2, seed=2)
    indptr, indices, values = make_csr(dense)
    args = (h, w, b, indptr, indices, values, None)
    with_grad = torch.ops.inrscrecon.gemm_sparse_head_loss(*args, 0.0, 1e-2, True, 0)
    assert with_grad[5].shape == (11, 16) and with_grad[6].shape == (40, 16) and with_grad[7].shape == (40,)
    no_grad = torch.ops.inrscrecon.gemm_sparse_head_loss(*args, 0.0, 1e-2, False, 0)
    assert no_grad[5].numel() == 0 and no_grad[6].numel() == 0
    torch.testing.assert_close(with_grad[1], no_grad[1])
    with torch.no_grad():
        out = op(h.requires_grad_(), w, b, indptr, indices, values)
    assert not out[0].requires_grad
    with pytest.raises(ValueError, match="grad_in_forward needs"):
        torch.ops.inrscrecon.gemm_sparse_head_loss(*args, 0.5, 1e-2, True, 0)


def test_opcheck_forward_and_backward_ops():
    h, w, b, dense = problem(7, 8, 13, density=0.3, seed=4)
    indptr, indices, values = make_csr(dense, extra=2)
    rw = torch.rand(7)
    for lam, gif in ((0.0, True), (0.0, False), (0.6, False)):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        torch.library.opcheck(
            torch.ops.inrscrecon.gemm_sparse_head_loss.default,
            (*leaves, indptr, indices, values, rw, lam, 1e-2, gif, 3),
        )
    fwd = torch.ops.inrscrecon.gemm_sparse_head_loss(
        h, w, b, indptr, indices, values, rw, 0.6, 1e-2, False, 0
    )
    coef = torch.tensor([0.3, 0.1])
    torch.library.opcheck(
        torch.ops.inrscrecon.gemm_sparse_head_loss_backward.default,
        (h, w, b, indptr, indices, values, rw, fwd[3], coef, 1e-2, True, 0),
    )


def test_compiles_fullgraph():
    h, w, b, dense = problem(8, 8, 21, density=0.3, seed=6)
    csr = make_csr(dense)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]

    def step(h, w, b, indptr, indices, values):
        loss, rmse, kl = op(h, w, b, indptr, indices, values, lambda_kl=0.5)
        return loss + 0.1 * rmse

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves, *csr)
    got.backward()
    want = run(ref, (h, w, b), csr, 0.5)
    assert abs(got.item() - (want[0] + 0.1 * want[1]).item()) < 1e-5 * got.item()
    assert leaves[0].grad is not None and torch.isfinite(leaves[1].grad).all()


def test_bad_input_raises_clear_errors():
    h, w, b, dense = problem(4, 6, 10, density=0.4, seed=8)
    indptr, indices, values = make_csr(dense)
    bad = indices.clone()
    bad[0] = 10  # gene outside [0, M)
    with pytest.raises(ValueError, match=r"indices\[0\] = 10 is not a gene"):
        op(h, w, b, indptr, bad, values)
    with pytest.raises(ValueError, match="indptr must be int64"):
        op(h, w, b, indptr.int(), indices, values)
    with pytest.raises(ValueError, match="weight must be"):
        op(h, w[:, :3], b, indptr, indices, values)
    over = indptr.clone()
    over[-1] = indices.numel() + 5
    with pytest.raises(ValueError, match="not a valid slot range"):
        op(h, w, b, over, indices, values)


def test_switch_routes_cuda_backend_to_the_op():
    h, w, b, dense = problem(9, 12, 30, density=0.3, seed=10)
    csr = make_csr(dense, extra=3)
    got = run(lambda *a, **kw: fused.sparse_head_loss(*a, impl="cuda", **kw), (h, w, b), csr, 0.4)
    assert_rel_close(got, run(ref, (h, w, b), csr, 0.4))
    # dense target: turned into CSR rows, same contract as head_loss_reference
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    out = fused.head_loss(*leaves, dense, 1.0, 1e-2, impl="cuda")
    want = head_loss_reference(h, w, b, dense, 1.0, 1e-2)
    for a, e in zip(out, want):
        torch.testing.assert_close(a, e.float(), rtol=1e-5, atol=1e-7)
    assert fused.resolve_impl("auto", "cpu", "sparse_head_loss") == "torch"  # auto: only the measured table


def test_switch_cuda_backend_unavailable_raises(monkeypatch):
    monkeypatch.setattr(fused, "_cuda_ext", lambda: (chl, ""))
    if not chl.is_available("cuda"):
        with pytest.raises(InputError, match="backend 'cuda' requested for sparse_head_loss on cuda"):
            fused.resolve_impl("cuda", "cuda", "sparse_head_loss")
    monkeypatch.setattr(fused, "_cuda_ext", lambda: (None, "CUDA extension not importable"))
    with pytest.raises(InputError, match="not importable"):
        fused.resolve_impl("cuda", "cpu", "sparse_head_loss")


# ------------------------------------------------------------------------------------------------------------
# CUDA (the same list on a GPU)
# ------------------------------------------------------------------------------------------------------------


@GPU
@NEEDS_CUDA
@pytest.mark.parametrize("lam", [0.0, 0.7])
@pytest.mark.parametrize(
    "b,w,m,chunk", [(37, 19, 123, 0), (37, 19, 123, 5), (1, 3, 1, 0), (300, 256, 5000, 64)]
)
def test_cuda_equals_reference_fp32(b, w, m, chunk, lam):
    torch.backends.cuda.matmul.allow_tf32 = False
    h, wt, bias, dense = problem(b, w, m, density=0.05 if m > 1000 else 0.3, seed=b + m)
    csr = to("cuda", *make_csr(dense, extra=4))
    params = to("cuda", h, wt, bias)
    got = run(op, params, csr, lam, chunk_rows=chunk)
    assert_rel_close(got, run(ref, params, csr, lam), rtol=2e-5)


@GPU
@NEEDS_CUDA
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_cuda_bf16_padding_empty_rows_int64(lam):
    h, w, b, dense = problem(200, 256, 5000, density=0.05, seed=11)
    dense[:7] = 0
    csr = to("cuda", *make_csr(dense, extra=9, index_dtype=torch.int64))
    rw = torch.ones(200, device="cuda")
    rw[-5:] = 0
    params = to("cuda", h, w, b)
    exact = run(ref, params, csr, lam, row_weight=rw)
    lowp = run(ref, params, csr, lam, row_weight=rw, dtype=torch.bfloat16)
    got = run(op, params, csr, lam, row_weight=rw, dtype=torch.bfloat16, chunk_rows=48)
    for name, g, e, lo in zip(("loss", "rmse", "kl", "gh", "gw", "gb"), got, exact, lowp):
        assert torch.isfinite(g).all(), name
        allowed = (lo - e).abs() + 2e-2 * e.abs().max().clamp_min(1e-6)
        assert ((g - e).abs() <= allowed).all(), f"{name}: worse than torch bf16"
    zero = to("cuda", *make_csr(torch.zeros(200, 5000)))
    assert_rel_close(run(op, params, zero, lam), run(ref, params, zero, lam), rtol=2e-5)


@GPU
@NEEDS_CUDA
def test_cuda_opcheck():
    h, w, b, dense = problem(7, 8, 13, density=0.3, seed=4)
    indptr, indices, values = to("cuda", *make_csr(dense, extra=2))
    h, w, b = to("cuda", h, w, b)
    for lam, gif in ((0.0, True), (0.6, False)):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        torch.library.opcheck(
            torch.ops.inrscrecon.gemm_sparse_head_loss.default,
            (*leaves, indptr, indices, values, None, lam, 1e-2, gif, 0),
        )
