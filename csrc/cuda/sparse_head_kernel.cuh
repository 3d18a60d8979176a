// CUDA row pass of the GEMM + fused-loss sparse head (plain CUDA, no torch headers); see sparse_head_rows.h.
#pragma once

#include <cuda_runtime_api.h>

#include "sparse_head_rows.h"

namespace inrscrecon {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };  // of SparseHeadRows::logits

// One block per row of the chunk (256 threads, warp-shuffle reductions), launched on ``stream``.
cudaError_t sparse_head_rows(DType dtype, const SparseHeadRows& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace inrscrecon
