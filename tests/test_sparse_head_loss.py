"""Sparse-target head + loss (CSR targets) against the dense reference: values and every gradient."""

from __future__ import annotations

import pytest
import torch

from inrscrecon.errors import InputError
from inrscrecon.field.fused import sparse_head_loss
from inrscrecon.field.losses import head_loss_reference, sparse_head_loss_reference


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
        lambda *a: sparse_head_loss(*a, lambda_kl=0.5, impl="torch"), fullgraph=True, backend="eager"
    )
    params = [x.clone().requires_grad_() for x in (h, w, b)]
    out = fn(*params, indptr, indices, values)
    ref = sparse_head_loss_reference(h, w, b, indptr, indices, values, 0.5)
    torch.testing.assert_close(out[0], ref[0])
    out[0].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
