"""Sparse-target head + loss (CSR targets) against the dense reference: values and every gradient.

The torch reference is checked against the dense ``head_loss_reference``; the fused Triton op against the
torch reference (in the Triton interpreter without a GPU: TRITON_INTERPRET=1 is set before triton is
imported). Tolerances: fp32 rel 1e-5 (values elementwise; gradients relative to their largest entry: the
kernel sums in another order, measured ≤ 6e-7); bf16 by |impl − fp32| ≤ |torch_bf16 − fp32| + 2e-2·max|fp32|.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` that decorates our kernels
DEV = torch.device("cuda" if CUDA else "cpu")

from conftest import assert_no_worse_than_bf16  # noqa: E402

from inrscrecon.errors import InputError  # noqa: E402
from inrscrecon.field.fused import sparse_head_loss  # noqa: E402
from inrscrecon.field.losses import head_loss_reference, sparse_head_loss_reference  # noqa: E402


def make_csr(dense: torch.Tensor, extra: int = 0, shuffle: bool = True, seed: int = 0):
    """dense [B, M] → (indptr int64 [B+1], indices int32 [CAP], values fp32 [CAP]) with ``extra`` junk slots
    past indptr[B] (which must be ignored) and the non-zeros of each row in random order."""
    gen = torch.Generator().manual_seed(seed)
    n_rows = dense.shape[0]
    nz = dense.nonzero()
    key = nz[:, 0] * (dense.shape[1] + 1) + (
        torch.randperm(len(nz), generator=gen) % (dense.shape[1] + 1) if shuffle else nz[:, 1]
    )
    nz = nz[torch.argsort(key, stable=True)]
    counts = torch.bincount(nz[:, 0], minlength=n_rows)
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    indptr[1:] = counts.cumsum(0)
    indices = nz[:, 1].to(torch.int32)
    values = dense[nz[:, 0], nz[:, 1]].float()
    if extra:
        indices = torch.cat([indices, torch.randint(0, dense.shape[1], (extra,), generator=gen).int()])
        values = torch.cat([values, torch.rand(extra, generator=gen) * 7 + 1])
    return indptr, indices, values


def problem(n_rows: int, width: int, n_genes: int, density: float = 0.1, seed: int = 0, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, width, generator=gen)
    w = torch.randn(n_genes, width, generator=gen) / width**0.5
    b = torch.randn(n_genes, generator=gen) * 0.5 if bias else None
    mask = torch.rand(n_rows, n_genes, generator=gen) < density
    dense = mask * (torch.rand(n_rows, n_genes, generator=gen) * 4)
    return h, w, b, dense


def grads(out: torch.Tensor, params) -> list[torch.Tensor]:
    live = [p for p in params if p is not None]
    return list(torch.autograd.grad(out, live))


def assert_matches_dense(h, w, b, dense, lam, extra=3, rtol=1e-5, atol=1e-6):
    params = [x.clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    indptr, indices, values = make_csr(dense, extra=extra)
    sp = sparse_head_loss_reference(*params, indptr, indices, values, lambda_kl=lam)
    de = head_loss_reference(*params, dense, lambda_kl=lam)
    for a, d in zip(sp, de):
        torch.testing.assert_close(a, d.float(), rtol=rtol, atol=atol)
    # a mix of the three outputs, so every output's gradient is checked
    mix = lambda o: o[0] + 0.3 * o[1] + 0.2 * o[2]  # noqa: E731
    for ga, gd in zip(grads(mix(sp), params), grads(mix(de), params)):
        torch.testing.assert_close(ga, gd, rtol=rtol, atol=atol)


@pytest.mark.parametrize("lam", [0.0, 0.7])
@pytest.mark.parametrize("shape", [(7, 5, 13), (37, 19, 123), (1, 3, 1), (5, 16, 1)])
def test_reference_equals_dense(shape, lam):
    h, w, b, dense = problem(*shape, density=0.3)
    assert_matches_dense(h, w, b, dense, lam)


def test_reference_equals_dense_without_bias_and_production_shape():
    h, w, b, dense = problem(6, 256, 5000, density=0.05, bias=False)
    assert_matches_dense(h, w, None, dense, 1.0)
    h, w, b, dense = problem(6, 256, 5000, density=0.05, seed=1)
    assert_matches_dense(h, w, b, dense, 0.5)


def test_empty_rows_and_all_zero_batch():
    h, w, b, dense = problem(9, 8, 31, density=0.4)
    dense[[0, 4, 8]] = 0  # rows with no non-zeros, first and last included
    assert_matches_dense(h, w, b, dense, 1.0)
    assert_matches_dense(h, w, b, torch.zeros_like(dense), 1.0, extra=5)
    assert_matches_dense(h, w, b, torch.zeros_like(dense), 1.0, extra=0)


def test_padding_rows_are_ignored():
    h, w, b, dense = problem(10, 8, 29, density=0.3)
    real = 6
    weight_rows = torch.zeros(10)
    weight_rows[:real] = 1
    dense[real:] = torch.rand(10 - real, 29) * 5  # garbage in padding rows must not count
    indptr, indices, values = make_csr(dense, extra=4)
    params = [x.clone().requires_grad_() for x in (h, w, b)]
    sp = sparse_head_loss_reference(*params, indptr, indices, values, 0.6, row_weight=weight_rows)
    de = head_loss_reference(params[0][:real], params[1], params[2], dense[:real], 0.6)
    for a, d in zip(sp, de):
        torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-6)
    for ga, gd in zip(grads(sp[0], params), grads(de[0], params)):
        torch.testing.assert_close(ga, gd, rtol=1e-5, atol=1e-6)


def test_junk_past_indptr_end_is_ignored():
    h, w, b, dense = problem(5, 4, 17, density=0.3)
    indptr, indices, values = make_csr(dense)
    base = sparse_head_loss_reference(h, w, b, indptr, indices, values, 1.0)
    junk = sparse_head_loss_reference(
        h,
        w,
        b,
        indptr,
        torch.cat([indices, torch.tensor([0, 16, 3], dtype=torch.int32)]),
        torch.cat([values, torch.tensor([5.0, 100.0, 2.0])]),
        1.0,
    )
    for a, c in zip(base, junk):
        assert torch.equal(a, c)


def test_switch_torch_impl_and_input_errors():
    h, w, b, dense = problem(5, 4, 17)
    indptr, indices, values = make_csr(dense)
    out = sparse_head_loss(h, w, b, indptr, indices, values, 0.5, impl="torch")
    ref = sparse_head_loss_reference(h, w, b, indptr, indices, values, 0.5)
    for a, c in zip(out, ref):
        torch.testing.assert_close(a, c)
    auto = sparse_head_loss(h, w, b, indptr, indices, values, 0.5)  # CPU → torch
    torch.testing.assert_close(auto[0], ref[0])
    with pytest.raises(InputError, match="indptr"):
        sparse_head_loss(h, w, b, indptr[:-1], indices, values)
    with pytest.raises(InputError, match="indptr"):
        sparse_head_loss(h, w, b, indptr.int(), indices, values)
    with pytest.raises(InputError, match="values"):
        sparse_head_loss(h, w, b, indptr, indices, values[:-1])
    with pytest.raises(InputError, match="row_weight"):
        sparse_head_loss(h, w, b, indptr, indices, values, row_weight=torch.ones(4))
    with pytest.raises(InputError, match="backend"):
        sparse_head_loss(h, w, b, indptr, indices, values, impl="nope")


def test_compiles_fullgraph_on_cpu():
    h, w, b, dense = problem(6, 8, 21, density=0.3)
    indptr, indices, values = make_csr(dense, extra=2)
    fn = torch.compile(
        lambda *a: sparse_head_loss(*a, lambda_kl=0.5, impl="auto"), fullgraph=True, backend="eager"
    )
    params = [x.clone().requires_grad_() for x in (h, w, b)]
    out = fn(*params, indptr, indices, values)
    ref = sparse_head_loss_reference(h, w, b, indptr, indices, values, 0.5)
    torch.testing.assert_close(out[0], ref[0])
    out[0].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


# ------------------------------------------------------------------------------------------------------------
# fused Triton op against the torch reference
# ------------------------------------------------------------------------------------------------------------


def _triton():
    pytest.importorskip("triton", reason="triton is not installed")
    from conftest import load_interpreted

    load_interpreted("inrscrecon.kernels.triton_sparse_head_loss", "_sparse_head_kernel")
    from inrscrecon.kernels import ops

    return ops


def _rel_close(name, a, e, rtol=1e-5):
    a, e = a.detach().float().cpu(), e.detach().float().cpu()
    assert torch.isfinite(a).all(), f"{name}: NaN/Inf"
    err = (a - e).abs().max().item()
    scale = e.abs().max().clamp_min(1e-12).item()
    assert err <= rtol * scale, f"{name}: max |diff| {err:.3g} > {rtol:g} × max|ref| {scale:.3g}"


def _run(fn, params, csr, lam, row_weight=None, **kw):
    leaves = [p.detach().clone().to(DEV).requires_grad_() if p is not None else None for p in params]
    indptr, indices, values = (x.to(DEV) for x in csr)
    rw = row_weight.to(DEV) if row_weight is not None else None
    out = fn(*leaves, indptr, indices, values, lam, 1e-2, rw, **kw)
    (out[0] + 0.3 * out[1] + 0.2 * out[2]).backward()
    return [o.detach() for o in out], [p.grad if p is not None else None for p in leaves]


def _ref(*a, **kw):
    return sparse_head_loss_reference(*a, **kw)


TRITON_CASES = [  # (B, W, M, λ, density): none a block multiple; M = 1; empty rows added below
    (37, 19, 123, 0.0, 0.3),
    (37, 19, 123, 0.7, 0.3),
    (5, 16, 1, 0.5, 0.5),
    (70, 33, 300, 1.0, 0.6),  # dense rows: several KCH chunks per tile
]


@pytest.mark.triton
@pytest.mark.parametrize("b,w,m,lam,density", TRITON_CASES)
def test_triton_equals_reference_fp32(b, w, m, lam, density):
    ops = _triton()
    h, wt, bias, dense = problem(b, w, m, density=density, seed=b + m)
    dense[[0, b // 2]] = 0  # rows without non-zeros
    csr = make_csr(dense, extra=5)
    out, grads = _run(ops.triton_sparse_head_loss, (h, wt, bias), csr, lam)
    r_out, r_grads = _run(_ref, (h, wt, bias), csr, lam)
    for name, a, e in zip(("loss", "rmse", "kl"), out, r_out):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=name)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, r_grads):
        _rel_close(name, a, e)


@pytest.mark.triton
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_triton_production_shape(lam):
    """W = 256, M = 5000 with a small batch (one row block in the interpreter)."""
    ops = _triton()
    h, wt, bias, dense = problem(24, 256, 5000, density=0.05, seed=7)
    dense[3] = 0
    csr = make_csr(dense, extra=2)
    out, grads = _run(ops.triton_sparse_head_loss, (h, wt, bias), csr, lam)
    d_out, d_grads = _run(
        lambda hh, ww, bb, *_a, **_k: head_loss_reference(hh, ww, bb, dense.to(DEV), lam),
        (h, wt, bias),
        csr,
        lam,
    )
    for name, a, e in zip(("loss", "rmse", "kl"), out, d_out):
        torch.testing.assert_close(a, e.float(), rtol=1e-5, atol=1e-6, msg=name)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, d_grads):
        _rel_close(name, a, e)


@pytest.mark.triton
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_triton_production_shape_bf16(lam):
    """W = 256, M = 5000 in bf16 (small B for the interpreter), a row without non-zeros: bf16 operands, then
    bf16 autocast over fp32 masters, each no worse than torch's bf16 against the fp32 reference."""
    ops = _triton()
    h, wt, bias, dense = problem(8, 256, 5000, density=0.05, seed=19)
    dense[5] = 0
    csr = make_csr(dense, extra=2)
    h16, w16, b16 = h.bfloat16(), wt.bfloat16(), bias.bfloat16()
    out, grads = _run(ops.triton_sparse_head_loss, (h16, w16, b16), csr, lam)
    lo_out, lo_grads = _run(_ref, (h16, w16, b16), csr, lam)
    r_out, r_grads = _run(_ref, (h16.float(), w16.float(), b16.float()), csr, lam)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    for name, a, lo, r in zip(("loss", "rmse", "kl"), out, lo_out, r_out):
        assert_no_worse_than_bf16(name, a, lo, r, 1e-3)
    for name, a, lo, r in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, lo_grads, r_grads):
        assert_no_worse_than_bf16(name, a, lo, r)
    leaves = [p.detach().clone().to(DEV).requires_grad_() for p in (h16.float(), w16.float(), b16.float())]
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        ac = ops.triton_sparse_head_loss(*leaves, *(x.to(DEV) for x in csr), lam)
    (ac[0] + 0.3 * ac[1] + 0.2 * ac[2]).backward()
    assert all(p.grad.dtype == torch.float32 for p in leaves)
    assert_no_worse_than_bf16("autocast loss", ac[0], lo_out[0], r_out[0], 1e-3)
    for name, p, lo, r in zip(("grad_hidden", "grad_weight", "grad_bias"), leaves, lo_grads, r_grads):
        assert_no_worse_than_bf16("autocast " + name, p.grad, lo, r)


@pytest.mark.triton
def test_triton_padding_rows_unsorted_int64_and_all_zero():
    ops = _triton()
    h, wt, bias, dense = problem(20, 12, 77, density=0.3, seed=3)
    rw = torch.ones(20)
    rw[15:] = 0
    indptr, indices, values = make_csr(dense, extra=3, shuffle=True)
    for csr in ((indptr, indices, values), (indptr, indices.long(), values)):
        out, grads = _run(ops.triton_sparse_head_loss, (h, wt, bias), csr, 0.4, row_weight=rw)
        r_out, r_grads = _run(_ref, (h, wt, bias), csr, 0.4, row_weight=rw)
        for a, e in zip(out, r_out):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, r_grads):
            _rel_close(name, a, e)
    zero = make_csr(torch.zeros(20, 77), extra=4)
    for lam in (0.0, 1.0):
        out, grads = _run(ops.triton_sparse_head_loss, (h, wt, None), zero, lam)
        r_out, r_grads = _run(_ref, (h, wt, None), zero, lam)
        for a, e in zip(out, r_out):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        assert grads[2] is None
        _rel_close("grad_hidden", grads[0], r_grads[0])
        _rel_close("grad_weight", grads[1], r_grads[1])


@pytest.mark.triton
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_triton_batch_of_padding_rows_only_has_zero_gradients(lam):
    """Every row weight 0 (a shard or batch of padding rows only): the reference's zero gradients, not NaN
    (the RMSE coefficient 1 / (M·Σw·RMSE) would overflow at the floors Σw = 1e-30, RMSE = 1e-15)."""
    ops = _triton()
    h, wt, bias, dense = problem(6, 8, 13, density=0.3, seed=1)
    csr = make_csr(dense, extra=2)
    rw = torch.zeros(6)
    out, grads = _run(ops.triton_sparse_head_loss, (h, wt, bias), csr, lam, row_weight=rw)
    r_out, r_grads = _run(_ref, (h, wt, bias), csr, lam, row_weight=rw)
    for a, e in zip(out, r_out):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, r_grads):
        assert torch.isfinite(a).all() and not a.any(), f"{name}: {a.abs().max()}"
        assert not e.any()


@pytest.mark.triton
@pytest.mark.parametrize("lam", [0.0, 0.8])
def test_triton_chunks_and_forward_vs_backward_gradients(lam):
    """Several dz chunks (chunk_rows = BLOCK_B); λ = 0 gradients from the forward equal the backward's."""
    _triton()
    from inrscrecon.kernels import ops
    from inrscrecon.kernels import triton_sparse_head_loss as k

    h, wt, bias, dense = problem(150, 16, 90, density=0.3, seed=5)
    indptr, indices, values = make_csr(dense, extra=1)
    indices, values = ops.sort_rows(indptr, indices, values, 90)
    blocks = k.SparseHeadBlocks(block_b=64, block_m=64, kch=4, chunk_rows=64)
    args = (h.to(DEV), wt.to(DEV), bias.to(DEV), indptr.to(DEV), indices.to(DEV), values.to(DEV), None)
    loss, rmse, kl, rowstat, wsum, gh_u, gw_u, gb_u = k.sparse_head_forward(
        *args, lam, 1e-2, lam == 0, blocks
    )
    ref = sparse_head_loss_reference(
        *[a.detach().requires_grad_() if i < 3 else a for i, a in enumerate(args[:6])], lam
    )
    torch.testing.assert_close(loss, ref[0].detach(), rtol=1e-5, atol=1e-6)
    c_r = 1.0 / (90 * float(wsum) * float(rmse))
    coef = torch.tensor([c_r, 0.0 if lam == 0 else 1.0 / float(wsum)], device=DEV)
    gh, gw, gb = k.sparse_head_backward(*args, rowstat, coef, 1e-2, lam != 0, blocks)
    leaves = [p.detach().clone().requires_grad_() for p in args[:3]]
    r = sparse_head_loss_reference(*leaves, *args[3:6], lam)
    (r[1] + r[2]).backward()
    for name, a, p in zip(("grad_hidden", "grad_weight", "grad_bias"), (gh, gw, gb), leaves):
        _rel_close(name, a, p.grad)
    if lam == 0:
        for a, u in zip((gh, gw, gb), (gh_u, gw_u, gb_u)):
            _rel_close("forward-grad", c_r * u, a)


@pytest.mark.triton
def test_triton_bf16_and_autocast():
    ops = _triton()
    h, wt, bias, dense = problem(40, 32, 150, density=0.2, seed=11)
    csr = make_csr(dense, extra=2)
    h16, w16, b16 = h.bfloat16(), wt.bfloat16(), bias.bfloat16()
    out, grads = _run(ops.triton_sparse_head_loss, (h16, w16, b16), csr, 0.5)
    lo_out, lo_grads = _run(_ref, (h16, w16, b16), csr, 0.5)
    r_out, r_grads = _run(_ref, (h16.float(), w16.float(), b16.float()), csr, 0.5)
    assert all(g.dtype == torch.bfloat16 for g in grads)

    for name, a, lo, r in zip(("loss", "rmse", "kl"), out, lo_out, r_out):
        assert_no_worse_than_bf16(name, a, lo, r, 1e-3)
    for name, a, lo, r in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, lo_grads, r_grads):
        assert_no_worse_than_bf16(name, a, lo, r)
    # autocast with fp32 master weights: bf16 matmuls, fp32 gradients on the fp32 leaves
    leaves = [p.detach().clone().to(DEV).requires_grad_() for p in (h, wt, bias)]
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        ac = ops.triton_sparse_head_loss(*leaves, *(x.to(DEV) for x in csr), 0.5)
    (ac[0] + 0.3 * ac[1] + 0.2 * ac[2]).backward()
    assert all(p.grad.dtype == torch.float32 for p in leaves)
    for name, a, lo, r in zip(
        ("grad_hidden", "grad_weight", "grad_bias"), [p.grad for p in leaves], lo_grads, r_grads
    ):
        assert_no_worse_than_bf16(name, a, lo, r)
    assert_no_worse_than_bf16("loss", ac[0], lo_out[0], r_out[0], 1e-3)


@pytest.mark.triton
def test_switch_triton_impl_and_no_grad():
    _triton()
    h, wt, bias, dense = problem(30, 8, 40, density=0.3)
    csr = make_csr(dense)
    args = [x.to(DEV) for x in (h, wt, bias, *csr)]
    got = sparse_head_loss(*args, lambda_kl=0.5, impl="triton")
    ref = sparse_head_loss_reference(*args, lambda_kl=0.5)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the forward computes no gradients (nothing to scale later)
        out = torch.ops.inrscrecon.sparse_head_loss(
            *args[:3], args[3], args[4], args[5], None, 0.0, 1e-2, False
        )
    assert out[5].numel() == 0 and out[6].numel() == 0


@pytest.mark.triton
def test_triton_small_tiles_from_env(monkeypatch):
    """GPU-sized tiles (several gene tiles per row, K loop, KCH = 2 while-loop steps) through the tuning
    override; a malformed override is one clear error."""
    ops = _triton()
    from inrscrecon.kernels import triton_sparse_head_loss as k

    h, wt, bias, dense = problem(40, 40, 150, density=0.4, seed=13)
    csr = make_csr(dense, extra=3)
    monkeypatch.setenv(k.BLOCKS_ENV, "16,32,2,16,4")
    for lam in (0.0, 0.6):
        out, grads = _run(ops.triton_sparse_head_loss, (h, wt, bias), csr, lam)
        r_out, r_grads = _run(_ref, (h, wt, bias), csr, lam)
        for a, e in zip(out, r_out):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, r_grads):
            _rel_close(name, a, e)
    monkeypatch.setenv(k.BLOCKS_ENV, "64,64")
    with pytest.raises(ValueError, match="INRSCRECON_SPARSE_HEAD_BLOCKS"):
        ops.triton_sparse_head_loss(h.to(DEV), wt.to(DEV), bias.to(DEV), *(x.to(DEV) for x in csr))


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter is too slow for this batch)")
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_triton_gpu_batch_of_16k_in_several_chunks(lam):
    """B = 16 384, W = 256, M = 5000 at 5 %: default tiles, three dz chunks; fp32 and bf16 autocast."""
    ops = _triton()
    h, wt, bias, dense = problem(16384, 256, 5000, density=0.05, seed=17)
    csr = make_csr(dense, shuffle=False)
    out, grads = _run(ops.triton_sparse_head_loss, (h, wt, bias), csr, lam)
    r_out, r_grads = _run(_ref, (h, wt, bias), csr, lam)
    for a, e in zip(out, r_out):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, r_grads):
        _rel_close(name, a, e, rtol=1e-3)

    def autocast_run(fn):
        leaves = [p.detach().clone().to(DEV).requires_grad_() for p in (h, wt, bias)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            o = fn(*leaves, *(x.to(DEV) for x in csr), lam)
        (o[0] + 0.3 * o[1] + 0.2 * o[2]).backward()
        return [x.detach() for x in o], [p.grad for p in leaves]

    ac_out, ac_grads = autocast_run(ops.triton_sparse_head_loss)
    lo_out, lo_grads = autocast_run(_ref)
    names = ("loss", "grad_hidden", "grad_weight", "grad_bias")
    triples = zip(names, [ac_out[0], *ac_grads], [lo_out[0], *lo_grads], [r_out[0], *r_grads])
    for name, a, lo, r in triples:
        assert_no_worse_than_bf16("autocast " + name, a, lo, r)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (device memory is what is measured)")
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_triton_gpu_fused_step_holds_less_than_one_dense_batch(lam):
    """What fit runs at B = 16 384, W = 256, M = 5000 (bf16 autocast over fp32 masters, sorted CSR rows):
    forward + backward allocate less device memory than ONE fp32 [B, M] tensor (328 MB), which the torch
    path needs several of (target, prediction, their gradients)."""
    ops = _triton()
    n_rows, width, n_genes = 16384, 256, 5000
    h, wt, bias, dense = problem(n_rows, width, n_genes, density=0.05, seed=29)
    csr = [x.to(DEV) for x in make_csr(dense, shuffle=False)]
    del dense
    leaves = [x.to(DEV).requires_grad_() for x in (h, wt, bias)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ops.triton_sparse_head_loss(*leaves, *csr, lam, indices_sorted=True)
    out[0].backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    one_dense = n_rows * n_genes * 4
    assert peak < one_dense, f"peak {peak / 1e6:.0f} MB ≥ one fp32 [B, M] ({one_dense / 1e6:.0f} MB)"
    assert all(torch.isfinite(p.grad).all() for p in leaves)
