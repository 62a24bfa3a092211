// The CPU kernels of the fused perturbed attention pooling, written once and compiled once per instruction
// set: kernels_<isa>.cpp includes kernels_prelude.h, may switch the instruction set, defines
//   FAA_ISA        the namespace of this build (fused_attn_at::cpu::FAA_ISA)
//   FAA_VEC_BYTES  the vector width in bytes (16 for SSE2/NEON, 32 for AVX2)
//   FAA_F16C       (optional) float16 <-> float32 vector conversion instructions are available
// and then includes this file. The vectors are GCC/Clang vector extensions, so the compiler emits the
// instructions of the build's target. No torch type crosses the interface (kernel_api.h) except the
// c10::Half / c10::BFloat16 storage types, whose conversion functions come from kernels_prelude.h.
//
// Accumulation dtype A: double for double inputs, float for everything else.
#ifndef FAA_ISA
#error "kernels.h is included by kernels_<isa>.cpp only, after defining FAA_ISA and FAA_VEC_BYTES"
#endif

namespace fused_attn_at::cpu::FAA_ISA {

using c10::BFloat16;
using c10::Half;

constexpr double DELTA = 1e-12;  // python_ref.DELTA: guards every division by a norm
constexpr int64_t KIND_NORMALIZE = 1;
constexpr int64_t KIND_IAT = 2;

template <class S> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <class S> using Acc = typename AccOf<S>::type;

typedef float vfloat __attribute__((vector_size(FAA_VEC_BYTES)));
typedef double vdouble __attribute__((vector_size(FAA_VEC_BYTES)));
typedef uint32_t vuint32 __attribute__((vector_size(FAA_VEC_BYTES)));
typedef int32_t vint32 __attribute__((vector_size(FAA_VEC_BYTES)));
typedef uint16_t vuint16 __attribute__((vector_size(FAA_VEC_BYTES / 2)));

template <class A> struct VecOf;
template <> struct VecOf<float> { using type = vfloat; };
template <> struct VecOf<double> { using type = vdouble; };
template <class A> using Vec = typename VecOf<A>::type;
template <class A> constexpr int64_t LANES = FAA_VEC_BYTES / sizeof(A);

// ---- scalar and vector loads/stores, converting storage dtype <-> accumulation dtype -------------------

inline float max_of(float x, float y) { return y > x ? y : x; }
inline double max_of(double x, double y) { return y > x ? y : x; }
inline float tiny_of(float) { return FLT_MIN; }
inline double tiny_of(double) { return DBL_MIN; }

template <class A, class S> inline A to_acc(S x) { return static_cast<A>(x); }
template <class S, class A> inline S from_acc(A x) { return static_cast<S>(x); }

inline vfloat load(const float* p) { vfloat v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline vdouble load(const double* p) { vdouble v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof v); }
inline void store(double* p, vdouble v) { __builtin_memcpy(p, &v, sizeof v); }

// bfloat16 is the upper half of a float32.
inline vfloat load(const BFloat16* p) {
  vuint16 bits;
  __builtin_memcpy(&bits, p, sizeof bits);
  return (vfloat)(__builtin_convertvector(bits, vuint32) << 16);
}
// Round to nearest even, NaN to the quiet NaN 0x7fc0, as c10::BFloat16(float) does.
inline void store(BFloat16* p, vfloat v) {
  const vuint32 u = (vuint32)v;
  const vuint32 rounded = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
  const vuint32 is_nan = (vuint32)(v != v);
  const vuint16 bits = __builtin_convertvector((rounded & ~is_nan) | (is_nan & 0x7fc0u), vuint16);
  __builtin_memcpy(p, &bits, sizeof bits);
}

#if defined(FAA_F16C)
static_assert(FAA_VEC_BYTES == 32, "the F16C path converts 8 lanes at a time");
inline vfloat load(const Half* p) {
  return (vfloat)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store(Half* p, vfloat v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
}
#else
inline vfloat load(const Half* p) {
  vfloat v;
  for (int64_t i = 0; i < LANES<float>; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
inline void store(Half* p, vfloat v) {
  for (int64_t i = 0; i < LANES<float>; ++i) p[i] = static_cast<Half>(v[i]);
}
#endif

template <class A> inline Vec<A> splat(A x) { return Vec<A>{} + x; }
template <class A> inline A hsum(Vec<A> v) {
  A s = 0;
  for (int64_t i = 0; i < LANES<A>; ++i) s += v[i];
  return s;
}

// sum_t x_t y_t over n contiguous values
template <class A> A dot(const A* x, const A* y, int64_t n) {
  constexpr int64_t N = LANES<A>;
  Vec<A> s0{}, s1{};
  int64_t t = 0;
  for (; t + 2 * N <= n; t += 2 * N) {
    s0 += load(x + t) * load(y + t);
    s1 += load(x + t + N) * load(y + t + N);
  }
  for (; t + N <= n; t += N) s0 += load(x + t) * load(y + t);
  A s = hsum<A>(s0 + s1);
  for (; t < n; ++t) s += x[t] * y[t];
  return s;
}

// Per-thread scratch memory for one call of a kernel: blocks carved out of one malloc, 64-byte aligned.
class Scratch {
 public:
  explicit Scratch(int64_t bytes) {
    base_ = static_cast<char*>(std::malloc(static_cast<size_t>(bytes) + 64));
    if (base_ == nullptr) throw std::bad_alloc();
    next_ = base_ + ((64 - reinterpret_cast<uintptr_t>(base_) % 64) % 64);
  }
  ~Scratch() { std::free(base_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class X> X* take(int64_t n) {
    X* p = reinterpret_cast<X*>(next_);
    next_ += bytes_of<X>(n);
    return p;
  }
  template <class X> static int64_t bytes_of(int64_t n) { return (n * static_cast<int64_t>(sizeof(X)) + 63) / 64 * 64; }

 private:
  char* base_ = nullptr;
  char* next_ = nullptr;
};

inline const bool* mask_row(const ForwardArgs& a, int64_t b) { return a.mask ? a.mask + b * a.mask_sb : nullptr; }
inline bool is_valid(const bool* m, int64_t st, int64_t t) { return m == nullptr || m[t * st]; }

// Watches the real values a kernel reads, branch-free: x - x is 0 for every finite x and NaN for NaN and
// +-inf (no -ffast-math in this build), so the sum stays 0 unless one of them was not finite. report() then
// sets `what` in *a.nonfinite (atomically: rows run on several threads).
template <class A> struct FiniteWatch {
  A sum = 0;
  void add(A x) { sum += x - x; }
  void report(const ForwardArgs& a, int what) const {
    if (!(sum == A(0))) __atomic_fetch_or(a.nonfinite, what, __ATOMIC_RELAXED);
  }
};

// Sets `what` in *a.nonfinite if the real positions of row b of `x` hold a NaN or inf.
template <class S> void check_row_finite(const ForwardArgs& a, const RowsView& x, int64_t b, int what) {
  const S* p = static_cast<const S*>(x.data) + b * x.sb;
  const bool* m = mask_row(a, b);
  FiniteWatch<Acc<S>> watch;
  for (int64_t t = 0; t < a.T; ++t) {
    if (is_valid(m, a.mask_st, t)) watch.add(to_acc<Acc<S>>(p[t * x.st]));
  }
  watch.report(a, what);
}

// ---- the perturbation r (shared by the forward and the perturbation op) -------------------------------

// r <- eps * r / max(||r||, DELTA)  (the norm over the row; r is already zero at padded positions)
template <class A> void normalize_row(A* r, int64_t T, double eps) {
  const A norm = std::sqrt(dot<A>(r, r, T));
  const A den = max_of(norm, static_cast<A>(DELTA));
  const A e = static_cast<A>(eps);
  for (int64_t t = 0; t < T; ++t) r[t] = e * (r[t] / den);
}

// The iAT workspace: scores and grad zeroed at padded positions, the mask as 0/1, [B, T] each.
template <class S> void iat_prepare(const ForwardArgs& a, int64_t begin, int64_t end) {
  using A = Acc<S>;
  const int64_t T = a.T;
  for (int64_t b = begin; b < end; ++b) {
    const S* s = static_cast<const S*>(a.scores.data) + b * a.scores.sb;
    const S* g = static_cast<const S*>(a.direction.data) + b * a.direction.sb;
    const bool* m = mask_row(a, b);
    A* so = static_cast<A*>(a.iat_scores) + b * T;
    A* go = static_cast<A*>(a.iat_grad) + b * T;
    A* mo = static_cast<A*>(a.iat_mask) + b * T;
    FiniteWatch<A> s_watch, g_watch;  // padded positions hold 0 here
    for (int64_t t = 0; t < T; ++t) {
      const bool v = is_valid(m, a.mask_st, t);
      so[t] = v ? to_acc<A>(s[t * a.scores.st]) : A(0);
      go[t] = v ? to_acc<A>(g[t * a.direction.st]) : A(0);
      mo[t] = v ? A(1) : A(0);
      s_watch.add(so[t]);
      g_watch.add(go[t]);
    }
    s_watch.report(a, NONFINITE_SCORES);
    g_watch.report(a, NONFINITE_DIRECTION);
  }
}

// u_i = sum_j <g_i, d_ij> d_ij with d_ij = D_ij / max(||D_ij||, DELTA), D_ij = (s_i - s_j) m_i m_j:
// one pass over (j, t) for the coefficients <g_i, D_ij> / max(||D_ij||, DELTA)^2, one to accumulate.
// No [B, B, T] tensor: O(B T) memory traffic per row, O(B^2 T) work per batch.
template <class A> void iat_direction_row(const ForwardArgs& a, int64_t i, A* u, A* coef) {
  constexpr int64_t N = LANES<A>;
  const int64_t B = a.B, T = a.T;
  const A* S_ = static_cast<const A*>(a.iat_scores);
  const A* G_ = static_cast<const A*>(a.iat_grad);
  const A* M_ = static_cast<const A*>(a.iat_mask);
  const A* si = S_ + i * T;
  const A* gi = G_ + i * T;
  const A* mi = M_ + i * T;
  for (int64_t j = 0; j < B; ++j) {
    coef[j] = 0;
    if (j == i) continue;  // D_ii = 0
    const A* sj = S_ + j * T;
    const A* mj = M_ + j * T;
    Vec<A> sq{}, gd{};
    int64_t t = 0;
    for (; t + N <= T; t += N) {
      const Vec<A> d = load(mi + t) * load(mj + t) * (load(si + t) - load(sj + t));
      sq += d * d;
      gd += load(gi + t) * d;
    }
    A sq_s = hsum<A>(sq), gd_s = hsum<A>(gd);
    for (; t < T; ++t) {
      const A d = mi[t] * mj[t] * (si[t] - sj[t]);
      sq_s += d * d;
      gd_s += gi[t] * d;
    }
    const A den = max_of(static_cast<A>(std::sqrt(sq_s)), static_cast<A>(DELTA));
    coef[j] = (gd_s / den) / den;
  }
  for (int64_t t = 0; t < T; ++t) u[t] = 0;
  for (int64_t j = 0; j < B; ++j) {
    if (coef[j] == 0) continue;
    const A* sj = S_ + j * T;
    const A* mj = M_ + j * T;
    const Vec<A> c = splat<A>(coef[j]);
    int64_t t = 0;
    for (; t + N <= T; t += N) store(u + t, load(u + t) + c * load(mj + t) * (load(si + t) - load(sj + t)));
    for (; t < T; ++t) u[t] += coef[j] * mj[t] * (si[t] - sj[t]);
  }
  for (int64_t t = 0; t < T; ++t) u[t] *= mi[t];
}

// r of row b, zero at padded positions. coef: [B] scratch (iAT).
template <class S> void perturbation_row(const ForwardArgs& a, int64_t b, Acc<S>* r, Acc<S>* coef) {
  using A = Acc<S>;
  const int64_t T = a.T;
  if (a.kind == KIND_NORMALIZE) {
    const S* d = static_cast<const S*>(a.direction.data) + b * a.direction.sb;
    const bool* m = mask_row(a, b);
    FiniteWatch<A> watch;  // padded positions hold 0 in r
    for (int64_t t = 0; t < T; ++t) {
      r[t] = is_valid(m, a.mask_st, t) ? to_acc<A>(d[t * a.direction.st]) : A(0);
      watch.add(r[t]);
    }
    watch.report(a, NONFINITE_DIRECTION);
  } else {
    iat_direction_row<A>(a, b, r, coef);
  }
  normalize_row<A>(r, T, a.eps);
}

template <class S> void perturbation_rows(const ForwardArgs& a, int64_t begin, int64_t end) {
  using A = Acc<S>;
  Scratch scratch(Scratch::bytes_of<A>(a.T) + Scratch::bytes_of<A>(a.B));
  A* r = scratch.take<A>(a.T);
  A* coef = scratch.take<A>(a.B);
  for (int64_t b = begin; b < end; ++b) {
    // AT/RP do not read the scores (iAT checks them in iat_prepare), but the op's contract is the same
    if (a.kind == KIND_NORMALIZE) check_row_finite<S>(a, a.scores, b, NONFINITE_SCORES);
    perturbation_row<S>(a, b, r, coef);
    S* out = static_cast<S*>(a.perturbation) + b * a.T;
    for (int64_t t = 0; t < a.T; ++t) out[t] = from_acc<S>(r[t]);
  }
}

// ---- forward ------------------------------------------------------------------------------------------

// attention_acc[b] = masked_softmax(scores[b] + r[b]); also written to `attention` in the output dtype.
// A fully masked row gives zeros.
template <class S> void attention_row(const ForwardArgs& a, int64_t b, Acc<S>* r, Acc<S>* coef) {
  using A = Acc<S>;
  const int64_t T = a.T;
  if (a.kind != 0) perturbation_row<S>(a, b, r, coef);
  const S* s = static_cast<const S*>(a.scores.data) + b * a.scores.sb;
  const bool* m = mask_row(a, b);
  A* z = static_cast<A*>(a.attention_acc) + b * T;
  A row_max = -static_cast<A>(INFINITY);
  bool any = false;
  FiniteWatch<A> watch;
  for (int64_t t = 0; t < T; ++t) {
    if (!is_valid(m, a.mask_st, t)) continue;
    A v = to_acc<A>(s[t * a.scores.st]);
    watch.add(v);
    if (a.kind != 0) v += r[t];
    z[t] = v;
    row_max = max_of(row_max, v);
    any = true;
  }
  watch.report(a, NONFINITE_SCORES);
  if (!any) {
    for (int64_t t = 0; t < T; ++t) z[t] = 0;
  } else {
    double sum = 0;  // T terms: summing in double costs nothing and keeps the float32 error at one rounding
    for (int64_t t = 0; t < T; ++t) {
      if (is_valid(m, a.mask_st, t)) {
        z[t] = std::exp(z[t] - row_max);
        sum += z[t];
      } else {
        z[t] = 0;
      }
    }
    const A den = max_of(static_cast<A>(sum), tiny_of(A(0)));
    for (int64_t t = 0; t < T; ++t) z[t] = z[t] / den;
  }
  if (a.attention != a.attention_acc) {
    S* out = static_cast<S*>(a.attention) + b * T;
    for (int64_t t = 0; t < T; ++t) out[t] = from_acc<S>(z[t]);
  }
}

template <class S, class A> void store_row(S* out, const A* x, int64_t n) {
  constexpr int64_t N = LANES<A>;
  int64_t k = 0;
  for (; k + N <= n; k += N) store(out + k, load(x + k));
  for (; k < n; ++k) out[k] = from_acc<S>(x[k]);
}

// Rows of h this many valid positions ahead are prefetched. Reading h position after position is one
// sequential stream; measured in the op on a 16 MB h: 7-13% faster with the hint than without, within
// 1.2-1.3x of a plain h.sum(); sweeping two or four positions at a time was 1.3x slower.
constexpr int64_t PREFETCH_ROWS = 16;
constexpr int64_t CACHE_LINE = 64;

// context[b, k0:k0+kc] = sum_t a_t h[b, t, k0:k0+kc] with h read along H, position after position.
// Positions with a_t == 0 (padding, fully masked rows) are skipped, so h there is never read.
template <class S>
void context_along_h(const ForwardArgs& a, int64_t b, int64_t k0, int64_t kc, int64_t* idx, Acc<S>* acc) {
  using A = Acc<S>;
  constexpr int64_t N = LANES<A>;
  constexpr int64_t LINE = CACHE_LINE / sizeof(S) > N ? CACHE_LINE / sizeof(S) : N;  // elements per prefetch
  const int64_t T = a.T;
  const A* att = static_cast<const A*>(a.attention_acc) + b * T;
  int64_t n = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (att[t] != 0) idx[n++] = t;
  }
  for (int64_t k = 0; k < kc; ++k) acc[k] = 0;
  const S* hb = static_cast<const S*>(a.h.data) + b * a.h.sb + k0;
  const int64_t st = a.h.st;
  for (int64_t q = 0; q < n; ++q) {
    const S* p = hb + idx[q] * st;
    const S* ahead = q + PREFETCH_ROWS < n ? hb + idx[q + PREFETCH_ROWS] * st : p;
    const A at = att[idx[q]];
    const Vec<A> v = splat<A>(at);
    int64_t k = 0;
    for (; k + LINE <= kc; k += LINE) {
      __builtin_prefetch(ahead + k);
      for (int64_t j = 0; j < LINE; j += N) store(acc + k + j, load(acc + k + j) + v * load(p + k + j));
    }
    for (; k + N <= kc; k += N) store(acc + k, load(acc + k) + v * load(p + k));
    for (; k < kc; ++k) acc[k] += at * to_acc<A>(p[k]);
  }
  store_row(static_cast<S*>(a.context) + b * a.H + k0, acc, kc);
}

// The same with h read along T (h[b, t, k] at h + b sb + k sh + t): one dot product over t per feature,
// four features per sweep. Lanes with a_t == 0 are selected away, so non-finite h at padding is harmless.
template <class S> void context_along_t(const ForwardArgs& a, int64_t b, int64_t k0, int64_t kc) {
  using A = Acc<S>;
  constexpr int64_t N = LANES<A>;
  const int64_t T = a.T;
  const A* att = static_cast<const A*>(a.attention_acc) + b * T;
  int64_t lo = 0, hi = T;  // the span of positions with a_t != 0
  while (lo < hi && att[lo] == 0) ++lo;
  while (hi > lo && att[hi - 1] == 0) --hi;
  const S* hb = static_cast<const S*>(a.h.data) + b * a.h.sb;
  const int64_t sh = a.h.sh;
  S* out = static_cast<S*>(a.context) + b * a.H + k0;
  const Vec<A> zero{};
  int64_t k = 0;
  for (; k + 4 <= kc; k += 4) {
    const S* q0 = hb + (k0 + k) * sh;
    const S* q1 = q0 + sh;
    const S* q2 = q1 + sh;
    const S* q3 = q2 + sh;
    Vec<A> c0{}, c1{}, c2{}, c3{};
    int64_t t = lo;
    for (; t + N <= hi; t += N) {
      const Vec<A> at = load(att + t);
      const auto nz = at != zero;
      c0 += nz ? at * load(q0 + t) : zero;
      c1 += nz ? at * load(q1 + t) : zero;
      c2 += nz ? at * load(q2 + t) : zero;
      c3 += nz ? at * load(q3 + t) : zero;
    }
    A s0 = hsum<A>(c0), s1 = hsum<A>(c1), s2 = hsum<A>(c2), s3 = hsum<A>(c3);
    for (; t < hi; ++t) {
      if (att[t] == 0) continue;
      s0 += att[t] * to_acc<A>(q0[t]);
      s1 += att[t] * to_acc<A>(q1[t]);
      s2 += att[t] * to_acc<A>(q2[t]);
      s3 += att[t] * to_acc<A>(q3[t]);
    }
    out[k] = from_acc<S>(s0);
    out[k + 1] = from_acc<S>(s1);
    out[k + 2] = from_acc<S>(s2);
    out[k + 3] = from_acc<S>(s3);
  }
  for (; k < kc; ++k) {
    const S* q = hb + (k0 + k) * sh;
    Vec<A> c{};
    int64_t t = lo;
    for (; t + N <= hi; t += N) {
      const Vec<A> at = load(att + t);
      c += (at != zero) ? at * load(q + t) : zero;
    }
    A s = hsum<A>(c);
    for (; t < hi; ++t) {
      if (att[t] != 0) s += att[t] * to_acc<A>(q[t]);
    }
    out[k] = from_acc<S>(s);
  }
}

template <class S>
void context_part(const ForwardArgs& a, int64_t b, int64_t k0, int64_t kc, int64_t* idx, Acc<S>* acc) {
  if (a.h.along_t) {
    context_along_t<S>(a, b, k0, kc);
  } else {
    context_along_h<S>(a, b, k0, kc, idx, acc);
  }
}

template <class S> void attention_rows(const ForwardArgs& a, int64_t begin, int64_t end) {
  using A = Acc<S>;
  Scratch scratch(Scratch::bytes_of<A>(a.T) + Scratch::bytes_of<A>(a.B));
  A* r = scratch.take<A>(a.T);
  A* coef = scratch.take<A>(a.B);
  for (int64_t b = begin; b < end; ++b) attention_row<S>(a, b, r, coef);
}

template <class S> void context_items(const ForwardArgs& a, int64_t begin, int64_t end) {
  using A = Acc<S>;
  const int64_t chunk = a.split.chunk, n_chunks = a.split.n_chunks;
  Scratch scratch(Scratch::bytes_of<int64_t>(a.T) + Scratch::bytes_of<A>(chunk));
  int64_t* idx = scratch.take<int64_t>(a.T);
  A* acc = scratch.take<A>(chunk);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / n_chunks, k0 = (i % n_chunks) * chunk;
    const int64_t kc = a.H - k0 < chunk ? a.H - k0 : chunk;
    context_part<S>(a, b, k0, kc, idx, acc);
  }
}

template <class S> void forward_rows(const ForwardArgs& a, int64_t begin, int64_t end) {
  using A = Acc<S>;
  Scratch scratch(Scratch::bytes_of<A>(a.T) + Scratch::bytes_of<A>(a.B) + Scratch::bytes_of<int64_t>(a.T) +
                  Scratch::bytes_of<A>(a.H));
  A* r = scratch.take<A>(a.T);
  A* coef = scratch.take<A>(a.B);
  int64_t* idx = scratch.take<int64_t>(a.T);
  A* acc = scratch.take<A>(a.H);
  for (int64_t b = begin; b < end; ++b) {
    attention_row<S>(a, b, r, coef);
    context_part<S>(a, b, 0, a.H, idx, acc);
  }
}

// ---- backward (r constant) ----------------------------------------------------------------------------
//   da_t = <dc, h_t> + grad_attention_t,  dscores_t = a_t (da_t - sum_u a_u da_u),  dh_t = a_t dc

template <class S, class A> void load_strided(A* out, const S* p, int64_t st, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_acc<A>(p[i * st]);
}

// grad_scores[b] from the attention and da = <dc, h_t> (before grad_attention is added).
template <class S> void finish_row(const BackwardArgs& a, int64_t b, const Acc<S>* att, Acc<S>* da) {
  using A = Acc<S>;
  const int64_t T = a.T;
  const S* ga = a.grad_attention.data ? static_cast<const S*>(a.grad_attention.data) + b * a.grad_attention.sb : nullptr;
  double weighted = 0;  // sum_t a_t da_t
  for (int64_t t = 0; t < T; ++t) {
    if (att[t] == 0) continue;
    if (ga) da[t] += to_acc<A>(ga[t * a.grad_attention.st]);
    weighted += static_cast<double>(att[t]) * da[t];
  }
  const A w = static_cast<A>(weighted);
  S* out = static_cast<S*>(a.grad_scores) + b * T;
  for (int64_t t = 0; t < T; ++t) out[t] = from_acc<S>(att[t] == 0 ? A(0) : att[t] * (da[t] - w));
}

// Features [k0, k0 + kc) of row b, h read along H: one sweep over h_t computes <dc, h_t> and writes
// dh_t = a_t dc. Positions with a_t == 0 get dh_t = 0 and h_t is not read. (Non-temporal stores for a
// large grad_h were measured: 12-40% faster when its memory is reused from the heap, 2.7x slower when it
// is freshly faulted in; plain stores are the safe choice.)
template <class S>
void backward_along_h(const BackwardArgs& a, int64_t b, int64_t k0, int64_t kc, const Acc<S>* att, const Acc<S>* dc,
                      Acc<S>* da) {
  using A = Acc<S>;
  constexpr int64_t N = LANES<A>;
  const S* hb = static_cast<const S*>(a.h.data) + b * a.h.sb + k0;
  S* gb = static_cast<S*>(a.grad_h) + b * a.grad_h_sb + k0;
  for (int64_t t = 0; t < a.T; ++t) {
    S* out = gb + t * a.grad_h_st;
    const A at = att[t];
    if (at == 0) {
      std::memset(static_cast<void*>(out), 0, static_cast<size_t>(kc) * sizeof(S));
      da[t] = 0;
      continue;
    }
    const S* p = hb + t * a.h.st;
    const Vec<A> va = splat<A>(at);
    Vec<A> s0{}, s1{};
    int64_t k = 0;
    for (; k + 2 * N <= kc; k += 2 * N) {
      const Vec<A> d0 = load(dc + k), d1 = load(dc + k + N);
      s0 += d0 * load(p + k);
      s1 += d1 * load(p + k + N);
      store(out + k, va * d0);
      store(out + k + N, va * d1);
    }
    for (; k + N <= kc; k += N) {
      const Vec<A> d0 = load(dc + k);
      s0 += d0 * load(p + k);
      store(out + k, va * d0);
    }
    A s = hsum<A>(s0 + s1);
    for (; k < kc; ++k) {
      s += dc[k] * to_acc<A>(p[k]);
      out[k] = from_acc<S>(at * dc[k]);
    }
    da[t] = s;
  }
}

// The same with h (and grad_h) along T: for four features at a time, da += dc_k h_k and dh_k = a dc_k.
template <class S>
void backward_along_t(const BackwardArgs& a, int64_t b, int64_t k0, int64_t kc, const Acc<S>* att, const Acc<S>* dc,
                      Acc<S>* da) {
  using A = Acc<S>;
  constexpr int64_t N = LANES<A>;
  const int64_t T = a.T;
  const S* hb = static_cast<const S*>(a.h.data) + b * a.h.sb;
  S* gb = static_cast<S*>(a.grad_h) + b * a.grad_h_sb;
  const int64_t sh = a.h.sh, gsh = a.grad_h_sh;
  for (int64_t t = 0; t < T; ++t) da[t] = 0;
  int64_t k = 0;
  for (; k + 4 <= kc; k += 4) {
    const S* q0 = hb + (k0 + k) * sh;
    const S* q1 = q0 + sh;
    const S* q2 = q1 + sh;
    const S* q3 = q2 + sh;
    S* o0 = gb + (k0 + k) * gsh;
    S* o1 = o0 + gsh;
    S* o2 = o1 + gsh;
    S* o3 = o2 + gsh;
    const A d0 = dc[k], d1 = dc[k + 1], d2 = dc[k + 2], d3 = dc[k + 3];
    const Vec<A> v0 = splat<A>(d0), v1 = splat<A>(d1), v2 = splat<A>(d2), v3 = splat<A>(d3);
    int64_t t = 0;
    for (; t + N <= T; t += N) {
      store(da + t, load(da + t) + (v0 * load(q0 + t) + v1 * load(q1 + t)) + (v2 * load(q2 + t) + v3 * load(q3 + t)));
      const Vec<A> at = load(att + t);
      store(o0 + t, at * v0);
      store(o1 + t, at * v1);
      store(o2 + t, at * v2);
      store(o3 + t, at * v3);
    }
    for (; t < T; ++t) {
      da[t] += (d0 * to_acc<A>(q0[t]) + d1 * to_acc<A>(q1[t])) + (d2 * to_acc<A>(q2[t]) + d3 * to_acc<A>(q3[t]));
      o0[t] = from_acc<S>(att[t] * d0);
      o1[t] = from_acc<S>(att[t] * d1);
      o2[t] = from_acc<S>(att[t] * d2);
      o3[t] = from_acc<S>(att[t] * d3);
    }
  }
  for (; k < kc; ++k) {
    const S* q = hb + (k0 + k) * sh;
    S* o = gb + (k0 + k) * gsh;
    const A d = dc[k];
    const Vec<A> v = splat<A>(d);
    int64_t t = 0;
    for (; t + N <= T; t += N) {
      store(da + t, load(da + t) + v * load(q + t));
      store(o + t, load(att + t) * v);
    }
    for (; t < T; ++t) {
      da[t] += d * to_acc<A>(q[t]);
      o[t] = from_acc<S>(att[t] * d);
    }
  }
}

template <class S> void backward_items(const BackwardArgs& a, int64_t begin, int64_t end) {
  using A = Acc<S>;
  const int64_t T = a.T, chunk = a.split.chunk, n_chunks = a.split.n_chunks;
  Scratch scratch(2 * Scratch::bytes_of<A>(T) + Scratch::bytes_of<A>(chunk));
  A* att = scratch.take<A>(T);
  A* da_own = scratch.take<A>(T);
  A* dc = scratch.take<A>(chunk);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / n_chunks, c = i % n_chunks, k0 = c * chunk;
    const int64_t kc = a.H - k0 < chunk ? a.H - k0 : chunk;
    load_strided(att, static_cast<const S*>(a.attention.data) + b * a.attention.sb, a.attention.st, T);
    load_strided(dc, static_cast<const S*>(a.grad_context.data) + b * a.grad_context.sb + k0 * a.grad_context.st,
                 a.grad_context.st, kc);
    A* da = n_chunks == 1 ? da_own : static_cast<A*>(a.partial_da) + i * T;
    if (a.h.along_t) {
      backward_along_t<S>(a, b, k0, kc, att, dc, da);
    } else {
      backward_along_h<S>(a, b, k0, kc, att, dc, da);
    }
    if (n_chunks == 1) finish_row<S>(a, b, att, da);
  }
}

template <class S> void backward_finish_rows(const BackwardArgs& a, int64_t begin, int64_t end) {
  using A = Acc<S>;
  const int64_t T = a.T, n_chunks = a.split.n_chunks;
  Scratch scratch(2 * Scratch::bytes_of<A>(T));
  A* att = scratch.take<A>(T);
  A* da = scratch.take<A>(T);
  for (int64_t b = begin; b < end; ++b) {
    load_strided(att, static_cast<const S*>(a.attention.data) + b * a.attention.sb, a.attention.st, T);
    const A* part = static_cast<const A*>(a.partial_da) + b * n_chunks * T;
    for (int64_t t = 0; t < T; ++t) da[t] = part[t];
    for (int64_t c = 1; c < n_chunks; ++c) {
      for (int64_t t = 0; t < T; ++t) da[t] += part[c * T + t];
    }
    finish_row<S>(a, b, att, da);
  }
}

template <class S>
constexpr Kernels KERNELS = {
    &iat_prepare<S>, &perturbation_rows<S>, &attention_rows<S>,       &context_items<S>,
    &forward_rows<S>, &backward_items<S>,   &backward_finish_rows<S>,
};

inline const Kernels& table(Dtype dtype) {
  switch (dtype) {
    case Dtype::f64: return KERNELS<double>;
    case Dtype::f16: return KERNELS<Half>;
    case Dtype::bf16: return KERNELS<BFloat16>;
    case Dtype::f32:
    default: return KERNELS<float>;
  }
}

}  // namespace fused_attn_at::cpu::FAA_ISA
