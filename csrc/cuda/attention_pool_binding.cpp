// Torch binding of the CUDA kernels (attention_pool_kernels.cu, interface attention_pool_cuda.h): checks the
// inputs, allocates outputs and workspaces with torch's caching allocator on the current stream, and registers
// the ops of csrc/ops.cpp under the CUDA dispatch key (the op's three and the three pair ops of issue 17). Built
// only where torch has CUDA (setup.py); tests/test_cuda_compile.py also compiles it against the CUDA headers of
// torch and builds it over the CPU emulation of the kernels (tests/cuda_stubs/), so that its checks run without a
// GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../attention_pool.h"
#include "attention_pool_cuda.h"

namespace fused_attn_at {
namespace {

fa_dtype to_fa_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return FA_FLOAT32;
    case at::kDouble:
      return FA_FLOAT64;
    case at::kHalf:
      return FA_FLOAT16;
    case at::kBFloat16:
      return FA_BFLOAT16;
    default:
      TORCH_CHECK_TYPE(false, "fused_attn_at CUDA kernels take float16, bfloat16, float32 or float64, got ", dtype);
  }
}

at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

fa_view view_of(const at::Tensor& x) {
  fa_view view{x.data_ptr(), {0, 0, 0}};
  for (int64_t d = 0; d < x.dim() && d < 3; ++d) view.stride[d] = x.stride(d);
  return view;
}

fa_view optional_view(const std::optional<at::Tensor>& x) {
  return x.has_value() ? view_of(*x) : fa_view{nullptr, {0, 0, 0}};
}

void check_cuda(const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), name, " must be a CUDA tensor for the CUDA kernels, got device ", x.device());
}

void check_launch(int error, const char* what) {
  TORCH_CHECK(error == 0, "fused_attn_at: CUDA ", what, " failed: ", fa_cuda_error_string(error));
}

// Every kernel runs one thread block per row along grid x (at most 2^31 - 1 blocks); the other launch dimensions
// are derived from T and H and kept within their limits by the launchers.
void check_batch(const char* name, int64_t B) {
  TORCH_CHECK_VALUE(B <= FA_CUDA_MAX_BATCH, "fused_attn_at CUDA kernels: the batch size B (dim 0 of ", name, ") is ",
                    B, ", above the CUDA grid x limit 2^31 - 1 = ", FA_CUDA_MAX_BATCH,
                    " (one thread block per row); split the batch");
}

// The flags the kernels set where scores/direction hold NaN or inf at real positions (FA_NONFINITE_*): zeroed on
// the stream before the launches.
at::Tensor nonfinite_flags(const at::Tensor& like) { return at::zeros({}, like.options().dtype(at::kInt)); }

// After the launches: raise if a kernel set a flag, as the CPU kernels do (raise_if_nonfinite), but on the device
// (at::_assert_async: no host sync, so CUDA graphs can capture the op; a failure surfaces at the next
// synchronisation). The Python API renames "direction" to the argument the user passed (grad or noise).
void assert_finite_async(const at::Tensor& flags) {
  at::_assert_async(flags.bitwise_and(FA_NONFINITE_SCORES).eq(0),
                    "scores holds NaN or inf at real (unmasked) positions; expected finite values");
  at::_assert_async(flags.bitwise_and(FA_NONFINITE_DIRECTION).eq(0),
                    "direction holds NaN or inf at real (unmasked) positions; expected finite values");
}

// The kernels read every operand in the storage type of h/scores (the checks only require a float dtype).
at::Tensor as_dtype(const at::Tensor& x, at::ScalarType dtype) { return x.scalar_type() == dtype ? x : x.to(dtype); }

// (c10/cuda only: ATen/cuda/CUDAContext.h would pull in the cuBLAS/cuSPARSE headers, absent from minimal toolkits.)
void* stream_handle() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

int num_sms() {
  int count = 0;
  check_launch(fa_cuda_multiprocessor_count(c10::cuda::current_device(), &count), "multiprocessor count query");
  return count;
}

// The prelude of every entry point that reads h: h on a CUDA device within the grid limit, that device current for
// the launches (RAII), and the sizes and storage type the kernels are launched with.
c10::Device checked_device(const at::Tensor& h) {
  check_cuda("h", h);
  check_batch("h", h.size(0));
  return h.device();
}

struct HCall {
  int64_t B, T, H;
  at::ScalarType dtype;
  c10::cuda::CUDAGuard guard;
  explicit HCall(const at::Tensor& h)
      : B(h.size(0)), T(h.size(1)), H(h.size(2)), dtype(h.scalar_type()), guard(checked_device(h)) {}
};

// One branch's backward operands (dL/dcontext, dL/dattention, the attention) in h's storage type.
struct GradBranch {
  at::Tensor dc, a;
  std::optional<at::Tensor> ga;
  GradBranch(const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_attention,
             const at::Tensor& attention, at::ScalarType dtype)
      : dc(as_dtype(grad_context, dtype)), a(as_dtype(attention, dtype)) {
    if (grad_attention.has_value()) ga = as_dtype(*grad_attention, dtype);
  }
};

// The kernels write dscores in h's storage type: into grad_scores (the attention's dtype) when the two agree, else
// into a staging tensor that copy_back_scores copies over.
at::Tensor scores_target(const at::Tensor& grad_scores, const at::Tensor& h) {
  return grad_scores.scalar_type() == h.scalar_type() ? grad_scores : at::empty(grad_scores.sizes(), h.options());
}

void copy_back_scores(at::Tensor& grad_scores, const at::Tensor& target) {
  if (!target.is_same(grad_scores)) grad_scores.copy_(target);
}

// r of kind 1 (AT/RP) or 2 (iAT) into `out` ([B, T], in the scores' dtype, or in acc when out_is_acc).
void launch_perturbation(const at::Tensor& scores, const std::optional<at::Tensor>& mask, const at::Tensor& direction,
                         int64_t kind, double eps, const at::Tensor& out, bool out_is_acc, const at::Tensor& flags) {
  const int64_t B = scores.size(0), T = scores.size(1);
  const fa_dtype dtype = to_fa_dtype(scores.scalar_type());
  at::Tensor coeff;
  if (kind == KIND_IAT) {
    coeff = at::empty({B, B}, scores.options().dtype(acc_dtype(scores.scalar_type())));  // coeff[i, j]
    check_launch(fa_cuda_iat_coefficients(dtype, B, T, view_of(scores), optional_view(mask), view_of(direction),
                                          coeff.data_ptr(), flags.data_ptr<int>(), stream_handle()),
                 "iAT coefficient kernel");
  }
  const void* coeff_data = coeff.defined() ? coeff.data_ptr() : nullptr;
  check_launch(fa_cuda_perturbation(dtype, static_cast<int>(kind), out_is_acc ? 1 : 0, B, T, eps, view_of(scores),
                                    optional_view(mask), view_of(direction), coeff_data, view_of(out),
                                    flags.data_ptr<int>(), stream_handle()),
               "perturbation kernel");
}

std::tuple<at::Tensor, at::Tensor> attention_pool_fwd_cuda(const at::Tensor& h, const at::Tensor& scores,
                                                           const std::optional<at::Tensor>& mask,
                                                           const std::optional<at::Tensor>& direction, int64_t kind,
                                                           double eps) {
  check_forward_inputs(h, scores, mask, direction, kind, eps);
  const HCall call(h);
  const int64_t B = call.B, T = call.T, H = call.H;
  const at::ScalarType dtype = call.dtype;
  at::Tensor context = at::empty({B, H}, h.options());
  at::Tensor attention = at::empty({B, T}, h.options());
  if (B == 0) return {context, attention};
  if (T == 0) return {context.zero_(), attention};
  const at::Tensor flags = nonfinite_flags(h);
  int perturb = FA_PERTURB_NONE;
  at::Tensor r_or_direction;
  if (kind == KIND_NORMALIZE) {
    perturb = FA_PERTURB_NORMALIZE;
    r_or_direction = as_dtype(*direction, dtype);
  } else if (kind == KIND_IAT) {
    perturb = FA_PERTURB_GIVEN;
    r_or_direction = at::empty({B, T}, h.options().dtype(acc_dtype(dtype)));  // r, contiguous
    launch_perturbation(scores, mask, as_dtype(*direction, dtype), kind, eps, r_or_direction, /*out_is_acc=*/true,
                        flags);
  }
  const fa_view direction_view = r_or_direction.defined() ? view_of(r_or_direction) : fa_view{nullptr, {0, 0, 0}};
  check_launch(fa_cuda_attention_pool_fwd(to_fa_dtype(dtype), perturb, B, T, H, eps, view_of(h), view_of(scores),
                                          optional_view(mask), direction_view, view_of(context), view_of(attention),
                                          num_sms(), flags.data_ptr<int>(), stream_handle()),
               "attention_pool forward kernel");
  assert_finite_async(flags);
  return {context, attention};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_bwd_cuda(const at::Tensor& grad_context,
                                                           const std::optional<at::Tensor>& grad_attention,
                                                           const at::Tensor& h, const at::Tensor& attention) {
  check_backward_inputs(grad_context, grad_attention, h, attention);
  const HCall call(h);
  const int64_t B = call.B, T = call.T, H = call.H;
  const at::ScalarType dtype = call.dtype;
  // empty_like keeps h's layout where h is dense and non-overlapping (the fake implementation does the same)
  at::Tensor grad_h = at::empty_like(h);
  at::Tensor grad_scores = at::empty({B, T}, attention.options());
  if (B == 0 || T == 0) return {grad_h.zero_(), grad_scores};
  const GradBranch branch(grad_context, grad_attention, attention, dtype);
  const at::Tensor scores_out = scores_target(grad_scores, h);
  at::Tensor da = at::empty({B, T}, h.options().dtype(acc_dtype(dtype)));  // dL/da_t, contiguous workspace
  check_launch(fa_cuda_attention_pool_bwd(to_fa_dtype(dtype), B, T, H, view_of(branch.dc),
                                          optional_view(branch.ga), view_of(h), view_of(branch.a), view_of(grad_h),
                                          view_of(scores_out), da.data_ptr(), num_sms(), stream_handle()),
               "attention_pool backward kernels");
  copy_back_scores(grad_scores, scores_out);
  return {grad_h, grad_scores};
}

at::Tensor perturbation_cuda(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                             const at::Tensor& direction, int64_t kind, double eps) {
  check_perturbation_inputs(scores, mask, direction, kind, eps);
  check_cuda("scores", scores);
  check_batch("scores", scores.size(0));
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor out = at::empty(scores.sizes(), scores.options());
  if (out.numel() == 0) return out;
  const at::Tensor flags = nonfinite_flags(scores);
  launch_perturbation(scores, mask, as_dtype(direction, scores.scalar_type()), kind, eps, out, /*out_is_acc=*/false,
                      flags);
  assert_finite_async(flags);
  return out;
}

// ---- the pair ops of the AT training step (issue 17) ----

at::Tensor attention_scores_grad_cuda(const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_attention,
                                      const at::Tensor& h, const at::Tensor& attention) {
  check_backward_inputs(grad_context, grad_attention, h, attention);
  const HCall call(h);
  const int64_t B = call.B, T = call.T, H = call.H;
  const at::ScalarType dtype = call.dtype;
  at::Tensor grad_scores = at::empty({B, T}, attention.options());
  if (B == 0 || T == 0) return grad_scores;
  const GradBranch branch(grad_context, grad_attention, attention, dtype);
  const at::Tensor scores_out = scores_target(grad_scores, h);
  at::Tensor da = at::empty({B, T}, h.options().dtype(acc_dtype(dtype)));  // dL/da_t, contiguous workspace
  check_launch(fa_cuda_attention_scores_grad(to_fa_dtype(dtype), B, T, H, view_of(branch.dc),
                                             optional_view(branch.ga), view_of(h), view_of(branch.a),
                                             view_of(scores_out), da.data_ptr(), num_sms(), stream_handle()),
               "attention_scores_grad kernels");
  copy_back_scores(grad_scores, scores_out);
  return grad_scores;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_pair_fwd_cuda(
    const at::Tensor& h, const at::Tensor& scores, const std::optional<at::Tensor>& mask, const at::Tensor& direction,
    int64_t kind, double eps) {
  check_pair_forward_inputs(h, scores, mask, direction, kind, eps);
  const HCall call(h);
  const int64_t B = call.B, T = call.T, H = call.H;
  const at::ScalarType dtype = call.dtype;
  at::Tensor context_clean = at::empty({B, H}, h.options());
  at::Tensor attention_clean = at::empty({B, T}, h.options());
  at::Tensor context_adv = at::empty({B, H}, h.options());
  at::Tensor attention_adv = at::empty({B, T}, h.options());
  if (B == 0) return {context_clean, attention_clean, context_adv, attention_adv};
  if (T == 0) return {context_clean.zero_(), attention_clean, context_adv.zero_(), attention_adv};
  const at::Tensor flags = nonfinite_flags(h);
  int perturb = FA_PERTURB_NORMALIZE;
  at::Tensor r_or_direction;
  if (kind == KIND_NORMALIZE) {
    r_or_direction = as_dtype(direction, dtype);
  } else {
    perturb = FA_PERTURB_GIVEN;
    r_or_direction = at::empty({B, T}, h.options().dtype(acc_dtype(dtype)));  // r, contiguous
    launch_perturbation(scores, mask, as_dtype(direction, dtype), kind, eps, r_or_direction, /*out_is_acc=*/true,
                        flags);
  }
  check_launch(fa_cuda_attention_pool_pair_fwd(to_fa_dtype(dtype), perturb, B, T, H, eps, view_of(h),
                                               view_of(scores), optional_view(mask), view_of(r_or_direction),
                                               view_of(context_clean), view_of(attention_clean),
                                               view_of(context_adv), view_of(attention_adv), num_sms(),
                                               flags.data_ptr<int>(), stream_handle()),
               "attention_pool_pair forward kernel");
  assert_finite_async(flags);
  return {context_clean, attention_clean, context_adv, attention_adv};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_pair_bwd_cuda(
    const at::Tensor& grad_context_clean, const std::optional<at::Tensor>& grad_attention_clean,
    const at::Tensor& grad_context_adv, const std::optional<at::Tensor>& grad_attention_adv, const at::Tensor& h,
    const at::Tensor& attention_clean, const at::Tensor& attention_adv) {
  check_pair_backward_inputs(grad_context_clean, grad_attention_clean, grad_context_adv, grad_attention_adv, h,
                             attention_clean, attention_adv);
  const HCall call(h);
  const int64_t B = call.B, T = call.T, H = call.H;
  const at::ScalarType dtype = call.dtype;
  // empty_like keeps h's layout where h is dense and non-overlapping (the fake implementation does the same)
  at::Tensor grad_h = at::empty_like(h);
  at::Tensor grad_scores = at::empty({B, T}, attention_clean.options());
  if (B == 0 || T == 0) return {grad_h.zero_(), grad_scores};
  const GradBranch clean(grad_context_clean, grad_attention_clean, attention_clean, dtype);
  const GradBranch adv(grad_context_adv, grad_attention_adv, attention_adv, dtype);
  const at::Tensor scores_out = scores_target(grad_scores, h);
  at::Tensor da = at::empty({2, B, T}, h.options().dtype(acc_dtype(dtype)));  // both branches' dL/da, contiguous
  check_launch(fa_cuda_attention_pool_pair_bwd(to_fa_dtype(dtype), B, T, H, view_of(clean.dc),
                                               optional_view(clean.ga), view_of(adv.dc), optional_view(adv.ga),
                                               view_of(h), view_of(clean.a), view_of(adv.a), view_of(grad_h),
                                               view_of(scores_out), da.data_ptr(), num_sms(), stream_handle()),
               "attention_pool_pair backward kernels");
  copy_back_scores(grad_scores, scores_out);
  return {grad_h, grad_scores};
}

}  // namespace
}  // namespace fused_attn_at

TORCH_LIBRARY_IMPL(fused_attn_at, CUDA, m) {
  m.impl("attention_pool_fwd", &fused_attn_at::attention_pool_fwd_cuda);
  m.impl("attention_pool_bwd", &fused_attn_at::attention_pool_bwd_cuda);
  m.impl("perturbation", &fused_attn_at::perturbation_cuda);
  m.impl("attention_scores_grad", &fused_attn_at::attention_scores_grad_cuda);
  m.impl("attention_pool_pair_fwd", &fused_attn_at::attention_pool_pair_fwd_cuda);
  m.impl("attention_pool_pair_bwd", &fused_attn_at::attention_pool_pair_bwd_cuda);
}
