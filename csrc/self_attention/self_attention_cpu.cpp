// Multi-head (self-)attention with Attention AT / RP perturbations of the scores (SPEC "Self-attention"):
// flash-style CPU kernels. Nothing of size [B, nh, Tq, Tk] is ever allocated: a task walks blocks of BQ queries x
// BK keys of one (example, head), computes the score block with a BLAS gemm on raw pointers (the BLAS torch links:
// sgemm_/dgemm_, else at::mm on views), adds the bias and the perturbation block, and runs an online softmax
// (running max and sum); the forward saves O and the log-sum-exp, the backward recomputes P blocks from them
// (flash-attention 2: dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ += dS K, dK += dS^T Q, straight
// into the outputs). The element-wise work on a block row (mask, bias, exp, dS) runs in row kernels
// (self_attention_rows.h): an AVX2 + FMA build for float32 where the CPU has it, else a portable scalar one
// (FUSED_ATTN_AT_CPU_ISA=default forces it, as for the attention_pool kernels). q, k, v, dout and the clean
// pass's tensors are read in place when their last dim is contiguous (e.g. heads split off a fused qkv
// projection by a permute): no copies.
//
// The perturbation r of a block is coef[b, h, i] * X[b, h, i, j] on the allowed entries, where coef (eps over the
// norm, zero at padded queries) comes from the caller and X is, by `kind`:
//   0 none; 1 a dense tensor [B, nh, Tq, Tk] read block by block (the user's G or noise: already O(T^2));
//   2 standard normal noise regenerated from (seed, b, h, i, j) by a counter-based hash (RP without a map);
//   3 G = dL_clean/dS of the clean pass, recomputed block by block from the clean pass's Q, K, V, dO, LSE, bias
//     and either O or rowsum(dO * O): G = P_c * (dO_c V_c^T - rowsum(dO_c * O_c)).
// The backward also returns the squared norm of dS per (b, h, query row): for a clean pass this is what the
// AT perturbation's normalisation needs, so the adversarial pass never materialises G.
//
// Attention dropout (dropout_p > 0) is fused the flash-attention way: entry (b, h, i, j) of P is kept when a
// uniform hashed from (dropout_seed, b, h, i, j) is >= dropout_p, and scaled by 1 / (1 - dropout_p); nothing is
// stored, the backward regenerates the same mask: O = (P * M) V, dV = (P * M)^T dO, dP = (dO V^T) * M,
// dS = P (dP - rowsum(dO O)). Kind 3 recomputes the clean pass's G with the clean pass's own mask (cdropout_p,
// cdropout_seed): G = P_c * ((dO_c V_c^T) * M_c - rowsum(dO_c * O_c)).
//
// Ops (schemas below, TORCH_LIBRARY_FRAGMENT: the attention_pool ops live in csrc/ops.cpp):
//   sa_fwd(q, k, v, key_mask?, bias?, causal, scale, kind, coef?, dense?, seed, cq?, ck?, cv?, co?, cdo?, clse?,
//          cbias?) -> (out [B, nh, Tq, dv], lse [B, nh, Tq])       lse = +inf on rows with no allowed key
//          co: the clean O [B, nh, Tq, dv], or rowsum(dO_c * O_c) [B, nh, Tq] (what G needs of O)
//   sa_bwd(dout, q, k, v, out, lse, key_mask?, bias?, causal, scale, bias_grad, <perturbation args as sa_fwd>)
//          -> (dq, dk, dv, dbias (bias's shape, or [0]), gsq [B, nh, Tq] = sum_j dS^2)
//          out: O [B, nh, Tq, dv], or rowsum(dout * O) [B, nh, Tq] (all the backward reads of O)
//   sa_rowsq(q, k, key_mask?, bias?, causal, dense?, seed) -> [B, nh, Tq]: sum over allowed j of X^2 (X = dense,
//          or the hashed noise when dense is None)
//   sa_rp_noise(q, k, seed) -> [B, nh, Tq, Tk]: the hashed noise, materialised (for tests)
//   sa_dropout_mask(q, k, dropout_p, dropout_seed) -> [B, nh, Tq, Tk] multipliers 0 or 1 / (1 - p), materialised
//          (for tests)
// sa_fwd and sa_bwd end with dropout_p, dropout_seed, cdropout_p, cdropout_seed (defaults 0: no dropout).
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../cpu/isa.h"
#include "self_attention_rows.h"

#if defined(__GNUC__) || defined(__clang__)
#define FAA_SA_WEAK_BLAS 1
// The Fortran BLAS torch links (MKL or OpenBLAS export them from libtorch_cpu); weak: at::mm where absent.
// (at::native::cpublas::gemm would be the tidier call, but libtorch_cpu 2.13 does not export its float/double
// overloads: an extension using them fails to load with an undefined symbol.)
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}
#else
#define FAA_SA_WEAK_BLAS 0
#endif

namespace fused_attn_at {
namespace self_attention {
namespace {

constexpr int64_t KIND_NONE = 0, KIND_DENSE = 1, KIND_HASH = 2, KIND_CLEAN = 3;
constexpr int64_t BQ = 64, BK = 512;

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Standard normal number idx of the stream `key` (= splitmix64(seed)): Box-Muller on two hashed uniforms.
inline double hash_normal(uint64_t key, uint64_t idx) {
  const uint64_t a = splitmix64(key + 2 * idx), c = splitmix64(key + 2 * idx + 1);
  const double u1 = static_cast<double>((a >> 11) + 1) * 0x1.0p-53;  // (0, 1]
  const double u2 = static_cast<double>(c >> 11) * 0x1.0p-53;        // [0, 1)
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

// Attention dropout of one call: entry (b, h, i, j) is kept when fmix32(rowkey(b, h, i) + j * GOLDEN32) >=
// p * 2^32 (self_attention_rows.h: 32-bit integer hashing the row kernels vectorise), rowkey the low 32 bits of
// splitmix64 of the row's index in the stream `key` = splitmix64(dropout_seed) ^ DROPOUT_STREAM (apart from the
// RP noise's stream even for the same seed); kept entries are scaled by 1 / (1 - p).
constexpr uint64_t DROPOUT_STREAM = 0xD1B54A32D192ED03ULL;

struct Dropout {
  double p = 0;
  uint64_t key = 0;
  uint32_t threshold = 0;
  bool on = false;
  Dropout() = default;
  Dropout(double p_, int64_t seed)
      : p(p_), key(splitmix64(static_cast<uint64_t>(seed)) ^ DROPOUT_STREAM),
        threshold(static_cast<uint32_t>(std::min(std::ldexp(p_, 32), 4294967295.0))), on(p_ > 0) {}
  uint32_t rowkey(uint64_t row) const { return static_cast<uint32_t>(splitmix64(key + row)); }
  // entries [j0, j0 + n) of row `row` (= (b * H + h) * Tq + i) of x, through the row kernels `ops`
  template <typename T> void apply(const RowOps<T>& ops, T* x, int64_t n, uint64_t row, int64_t j0) const {
    ops.dropout(x, n, rowkey(row), static_cast<uint32_t>(j0), threshold, static_cast<T>(1.0 / (1.0 - p)));
  }
};

struct Strides4 {
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
};

Strides4 broadcast_strides(const at::Tensor& x) {
  Strides4 s;
  s.s0 = x.size(0) == 1 ? 0 : x.stride(0);
  s.s1 = x.size(1) == 1 ? 0 : x.stride(1);
  s.s2 = x.stride(2);
  s.s3 = x.stride(3);
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// block matrix products on raw row-major pointers

// C [M, N] (row stride ldc) = alpha * op(A) op(B) + beta * C; op(A) is [M, K]: A is stored [M, K] (row stride lda),
// or [K, M] when ta; likewise B [K, N], or [N, K] when tb. beta = 0 ignores what C held.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
#if FAA_SA_WEAK_BLAS
  // column-major BLAS: C^T [N, M] = op(B)^T op(A)^T, and a row-major X is the column-major X^T
  const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&ca, &cb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&ca, &cb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  }
#endif
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                          : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  const at::Tensor b = tb ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                          : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == T(0)) c.copy_(at::mm(a, b).mul_(alpha));
  else c.addmm_(a, b, beta, alpha);
}

// A [B, nh, T, d] tensor read in place: row (b, h, t) starts at p + b * sb + h * sh + t * ld, its d elements
// contiguous.
template <typename T> struct Rows {
  const T* p = nullptr;
  int64_t sb = 0, sh = 0, ld = 0;
  const T* at(int64_t b, int64_t h, int64_t t = 0) const { return p + b * sb + h * sh + t * ld; }
};

// x itself when its rows can be read in place by a gemm (last dim contiguous, row stride >= d), else a copy.
at::Tensor rowmajor(const at::Tensor& x) {
  const bool last = x.size(3) <= 1 || x.stride(3) == 1;
  const bool rows = x.size(2) <= 1 || x.stride(2) >= x.size(3);
  return last && rows ? x : x.contiguous();
}

template <typename T> Rows<T> rows_of(const at::Tensor& x) {
  Rows<T> r;
  r.p = x.data_ptr<T>();
  r.sb = x.stride(0), r.sh = x.stride(1);
  r.ld = x.size(2) > 1 ? x.stride(2) : std::max<int64_t>(1, x.size(3));
  return r;
}

template <typename T> const RowOps<T>& row_ops() {
  if constexpr (std::is_same_v<T, float>) {
    const RowOps<float>* avx2 = avx2_row_ops();
    if (avx2 != nullptr && std::strcmp(cpu::selected_isa_name(), "avx2") == 0) return *avx2;
  }
  return portable_row_ops<T>();
}

// Everything a task needs.
template <typename T> struct Problem {
  int64_t B, H, Tq, Tk, D, Dv;
  Rows<T> q, k, v;
  const bool* km = nullptr;  // [B, Tk]
  const T* bias = nullptr;
  Strides4 bs;
  bool causal = false;
  T scale = 1;
  int64_t kind = KIND_NONE;
  const T* coef = nullptr;  // [B, H, Tq]
  const T* dense = nullptr;
  Strides4 ds;
  uint64_t key = 0;
  Rows<T> cq, ck, cv, cdo;  // kind 3
  const T *co = nullptr, *cdelta = nullptr, *clse = nullptr, *cbias = nullptr;  // co [B,H,Tq,Dv] or cdelta [B,H,Tq]
  Strides4 cbs;
  bool clean_scores_shared = false;  // kind 3 with cq, ck, cbias the very q, k, bias of the call
  Dropout drop, cdrop;               // this call's attention dropout; the clean pass's (kind 3)
  const RowOps<T>* ops = nullptr;
  // index of entry (b, h, i, j) in a [B, H, Tq, Tk] map: the RP hash's counter
  uint64_t entry(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return static_cast<uint64_t>(((b * H + h) * Tq + i) * Tk + j);
  }
  // index of row (b, h, i): the dropout hash's row counter
  uint64_t row(int64_t b, int64_t h, int64_t i) const { return static_cast<uint64_t>((b * H + h) * Tq + i); }
};

// Per-thread buffers of a task.
template <typename T> struct Scratch {
  std::vector<T> s, p2, pd, c1, c2, brow, kmadd, acc, m, l, d1, d2;
  Scratch(const Problem<T>& p, int64_t bk_max) {
    s.resize(BQ * bk_max), p2.resize(BQ * bk_max), brow.resize(bk_max), kmadd.resize(p.Tk);
    if (p.drop.on) pd.resize(BQ * bk_max);
    if (p.kind == KIND_CLEAN) c1.resize(BQ * bk_max), c2.resize(BQ * bk_max);
    acc.resize(BQ * std::max(p.Dv, p.D)), m.resize(BQ), l.resize(BQ), d1.resize(BQ), d2.resize(BQ);
  }
};

// The key mask of example b as an additive row (0 = key, -inf = padding), or nullptr without a mask.
template <typename T> const T* key_row(const Problem<T>& p, Scratch<T>& w, int64_t b) {
  if (p.km == nullptr) return nullptr;
  const bool* km = p.km + b * p.Tk;
  for (int64_t j = 0; j < p.Tk; ++j) w.kmadd[j] = km[j] ? T(0) : -std::numeric_limits<T>::infinity();
  return w.kmadd.data();
}

// Row i, keys [j0, j0 + bk) of a bias map (b, h already applied), contiguous (gathered when it is not).
template <typename T> const T* bias_row(const T* bias_bh, const Strides4& s, int64_t i, int64_t j0, int64_t bk,
                                        std::vector<T>& buf) {
  if (bias_bh == nullptr) return nullptr;
  const T* row = bias_bh + i * s.s2 + j0 * s.s3;
  if (s.s3 == 1) return row;
  for (int64_t jj = 0; jj < bk; ++jj) buf[jj] = row[jj * s.s3];
  return buf.data();
}

// S [bq, bk] (row stride bk) = scale * Q_rows K_rows^T + bias, -inf where the entry is not allowed. With check,
// an allowed entry that is not finite is an error.
template <typename T>
void score_block(const Problem<T>& p, Scratch<T>& w, T* S, const Rows<T>& Q, const Rows<T>& K, const T* bias,
                 const Strides4& bs, const T* kmadd, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0,
                 int64_t bk, bool check) {
  gemm_rm<T>(false, true, bq, bk, p.D, p.scale, Q.at(b, h, i0), Q.ld, K.at(b, h, j0), K.ld, T(0), S, bk);
  const T* bias_bh = bias ? bias + b * bs.s0 + h * bs.s1 : nullptr;
  const T* km = kmadd ? kmadd + j0 : nullptr;
  for (int64_t ii = 0; ii < bq; ++ii) {
    const int64_t lim = p.causal ? i0 + ii - j0 + 1 : bk;
    const bool bad = p.ops->prep(S + ii * bk, bk, bias_row(bias_bh, bs, i0 + ii, j0, bk, w.brow), km, lim);
    if (check && bad)
      TORCH_CHECK_VALUE(false, "scores (scale * q k^T + bias) holds NaN or inf at unmasked entries; "
                        "expected finite values");
  }
}

// Dc[ii] = rowsum(dO_c * O_c) of the clean pass for the rows i0 .. i0 + bq.
template <typename T> void clean_rowdot(const Problem<T>& p, int64_t b, int64_t h, int64_t i0, int64_t bq, T* Dc) {
  const int64_t bh = b * p.H + h;
  for (int64_t ii = 0; ii < bq; ++ii) {
    if (p.cdelta != nullptr) {
      Dc[ii] = p.cdelta[bh * p.Tq + i0 + ii];
      continue;
    }
    const T* o = p.co + (bh * p.Tq + i0 + ii) * p.Dv;
    const T* d = p.cdo.at(b, h, i0 + ii);
    T acc = 0;
    for (int64_t c = 0; c < p.Dv; ++c) acc += d[c] * o[c];
    Dc[ii] = acc;
  }
}

// Adds r = coef * X to the allowed entries of the score block S [bq, bk] of (b, h, i0, j0).
template <typename T>
void add_perturbation(const Problem<T>& p, Scratch<T>& w, T* S, const T* kmadd, int64_t b, int64_t h, int64_t i0,
                      int64_t bq, int64_t j0, int64_t bk, const T* Dc) {
  if (p.kind == KIND_NONE) return;
  const T ninf = -std::numeric_limits<T>::infinity();
  const T* coef = p.coef + (b * p.H + h) * p.Tq + i0;
  if (p.kind == KIND_CLEAN) {
    bool any = false;
    for (int64_t ii = 0; ii < bq && !any; ++ii) any = coef[ii] != T(0);
    if (!any) return;
    T* Pc = w.c1.data();
    T* G = w.c2.data();
    if (p.clean_scores_shared)  // the clean scores are this call's (the same Q, K, bias): S before r is added
      std::copy(S, S + bq * bk, Pc);
    else
      score_block(p, w, Pc, p.cq, p.ck, p.cbias, p.cbs, kmadd, b, h, i0, bq, j0, bk, false);
    const T* clse = p.clse + (b * p.H + h) * p.Tq + i0;
    gemm_rm<T>(false, true, bq, bk, p.Dv, T(1), p.cdo.at(b, h, i0), p.cdo.ld, p.cv.at(b, h, j0), p.cv.ld, T(0), G,
               bk);
    for (int64_t ii = 0; ii < bq; ++ii) {
      if (coef[ii] == T(0)) continue;
      p.ops->exp_sum(Pc + ii * bk, bk, clse[ii]);
      if (p.cdrop.on) p.cdrop.apply(*p.ops, G + ii * bk, bk, p.row(b, h, i0 + ii), j0);
      p.ops->ds(Pc + ii * bk, G + ii * bk, bk, Dc[ii]);
      p.ops->axpy_allowed(S + ii * bk, G + ii * bk, bk, coef[ii]);
    }
    return;
  }
  for (int64_t ii = 0; ii < bq; ++ii) {
    const T c = coef[ii];
    if (c == T(0)) continue;
    const int64_t i = i0 + ii;
    T* row = S + ii * bk;
    for (int64_t jj = 0; jj < bk; ++jj) {
      if (row[jj] == ninf) continue;
      const int64_t j = j0 + jj;
      T x;
      if (p.kind == KIND_DENSE) {
        x = p.dense[b * p.ds.s0 + h * p.ds.s1 + i * p.ds.s2 + j * p.ds.s3];
      } else {
        x = static_cast<T>(hash_normal(p.key, p.entry(b, h, i, j)));
      }
      row[jj] += c * x;
    }
  }
}

template <typename T> const T* opt_ptr(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->data_ptr<T>() : nullptr;
}

// q, k, v, cq, ck, cv, cdo: as rowmajor() made them; the rest contiguous.
template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias, bool causal,
                        double scale, int64_t kind, const std::optional<at::Tensor>& coef,
                        const std::optional<at::Tensor>& dense, int64_t seed, const std::optional<at::Tensor>& cq,
                        const std::optional<at::Tensor>& ck, const std::optional<at::Tensor>& cv,
                        const std::optional<at::Tensor>& co, const std::optional<at::Tensor>& cdo,
                        const std::optional<at::Tensor>& clse, const std::optional<at::Tensor>& cbias,
                        double dropout_p, int64_t dropout_seed, double cdropout_p, int64_t cdropout_seed) {
  Problem<T> p;
  p.drop = Dropout(dropout_p, dropout_seed);
  if (kind == KIND_CLEAN) p.cdrop = Dropout(cdropout_p, cdropout_seed);
  p.B = q.size(0), p.H = q.size(1), p.Tq = q.size(2), p.D = q.size(3), p.Tk = k.size(2), p.Dv = v.size(3);
  p.q = rows_of<T>(q), p.k = rows_of<T>(k), p.v = rows_of<T>(v);
  p.km = key_mask.has_value() ? key_mask->data_ptr<bool>() : nullptr;
  if (bias.has_value()) p.bias = bias->data_ptr<T>(), p.bs = broadcast_strides(*bias);
  p.causal = causal;
  p.scale = static_cast<T>(scale);
  p.kind = kind;
  if (kind != KIND_NONE) p.coef = coef->data_ptr<T>();
  if (kind == KIND_DENSE) p.dense = dense->data_ptr<T>(), p.ds = broadcast_strides(*dense);
  p.key = splitmix64(static_cast<uint64_t>(seed));
  if (kind == KIND_CLEAN) {
    p.cq = rows_of<T>(*cq), p.ck = rows_of<T>(*ck), p.cv = rows_of<T>(*cv), p.cdo = rows_of<T>(*cdo);
    if (co->dim() == 3) p.cdelta = co->data_ptr<T>();
    else p.co = co->data_ptr<T>();
    p.clse = clse->data_ptr<T>();
    if (cbias.has_value()) p.cbias = cbias->data_ptr<T>(), p.cbs = broadcast_strides(*cbias);
    auto same_rows = [](const Rows<T>& a, const Rows<T>& c) {
      return a.p == c.p && a.sb == c.sb && a.sh == c.sh && a.ld == c.ld;
    };
    auto same_strides = [](const Strides4& a, const Strides4& c) {
      return a.s0 == c.s0 && a.s1 == c.s1 && a.s2 == c.s2 && a.s3 == c.s3;
    };
    p.clean_scores_shared = same_rows(p.q, p.cq) && same_rows(p.k, p.ck) && p.bias == p.cbias &&
                            (p.bias == nullptr || same_strides(p.bs, p.cbs));
  }
  p.ops = &row_ops<T>();
  return p;
}

// ---------------------------------------------------------------------------------------------------------
// checks

void check_4d(const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must have 4 dims [B, nh, T, d], got shape ", x.sizes());
}

void check_same(const char* name, const at::Tensor& x, const at::Tensor& q) {
  TORCH_CHECK_TYPE(x.scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(), "), got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == q.device(), name, " must be on the device of q (", q.device(), "), got ", x.device());
}

void check_shape(const char* name, const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(x.sizes() == shape, name, " must have shape ", shape, ", got ", x.sizes());
}

void check_map(const char* name, const at::Tensor& x, const at::Tensor& q, int64_t Tk, bool broadcast) {
  check_4d(name, x);
  check_same(name, x, q);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2);
  const bool ok = (x.size(0) == B || (broadcast && x.size(0) == 1)) && (x.size(1) == H || (broadcast && x.size(1) == 1)) &&
                  x.size(2) == Tq && x.size(3) == Tk;
  TORCH_CHECK_VALUE(ok, name, " must have shape [", broadcast ? "B or 1, nh or 1" : "B, nh", ", Tq, Tk] = [", B, ", ",
                    H, ", ", Tq, ", ", Tk, "], got ", x.sizes());
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias, double scale,
                  int64_t kind, const std::optional<at::Tensor>& coef, const std::optional<at::Tensor>& dense,
                  const std::optional<at::Tensor>& cq, const std::optional<at::Tensor>& ck,
                  const std::optional<at::Tensor>& cv, const std::optional<at::Tensor>& co,
                  const std::optional<at::Tensor>& cdo, const std::optional<at::Tensor>& clse,
                  const std::optional<at::Tensor>& cbias, double dropout_p, double cdropout_p) {
  check_4d("q", q), check_4d("k", k), check_4d("v", v);
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(cdropout_p >= 0 && cdropout_p < 1, "cdropout_p must be in [0, 1), got ", cdropout_p);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                   "q must be float32 or float64 (the Python side upcasts half precision), got ", q.scalar_type());
  check_same("k", k, q), check_same("v", v, q);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), d = q.size(3), Tk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(1) == H && k.size(3) == d, "k must have shape [B, nh, Tk, d] = [", B,
                    ", ", H, ", Tk, ", d, "], got ", k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == B && v.size(1) == H && v.size(2) == Tk, "v must have shape [B, nh, Tk, dv] = [", B,
                    ", ", H, ", ", Tk, ", dv], got ", v.sizes());
  if (key_mask.has_value()) {
    TORCH_CHECK_TYPE(key_mask->scalar_type() == at::kBool, "key_mask must be bool, got ", key_mask->scalar_type());
    check_shape("key_mask", *key_mask, {B, Tk});
  }
  if (bias.has_value()) check_map("bias", *bias, q, Tk, true);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "scale must be a finite number > 0, got ", scale);
  TORCH_CHECK_VALUE(kind >= KIND_NONE && kind <= KIND_CLEAN,
                    "kind must be 0 (none), 1 (dense direction), 2 (hashed noise) or 3 (clean-pass G), got ", kind);
  if (kind != KIND_NONE) {
    TORCH_CHECK_VALUE(coef.has_value(), "kind ", kind, " needs coef [B, nh, Tq]");
    check_same("coef", *coef, q);
    check_shape("coef", *coef, {B, H, Tq});
  }
  if (kind == KIND_DENSE) {
    TORCH_CHECK_VALUE(dense.has_value(), "kind 1 needs dense [B, nh, Tq, Tk]");
    check_map("dense", *dense, q, Tk, false);
  }
  if (kind == KIND_CLEAN) {
    TORCH_CHECK_VALUE(cq.has_value() && ck.has_value() && cv.has_value() && co.has_value() && cdo.has_value() &&
                          clse.has_value(),
                      "kind 3 needs the clean pass's cq, ck, cv, co, cdo and clse");
    check_same("cq", *cq, q), check_shape("cq", *cq, q.sizes());
    check_same("ck", *ck, q), check_shape("ck", *ck, k.sizes());
    check_same("cv", *cv, q), check_shape("cv", *cv, v.sizes());
    check_same("co", *co, q);
    if (co->dim() == 3) check_shape("co (rowsum(dO * O))", *co, {B, H, Tq});
    else check_shape("co", *co, {B, H, Tq, v.size(3)});
    check_same("cdo", *cdo, q), check_shape("cdo", *cdo, {B, H, Tq, v.size(3)});
    check_same("clse", *clse, q), check_shape("clse", *clse, {B, H, Tq});
    if (cbias.has_value()) check_map("cbias", *cbias, q, Tk, true);
  }
}

std::optional<at::Tensor> contig(const std::optional<at::Tensor>& x) {
  return x.has_value() ? std::optional<at::Tensor>(x->contiguous()) : std::nullopt;
}

std::optional<at::Tensor> rows_opt(const std::optional<at::Tensor>& x) {
  return x.has_value() ? std::optional<at::Tensor>(rowmajor(*x)) : std::nullopt;
}

// ---------------------------------------------------------------------------------------------------------
// forward

// Queries [i0, i0 + bq) of (b, h): O rows and log-sum-exp.
template <typename T>
void forward_block(const Problem<T>& p, Scratch<T>& w, const T* kmadd, int64_t b, int64_t h, int64_t i0, T* out,
                   T* lse) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t bq = std::min(BQ, p.Tq - i0), Dv = p.Dv;
  T *m = w.m.data(), *l = w.l.data(), *a = w.acc.data(), *S = w.s.data(), *Dc = w.d2.data();
  std::fill(m, m + bq, ninf);
  std::fill(l, l + bq, T(0));
  std::fill(a, a + bq * Dv, T(0));
  if (p.kind == KIND_CLEAN) clean_rowdot(p, b, h, i0, bq, Dc);
  const int64_t jend = p.causal ? std::min(p.Tk, i0 + bq) : p.Tk;
  for (int64_t j0 = 0; j0 < jend; j0 += BK) {
    const int64_t bk = std::min(BK, jend - j0);
    score_block(p, w, S, p.q, p.k, p.bias, p.bs, kmadd, b, h, i0, bq, j0, bk, /*check=*/true);
    add_perturbation(p, w, S, kmadd, b, h, i0, bq, j0, bk, Dc);
    for (int64_t ii = 0; ii < bq; ++ii) {
      T* row = S + ii * bk;
      const T mnew = std::max(m[ii], p.ops->rowmax(row, bk));
      if (mnew == ninf) {  // nothing allowed in this row so far
        std::fill(row, row + bk, T(0));
        continue;
      }
      const T sum = p.ops->exp_sum(row, bk, mnew);
      if (m[ii] != mnew) {
        const T alpha = m[ii] == ninf ? T(0) : std::exp(m[ii] - mnew);
        l[ii] *= alpha;
        for (int64_t c = 0; c < Dv; ++c) a[ii * Dv + c] *= alpha;
      }
      l[ii] += sum;
      m[ii] = mnew;
      // the normaliser l sums every kept and dropped entry; only O sees the mask
      if (p.drop.on) p.drop.apply(*p.ops, row, bk, p.row(b, h, i0 + ii), j0);
    }
    gemm_rm<T>(false, false, bq, Dv, bk, T(1), S, bk, p.v.at(b, h, j0), p.v.ld, T(1), a, Dv);
  }
  for (int64_t ii = 0; ii < bq; ++ii) {
    const int64_t i = i0 + ii;
    T* o = out + ((b * p.H + h) * p.Tq + i) * Dv;
    const T inv = l[ii] > T(0) ? T(1) / l[ii] : T(0);
    for (int64_t c = 0; c < Dv; ++c) o[c] = a[ii * Dv + c] * inv;
    lse[(b * p.H + h) * p.Tq + i] = l[ii] > T(0) ? m[ii] + std::log(l[ii]) : std::numeric_limits<T>::infinity();
  }
}

int64_t grain_for(int64_t Tq, int64_t Tk, int64_t d) {
  const int64_t work = std::max<int64_t>(1, Tq * Tk * d);
  return std::max<int64_t>(1, (int64_t(1) << 16) / work);
}

std::tuple<at::Tensor, at::Tensor> sa_fwd_cpu(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const std::optional<at::Tensor>& key_mask_,
    const std::optional<at::Tensor>& bias, bool causal, double scale, int64_t kind,
    const std::optional<at::Tensor>& coef_, const std::optional<at::Tensor>& dense, int64_t seed,
    const std::optional<at::Tensor>& cq_, const std::optional<at::Tensor>& ck_, const std::optional<at::Tensor>& cv_,
    const std::optional<at::Tensor>& co_, const std::optional<at::Tensor>& cdo_,
    const std::optional<at::Tensor>& clse_, const std::optional<at::Tensor>& cbias, double dropout_p,
    int64_t dropout_seed, double cdropout_p, int64_t cdropout_seed) {
  check_inputs(q_, k_, v_, key_mask_, bias, scale, kind, coef_, dense, cq_, ck_, cv_, co_, cdo_, clse_, cbias,
               dropout_p, cdropout_p);
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor q = rowmajor(q_), k = rowmajor(k_), v = rowmajor(v_);
  const auto key_mask = contig(key_mask_), coef = contig(coef_), cq = rows_opt(cq_), ck = rows_opt(ck_),
             cv = rows_opt(cv_), co = contig(co_), cdo = rows_opt(cdo_), clse = contig(clse_);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), Dv = v.size(3);
  at::Tensor out = at::empty({B, H, Tq, Dv}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options());
  const int64_t nqb = (Tq + BQ - 1) / BQ;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sa_fwd_cpu", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(q, k, v, key_mask, bias, causal, scale, kind, coef, dense,
                                                       seed, cq, ck, cv, co, cdo, clse, cbias, dropout_p,
                                                       dropout_seed, cdropout_p, cdropout_seed);
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* l = lse.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, grain_for(std::min(BQ, Tq), Tk, q.size(3)));
    at::parallel_for(0, B * H * nqb, grain, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView inner;
      Scratch<scalar_t> w(p, std::max<int64_t>(1, std::min(BK, Tk)));
      int64_t last_b = -1;
      const scalar_t* kmadd = nullptr;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / nqb, b = bh / H, h = bh % H;
        if (b != last_b) kmadd = key_row(p, w, b), last_b = b;
        forward_block(p, w, kmadd, b, h, (t % nqb) * BQ, o, l);
      }
    });
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------------
// backward

template <typename T>
void backward_task(const Problem<T>& p, Scratch<T>& w, int64_t b, int64_t h, const Rows<T>& dO, const T* out,
                   bool out_is_delta, const T* lse, T* dq, T* dk, T* dv, T* dbias, const Strides4& dbs, T* gsq) {
  const int64_t bh = b * p.H + h, D = p.D, Dv = p.Dv;
  T* dQh = dq + bh * p.Tq * D;
  T* dKh = dk + bh * p.Tk * D;
  T* dVh = dv + bh * p.Tk * Dv;
  T* dbias_bh = dbias ? dbias + b * dbs.s0 + h * dbs.s1 : nullptr;
  const T* kmadd = key_row(p, w, b);
  T *S = w.s.data(), *dP = w.p2.data(), *Dr = w.d1.data(), *Dc = w.d2.data();
  for (int64_t i0 = 0; i0 < p.Tq; i0 += BQ) {
    const int64_t bq = std::min(BQ, p.Tq - i0);
    for (int64_t ii = 0; ii < bq; ++ii) {
      if (out_is_delta) {
        Dr[ii] = out[bh * p.Tq + i0 + ii];
        continue;
      }
      const T* o = out + (bh * p.Tq + i0 + ii) * Dv;
      const T* d = dO.at(b, h, i0 + ii);
      T acc = 0;
      for (int64_t c = 0; c < Dv; ++c) acc += d[c] * o[c];
      Dr[ii] = acc;
    }
    if (p.kind == KIND_CLEAN) clean_rowdot(p, b, h, i0, bq, Dc);
    const T* lrow = lse + bh * p.Tq + i0;
    T* grow = gsq + bh * p.Tq + i0;
    const T* dOb = dO.at(b, h, i0);
    const int64_t jend = p.causal ? std::min(p.Tk, i0 + bq) : p.Tk;
    for (int64_t j0 = 0; j0 < jend; j0 += BK) {
      const int64_t bk = std::min(BK, jend - j0);
      score_block(p, w, S, p.q, p.k, p.bias, p.bs, kmadd, b, h, i0, bq, j0, bk, false);
      add_perturbation(p, w, S, kmadd, b, h, i0, bq, j0, bk, Dc);
      for (int64_t ii = 0; ii < bq; ++ii) p.ops->exp_sum(S + ii * bk, bk, lrow[ii]);
      // the P that reached O: P * M with dropout
      const T* Pused = S;
      if (p.drop.on) {
        T* Pd = w.pd.data();
        std::copy(S, S + bq * bk, Pd);
        for (int64_t ii = 0; ii < bq; ++ii) p.drop.apply(*p.ops, Pd + ii * bk, bk, p.row(b, h, i0 + ii), j0);
        Pused = Pd;
      }
      // dV += (P * M)^T dO
      gemm_rm<T>(true, false, bk, Dv, bq, T(1), Pused, bk, dOb, dO.ld, T(1), dVh + j0 * Dv, Dv);
      // dP = (dO V^T) * M, then dS = P (dP - rowsum(dO O)) in place
      gemm_rm<T>(false, true, bq, bk, Dv, T(1), dOb, dO.ld, p.v.at(b, h, j0), p.v.ld, T(0), dP, bk);
      if (p.drop.on)
        for (int64_t ii = 0; ii < bq; ++ii) p.drop.apply(*p.ops, dP + ii * bk, bk, p.row(b, h, i0 + ii), j0);
      for (int64_t ii = 0; ii < bq; ++ii) {
        grow[ii] += p.ops->ds(S + ii * bk, dP + ii * bk, bk, Dr[ii]);
        if (dbias_bh) {
          T* db = dbias_bh + (i0 + ii) * dbs.s2;
          for (int64_t jj = 0; jj < bk; ++jj) db[(j0 + jj) * dbs.s3] += dP[ii * bk + jj];
        }
      }
      // dQ += scale dS K, dK += scale dS^T Q
      gemm_rm<T>(false, false, bq, D, bk, p.scale, dP, bk, p.k.at(b, h, j0), p.k.ld, T(1), dQh + i0 * D, D);
      gemm_rm<T>(true, false, bk, D, bq, p.scale, dP, bk, p.q.at(b, h, i0), p.q.ld, T(1), dKh + j0 * D, D);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sa_bwd_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& lse_, const std::optional<at::Tensor>& key_mask_, const std::optional<at::Tensor>& bias,
    bool causal, double scale, bool bias_grad, int64_t kind, const std::optional<at::Tensor>& coef_,
    const std::optional<at::Tensor>& dense, int64_t seed, const std::optional<at::Tensor>& cq_,
    const std::optional<at::Tensor>& ck_, const std::optional<at::Tensor>& cv_, const std::optional<at::Tensor>& co_,
    const std::optional<at::Tensor>& cdo_, const std::optional<at::Tensor>& clse_,
    const std::optional<at::Tensor>& cbias, double dropout_p, int64_t dropout_seed, double cdropout_p,
    int64_t cdropout_seed) {
  check_inputs(q_, k_, v_, key_mask_, bias, scale, kind, coef_, dense, cq_, ck_, cv_, co_, cdo_, clse_, cbias,
               dropout_p, cdropout_p);
  const int64_t B = q_.size(0), H = q_.size(1), Tq = q_.size(2), Tk = k_.size(2), Dv = v_.size(3);
  check_same("dout", dout_, q_), check_shape("dout", dout_, {B, H, Tq, Dv});
  check_same("out", out_, q_);
  const bool out_is_delta = out_.dim() == 3;  // rowsum(dout * out) [B, nh, Tq]: all the backward needs of out
  if (out_is_delta) check_shape("out (rowsum(dout * out))", out_, {B, H, Tq});
  else check_shape("out", out_, {B, H, Tq, Dv});
  check_same("lse", lse_, q_), check_shape("lse", lse_, {B, H, Tq});
  TORCH_CHECK_VALUE(!bias_grad || bias.has_value(), "bias_grad=True needs a bias");
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor q = rowmajor(q_), k = rowmajor(k_), v = rowmajor(v_), dout = rowmajor(dout_),
                   out = out_.contiguous(), lse = lse_.contiguous();
  const auto key_mask = contig(key_mask_), coef = contig(coef_), cq = rows_opt(cq_), ck = rows_opt(ck_),
             cv = rows_opt(cv_), co = contig(co_), cdo = rows_opt(cdo_), clse = contig(clse_);
  at::Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options()),
             dv = at::zeros(v.sizes(), v.options());
  at::Tensor gsq = at::zeros({B, H, Tq}, q.options());
  at::Tensor dbias = bias_grad ? at::zeros(bias->sizes(), q.options()) : at::empty({0}, q.options());
  if (B * H * Tq * Tk == 0) return {dq, dk, dv, dbias, gsq};
  // Tasks that add into the same dbias slice (a bias broadcast over examples or heads) run in one thread, in
  // order: the result does not depend on the number of threads.
  const int64_t gB = bias_grad ? bias->size(0) : B, gH = bias_grad ? bias->size(1) : H;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sa_bwd_cpu", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(q, k, v, key_mask, bias, causal, scale, kind, coef, dense,
                                                       seed, cq, ck, cv, co, cdo, clse, cbias, dropout_p,
                                                       dropout_seed, cdropout_p, cdropout_seed);
    const Rows<scalar_t> dO = rows_of<scalar_t>(dout);
    Strides4 dbs;
    scalar_t* dbp = nullptr;
    if (bias_grad) dbp = dbias.data_ptr<scalar_t>(), dbs = broadcast_strides(dbias);
    at::parallel_for(0, gB * gH, grain_for(Tq, Tk, q.size(3)), [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView inner;
      Scratch<scalar_t> w(p, std::max<int64_t>(1, std::min(BK, Tk)));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t gb = t / gH, gh = t % gH;
        const int64_t b_lo = gB == B ? gb : 0, b_hi = gB == B ? gb + 1 : B;
        const int64_t h_lo = gH == H ? gh : 0, h_hi = gH == H ? gh + 1 : H;
        for (int64_t b = b_lo; b < b_hi; ++b)
          for (int64_t h = h_lo; h < h_hi; ++h)
            backward_task(p, w, b, h, dO, out.data_ptr<scalar_t>(), out_is_delta, lse.data_ptr<scalar_t>(),
                          dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), dbp, dbs,
                          gsq.data_ptr<scalar_t>());
      }
    });
  });
  return {dq, dk, dv, dbias, gsq};
}

// ---------------------------------------------------------------------------------------------------------
// norms of the direction, and the hashed noise

at::Tensor sa_rowsq_cpu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& key_mask_,
                        const std::optional<at::Tensor>& bias, bool causal, const std::optional<at::Tensor>& dense,
                        int64_t seed) {
  check_4d("q", q), check_4d("k", k);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "q must be float32 or float64, got ",
                   q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2);
  if (key_mask_.has_value()) check_shape("key_mask", *key_mask_, {B, Tk});
  if (bias.has_value()) check_map("bias", *bias, q, Tk, true);
  if (dense.has_value()) check_map("dense", *dense, q, Tk, false);
  const auto key_mask = contig(key_mask_);
  at::Tensor rows = at::zeros({B, H, Tq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sa_rowsq_cpu", [&] {
    using T = scalar_t;
    const T ninf = -std::numeric_limits<T>::infinity();
    const bool* km = key_mask.has_value() ? key_mask->data_ptr<bool>() : nullptr;
    const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
    const Strides4 bs = bias.has_value() ? broadcast_strides(*bias) : Strides4{};
    const T* dp = dense.has_value() ? dense->data_ptr<T>() : nullptr;
    const Strides4 ds = dense.has_value() ? broadcast_strides(*dense) : Strides4{};
    const uint64_t key = splitmix64(static_cast<uint64_t>(seed));
    T* r = rows.data_ptr<T>();
    at::parallel_for(0, B * H, grain_for(Tq, Tk, 1), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / H, h = t % H;
        for (int64_t i = 0; i < Tq; ++i) {
          T acc = 0;
          for (int64_t j = 0; j < Tk; ++j) {
            if ((km && !km[b * Tk + j]) || (causal && j > i)) continue;
            if (bp && bp[b * bs.s0 + h * bs.s1 + i * bs.s2 + j * bs.s3] == ninf) continue;
            const T x = dp ? dp[b * ds.s0 + h * ds.s1 + i * ds.s2 + j * ds.s3]
                           : static_cast<T>(hash_normal(key, static_cast<uint64_t>((t * Tq + i) * Tk + j)));
            acc += x * x;
          }
          r[t * Tq + i] = acc;
        }
      }
    });
  });
  return rows;
}

at::Tensor sa_rp_noise_cpu(const at::Tensor& q, const at::Tensor& k, int64_t seed) {
  check_4d("q", q), check_4d("k", k);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2);
  at::Tensor z = at::empty({B, H, Tq, Tk}, q.options().dtype(at::kDouble));
  double* p = z.data_ptr<double>();
  const uint64_t key = splitmix64(static_cast<uint64_t>(seed));
  at::parallel_for(0, z.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) p[n] = hash_normal(key, static_cast<uint64_t>(n));
  });
  return z.to(q.scalar_type());
}

at::Tensor sa_dropout_mask_cpu(const at::Tensor& q, const at::Tensor& k, double dropout_p, int64_t dropout_seed) {
  check_4d("q", q), check_4d("k", k);
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ", dropout_p);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2);
  at::Tensor z = at::ones({B, H, Tq, Tk}, q.options().dtype(at::kDouble));
  const Dropout drop(dropout_p, dropout_seed);
  if (!drop.on) return z.to(q.scalar_type());
  double* p = z.data_ptr<double>();
  at::parallel_for(0, B * H * Tq, 64, [&](int64_t begin, int64_t end) {
    // the portable row kernel: the AVX2 one keeps the same entries (integer hashing), which the kernels' tests
    // against this mask check
    for (int64_t r = begin; r < end; ++r) drop.apply(portable_row_ops<double>(), p + r * Tk, Tk, r, 0);
  });
  return z.to(q.scalar_type());
}

}  // namespace

#define FUSED_ATTN_AT_SA_PERT "int kind, Tensor? coef, Tensor? dense, int seed, Tensor? cq, Tensor? ck, Tensor? cv, " \
  "Tensor? co, Tensor? cdo, Tensor? clse, Tensor? cbias, float dropout_p=0., int dropout_seed=0, " \
  "float cdropout_p=0., int cdropout_seed=0"

TORCH_LIBRARY_FRAGMENT(fused_attn_at, m) {
  m.def("sa_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? bias, bool causal, float scale, "
        FUSED_ATTN_AT_SA_PERT ") -> (Tensor, Tensor)");
  m.def("sa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_mask, Tensor? bias, "
        "bool causal, float scale, bool bias_grad, " FUSED_ATTN_AT_SA_PERT
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sa_rowsq(Tensor q, Tensor k, Tensor? key_mask, Tensor? bias, bool causal, Tensor? dense, int seed) -> Tensor");
  m.def("sa_rp_noise(Tensor q, Tensor k, int seed) -> Tensor");
  m.def("sa_dropout_mask(Tensor q, Tensor k, float dropout_p, int dropout_seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_attn_at, CPU, m) {
  m.impl("sa_fwd", &sa_fwd_cpu);
  m.impl("sa_bwd", &sa_bwd_cpu);
  m.impl("sa_rowsq", &sa_rowsq_cpu);
  m.impl("sa_rp_noise", &sa_rp_noise_cpu);
  m.impl("sa_dropout_mask", &sa_dropout_mask_cpu);
}

}  // namespace self_attention
}  // namespace fused_attn_at
