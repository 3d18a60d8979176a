"""Build the optional compiled extension ``inrscrecon._C`` (metadata lives in pyproject.toml).

* CPU ops (C++, OpenMP) are always attempted: ``csrc/ops.cpp`` + ``csrc/csr_gather.cpp`` + ``csrc/sparse_head.cpp``.
* CUDA ops (``csrc/cuda``) are added only when torch was built with CUDA *and* a CUDA toolkit (nvcc) is found.
* ``INRSCRECON_NO_EXT=1`` skips the extension; a failed compile only prints a warning. Either way the install
  succeeds and the package falls back to its numpy / torch implementations (see ``inrscrecon/_ext.py``).

Flags: -O3; our sources are C++17, the language standard itself is left to torch (its headers need C++20 from
torch 2.10 on). ``TORCH_CUDA_ARCH_LIST`` picks the CUDA architectures as usual.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"  # relative: setuptools wants relative source paths


def _warn(msg: str) -> None:
    print(f"WARNING (inrscrecon): {msg}; the numpy/torch fallback will be used.", file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions() -> tuple[list, dict]:
    if _env_flag("INRSCRECON_NO_EXT"):
        _warn("INRSCRECON_NO_EXT is set, not building inrscrecon._C")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as err:  # torch missing from the build environment (use --no-build-isolation)
        _warn(f"cannot import torch.utils.cpp_extension ({err}), not building inrscrecon._C")
        return [], {}

    class OptionalBuildExt(BuildExtension):
        """BuildExtension whose failures are warnings: the extension is an accelerator, never a requirement."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as err:
                _warn(f"building inrscrecon._C failed ({type(err).__name__}: {err})")

        def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
            try:
                super().build_extension(ext)
            except Exception as err:
                _warn(f"compiling {ext.name} failed ({type(err).__name__}: {err})")

    sources = [f"{CSRC}/ops.cpp", f"{CSRC}/csr_gather.cpp", f"{CSRC}/sparse_head.cpp"]
    cxx = ["-O3"]
    link: list[str] = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")  # links libgomp.so.1, the same runtime torch already loaded
        link.append("-fopenmp")
    nvcc_found = CUDA_HOME is not None or shutil.which("nvcc") is not None
    with_cuda = torch.version.cuda is not None and nvcc_found and not _env_flag("INRSCRECON_NO_CUDA")
    if with_cuda:
        ext = CUDAExtension(
            "inrscrecon._C",
            sources + [f"{CSRC}/cuda/sparse_head_kernel.cu"],
            include_dirs=[str(ROOT / CSRC)],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        why = "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit (nvcc) found"
        print(f"inrscrecon: building CPU ops only ({why})", file=sys.stderr)
        ext = CppExtension(
            "inrscrecon._C",
            sources,
            include_dirs=[str(ROOT / CSRC)],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ext.optional = True  # editable installs then skip copying a .so that failed to build
    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    package_data={"inrscrecon.field": ["backend_table.json"]},  # the measured backend table
)
