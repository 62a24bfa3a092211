// CUDA kernels of fused_attn_at: perturbed masked-softmax attention pooling (forward, backward), the iAT
// perturbation and the AT/RP normalisation (SPEC.md). Raw pointers, sizes and strides only: nvcc compiles this
// file without torch (the torch binding is attention_pool_binding.cpp, the interface attention_pool_cuda.h).
//
// Work split (one thread block of 256 threads per row, or per slice of a row):
//   iat_coeff_kernel       block i, one warp per other row j: coeff[i, j] = <g_i, D_ij> / max(||D_ij||, delta)^2.
//   perturbation_kernel    block i: r_i = eps * v_i / max(||v_i||, delta), v_i = direction or sum_j coeff[i,j] D_ij.
//   fwd_kernel             block (b, g): the online-softmax statistics of row b (per thread, merged by warp
//                          shuffles), then the context columns of group g: the weights of 256 positions are staged
//                          in shared memory and a [rows x cols] thread tile streams h in 16-byte vectors.
//   bwd_dh_da_kernel       block (b, k): positions of chunk k, eight rows per warp: da_t = <dc, h_t> (+ grad_attention)
//                          by warp shuffle, dh_t = a_t dc.
//   bwd_dscores_kernel     block b: dscores = a * (da - sum_t a_t da_t).
// The pair ops of the AT training step (issue 17) are the same kernels with one more template argument:
//   fwd_kernel<PAIR>       both softmaxes (clean, perturbed) from one read of the scores, both attentions, and both
//                          contexts from the same 16-byte loads of h (one sweep over h for both).
//   bwd_dh_da_kernel<MODE> BWD_SCORES_ONLY: da alone, no dh written (attention_scores_grad); BWD_PAIR: a second
//                          branch's da2 from the same loads of h, dh_t = a_t dc + a2_t dc2 written once.
//   bwd_dscores_kernel<PAIR> dscores = a * (da - sum a da) + a2 * (da2 - sum a2 da2).
// Every reduction has a fixed order (no atomics): results are bitwise reproducible. float16/bfloat16 accumulate
// in float32, float64 in float64. Offsets are 64-bit. Positions where the mask is False are never read.
// Non-finite scores/direction at real positions set a flag (FA_NONFINITE_*, atomicOr) that the binding asserts on
// after the launches, without a host sync; the values computed from them are not otherwise guarded.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "attention_pool_cuda.h"

namespace fused_attn_at_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr double kDelta = 1e-12;  // SPEC: guards every division by a norm
constexpr int kUnroll = 8;        // forward: rows of h each thread has in flight
constexpr int kRowsPerWarp = 8;   // backward: rows of h each warp reduces at once
constexpr int64_t kMaxGridX = FA_CUDA_MAX_BATCH;  // 2^31 - 1
constexpr int64_t kMaxGridY = 65535;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <bool Cond, typename A, typename B>
struct Select {
  using type = A;
};
template <typename A, typename B>
struct Select<false, A, B> {
  using type = B;
};

// Conversions between a storage type and its accumulation type (round to nearest even on the way out).
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  __device__ static float to(float x) { return x; }
  __device__ static float from(float x) { return x; }
};
template <>
struct Cvt<double> {
  __device__ static double to(double x) { return x; }
  __device__ static double from(double x) { return x; }
};
template <>
struct Cvt<__half> {
  __device__ static float to(__half x) { return __half2float(x); }
  __device__ static __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Cvt<__nv_bfloat16> {
  __device__ static float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double acc_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }

// VEC consecutive elements, loaded or stored as one access (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// 16-byte packs go through uint4 so that the compiler emits one 128-bit access (a struct copy may be split).
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* ptr) {
  Pack<T, VEC> pack;
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    *reinterpret_cast<uint4*>(&pack) = *reinterpret_cast<const uint4*>(ptr);
  } else {
    pack = *reinterpret_cast<const Pack<T, VEC>*>(ptr);
  }
  return pack;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T, VEC>& pack) {
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    // The words are gathered explicitly: NVVM splits a type-punned 16-byte copy into scalar stores.
    uint32_t word[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const unsigned char* bytes = reinterpret_cast<const unsigned char*>(&pack) + 4 * w;
      word[w] = *reinterpret_cast<const uint32_t*>(bytes);
    }
#if defined(__CUDA_ARCH__)
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(word[0]), "r"(word[1]), "r"(word[2]),
                 "r"(word[3])
                 : "memory");
#else
    uint32_t* out = reinterpret_cast<uint32_t*>(ptr);
    for (int w = 0; w < 4; ++w) out[w] = word[w];
#endif
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(ptr) = pack;
  }
}

// Butterfly reductions: every lane ends with the same, bitwise identical value (IEEE + is commutative).
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the block, returned to every thread; scratch holds kWarps values.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  A total = A(0);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();  // scratch is free again
  return total;
}

// Online softmax: merge (max2, sum2) into (max, sum), where sum counts exp(x - max). An empty side has
// max = -inf and sum = 0; two empty sides stay empty without computing inf - inf.
template <typename A>
__device__ __forceinline__ void softmax_merge(A& max, A& sum, A max2, A sum2) {
  const A new_max = acc_max(max, max2);
  if (new_max == A(-INFINITY)) return;
  sum = sum * acc_exp(max - new_max) + sum2 * acc_exp(max2 - new_max);
  max = new_max;
}

template <typename A>
__device__ void block_softmax_merge(A& max, A& sum, A* scratch_max, A* scratch_sum) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const A other_max = __shfl_xor_sync(kFullMask, max, offset);
    const A other_sum = __shfl_xor_sync(kFullMask, sum, offset);
    softmax_merge(max, sum, other_max, other_sum);
  }
  if ((threadIdx.x & 31) == 0) {
    scratch_max[threadIdx.x >> 5] = max;
    scratch_sum[threadIdx.x >> 5] = sum;
  }
  __syncthreads();
  max = A(-INFINITY);
  sum = A(0);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) softmax_merge(max, sum, scratch_max[w], scratch_sum[w]);
  __syncthreads();
}

// Watches the real values a kernel reads, as FiniteWatch of the CPU kernels (csrc/cpu/kernels.h): x - x is 0
// for every finite x and NaN for NaN and +-inf (no --use_fast_math), so the sum stays 0 unless one of them was not
// finite; report() then ORs `what` into *flags (one atomic per thread that saw one, none otherwise).
template <typename A>
struct FiniteWatch {
  A sum = A(0);
  __device__ __forceinline__ void add(A x) { sum += x - x; }
  __device__ __forceinline__ void report(int* flags, int what) const {
    if (flags != nullptr && !(sum == A(0))) atomicOr(flags, what);
  }
};

struct PerturbParams {
  const void* scores;
  int64_t s_sb, s_st;
  const uint8_t* mask;  // nullptr: no mask
  int64_t m_sb, m_st;
  const void* direction;
  int64_t d_sb, d_st;
  const void* coeff;  // [B, B] acc
  void* out;
  int64_t o_sb, o_st;
  int64_t B, T;
  double eps;
  int* nonfinite;  // FA_NONFINITE_* flags, nullptr: no check
};

__device__ __forceinline__ bool is_valid(const uint8_t* mask, int64_t m_sb, int64_t m_st, int64_t row, int64_t t) {
  return mask == nullptr || mask[row * m_sb + t * m_st] != 0;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) iat_coeff_kernel(const PerturbParams p) {
  using A = typename AccOf<T>::type;
  const int64_t i = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const T* scores = static_cast<const T*>(p.scores);
  const T* grad = static_cast<const T*>(p.direction) + i * p.d_sb;
  A* coeff = static_cast<A*>(const_cast<void*>(p.coeff)) + i * p.B;
  // Block i checks row i: the warp of j = i visits every real position of it (the other rows' blocks check theirs).
  FiniteWatch<A> s_watch, g_watch;
  for (int64_t j = threadIdx.x >> 5; j < p.B; j += kWarps) {
    A sq_norm = A(0), g_dot_d = A(0);
    for (int64_t t = lane; t < p.T; t += 32) {
      if (is_valid(p.mask, p.m_sb, p.m_st, i, t) && is_valid(p.mask, p.m_sb, p.m_st, j, t)) {
        const A s_i = Cvt<T>::to(scores[i * p.s_sb + t * p.s_st]);
        const A g = Cvt<T>::to(grad[t * p.d_st]);
        const A diff = s_i - Cvt<T>::to(scores[j * p.s_sb + t * p.s_st]);
        sq_norm += diff * diff;
        g_dot_d += g * diff;
        if (j == i) {
          s_watch.add(s_i);
          g_watch.add(g);
        }
      }
    }
    sq_norm = warp_sum(sq_norm);
    g_dot_d = warp_sum(g_dot_d);
    if (lane == 0) {
      const A norm = acc_max(acc_sqrt(sq_norm), A(kDelta));
      coeff[j] = g_dot_d / (norm * norm);
    }
  }
  s_watch.report(p.nonfinite, FA_NONFINITE_SCORES);
  g_watch.report(p.nonfinite, FA_NONFINITE_DIRECTION);
}

template <typename T, typename OutT, int KIND>
__global__ void __launch_bounds__(kThreads) perturbation_kernel(const PerturbParams p) {
  using A = typename AccOf<T>::type;
  __shared__ A scratch[kWarps];
  const int64_t i = blockIdx.x;
  const T* scores = static_cast<const T*>(p.scores);
  const T* direction = static_cast<const T*>(p.direction) + i * p.d_sb;
  const A* coeff = static_cast<const A*>(p.coeff) + i * p.B;
  OutT* out = static_cast<OutT*>(p.out) + i * p.o_sb;
  // The direction v_t at a valid position t of row i.
  auto value = [&](int64_t t) -> A {
    if constexpr (KIND == FA_KIND_NORMALIZE) {
      return Cvt<T>::to(direction[t * p.d_st]);
    } else {
      const A s_i = Cvt<T>::to(scores[i * p.s_sb + t * p.s_st]);
      A u = A(0);
      for (int64_t j = 0; j < p.B; ++j) {
        if (is_valid(p.mask, p.m_sb, p.m_st, j, t)) u += coeff[j] * (s_i - Cvt<T>::to(scores[j * p.s_sb + t * p.s_st]));
      }
      return u;
    }
  };
  A sq_norm = A(0);
  FiniteWatch<A> s_watch, d_watch;
  for (int64_t t = threadIdx.x; t < p.T; t += kThreads) {
    if (is_valid(p.mask, p.m_sb, p.m_st, i, t)) {
      const A v = value(t);
      sq_norm += v * v;
      if constexpr (KIND == FA_KIND_NORMALIZE) {
        // AT/RP do not need the scores, but the op's contract is the same (iAT: iat_coeff_kernel checks both)
        if (p.nonfinite != nullptr) s_watch.add(Cvt<T>::to(scores[i * p.s_sb + t * p.s_st]));
        d_watch.add(v);
      }
    }
  }
  s_watch.report(p.nonfinite, FA_NONFINITE_SCORES);
  d_watch.report(p.nonfinite, FA_NONFINITE_DIRECTION);
  sq_norm = block_sum(sq_norm, scratch);
  const A scale = A(p.eps) / acc_max(acc_sqrt(sq_norm), A(kDelta));
  for (int64_t t = threadIdx.x; t < p.T; t += kThreads) {
    const A r = is_valid(p.mask, p.m_sb, p.m_st, i, t) ? scale * value(t) : A(0);
    out[t * p.o_st] = Cvt<OutT>::from(r);
  }
}

struct FwdParams {
  const void* h;
  int64_t h_sb, h_st, h_sh;
  const void* scores;
  int64_t s_sb, s_st;
  const uint8_t* mask;
  int64_t m_sb, m_st;
  const void* direction;  // T for FA_PERTURB_NORMALIZE, acc for FA_PERTURB_GIVEN
  int64_t d_sb, d_st;
  void* context;
  int64_t c_sb, c_sh;
  void* attention;
  int64_t a_sb, a_st;
  int64_t T, H;
  int64_t nvec;     // vector columns: H / VEC
  int64_t ngroups;  // groups of `cols` vector columns
  int cols;         // vector columns per group, a power of two <= kThreads
  double eps;
  int* nonfinite;  // FA_NONFINITE_* flags, nullptr: no check
  // The pair forward only: the clean (unperturbed) branch's outputs; context/attention above are the perturbed.
  void* context_clean;
  int64_t cc_sb, cc_sh;
  void* attention_clean;
  int64_t ac_sb, ac_st;
};

template <typename T, int VEC, int PERTURB, bool PAIR>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams p) {
  using A = typename AccOf<T>::type;
  using DirT = typename Select<PERTURB == FA_PERTURB_GIVEN, A, T>::type;
  __shared__ A scratch_max[kWarps];
  __shared__ A scratch_sum[kWarps];
  __shared__ A weights[kThreads];
  __shared__ A weights_clean[PAIR ? kThreads : 1];
  __shared__ A partial[kThreads * VEC];

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const T* scores = static_cast<const T*>(p.scores) + b * p.s_sb;
  const DirT* direction = static_cast<const DirT*>(p.direction) + b * p.d_sb;
  const uint8_t* mask = p.mask == nullptr ? nullptr : p.mask + b * p.m_sb;
  auto valid = [&](int64_t t) { return mask == nullptr || mask[t * p.m_st] != 0; };

  // The blocks of column group 0 check the real values of their row (every group reads the same ones).
  int* const nonfinite = blockIdx.y == 0 ? p.nonfinite : nullptr;
  A scale = A(0);
  if constexpr (PERTURB == FA_PERTURB_NORMALIZE) {
    A sq_norm = A(0);
    FiniteWatch<A> d_watch;
    for (int64_t t = tid; t < p.T; t += kThreads) {
      if (valid(t)) {
        const A v = Cvt<T>::to(direction[t * p.d_st]);
        sq_norm += v * v;
        d_watch.add(v);
      }
    }
    d_watch.report(nonfinite, FA_NONFINITE_DIRECTION);
    sq_norm = block_sum(sq_norm, scratch_sum);
    scale = A(p.eps) / acc_max(acc_sqrt(sq_norm), A(kDelta));
  } else if constexpr (PERTURB == FA_PERTURB_GIVEN) {
    scale = A(1);
  }
  // s + r_t, s = the score at a valid position t.
  auto perturb = [&](A s, int64_t t) -> A {
    if constexpr (PERTURB != FA_PERTURB_NONE) s += scale * Cvt<DirT>::to(direction[t * p.d_st]);
    return s;
  };
  auto perturbed = [&](int64_t t) -> A { return perturb(Cvt<T>::to(scores[t * p.s_st]), t); };

  A row_max = A(-INFINITY), row_sum = A(0);
  A clean_max = A(-INFINITY), clean_sum = A(0);  // PAIR: the clean softmax, from the same reads of the scores
  FiniteWatch<A> s_watch;
  for (int64_t t = tid; t < p.T; t += kThreads) {
    if (valid(t)) {
      const A s = Cvt<T>::to(scores[t * p.s_st]);
      s_watch.add(s);
      softmax_merge(row_max, row_sum, perturb(s, t), A(1));
      if constexpr (PAIR) softmax_merge(clean_max, clean_sum, s, A(1));
    }
  }
  s_watch.report(nonfinite, FA_NONFINITE_SCORES);
  block_softmax_merge(row_max, row_sum, scratch_max, scratch_sum);
  const A shift = row_max == A(-INFINITY) ? A(0) : row_max;
  const A inv_sum = row_sum > A(0) ? A(1) / row_sum : A(0);  // a fully masked row: attention 0, context 0
  if constexpr (PAIR) block_softmax_merge(clean_max, clean_sum, scratch_max, scratch_sum);
  const A clean_shift = clean_max == A(-INFINITY) ? A(0) : clean_max;
  const A clean_inv_sum = clean_sum > A(0) ? A(1) / clean_sum : A(0);
  T* attention_clean = PAIR ? static_cast<T*>(p.attention_clean) + b * p.ac_sb : nullptr;
  T* context_clean = PAIR ? static_cast<T*>(p.context_clean) + b * p.cc_sb : nullptr;

  T* attention = static_cast<T*>(p.attention) + b * p.a_sb;
  T* context = static_cast<T*>(p.context) + b * p.c_sb;
  const T* h = static_cast<const T*>(p.h) + b * p.h_sb;
  const int cols = p.cols;
  const int rows = kThreads / cols;
  const int my_row = tid / cols, my_col = tid % cols;
  const int width = cols * VEC;  // elements of h per group
  bool write_attention = blockIdx.y == 0;
  for (int64_t group = blockIdx.y; group < p.ngroups; group += gridDim.y) {
    const int64_t vcol = group * cols + my_col;
    const bool col_ok = vcol < p.nvec;
    const T* h_col = h + vcol * VEC * p.h_sh;
    A acc[VEC], acc_clean[PAIR ? VEC : 1];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = A(0);
#pragma unroll
    for (int e = 0; e < (PAIR ? VEC : 1); ++e) acc_clean[e] = A(0);
    for (int64_t t0 = 0; t0 < p.T; t0 += kThreads) {
      const int64_t t = t0 + tid;
      A w = A(0), w_clean = A(0);
      if (t < p.T) {
        if (valid(t)) {
          if constexpr (PAIR) {
            const A s = Cvt<T>::to(scores[t * p.s_st]);
            w = acc_exp(perturb(s, t) - shift) * inv_sum;
            w_clean = acc_exp(s - clean_shift) * clean_inv_sum;
          } else {
            w = acc_exp(perturbed(t) - shift) * inv_sum;
          }
        }
        if (write_attention) attention[t * p.a_st] = Cvt<T>::from(w);
        if (PAIR && write_attention) attention_clean[t * p.ac_st] = Cvt<T>::from(w_clean);
      }
      weights[tid] = w;
      if constexpr (PAIR) weights_clean[tid] = w_clean;
      __syncthreads();
      const int n = static_cast<int>(p.T - t0 < kThreads ? p.T - t0 : kThreads);
      if (col_ok) {
        for (int k0 = my_row; k0 < n; k0 += rows * kUnroll) {
          Pack<T, VEC> pack[kUnroll];
          A wk[kUnroll], wc[PAIR ? kUnroll : 1];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int k = k0 + u * rows;
            wk[u] = k < n ? weights[k] : A(0);
            bool needed = wk[u] != A(0);
            if constexpr (PAIR) {
              wc[u] = k < n ? weights_clean[k] : A(0);
              needed = needed || wc[u] != A(0);
            }
            // a zero weight (padding, or underflow) needs no h: padded rows of h are never loaded
            if (needed) pack[u] = load_pack<T, VEC>(h_col + (t0 + k) * p.h_st);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            if (wk[u] != A(0)) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[e] += wk[u] * Cvt<T>::to(pack[u].v[e]);
            }
            if constexpr (PAIR) {  // the clean context from the same pack of h
              if (wc[u] != A(0)) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc_clean[e] += wc[u] * Cvt<T>::to(pack[u].v[e]);
              }
            }
          }
        }
      }
      __syncthreads();
    }
    write_attention = false;
#pragma unroll
    for (int e = 0; e < VEC; ++e) partial[(my_row * cols + my_col) * VEC + e] = acc[e];
    __syncthreads();
    for (int i = tid; i < width; i += kThreads) {
      A sum = A(0);
      for (int r = 0; r < rows; ++r) sum += partial[r * width + i];
      const int64_t column = group * width + i;
      if (column < p.H) context[column * p.c_sh] = Cvt<T>::from(sum);
    }
    __syncthreads();
    if constexpr (PAIR) {  // the clean context, reduced through the same shared buffer
#pragma unroll
      for (int e = 0; e < VEC; ++e) partial[(my_row * cols + my_col) * VEC + e] = acc_clean[e];
      __syncthreads();
      for (int i = tid; i < width; i += kThreads) {
        A sum = A(0);
        for (int r = 0; r < rows; ++r) sum += partial[r * width + i];
        const int64_t column = group * width + i;
        if (column < p.H) context_clean[column * p.cc_sh] = Cvt<T>::from(sum);
      }
      __syncthreads();
    }
  }
  if (write_attention) {  // H == 0: no column group, the attention is still an output
    for (int64_t t = tid; t < p.T; t += kThreads) {
      const A w = valid(t) ? acc_exp(perturbed(t) - shift) * inv_sum : A(0);
      attention[t * p.a_st] = Cvt<T>::from(w);
      if constexpr (PAIR) {
        const A w_clean = valid(t) ? acc_exp(Cvt<T>::to(scores[t * p.s_st]) - clean_shift) * clean_inv_sum : A(0);
        attention_clean[t * p.ac_st] = Cvt<T>::from(w_clean);
      }
    }
  }
}

struct BwdParams {
  const void* grad_context;
  int64_t dc_sb, dc_sh;
  const void* grad_attention;  // nullptr: none
  int64_t ga_sb, ga_st;
  const void* h;
  int64_t h_sb, h_st, h_sh;
  const void* attention;
  int64_t a_sb, a_st;
  void* grad_h;
  int64_t dh_sb, dh_st, dh_sh;
  void* grad_scores;
  int64_t ds_sb, ds_st;
  void* da;  // [B, T] acc, contiguous (the pair: [2, B, T], the second branch's da at da + B * T)
  int64_t T, H, nvec, chunk;
  // The pair backward only: the second (perturbed) branch; the one above is the clean branch.
  const void* grad_context2;
  int64_t dc2_sb, dc2_sh;
  const void* grad_attention2;  // nullptr: none
  int64_t ga2_sb, ga2_st;
  const void* attention2;
  int64_t a2_sb, a2_st;
  int64_t B;
};

// What bwd_dh_da_kernel computes: the op's backward (da, dh = a dc), da alone (attention_scores_grad), or the
// pair's backward (da and da2, dh = a dc + a2 dc2 written once).
enum BwdMode { BWD_SINGLE = 0, BWD_SCORES_ONLY = 1, BWD_PAIR = 2 };

template <typename T, int VEC, int MODE>
__global__ void __launch_bounds__(kThreads) bwd_dh_da_kernel(const BwdParams p) {
  using A = typename AccOf<T>::type;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t_begin = blockIdx.y * p.chunk;
  const int64_t t_end = t_begin + p.chunk < p.T ? t_begin + p.chunk : p.T;
  const T* dc = static_cast<const T*>(p.grad_context) + b * p.dc_sb;
  const T* ga = static_cast<const T*>(p.grad_attention);
  const T* h = static_cast<const T*>(p.h) + b * p.h_sb;
  const T* attention = static_cast<const T*>(p.attention) + b * p.a_sb;
  T* dh = static_cast<T*>(p.grad_h) + b * p.dh_sb;
  A* da = static_cast<A*>(p.da) + b * p.T;
  constexpr bool kPair = MODE == BWD_PAIR;
  constexpr int kRows2 = kPair ? kRowsPerWarp : 1;  // the second branch's arrays (unused outside the pair)
  const T* dc2 = kPair ? static_cast<const T*>(p.grad_context2) + b * p.dc2_sb : nullptr;
  const T* ga2 = static_cast<const T*>(p.grad_attention2);
  const T* attention2 = kPair ? static_cast<const T*>(p.attention2) + b * p.a2_sb : nullptr;
  A* da2 = kPair ? static_cast<A*>(p.da) + (p.B + b) * p.T : nullptr;
  for (int64_t t0 = t_begin + warp * kRowsPerWarp; t0 < t_end; t0 += kWarps * kRowsPerWarp) {
    A a[kRowsPerWarp], part[kRowsPerWarp], a2[kRows2], part2[kRows2];
#pragma unroll
    for (int u = 0; u < kRowsPerWarp; ++u) {
      a[u] = t0 + u < t_end ? Cvt<T>::to(attention[(t0 + u) * p.a_st]) : A(0);
      part[u] = A(0);
    }
    if constexpr (kPair) {
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u) {
        a2[u] = t0 + u < t_end ? Cvt<T>::to(attention2[(t0 + u) * p.a2_st]) : A(0);
        part2[u] = A(0);
      }
    }
    for (int64_t vcol = lane; vcol < p.nvec; vcol += 32) {
      const Pack<T, VEC> dc_pack = load_pack<T, VEC>(dc + vcol * VEC * p.dc_sh);
      A g[VEC], g2[kPair ? VEC : 1];
#pragma unroll
      for (int e = 0; e < VEC; ++e) g[e] = Cvt<T>::to(dc_pack.v[e]);
      if constexpr (kPair) {
        const Pack<T, VEC> dc2_pack = load_pack<T, VEC>(dc2 + vcol * VEC * p.dc2_sh);
#pragma unroll
        for (int e = 0; e < VEC; ++e) g2[e] = Cvt<T>::to(dc2_pack.v[e]);
      }
      Pack<T, VEC> h_pack[kRowsPerWarp];
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u) {
        // where a_t = 0 (padding, or underflow), dscores_t = a_t (...) = 0 and dh_t = 0: h_t is not needed
        bool needed = a[u] != A(0);
        if constexpr (kPair) needed = needed || a2[u] != A(0);
        if (needed) h_pack[u] = load_pack<T, VEC>(h + (t0 + u) * p.h_st + vcol * VEC * p.h_sh);
      }
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u) {
        if (t0 + u >= t_end) continue;
        Pack<T, VEC> out;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (a[u] != A(0)) part[u] += Cvt<T>::to(h_pack[u].v[e]) * g[e];
          if constexpr (kPair) {
            if (a2[u] != A(0)) part2[u] += Cvt<T>::to(h_pack[u].v[e]) * g2[e];
            out.v[e] = Cvt<T>::from(a[u] * g[e] + a2[u] * g2[e]);
          } else {
            out.v[e] = Cvt<T>::from(a[u] * g[e]);
          }
        }
        if constexpr (MODE != BWD_SCORES_ONLY) store_pack<T, VEC>(dh + (t0 + u) * p.dh_st + vcol * VEC * p.dh_sh, out);
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsPerWarp; ++u) part[u] = warp_sum(part[u]);
    if constexpr (kPair) {
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u) part2[u] = warp_sum(part2[u]);
    }
    if (lane < kRowsPerWarp) {
      A value = A(0);
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u) value = lane == u ? part[u] : value;
      const int64_t t = t0 + lane;
      A a_t = A(0);
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u) a_t = lane == u ? a[u] : a_t;
      if (t < t_end) {
        if (ga != nullptr && a_t != A(0)) value += Cvt<T>::to(ga[b * p.ga_sb + t * p.ga_st]);
        da[t] = value;
      }
      if constexpr (kPair) {
        A value2 = A(0), a2_t = A(0);
#pragma unroll
        for (int u = 0; u < kRowsPerWarp; ++u) {
          value2 = lane == u ? part2[u] : value2;
          a2_t = lane == u ? a2[u] : a2_t;
        }
        if (t < t_end) {
          if (ga2 != nullptr && a2_t != A(0)) value2 += Cvt<T>::to(ga2[b * p.ga2_sb + t * p.ga2_st]);
          da2[t] = value2;
        }
      }
    }
  }
}

template <typename T, bool PAIR>
__global__ void __launch_bounds__(kThreads) bwd_dscores_kernel(const BwdParams p) {
  using A = typename AccOf<T>::type;
  __shared__ A scratch[kWarps];
  const int64_t b = blockIdx.x;
  const T* attention = static_cast<const T*>(p.attention) + b * p.a_sb;
  const A* da = static_cast<const A*>(p.da) + b * p.T;
  const T* attention2 = PAIR ? static_cast<const T*>(p.attention2) + b * p.a2_sb : nullptr;
  const A* da2 = PAIR ? static_cast<const A*>(p.da) + (p.B + b) * p.T : nullptr;
  T* ds = static_cast<T*>(p.grad_scores) + b * p.ds_sb;
  A dot = A(0), dot2 = A(0);
  for (int64_t t = threadIdx.x; t < p.T; t += kThreads) dot += Cvt<T>::to(attention[t * p.a_st]) * da[t];
  dot = block_sum(dot, scratch);
  if constexpr (PAIR) {
    for (int64_t t = threadIdx.x; t < p.T; t += kThreads) dot2 += Cvt<T>::to(attention2[t * p.a2_st]) * da2[t];
    dot2 = block_sum(dot2, scratch);
  }
  for (int64_t t = threadIdx.x; t < p.T; t += kThreads) {
    const A a = Cvt<T>::to(attention[t * p.a_st]);
    A value = a * (da[t] - dot);
    if constexpr (PAIR) value += Cvt<T>::to(attention2[t * p.a2_st]) * (da2[t] - dot2);
    ds[t * p.ds_st] = Cvt<T>::from(value);
  }
}

// ------------------------------------------------------------------------------------------------ launchers

// Every kernel launch goes through here. FA_CPU_EMULATION is the CPU emulation the tests build this file with
// (csrc/cuda/cpu_emulation/): it runs each block's threads as host threads.
template <typename Params>
int launch_kernel(void (*kernel)(Params), dim3 grid, cudaStream_t stream, const Params& params) {
#ifdef FA_CPU_EMULATION
  (void)stream;
  fa_emulation::launch(kernel, grid, kThreads, params);
#else
  kernel<<<grid, kThreads, 0, stream>>>(params);
#endif
  return static_cast<int>(cudaGetLastError());
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The grid (x, y) of a launch, or cudaErrorInvalidConfiguration where a dimension is outside CUDA's limits
// (1 <= x <= 2^31 - 1, 1 <= y <= 65535) instead of a silently truncated cast to unsigned.
int make_grid(int64_t x, int64_t y, dim3* grid) {
  if (x < 1 || x > kMaxGridX || y < 1 || y > kMaxGridY) return static_cast<int>(cudaErrorInvalidConfiguration);
  *grid = dim3(static_cast<unsigned>(x), static_cast<unsigned>(y));
  return 0;
}

int next_pow2(int64_t n) {
  int p = 1;
  while (p < n && p < kThreads) p <<= 1;
  return p;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// A [B, T, H] (or [B, H]) view whose rows can be read in VEC-element vectors of 16 bytes.
template <typename S>
bool vectorizable(const fa_view& v, int dims, int64_t H) {
  constexpr int64_t kVec = 16 / sizeof(S);
  if (H % kVec != 0 || v.stride[dims - 1] != 1 || !aligned16(v.data)) return false;
  for (int d = 0; d < dims - 1; ++d) {
    if (v.stride[d] % kVec != 0) return false;
  }
  return true;
}

template <typename S>
int launch_iat_coefficients(int64_t B, int64_t T, fa_view scores, fa_view mask, fa_view grad, void* coeff,
                            int* nonfinite, cudaStream_t stream) {
  PerturbParams p{scores.data, scores.stride[0], scores.stride[1], static_cast<const uint8_t*>(mask.data),
                  mask.stride[0], mask.stride[1], grad.data, grad.stride[0], grad.stride[1], coeff, nullptr, 0, 0,
                  B, T, 0.0, nonfinite};
  dim3 grid;
  if (const int error = make_grid(B, 1, &grid)) return error;
  return launch_kernel(&iat_coeff_kernel<S>, grid, stream, p);
}

template <typename S, typename OutT>
int launch_perturbation_as(int kind, int64_t B, int64_t T, double eps, fa_view scores, fa_view mask,
                           fa_view direction, const void* coeff, fa_view out, int* nonfinite,
                           cudaStream_t stream) {
  PerturbParams p{scores.data, scores.stride[0], scores.stride[1], static_cast<const uint8_t*>(mask.data),
                  mask.stride[0], mask.stride[1], direction.data, direction.stride[0], direction.stride[1], coeff,
                  out.data, out.stride[0], out.stride[1], B, T, eps, nonfinite};
  dim3 grid;
  if (const int error = make_grid(B, 1, &grid)) return error;
  if (kind == FA_KIND_IAT) return launch_kernel(&perturbation_kernel<S, OutT, FA_KIND_IAT>, grid, stream, p);
  return launch_kernel(&perturbation_kernel<S, OutT, FA_KIND_NORMALIZE>, grid, stream, p);
}

template <typename S>
int launch_perturbation(int kind, int out_is_acc, int64_t B, int64_t T, double eps, fa_view scores, fa_view mask,
                        fa_view direction, const void* coeff, fa_view out, int* nonfinite, cudaStream_t stream) {
  using A = typename AccOf<S>::type;
  if (out_is_acc) {
    return launch_perturbation_as<S, A>(kind, B, T, eps, scores, mask, direction, coeff, out, nonfinite, stream);
  }
  return launch_perturbation_as<S, S>(kind, B, T, eps, scores, mask, direction, coeff, out, nonfinite, stream);
}

template <typename S, int VEC, bool PAIR>
int launch_fwd_vec(int perturb, FwdParams p, int64_t B, int num_sms, cudaStream_t stream) {
  p.nvec = p.H / VEC;
  // 8 or 16 vector columns per group: 128 or 256 contiguous bytes of each row of h per group; the narrower
  // groups when the wider ones would not give every multiprocessor four blocks.
  int cols = VEC > 1 ? 16 : 32;
  if (VEC > 1 && B * ceil_div(p.nvec, cols) < 4LL * num_sms) cols = 8;
  cols = cols < next_pow2(p.nvec) ? cols : next_pow2(p.nvec);
  p.cols = cols;
  p.ngroups = ceil_div(p.nvec, cols);
  const int64_t split = p.ngroups < 1 ? 1 : (p.ngroups < kMaxGridY ? p.ngroups : kMaxGridY);
  dim3 grid;
  if (const int error = make_grid(B, split, &grid)) return error;
  if constexpr (PAIR) {  // the perturbed branch of the pair: r normalised here, or given (iAT)
    if (perturb == FA_PERTURB_NORMALIZE) {
      return launch_kernel(&fwd_kernel<S, VEC, FA_PERTURB_NORMALIZE, true>, grid, stream, p);
    }
    if (perturb == FA_PERTURB_GIVEN) return launch_kernel(&fwd_kernel<S, VEC, FA_PERTURB_GIVEN, true>, grid, stream, p);
    return static_cast<int>(cudaErrorInvalidValue);
  } else {
    switch (perturb) {
      case FA_PERTURB_NONE:
        return launch_kernel(&fwd_kernel<S, VEC, FA_PERTURB_NONE, false>, grid, stream, p);
      case FA_PERTURB_NORMALIZE:
        return launch_kernel(&fwd_kernel<S, VEC, FA_PERTURB_NORMALIZE, false>, grid, stream, p);
      default:
        return launch_kernel(&fwd_kernel<S, VEC, FA_PERTURB_GIVEN, false>, grid, stream, p);
    }
  }
}

// The forward, or the pair forward (pair: context/attention are the perturbed branch's outputs).
template <typename S>
int launch_fwd(bool pair, int perturb, int64_t B, int64_t T, int64_t H, double eps, fa_view h, fa_view scores,
               fa_view mask, fa_view direction, fa_view context, fa_view attention, fa_view context_clean,
               fa_view attention_clean, int num_sms, int* nonfinite, cudaStream_t stream) {
  FwdParams p{h.data, h.stride[0], h.stride[1], h.stride[2], scores.data, scores.stride[0], scores.stride[1],
              static_cast<const uint8_t*>(mask.data), mask.stride[0], mask.stride[1], direction.data,
              direction.stride[0], direction.stride[1], context.data, context.stride[0], context.stride[1],
              attention.data, attention.stride[0], attention.stride[1], T, H, 0, 0, 0, eps, nonfinite,
              context_clean.data, context_clean.stride[0], context_clean.stride[1], attention_clean.data,
              attention_clean.stride[0], attention_clean.stride[1]};
  constexpr int kVec = 16 / sizeof(S);
  const bool vec = vectorizable<S>(h, 3, H);
  if (pair) {
    if (vec) return launch_fwd_vec<S, kVec, true>(perturb, p, B, num_sms, stream);
    return launch_fwd_vec<S, 1, true>(perturb, p, B, num_sms, stream);
  }
  if (vec) return launch_fwd_vec<S, kVec, false>(perturb, p, B, num_sms, stream);
  return launch_fwd_vec<S, 1, false>(perturb, p, B, num_sms, stream);
}

template <typename S, int VEC, int MODE>
int launch_bwd_vec(BwdParams p, int64_t B, int num_sms, cudaStream_t stream) {
  if (B < 1) return static_cast<int>(cudaErrorInvalidConfiguration);  // before ceil_div(.., B)
  p.nvec = p.H / VEC;
  constexpr int64_t kRowsPerPass = kWarps * kRowsPerWarp;
  // Chunks of positions (multiples of one pass of the block) so that every multiprocessor gets four blocks.
  int64_t split = ceil_div(4LL * num_sms, B);
  const int64_t max_split = ceil_div(p.T, kRowsPerPass);
  split = split < 1 ? 1 : (split > max_split ? max_split : split);
  p.chunk = ceil_div(ceil_div(p.T, split), kRowsPerPass) * kRowsPerPass;
  if (ceil_div(p.T, p.chunk) > kMaxGridY) p.chunk = ceil_div(ceil_div(p.T, kMaxGridY), kRowsPerPass) * kRowsPerPass;
  split = ceil_div(p.T, p.chunk);
  dim3 grid, rows_grid;
  if (const int error = make_grid(B, split, &grid)) return error;
  if (const int error = make_grid(B, 1, &rows_grid)) return error;
  if (const int error = launch_kernel(&bwd_dh_da_kernel<S, VEC, MODE>, grid, stream, p)) return error;
  return launch_kernel(&bwd_dscores_kernel<S, MODE == BWD_PAIR>, rows_grid, stream, p);
}

// The backward (MODE BWD_SINGLE), grad_scores alone (BWD_SCORES_ONLY: grad_h unused), or the pair's backward
// (BWD_PAIR: the second branch grad_context2, grad_attention2, attention2; da holds 2 B T elements).
template <typename S, int MODE>
int launch_bwd(int64_t B, int64_t T, int64_t H, fa_view grad_context, fa_view grad_attention, fa_view h,
               fa_view attention, fa_view grad_h, fa_view grad_scores, void* da, fa_view grad_context2,
               fa_view grad_attention2, fa_view attention2, int num_sms, cudaStream_t stream) {
  BwdParams p{grad_context.data, grad_context.stride[0], grad_context.stride[1], grad_attention.data,
              grad_attention.stride[0], grad_attention.stride[1], h.data, h.stride[0], h.stride[1], h.stride[2],
              attention.data, attention.stride[0], attention.stride[1], grad_h.data, grad_h.stride[0],
              grad_h.stride[1], grad_h.stride[2], grad_scores.data, grad_scores.stride[0], grad_scores.stride[1],
              da, T, H, 0, 0, grad_context2.data, grad_context2.stride[0], grad_context2.stride[1],
              grad_attention2.data, grad_attention2.stride[0], grad_attention2.stride[1], attention2.data,
              attention2.stride[0], attention2.stride[1], B};
  constexpr int kVec = 16 / sizeof(S);
  bool vec = vectorizable<S>(h, 3, H) && vectorizable<S>(grad_context, 2, H);
  if (MODE != BWD_SCORES_ONLY) vec = vec && vectorizable<S>(grad_h, 3, H);
  if (MODE == BWD_PAIR) vec = vec && vectorizable<S>(grad_context2, 2, H);
  if (vec) return launch_bwd_vec<S, kVec, MODE>(p, B, num_sms, stream);
  return launch_bwd_vec<S, 1, MODE>(p, B, num_sms, stream);
}

}  // namespace
}  // namespace fused_attn_at_cuda

using namespace fused_attn_at_cuda;

// Calls F<T>(args...) with T the storage type of `dtype`.
#define FA_DISPATCH(dtype, CALL)                       \
  switch (dtype) {                                     \
    case FA_FLOAT32: {                                 \
      using scalar_t = float;                          \
      return CALL;                                     \
    }                                                  \
    case FA_FLOAT64: {                                 \
      using scalar_t = double;                         \
      return CALL;                                     \
    }                                                  \
    case FA_FLOAT16: {                                 \
      using scalar_t = __half;                         \
      return CALL;                                     \
    }                                                  \
    case FA_BFLOAT16: {                                \
      using scalar_t = __nv_bfloat16;                  \
      return CALL;                                     \
    }                                                  \
  }                                                    \
  return static_cast<int>(cudaErrorInvalidValue);

extern "C" {

size_t fa_acc_size(fa_dtype dtype) { return dtype == FA_FLOAT64 ? sizeof(double) : sizeof(float); }

const char* fa_cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

int fa_cuda_multiprocessor_count(int device, int* count) {
  return static_cast<int>(cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device));
}

int fa_cuda_iat_coefficients(fa_dtype dtype, int64_t B, int64_t T, fa_view scores, fa_view mask, fa_view grad,
                             void* coeff, int* nonfinite, void* stream) {
  FA_DISPATCH(dtype, launch_iat_coefficients<scalar_t>(B, T, scores, mask, grad, coeff, nonfinite,
                                                       static_cast<cudaStream_t>(stream)))
}

int fa_cuda_perturbation(fa_dtype dtype, int kind, int out_is_acc, int64_t B, int64_t T, double eps, fa_view scores,
                         fa_view mask, fa_view direction, const void* coeff, fa_view out, int* nonfinite,
                         void* stream) {
  FA_DISPATCH(dtype, launch_perturbation<scalar_t>(kind, out_is_acc, B, T, eps, scores, mask, direction, coeff, out,
                                                   nonfinite, static_cast<cudaStream_t>(stream)))
}

int fa_cuda_attention_pool_fwd(fa_dtype dtype, int perturb, int64_t B, int64_t T, int64_t H, double eps, fa_view h,
                               fa_view scores, fa_view mask, fa_view direction, fa_view context, fa_view attention,
                               int num_sms, int* nonfinite, void* stream) {
  const fa_view none{nullptr, {0, 0, 0}};
  FA_DISPATCH(dtype, launch_fwd<scalar_t>(false, perturb, B, T, H, eps, h, scores, mask, direction, context,
                                          attention, none, none, num_sms, nonfinite, static_cast<cudaStream_t>(stream)))
}

int fa_cuda_attention_pool_bwd(fa_dtype dtype, int64_t B, int64_t T, int64_t H, fa_view grad_context,
                               fa_view grad_attention, fa_view h, fa_view attention, fa_view grad_h,
                               fa_view grad_scores, void* da_workspace, int num_sms, void* stream) {
  const fa_view none{nullptr, {0, 0, 0}};
  FA_DISPATCH(dtype, (launch_bwd<scalar_t, BWD_SINGLE>(B, T, H, grad_context, grad_attention, h, attention, grad_h,
                                                       grad_scores, da_workspace, none, none, none, num_sms,
                                                       static_cast<cudaStream_t>(stream))))
}

int fa_cuda_attention_scores_grad(fa_dtype dtype, int64_t B, int64_t T, int64_t H, fa_view grad_context,
                                  fa_view grad_attention, fa_view h, fa_view attention, fa_view grad_scores,
                                  void* da_workspace, int num_sms, void* stream) {
  const fa_view none{nullptr, {0, 0, 0}};
  FA_DISPATCH(dtype, (launch_bwd<scalar_t, BWD_SCORES_ONLY>(B, T, H, grad_context, grad_attention, h, attention, none,
                                                            grad_scores, da_workspace, none, none, none, num_sms,
                                                            static_cast<cudaStream_t>(stream))))
}

int fa_cuda_attention_pool_pair_fwd(fa_dtype dtype, int perturb, int64_t B, int64_t T, int64_t H, double eps,
                                    fa_view h, fa_view scores, fa_view mask, fa_view direction, fa_view context_clean,
                                    fa_view attention_clean, fa_view context_adv, fa_view attention_adv, int num_sms,
                                    int* nonfinite, void* stream) {
  if (perturb != FA_PERTURB_NORMALIZE && perturb != FA_PERTURB_GIVEN) return static_cast<int>(cudaErrorInvalidValue);
  FA_DISPATCH(dtype, launch_fwd<scalar_t>(true, perturb, B, T, H, eps, h, scores, mask, direction, context_adv,
                                          attention_adv, context_clean, attention_clean, num_sms, nonfinite,
                                          static_cast<cudaStream_t>(stream)))
}

int fa_cuda_attention_pool_pair_bwd(fa_dtype dtype, int64_t B, int64_t T, int64_t H, fa_view grad_context_clean,
                                    fa_view grad_attention_clean, fa_view grad_context_adv,
                                    fa_view grad_attention_adv, fa_view h, fa_view attention_clean,
                                    fa_view attention_adv, fa_view grad_h, fa_view grad_scores, void* da_workspace,
                                    int num_sms, void* stream) {
  FA_DISPATCH(dtype, (launch_bwd<scalar_t, BWD_PAIR>(B, T, H, grad_context_clean, grad_attention_clean, h,
                                                     attention_clean, grad_h, grad_scores, da_workspace,
                                                     grad_context_adv, grad_attention_adv, attention_adv, num_sms,
                                                     static_cast<cudaStream_t>(stream))))
}

}  // extern "C"
