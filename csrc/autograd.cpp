// The derivative of attention_pool_fwd, registered under the Autograd dispatch key for every device: the
// backward is the attention_pool_bwd op of the same device. Registered in C++ rather than with
// torch.library.register_autograd because the Python path (an autograd.Function, argument normalisation and
// a redispatch per call) cost ~35 us per call, 2-3x the whole kernel at small shapes (B=1, T=16, H=128).
// torch.compile traces through it as through any C++ autograd kernel (fake implementations of both ops are
// registered in fused_attn_at/ops/cpp.py).
#include <ATen/core/dispatch/Dispatcher.h>
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
    auto [grad_h, grad_scores] = backward_op().call(grads[0], grads[1], saved[0], saved[1]);
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

}  // namespace
}  // namespace fused_attn_at

TORCH_LIBRARY_IMPL(fused_attn_at, Autograd, m) {
  m.impl("attention_pool_fwd", &fused_attn_at::attention_pool_fwd_autograd);
}
