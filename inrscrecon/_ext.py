"""Handle on the optional compiled extension ``inrscrecon._C`` (built by setup.py from csrc/).

``load_extension()`` imports it once and caches the result; when it is missing (not built, ``INRSCRECON_NO_EXT``,
a failed compile) it warns once and returns ``None`` so that callers use their numpy / torch fallback.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType


@functools.lru_cache(maxsize=1)
def load_extension() -> ModuleType | None:
    """The compiled ``inrscrecon._C`` module, or ``None`` (with one warning) when it is not available."""
    import torch  # noqa: F401  (the extension links against libtorch: load it first)

    try:
        return importlib.import_module("inrscrecon._C")
    except ImportError as err:
        warnings.warn(
            f"inrscrecon._C (compiled C++/CUDA ops) is not available ({err}); using the numpy/torch fallback. "
            'Build it with `pip install --no-build-isolation -e ".[test]"`.',
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def has_cpu_ops() -> bool:
    """True when the compiled CPU ops (e.g. ``csr_gather``) can be used."""
    ext = load_extension()
    return ext is not None and hasattr(ext, "csr_gather")


def has_cuda_ops() -> bool:
    """True when the extension was built with its CUDA ops and a CUDA device is visible."""
    ext = load_extension()
    if ext is None or not getattr(ext, "with_cuda", False):
        return False
    import torch

    return torch.cuda.is_available()


__all__ = ["has_cpu_ops", "has_cuda_ops", "load_extension"]
