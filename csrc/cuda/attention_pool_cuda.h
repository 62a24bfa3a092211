/* Launchers of the CUDA kernels of fused_attn_at (csrc/cuda/attention_pool_kernels.cu).
 *
 * Plain C, no torch and no CUDA headers: the device code compiles with nvcc alone (raw pointers, sizes and
 * strides), and the torch binding (attention_pool_binding.cpp) calls these functions.
 *
 * Conventions: sizes and strides are in elements (not bytes) and 64-bit; B = batch, T = positions, H = hidden.
 * A view of a [B, T] tensor uses stride[0] (batch) and stride[1] (position); [B, H] uses stride[0] and stride[1]
 * (hidden); [B, T, H] uses all three. A mask view with data == NULL means "every position is real"; otherwise it
 * points at bool bytes (nonzero = real token). Values at masked positions of scores/direction are never read.
 * "acc" is the accumulation type: double for FA_FLOAT64, float for the others.
 * Each launcher enqueues its kernels on `stream` (a cudaStream_t) and returns a cudaError_t value: 0 on success.
 * B is at most FA_CUDA_MAX_BATCH (one thread block per row along grid x); beyond it, and for B < 1, the launchers
 * return cudaErrorInvalidConfiguration without launching (the binding checks first, with a message).
 * `nonfinite` (device memory, may be NULL: no check) is one int the kernels OR flags into, as the CPU kernels do:
 * FA_NONFINITE_SCORES / FA_NONFINITE_DIRECTION when scores / direction hold NaN or +-inf at a real (unmasked)
 * position. Never cleared by the kernels: the caller zeroes it before the launches and reads it after them.
 */
#ifndef FUSED_ATTN_AT_CUDA_ATTENTION_POOL_CUDA_H_
#define FUSED_ATTN_AT_CUDA_ATTENTION_POOL_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum fa_dtype { FA_FLOAT32 = 0, FA_FLOAT64 = 1, FA_FLOAT16 = 2, FA_BFLOAT16 = 3 } fa_dtype;

typedef struct fa_view {
  void* data;
  int64_t stride[3];
} fa_view;

/* The largest B: the grid x limit of CUDA (2^31 - 1). */
#define FA_CUDA_MAX_BATCH 2147483647LL

/* Flags of `nonfinite` (the values of csrc/cpu/kernel_api.h's NONFINITE_SCORES and NONFINITE_DIRECTION). */
enum { FA_NONFINITE_SCORES = 1, FA_NONFINITE_DIRECTION = 2 };

/* What the forward adds to the scores. */
enum { FA_PERTURB_NONE = 0, FA_PERTURB_NORMALIZE = 1, FA_PERTURB_GIVEN = 2 };
/* The contract's kind (ops/__init__.py): 1 normalise the direction (AT/RP), 2 iAT. */
enum { FA_KIND_NORMALIZE = 1, FA_KIND_IAT = 2 };

/* Bytes of one acc element for `dtype`. */
size_t fa_acc_size(fa_dtype dtype);

/* A readable message for a cudaError_t value returned by the launchers. */
const char* fa_cuda_error_string(int error);

/* The number of multiprocessors of CUDA device `device` into *count (sizes the grids). */
int fa_cuda_multiprocessor_count(int device, int* count);

/* iAT coefficients: coeff[i * B + j] = <g_i, D_ij> / max(||D_ij||, 1e-12)^2 with D_ij = (s_i - s_j) m_i m_j,
 * so that u_i = sum_j coeff[i, j] D_ij. coeff: [B, B] acc, contiguous. O(B^2 T), no [B, B, T] buffer.
 * Flags non-finite scores and grad (FA_NONFINITE_DIRECTION) at the real positions of every row. */
int fa_cuda_iat_coefficients(fa_dtype dtype, int64_t B, int64_t T, fa_view scores, fa_view mask, fa_view grad,
                             void* coeff, int* nonfinite, void* stream);

/* r = eps * v / max(||v||, 1e-12) per row over the valid positions, 0 at padded ones; v = direction (kind 1, in
 * `dtype`) or u_i = sum_j coeff[i, j] D_ij (kind 2). out: [B, T] in `dtype`, or in acc when out_is_acc.
 * Kind 1 flags non-finite scores and direction at real positions (kind 2: fa_cuda_iat_coefficients does). */
int fa_cuda_perturbation(fa_dtype dtype, int kind, int out_is_acc, int64_t B, int64_t T, double eps, fa_view scores,
                         fa_view mask, fa_view direction, const void* coeff, fa_view out, int* nonfinite,
                         void* stream);

/* context [B, H] and attention [B, T] (both `dtype`) of a = masked_softmax(scores + r), c = sum_t a_t h_t.
 * perturb: FA_PERTURB_NONE; FA_PERTURB_NORMALIZE (r = eps * direction / max(||direction||, 1e-12), direction in
 * `dtype`); FA_PERTURB_GIVEN (r = direction, in acc). num_sms sizes the grid. Flags non-finite scores at real
 * positions, and a non-finite direction there for FA_PERTURB_NORMALIZE (a given r is not checked). */
int fa_cuda_attention_pool_fwd(fa_dtype dtype, int perturb, int64_t B, int64_t T, int64_t H, double eps, fa_view h,
                               fa_view scores, fa_view mask, fa_view direction, fa_view context, fa_view attention,
                               int num_sms, int* nonfinite, void* stream);

/* grad_h [B, T, H] = a_t dc and grad_scores [B, T] = a * (da - sum_t a_t da_t), da_t = <dc, h_t> + grad_attention_t
 * (grad_attention.data may be NULL). All tensors in `dtype`; da_workspace: [B, T] acc, contiguous. No value
 * checks (as on the CPU). */
int fa_cuda_attention_pool_bwd(fa_dtype dtype, int64_t B, int64_t T, int64_t H, fa_view grad_context,
                               fa_view grad_attention, fa_view h, fa_view attention, fa_view grad_h,
                               fa_view grad_scores, void* da_workspace, int num_sms, void* stream);

/* The pair ops of the AT training step (issue 17; csrc/ops.cpp's attention_scores_grad, attention_pool_pair_fwd,
 * attention_pool_pair_bwd). */

/* grad_scores [B, T] of fa_cuda_attention_pool_bwd without grad_h: h read once, nothing [B, T, H] written.
 * da_workspace: [B, T] acc, contiguous. */
int fa_cuda_attention_scores_grad(fa_dtype dtype, int64_t B, int64_t T, int64_t H, fa_view grad_context,
                                  fa_view grad_attention, fa_view h, fa_view attention, fa_view grad_scores,
                                  void* da_workspace, int num_sms, void* stream);

/* The clean pooling (masked_softmax(scores)) and the perturbed one (perturb FA_PERTURB_NORMALIZE or
 * FA_PERTURB_GIVEN, as in fa_cuda_attention_pool_fwd) in one kernel: both softmaxes from one read of the scores,
 * both contexts from one sweep over h. Outputs in `dtype`; flags as fa_cuda_attention_pool_fwd. Another perturb
 * returns cudaErrorInvalidValue. */
int fa_cuda_attention_pool_pair_fwd(fa_dtype dtype, int perturb, int64_t B, int64_t T, int64_t H, double eps,
                                    fa_view h, fa_view scores, fa_view mask, fa_view direction, fa_view context_clean,
                                    fa_view attention_clean, fa_view context_adv, fa_view attention_adv, int num_sms,
                                    int* nonfinite, void* stream);

/* The pair's backward, both branches summed, in one sweep over h: grad_h = a_clean dc_clean + a_adv dc_adv
 * (written once), grad_scores = the sum of both branches' a * (da - sum_t a_t da_t). grad_attention_* .data may be
 * NULL. All tensors in `dtype`; da_workspace: [2, B, T] acc, contiguous. */
int fa_cuda_attention_pool_pair_bwd(fa_dtype dtype, int64_t B, int64_t T, int64_t H, fa_view grad_context_clean,
                                    fa_view grad_attention_clean, fa_view grad_context_adv,
                                    fa_view grad_attention_adv, fa_view h, fa_view attention_clean,
                                    fa_view attention_adv, fa_view grad_h, fa_view grad_scores, void* da_workspace,
                                    int num_sms, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* FUSED_ATTN_AT_CUDA_ATTENTION_POOL_CUDA_H_ */
