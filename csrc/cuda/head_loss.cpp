// Torch binding of the fused head + loss: input checks at the boundary, then the plain-CUDA launchers of
// head_loss_kernel.cu on the current stream. Built only by CUDAExtension (WITH_CUDA).
#include "head_loss.h"

#include <string>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "head_loss_kernel.cuh"

namespace inrscrecon {
namespace {

cuda::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kHalf:
      return cuda::DType::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, "head_loss: dtype must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& target) {
  TORCH_CHECK_VALUE(hidden.is_cuda(), "head_loss: hidden must be a CUDA tensor");
  TORCH_CHECK_VALUE(hidden.dim() == 2, "head_loss: hidden must be [B, W], got ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "head_loss: weight must be [M, W], got ", weight.sizes());
  TORCH_CHECK_VALUE(target.dim() == 2, "head_loss: target must be [B, M], got ", target.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "head_loss: weight ", weight.sizes(), " and hidden ",
                    hidden.sizes(), " disagree on W");
  TORCH_CHECK_VALUE(target.size(0) == hidden.size(0) && target.size(1) == weight.size(0), "head_loss: target ",
                    target.sizes(), " must be [B, M] = [", hidden.size(0), ", ", weight.size(0), "]");
  std::vector<const at::Tensor*> all = {&weight, &target};
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "head_loss: bias must be [M] = [",
                      weight.size(0), "], got ", bias->sizes());
    all.push_back(&*bias);
  }
  for (const at::Tensor* t : all) {
    TORCH_CHECK_VALUE(t->device() == hidden.device(), "head_loss: all tensors must be on ", hidden.device());
    TORCH_CHECK_VALUE(t->scalar_type() == hidden.scalar_type(), "head_loss: all tensors must share hidden's dtype ",
                      hidden.scalar_type(), ", got ", t->scalar_type());
  }
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "head_loss: ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

at::Tensor head_loss_forward(const at::Tensor& hidden, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& target, double kl_eps) {
  check_inputs(hidden, weight, bias, target);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor h = hidden.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t B = h.size(0), M = w.size(0), W = h.size(1);
  at::Tensor stats = at::zeros({B, cuda::kStatsPerRow}, h.options().dtype(at::kDouble));
  check_cuda(cuda::head_loss_forward(kernel_dtype(h), h.data_ptr(), w.data_ptr(),
                                     b.defined() ? b.data_ptr() : nullptr, t.data_ptr(), B, M, W,
                                     static_cast<float>(kl_eps), stats.data_ptr<double>(),
                                     c10::cuda::getCurrentCUDAStream().stream()),
             "forward launch");
  return stats;
}

std::vector<at::Tensor> head_loss_backward(const at::Tensor& hidden, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                           const at::Tensor& row_aux, const at::Tensor& coef, double kl_eps) {
  check_inputs(hidden, weight, bias, target);
  const int64_t B = hidden.size(0), M = weight.size(0), W = hidden.size(1);
  TORCH_CHECK_VALUE(row_aux.device() == hidden.device() && row_aux.scalar_type() == at::kFloat &&
                        row_aux.dim() == 2 && row_aux.size(0) == B && row_aux.size(1) == cuda::kAuxPerRow,
                    "head_loss: row_aux must be a float32 [B, 2] tensor on ", hidden.device());
  TORCH_CHECK_VALUE(coef.device() == hidden.device() && coef.scalar_type() == at::kFloat && coef.numel() == 2,
                    "head_loss: coef must be a float32 [2] tensor on ", hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor h = hidden.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor aux = row_aux.contiguous();
  const at::Tensor c = coef.contiguous();
  const auto f32 = h.options().dtype(at::kFloat);
  at::Tensor grad_h = at::empty({B, W}, f32);
  at::Tensor grad_w = at::empty({M, W}, f32);
  at::Tensor grad_b = b.defined() ? at::empty({M}, f32) : at::Tensor();
  check_cuda(cuda::head_loss_backward(kernel_dtype(h), h.data_ptr(), w.data_ptr(),
                                      b.defined() ? b.data_ptr() : nullptr, t.data_ptr(), B, M, W,
                                      static_cast<float>(kl_eps), aux.data_ptr<float>(), c.data_ptr<float>(),
                                      grad_h.data_ptr<float>(), grad_w.data_ptr<float>(),
                                      grad_b.defined() ? grad_b.data_ptr<float>() : nullptr,
                                      c10::cuda::getCurrentCUDAStream().stream()),
             "backward launch");
  return {grad_h, grad_w, grad_b};
}

}  // namespace inrscrecon
