// Shared declarations of the fused perturbed attention-pooling ops (namespace fused_attn_at).
//
// The schemas are declared once, in csrc/ops.cpp:
//   attention_pool_fwd(Tensor h, Tensor scores, Tensor? mask, Tensor? direction, int kind, float eps)
//       -> (Tensor context, Tensor attention)
//   attention_pool_bwd(Tensor grad_context, Tensor? grad_attention, Tensor h, Tensor attention)
//       -> (Tensor grad_h, Tensor grad_scores)
//   perturbation(Tensor scores, Tensor? mask, Tensor direction, int kind, float eps) -> Tensor
// Device implementations register with TORCH_LIBRARY_IMPL(fused_attn_at, <CPU|CUDA>, m) and call the
// checks below first, so a direct torch.ops call with bad input raises instead of crashing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

namespace fused_attn_at {

// kind: 0 no perturbation; 1 r = eps * direction / max(||direction||, DELTA) over the valid positions
// (AT, RP); 2 iAT from the scores and direction = grad (SPEC).
constexpr int64_t KIND_NONE = 0;
constexpr int64_t KIND_NORMALIZE = 1;
constexpr int64_t KIND_IAT = 2;
// Guards every division by a norm (python_ref.DELTA).
constexpr double DELTA = 1e-12;

// Each raises c10::Error (RuntimeError / ValueError in Python) naming the argument and what was expected.
void check_forward_inputs(const at::Tensor& h, const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                          const std::optional<at::Tensor>& direction, int64_t kind, double eps);
void check_perturbation_inputs(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                               const at::Tensor& direction, int64_t kind, double eps);
void check_backward_inputs(const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_attention,
                           const at::Tensor& h, const at::Tensor& attention);

}  // namespace fused_attn_at
