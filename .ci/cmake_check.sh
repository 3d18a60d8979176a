#!/usr/bin/env bash
# CMake build of csrc/ in a throw-away directory: the CPU ops module, plus the nvcc compile check of the CUDA
# kernel cores when nvcc is on PATH (no GPU needed), then a smoke test of the CMake-built module from Python.
# Usage: bash .ci/cmake_check.sh        (env: PYTHON=python3, JOBS=2, INRSCRECON_CUDA_CHECK=ON|OFF to force)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
JOBS="${JOBS:-2}"
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/inrscrecon-cmake.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT

CUDA_CHECK="${INRSCRECON_CUDA_CHECK:-}"
if [[ -z "$CUDA_CHECK" ]]; then
  if command -v nvcc >/dev/null 2>&1; then CUDA_CHECK=ON; else CUDA_CHECK=OFF; fi
fi
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
CMAKE_ARGS=(-DINRSCRECON_CUDA_CHECK="$CUDA_CHECK" -DPython3_EXECUTABLE="$PYTHON")
if [[ "$CUDA_CHECK" == ON && -z "${CUDACXX:-}" ]]; then CMAKE_ARGS+=(-DCMAKE_CUDA_COMPILER="$(command -v nvcc)"); fi

echo "== cmake configure (CUDA compile check: $CUDA_CHECK) in $BUILD"
cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release "${CMAKE_ARGS[@]}" >"$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log"; echo "cmake configure failed" >&2; exit 1; }
grep -E "inrscrecon:|CUDA compiler|Found Torch" "$BUILD/configure.log" || true

echo "== cmake build (-j$JOBS)"
cmake --build "$BUILD" -j "$JOBS"

MODULE="$(find "$BUILD" -maxdepth 1 -name '_C*.so' | head -n 1)"
[[ -n "$MODULE" ]] || { echo "no _C module was built" >&2; exit 1; }

echo "== smoke import of $MODULE"
"$PYTHON" - "$MODULE" <<'PY'
import importlib.util
import sys

import torch

spec = importlib.util.spec_from_file_location("inrscrecon._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert mod.with_cuda is False, "the CMake module is the CPU one"
indptr = torch.tensor([0, 2, 2, 3])
indices = torch.tensor([0, 2, 1], dtype=torch.int32)
data = torch.tensor([1.0, 3.0, 5.0])
rows = torch.tensor([2, 0, 1, 0])
out = mod.csr_gather(indptr, indices, data, rows, None, 3, 3, 4.0, False, None)
want = torch.tensor([[0, 4, 0], [1, 0, 3], [0, 0, 0], [1, 0, 3]], dtype=torch.float32)
assert torch.equal(out, want), out
try:
    mod.csr_gather(indptr, indices, -data, rows, None, 3, 3, 4.0, True, None)
except ValueError as err:
    assert "negative" in str(err), err
else:
    raise AssertionError("negative counts were accepted")
print("cmake-built inrscrecon._C OK:", sorted(n for n in dir(mod) if not n.startswith("__")))
PY
echo "== cmake check passed"
