// Shared declarations of the fused perturbed attention-pooling ops (namespace fused_attn_at).
//
// The schemas are declared once, in csrc/ops.cpp:
//   attention_pool_fwd(Tensor h, Tensor scores, Tensor? mask, Tensor? direction, int kind, float eps)
//       -> (Tensor context, Tensor attention)
//   attention_pool_bwd(Tensor grad_context, Tensor? grad_attention, Tensor h, Tensor attention)
//       -> (Tensor grad_h, Tensor grad_scores)
//   perturbation(Tensor scores, Tensor? mask, Tensor direction, int kind, float eps) -> Tensor
//   attention_scores_grad(Tensor grad_context, Tensor? grad_attention, Tensor h, Tensor attention)
//       -> Tensor grad_scores                      (attention_pool_bwd's grad_scores, without grad_h)
//   attention_pool_pair_fwd(Tensor h, Tensor scores, Tensor? mask, Tensor direction, int kind, float eps)
//       -> (Tensor context_clean, Tensor attention_clean, Tensor context_adv, Tensor attention_adv)
//   attention_pool_pair_bwd(Tensor grad_context_clean, Tensor? grad_attention_clean, Tensor grad_context_adv,
//       Tensor? grad_attention_adv, Tensor h, Tensor attention_clean, Tensor attention_adv)
//       -> (Tensor grad_h, Tensor grad_scores)     (grad_h = a_clean dc_clean + a_adv dc_adv, written once)
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
// The pair op: kind must be 1 or 2 (the second branch is perturbed), then as check_forward_inputs.
void check_pair_forward_inputs(const at::Tensor& h, const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& direction, int64_t kind, double eps);
void check_pair_backward_inputs(const at::Tensor& grad_context_clean,
                                const std::optional<at::Tensor>& grad_attention_clean,
                                const at::Tensor& grad_context_adv, const std::optional<at::Tensor>& grad_attention_adv,
                                const at::Tensor& h, const at::Tensor& attention_clean,
                                const at::Tensor& attention_adv);

}  // namespace fused_attn_at
