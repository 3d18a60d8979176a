"""Triton kernels (and, beside them, the CUDA extension wrapper) for the hot path of the field.

* ``triton_sparse_head_loss`` — head + loss against the batch's CSR targets (the fit path);
* ``triton_head_loss`` — head + loss against a dense target; ``triton_trunk`` — Fourier encoding + MLP trunk;
* ``ops`` — their ``torch.library`` registrations (traceable by ``torch.compile``; imports torch only);
* ``aot`` — ahead-of-time compile for a GPU architecture without a GPU (registers, spills, shared memory);
* ``cuda_head_loss`` — the compiled extension's head + loss on CSR targets (cuBLAS / MKL GEMMs + one fused
  C++ / CUDA loss pass; ``torch.library`` ops with CPU and CUDA implementations).

Import the op modules directly; this package imports nothing heavy so that ``import inrscrecon.kernels``
works without Triton installed. The public switch between implementations is :mod:`inrscrecon.field.fused`.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


__all__ = ["interpreting"]
