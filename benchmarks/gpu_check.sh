#!/usr/bin/env bash
# One short run on a GPU machine that gives every GPU number: the GPU/Triton tests, then bench_fit on the
# 1M-cell × 5000-gene synthetic stack; logs under $OUT (default ./gpu_check_out), a short table printed last.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh            # ≈ 6–10 min on one H100/H200
#   CELLS=200000 bash benchmarks/gpu_check.sh            # a quicker, smaller stack
#   DEFAULTS_CHECK=1 bash benchmarks/gpu_check.sh        # also: GPU defaults vs CPU defaults validation RMSE
#                                                        # (DLPFC from $DATA, and a synthetic 120k-cell stack)
#
# Exit status: 0 when the tests passed and the benchmark ran, 1 otherwise (the table says which).
set -u
OUT=${OUT:-gpu_check_out}
CELLS=${CELLS:-1000000}
DATA=${DATA:-${INRSCRECON_DATA:-../shared/data}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; nothing to measure" | tee "$OUT/summary.txt"
    exit 1
fi
(nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)") \
    > "$OUT/env.txt" 2>&1

# 1. tests that need or use the GPU (CUDA tensors, real Triton kernels, inductor + CUDA graphs)
timeout 300 python -m pytest -q -rs -m "gpu or triton or not slow" \
    tests/test_device_table.py tests/test_train_step.py tests/test_backend_training.py \
    tests/test_sparse_head_loss.py tests/test_kernels_triton.py tests/test_cuda_head_loss.py \
    > "$OUT/tests.log" 2>&1
tests_rc=$?

# 2. end-to-end fit throughput beside torch eager / torch.compile of the dense reference (same run)
timeout 600 python benchmarks/bench_fit.py --device cuda --cells "$CELLS" --rounds 1 --results "$OUT/bench_fit.json" \
    > "$OUT/bench_fit.log" 2>&1
bench_rc=$?

# 3. optional: the GPU defaults (large batch, scaled rate) reach the CPU defaults' validation RMSE?
defaults_rc=0
if [ "${DEFAULTS_CHECK:-0}" = "1" ]; then
    dlpfc=$(ls "$DATA"/dlpfc_1516*.h5ad 2>/dev/null | tr '\n' ' ')
    {
        [ -n "$dlpfc" ] && timeout 600 python benchmarks/bench_fit.py --device cuda --defaults-check $dlpfc
        timeout 600 python benchmarks/bench_fit.py --device cuda --defaults-check
    } > "$OUT/defaults_check.log" 2>&1
    defaults_rc=$?
fi

{
    echo "== gpu_check $(date -u +%FT%TZ) — $(head -c 200 "$OUT/env.txt" | grep -m1 -o 'NVIDIA [A-Z0-9 -]*' || true)"
    echo "tests (rc=$tests_rc): $(tail -n 1 "$OUT/tests.log")"
    echo "bench_fit (rc=$bench_rc), $CELLS cells × 5000 genes:"
    grep -E '^\||^fit epoch|^device:|^- ' "$OUT/bench_fit.log" || tail -n 20 "$OUT/bench_fit.log"
    if [ "${DEFAULTS_CHECK:-0}" = "1" ]; then
        echo "defaults check (rc=$defaults_rc):"
        grep -E '^defaults check|^\||^device defaults' "$OUT/defaults_check.log" || tail -n 10 "$OUT/defaults_check.log"
    fi
} | tee "$OUT/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$defaults_rc" -eq 0 ]
