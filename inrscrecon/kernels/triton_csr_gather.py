"""Triton CSR batch gather + library-size normalise + log1p into a fixed-capacity buffer.

For slot j of a batch's CSR buffer (capacity CAP) with batch row b = row[j] (B marks a padding slot)::

    src       = starts[b] + j − indptr[b]                       position of the non-zero in the stack's CSR
    genes[j]  = stack_indices[src]
    values[j] = log1p(stack_data[src] · target_sum / total[b])   (0 when total[b] = 0; log1p only if target_sum ≤ 0)

Padding slots get gene 0 and value 0. One program handles BLOCK slots: two gathers, a multiply and a log1p,
all in registers, so the batch costs one read of its non-zeros and one write of (genes, values) — no [B, M]
buffer. Arithmetic in float64 (product rounded to float32 first) as in the C++ CPU gather, so the result equals
the torch path of :class:`inrscrecon.data.device_table.DeviceTable` bit for bit. log1p is evaluated as
log(u) · x / (u − 1), u = 1 + x (exact to a few ulp in float64; Triton has no portable log1p).

Registered as the custom op ``inrscrecon::csr_gather`` (with a fake implementation for shapes), so a compiled
training step traces through it. No autograd: targets carry no gradient. Imports only torch and triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _csr_gather_kernel(
    row_ptr,  # [CAP] int64 batch row of each slot, n_rows = padding
    indptr_ptr,  # [B+1] int64 batch CSR offsets
    starts_ptr,  # [B] int64 first non-zero of each batch row in the stack
    src_idx_ptr,  # [NNZ] int32 stack gene indices
    src_val_ptr,  # [NNZ] fp32 stack raw values
    totals_ptr,  # [B] fp32 library sizes of the batch rows
    out_idx_ptr,  # [CAP] int32
    out_val_ptr,  # [CAP] fp32
    cap,
    n_rows,
    target_sum,
    NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    slots = pid * BLOCK + tl.arange(0, BLOCK)
    in_cap = slots < cap
    row = tl.load(row_ptr + slots, mask=in_cap, other=n_rows)
    live = in_cap & (row < n_rows)
    rc = tl.where(live, row, 0)
    start = tl.load(starts_ptr + rc, mask=live, other=0)
    first = tl.load(indptr_ptr + rc, mask=live, other=0)
    src = tl.where(live, start + slots.to(tl.int64) - first, 0)
    gene = tl.load(src_idx_ptr + src, mask=live, other=0)
    raw = tl.load(src_val_ptr + src, mask=live, other=0.0).to(tl.float64)
    if NORMALIZE:
        tot = tl.load(totals_ptr + rc, mask=live, other=0.0).to(tl.float64)
        scale = tl.where(tot > 0, target_sum / tl.where(tot > 0, tot, 1.0), 0.0)
        raw = (raw * scale).to(tl.float32).to(tl.float64)
    u = 1.0 + raw
    exact = u == 1.0  # x below float64 resolution: log1p(x) = x
    val = tl.where(exact, raw, tl.log(u) * raw / tl.where(exact, 1.0, u - 1.0))
    val = tl.where(live, val, 0.0)
    tl.store(out_idx_ptr + slots, tl.where(live, gene, 0), mask=in_cap)
    tl.store(out_val_ptr + slots, val.to(tl.float32), mask=in_cap)


@torch.library.custom_op("inrscrecon::csr_gather", mutates_args=())
def csr_gather_op(
    row: torch.Tensor,
    indptr: torch.Tensor,
    starts: torch.Tensor,
    stack_indices: torch.Tensor,
    stack_data: torch.Tensor,
    totals: torch.Tensor,
    target_sum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel as a registered op (opaque to torch.compile, traced through its fake implementation)."""
    cap = row.shape[0]
    n_rows = indptr.shape[0] - 1
    out_idx = torch.empty(cap, dtype=torch.int32, device=row.device)
    out_val = torch.empty(cap, dtype=torch.float32, device=row.device)
    if cap == 0:
        return out_idx, out_val
    grid = (triton.cdiv(cap, BLOCK),)
    _csr_gather_kernel[grid](
        row,
        indptr,
        starts,
        stack_indices,
        stack_data,
        totals,
        out_idx,
        out_val,
        cap,
        n_rows,
        float(target_sum),
        NORMALIZE=bool(target_sum > 0),
        BLOCK=BLOCK,
    )
    return out_idx, out_val


@csr_gather_op.register_fake
def _csr_gather_fake(row, indptr, starts, stack_indices, stack_data, totals, target_sum):
    return torch.empty_like(row, dtype=torch.int32), torch.empty_like(row, dtype=torch.float32)


def triton_csr_gather(
    row: torch.Tensor,  # [CAP] int64 batch row of each slot (B = padding)
    indptr: torch.Tensor,  # [B+1] int64 batch CSR offsets
    starts: torch.Tensor,  # [B] int64 first non-zero of each batch row in the stack's CSR
    stack_indices: torch.Tensor,  # [NNZ] int32
    stack_data: torch.Tensor,  # [NNZ] fp32 raw values
    totals: torch.Tensor,  # [B] fp32 library sizes of the batch rows
    target_sum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(genes [CAP] int32, values [CAP] fp32) of a fixed-capacity batch (module docstring)."""
    for name, t, dt in (
        ("row", row, torch.int64),
        ("indptr", indptr, torch.int64),
        ("starts", starts, torch.int64),
        ("stack_indices", stack_indices, torch.int32),
        ("stack_data", stack_data, torch.float32),
        ("totals", totals, torch.float32),
    ):
        if t.dtype != dt or not t.is_contiguous():
            raise ValueError(f"triton_csr_gather: {name} must be contiguous {dt}, got {t.dtype}")
    return csr_gather_op(row, indptr, starts, stack_indices, stack_data, totals, float(target_sum))


__all__ = ["csr_gather_op", "triton_csr_gather"]
