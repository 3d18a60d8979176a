// Torch-facing entry points of the fused head + loss (defined in head_loss.cpp, built only with CUDA).
#pragma once

#include <optional>
#include <vector>

#include <ATen/ATen.h>

namespace inrscrecon {

// Per-row statistics [B, 5] fp64: (SSE, Σq, Σ q log q, Σ q log p, Σp); see cuda/head_loss_kernel.cuh.
at::Tensor head_loss_forward(const at::Tensor& hidden,                // [B, W]
                             const at::Tensor& weight,                // [M, W]
                             const std::optional<at::Tensor>& bias,   // [M]
                             const at::Tensor& target,                // [B, M]
                             double kl_eps);

// (grad_hidden [B, W], grad_weight [M, W], grad_bias [M] or empty) in fp32.
std::vector<at::Tensor> head_loss_backward(const at::Tensor& hidden, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                           const at::Tensor& row_aux,  // [B, 2] fp32
                                           const at::Tensor& coef,     // [2] fp32
                                           double kl_eps);

}  // namespace inrscrecon
