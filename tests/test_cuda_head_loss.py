"""Fused CUDA head + loss (csrc/cuda/head_loss_kernel.cu) vs head_loss_reference: forward and every gradient."""

from __future__ import annotations

import importlib

import pytest
import torch

from inrscrecon.field.losses import head_loss_reference


def _built_with_cuda() -> bool:
    try:
        return bool(getattr(importlib.import_module("inrscrecon._C"), "with_cuda", False))
    except ImportError:
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        not _built_with_cuda(),
        reason="inrscrecon._C not built with CUDA ops (needs CUDA torch + nvcc at install)",
    ),
]

# fp32: the kernel sums in a different order (tiles, fp64 row stats) → ~1e-5 relative. Low precision: judged
# against the fp32 reference, allowed the error of torch's own low-precision reference plus a margin (CCE).
TOL = {torch.float32: (2e-4, 1e-5), torch.bfloat16: (5e-2, 2e-3)}
UPSTREAM = (1.0, 0.5, 0.25)  # d(objective)/d(loss, rmse, kl): exercises all three outputs' gradients


def make_inputs(b: int, m: int, w: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(b, w, device="cuda", generator=gen)
    weight = torch.randn(m, w, device="cuda", generator=gen) / w**0.5
    bias = 0.1 * torch.randn(m, device="cuda", generator=gen)
    counts = torch.poisson(torch.rand(b, m, device="cuda", generator=gen) * 4, generator=gen)
    target = torch.log1p(counts)  # log1p-normalised-like, many zeros
    return {"hidden": hidden, "weight": weight, "bias": bias, "target": target}


def run(fn, inputs: dict[str, torch.Tensor], dtype: torch.dtype, lambda_kl: float, use_bias: bool = True):
    leaves = {k: v.detach().to(dtype).requires_grad_(k != "target") for k, v in inputs.items()}
    bias = leaves["bias"] if use_bias else None
    loss, rmse, kl = fn(leaves["hidden"], leaves["weight"], bias, leaves["target"], lambda_kl, 1e-2)
    objective = UPSTREAM[0] * loss + UPSTREAM[1] * rmse + UPSTREAM[2] * kl
    objective.backward()
    outs = {"loss": loss, "rmse": rmse, "kl": kl}
    grads = {f"grad_{k}": leaves[k].grad for k in ("hidden", "weight", "bias") if leaves[k].grad is not None}
    return {k: v.detach().float() for k, v in {**outs, **grads}.items()}


def assert_close(
    name: str, got: torch.Tensor, want: torch.Tensor, allowed: torch.Tensor | float, rtol: float
):
    assert torch.isfinite(got).all(), f"{name}: NaN/Inf in the kernel output"
    err = (got - want).abs()
    bound = allowed + rtol * want.abs()
    bad = err > bound
    if bad.any():
        idx = torch.argsort((err - bound).flatten(), descending=True)[:5]
        worst = [(int(i), float(got.flatten()[i]), float(want.flatten()[i])) for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatches; worst (index, got, want): {worst}"
        )


def _cuda_head_loss():
    from inrscrecon.kernels.cuda_head_loss import cuda_head_loss

    return cuda_head_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("w", [64, 256])
@pytest.mark.parametrize("m", [1, 37, 5000])
@pytest.mark.parametrize("b", [1, 129, 4096])
def test_matches_reference(b, m, w, dtype):
    inputs = make_inputs(b, m, w, seed=b + m + w)
    want = run(head_loss_reference, inputs, torch.float32, 1.0)
    got = run(_cuda_head_loss(), inputs, dtype, 1.0)
    rtol, atol = TOL[dtype]
    lowp = run(head_loss_reference, inputs, dtype, 1.0) if dtype != torch.float32 else None
    for key, ref in want.items():
        allowed = atol * (ref.abs().max().item() + 1e-12) if key.startswith("grad") else atol
        allowed_t = allowed if lowp is None else (lowp[key] - ref).abs() + allowed
        assert_close(f"{key} B={b} M={m} W={w} {dtype}", got[key], ref, allowed_t, rtol)


@pytest.mark.parametrize("lambda_kl", [0.0, 2.5])
def test_no_bias_and_lambda(lambda_kl):
    inputs = make_inputs(77, 300, 64, seed=1)
    want = run(head_loss_reference, inputs, torch.float32, lambda_kl, use_bias=False)
    got = run(_cuda_head_loss(), inputs, torch.float32, lambda_kl, use_bias=False)
    assert "grad_bias" not in got
    for key, ref in want.items():
        assert_close(key, got[key], ref, 1e-5 * (ref.abs().max().item() + 1e-12), 2e-4)


def test_never_materialises_the_prediction():
    b, m, w = 4096, 5000, 256
    inputs = make_inputs(b, m, w)
    leaves = {k: v.detach().requires_grad_(k != "target") for k, v in inputs.items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _, _ = _cuda_head_loss()(leaves["hidden"], leaves["weight"], leaves["bias"], leaves["target"])
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    pred_bytes = b * m * 4
    assert extra < pred_bytes, (
        f"peak extra {extra / 2**20:.1f} MiB ≥ one fp32 [B, M] ({pred_bytes / 2**20:.1f} MiB)"
    )


def test_cpu_tensors_are_refused():
    from inrscrecon.kernels.cuda_head_loss import cuda_head_loss

    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cuda_head_loss(torch.zeros(2, 3), torch.zeros(4, 3), None, torch.zeros(2, 4))
