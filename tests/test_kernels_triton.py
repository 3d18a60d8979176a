"""Triton kernels against their torch references (Liger style: shared weights, forward and every gradient).

Without a GPU the kernels run in the Triton interpreter: TRITON_INTERPRET=1 is set here before triton is
imported (kernel modules imported earlier in the same process are reloaded so that they are interpreted).
With CUDA the same tests run the compiled kernels on the GPU.

Tolerances: fp32 — |impl − ref| ≤ 1e-4·|ref| + 1e-4·max|ref| per element. bf16 (Cut Cross-Entropy's rule) —
|impl − ref₃₂| ≤ |torch_bf16 − ref₃₂| + 2e-2·max|ref₃₂|, where ref₃₂ is the fp32 reference on the same
(bf16-rounded) inputs and torch_bf16 the reference run in bf16.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton` that decorates our kernels

triton = pytest.importorskip("triton", reason="triton is not installed")

from conftest import load_interpreted  # noqa: E402

from inrscrecon.errors import InputError  # noqa: E402
from inrscrecon.field import fused  # noqa: E402
from inrscrecon.field.encoding import fourier_encode  # noqa: E402
from inrscrecon.field.losses import head_loss_reference  # noqa: E402
from inrscrecon.field.mlp import Trunk  # noqa: E402

pytestmark = pytest.mark.triton
DEV = torch.device("cuda" if CUDA else "cpu")


hl = load_interpreted("inrscrecon.kernels.triton_head_loss", "_head_stats_kernel")
tt = load_interpreted("inrscrecon.kernels.triton_trunk", "_trunk_fused_fwd_kernel")


# ------------------------------------------------------------------------------------------------------------
# assert helpers
# ------------------------------------------------------------------------------------------------------------


def _worst(err: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor, k: int = 5) -> str:
    flat = err.flatten()
    idx = flat.topk(min(k, flat.numel())).indices
    rows = []
    for i in idx.tolist():
        pos = tuple(int(p) for p in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
        rows.append(
            f"  at {pos}: actual {actual.flatten()[i].item():.6g} expected {expected.flatten()[i].item():.6g}"
        )
    return "\n".join(rows)


def _finite(name: str, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float().cpu()
    bad = ~torch.isfinite(x)
    assert not bad.any(), f"{name}: {int(bad.sum())} NaN/Inf of {x.numel()}"
    return x


def assert_close(
    name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, atol_scale=1e-4
):
    """Elementwise |a − e| ≤ rtol·|e| + atol_scale·max|e|; prints the worst offenders, catches NaN/Inf."""
    a, e = _finite(name, actual), _finite(f"{name} (reference)", expected)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    bound = rtol * e.abs() + atol_scale * e.abs().max().clamp_min(1e-12)
    excess = (a - e).abs() - bound
    n_bad = int((excess > 0).sum())
    assert n_bad == 0, f"{name}: {n_bad}/{e.numel()} beyond tolerance; worst:\n{_worst(excess, a, e)}"


def assert_no_worse(name: str, actual: torch.Tensor, lowp: torch.Tensor, ref32: torch.Tensor, tol_scale=2e-2):
    """Low precision: |impl − ref₃₂| ≤ |torch_lowp − ref₃₂| + tol_scale·max|ref₃₂| elementwise."""
    a, lo, r = _finite(name, actual), _finite(f"{name} (torch lowp)", lowp), _finite(f"{name} (fp32)", ref32)
    excess = (a - r).abs() - (lo - r).abs() - tol_scale * r.abs().max().clamp_min(1e-12)
    n_bad = int((excess > 0).sum())
    assert n_bad == 0, (
        f"{name}: {n_bad}/{r.numel()} worse than torch low precision; worst:\n{_worst(excess, a, r)}"
    )


# ------------------------------------------------------------------------------------------------------------
# head + loss
# ------------------------------------------------------------------------------------------------------------


def _head_inputs(b: int, m: int, w: int, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.relu(torch.randn(b, w, generator=g))
    weight = torch.randn(m, w, generator=g) / w**0.5
    bias_t = torch.randn(m, generator=g) * 0.5 if bias else None
    target = torch.log1p(
        torch.poisson(torch.rand(b, m, generator=g) * 3, generator=g)
    )  # log1p counts, many 0
    return hidden.to(DEV), weight.to(DEV), None if bias_t is None else bias_t.to(DEV), target.to(DEV)


def _run_head(fn, hidden, weight, bias, target, lambda_kl, **kw):
    """Forward + backward of loss + 0.3·rmse + 0.2·kl (checks that all three outputs carry gradients)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss, rmse, kl = fn(leaves[0], leaves[1], leaves[2], target, lambda_kl, 1e-2, **kw)
    (loss + 0.3 * rmse + 0.2 * kl).backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return (loss.detach(), rmse.detach(), kl.detach()), grads


HEAD_CASES = [  # (B, M, W, λ): none a block multiple; M = 1 and M = 5000 on purpose; λ = 0 skips the KL
    (1, 1, 8, 1.0),
    (1, 1, 8, 0.0),
    (129, 37, 16, 1.0),
    (129, 37, 16, 0.0),
    (129, 5000, 8, 1.0),
    (4096, 37, 8, 1.0),
    (33, 300, 100, 1.0),
]


@pytest.mark.parametrize("b,m,w,lambda_kl", HEAD_CASES)
def test_head_loss_fp32(b, m, w, lambda_kl):
    inputs = _head_inputs(b, m, w)
    out, grads = _run_head(hl.triton_head_loss, *inputs, lambda_kl)
    ref_out, ref_grads = _run_head(head_loss_reference, *inputs, lambda_kl)
    for name, a, e in zip(("loss", "rmse", "kl"), out, ref_out):
        assert_close(name, a, e, rtol=1e-4, atol_scale=1e-6)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads):
        assert_close(name, a, e)


def test_head_loss_split_reductions_and_no_bias():
    """Atomic-accumulation path (several programs per reduction) and bias=None."""
    inputs = _head_inputs(100, 200, 24, seed=1, bias=False)
    blocks = hl.HeadLossBlocks(block_b=32, block_m=64, num_warps=4, splits=3)
    out, grads = _run_head(hl.triton_head_loss, *inputs, 0.5, blocks=blocks)
    ref_out, ref_grads = _run_head(head_loss_reference, *inputs, 0.5)
    for name, a, e in zip(("loss", "rmse", "kl"), out, ref_out):
        assert_close(name, a, e, rtol=1e-4, atol_scale=1e-6)
    assert grads[2] is None
    assert_close("grad_hidden", grads[0], ref_grads[0])
    assert_close("grad_weight", grads[1], ref_grads[1])


@pytest.mark.parametrize("b,m,w", [(129, 37, 16), (64, 5000, 8)])
def test_head_loss_bf16(b, m, w):
    h, wt, bias, t = _head_inputs(b, m, w, seed=2)
    h16, w16, b16 = h.bfloat16(), wt.bfloat16(), bias.bfloat16()
    out, grads = _run_head(hl.triton_head_loss, h16, w16, b16, t, 1.0)
    lo_out, lo_grads = _run_head(head_loss_reference, h16, w16, b16, t, 1.0)
    r_out, r_grads = _run_head(head_loss_reference, h16.float(), w16.float(), b16.float(), t, 1.0)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    for name, a, lo, r in zip(("loss", "rmse", "kl"), out, lo_out, r_out):
        assert_no_worse(name, a, lo, r, tol_scale=1e-3)
    for name, a, lo, r in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, lo_grads, r_grads):
        assert_no_worse(name, a, lo, r)


def test_head_loss_rejects_bad_shapes():
    h, w, b, t = _head_inputs(4, 5, 8)
    with pytest.raises(ValueError, match="shape mismatch"):
        hl.triton_head_loss(h, w, b, t[:, :4])


# ------------------------------------------------------------------------------------------------------------
# encode + trunk
# ------------------------------------------------------------------------------------------------------------


def _trunk_inputs(b: int, width: int, n_bands: int, n_layers: int, seed: int = 0):
    torch.manual_seed(seed)
    trunk = Trunk(3 + 6 * n_bands, width, n_layers).to(DEV)
    g = torch.Generator().manual_seed(seed)
    coords = (torch.rand(b, 3, generator=g) * 2 - 1).to(DEV)
    grad_out = torch.randn(b, width, generator=g).to(DEV)
    return trunk, coords, grad_out


def _run_trunk_triton(trunk, coords, n_bands, grad_out, blocks=None):
    trunk.zero_grad(set_to_none=True)
    out = tt.triton_trunk(
        coords, n_bands, [lay.weight for lay in trunk.layers], [lay.bias for lay in trunk.layers], blocks
    )
    (out.float() * grad_out).sum().backward()
    return out.detach(), [p.grad.clone() for p in trunk.parameters()]


def _run_trunk_torch(trunk, coords, n_bands, grad_out):
    trunk.zero_grad(set_to_none=True)
    dtype = next(trunk.parameters()).dtype
    out = trunk(fourier_encode(coords, n_bands, include_input=True).to(dtype))
    (out.float() * grad_out).sum().backward()
    return out.detach(), [p.grad.clone() for p in trunk.parameters()]


TRUNK_CASES = [  # (B, W, n_bands, n_layers, fuse_layers)
    (1, 64, 4, 2, None),
    (129, 64, 4, 4, None),
    (129, 100, 10, 3, None),
    (300, 256, 6, 4, None),
    (129, 100, 2, 3, False),  # per-layer kernels, encoding fused into layer 0
    (129, 64, 4, 4, True),  # the fused kernel forced where the default would run per layer
    (65, 16, 0, 1, None),  # no bands: encoding = raw coordinates; single layer
]


@pytest.mark.parametrize("b,width,n_bands,n_layers,fuse", TRUNK_CASES)
def test_trunk_fp32(b, width, n_bands, n_layers, fuse):
    trunk, coords, grad_out = _trunk_inputs(b, width, n_bands, n_layers)
    blocks = None
    if fuse is not None:
        blocks = tt.TrunkBlocks(
            block_b=64, block_n=64, block_k=32, fused_block_b=64, fuse_layers=fuse, splits=2
        )
    out, grads = _run_trunk_triton(trunk, coords, n_bands, grad_out, blocks)
    ref, ref_grads = _run_trunk_torch(trunk, coords, n_bands, grad_out)
    assert_close("hidden", out, ref)
    names = [n for n, _ in trunk.named_parameters()]
    for name, a, e in zip(names, grads, ref_grads):
        assert_close(name, a, e)


@pytest.mark.parametrize("fuse", [None, False])
def test_trunk_bf16(fuse):
    trunk, coords, grad_out = _trunk_inputs(129, 64, 4, 3, seed=3)
    trunk16 = trunk.bfloat16()
    trunk32 = Trunk(3 + 24, 64, 3).to(DEV)
    trunk32.load_state_dict({k: v.float() for k, v in trunk16.state_dict().items()})
    blocks = None if fuse is None else tt.TrunkBlocks(64, 64, 32, 64, fuse_layers=False, splits=1)
    out, grads = _run_trunk_triton(trunk16, coords, 4, grad_out, blocks)
    lo, lo_grads = _run_trunk_torch(trunk16, coords, 4, grad_out)
    ref, ref_grads = _run_trunk_torch(trunk32, coords, 4, grad_out)
    assert out.dtype == torch.bfloat16
    assert_no_worse("hidden", out, lo, ref)
    for (name, _), a, l_, r in zip(trunk16.named_parameters(), grads, lo_grads, ref_grads):
        assert a.dtype == torch.bfloat16
        assert_no_worse(name, a, l_, r)


def test_trunk_rejects_bad_layers():
    trunk, coords, _ = _trunk_inputs(4, 32, 2, 2)
    with pytest.raises(ValueError, match="first weight"):
        tt.triton_trunk(coords, 3, [lay.weight for lay in trunk.layers], [lay.bias for lay in trunk.layers])


# ------------------------------------------------------------------------------------------------------------
# the switch
# ------------------------------------------------------------------------------------------------------------


def test_switch_matches_reference():
    trunk, coords, _ = _trunk_inputs(50, 64, 3, 2)
    h_torch = fused.trunk_forward(coords, 3, trunk, impl="torch")
    h_triton = fused.trunk_forward(coords, 3, trunk, impl="triton")
    assert_close("trunk_forward", h_triton, h_torch)
    weight = torch.randn(40, 64, device=DEV) / 8
    target = torch.rand(50, 40, device=DEV)
    ref = fused.head_loss(h_torch, weight, None, target, 1.0, 1e-2, impl="torch")
    got = fused.head_loss(h_torch, weight, None, target, 1.0, 1e-2, impl="triton")
    for name, a, e in zip(("loss", "rmse", "kl"), got, ref):
        assert_close(name, a, e, atol_scale=1e-6)


def test_resolve_impl_fallbacks(monkeypatch):
    assert fused.resolve_impl("torch", "cpu") == "torch"
    assert fused.resolve_impl("auto", "cpu") == "torch"  # CPU tensors never pick a kernel
    assert fused.resolve_impl("auto", "cpu", op="trunk") == "torch"
    with pytest.raises(InputError, match="backend must be one of"):
        fused.resolve_impl("cudnn", "cpu")
    # auto on CUDA without a measured entry: triton, even where the CUDA extension exists
    monkeypatch.setattr(fused, "load_table", lambda *a: ())
    monkeypatch.setattr(fused, "_cuda_ext", lambda: (None, "not built"))
    assert fused.resolve_impl("auto", "cuda") == "triton"
    assert fused.resolve_impl("auto", "cuda", op="trunk") == "triton"
    monkeypatch.setattr(fused, "_cuda_ext", lambda: (object(), ""))
    assert fused.resolve_impl("auto", "cuda") == "triton"  # "the extension exists" is no reason
    assert fused.resolve_impl("auto", "cuda", op="sparse_head_loss") == "triton"
    assert fused.resolve_impl("cuda", "cuda", op="trunk") == "triton"
    monkeypatch.setattr(fused, "_triton_importable", lambda: False)
    assert fused.resolve_impl("auto", "cuda", op="trunk") == "torch"
    with pytest.raises(InputError, match="triton is not installed"):
        fused.resolve_impl("triton", "cuda")
    # explicit requests that cannot be served raise with the reason
    monkeypatch.setattr(fused, "_cuda_ext", lambda: (None, "CUDA extension not importable"))
    with pytest.raises(InputError, match="not importable"):
        fused.resolve_impl("cuda", "cuda")


def test_auto_follows_the_measured_table(monkeypatch):
    entries = (
        {
            "op": "head_loss",
            "device": "GPU-X",
            "dtype": "bf16",
            "bucket": {"B": 4096, "W": 256, "M": 8192},
            "ms": {"triton": 2.0, "cuda": 1.5, "torch": 3.0},
        },
        {
            "op": "head_loss",
            "device": "GPU-X",
            "dtype": "bf16",
            "bucket": {"B": 65536, "W": 256, "M": 8192},
            "ms": {"triton": 9.0, "cuda": 12.0, "torch": 8.0},
        },
        {
            "op": "trunk",
            "device": "GPU-X",
            "dtype": "bf16",
            "bucket": {"B": 4096, "W": 256, "M": 0},
            "ms": {"triton": 0.9, "torch": 0.4},
        },
    )
    monkeypatch.setattr(fused, "load_table", lambda *a: entries)
    monkeypatch.setattr(fused, "_device_kind", lambda dev: "GPU-X")
    monkeypatch.setattr(fused, "_triton_importable", lambda: True)
    monkeypatch.setattr(fused, "_cuda_ext", lambda: (object(), ""))
    small = fused.shape_bucket(3000, 256, 5000)
    assert small == {"B": 4096, "W": 256, "M": 8192}
    assert fused.resolve_impl("auto", "cuda", "head_loss", small) == "cuda"
    assert fused.resolve_impl("auto", "cuda", "head_loss", fused.shape_bucket(50000, 256, 5000)) == "torch"
    assert (
        fused.resolve_impl("auto", "cuda", "head_loss", fused.shape_bucket(8000, 256, 5000)) == "cuda"
    )  # nearest
    assert fused.resolve_impl("auto", "cuda", "trunk", fused.shape_bucket(4096, 256)) == "torch"
    # the fastest impl cannot run here → the next fastest measured one
    monkeypatch.setattr(fused, "_cuda_ext", lambda: (None, "not built"))
    assert fused.resolve_impl("auto", "cuda", "head_loss", small) == "triton"
    # other dtype or device kind: no entry → documented fallback
    assert fused.resolve_impl("auto", "cuda", "head_loss", small, torch.float32) == "triton"
    monkeypatch.setattr(fused, "_device_kind", lambda dev: "GPU-Y")
    assert fused.resolve_impl("auto", "cuda", "trunk", fused.shape_bucket(4096, 256)) == "triton"


def test_backend_table_ships_and_parses():
    entries = fused.load_table()
    assert isinstance(entries, tuple)
    for e in entries:  # whatever was measured has every field auto needs
        assert {"op", "device", "dtype", "bucket", "ms"} <= set(e)
        assert e["op"] in fused.OPS


def test_resolve_impl_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused.resolve_impl("triton", "cpu") == "triton"
    assert fused.resolve_impl("cuda", "cpu", op="trunk") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="Triton needs CUDA"):
        fused.resolve_impl("triton", "cpu")


def test_auto_logs_once(caplog):
    fused._announce.cache_clear()
    with caplog.at_level("INFO", logger="inrscrecon.field.fused"):
        for _ in range(3):
            fused.resolve_impl("auto", "cpu", op="trunk")
    assert sum("auto picked" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
def test_head_loss_large_batch_and_genes():
    """B = 1024 with M = 5000 in one go (slow in the interpreter: ≈ 25 s on a shared 2-core machine)."""
    t0 = time.perf_counter()
    inputs = _head_inputs(1024, 5000, 8, seed=4)
    out, grads = _run_head(hl.triton_head_loss, *inputs, 1.0)
    ref_out, ref_grads = _run_head(head_loss_reference, *inputs, 1.0)
    for name, a, e in zip(("loss", "rmse", "kl"), out, ref_out):
        assert_close(name, a, e, atol_scale=1e-6)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads):
        assert_close(name, a, e)
    assert time.perf_counter() - t0 < 120


@pytest.mark.slow
def test_sparse_head_tiles_compile_for_sm90_without_spills():
    """AOT compile (no GPU needed) of the sparse head's default GPU tiles: no register spills, ≤ 64 KiB smem."""
    import subprocess
    import sys

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("triton's NVIDIA backend tools (cuobjdump) are not installed")
    code = (
        "from inrscrecon.kernels.aot import compile_sparse_head as c\n"
        "for dt in ('bf16', 'fp32'):\n"
        "    for mode in ((True, True, False), (False, True, True)):\n"
        "        r = c(dt, 256, *mode)\n"
        "        print(dt, mode, r.shared_bytes, r.registers, r.stack_bytes)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("bf16", "fp32"))]
    assert len(rows) == 4, out.stdout
    for row in rows:
        shared, regs, stack = map(int, row[-3:])
        assert stack == 0, f"spills: {row}"
        assert shared <= 64 * 1024 and regs <= 255, row


@pytest.mark.slow
def test_bench_kernels_smoke_and_table(tmp_path):
    """benchmarks/bench_kernels.py --smoke runs every CPU impl without error and writes a parseable table."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    results, table = tmp_path / "results.md", tmp_path / "table.json"
    args = ["--smoke", "--results", str(results), "--write-table", "--table", str(table)]
    assert bench.main(args) == 0
    text = results.read_text()
    for impl in ("sparse-fused", "sparse-torch", "dense-eager"):
        rows = [line for line in text.splitlines() if f"| {impl} |" in line]
        assert len(rows) == 2 and not any("error" in r or "skipped" in r for r in rows), rows
    entries = json.loads(table.read_text())["entries"]
    assert {e["op"] for e in entries} == {"sparse_head_loss", "head_loss", "trunk"}
    for e in entries:
        assert e["device"] == "cpu" and e["best"] in e["ms"] and "torch" in e["ms"]
