// The AVX2 + FMA build of the self-attention row kernels (self_attention_rows.h) for float32. Every header is
// included before the instruction set is switched (as in csrc/cpu/kernels_avx2.cpp): only the functions below
// are compiled for AVX2, so no inline function of a shared header gets an AVX2 copy the linker could pick.
#include "self_attention_rows.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace fused_attn_at {
namespace self_attention {
namespace avx2 {

constexpr int N = 8;

inline __m256 ninf8() { return _mm256_set1_ps(-__builtin_inff()); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(d) for d <= 88.37 (Cephes' expf polynomial, about 1 ulp); exactly 0 where d < -87.33 (d = -inf included).
inline __m256 exp8(__m256 d) {
  const __m256 x0 = _mm256_min_ps(d, _mm256_set1_ps(88.3762626647949f));
  const __m256 zero_mask = _mm256_cmp_ps(d, _mm256_set1_ps(-87.3365447504f), _CMP_GE_OQ);
  __m256 x = _mm256_max_ps(x0, _mm256_set1_ps(-87.3365447504f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_cvttps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(n));
  return _mm256_and_ps(y, zero_mask);
}

// Loads the tail (n < 8 elements) padded with `fill`.
inline __m256 load_tail(const float* x, int64_t n, float fill) {
  alignas(32) float buf[N];
  for (int i = 0; i < N; ++i) buf[i] = i < n ? x[i] : fill;
  return _mm256_load_ps(buf);
}

inline void store_tail(float* x, int64_t n, __m256 v) {
  alignas(32) float buf[N];
  _mm256_store_ps(buf, v);
  for (int64_t i = 0; i < n; ++i) x[i] = buf[i];
}

bool prep(float* x, int64_t n, const float* bias, const float* kmadd, int64_t lim) {
  const __m256 ninf = ninf8(), inf = _mm256_set1_ps(__builtin_inff());
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i limv = _mm256_set1_epi32(static_cast<int>(lim < 0 ? 0 : (lim > n ? n : lim)));
  int bad = 0;
  for (int64_t j = 0; j < n; j += N) {
    const int64_t m = n - j < N ? n - j : N;
    __m256 v = m == N ? _mm256_loadu_ps(x + j) : load_tail(x + j, m, 0.0f);
    __m256 ok = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(limv, _mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int>(j)))));
    if (kmadd != nullptr) {
      const __m256 km = m == N ? _mm256_loadu_ps(kmadd + j) : load_tail(kmadd + j, m, 0.0f);
      ok = _mm256_and_ps(ok, _mm256_cmp_ps(km, _mm256_setzero_ps(), _CMP_EQ_OQ));
    }
    if (bias != nullptr) {
      const __m256 b = m == N ? _mm256_loadu_ps(bias + j) : load_tail(bias + j, m, 0.0f);
      ok = _mm256_and_ps(ok, _mm256_cmp_ps(b, ninf, _CMP_NEQ_UQ));
      v = _mm256_add_ps(v, b);
    }
    const __m256 finite = _mm256_cmp_ps(_mm256_and_ps(v, absmask), inf, _CMP_LT_OQ);
    bad |= _mm256_movemask_ps(_mm256_andnot_ps(finite, ok));
    v = _mm256_blendv_ps(ninf, v, ok);
    if (m == N) _mm256_storeu_ps(x + j, v);
    else store_tail(x + j, m, v);
  }
  return bad != 0;
}

float rowmax(const float* x, int64_t n) {
  __m256 m = ninf8();
  int64_t j = 0;
  for (; j + N <= n; j += N) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  if (j < n) m = _mm256_max_ps(m, load_tail(x + j, n - j, -__builtin_inff()));
  return hmax(m);
}

float exp_sum(float* x, int64_t n, float mx) {
  const __m256 mv = _mm256_set1_ps(mx);
  __m256 s = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + N <= n; j += N) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), mv));
    _mm256_storeu_ps(x + j, e);
    s = _mm256_add_ps(s, e);
  }
  if (j < n) {
    const __m256 e = exp8(_mm256_sub_ps(load_tail(x + j, n - j, -__builtin_inff()), mv));
    store_tail(x + j, n - j, e);
    s = _mm256_add_ps(s, e);
  }
  return hsum(s);
}

float ds(const float* p, float* dp, int64_t n, float D) {
  const __m256 dv = _mm256_set1_ps(D);
  __m256 s = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + N <= n; j += N) {
    const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(dp + j), dv));
    _mm256_storeu_ps(dp + j, g);
    s = _mm256_fmadd_ps(g, g, s);
  }
  if (j < n) {
    const __m256 g = _mm256_mul_ps(load_tail(p + j, n - j, 0.0f), _mm256_sub_ps(load_tail(dp + j, n - j, 0.0f), dv));
    store_tail(dp + j, n - j, g);
    s = _mm256_fmadd_ps(g, g, s);
  }
  return hsum(s);
}

void axpy_allowed(float* x, const float* g, int64_t n, float c) {
  const __m256 cv = _mm256_set1_ps(c), ninf = ninf8();
  int64_t j = 0;
  for (; j + N <= n; j += N) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const __m256 ok = _mm256_cmp_ps(v, ninf, _CMP_NEQ_UQ);
    _mm256_storeu_ps(x + j, _mm256_blendv_ps(v, _mm256_fmadd_ps(cv, _mm256_loadu_ps(g + j), v), ok));
  }
  for (; j < n; ++j)
    if (x[j] != -__builtin_inff()) x[j] += c * g[j];
}

inline __m256i fmix32x8(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

void dropout(float* x, int64_t n, uint32_t rowkey, uint32_t j0, uint32_t threshold, float scale) {
  // unsigned h >= threshold as a signed compare of both with the sign bit flipped
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i thr = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(threshold)), flip);
  const __m256i golden = _mm256_set1_epi32(static_cast<int>(GOLDEN32));
  const __m256i lanes = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), golden);
  const __m256 sv = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + N <= n; j += N) {
    const __m256i base = _mm256_set1_epi32(static_cast<int>(rowkey + (j0 + static_cast<uint32_t>(j)) * GOLDEN32));
    const __m256i h = _mm256_xor_si256(fmix32x8(_mm256_add_epi32(base, lanes)), flip);
    // drop where thr > h (h < threshold)
    const __m256 drop = _mm256_castsi256_ps(_mm256_cmpgt_epi32(thr, h));
    _mm256_storeu_ps(x + j, _mm256_andnot_ps(drop, _mm256_mul_ps(_mm256_loadu_ps(x + j), sv)));
  }
  for (; j < n; ++j) {
    const uint32_t h = fmix32(rowkey + (j0 + static_cast<uint32_t>(j)) * GOLDEN32);
    x[j] = h >= threshold ? x[j] * scale : 0.0f;
  }
}

}  // namespace avx2
}  // namespace self_attention
}  // namespace fused_attn_at

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace fused_attn_at {
namespace self_attention {
const RowOps<float>* avx2_row_ops() {
  static const RowOps<float> ops{&avx2::prep,         &avx2::rowmax,  &avx2::exp_sum, &avx2::ds,
                                 &avx2::axpy_allowed, &avx2::dropout, "avx2"};
  return &ops;
}
}  // namespace self_attention
}  // namespace fused_attn_at

#else

namespace fused_attn_at {
namespace self_attention {
const RowOps<float>* avx2_row_ops() { return nullptr; }
}  // namespace self_attention
}  // namespace fused_attn_at

#endif
