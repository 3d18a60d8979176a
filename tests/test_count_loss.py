"""Count likelihoods (Poisson / negative binomial with a library-size offset) of the gene head.

* torch references against brute force (``torch.distributions`` log_prob in fp64, autograd);
* the sparse (CSR) reference against the dense one: values and every gradient (hidden, weight, bias,
  log θ), junk slots past indptr[B], unsorted rows, empty rows, padding rows, the production shape;
* the fused Triton kernels (in the interpreter without a GPU: TRITON_INTERPRET=1 is set before triton is
  imported) against the references, dense and CSR counts, both likelihoods, λ = 0 and λ > 0, fp32
  (rel 1e-5 on the losses and of the largest entry on gradients; 1e-4 against the fp64 brute force at
  extreme dispersions) and bf16 (|kernel − fp32| ≤
  |torch bf16 − fp32| + 2e-2·max|fp32| on gradients, + 1e-3 on the loss); the in-kernel lgamma / digamma /
  log1p against torch; a ``fullgraph`` compile of a step (``opcheck`` of the registered ops: test_custom_ops).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` that decorates our kernels
DEV = torch.device("cuda" if CUDA else "cpu")

from conftest import assert_no_worse_than_bf16  # noqa: E402

from inrscrecon.errors import InputError  # noqa: E402
from inrscrecon.field import fused  # noqa: E402
from inrscrecon.field.losses import (  # noqa: E402
    LossConfig,
    count_head_loss_reference,
    count_nll,
    kl_divergence,
    sparse_count_head_loss_reference,
)

PARAMS = ("grad_hidden", "grad_weight", "grad_bias", "grad_log_theta")
_tc = None  # the count kernel module, once a Triton test has loaded it


def count_problem(
    n_rows: int, width: int, n_genes: int, density: float = 0.3, seed: int = 0, bias: bool = True
):
    """(hidden, weight, bias, counts [B, M] integer-valued fp32, log_offset [B], log_theta [M])."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n_rows, width, generator=gen)
    w = torch.randn(n_genes, width, generator=gen) / width**0.5
    b = torch.randn(n_genes, generator=gen) * 0.5 - 1.0 if bias else None
    rate = torch.rand(n_rows, n_genes, generator=gen) * 6
    mask = torch.rand(n_rows, n_genes, generator=gen) < density
    counts = (torch.poisson(rate, generator=gen) + 1) * mask
    log_offset = torch.log((torch.rand(n_rows, generator=gen) * 9e3 + 1e3) / 1e4)
    log_theta = torch.randn(n_genes, generator=gen) * 1.0
    return h, w, b, counts.float(), log_offset, log_theta


def make_csr(counts: torch.Tensor, extra: int = 0, shuffle: bool = True, seed: int = 0):
    """counts [B, M] → (indptr int64, indices int32, values fp32) with rows' non-zeros in random order and
    ``extra`` junk slots past indptr[B]."""
    gen = torch.Generator().manual_seed(seed)
    nz = counts.nonzero()
    if shuffle:
        nz = nz[torch.argsort(nz[:, 0] * 10**6 + torch.randperm(len(nz), generator=gen), stable=True)]
    indptr = torch.zeros(counts.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = torch.bincount(nz[:, 0], minlength=counts.shape[0]).cumsum(0)
    indices = nz[:, 1].to(torch.int32)
    values = counts[nz[:, 0], nz[:, 1]].float()
    if extra:
        indices = torch.cat([indices, torch.randint(0, counts.shape[1], (extra,), generator=gen).int()])
        values = torch.cat([values, torch.full((extra,), 77.0)])
    return indptr, indices, values


def brute_nll(eta, counts, log_offset, likelihood, log_theta):
    """−log p(y) [B, M] from torch.distributions (fp64)."""
    mu = torch.exp(eta.double() + log_offset.double()[:, None])
    y = counts.double()
    if likelihood == "poisson":
        return -torch.distributions.Poisson(mu).log_prob(y)
    theta = torch.exp(log_theta.double())[None, :].expand_as(mu)
    dist = torch.distributions.NegativeBinomial(total_count=theta, logits=torch.log(mu) - torch.log(theta))
    return -dist.log_prob(y)


def brute_loss(params64, counts, log_offset, likelihood, lam, row_weight=None):
    """(loss, nll, kl) in fp64 from torch.distributions and the KL written out; params64 = (h, w, b, lt)."""
    h, w, b, lt = params64
    n_rows, n_genes = counts.shape
    rw = torch.ones(n_rows, dtype=torch.float64) if row_weight is None else row_weight.double()
    eta = F.linear(h, w, b)
    nll = (rw * brute_nll(eta, counts, log_offset, likelihood, lt).sum(1)).sum() / (n_genes * rw.sum())
    kl = torch.zeros((), dtype=torch.float64)
    if lam:
        target = torch.log1p(counts.double() * torch.exp(-log_offset.double())[:, None])
        q = F.softplus(eta) + 1e-2
        p = target + 1e-2
        qn, pn = q / q.sum(1, keepdim=True), p / p.sum(1, keepdim=True)
        kl = (rw * (qn * torch.log(qn / pn)).sum(1)).sum() / rw.sum()
    return nll + lam * kl, nll, kl


def grads(out, params):
    live = [p for p in params if p is not None]
    return list(torch.autograd.grad(out, live))


def leaves(*xs, dtype=None, device=DEV):
    return [
        None if x is None else x.detach().clone().to(device=device, dtype=dtype or x.dtype).requires_grad_()
        for x in xs
    ]


def rel_close(name, a, e, rtol=1e-5):
    a, e = a.detach().float().cpu(), e.detach().float().cpu()
    assert torch.isfinite(a).all(), f"{name}: NaN/Inf"
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    assert err <= rtol * max(scale, 1e-6), f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def mix(out):
    """A mix of (loss, nll, kl), so that every output's gradient is checked."""
    return out[0] + 0.3 * out[1] + 0.2 * out[2]


# ------------------------------------------------------------------------------------------------------------
# Config and references
# ------------------------------------------------------------------------------------------------------------


def test_loss_config_likelihood_is_validated():
    assert LossConfig().likelihood == "rmse"
    for name in ("rmse", "poisson", "nb"):
        assert LossConfig(likelihood=name).likelihood == name
    with pytest.raises(InputError, match="'zinb'"):
        LossConfig(likelihood="zinb")


@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_count_nll_matches_torch_distributions(likelihood):
    h, w, b, counts, off, lt = count_problem(9, 6, 23, density=0.6, seed=1)
    counts[0, :5] = torch.tensor([0.0, 1.0, 50.0, 400.0, 3.0])  # large counts too
    lt[:5] = torch.tensor([-6.0, -1.0, 3.0, 5.0, 9.0])  # strong to negligible over-dispersion (θ ≈ 8100)
    eta = F.linear(h, w, b)
    got = count_nll(eta, counts, off, likelihood, lt)
    want = brute_nll(eta, counts, off, likelihood, lt)
    assert got.dtype == torch.float32 and got.shape == counts.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_lgamma_ratio_and_its_gradient_at_any_dispersion():
    """lgamma(y + a) − lgamma(a) in fp32 against fp64 torch.lgamma, value and ∂/∂a, a from 1e-3 to 1e5."""
    from inrscrecon.field.losses import lgamma_ratio

    a = torch.logspace(-3, 5, 200)
    y = torch.poisson(torch.rand(200, generator=torch.Generator().manual_seed(0)) * 200)
    y[:20] = 0.0
    a32 = a.clone().requires_grad_()
    got = lgamma_ratio(y, a32)
    (g_got,) = torch.autograd.grad(got.sum(), a32)
    a64 = a.double().requires_grad_()
    want = torch.lgamma(y.double() + a64) - torch.lgamma(a64)
    (g_want,) = torch.autograd.grad(want.sum(), a64)
    assert torch.isfinite(g_got).all()
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)
    # ∂/∂a = ψ(y + a) − ψ(a) ≈ y/a at large a: relative to itself; exactly 0 where y = 0
    assert (g_got[:20] == 0).all()
    torch.testing.assert_close(g_got.double()[20:], g_want[20:], rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("lam", [0.0, 0.6])
@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_dense_reference_against_brute_force(likelihood, lam):
    h, w, b, counts, off, lt = count_problem(11, 7, 19, seed=2)
    rw = torch.rand(11, generator=torch.Generator().manual_seed(5))
    ps = leaves(h, w, b, lt)
    ref = count_head_loss_reference(*ps[:3], counts, off, likelihood, ps[3], lam, 1e-2, rw)
    p64 = leaves(h, w, b, lt, dtype=torch.float64, device="cpu")
    brute = brute_loss(p64, counts, off, likelihood, lam, rw)
    for a, e in zip(ref, brute):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)
    live = ps if likelihood == "nb" else ps[:3]
    live64 = p64 if likelihood == "nb" else p64[:3]
    for name, a, e in zip(PARAMS, grads(mix(ref), live), grads(mix(brute), live64)):
        rel_close(name, a, e, 1e-5)


def test_dense_reference_kl_is_kl_divergence_and_poisson_ignores_theta():
    h, w, b, counts, off, lt = count_problem(6, 5, 17, seed=3)
    loss, nll, kl = count_head_loss_reference(h, w, b, counts, off, "poisson", None, 0.5)
    target = torch.log1p(counts * torch.exp(-off)[:, None])
    torch.testing.assert_close(kl, kl_divergence(F.softplus(F.linear(h, w, b)), target))
    torch.testing.assert_close(loss, nll + 0.5 * kl)
    with_theta = count_head_loss_reference(h, w, b, counts, off, "poisson", lt, 0.5)
    assert torch.equal(with_theta[0], loss)
    with pytest.raises(InputError, match="log_theta"):
        count_head_loss_reference(h, w, b, counts, off, "nb", None)
    with pytest.raises(InputError, match="'rmse'"):
        count_nll(h @ w.T, counts, off, "rmse")


def assert_sparse_matches_dense(h, w, b, counts, off, lt, likelihood, lam, rw=None, extra=3, rtol=1e-5):
    csr = make_csr(counts, extra=extra)
    ps = leaves(h, w, b, lt, device="cpu")
    sp = sparse_count_head_loss_reference(*ps[:3], *csr, off, likelihood, ps[3], lam, 1e-2, rw)
    de = count_head_loss_reference(*ps[:3], counts, off, likelihood, ps[3], lam, 1e-2, rw)
    for a, d in zip(sp, de):
        torch.testing.assert_close(a, d, rtol=rtol, atol=1e-6)
    live = ps if likelihood == "nb" else ps[:3]
    for name, ga, gd in zip(PARAMS, grads(mix(sp), live), grads(mix(de), live)):
        rel_close(name, ga, gd, rtol)


@pytest.mark.parametrize("lam", [0.0, 0.7])
@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
@pytest.mark.parametrize("shape", [(7, 5, 13), (23, 19, 61), (1, 3, 1), (5, 16, 1)])
def test_sparse_reference_equals_dense(shape, likelihood, lam):
    h, w, b, counts, off, lt = count_problem(*shape, density=0.3, seed=shape[2])
    rw = torch.rand(shape[0], generator=torch.Generator().manual_seed(1)) + 0.1
    assert_sparse_matches_dense(h, w, b, counts, off, lt, likelihood, lam, rw)


@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_sparse_reference_empty_rows_padding_and_no_bias(likelihood):
    h, w, _, counts, off, lt = count_problem(9, 8, 31, density=0.4, seed=4, bias=False)
    counts[[0, 4, 8]] = 0
    assert_sparse_matches_dense(h, w, None, counts, off, lt, likelihood, 1.0)
    assert_sparse_matches_dense(h, w, None, torch.zeros_like(counts), off, lt, likelihood, 1.0, extra=0)
    # padding rows (weight 0) carry garbage that must not count
    rw = torch.ones(9)
    rw[6:] = 0
    counts[6:] = 999.0
    csr = make_csr(counts, extra=2)
    sp = sparse_count_head_loss_reference(h, w, None, *csr, off, likelihood, lt, 0.4, row_weight=rw)
    de = count_head_loss_reference(h[:6], w, None, counts[:6], off[:6], likelihood, lt, 0.4)
    for a, d in zip(sp, de):
        torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-6)


def test_sparse_reference_production_shape():
    """W = 256, M = 5000 at 5 % density, B = 8: both likelihoods, with KL."""
    h, w, b, counts, off, lt = count_problem(8, 256, 5000, density=0.05, seed=6)
    for likelihood in ("poisson", "nb"):
        assert_sparse_matches_dense(h, w, b, counts, off, lt, likelihood, 0.5, rtol=2e-5)


def test_fused_switch_torch_and_input_errors():
    h, w, b, counts, off, lt = count_problem(6, 5, 17, seed=7)
    csr = make_csr(counts)
    ref = count_head_loss_reference(h, w, b, counts, off, "nb", lt, 0.3)
    for impl in ("torch", "auto"):  # CPU tensors: auto is torch
        got = fused.count_head_loss(h, w, b, counts, off, "nb", lt, 0.3, impl=impl)
        sp = fused.sparse_count_head_loss(h, w, b, *csr, off, "nb", lt, 0.3, impl=impl)
        for a, c, e in zip(got, sp, ref):
            torch.testing.assert_close(a, e)
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="log_theta"):
        fused.count_head_loss(h, w, b, counts, off, "nb")
    with pytest.raises(InputError, match=r"log_theta must be \[M\]"):
        fused.sparse_count_head_loss(h, w, b, *csr, off, "nb", lt[:-1])
    with pytest.raises(InputError, match="log_offset"):
        fused.count_head_loss(h, w, b, counts, off[:-1], "poisson")
    with pytest.raises(InputError, match="counts must be"):
        fused.count_head_loss(h, w, b, counts[:, :-1], off, "poisson")
    with pytest.raises(InputError, match="'rmse'"):
        fused.sparse_count_head_loss(h, w, b, *csr, off, "rmse")
    with pytest.raises(InputError, match="indptr"):
        fused.sparse_count_head_loss(h, w, b, csr[0][:-1], csr[1], csr[2], off, "poisson")


# ------------------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------------------


def _triton():
    """The count kernel module, every kernel it uses running in the interpreter when there is no GPU."""
    pytest.importorskip("triton", reason="triton is not installed")
    from conftest import load_interpreted

    sparse = load_interpreted("inrscrecon.kernels.triton_sparse_head_loss", "_sparse_head_kernel")
    mod = load_interpreted("inrscrecon.kernels.triton_count_loss", "_count_tile_kernel")
    if mod._csr_target_tile is not sparse._csr_target_tile:  # imported before its helper was reloaded
        import importlib

        mod = importlib.reload(sys.modules["inrscrecon.kernels.triton_count_loss"])
    return mod


def _run(fn, params, data, likelihood, lam, rw=None, dtype=None):
    """fn(params…, data…) → (outputs, gradients of mix(outputs) w.r.t. the live params)."""
    ps = leaves(*params, dtype=dtype)
    if likelihood == "poisson":
        ps[3] = None
    h, w, b, lt = ps
    data = [x.to(DEV) for x in data]
    off = data.pop()
    rw = rw.to(DEV) if rw is not None else None
    out = fn(h, w, b, *data, off, likelihood, lt, lam, 1e-2, rw)
    return [o.detach() for o in out], grads(mix(out), ps)


def _dense_ref(h, w, b, counts, off, likelihood, lt, lam, eps, rw):
    return count_head_loss_reference(h, w, b, counts, off, likelihood, lt, lam, eps, rw)


def _sparse_ref(h, w, b, indptr, indices, values, off, likelihood, lt, lam, eps, rw):
    return sparse_count_head_loss_reference(
        h, w, b, indptr, indices, values, off, likelihood, lt, lam, eps, rw
    )


def _fused(form: str, impl: str = "triton"):
    if form == "dense":
        return lambda *a: fused.count_head_loss(*a, impl=impl)
    return lambda *a: fused.sparse_count_head_loss(*a, impl=impl)


@pytest.mark.triton
@pytest.mark.parametrize("form", ["dense", "csr"])
@pytest.mark.parametrize("lam", [0.0, 0.5])
@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
@pytest.mark.parametrize("shape", [(13, 24, 37), (70, 40, 300), (3, 5, 1)])
def test_triton_matches_reference_fp32(shape, likelihood, lam, form):
    _triton()
    h, w, b, counts, off, lt = count_problem(*shape, seed=sum(shape))
    rw = torch.rand(shape[0], generator=torch.Generator().manual_seed(2))
    rw[0] = 0.0
    data = [counts, off] if form == "dense" else [*make_csr(counts, extra=3), off]
    ref = _dense_ref if form == "dense" else _sparse_ref
    out, g = _run(_fused(form), (h, w, b, lt), data, likelihood, lam, rw)
    r_out, r_g = _run(ref, (h, w, b, lt), data, likelihood, lam, rw)
    for a, e in zip(out, r_out):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert len(g) == (4 if likelihood == "nb" else 3)
    for name, a, e in zip(PARAMS, g, r_g):
        rel_close(name, a, e)


@pytest.mark.triton
@pytest.mark.parametrize("likelihood,form", [("poisson", "csr"), ("nb", "csr"), ("nb", "dense")])
def test_triton_small_tiles_chunks_and_unscaled_forward_grads(likelihood, form):
    """Kernel level: GPU-sized tiles (several gene tiles, K loop, KCH = 2) and several dz chunks; extreme
    dispersions (θ from 7e-3 to 8e3) and counts to ≈ 400, judged against the fp64 brute force. Dense counts:
    the kernel's NLL is complete; CSR counts: the host adds the (y, θ)-only terms (``csr_count_terms``)."""
    tc = _triton()
    from inrscrecon.kernels.ops import csr_count_terms
    from inrscrecon.kernels.triton_sparse_head_loss import SparseHeadBlocks

    h, w, b, counts, off, lt = count_problem(35, 40, 100, density=0.4, seed=9)
    lt[:3] = torch.tensor([-5.0, 4.0, 9.0])
    counts[:, 0] *= 40
    blocks = SparseHeadBlocks(block_b=16, block_m=32, kch=2, block_k=16, chunk_rows=16)
    nb = likelihood == "nb"
    args = [x.to(DEV) if x is not None else None for x in (h, w, b, lt if nb else None)]
    csr = [x.to(DEV) for x in make_csr(counts, shuffle=False)]
    data = [counts.to(DEV), None, None, None] if form == "dense" else [None, *csr]
    o = off.to(DEV)
    lt_leaf = lt.clone().to(DEV).requires_grad_()
    terms = torch.zeros((), device=DEV)
    if form == "csr":
        terms = csr_count_terms(*csr, lt_leaf if nb else None, likelihood, None, 100)
    for lam in (0.0, 0.8):
        out = tc.count_head_forward(*args, *data, o, None, likelihood, lam, 1e-2, lam == 0, blocks)
        ps = leaves(h, w, b, lt, dtype=torch.float64, device="cpu")
        live = ps if nb else ps[:3]
        r = brute_loss(ps, counts, off, likelihood, lam)
        got_out = (out[0] + terms, out[1] + terms, out[2])
        for a, e in zip(got_out, r):
            torch.testing.assert_close(a.detach().double().cpu(), e.detach(), rtol=1e-5, atol=1e-6)
        r_g = grads(r[0], live)
        wsum = out[4]
        coef = torch.stack([1.0 / (100 * wsum), lam / wsum]).float()
        gh, gw, gb, glt = tc.count_head_backward(
            *args, *data, o, None, out[3], coef, likelihood, 1e-2, lam != 0, blocks
        )
        got = [gh, gw, gb]
        if nb:
            extra = torch.autograd.grad(terms, lt_leaf, retain_graph=True)[0] if form == "csr" else 0.0
            got.append(glt + extra)
        for name, a, e in zip(PARAMS, got, r_g):  # θ to 8e3: ∂log θ keeps ≈ 3e-5 of fp32 cancellation
            rel_close(name, a, e, 1e-4)
        if lam == 0:  # the forward's unscaled gradients are the backward's for c_n = 1
            for name, u, a in zip(PARAMS, out[5:], (gh, gw, gb, glt) if nb else (gh, gw, gb)):
                rel_close(name, coef[0] * u, a)


@pytest.mark.triton
@pytest.mark.parametrize("form", ["dense", "csr"])
@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_triton_bf16_and_autocast(likelihood, form):
    _triton()
    h, w, b, counts, off, lt = count_problem(40, 32, 150, density=0.3, seed=11)
    data = [counts, off] if form == "dense" else [*make_csr(counts, extra=2), off]
    ref = _dense_ref if form == "dense" else _sparse_ref
    h16, w16, b16 = h.bfloat16(), w.bfloat16(), b.bfloat16()
    out, g = _run(_fused(form), (h16, w16, b16, lt), data, likelihood, 0.5)
    lo_out, lo_g = _run(ref, (h16, w16, b16, lt), data, likelihood, 0.5)
    r_out, r_g = _run(ref, (h16.float(), w16.float(), b16.float(), lt), data, likelihood, 0.5)
    assert all(x.dtype == torch.bfloat16 for x in g[:3])

    for name, a, lo, r in zip(("loss", "nll", "kl"), out, lo_out, r_out):
        assert_no_worse_than_bf16(name, a, lo, r, 1e-3)
    for name, a, lo, r in zip(PARAMS, g, lo_g, r_g):
        assert_no_worse_than_bf16(name, a, lo, r)
    # autocast with fp32 master weights: bf16 matmuls, fp32 gradients on the fp32 leaves
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        ac_out, ac_g = _run(_fused(form), (h, w, b, lt), data, likelihood, 0.5)
    assert all(x.dtype == torch.float32 for x in ac_g)
    assert_no_worse_than_bf16("autocast loss", ac_out[0], lo_out[0], r_out[0], 1e-3)
    for name, a, lo, r in zip(PARAMS, ac_g, lo_g, r_g):
        assert_no_worse_than_bf16("autocast " + name, a, lo, r)


@pytest.mark.triton
def test_triton_special_functions_match_torch():
    global _tc  # the jitted helper below resolves its names in this module's globals
    _tc = _triton()
    import triton
    import triton.language as tl

    @triton.jit
    def _special(x_ptr, y_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        x = tl.load(x_ptr + offs, mask=ok, other=1.0)
        y = tl.load(y_ptr + offs, mask=ok, other=0.0)
        lg, dg = _tc._lgamma_ratio_and_digamma_diff(y, x)
        tl.store(out_ptr + offs, _tc._lgamma(x), mask=ok)
        tl.store(out_ptr + N + offs, _tc._log1p(x * 1e-3), mask=ok)
        tl.store(out_ptr + 2 * N + offs, lg, mask=ok)
        tl.store(out_ptr + 3 * N + offs, dg, mask=ok)

    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.logspace(-3, 6, 400), torch.arange(1, 60).float(), torch.tensor([5.999, 6.0])])
    y = torch.cat([torch.zeros(50), torch.poisson(torch.rand(x.numel() - 50, generator=gen) * 300)])
    out = torch.empty(4, x.numel(), device=DEV)
    _special[(triton.cdiv(x.numel(), 128),)](x.to(DEV), y.to(DEV), out, x.numel(), BLOCK=128)
    x64, y64 = x.double(), y.double()
    # lgamma and log1p relative to max(1, |value|), the two differences relative to themselves (the ψ
    # difference ≈ y/θ at large θ is what ∂log θ needs), exactly 0 where y = 0. Bounds: lgamma cancels in its
    # shift near its zeros (x = 1, 2: ≈ 1.5e-6 absolute measured), the ratio likewise (≈ 1.2e-6); the others
    # stay near 1e-7 to 3e-7.
    for name, got, want, floor, tol in (
        ("lgamma", out[0], torch.lgamma(x64), 1.0, 4e-6),
        ("log1p", out[1], torch.log1p(x64 * 1e-3), 1.0, 2e-6),
        ("lgamma(y + θ) − lgamma(θ)", out[2], torch.lgamma(y64 + x64) - torch.lgamma(x64), 1e-30, 4e-6),
        ("ψ(y + θ) − ψ(θ)", out[3], torch.digamma(y64 + x64) - torch.digamma(x64), 1e-30, 2e-6),
    ):
        diff = (got.double().cpu() - want).abs()
        err = torch.where(want == 0, diff, diff / (want.abs() + floor))
        worst = int(err.argmax())
        assert err.max().item() < tol, f"{name}: {err.max().item():.3g} at x = {x[worst]}, y = {y[worst]}"


@pytest.mark.triton
def test_triton_dense_integer_counts_and_strided_hidden():
    """Dense counts as int32 (read and converted in the kernel) and a non-contiguous hidden."""
    _triton()
    h, w, b, counts, off, lt = count_problem(21, 12, 45, seed=19)
    wide = torch.randn(21, 24)
    wide[:, ::2] = h
    hs = wide[:, ::2]  # strided view of the same values
    args = [x.to(DEV) for x in (hs, w, b)]
    got = fused.count_head_loss(
        *args, counts.int().to(DEV), off.to(DEV), "nb", lt.to(DEV), 0.5, impl="triton"
    )
    ref = count_head_loss_reference(h, w, b, counts, off, "nb", lt, 0.5)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.triton
def test_triton_switch_cuda_means_triton_and_no_grad():
    _triton()
    h, w, b, counts, off, lt = count_problem(20, 8, 40, seed=12)
    csr = [x.to(DEV) for x in make_csr(counts)]
    args = [x.to(DEV) for x in (h, w, b)]
    ref = sparse_count_head_loss_reference(*args, *csr, off.to(DEV), "nb", lt.to(DEV), 0.5)
    got = fused.sparse_count_head_loss(*args, *csr, off.to(DEV), "nb", lt.to(DEV), 0.5, impl="cuda")
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # nothing needs a gradient: the forward computes none
        out = torch.ops.inrscrecon.count_head_loss(
            *args, lt.to(DEV), counts.to(DEV), None, None, None, off.to(DEV), None, "nb", 0.0, 1e-2, False
        )
    assert all(x.numel() == 0 for x in out[5:])


@pytest.mark.triton
@pytest.mark.parametrize("lam", [0.0, 0.5])  # λ = 0: gradients from the forward; λ ≠ 0: backward kernel
def test_triton_step_compiles_without_graph_break(lam):
    """The NB CSR loss under torch.compile(fullgraph=True) (a graph break raises) and its AOT backward."""
    _triton()
    h, w, b, counts, off, lt = count_problem(16, 8, 29, seed=14)
    csr = [x.to(DEV) for x in make_csr(counts)]
    ps = leaves(h, w, b, lt)

    def step(h, w, b, lt, indptr, indices, values, off):
        return fused.sparse_count_head_loss(
            h, w, b, indptr, indices, values, off, "nb", lt, lam, impl="triton"
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(*ps, *csr, off.to(DEV))
    got = grads(mix(out), ps)
    ref_ps = leaves(h, w, b, lt)
    r = sparse_count_head_loss_reference(*ref_ps[:3], *csr, off.to(DEV), "nb", ref_ps[3], lam)
    for a, e in zip(out, r):
        torch.testing.assert_close(a.detach(), e.detach(), rtol=1e-5, atol=1e-6)
    for name, a, e in zip(PARAMS, got, grads(mix(r), ref_ps)):
        rel_close(name, a, e)


@pytest.mark.triton
@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_triton_production_width_and_genes(likelihood):
    """W = 256, M = 5000 (5 % density), B = 8 with the interpreter's tiles; the CSR form with KL."""
    _triton()
    h, w, b, counts, off, lt = count_problem(8, 256, 5000, density=0.05, seed=15)
    data = [*make_csr(counts, extra=2), off]
    out, g = _run(_fused("csr"), (h, w, b, lt), data, likelihood, 0.5)
    r_out, r_g = _run(_sparse_ref, (h, w, b, lt), data, likelihood, 0.5)
    for a, e in zip(out, r_out):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    for name, a, e in zip(PARAMS, g, r_g):
        rel_close(name, a, e)


@pytest.mark.triton
def test_triton_production_width_and_genes_bf16():
    """W = 256, M = 5000 (5 %), B = 8, NB on CSR counts with KL: bf16 operands, then bf16 autocast over fp32
    masters, each no worse than torch's bf16 against the fp32 reference on the same rounded inputs."""
    _triton()
    h, w, b, counts, off, lt = count_problem(8, 256, 5000, density=0.05, seed=23)
    counts[2] = 0
    data = [*make_csr(counts, extra=2), off]
    h16, w16, b16 = h.bfloat16(), w.bfloat16(), b.bfloat16()
    out, g = _run(_fused("csr"), (h16, w16, b16, lt), data, "nb", 0.5)
    lo_out, lo_g = _run(_sparse_ref, (h16, w16, b16, lt), data, "nb", 0.5)
    r_out, r_g = _run(_sparse_ref, (h16.float(), w16.float(), b16.float(), lt), data, "nb", 0.5)
    assert all(x.dtype == torch.bfloat16 for x in g[:3])
    for name, a, lo, r in zip(("loss", "nll", "kl"), out, lo_out, r_out):
        assert_no_worse_than_bf16(name, a, lo, r, 1e-3)
    for name, a, lo, r in zip(PARAMS, g, lo_g, r_g):
        assert_no_worse_than_bf16(name, a, lo, r)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        ac_out, ac_g = _run(_fused("csr"), (h16.float(), w16.float(), b16.float(), lt), data, "nb", 0.5)
    assert all(x.dtype == torch.float32 for x in ac_g)
    assert_no_worse_than_bf16("autocast loss", ac_out[0], lo_out[0], r_out[0], 1e-3)
    for name, a, lo, r in zip(PARAMS, ac_g, lo_g, r_g):
        assert_no_worse_than_bf16("autocast " + name, a, lo, r)


@pytest.mark.triton
@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_triton_rows_without_counts_and_all_zero_batch(likelihood):
    """Rows with no non-zeros (first and last included) and a batch with none at all, dense and CSR counts,
    λ = 0 (gradients from the forward) and λ > 0 (backward kernel), against the references."""
    _triton()
    h, w, b, counts, off, lt = count_problem(20, 12, 77, density=0.3, seed=21)
    counts[[0, 9, 19]] = 0
    for c in (counts, torch.zeros_like(counts)):
        for form, ref in (("dense", _dense_ref), ("csr", _sparse_ref)):
            data = [c, off] if form == "dense" else [*make_csr(c, extra=3), off]
            for lam in (0.0, 0.6):
                out, g = _run(_fused(form), (h, w, b, lt), data, likelihood, lam)
                r_out, r_g = _run(ref, (h, w, b, lt), data, likelihood, lam)
                for a, e in zip(out, r_out):
                    torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
                for name, a, e in zip(PARAMS, g, r_g):
                    rel_close(f"{form} λ={lam} {name}", a, e)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter is too slow for this batch)")
@pytest.mark.parametrize("lam", [0.0, 1.0])
@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_triton_gpu_production_batch(likelihood, lam):
    """B = 16 384, W = 256, M = 5000 at 5 %: default tiles, several dz chunks; fp32, then bf16 autocast
    judged against torch under the same autocast."""
    _triton()
    h, w, b, counts, off, lt = count_problem(16384, 256, 5000, density=0.05, seed=17)
    data = [*make_csr(counts, shuffle=False), off]
    out, g = _run(_fused("csr"), (h, w, b, lt), data, likelihood, lam)
    r_out, r_g = _run(_sparse_ref, (h, w, b, lt), data, likelihood, lam)
    for a, e in zip(out, r_out):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
    for name, a, e in zip(PARAMS, g, r_g):
        rel_close(name, a, e, 1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ac_out, ac_g = _run(_fused("csr"), (h, w, b, lt), data, likelihood, lam)
        lo_out, lo_g = _run(_sparse_ref, (h, w, b, lt), data, likelihood, lam)
    for name, a, lo, r in zip(("loss", *PARAMS), [ac_out[0], *ac_g], [lo_out[0], *lo_g], [r_out[0], *r_g]):
        assert_no_worse_than_bf16("autocast " + name, a, lo, r)


@pytest.mark.slow
@pytest.mark.triton
def test_bench_kernels_smoke_times_the_count_losses(tmp_path):
    """benchmarks/bench_kernels.py --smoke --loss poisson nb: every impl runs both count losses without error
    and the per-op timings put the count ops into the backend table."""
    import importlib.util
    import json
    from pathlib import Path

    _triton()
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    results, table = tmp_path / "results.md", tmp_path / "table.json"
    args = ["--smoke", "--modes", "train", "--loss", "poisson", "nb"]
    args += ["--results", str(results), "--write-table", "--table", str(table)]
    assert bench.main(args) == 0
    lines = results.read_text().splitlines()
    for loss in ("poisson", "nb"):
        for impl in ("sparse-fused", "sparse-torch", "dense-eager"):
            rows = [line for line in lines if f"| {loss} |" in line and f"| {impl} |" in line]
            assert len(rows) == 1 and not any("error" in r or "skipped" in r for r in rows), rows
    ops = {e["op"]: e for e in json.loads(table.read_text())["entries"]}
    for op in ("sparse_count_head_loss", "count_head_loss"):
        assert set(ops[op]["ms"]) == {"torch", "triton"}


@pytest.mark.slow
def test_count_tiles_compile_for_sm90_without_spills():
    """AOT compile (no GPU needed) of the count kernel's default GPU tiles with NB (the heavier likelihood):
    CSR in bf16 (64 × 64 tiles) and fp32, dense in bf16 (32 × 64), the three launch modes: no register
    spills, ≤ 64 KiB shared memory. (All 24 variants: ``python -m inrscrecon.kernels.triton_count_loss``.)"""
    import subprocess

    triton = pytest.importorskip("triton", reason="triton is not installed")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("triton's NVIDIA backend tools (cuobjdump) are not installed")
    code = (
        "from inrscrecon.kernels.triton_count_loss import compile_count_head as c\n"
        "for dt, csr in (('bf16', True), ('fp32', True), ('bf16', False)):\n"
        "    for mode in ((True, True, False), (False, True, True), (True, False, True)):\n"
        "        r = c(dt, 'nb', csr, *mode)\n"
        "        print('row', dt, csr, *mode, r.shared_bytes, r.registers, r.stack_bytes)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("row ")]
    assert len(rows) == 9, out.stdout
    for row in rows:
        shared, regs, stack = map(int, row[-3:])
        assert stack == 0, f"spills: {row}"
        assert shared <= 64 * 1024 and regs <= 255, row


def test_csr_count_terms_trace_with_symbolic_sizes():
    """A batch capacity that grows makes a compiled step recompile with symbolic sizes: the count terms must
    trace there too (no SymBool reaching searchsorted) and give the eager value."""
    from inrscrecon.kernels.ops import csr_count_terms

    torch._dynamo.reset()
    traced = torch.compile(csr_count_terms, fullgraph=True, dynamic=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    for n_rows, cap in ((4, 20), (6, 33)):
        indptr = torch.cat(
            [torch.zeros(1), torch.randint(0, cap - 3, (n_rows,), generator=gen).sort().values]
        )
        indices = torch.randint(0, 10, (cap,), generator=gen, dtype=torch.int32)
        values = torch.randint(1, 5, (cap,), generator=gen).float()
        log_theta = torch.randn(10, generator=gen)
        args = (indptr.long(), indices, values, log_theta, "nb", None, 10)
        assert torch.allclose(traced(*args), csr_count_terms(*args), rtol=1e-6, atol=1e-9)
    torch._dynamo.reset()
