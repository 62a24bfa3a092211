// The derivative of attention_pool_fwd, registered under the Autograd dispatch key for every device: the
// backward is the attention_pool_bwd op of the same device. Registered in C++ rather than with
// torch.library.register_autograd because the Python path (an autograd.Function, argument normalisation and
// a redispatch per call) cost ~35 us per call, 2-3x the whole kernel at small shapes (B=1, T=16, H=128).
// torch.compile traces through it as through any C++ autograd kernel (fake implementations of both ops are
// registered in fused_attn_at/ops/cpp.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/bmm.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace fused_attn_at {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                            const std::optional<at::Tensor>&,
                                                            const std::optional<at::Tensor>&, int64_t, double);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                             const at::Tensor&, const at::Tensor&);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_attn_at::attention_pool_fwd", "")
                             .typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_attn_at::attention_pool_bwd", "")
                             .typed<BackwardSignature>();
  return op;
}

// The backward of attention_pool_fwd as differentiable ATen ops (SPEC: with r constant, a = masked softmax):
//   grad_h[b,t,:] = a[b,t] dc[b,:]                       [B, T, H]
//   da[b,t] = <h[b,t,:], dc[b,:]> + grad_attention[b,t]  [B, T]
//   grad_scores = a * (da - sum_t a da)                  [B, T]
// float16/bfloat16 are computed in float32, as the kernels accumulate, and cast back.
std::tuple<at::Tensor, at::Tensor> backward_composite(const at::Tensor& grad_context, const at::Tensor& grad_attention,
                                                      const at::Tensor& h, const at::Tensor& attention) {
  const auto wide = [](const at::Tensor& x) {
    return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ? x.to(at::kFloat) : x;
  };
  const at::Tensor a = wide(attention), hw = wide(h), dc = wide(grad_context).to(hw.scalar_type());
  at::Tensor grad_h = a.to(hw.scalar_type()).unsqueeze(-1) * dc.unsqueeze(1);
  at::Tensor da = at::bmm(hw, dc.unsqueeze(-1)).squeeze(-1).to(a.scalar_type());
  if (grad_attention.defined()) da = da + wide(grad_attention).to(a.scalar_type());
  at::Tensor grad_scores = a * (da - (a * da).sum(-1, /*keepdim=*/true));
  return {grad_h.to(h.scalar_type()), grad_scores.to(attention.scalar_type())};
}

class AttentionPoolFunction : public torch::autograd::Function<AttentionPoolFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& scores,
                               const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& direction,
                               int64_t kind, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [context, attention] = forward_op().call(h, scores, mask, direction, kind, eps);
    // The backward needs h and the (perturbed) attention only: the perturbation r is a constant.
    ctx->save_for_backward({h, attention});
    return {context, attention};
  }

  // grads: [grad_context, grad_attention], zero-filled by autograd where an output was not used. Returns one
  // gradient per forward argument (h, scores, mask, direction, kind, eps); only h and scores get one.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    // create_graph=True (grad mode on inside the backward): the kernel has no derivative, so the same formula
    // runs as differentiable ATen ops, whose graph reaches scores through the saved attention.
    auto [grad_h, grad_scores] = at::GradMode::is_enabled()
                                     ? backward_composite(grads[0], grads[1], saved[0], saved[1])
                                     : backward_op().call(grads[0], grads[1], saved[0], saved[1]);
    return {ctx->needs_input_grad(0) ? grad_h : at::Tensor(), ctx->needs_input_grad(1) ? grad_scores : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_pool_fwd_autograd(const at::Tensor& h, const at::Tensor& scores,
                                                               const std::optional<at::Tensor>& mask,
                                                               const std::optional<at::Tensor>& direction,
                                                               int64_t kind, double eps) {
  variable_list out = AttentionPoolFunction::apply(h, scores, mask, direction, kind, eps);
  return {out[0], out[1]};
}

// ---- the pair op (issue 17): the clean and the perturbed pooling of one h, in one forward and one backward ----

using PairForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, int64_t, double);
using PairBackwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                                 const at::Tensor&, const std::optional<at::Tensor>&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&);

const c10::TypedOperatorHandle<PairForwardSignature>& pair_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_attn_at::attention_pool_pair_fwd", "")
                             .typed<PairForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<PairBackwardSignature>& pair_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_attn_at::attention_pool_pair_bwd", "")
                             .typed<PairBackwardSignature>();
  return op;
}

// The derivative of attention_pool_pair_fwd: what the two single ops' derivatives sum to (both branches see
// the same h and scores; r is a constant), computed by attention_pool_pair_bwd in one sweep over h, or under
// create_graph as the sum of the two branches' differentiable ATen backwards.
class AttentionPoolPairFunction : public torch::autograd::Function<AttentionPoolPairFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& scores,
                               const std::optional<at::Tensor>& mask, const at::Tensor& direction, int64_t kind,
                               double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [context_clean, attention_clean, context_adv, attention_adv] =
        pair_forward_op().call(h, scores, mask, direction, kind, eps);
    ctx->save_for_backward({h, attention_clean, attention_adv});
    return {context_clean, attention_clean, context_adv, attention_adv};
  }

  // grads: [dcontext_clean, dattention_clean, dcontext_adv, dattention_adv], zero-filled by autograd where an
  // output was not used. One gradient per forward argument; only h and scores get one.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    at::Tensor grad_h, grad_scores;
    if (at::GradMode::is_enabled()) {
      auto [gh_clean, gs_clean] = backward_composite(grads[0], grads[1], saved[0], saved[1]);
      auto [gh_adv, gs_adv] = backward_composite(grads[2], grads[3], saved[0], saved[2]);
      grad_h = gh_clean + gh_adv;
      grad_scores = gs_clean + gs_adv;
    } else {
      std::tie(grad_h, grad_scores) =
          pair_backward_op().call(grads[0], grads[1], grads[2], grads[3], saved[0], saved[1], saved[2]);
    }
    return {ctx->needs_input_grad(0) ? grad_h : at::Tensor(), ctx->needs_input_grad(1) ? grad_scores : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_pair_fwd_autograd(
    const at::Tensor& h, const at::Tensor& scores, const std::optional<at::Tensor>& mask, const at::Tensor& direction,
    int64_t kind, double eps) {
  variable_list out = AttentionPoolPairFunction::apply(h, scores, mask, direction, kind, eps);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace fused_attn_at

TORCH_LIBRARY_IMPL(fused_attn_at, Autograd, m) {
  m.impl("attention_pool_fwd", &fused_attn_at::attention_pool_fwd_autograd);
  m.impl("attention_pool_pair_fwd", &fused_attn_at::attention_pool_pair_fwd_autograd);
}
