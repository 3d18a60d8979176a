"""Ahead-of-time compile of the Triton kernels for a GPU architecture, without a GPU: shared memory,
registers and spills per configuration (what ptxas reports), so tile choices can be checked on a CPU machine.

    python -m inrscrecon.kernels.aot            # the sparse head's default GPU tiles, bf16 and fp32, sm_90

Needs triton with its NVIDIA backend (bundled ptxas / cuobjdump). Must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["Resources", "compile_kernel", "compile_sparse_head"]


@dataclass(frozen=True)
class Resources:
    shared_bytes: int
    registers: int
    stack_bytes: int  # > 0: spills (local memory)


def _usage(cubin: bytes) -> tuple[int, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
    try:
        out = subprocess.run(
            [tool, "--dump-resource-usage", fh.name], capture_output=True, text=True, check=True
        )
    finally:
        os.unlink(fh.name)
    reg = re.search(r"REG:(\d+)", out.stdout)
    stack = re.search(r"STACK:(\d+)", out.stdout)
    if reg is None or stack is None:
        raise RuntimeError(f"cuobjdump gave no resource usage: {out.stdout[-300:]}")
    return int(reg.group(1)), int(stack.group(1))


def compile_kernel(
    fn, sig: dict[str, str], const: dict, num_warps: int, num_stages: int, arch: int
) -> Resources:
    """Compile the jitted kernel ``fn`` for sm_``arch`` with runtime argument types ``sig`` (in argument order)
    and the constexprs ``const`` (which follow them) → its resources."""
    if type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("AOT compile needs the kernels imported without TRITON_INTERPRET")
    names = list(sig) + list(const)
    sig = dict(sig, **{c: "constexpr" for c in const})
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    regs, stack = _usage(compiled.asm["cubin"])
    return Resources(int(compiled.metadata.shared), regs, stack)


def compile_sparse_head(
    dtype: str = "bf16",  # "bf16" | "fp32"
    width: int = 256,
    stats: bool = True,
    dz: bool = True,
    has_kl: bool = False,
    arch: int = 90,
) -> Resources:
    """Compile ``_sparse_head_kernel`` with its default GPU tiles for sm_``arch`` → resources."""
    import torch

    from inrscrecon.kernels import triton_sparse_head_loss as k

    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    cfg = k.default_blocks(torch.device("cuda"), width, torch_dtype)
    ptr = "*bf16" if dtype == "bf16" else "*fp32"
    sig = {
        "h_ptr": ptr,
        "w_ptr": ptr,
        "b_ptr": ptr,
        "indptr_ptr": "*i64",
        "idx_ptr": "*i32",
        "val_ptr": "*fp32",
        "rw_ptr": "*fp32",
        "stats_ptr": "*fp32",
        "rowstat_ptr": "*fp32",
        "coef_ptr": "*fp32",
        "dz_ptr": ptr,
        "row0": "i32",
        "row_end": "i32",
        "B": "i32",
        "M": "i32",
        "W": "i32",
        "stride_hb": "i32",
        "stride_wm": "i32",
        "kl_eps": "fp32",
    }
    const = dict(
        STATS=stats,
        DZ=dz,
        HAS_BIAS=True,
        HAS_KL=has_kl,
        HAS_RW=True,
        UPCAST=dtype == "fp32",
        PRECISION="ieee" if dtype == "fp32" else "tf32",
        SEARCH_STEPS=14,
        KCH=cfg.kch,
        BLOCK_B=cfg.block_b,
        BLOCK_M=cfg.block_m,
        BLOCK_K=min(cfg.block_k, max(16, triton.next_power_of_2(width))),
    )
    return compile_kernel(k._sparse_head_kernel, sig, const, cfg.num_warps, cfg.num_stages or 2, arch)


if __name__ == "__main__":
    for dt in ("bf16", "fp32"):
        for mode in ((True, True, False), (False, True, True), (True, False, True)):
            r = compile_sparse_head(dt, 256, *mode)
            print(f"sparse head {dt} W=256 stats={mode[0]} dz={mode[1]} kl={mode[2]}: {r}")
