// The CPU implementations of the fused_attn_at ops: check the inputs, describe the tensors to the kernels
// (pointers and strides, kernel_api.h), split the work over the threads (at::parallel_for) and run the
// kernels of the best instruction set this CPU has (isa.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../attention_pool.h"
#include "isa.h"

#include <array>
#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_attn_at {
namespace {

using cpu::Dtype;

// Smallest amount of work (elements of h, or of the iAT [B, T] sweeps) worth a task of its own: below it
// the threads cost more than they save, and tiny calls run on the calling thread.
constexpr int64_t GRAIN_WORK = 32768;
// Features per work item when rows are split (a multiple of every vector width, and of a cache line).
constexpr int64_t MIN_CHUNK = 64;
// Fewer features than this and h contiguous along T: read along T (vectors over positions instead).
constexpr int64_t NARROW_H = 8;

Dtype dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kDouble: return Dtype::f64;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default: TORCH_CHECK_TYPE(false, "fused_attn_at CPU kernels: unsupported dtype ", x.scalar_type());
  }
}

at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_cpu(const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), name, " must be a CPU tensor for the CPU kernels, got device ", x.device());
}

cpu::RowsView rows_view(const at::Tensor& x) { return {x.data_ptr(), x.stride(0), x.stride(1)}; }

// `x` in `dtype` (a copy only when it differs): the kernels read one storage dtype per call.
at::Tensor as_dtype(const at::Tensor& x, at::ScalarType dtype) {
  return x.scalar_type() == dtype ? x : x.to(dtype);
}

// How the kernels read h: along H where its features are contiguous, along T where its positions are
// (h given as a transposed [B, H, T] tensor), else a contiguous copy.
struct HLayout {
  at::Tensor tensor;  // h, or its contiguous copy
  cpu::HView view;
};

HLayout read_layout(const at::Tensor& h) {
  const int64_t T = h.size(1), H = h.size(2);
  const bool unit_h = H <= 1 || h.stride(2) == 1;
  const bool unit_t = T <= 1 || h.stride(1) == 1;
  HLayout out;
  out.tensor = (unit_h || unit_t) ? h : h.contiguous();
  out.view.along_t = unit_t && (!unit_h || (H < NARROW_H && T > H));
  out.view.data = out.tensor.data_ptr();
  out.view.sb = out.tensor.stride(0);
  out.view.st = out.tensor.stride(1);
  out.view.sh = out.tensor.stride(2);
  return out;
}

// Rows are split into feature chunks when there are too few rows to keep a machine's threads busy. The split
// depends on the shape only, never on the thread count: the backward sums the partial da of the chunks in
// chunk order, so a split that followed the thread count would change grad_scores in the last bits between
// torch.set_num_threads(1) and (2). With a fixed split every thread count gives bitwise the same result.
constexpr int64_t SPLIT_TARGET_ITEMS = 16;

cpu::Split split_for(int64_t B, int64_t T, int64_t H) {
  cpu::Split s;
  s.chunk = H;
  if (B == 0 || B >= SPLIT_TARGET_ITEMS || B * T * H < 2 * GRAIN_WORK) return s;
  const int64_t n = std::min((SPLIT_TARGET_ITEMS + B - 1) / B, H / MIN_CHUNK);
  if (n <= 1) return s;
  int64_t chunk = (H + n - 1) / n;
  chunk = (chunk + 15) / 16 * 16;
  s.chunk = chunk;
  s.n_chunks = (H + chunk - 1) / chunk;
  return s;
}

// An output of 32 MB or more (glibc's largest mmap threshold) is a fresh mmap at every call: touching it
// page by page costs one fault per 4 KB, which at T = 1024 (a 64 MB grad_h) took twice as long as the
// kernel itself (measured: 16385 faults, fwd+bwd 80 ms -> 26 ms CPU with the hint). Ask for transparent
// huge pages: a hint, without effect where THP is off or "always". Smaller outputs are normally reused
// heap memory, already faulted in. FUSED_ATTN_AT_NO_THP=1 turns the hint off (to measure it).
constexpr int64_t HUGE_PAGE = 2 << 20;
constexpr int64_t HUGE_PAGE_MIN_BYTES = 16 * HUGE_PAGE;

void advise_huge_pages(const at::Tensor& x) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = x.numel() * static_cast<int64_t>(x.element_size());
  if (bytes < HUGE_PAGE_MIN_BYTES || std::getenv("FUSED_ATTN_AT_NO_THP") != nullptr) return;
  const auto start = reinterpret_cast<uintptr_t>(x.data_ptr());
  const uintptr_t first = (start + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
  const uintptr_t last = (start + bytes) / HUGE_PAGE * HUGE_PAGE;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)x;
#endif
}

int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, GRAIN_WORK / std::max<int64_t>(1, work_per_item)); }

template <class F> void parallel_over(int64_t n, int64_t work_per_item, const F& f) {
  if (n <= 0) return;
  at::parallel_for(0, n, grain(work_per_item), f);
}

void fill_perturbation_args(cpu::ForwardArgs& a, const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                            const at::Tensor& direction, int64_t kind, double eps, at::Tensor& iat_workspace) {
  const int64_t B = scores.size(0), T = scores.size(1);
  a.B = B;
  a.T = T;
  a.scores = rows_view(scores);
  if (mask.has_value()) {
    a.mask = mask->data_ptr<bool>();
    a.mask_sb = mask->stride(0);
    a.mask_st = mask->stride(1);
  }
  a.kind = static_cast<int>(kind);
  a.eps = eps;
  if (kind != KIND_NONE) a.direction = rows_view(direction);
  if (kind == KIND_IAT) {
    iat_workspace = at::empty({3, B, T}, scores.options().dtype(acc_dtype(scores)));
    const int64_t plane = B * T * static_cast<int64_t>(iat_workspace.element_size());
    char* base = static_cast<char*>(iat_workspace.data_ptr());
    a.iat_scores = base;
    a.iat_grad = base + plane;
    a.iat_mask = base + 2 * plane;
  }
}

// After the kernels: what they found at real positions (ForwardArgs::nonfinite). The Python API renames
// "direction" to the argument the user passed (grad or noise).
void raise_if_nonfinite(int flags) {
  TORCH_CHECK_VALUE(!(flags & cpu::NONFINITE_SCORES),
                    "scores holds NaN or inf at real (unmasked) positions; expected finite values");
  TORCH_CHECK_VALUE(!(flags & cpu::NONFINITE_DIRECTION),
                    "direction holds NaN or inf at real (unmasked) positions; expected finite values");
}

// iAT needs every row's (zeroed) scores and grad before any row's perturbation.
void prepare_iat(const cpu::Kernels& k, const cpu::ForwardArgs& a) {
  if (a.kind != KIND_IAT) return;
  parallel_over(a.B, a.T, [&](int64_t begin, int64_t end) { k.iat_prepare(a, begin, end); });
}

// Work of one row's perturbation: iAT sweeps all rows twice.
int64_t perturbation_work(const cpu::ForwardArgs& a) { return a.kind == KIND_IAT ? 2 * a.B * a.T : a.T; }

// The forward of the op (pair = false: context, attention) or of the pair op (pair = true: the same plus the
// clean context and attention, from the same sweep over h). Returns {context, attention, clean_context,
// clean_attention} (the last two undefined for the op).
std::array<at::Tensor, 4> run_forward(const at::Tensor& h, const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                                      const std::optional<at::Tensor>& direction, int64_t kind, double eps, bool pair) {
  check_cpu("h", h);
  const int64_t B = h.size(0), T = h.size(1), H = h.size(2);
  const cpu::Kernels& kernels = cpu::select_kernels(dtype_of(h));
  const HLayout layout = read_layout(h);
  at::Tensor dir = kind != KIND_NONE ? as_dtype(*direction, scores.scalar_type()) : at::Tensor();
  const bool acc_is_out = acc_dtype(scores) == scores.scalar_type();
  at::Tensor context = at::empty({B, H}, h.options());
  at::Tensor attention = at::empty({B, T}, scores.options());
  at::Tensor attention_acc = acc_is_out ? attention : at::empty({B, T}, scores.options().dtype(at::kFloat));

  cpu::ForwardArgs a;
  at::Tensor iat_workspace;
  fill_perturbation_args(a, scores, mask, dir, kind, eps, iat_workspace);
  int nonfinite = 0;
  a.nonfinite = &nonfinite;
  a.H = H;
  a.h = layout.view;
  a.attention_acc = attention_acc.data_ptr();
  a.attention = attention.data_ptr();
  a.context = context.data_ptr();
  a.split = split_for(B, T, H);
  at::Tensor clean_context, clean_attention, clean_attention_acc;
  if (pair) {
    clean_context = at::empty({B, H}, h.options());
    clean_attention = at::empty({B, T}, scores.options());
    clean_attention_acc = acc_is_out ? clean_attention : at::empty({B, T}, scores.options().dtype(at::kFloat));
    a.clean_context = clean_context.data_ptr();
    a.clean_attention = clean_attention.data_ptr();
    a.clean_attention_acc = clean_attention_acc.data_ptr();
  }

  prepare_iat(kernels, a);
  const int64_t branches = pair ? 2 : 1;
  const int64_t softmax_work = perturbation_work(a) + branches * T;
  const auto attention_rows = pair ? kernels.pair_attention_rows : kernels.attention_rows;
  const auto context_items = pair ? kernels.pair_context_items : kernels.context_items;
  const auto forward_rows = pair ? kernels.pair_forward_rows : kernels.forward_rows;
  if (a.split.n_chunks == 1) {
    parallel_over(B, branches * T * H + softmax_work, [&](int64_t begin, int64_t end) { forward_rows(a, begin, end); });
  } else {
    parallel_over(B, softmax_work, [&](int64_t begin, int64_t end) { attention_rows(a, begin, end); });
    parallel_over(B * a.split.n_chunks, branches * T * a.split.chunk,
                  [&](int64_t begin, int64_t end) { context_items(a, begin, end); });
  }
  raise_if_nonfinite(nonfinite);
  return {context, attention, clean_context, clean_attention};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_fwd_cpu(const at::Tensor& h, const at::Tensor& scores,
                                                          const std::optional<at::Tensor>& mask,
                                                          const std::optional<at::Tensor>& direction, int64_t kind,
                                                          double eps) {
  check_forward_inputs(h, scores, mask, direction, kind, eps);
  auto out = run_forward(h, scores, mask, direction, kind, eps, /*pair=*/false);
  return {out[0], out[1]};
}

// (context_clean, attention_clean, context_adv, attention_adv): both branches from one sweep over h.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_pair_fwd_cpu(
    const at::Tensor& h, const at::Tensor& scores, const std::optional<at::Tensor>& mask, const at::Tensor& direction,
    int64_t kind, double eps) {
  const std::optional<at::Tensor> dir(direction);
  check_pair_forward_inputs(h, scores, mask, dir, kind, eps);
  auto out = run_forward(h, scores, mask, dir, kind, eps, /*pair=*/true);
  return {out[2], out[3], out[0], out[1]};
}

at::Tensor perturbation_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                            const at::Tensor& direction, int64_t kind, double eps) {
  check_perturbation_inputs(scores, mask, direction, kind, eps);
  check_cpu("scores", scores);
  const cpu::Kernels& kernels = cpu::select_kernels(dtype_of(scores));
  at::Tensor dir = as_dtype(direction, scores.scalar_type());
  at::Tensor r = at::empty(scores.sizes(), scores.options());
  cpu::ForwardArgs a;
  at::Tensor iat_workspace;
  fill_perturbation_args(a, scores, mask, dir, kind, eps, iat_workspace);
  int nonfinite = 0;
  a.nonfinite = &nonfinite;
  a.perturbation = r.data_ptr();
  prepare_iat(kernels, a);
  parallel_over(a.B, perturbation_work(a), [&](int64_t begin, int64_t end) { kernels.perturbation_rows(a, begin, end); });
  raise_if_nonfinite(nonfinite);
  return r;
}

// One branch of a backward: its cotangents and the attention of its forward.
struct BackwardBranch {
  const at::Tensor& grad_context;
  const std::optional<at::Tensor>& grad_attention;
  const at::Tensor& attention;
};

// The backward sweep over h for one branch (the op) or two (the pair; branch 1 = the clean one), writing
// grad_h once (write_grad_h) or not at all (the scores-grad op). Returns {grad_h (undefined without
// write_grad_h), grad_scores}.
std::tuple<at::Tensor, at::Tensor> run_backward(const at::Tensor& h, const BackwardBranch* branches, int n_branches,
                                                bool write_grad_h) {
  check_cpu("h", h);
  const int64_t B = h.size(0), T = h.size(1), H = h.size(2);
  const at::ScalarType dtype = h.scalar_type();
  const cpu::Kernels& kernels = cpu::select_kernels(dtype_of(h));
  const HLayout layout = read_layout(h);
  at::Tensor att[2], gc[2], ga[2];  // the branches' tensors in h's dtype (copies only where they differ)
  for (int j = 0; j < n_branches; ++j) {
    att[j] = as_dtype(branches[j].attention, dtype);
    gc[j] = as_dtype(branches[j].grad_context, dtype);
    if (branches[j].grad_attention.has_value()) ga[j] = as_dtype(*branches[j].grad_attention, dtype);
  }

  // grad_h has h's layout (as the fake op says); the kernels need it unit-stride along the dimension h is
  // read along, else they write a buffer that is copied over.
  at::Tensor grad_h, grad_h_work;
  bool grad_h_ok = true;
  if (write_grad_h) {
    grad_h = at::empty_like(h);
    advise_huge_pages(grad_h);
    grad_h_ok = layout.view.along_t ? (T <= 1 || grad_h.stride(1) == 1) : (H <= 1 || grad_h.stride(2) == 1);
    grad_h_work = grad_h;
    if (!grad_h_ok) {
      grad_h_work =
          layout.view.along_t ? at::empty({B, H, T}, h.options()).transpose(1, 2) : at::empty({B, T, H}, h.options());
      advise_huge_pages(grad_h_work);
    }
  }
  at::Tensor grad_scores = at::empty({B, T}, h.options());

  cpu::BackwardArgs a;
  a.B = B;
  a.T = T;
  a.H = H;
  a.grad_context = rows_view(gc[0]);
  if (ga[0].defined()) a.grad_attention = rows_view(ga[0]);
  a.attention = rows_view(att[0]);
  if (n_branches == 2) {
    a.clean_grad_context = rows_view(gc[1]);
    if (ga[1].defined()) a.clean_grad_attention = rows_view(ga[1]);
    a.clean_attention = rows_view(att[1]);
  }
  a.h = layout.view;
  if (write_grad_h) {
    a.grad_h = grad_h_work.data_ptr();
    a.grad_h_sb = grad_h_work.stride(0);
    a.grad_h_st = grad_h_work.stride(1);
    a.grad_h_sh = grad_h_work.stride(2);
  }
  a.grad_scores = grad_scores.data_ptr();
  a.split = split_for(B, T, H);
  at::Tensor partial_da;
  if (a.split.n_chunks > 1) {
    partial_da = at::empty({B, a.split.n_chunks, n_branches, T}, h.options().dtype(acc_dtype(h)));
    a.partial_da = partial_da.data_ptr();
  }
  const auto items = n_branches == 2 ? kernels.pair_backward_items
                                     : (write_grad_h ? kernels.backward_items : kernels.scores_grad_items);
  const auto finish_rows = n_branches == 2 ? kernels.pair_backward_finish_rows : kernels.backward_finish_rows;
  parallel_over(B * a.split.n_chunks, n_branches * (T * a.split.chunk + 2 * T),
                [&](int64_t begin, int64_t end) { items(a, begin, end); });
  if (a.split.n_chunks > 1) {
    parallel_over(B, n_branches * T * a.split.n_chunks, [&](int64_t begin, int64_t end) { finish_rows(a, begin, end); });
  }
  if (write_grad_h && !grad_h_ok) grad_h.copy_(grad_h_work);
  const at::ScalarType out_dtype = branches[n_branches - 1].attention.scalar_type();
  if (out_dtype != dtype) grad_scores = grad_scores.to(out_dtype);
  return {grad_h, grad_scores};
}

std::tuple<at::Tensor, at::Tensor> attention_pool_bwd_cpu(const at::Tensor& grad_context,
                                                          const std::optional<at::Tensor>& grad_attention,
                                                          const at::Tensor& h, const at::Tensor& attention) {
  check_backward_inputs(grad_context, grad_attention, h, attention);
  const BackwardBranch branch{grad_context, grad_attention, attention};
  return run_backward(h, &branch, 1, /*write_grad_h=*/true);
}

// grad_scores of attention_pool_bwd without grad_h: h is read once, nothing of size B*T*H is written.
at::Tensor attention_scores_grad_cpu(const at::Tensor& grad_context, const std::optional<at::Tensor>& grad_attention,
                                     const at::Tensor& h, const at::Tensor& attention) {
  check_backward_inputs(grad_context, grad_attention, h, attention);
  const BackwardBranch branch{grad_context, grad_attention, attention};
  return std::get<1>(run_backward(h, &branch, 1, /*write_grad_h=*/false));
}

// Both branches of the pair in one sweep over h: grad_h = a_clean dc_clean + a_adv dc_adv written once,
// grad_scores = the sum of both branches' softmax backward.
std::tuple<at::Tensor, at::Tensor> attention_pool_pair_bwd_cpu(
    const at::Tensor& grad_context_clean, const std::optional<at::Tensor>& grad_attention_clean,
    const at::Tensor& grad_context_adv, const std::optional<at::Tensor>& grad_attention_adv, const at::Tensor& h,
    const at::Tensor& attention_clean, const at::Tensor& attention_adv) {
  check_pair_backward_inputs(grad_context_clean, grad_attention_clean, grad_context_adv, grad_attention_adv, h,
                             attention_clean, attention_adv);
  // branch 0 is the perturbed one (the kernels' plain fields), branch 1 the clean one
  const BackwardBranch branches[2] = {{grad_context_adv, grad_attention_adv, attention_adv},
                                      {grad_context_clean, grad_attention_clean, attention_clean}};
  return run_backward(h, branches, 2, /*write_grad_h=*/true);
}

}  // namespace
}  // namespace fused_attn_at

TORCH_LIBRARY_IMPL(fused_attn_at, CPU, m) {
  m.impl("attention_pool_fwd", &fused_attn_at::attention_pool_fwd_cpu);
  m.impl("attention_pool_bwd", &fused_attn_at::attention_pool_bwd_cpu);
  m.impl("perturbation", &fused_attn_at::perturbation_cpu);
  m.impl("attention_scores_grad", &fused_attn_at::attention_scores_grad_cpu);
  m.impl("attention_pool_pair_fwd", &fused_attn_at::attention_pool_pair_fwd_cpu);
  m.impl("attention_pool_pair_bwd", &fused_attn_at::attention_pool_pair_bwd_cpu);
}
