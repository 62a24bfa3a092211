// The op schemas of fused_attn_at, the input checks every device implementation shares, and the Python
// module fused_attn_at._C (empty apart from a diagnostic: loading it registers the ops).
#include <Python.h>

#include <torch/library.h>

#include <cmath>

#include "attention_pool.h"
#include "cpu/isa.h"

namespace fused_attn_at {
namespace {

bool is_float(const at::Tensor& x) {
  const auto dt = x.scalar_type();
  return dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16;
}

void check_scores(const at::Tensor& scores) {
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must have shape [B, T] (2 dims), got shape ", scores.sizes());
  TORCH_CHECK_TYPE(is_float(scores), "scores must be a floating tensor (float16, bfloat16, float32 or float64), got ",
                   scores.scalar_type());
}

// x must be a floating [B, T] tensor shaped like `like` (named like_name) and on its device.
void check_like(const char* name, const at::Tensor& x, const char* like_name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must have shape [B, T] like ", like_name, " (2 dims), got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_float(x), name, " must be a floating tensor (float16, bfloat16, float32 or float64), got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ", like.sizes(),
                    " ([B, T]), got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == like.device(), name, " must be on the device of ", like_name, " (", like.device(),
                    "), got ", x.device());
}

void check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& scores) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK_VALUE(m.dim() == 2, "mask must have shape [B, T] bool (True at real tokens), got shape ", m.sizes());
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "mask must be a bool tensor [B, T] (True at real tokens), got dtype ",
                   m.scalar_type());
  TORCH_CHECK_VALUE(m.sizes() == scores.sizes(), "mask must have the shape of scores ", scores.sizes(),
                    " ([B, T]), got ", m.sizes());
  TORCH_CHECK_VALUE(m.device() == scores.device(), "mask must be on the device of scores (", scores.device(),
                    "), got ", m.device());
}

void check_kind_eps(int64_t kind, double eps, bool allow_none) {
  TORCH_CHECK_VALUE((allow_none && kind == KIND_NONE) || kind == KIND_NORMALIZE || kind == KIND_IAT, "kind must be ",
                    allow_none ? "0 (none), " : "", "1 (AT/RP: normalise direction) or 2 (iAT), got ", kind);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0, got ", eps);
}

}  // namespace

void check_forward_inputs(const at::Tensor& h, const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                          const std::optional<at::Tensor>& direction, int64_t kind, double eps) {
  TORCH_CHECK_VALUE(h.dim() == 3, "h must have shape [B, T, H] (3 dims), got shape ", h.sizes());
  TORCH_CHECK_TYPE(is_float(h), "h must be a floating tensor (float16, bfloat16, float32 or float64), got ",
                   h.scalar_type());
  check_scores(scores);
  TORCH_CHECK_VALUE(h.size(0) == scores.size(0) && h.size(1) == scores.size(1),
                    "h [B, T, H] and scores [B, T] must agree on B and T: h has ", h.sizes(), ", scores has ",
                    scores.sizes());
  TORCH_CHECK_VALUE(h.device() == scores.device(), "h and scores must be on one device: h is on ", h.device(),
                    ", scores on ", scores.device());
  TORCH_CHECK_TYPE(h.scalar_type() == scores.scalar_type(), "scores must have the dtype of h (", h.scalar_type(),
                   "), got ", scores.scalar_type());
  check_mask(mask, scores);
  check_kind_eps(kind, eps, /*allow_none=*/true);
  if (kind != KIND_NONE) {
    TORCH_CHECK_VALUE(direction.has_value(), "direction ([B, T]: grad for AT/iAT, noise for RP) is required for kind ",
                      kind);
  }
  if (direction.has_value()) check_like("direction", *direction, "scores", scores);
}

void check_perturbation_inputs(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                               const at::Tensor& direction, int64_t kind, double eps) {
  check_scores(scores);
  check_mask(mask, scores);
  check_kind_eps(kind, eps, /*allow_none=*/false);
  check_like("direction", direction, "scores", scores);
}

namespace {

// One branch of a backward: grad_context [B, H], grad_attention [B, T] (optional) and attention [B, T] against
// h [B, T, H], named as the op's arguments are.
void check_backward_branch(const char* gc_name, const at::Tensor& grad_context, const char* ga_name,
                           const std::optional<at::Tensor>& grad_attention, const char* att_name,
                           const at::Tensor& h, const at::Tensor& attention) {
  TORCH_CHECK_VALUE(attention.dim() == 2 && attention.size(0) == h.size(0) && attention.size(1) == h.size(1),
                    att_name, " must have shape [B, T] = ", h.sizes().slice(0, 2), " (from h [B, T, H]), got ",
                    attention.sizes());
  TORCH_CHECK_TYPE(is_float(attention), att_name, " must be a floating tensor, got ", attention.scalar_type());
  TORCH_CHECK_VALUE(grad_context.dim() == 2 && grad_context.size(0) == h.size(0) && grad_context.size(1) == h.size(2),
                    gc_name, " must have shape [B, H] = [", h.size(0), ", ", h.size(2), "] (from h [B, T, H]), got ",
                    grad_context.sizes());
  TORCH_CHECK_TYPE(is_float(grad_context), gc_name, " must be a floating tensor, got ", grad_context.scalar_type());
  if (grad_attention.has_value()) check_like(ga_name, *grad_attention, att_name, attention);
  TORCH_CHECK_VALUE(grad_context.device() == h.device() && attention.device() == h.device(), gc_name, ", h and ",
                    att_name, " must be on one device: ", gc_name, " is on ", grad_context.device(), ", h on ",
                    h.device(), ", ", att_name, " on ", attention.device());
}

void check_h(const at::Tensor& h) {
  TORCH_CHECK_VALUE(h.dim() == 3, "h must have shape [B, T, H] (3 dims), got shape ", h.sizes());
  TORCH_CHECK_TYPE(is_float(h), "h must be a floating tensor (float16, bfloat16, float32 or float64), got ",
                   h.scalar_type());
}

}  // namespace

void check_backward_inputs(const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_attention,
                           const at::Tensor& h, const at::Tensor& attention) {
  check_h(h);
  check_backward_branch("grad_context", grad_context, "grad_attention", grad_attention, "attention", h, attention);
}

void check_pair_forward_inputs(const at::Tensor& h, const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                               const std::optional<at::Tensor>& direction, int64_t kind, double eps) {
  TORCH_CHECK_VALUE(kind == KIND_NORMALIZE || kind == KIND_IAT,
                    "kind must be 1 (AT/RP: normalise direction) or 2 (iAT) for the pair op (its second branch is "
                    "the perturbed one), got ", kind);
  check_forward_inputs(h, scores, mask, direction, kind, eps);
}

void check_pair_backward_inputs(const at::Tensor& grad_context_clean,
                                const std::optional<at::Tensor>& grad_attention_clean,
                                const at::Tensor& grad_context_adv, const std::optional<at::Tensor>& grad_attention_adv,
                                const at::Tensor& h, const at::Tensor& attention_clean,
                                const at::Tensor& attention_adv) {
  check_h(h);
  check_backward_branch("grad_context_clean", grad_context_clean, "grad_attention_clean", grad_attention_clean,
                        "attention_clean", h, attention_clean);
  check_backward_branch("grad_context_adv", grad_context_adv, "grad_attention_adv", grad_attention_adv,
                        "attention_adv", h, attention_adv);
  TORCH_CHECK_TYPE(attention_clean.scalar_type() == attention_adv.scalar_type(),
                   "attention_adv must have the dtype of attention_clean (", attention_clean.scalar_type(), "), got ",
                   attention_adv.scalar_type());
}

}  // namespace fused_attn_at

TORCH_LIBRARY(fused_attn_at, m) {
  m.def("attention_pool_fwd(Tensor h, Tensor scores, Tensor? mask, Tensor? direction, int kind, float eps) "
        "-> (Tensor context, Tensor attention)");
  m.def("attention_pool_bwd(Tensor grad_context, Tensor? grad_attention, Tensor h, Tensor attention) "
        "-> (Tensor grad_h, Tensor grad_scores)");
  m.def("perturbation(Tensor scores, Tensor? mask, Tensor direction, int kind, float eps) -> Tensor");
  // The AT training step at the fewest passes over h (issue 17): g = dL_clean/dscores without grad_h, and the
  // clean and perturbed pooling as one op whose backward writes grad_h once for both branches.
  m.def("attention_scores_grad(Tensor grad_context, Tensor? grad_attention, Tensor h, Tensor attention) "
        "-> Tensor grad_scores");
  m.def("attention_pool_pair_fwd(Tensor h, Tensor scores, Tensor? mask, Tensor direction, int kind, float eps) "
        "-> (Tensor context_clean, Tensor attention_clean, Tensor context_adv, Tensor attention_adv)");
  m.def("attention_pool_pair_bwd(Tensor grad_context_clean, Tensor? grad_attention_clean, Tensor grad_context_adv, "
        "Tensor? grad_attention_adv, Tensor h, Tensor attention_clean, Tensor attention_adv) "
        "-> (Tensor grad_h, Tensor grad_scores)");
}

// The Python module: importing it runs the registrations above (and those of the device implementations).
namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fused_attn_at::cpu::selected_isa_name());
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set the CPU kernels run with now: 'avx2' or 'default' "
     "(FUSED_ATTN_AT_CPU_ISA=default forces the portable build)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fused_attn_at compiled ops (registered on import)", -1,
                          methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
