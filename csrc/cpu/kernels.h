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

// The sweeps over h below serve NB branches that share h: NB = 1 is the op (the fields of the args), NB = 2 the
// pair op, whose branch 1 is the clean one (the clean_* fields). Each branch has its own attention and
// context (forward) or cotangents (backward); h is read once for all of them.

// The [B, T] attention (accumulation dtype) of each branch, row b.
template <class A, int NB> inline void branch_attention(const ForwardArgs& a, int64_t b, const A** att) {
  att[0] = static_cast<const A*>(a.attention_acc) + b * a.T;
  if constexpr (NB == 2) att[1] = static_cast<const A*>(a.clean_attention_acc) + b * a.T;
}

template <class S, int NB> inline S* branch_context(const ForwardArgs& a, int64_t j, int64_t b, int64_t k0) {
  return static_cast<S*>(j == 0 ? a.context : a.clean_context) + b * a.H + k0;
}

// context[b, k0:k0+kc] = sum_t a_t h[b, t, k0:k0+kc] with h read along H, position after position, for each
// branch (acc: NB * kc scratch). Positions where every branch has a_t == 0 (padding, fully masked rows) are
// skipped, so h there is never read.
template <class S, int NB>
void context_along_h(const ForwardArgs& a, int64_t b, int64_t k0, int64_t kc, int64_t* idx, Acc<S>* acc) {
  using A = Acc<S>;
  constexpr int64_t N = LANES<A>;
  constexpr int64_t LINE = CACHE_LINE / sizeof(S) > N ? CACHE_LINE / sizeof(S) : N;  // elements per prefetch
  const int64_t T = a.T;
  const A* att[NB];
  branch_attention<A, NB>(a, b, att);
  int64_t n = 0;
  for (int64_t t = 0; t < T; ++t) {
    bool any = att[0][t] != 0;
    if constexpr (NB == 2) any = any || att[1][t] != 0;
    if (any) idx[n++] = t;
  }
  for (int64_t k = 0; k < NB * kc; ++k) acc[k] = 0;
  const S* hb = static_cast<const S*>(a.h.data) + b * a.h.sb + k0;
  const int64_t st = a.h.st;
  for (int64_t q = 0; q < n; ++q) {
    const S* p = hb + idx[q] * st;
    const S* ahead = q + PREFETCH_ROWS < n ? hb + idx[q + PREFETCH_ROWS] * st : p;
    A at[NB];
    Vec<A> v[NB];
    for (int j = 0; j < NB; ++j) {
      at[j] = att[j][idx[q]];
      v[j] = splat<A>(at[j]);
    }
    int64_t k = 0;
    for (; k + LINE <= kc; k += LINE) {
      __builtin_prefetch(ahead + k);
      for (int64_t i = 0; i < LINE; i += N) {
        const Vec<A> x = load(p + k + i);
        for (int j = 0; j < NB; ++j) {
          A* c = acc + j * kc + k + i;
          store(c, load(c) + v[j] * x);
        }
      }
    }
    for (; k + N <= kc; k += N) {
      const Vec<A> x = load(p + k);
      for (int j = 0; j < NB; ++j) {
        A* c = acc + j * kc + k;
        store(c, load(c) + v[j] * x);
      }
    }
    for (; k < kc; ++k) {
      const A x = to_acc<A>(p[k]);
      for (int j = 0; j < NB; ++j) acc[j * kc + k] += at[j] * x;
    }
  }
  for (int j = 0; j < NB; ++j) store_row(branch_context<S, NB>(a, j, b, k0), acc + j * kc, kc);
}

// The same with h read along T (h[b, t, k] at h + b sb + k sh + t): one dot product over t per feature and
// branch, four features per sweep. Lanes with a_t == 0 are selected away, so non-finite h at padding is
// harmless.
template <class S, int NB> void context_along_t(const ForwardArgs& a, int64_t b, int64_t k0, int64_t kc) {
  using A = Acc<S>;
  constexpr int64_t N = LANES<A>;
  const int64_t T = a.T;
  const A* att[NB];
  branch_attention<A, NB>(a, b, att);
  auto any_at = [&](int64_t t) {
    bool any = att[0][t] != 0;
    if constexpr (NB == 2) any = any || att[1][t] != 0;
    return any;
  };
  int64_t lo = 0, hi = T;  // the span of positions with a_t != 0 in some branch
  while (lo < hi && !any_at(lo)) ++lo;
  while (hi > lo && !any_at(hi - 1)) --hi;
  const S* hb = static_cast<const S*>(a.h.data) + b * a.h.sb;
  const int64_t sh = a.h.sh;
  S* out[NB];
  for (int j = 0; j < NB; ++j) out[j] = branch_context<S, NB>(a, j, b, k0);
  const Vec<A> zero{};
  int64_t k = 0;
  for (; k + 4 <= kc; k += 4) {
    const S* q[4];
    q[0] = hb + (k0 + k) * sh;
    for (int i = 1; i < 4; ++i) q[i] = q[i - 1] + sh;
    Vec<A> c[NB][4] = {};
    int64_t t = lo;
    for (; t + N <= hi; t += N) {
      const Vec<A> x0 = load(q[0] + t), x1 = load(q[1] + t), x2 = load(q[2] + t), x3 = load(q[3] + t);
      for (int j = 0; j < NB; ++j) {
        const Vec<A> at = load(att[j] + t);
        const auto nz = at != zero;
        c[j][0] += nz ? at * x0 : zero;
        c[j][1] += nz ? at * x1 : zero;
        c[j][2] += nz ? at * x2 : zero;
        c[j][3] += nz ? at * x3 : zero;
      }
    }
    A s[NB][4];
    for (int j = 0; j < NB; ++j) {
      for (int i = 0; i < 4; ++i) s[j][i] = hsum<A>(c[j][i]);
    }
    for (; t < hi; ++t) {
      for (int j = 0; j < NB; ++j) {
        if (att[j][t] == 0) continue;
        for (int i = 0; i < 4; ++i) s[j][i] += att[j][t] * to_acc<A>(q[i][t]);
      }
    }
    for (int j = 0; j < NB; ++j) {
      for (int i = 0; i < 4; ++i) out[j][k + i] = from_acc<S>(s[j][i]);
    }
  }
  for (; k < kc; ++k) {
    const S* q = hb + (k0 + k) * sh;
    Vec<A> c[NB] = {};
    int64_t t = lo;
    for (; t + N <= hi; t += N) {
      const Vec<A> x = load(q + t);
      for (int j = 0; j < NB; ++j) {
        const Vec<A> at = load(att[j] + t);
        c[j] += (at != zero) ? at * x : zero;
      }
    }
    A s[NB];
    for (int j = 0; j < NB; ++j) s[j] = hsum<A>(c[j]);
    for (; t < hi; ++t) {
      for (int j = 0; j < NB; ++j) {
        if (att[j][t] != 0) s[j] += att[j][t] * to_acc<A>(q[t]);
      }
    }
    for (int j = 0; j < NB; ++j) out[j][k] = from_acc<S>(s[j]);
  }
}

template <class S, int NB>
void context_part(const ForwardArgs& a, int64_t b, int64_t k0, int64_t kc, int64_t* idx, Acc<S>* acc) {
  if (a.h.along_t) {
    context_along_t<S, NB>(a, b, k0, kc);
  } else {
    context_along_h<S, NB>(a, b, k0, kc, idx, acc);
  }
}

// The pair's clean branch as the args of a single (unperturbed) attention_row.
inline ForwardArgs clean_branch(const ForwardArgs& a) {
  ForwardArgs c = a;
  c.kind = 0;
  c.attention_acc = a.clean_attention_acc;
  c.attention = a.clean_attention;
  c.context = a.clean_context;
  return c;
}

template <class S, int NB> void attention_rows(const ForwardArgs& a, int64_t begin, int64_t end) {
  using A = Acc<S>;
  Scratch scratch(Scratch::bytes_of<A>(a.T) + Scratch::bytes_of<A>(a.B));
  A* r = scratch.take<A>(a.T);
  A* coef = scratch.take<A>(a.B);
  const ForwardArgs clean = NB == 2 ? clean_branch(a) : ForwardArgs{};
  for (int64_t b = begin; b < end; ++b) {
    attention_row<S>(a, b, r, coef);
    if constexpr (NB == 2) attention_row<S>(clean, b, r, coef);
  }
}

template <class S, int NB> void context_items(const ForwardArgs& a, int64_t begin, int64_t end) {
  using A = Acc<S>;
  const int64_t chunk = a.split.chunk, n_chunks = a.split.n_chunks;
  Scratch scratch(Scratch::bytes_of<int64_t>(a.T) + Scratch::bytes_of<A>(NB * chunk));
  int64_t* idx = scratch.take<int64_t>(a.T);
  A* acc = scratch.take<A>(NB * chunk);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / n_chunks, k0 = (i % n_chunks) * chunk;
    const int64_t kc = a.H - k0 < chunk ? a.H - k0 : chunk;
    context_part<S, NB>(a, b, k0, kc, idx, acc);
  }
}

template <class S, int NB> void forward_rows(const ForwardArgs& a, int64_t begin, int64_t end) {
  using A = Acc<S>;
  Scratch scratch(Scratch::bytes_of<A>(a.T) + Scratch::bytes_of<A>(a.B) + Scratch::bytes_of<int64_t>(a.T) +
                  Scratch::bytes_of<A>(NB * a.H));
  A* r = scratch.take<A>(a.T);
  A* coef = scratch.take<A>(a.B);
  int64_t* idx = scratch.take<int64_t>(a.T);
  A* acc = scratch.take<A>(NB * a.H);
  const ForwardArgs clean = NB == 2 ? clean_branch(a) : ForwardArgs{};
  for (int64_t b = begin; b < end; ++b) {
    attention_row<S>(a, b, r, coef);
    if constexpr (NB == 2) attention_row<S>(clean, b, r, coef);
    context_part<S, NB>(a, b, 0, a.H, idx, acc);
  }
}

// ---- backward (r constant) ----------------------------------------------------------------------------
//   da_t = <dc, h_t> + grad_attention_t,  dscores_t = a_t (da_t - sum_u a_u da_u),  dh_t = a_t dc
// With NB = 2 branches (the pair): dscores and dh are the sums over the branches, and h is swept once for
// both. With DH = false (attention_scores_grad) dh is neither computed nor written.

template <class S, class A> void load_strided(A* out, const S* p, int64_t st, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_acc<A>(p[i * st]);
}

inline const RowsView& branch_grad_context(const BackwardArgs& a, int j) {
  return j == 0 ? a.grad_context : a.clean_grad_context;
}
inline const RowsView& branch_grad_attention(const BackwardArgs& a, int j) {
  return j == 0 ? a.grad_attention : a.clean_grad_attention;
}
inline const RowsView& branch_attention(const BackwardArgs& a, int j) { return j == 0 ? a.attention : a.clean_attention; }

// grad_scores[b] from each branch's attention and da = <dc, h_t> (before grad_attention is added).
template <class S, int NB> void finish_row(const BackwardArgs& a, int64_t b, const Acc<S>* const* att, Acc<S>* const* da) {
  using A = Acc<S>;
  const int64_t T = a.T;
  A w[NB];
  for (int j = 0; j < NB; ++j) {
    const RowsView& gav = branch_grad_attention(a, j);
    const S* ga = gav.data ? static_cast<const S*>(gav.data) + b * gav.sb : nullptr;
    double weighted = 0;  // sum_t a_t da_t
    for (int64_t t = 0; t < T; ++t) {
      if (att[j][t] == 0) continue;
      if (ga) da[j][t] += to_acc<A>(ga[t * gav.st]);
      weighted += static_cast<double>(att[j][t]) * da[j][t];
    }
    w[j] = static_cast<A>(weighted);
  }
  S* out = static_cast<S*>(a.grad_scores) + b * T;
  for (int64_t t = 0; t < T; ++t) {
    A g = att[0][t] == 0 ? A(0) : att[0][t] * (da[0][t] - w[0]);
    if constexpr (NB == 2) g += att[1][t] == 0 ? A(0) : att[1][t] * (da[1][t] - w[1]);
    out[t] = from_acc<S>(g);
  }
}

// Features [k0, k0 + kc) of row b, h read along H: one sweep over h_t computes <dc, h_t> of each branch and
// (DH) writes dh_t = sum_j a_jt dc_j. Positions where every branch has a_t == 0 get dh_t = 0 and h_t is not
// read. (Non-temporal stores for a large grad_h were measured: 12-40% faster when its memory is reused from
// the heap, 2.7x slower when it is freshly faulted in; plain stores are the safe choice.)
template <class S, int NB, bool DH>
void backward_along_h(const BackwardArgs& a, int64_t b, int64_t k0, int64_t kc, const Acc<S>* const* att,
                      const Acc<S>* const* dc, Acc<S>* const* da) {
  using A = Acc<S>;
  constexpr int64_t N = LANES<A>;
  const S* hb = static_cast<const S*>(a.h.data) + b * a.h.sb + k0;
  S* gb = DH ? static_cast<S*>(a.grad_h) + b * a.grad_h_sb + k0 : nullptr;
  for (int64_t t = 0; t < a.T; ++t) {
    S* out = DH ? gb + t * a.grad_h_st : nullptr;
    A at[NB];
    bool any = false;
    for (int j = 0; j < NB; ++j) {
      at[j] = att[j][t];
      any = any || at[j] != 0;
    }
    if (!any) {
      if constexpr (DH) std::memset(static_cast<void*>(out), 0, static_cast<size_t>(kc) * sizeof(S));
      for (int j = 0; j < NB; ++j) da[j][t] = 0;
      continue;
    }
    const S* p = hb + t * a.h.st;
    Vec<A> va[NB], s0[NB], s1[NB];
    for (int j = 0; j < NB; ++j) {
      va[j] = splat<A>(at[j]);
      s0[j] = Vec<A>{};
      s1[j] = Vec<A>{};
    }
    int64_t k = 0;
    for (; k + 2 * N <= kc; k += 2 * N) {
      const Vec<A> x0 = load(p + k), x1 = load(p + k + N);
      Vec<A> o0{}, o1{};
      for (int j = 0; j < NB; ++j) {
        const Vec<A> d0 = load(dc[j] + k), d1 = load(dc[j] + k + N);
        s0[j] += d0 * x0;
        s1[j] += d1 * x1;
        if constexpr (DH) {
          o0 = j == 0 ? va[j] * d0 : o0 + va[j] * d0;
          o1 = j == 0 ? va[j] * d1 : o1 + va[j] * d1;
        }
      }
      if constexpr (DH) {
        store(out + k, o0);
        store(out + k + N, o1);
      }
    }
    for (; k + N <= kc; k += N) {
      const Vec<A> x0 = load(p + k);
      Vec<A> o0{};
      for (int j = 0; j < NB; ++j) {
        const Vec<A> d0 = load(dc[j] + k);
        s0[j] += d0 * x0;
        if constexpr (DH) o0 = j == 0 ? va[j] * d0 : o0 + va[j] * d0;
      }
      if constexpr (DH) store(out + k, o0);
    }
    A s[NB];
    for (int j = 0; j < NB; ++j) s[j] = hsum<A>(s0[j] + s1[j]);
    for (; k < kc; ++k) {
      const A x = to_acc<A>(p[k]);
      A o = 0;
      for (int j = 0; j < NB; ++j) {
        s[j] += dc[j][k] * x;
        if constexpr (DH) o = j == 0 ? at[j] * dc[j][k] : o + at[j] * dc[j][k];
      }
      if constexpr (DH) out[k] = from_acc<S>(o);
    }
    for (int j = 0; j < NB; ++j) da[j][t] = s[j];
  }
}

// The same with h (and grad_h) along T: for four features at a time, da_j += dc_jk h_k and dh_k = sum_j a_j dc_jk.
template <class S, int NB, bool DH>
void backward_along_t(const BackwardArgs& a, int64_t b, int64_t k0, int64_t kc, const Acc<S>* const* att,
                      const Acc<S>* const* dc, Acc<S>* const* da) {
  using A = Acc<S>;
  constexpr int64_t N = LANES<A>;
  const int64_t T = a.T;
  const S* hb = static_cast<const S*>(a.h.data) + b * a.h.sb;
  S* gb = DH ? static_cast<S*>(a.grad_h) + b * a.grad_h_sb : nullptr;
  const int64_t sh = a.h.sh, gsh = a.grad_h_sh;
  for (int j = 0; j < NB; ++j) {
    for (int64_t t = 0; t < T; ++t) da[j][t] = 0;
  }
  int64_t k = 0;
  for (; k + 4 <= kc; k += 4) {
    const S* q[4];
    S* o[4] = {};
    q[0] = hb + (k0 + k) * sh;
    for (int i = 1; i < 4; ++i) q[i] = q[i - 1] + sh;
    if constexpr (DH) {
      o[0] = gb + (k0 + k) * gsh;
      for (int i = 1; i < 4; ++i) o[i] = o[i - 1] + gsh;
    }
    A d[NB][4];
    Vec<A> v[NB][4];
    for (int j = 0; j < NB; ++j) {
      for (int i = 0; i < 4; ++i) {
        d[j][i] = dc[j][k + i];
        v[j][i] = splat<A>(d[j][i]);
      }
    }
    int64_t t = 0;
    for (; t + N <= T; t += N) {
      const Vec<A> x0 = load(q[0] + t), x1 = load(q[1] + t), x2 = load(q[2] + t), x3 = load(q[3] + t);
      Vec<A> w[4] = {};
      for (int j = 0; j < NB; ++j) {
        store(da[j] + t, load(da[j] + t) + (v[j][0] * x0 + v[j][1] * x1) + (v[j][2] * x2 + v[j][3] * x3));
        if constexpr (DH) {
          const Vec<A> at = load(att[j] + t);
          for (int i = 0; i < 4; ++i) w[i] = j == 0 ? at * v[j][i] : w[i] + at * v[j][i];
        }
      }
      if constexpr (DH) {
        for (int i = 0; i < 4; ++i) store(o[i] + t, w[i]);
      }
    }
    for (; t < T; ++t) {
      const A x0 = to_acc<A>(q[0][t]), x1 = to_acc<A>(q[1][t]), x2 = to_acc<A>(q[2][t]), x3 = to_acc<A>(q[3][t]);
      A w[4] = {};
      for (int j = 0; j < NB; ++j) {
        da[j][t] += (d[j][0] * x0 + d[j][1] * x1) + (d[j][2] * x2 + d[j][3] * x3);
        if constexpr (DH) {
          for (int i = 0; i < 4; ++i) w[i] = j == 0 ? att[j][t] * d[j][i] : w[i] + att[j][t] * d[j][i];
        }
      }
      if constexpr (DH) {
        for (int i = 0; i < 4; ++i) o[i][t] = from_acc<S>(w[i]);
      }
    }
  }
  for (; k < kc; ++k) {
    const S* q = hb + (k0 + k) * sh;
    S* o = DH ? gb + (k0 + k) * gsh : nullptr;
    A d[NB];
    Vec<A> v[NB];
    for (int j = 0; j < NB; ++j) {
      d[j] = dc[j][k];
      v[j] = splat<A>(d[j]);
    }
    int64_t t = 0;
    for (; t + N <= T; t += N) {
      const Vec<A> x = load(q + t);
      Vec<A> w{};
      for (int j = 0; j < NB; ++j) {
        store(da[j] + t, load(da[j] + t) + v[j] * x);
        if constexpr (DH) w = j == 0 ? load(att[j] + t) * v[j] : w + load(att[j] + t) * v[j];
      }
      if constexpr (DH) store(o + t, w);
    }
    for (; t < T; ++t) {
      const A x = to_acc<A>(q[t]);
      A w = 0;
      for (int j = 0; j < NB; ++j) {
        da[j][t] += d[j] * x;
        if constexpr (DH) w = j == 0 ? att[j][t] * d[j] : w + att[j][t] * d[j];
      }
      if constexpr (DH) o[t] = from_acc<S>(w);
    }
  }
}

template <class S, int NB, bool DH> void backward_items(const BackwardArgs& a, int64_t begin, int64_t end) {
  using A = Acc<S>;
  const int64_t T = a.T, chunk = a.split.chunk, n_chunks = a.split.n_chunks;
  Scratch scratch(NB * (2 * Scratch::bytes_of<A>(T) + Scratch::bytes_of<A>(chunk)));
  A* att[NB];
  A* da_own[NB];
  A* dc[NB];
  for (int j = 0; j < NB; ++j) {
    att[j] = scratch.take<A>(T);
    da_own[j] = scratch.take<A>(T);
    dc[j] = scratch.take<A>(chunk);
  }
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / n_chunks, c = i % n_chunks, k0 = c * chunk;
    const int64_t kc = a.H - k0 < chunk ? a.H - k0 : chunk;
    A* da[NB];
    for (int j = 0; j < NB; ++j) {
      const RowsView& av = branch_attention(a, j);
      const RowsView& gc = branch_grad_context(a, j);
      load_strided(att[j], static_cast<const S*>(av.data) + b * av.sb, av.st, T);
      load_strided(dc[j], static_cast<const S*>(gc.data) + b * gc.sb + k0 * gc.st, gc.st, kc);
      da[j] = n_chunks == 1 ? da_own[j] : static_cast<A*>(a.partial_da) + (i * NB + j) * T;
    }
    if (a.h.along_t) {
      backward_along_t<S, NB, DH>(a, b, k0, kc, att, dc, da);
    } else {
      backward_along_h<S, NB, DH>(a, b, k0, kc, att, dc, da);
    }
    if (n_chunks == 1) finish_row<S, NB>(a, b, att, da);
  }
}

template <class S, int NB> void backward_finish_rows(const BackwardArgs& a, int64_t begin, int64_t end) {
  using A = Acc<S>;
  const int64_t T = a.T, n_chunks = a.split.n_chunks;
  Scratch scratch(NB * 2 * Scratch::bytes_of<A>(T));
  A* att[NB];
  A* da[NB];
  for (int j = 0; j < NB; ++j) {
    att[j] = scratch.take<A>(T);
    da[j] = scratch.take<A>(T);
  }
  for (int64_t b = begin; b < end; ++b) {
    for (int j = 0; j < NB; ++j) {
      const RowsView& av = branch_attention(a, j);
      load_strided(att[j], static_cast<const S*>(av.data) + b * av.sb, av.st, T);
      // partial da of item (b, c), branch j: [B, n_chunks, NB, T]; summed in chunk order (determinism)
      const A* part = static_cast<const A*>(a.partial_da) + (b * n_chunks * NB + j) * T;
      for (int64_t t = 0; t < T; ++t) da[j][t] = part[t];
      for (int64_t c = 1; c < n_chunks; ++c) {
        for (int64_t t = 0; t < T; ++t) da[j][t] += part[c * NB * T + t];
      }
    }
    finish_row<S, NB>(a, b, att, da);
  }
}

template <class S>
constexpr Kernels KERNELS = {
    &iat_prepare<S>,
    &perturbation_rows<S>,
    &attention_rows<S, 1>,
    &context_items<S, 1>,
    &forward_rows<S, 1>,
    &backward_items<S, 1, true>,
    &backward_finish_rows<S, 1>,
    &backward_items<S, 1, false>,  // scores_grad_items
    &attention_rows<S, 2>,
    &context_items<S, 2>,
    &forward_rows<S, 2>,
    &backward_items<S, 2, true>,
    &backward_finish_rows<S, 2>,
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
