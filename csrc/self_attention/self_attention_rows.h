// Row kernels of the self-attention CPU kernels (self_attention_cpu.cpp): the element-wise work on one row of a
// score block, between the block matrix products. A portable scalar build (any type, here) and an AVX2 + FMA
// build for float32 (self_attention_avx2.cpp, picked at run time like the attention_pool kernels: csrc/cpu/isa.h,
// FUSED_ATTN_AT_CPU_ISA=default forces the portable one).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace fused_attn_at {
namespace self_attention {

// Attention dropout's hash: entry j of a row is kept when fmix32(rowkey + j * GOLDEN32) >= threshold
// (= p * 2^32), rowkey a 32-bit key of the row (splitmix64 of the seed's stream and the row's index, made by the
// caller). Integer-only, so the AVX2 and the portable builds keep the very same entries.
constexpr uint32_t GOLDEN32 = 0x9E3779B9u;

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

template <typename T> struct RowOps {
  // x[j] = allowed ? x[j] + bias[j] : -inf, allowed = j < lim && kmadd[j] == 0 && bias[j] != -inf (bias and kmadd
  // may be null). Returns true when an allowed entry is NaN or +-inf afterwards.
  bool (*prep)(T* x, int64_t n, const T* bias, const T* kmadd, int64_t lim);
  T (*rowmax)(const T* x, int64_t n);
  // x[j] = exp(x[j] - m) (0 where x[j] - m is -inf); returns the sum of the new x.
  T (*exp_sum)(T* x, int64_t n, T m);
  // dp[j] = p[j] * (dp[j] - D); returns sum_j dp[j]^2.
  T (*ds)(const T* p, T* dp, int64_t n, T D);
  // x[j] += c * g[j] where x[j] != -inf.
  void (*axpy_allowed)(T* x, const T* g, int64_t n, T c);
  // x[j] = keep(j0 + j) ? x[j] * scale : 0 for the n entries from key index j0 of a row (the dropout hash above)
  void (*dropout)(T* x, int64_t n, uint32_t rowkey, uint32_t j0, uint32_t threshold, T scale);
  const char* name;
};

namespace portable {

template <typename T> bool prep(T* x, int64_t n, const T* bias, const T* kmadd, int64_t lim) {
  const T ninf = -std::numeric_limits<T>::infinity();
  bool bad = false;
  for (int64_t j = 0; j < n; ++j) {
    bool ok = j < lim && (kmadd == nullptr || kmadd[j] == T(0));
    T v = x[j];
    if (bias != nullptr) {
      ok = ok && bias[j] != ninf;
      v += bias[j];
    }
    if (ok && !std::isfinite(v)) bad = true;
    x[j] = ok ? v : ninf;
  }
  return bad;
}

template <typename T> T rowmax(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

template <typename T> T exp_sum(T* x, int64_t n, T m) {
  const T ninf = -std::numeric_limits<T>::infinity();
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T d = x[j] - m;
    const T e = d == ninf ? T(0) : std::exp(d);
    x[j] = e;
    sum += e;
  }
  return sum;
}

template <typename T> T ds(const T* p, T* dp, int64_t n, T D) {
  T sq = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T g = p[j] * (dp[j] - D);
    dp[j] = g;
    sq += g * g;
  }
  return sq;
}

template <typename T> void axpy_allowed(T* x, const T* g, int64_t n, T c) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j)
    if (x[j] != ninf) x[j] += c * g[j];
}

template <typename T> void dropout(T* x, int64_t n, uint32_t rowkey, uint32_t j0, uint32_t threshold, T scale) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t h = fmix32(rowkey + (j0 + static_cast<uint32_t>(j)) * GOLDEN32);
    x[j] = h >= threshold ? x[j] * scale : T(0);
  }
}

}  // namespace portable

template <typename T> const RowOps<T>& portable_row_ops() {
  static const RowOps<T> ops{&portable::prep<T>, &portable::rowmax<T>, &portable::exp_sum<T>, &portable::ds<T>,
                             &portable::axpy_allowed<T>, &portable::dropout<T>, "default"};
  return ops;
}

// The AVX2 + FMA build for float32; nullptr where it is not compiled (not x86-64 GCC/Clang).
const RowOps<float>* avx2_row_ops();

}  // namespace self_attention
}  // namespace fused_attn_at
