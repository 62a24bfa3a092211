// Multi-head (self-)attention with Attention AT / RP perturbations of the scores (SPEC "Self-attention"):
// flash-style CPU kernels. Nothing of size [B, nh, Tq, Tk] is ever allocated: each (example, head) task walks
// blocks of BQ queries x BK keys, computes the score block with a BLAS matmul (at::mm on [bq, d] x [d, bk]),
// adds the bias and the perturbation block, and runs an online softmax (running max and sum); the forward saves
// O and the log-sum-exp, the backward recomputes P blocks from them (flash-attention 2).
//
// The perturbation r of a block is coef[b, h, i] * X[b, h, i, j] on the allowed entries, where coef (eps over the
// norm, zero at padded queries) comes from the caller and X is, by `kind`:
//   0 none; 1 a dense tensor [B, nh, Tq, Tk] read block by block (the user's G or noise: already O(T^2));
//   2 standard normal noise regenerated from (seed, b, h, i, j) by a counter-based hash (RP without a map);
//   3 G = dL_clean/dS of the clean pass, recomputed block by block from the clean pass's Q, K, V, O, dO, LSE and
//     bias: G = P_c * (dO_c V_c^T - rowsum(dO_c * O_c)).
// The backward also returns the squared norm of dS per (b, h, query row): for a clean pass this is what the
// AT perturbation's normalisation needs, so the adversarial pass never materialises G.
//
// Ops (schemas below, TORCH_LIBRARY_FRAGMENT: the attention_pool ops live in csrc/ops.cpp):
//   sa_fwd(q, k, v, key_mask?, bias?, causal, scale, kind, coef?, dense?, seed, cq?, ck?, cv?, co?, cdo?, clse?,
//          cbias?) -> (out [B, nh, Tq, dv], lse [B, nh, Tq])       lse = +inf on rows with no allowed key
//   sa_bwd(dout, q, k, v, out, lse, key_mask?, bias?, causal, scale, bias_grad, <perturbation args as sa_fwd>)
//          -> (dq, dk, dv, dbias (bias's shape, or [0]), gsq [B, nh, Tq] = sum_j dS^2)
//   sa_rowsq(q, k, key_mask?, bias?, causal, dense?, seed) -> [B, nh, Tq]: sum over allowed j of X^2 (X = dense,
//          or the hashed noise when dense is None)
//   sa_rp_noise(q, k, seed) -> [B, nh, Tq, Tk]: the hashed noise, materialised (for tests)
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fused_attn_at {
namespace self_attention {
namespace {

constexpr int64_t KIND_NONE = 0, KIND_DENSE = 1, KIND_HASH = 2, KIND_CLEAN = 3;
constexpr int64_t BQ = 64, BK = 128;

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

// Everything a task needs, as tensors (for the block matmuls) and pointers (for the element loops).
template <typename T> struct Problem {
  int64_t B, H, Tq, Tk, D, Dv;
  at::Tensor q, k, v;  // contiguous
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
  at::Tensor cq, ck, cv;  // kind 3, contiguous
  const T *co = nullptr, *cdo = nullptr, *clse = nullptr, *cbias = nullptr;
  Strides4 cbs;
};

// S [bq, bk] = scale * Qb Kb^T + bias, -inf where the entry is not allowed (padding key, causal, bias -inf).
template <typename T>
at::Tensor score_block(const at::Tensor& Qb, const at::Tensor& Kb, const T* bias_bh, const Strides4& bs,
                       const bool* km_b, bool causal, T scale, int64_t i0, int64_t j0, bool check = false) {
  at::Tensor S = at::mm(Qb, Kb.t());
  const int64_t bq = S.size(0), bk = S.size(1);
  T* s = S.data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t ii = 0; ii < bq; ++ii) {
    const int64_t i = i0 + ii;
    T* row = s + ii * bk;
    const T* brow = bias_bh ? bias_bh + i * bs.s2 : nullptr;
    for (int64_t jj = 0; jj < bk; ++jj) {
      const int64_t j = j0 + jj;
      T x = row[jj] * scale;
      bool ok = (km_b == nullptr || km_b[j]) && (!causal || j <= i);
      if (brow) {
        const T bv = brow[j * bs.s3];
        ok = ok && bv != ninf;
        x += bv;
      }
      if (check && ok)
        TORCH_CHECK_VALUE(std::isfinite(x), "scores (scale * q k^T + bias) holds NaN or inf at unmasked entries; "
                          "expected finite values");
      row[jj] = ok ? x : ninf;
    }
  }
  return S;
}

template <typename T> std::vector<T> clean_rowdot(const Problem<T>& p, int64_t b, int64_t h, int64_t i0, int64_t bq) {
  std::vector<T> Dc(bq, T(0));
  for (int64_t ii = 0; ii < bq; ++ii) {
    const int64_t off = ((b * p.H + h) * p.Tq + i0 + ii) * p.Dv;
    T acc = 0;
    for (int64_t c = 0; c < p.Dv; ++c) acc += p.cdo[off + c] * p.co[off + c];
    Dc[ii] = acc;
  }
  return Dc;
}

// Adds r = coef * X to the allowed entries of the score block S [bq, bk] of (b, h, i0, j0).
template <typename T>
void add_perturbation(const Problem<T>& p, at::Tensor& S, int64_t b, int64_t h, int64_t i0, int64_t j0,
                      const std::vector<T>& Dc) {
  if (p.kind == KIND_NONE) return;
  const int64_t bq = S.size(0), bk = S.size(1);
  T* s = S.data_ptr<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  const T* coef = p.coef + (b * p.H + h) * p.Tq + i0;
  at::Tensor G;
  const T* g = nullptr;
  if (p.kind == KIND_CLEAN) {
    bool any = false;
    for (int64_t ii = 0; ii < bq && !any; ++ii) any = coef[ii] != T(0);
    if (!any) return;
    const at::Tensor cQb = p.cq.select(0, b).select(0, h).narrow(0, i0, bq);
    const at::Tensor cKb = p.ck.select(0, b).select(0, h).narrow(0, j0, bk);
    const at::Tensor cVb = p.cv.select(0, b).select(0, h).narrow(0, j0, bk);
    const T* cbias_bh = p.cbias ? p.cbias + b * p.cbs.s0 + h * p.cbs.s1 : nullptr;
    at::Tensor Sc = score_block<T>(cQb, cKb, cbias_bh, p.cbs, p.km ? p.km + b * p.Tk : nullptr, p.causal, p.scale, i0, j0);
    const int64_t off = ((b * p.H + h) * p.Tq + i0) * p.Dv;
    const at::Tensor cdOb = at::from_blob(const_cast<T*>(p.cdo + off), {bq, p.Dv}, S.options());
    G = at::mm(cdOb, cVb.t());
    T* gp = G.data_ptr<T>();
    const T* sc = Sc.data_ptr<T>();
    const T* clse = p.clse + (b * p.H + h) * p.Tq + i0;
    for (int64_t ii = 0; ii < bq; ++ii)
      for (int64_t jj = 0; jj < bk; ++jj) {
        const T x = sc[ii * bk + jj];
        const T pc = x == ninf ? T(0) : std::exp(x - clse[ii]);
        gp[ii * bk + jj] = pc * (gp[ii * bk + jj] - Dc[ii]);
      }
    g = gp;
  }
  for (int64_t ii = 0; ii < bq; ++ii) {
    const T c = coef[ii];
    if (c == T(0)) continue;
    const int64_t i = i0 + ii;
    T* row = s + ii * bk;
    for (int64_t jj = 0; jj < bk; ++jj) {
      if (row[jj] == ninf) continue;
      const int64_t j = j0 + jj;
      T x;
      if (p.kind == KIND_DENSE) {
        x = p.dense[b * p.ds.s0 + h * p.ds.s1 + i * p.ds.s2 + j * p.ds.s3];
      } else if (p.kind == KIND_HASH) {
        x = static_cast<T>(hash_normal(p.key, static_cast<uint64_t>(((b * p.H + h) * p.Tq + i) * p.Tk + j)));
      } else {
        x = g[ii * bk + jj];
      }
      row[jj] += c * x;
    }
  }
}

template <typename T> const T* opt_ptr(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->data_ptr<T>() : nullptr;
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& key_mask, const std::optional<at::Tensor>& bias, bool causal,
                        double scale, int64_t kind, const std::optional<at::Tensor>& coef,
                        const std::optional<at::Tensor>& dense, int64_t seed, const std::optional<at::Tensor>& cq,
                        const std::optional<at::Tensor>& ck, const std::optional<at::Tensor>& cv,
                        const std::optional<at::Tensor>& co, const std::optional<at::Tensor>& cdo,
                        const std::optional<at::Tensor>& clse, const std::optional<at::Tensor>& cbias) {
  Problem<T> p;
  p.B = q.size(0), p.H = q.size(1), p.Tq = q.size(2), p.D = q.size(3), p.Tk = k.size(2), p.Dv = v.size(3);
  p.q = q, p.k = k, p.v = v;
  p.km = key_mask.has_value() ? key_mask->data_ptr<bool>() : nullptr;
  if (bias.has_value()) p.bias = bias->data_ptr<T>(), p.bs = broadcast_strides(*bias);
  p.causal = causal;
  p.scale = static_cast<T>(scale);
  p.kind = kind;
  if (kind != KIND_NONE) p.coef = coef->data_ptr<T>();
  if (kind == KIND_DENSE) p.dense = dense->data_ptr<T>(), p.ds = broadcast_strides(*dense);
  p.key = splitmix64(static_cast<uint64_t>(seed));
  if (kind == KIND_CLEAN) {
    p.cq = *cq, p.ck = *ck, p.cv = *cv;
    p.co = co->data_ptr<T>(), p.cdo = cdo->data_ptr<T>(), p.clse = clse->data_ptr<T>();
    if (cbias.has_value()) p.cbias = cbias->data_ptr<T>(), p.cbs = broadcast_strides(*cbias);
  }
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
                  const std::optional<at::Tensor>& cbias) {
  check_4d("q", q), check_4d("k", k), check_4d("v", v);
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
    check_same("co", *co, q), check_shape("co", *co, {B, H, Tq, v.size(3)});
    check_same("cdo", *cdo, q), check_shape("cdo", *cdo, {B, H, Tq, v.size(3)});
    check_same("clse", *clse, q), check_shape("clse", *clse, {B, H, Tq});
    if (cbias.has_value()) check_map("cbias", *cbias, q, Tk, true);
  }
}

std::optional<at::Tensor> contig(const std::optional<at::Tensor>& x) {
  return x.has_value() ? std::optional<at::Tensor>(x->contiguous()) : std::nullopt;
}

// ---------------------------------------------------------------------------------------------------------
// forward

template <typename T> void forward_task(const Problem<T>& p, int64_t b, int64_t h, T* out, T* lse) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const at::Tensor Qbh = p.q.select(0, b).select(0, h), Kbh = p.k.select(0, b).select(0, h),
                   Vbh = p.v.select(0, b).select(0, h);
  const T* bias_bh = p.bias ? p.bias + b * p.bs.s0 + h * p.bs.s1 : nullptr;
  const bool* km_b = p.km ? p.km + b * p.Tk : nullptr;
  for (int64_t i0 = 0; i0 < p.Tq; i0 += BQ) {
    const int64_t bq = std::min(BQ, p.Tq - i0);
    const at::Tensor Qb = Qbh.narrow(0, i0, bq);
    std::vector<T> m(bq, ninf), l(bq, T(0));
    at::Tensor acc = at::zeros({bq, p.Dv}, p.q.options());
    T* a = acc.data_ptr<T>();
    const std::vector<T> Dc = p.kind == KIND_CLEAN ? clean_rowdot(p, b, h, i0, bq) : std::vector<T>();
    const int64_t jend = p.causal ? std::min(p.Tk, i0 + bq) : p.Tk;
    for (int64_t j0 = 0; j0 < jend; j0 += BK) {
      const int64_t bk = std::min(BK, jend - j0);
      at::Tensor S = score_block<T>(Qb, Kbh.narrow(0, j0, bk), bias_bh, p.bs, km_b, p.causal, p.scale, i0, j0,
                                     /*check=*/true);
      add_perturbation(p, S, b, h, i0, j0, Dc);
      T* s = S.data_ptr<T>();
      for (int64_t ii = 0; ii < bq; ++ii) {
        T* row = s + ii * bk;
        T mx = ninf;
        for (int64_t jj = 0; jj < bk; ++jj) mx = std::max(mx, row[jj]);
        const T mnew = std::max(m[ii], mx);
        if (mnew == ninf) {  // nothing allowed in this row so far
          for (int64_t jj = 0; jj < bk; ++jj) row[jj] = T(0);
          continue;
        }
        T sum = 0;
        for (int64_t jj = 0; jj < bk; ++jj) {
          const T e = row[jj] == ninf ? T(0) : std::exp(row[jj] - mnew);
          row[jj] = e;
          sum += e;
        }
        if (m[ii] != mnew) {
          const T alpha = m[ii] == ninf ? T(0) : std::exp(m[ii] - mnew);
          l[ii] *= alpha;
          for (int64_t c = 0; c < p.Dv; ++c) a[ii * p.Dv + c] *= alpha;
        }
        l[ii] += sum;
        m[ii] = mnew;
      }
      acc.addmm_(S, Vbh.narrow(0, j0, bk));
    }
    for (int64_t ii = 0; ii < bq; ++ii) {
      const int64_t i = i0 + ii;
      T* o = out + ((b * p.H + h) * p.Tq + i) * p.Dv;
      const T inv = l[ii] > T(0) ? T(1) / l[ii] : T(0);
      for (int64_t c = 0; c < p.Dv; ++c) o[c] = a[ii * p.Dv + c] * inv;
      lse[(b * p.H + h) * p.Tq + i] = l[ii] > T(0) ? m[ii] + std::log(l[ii]) : std::numeric_limits<T>::infinity();
    }
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
    const std::optional<at::Tensor>& clse_, const std::optional<at::Tensor>& cbias) {
  check_inputs(q_, k_, v_, key_mask_, bias, scale, kind, coef_, dense, cq_, ck_, cv_, co_, cdo_, clse_, cbias);
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const auto key_mask = contig(key_mask_), coef = contig(coef_), cq = contig(cq_), ck = contig(ck_),
             cv = contig(cv_), co = contig(co_), cdo = contig(cdo_), clse = contig(clse_);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), Dv = v.size(3);
  at::Tensor out = at::empty({B, H, Tq, Dv}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sa_fwd_cpu", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(q, k, v, key_mask, bias, causal, scale, kind, coef, dense,
                                                       seed, cq, ck, cv, co, cdo, clse, cbias);
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* l = lse.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, grain_for(Tq, Tk, q.size(3)), [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView inner;
      for (int64_t t = begin; t < end; ++t) forward_task(p, t / H, t % H, o, l);
    });
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------------
// backward

template <typename T>
void backward_task(const Problem<T>& p, int64_t b, int64_t h, const T* dout, const at::Tensor& dO_t, const T* out,
                   const T* lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, T* dbias, const Strides4& dbs,
                   T* gsq) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const at::Tensor Qbh = p.q.select(0, b).select(0, h), Kbh = p.k.select(0, b).select(0, h),
                   Vbh = p.v.select(0, b).select(0, h), dOh = dO_t.select(0, b).select(0, h);
  at::Tensor dQh = dq.select(0, b).select(0, h), dKh = dk.select(0, b).select(0, h), dVh = dv.select(0, b).select(0, h);
  const T* bias_bh = p.bias ? p.bias + b * p.bs.s0 + h * p.bs.s1 : nullptr;
  T* dbias_bh = dbias ? dbias + b * dbs.s0 + h * dbs.s1 : nullptr;
  const bool* km_b = p.km ? p.km + b * p.Tk : nullptr;
  const int64_t bh = b * p.H + h;
  for (int64_t i0 = 0; i0 < p.Tq; i0 += BQ) {
    const int64_t bq = std::min(BQ, p.Tq - i0);
    const at::Tensor Qb = Qbh.narrow(0, i0, bq), dOb = dOh.narrow(0, i0, bq);
    std::vector<T> Dr(bq, T(0));
    for (int64_t ii = 0; ii < bq; ++ii) {
      const int64_t off = (bh * p.Tq + i0 + ii) * p.Dv;
      T acc = 0;
      for (int64_t c = 0; c < p.Dv; ++c) acc += dout[off + c] * out[off + c];
      Dr[ii] = acc;
    }
    const std::vector<T> Dc = p.kind == KIND_CLEAN ? clean_rowdot(p, b, h, i0, bq) : std::vector<T>();
    const T* lrow = lse + bh * p.Tq + i0;
    T* grow = gsq + bh * p.Tq + i0;
    at::Tensor dQacc = at::zeros({bq, p.D}, p.q.options());
    const int64_t jend = p.causal ? std::min(p.Tk, i0 + bq) : p.Tk;
    for (int64_t j0 = 0; j0 < jend; j0 += BK) {
      const int64_t bk = std::min(BK, jend - j0);
      const at::Tensor Kb = Kbh.narrow(0, j0, bk), Vb = Vbh.narrow(0, j0, bk);
      at::Tensor S = score_block<T>(Qb, Kb, bias_bh, p.bs, km_b, p.causal, p.scale, i0, j0);
      add_perturbation(p, S, b, h, i0, j0, Dc);
      T* s = S.data_ptr<T>();
      for (int64_t ii = 0; ii < bq; ++ii)
        for (int64_t jj = 0; jj < bk; ++jj) {
          T& x = s[ii * bk + jj];
          x = x == ninf ? T(0) : std::exp(x - lrow[ii]);
        }
      dVh.narrow(0, j0, bk).addmm_(S.t(), dOb);
      at::Tensor dP = at::mm(dOb, Vb.t());
      T* dp = dP.data_ptr<T>();
      for (int64_t ii = 0; ii < bq; ++ii) {
        T sq = 0;
        T* db = dbias_bh ? dbias_bh + (i0 + ii) * dbs.s2 : nullptr;
        for (int64_t jj = 0; jj < bk; ++jj) {
          const T g = s[ii * bk + jj] * (dp[ii * bk + jj] - Dr[ii]);
          dp[ii * bk + jj] = g;
          sq += g * g;
          if (db) db[(j0 + jj) * dbs.s3] += g;
        }
        grow[ii] += sq;
      }
      dQacc.addmm_(dP, Kb);
      dKh.narrow(0, j0, bk).addmm_(dP.t(), Qb, 1, p.scale);
    }
    dQh.narrow(0, i0, bq).copy_(dQacc.mul_(p.scale));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sa_bwd_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& lse_, const std::optional<at::Tensor>& key_mask_, const std::optional<at::Tensor>& bias,
    bool causal, double scale, bool bias_grad, int64_t kind, const std::optional<at::Tensor>& coef_,
    const std::optional<at::Tensor>& dense, int64_t seed, const std::optional<at::Tensor>& cq_,
    const std::optional<at::Tensor>& ck_, const std::optional<at::Tensor>& cv_, const std::optional<at::Tensor>& co_,
    const std::optional<at::Tensor>& cdo_, const std::optional<at::Tensor>& clse_,
    const std::optional<at::Tensor>& cbias) {
  check_inputs(q_, k_, v_, key_mask_, bias, scale, kind, coef_, dense, cq_, ck_, cv_, co_, cdo_, clse_, cbias);
  const int64_t B = q_.size(0), H = q_.size(1), Tq = q_.size(2), Tk = k_.size(2), Dv = v_.size(3);
  check_same("dout", dout_, q_), check_shape("dout", dout_, {B, H, Tq, Dv});
  check_same("out", out_, q_), check_shape("out", out_, {B, H, Tq, Dv});
  check_same("lse", lse_, q_), check_shape("lse", lse_, {B, H, Tq});
  TORCH_CHECK_VALUE(!bias_grad || bias.has_value(), "bias_grad=True needs a bias");
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), dout = dout_.contiguous(),
                   out = out_.contiguous(), lse = lse_.contiguous();
  const auto key_mask = contig(key_mask_), coef = contig(coef_), cq = contig(cq_), ck = contig(ck_),
             cv = contig(cv_), co = contig(co_), cdo = contig(cdo_), clse = contig(clse_);
  at::Tensor dq = at::empty_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  at::Tensor gsq = at::zeros({B, H, Tq}, q.options());
  at::Tensor dbias = bias_grad ? at::zeros(bias->sizes(), q.options()) : at::empty({0}, q.options());
  // Tasks that add into the same dbias slice (a bias broadcast over examples or heads) run in one thread, in
  // order: the result does not depend on the number of threads.
  const int64_t gB = bias_grad ? bias->size(0) : B, gH = bias_grad ? bias->size(1) : H;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sa_bwd_cpu", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(q, k, v, key_mask, bias, causal, scale, kind, coef, dense,
                                                       seed, cq, ck, cv, co, cdo, clse, cbias);
    Strides4 dbs;
    scalar_t* dbp = nullptr;
    if (bias_grad) dbp = dbias.data_ptr<scalar_t>(), dbs = broadcast_strides(dbias);
    at::parallel_for(0, gB * gH, grain_for(Tq, Tk, q.size(3)) , [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView inner;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t gb = t / gH, gh = t % gH;
        const int64_t b_lo = gB == B ? gb : 0, b_hi = gB == B ? gb + 1 : B;
        const int64_t h_lo = gH == H ? gh : 0, h_hi = gH == H ? gh + 1 : H;
        for (int64_t b = b_lo; b < b_hi; ++b)
          for (int64_t h = h_lo; h < h_hi; ++h)
            backward_task(p, b, h, dout.data_ptr<scalar_t>(), dout, out.data_ptr<scalar_t>(),
                          lse.data_ptr<scalar_t>(), dq, dk, dv, dbp, dbs, gsq.data_ptr<scalar_t>());
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

}  // namespace

#define FUSED_ATTN_AT_SA_PERT "int kind, Tensor? coef, Tensor? dense, int seed, Tensor? cq, Tensor? ck, Tensor? cv, " \
  "Tensor? co, Tensor? cdo, Tensor? clse, Tensor? cbias"

TORCH_LIBRARY_FRAGMENT(fused_attn_at, m) {
  m.def("sa_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? bias, bool causal, float scale, "
        FUSED_ATTN_AT_SA_PERT ") -> (Tensor, Tensor)");
  m.def("sa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_mask, Tensor? bias, "
        "bool causal, float scale, bool bias_grad, " FUSED_ATTN_AT_SA_PERT
        ") -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sa_rowsq(Tensor q, Tensor k, Tensor? key_mask, Tensor? bias, bool causal, Tensor? dense, int seed) -> Tensor");
  m.def("sa_rp_noise(Tensor q, Tensor k, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_attn_at, CPU, m) {
  m.impl("sa_fwd", &sa_fwd_cpu);
  m.impl("sa_bwd", &sa_bwd_cpu);
  m.impl("sa_rowsq", &sa_rowsq_cpu);
  m.impl("sa_rp_noise", &sa_rp_noise_cpu);
}

}  // namespace self_attention
}  // namespace fused_attn_at
