// CUDA row pass of the GEMM + fused-loss sparse head: one block per row of a logits chunk (cuBLAS wrote it).
//
// Per row (arithmetic in sparse_head_rows.h): (1) the block reads the logits at the row's non-zeros into z_nz
// and sums Σ p·t, Σ t², Σ t, Σ q log1p(t/ε); (2) a barrier, then one coalesced sweep over the M logits sums
// Σ p², Σ q, Σ q log q and, for the gradient, overwrites each logit with its dense-target-zero dz; (3) a
// barrier, then the non-zeros' dz are rewritten from z_nz (genes are unique in a row: no races). Reductions:
// fp32 per thread, warp shuffles, one shared-memory step across the 8 warps. Gradient of the KL term:
//   KL_r = Σ_g (q_g/s)(log q_g − log s − log P_g),  log P_g = log(t_g + ε) − log S
//   ∂KL_r/∂q_g = (1/s)(log q_g − log(t_g + ε) + log S − log s − KL_r) = (1/s)(log q_g − log(t_g + ε) + off_r)
// and softplus'(z) = sigmoid(z) (1 above the threshold 20, where softplus(z) = z).
#include "sparse_head_kernel.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace inrscrecon {
namespace cuda {
namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int N_SUMS = 7;  // Σp², Σq, Σ q log q, Σ p·t, Σ t², Σ t, Σ q log1p(t/ε)

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_f<__half>(__half v) {
  return __half2float(v);
}
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half(v);
}

__device__ __forceinline__ float softplus(float z) {
  return z > kSoftplusThreshold ? z : log1pf(expf(z));
}
__device__ __forceinline__ float softplus_grad(float z) {
  return z > kSoftplusThreshold ? 1.0f : 1.0f / (1.0f + expf(-z));
}

// Sums v[0..N) over the block; every thread gets the totals. Ends with a barrier.
template <int N>
__device__ void block_sum(float (&v)[N], float (*smem)[WARPS]) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
    if (lane == 0) smem[i][warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < WARPS; ++k) s += smem[i][k];
    v[i] = s;
  }
  __syncthreads();
}

template <typename T, typename I>
__global__ void __launch_bounds__(THREADS) rows_kernel(SparseHeadRows a) {
  __shared__ float smem[N_SUMS][WARPS];
  const int64_t i = blockIdx.x;  // row within the chunk
  const int64_t r = a.row0 + i;  // global row
  const int64_t M = a.n_genes;
  T* z = static_cast<T*>(a.logits) + i * M;
  const I* idx = static_cast<const I*>(a.indices);
  const int64_t k0 = a.indptr[r];
  const int64_t k1 = a.indptr[r + 1];
  if (k0 < 0 || k1 < k0 || k1 > a.cap) __trap();  // malformed indptr: never read out of bounds
  const float eps = a.kl_eps;
  const float w = a.row_weight != nullptr ? a.row_weight[r] : 1.0f;
  const float c_r = a.coef != nullptr ? a.coef[0] : 1.0f;
  const float c_k = a.coef != nullptr ? a.coef[1] : 0.0f;
  const bool kl = a.has_kl;
  const float log_eps = logf(eps);

  float sum[N_SUMS] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t k = k0 + threadIdx.x; k < k1; k += THREADS) {  // (1) the non-zeros
    const int64_t g = static_cast<int64_t>(idx[k]);
    if (g < 0 || g >= M) __trap();  // gene index out of range
    const float zz = to_f(z[g]);
    a.z_nz[k] = zz;
    const float p = softplus(zz), t = a.values[k];
    sum[3] += p * t;
    sum[4] += t * t;
    sum[5] += t;
    if (kl) sum[6] += (p + eps) * log1pf(t / eps);
  }
  __syncthreads();  // every read of z at a non-zero precedes the sweep's writes

  float inv_s = 0.0f, off = 0.0f;
  if (!a.stats && a.grad && kl) {
    inv_s = a.rowstat_in[2 * r];
    off = a.rowstat_in[2 * r + 1];
  }
  for (int64_t g = threadIdx.x; g < M; g += THREADS) {  // (2) the dense sweep (target 0)
    const float zz = to_f(z[g]);
    const float p = softplus(zz);
    const float q = p + eps;
    sum[0] += p * p;
    if (kl) {
      const float lq = logf(q);
      sum[1] += q;
      sum[2] += q * lq;
      if (a.grad) z[g] = from_f<T>(w * softplus_grad(zz) * (c_r * p + c_k * (lq - log_eps + off) * inv_s));
    } else if (a.grad) {
      z[g] = from_f<T>(w * softplus_grad(zz) * c_r * p);
    }
  }
  if (a.stats) {
    block_sum(sum, smem);
    if (threadIdx.x == 0) {
      float* o = a.row_out + kRowOut * r;
      o[0] = sum[0] - 2.0f * sum[3] + sum[4];
      if (kl) {
        const float s = sum[1];
        const float big_s = sum[5] + static_cast<float>(M) * eps;
        const float c = s * log_eps + sum[6];
        const float kl_r = sum[2] / s - logf(s) - c / s + logf(big_s);
        o[1] = kl_r;
        o[2] = 1.0f / s;
        o[3] = logf(big_s) - logf(s) - kl_r;
      } else {
        o[1] = o[2] = o[3] = 0.0f;
      }
    }
  } else {
    __syncthreads();
  }
  if (!a.grad) return;
  for (int64_t k = k0 + threadIdx.x; k < k1; k += THREADS) {  // (3) the non-zeros' dz
    const int64_t g = static_cast<int64_t>(idx[k]);
    const float zz = a.z_nz[k];
    const float p = softplus(zz), t = a.values[k];
    float d = c_r * (p - t);
    if (kl) d += c_k * (logf(p + eps) - logf(t + eps) + off) * inv_s;
    z[g] = from_f<T>(w * softplus_grad(zz) * d);
  }
}

template <typename T>
cudaError_t launch(const SparseHeadRows& a, cudaStream_t stream) {
  if (a.n_rows <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(a.n_rows));
  if (a.indices64) {
    rows_kernel<T, int64_t><<<grid, THREADS, 0, stream>>>(a);
  } else {
    rows_kernel<T, int32_t><<<grid, THREADS, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t sparse_head_rows(DType dtype, const SparseHeadRows& args, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(args, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(args, stream);
    case DType::kFloat16:
      return launch<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace inrscrecon
