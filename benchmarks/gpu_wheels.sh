#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch, triton, numpy, scipy, pandas, h5py, scikit-learn, pytest,
# tqdm, matplotlib, safetensors, psutil, but not anndata / zarr): downloaded here into .whl/ (git-ignored), for
# CPython 3.12 on manylinux x86_64, carried with the working tree and installed by gpu_check.sh into /tmp/site.
#
#   bash benchmarks/gpu_wheels.sh        # once, on a machine with pip access (≈ 5 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
python3 -m pip download -q "${args[@]}" \
    anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 scverse-misc==0.0.3 \
    session-info2==0.4.1 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
ls -la .whl
du -sh .whl
