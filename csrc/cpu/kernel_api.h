// The interface between the CPU op wrappers (which see torch tensors) and the kernels (which see only
// pointers, sizes and element strides). The kernels are compiled once per instruction set (kernels_*.cpp);
// nothing here depends on torch, so an AVX2 build of the kernels never compiles a torch header function.
#pragma once

#include <cstdint>

namespace fused_attn_at::cpu {

enum class Dtype : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// A [B, T] tensor: element (b, t) is at data[b * sb + t * st]; data is null for an absent optional tensor.
struct RowsView {
  const void* data = nullptr;
  int64_t sb = 0, st = 0;
};

// h [B, T, H] is read either along H (h_sh == 1: each position t is a contiguous H-vector) or along T
// (h_st == 1: each feature k is a contiguous T-vector, e.g. h given as a transposed [B, H, T] tensor).
struct HView {
  const void* data = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
  bool along_t = false;
};

// Work is split into B * n_chunks items: item i is row i / n_chunks, features [c * chunk, (c + 1) * chunk)
// with c = i % n_chunks. n_chunks > 1 only when there are too few rows to keep the threads busy.
struct Split {
  int64_t n_chunks = 1, chunk = 0;
};

struct ForwardArgs {
  int64_t B = 0, T = 0, H = 0;
  HView h;
  RowsView scores, direction;  // direction: grad (AT, iAT) or noise (RP), read when kind != 0
  const bool* mask = nullptr;  // null: every position is real
  int64_t mask_sb = 0, mask_st = 0;
  int kind = 0;
  double eps = 1.0;
  // iAT workspace, accumulation dtype, contiguous [B, T] each, filled by iat_prepare: the scores and the
  // grad zeroed at padded positions, and the mask as 0/1.
  void* iat_scores = nullptr;
  void* iat_grad = nullptr;
  void* iat_mask = nullptr;
  void* attention_acc = nullptr;  // [B, T] accumulation dtype (may be `attention` itself)
  void* attention = nullptr;      // [B, T] output dtype
  void* context = nullptr;        // [B, H] output dtype
  void* perturbation = nullptr;   // [B, T] output dtype, written by perturbation_rows
  // The pair op's second branch, the clean (unperturbed) one: its attention and context come out of the same
  // sweep over h as the perturbed ones above (the pair_* kernels; null for the single op).
  void* clean_attention_acc = nullptr;  // [B, T] accumulation dtype (may be `clean_attention` itself)
  void* clean_attention = nullptr;      // [B, T] output dtype
  void* clean_context = nullptr;        // [B, H] output dtype
  Split split;
  // The kernels read every real (unmasked) score and direction value anyway, so they check them: a NaN or
  // inf there sets NONFINITE_SCORES / NONFINITE_DIRECTION in *nonfinite (atomically; never cleared), and the
  // op raises once the kernels are done. Cheaper than a separate pass (isfinite & mask, any) before the call.
  int* nonfinite = nullptr;
};

constexpr int NONFINITE_SCORES = 1;
constexpr int NONFINITE_DIRECTION = 2;

struct BackwardArgs {
  int64_t B = 0, T = 0, H = 0;
  RowsView grad_context;    // [B, H]: element (b, k) at data[b * sb + k * st]
  RowsView grad_attention;  // optional [B, T]
  RowsView attention;       // [B, T]
  HView h;
  // The pair backward's second branch, the clean one (pair_* kernels only): its cotangents and attention.
  // grad_scores is the sum of both branches' softmax backward; grad_h = a dc + a_clean dc_clean.
  RowsView clean_grad_context, clean_grad_attention, clean_attention;
  // grad_h [B, T, H], unit stride along the dimension h is read along (h.along_t ? T : H). Null (and never
  // written) for the scores-grad kernels.
  void* grad_h = nullptr;
  int64_t grad_h_sb = 0, grad_h_st = 0, grad_h_sh = 0;
  void* grad_scores = nullptr;  // [B, T] contiguous, output dtype
  // [B, n_chunks, branches, T] accumulation dtype, used when split.n_chunks > 1 (branches: 2 for pair_*)
  void* partial_da = nullptr;
  Split split;
};

// One instruction set's kernels for one dtype. Each processes the rows (or items) [begin, end).
struct Kernels {
  void (*iat_prepare)(const ForwardArgs&, int64_t begin, int64_t end);
  void (*perturbation_rows)(const ForwardArgs&, int64_t begin, int64_t end);
  // perturbation + masked softmax, into attention_acc and attention
  void (*attention_rows)(const ForwardArgs&, int64_t begin, int64_t end);
  // context of the items; attention_acc must be complete for their rows
  void (*context_items)(const ForwardArgs&, int64_t begin, int64_t end);
  // attention_rows then the whole context of each row (split.n_chunks == 1)
  void (*forward_rows)(const ForwardArgs&, int64_t begin, int64_t end);
  // grad_h of the items and da = <dc, h_t> (partial per chunk); with n_chunks == 1 also grad_scores
  void (*backward_items)(const BackwardArgs&, int64_t begin, int64_t end);
  // grad_scores from the partial da of all chunks (n_chunks > 1)
  void (*backward_finish_rows)(const BackwardArgs&, int64_t begin, int64_t end);
  // backward_items without grad_h: da = <dc, h_t> and grad_scores only (the attention_scores_grad op; h is
  // read once, nothing of size B*T*H is written). Finished by backward_finish_rows when n_chunks > 1.
  void (*scores_grad_items)(const BackwardArgs&, int64_t begin, int64_t end);
  // The pair op (two branches sharing h: the perturbed one in the plain fields, the clean one in clean_*):
  // both attentions (the clean one with kind 0)
  void (*pair_attention_rows)(const ForwardArgs&, int64_t begin, int64_t end);
  // both contexts in one sweep over h; both attentions must be complete for the items' rows
  void (*pair_context_items)(const ForwardArgs&, int64_t begin, int64_t end);
  // pair_attention_rows then both whole contexts of each row (split.n_chunks == 1)
  void (*pair_forward_rows)(const ForwardArgs&, int64_t begin, int64_t end);
  // one sweep over h: both branches' da and grad_h = a dc + a_clean dc_clean written once
  void (*pair_backward_items)(const BackwardArgs&, int64_t begin, int64_t end);
  void (*pair_backward_finish_rows)(const BackwardArgs&, int64_t begin, int64_t end);
};

// The portable build (compiler's baseline instruction set) and the AVX2+FMA+F16C build (null where not
// compiled, i.e. off x86-64).
const Kernels& kernels_portable(Dtype dtype);
const Kernels* kernels_avx2(Dtype dtype);

}  // namespace fused_attn_at::cpu
