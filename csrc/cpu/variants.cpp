// Fused norm variants (issue 8), CPU: residual-add (+ dropout) + LayerNorm/RMSNorm forward and backward.
//
// s = dropout(x) + residual is formed row by row in an L1-resident accumulation-type buffer, written once
// (rounded to s's dtype; the statistics are those of the rounded s, which is what backward normalizes
// again), and normalized while still in cache. The dropout mask is never stored: it is the counter-based
// hash of (seed, element index) defined in fusednorm/backends/reference_variants.py, computed bit-exactly
// here, so forward and backward (and every backend) agree. The backward keeps dW/dB partial sums per
// block of rows (a fixed number of blocks, see num_blocks) and reduces them in block order: bit-identical
// whatever the thread count.
//
// Like the other CPU sources, this file is compiled twice (baseline and AVX2, see isa_prelude.h) and shares
// the dtype plumbing and vectorized reductions of cpu_utils.h. The registration (baseline copy only)
// registers the implementations of the copy that matches the CPU, chosen once at load time.
#include "cpu/isa_prelude.h"
// (isa_prelude.h must come first: it selects the instruction set of this translation unit.)
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "cpu/cpu_utils.h"
#include "ops.h"

// The LayerNorm row kernels of this copy (layer_norm.cpp), which run channels-last channels-first LayerNorm.
FUSEDNORM_DECLARE_OPS(fusednorm::cpu::FUSEDNORM_ISA)

namespace fusednorm {
namespace cpu {
namespace FUSEDNORM_ISA {
namespace variants {


constexpr const char* kAddNormFwd =
    "add_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool is_rms, "
    "bool has_dropout, float drop_scale, int seed, int threshold, ScalarType s_dtype) "
    "-> (Tensor, Tensor, Tensor, Tensor)";
constexpr const char* kAddNormBwd =
    "add_norm_bwd(Tensor dy, Tensor? ds, Tensor s, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
    "bool is_rms, bool has_dropout, float drop_scale, int seed, int threshold, ScalarType x_dtype, "
    "bool has_residual, ScalarType residual_dtype) -> (Tensor, Tensor, Tensor, Tensor)";

// ---- counter-based dropout hash (bit-exact twin of reference_variants.dropout_keep_mask) ---------------

inline uint32_t hash32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return h;
}

// Per-row key: depends on the high 32 bits of the element index only, so it is hoisted out of inner loops
// whenever a row does not straddle a 2^32 boundary (checked by the caller through key_for()).
inline uint32_t key_for(uint64_t idx, uint32_t seed) { return hash32(hash32(uint32_t(idx >> 32)) ^ seed); }

inline bool keep_elem(uint64_t idx, uint32_t seed, uint32_t threshold) {
  const uint32_t k = key_for(idx, seed);
  const uint32_t h = hash32(hash32(uint32_t(idx) ^ k) + k);
  return (h >> 8) >= threshold;
}

// dst[j] = keep(row * n + j) ? src[j] * scale : 0, in place on an acc-type buffer.
template <typename A>
inline void apply_dropout(A* buf, int64_t row, int64_t n, uint32_t seed, uint32_t threshold, A scale) {
  const uint64_t base = uint64_t(row) * uint64_t(n);
  const uint64_t end = base + uint64_t(n);
  if ((base >> 32) == ((end - 1) >> 32)) {
    const uint32_t k = key_for(base, seed);
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t h = hash32(hash32(uint32_t(base + uint64_t(j)) ^ k) + k);
      buf[j] = (h >> 8) >= threshold ? buf[j] * scale : A(0);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = keep_elem(base + uint64_t(j), seed, threshold) ? buf[j] * scale : A(0);
  }
}

// ---- forward -------------------------------------------------------------------------------------------

template <typename T, typename S>
void add_norm_fwd_kernel(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w, const at::Tensor& b,
                         double eps, bool is_rms, bool has_dropout, double drop_scale, uint32_t seed,
                         uint32_t threshold, at::Tensor& y, at::Tensor& s, at::Tensor& mean, at::Tensor& rstd) {
  using A = acc_type<S>;
  static_assert(std::is_same_v<acc_type<T>, A> || std::is_same_v<A, double>, "acc type of x must fit s's");
  using V = Vectorized<A>;
  const int64_t M = x.size(0), N = x.size(1), ldx = x.stride(0);
  const int64_t ldr = res.defined() ? res.stride(0) : 0;
  const T* xp = x.data_ptr<T>();
  const S* rp = res.defined() ? res.data_ptr<S>() : nullptr;
  T* yp = y.data_ptr<T>();
  S* sp = s.data_ptr<S>();
  const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
  const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
  A* meanp = is_rms ? nullptr : mean.data_ptr<A>();
  A* rstdp = rstd.data_ptr<A>();
  const A scale = A(drop_scale);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
  // The op writes two outputs (y and s): their total decides streaming (fusednorm-bench, 2048x1024 fp32,
  // 2 x 8 MiB, two runs each: forward 1.10-1.15x -> 1.32x of torch, forward+backward 1.02-1.04x -> 1.09-1.15x).
  const bool stream = stream_output(M * N * int64_t(sizeof(T) + sizeof(S)));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    std::vector<A> a(N), tmp(N);
    for (int64_t r = r0; r < r1; ++r) {
      bool s_done = false;
      if constexpr (std::is_same_v<T, A> && std::is_same_v<S, A>) {
        // Common case in one pass: s = x + residual into the L1 row buffer and into s.
        if (!has_dropout) {
          const T* xr = xp + r * ldx;
          const S* rr = rp != nullptr ? rp + r * ldr : nullptr;
          write_row<S, A>(sp + r * N, N, stream, [&](int64_t j, int64_t cnt) {
            V v = V::loadu(xr + j, cnt);
            if (rr != nullptr) v = v + V::loadu(rr + j, cnt);
            v.store(a.data() + j, cnt);
            return v;
          });
          s_done = true;
        }
      } else if constexpr (std::is_same_v<A, float>) {
        // bf16 / fp16 x or s, no dropout: also one pass, converting in registers. The row buffer gets s as
        // stored (rounded to S), which is what the statistics and the backward see.
        if (!has_dropout) {
          const T* xr = xp + r * ldx;
          const S* rr = rp != nullptr ? rp + r * ldr : nullptr;
          S* sr = sp + r * N;
          for (int64_t j = 0; j < N; j += V::size()) {
            const int64_t cnt = std::min<int64_t>(V::size(), N - j);
            V v = load_acc<T, A>(xr + j, cnt);
            if (rr != nullptr) v = v + load_acc<S, A>(rr + j, cnt);
            store_acc<S, A>(sr + j, v, cnt);
            if constexpr (!std::is_same_v<S, A>) v = load_acc<S, A>(sr + j, cnt);
            v.store(a.data() + j, cnt);
          }
          s_done = true;
        }
      }
      if (!s_done) {
        // s = dropout(x) + residual in acc precision
        to_acc(xp + r * ldx, a.data(), N);
        if (has_dropout) apply_dropout(a.data(), r, N, seed, threshold, scale);
        if (rp != nullptr) {
          const A* ra = acc_view(rp + r * ldr, tmp.data(), N);
          for (int64_t j = 0; j < N; ++j) a[j] += ra[j];
        }
        // Store s, and continue from the rounded values (no-op when S is the acc type). A reduced-precision
        // s is read back right away, so only an acc-type s is streamed.
        if constexpr (std::is_same_v<S, A>) {
          from_acc_stream(a.data(), sp + r * N, N, stream);
        } else {
          from_acc(a.data(), sp + r * N, N);
          to_acc(sp + r * N, a.data(), N);
        }
      }
      A mu = 0, rs;
      if (is_rms) {
        A ss = 0;
        for (int64_t off = 0; off < N; off += kChunk) ss += vsum_sqdev(a.data() + off, std::min(kChunk, N - off), A(0));
        rs = A(1) / std::sqrt(ss / A(N) + A(eps));
      } else {
        const auto st = stats_acc(a.data(), N);
        mu = st.mean();  // N > 0 here
        rs = A(1) / std::sqrt(st.w.m2 / A(N) + A(eps));
        meanp[r] = mu;
      }
      rstdp[r] = rs;
      normalize_row(a.data(), yp + r * N, N, A(0), mu, rs, wp, bp, stream);
    }
    stream_fence(stream);
  });
}

// ---- backward ------------------------------------------------------------------------------------------

template <typename T, typename S>
void add_norm_bwd_kernel(const at::Tensor& dy, const at::Tensor& ds, const at::Tensor& s, const at::Tensor& w,
                         bool has_b, const at::Tensor& mean, const at::Tensor& rstd, bool is_rms, bool has_dropout,
                         double drop_scale, uint32_t seed, uint32_t threshold, at::Tensor& dx, at::Tensor& dres,
                         at::Tensor& dw_acc, at::Tensor& db_acc) {
  using A = acc_type<S>;
  const int64_t M = s.size(0), N = s.size(1);
  const int64_t lddy = dy.stride(0), ldds = ds.defined() ? ds.stride(0) : 0;
  const T* dyp = dy.data_ptr<T>();
  const S* dsp = ds.defined() ? ds.data_ptr<S>() : nullptr;
  const S* sp = s.data_ptr<S>();
  T* dxp = dx.data_ptr<T>();
  S* drp = dres.defined() ? dres.data_ptr<S>() : nullptr;
  const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
  const A* meanp = is_rms ? nullptr : mean.data_ptr<A>();
  const A* rstdp = rstd.data_ptr<A>();
  const bool need_dw = dw_acc.defined(), need_db = db_acc.defined() && has_b;
  const int64_t blocks = num_blocks(M);
  // Per-block dW/dB partials, each zeroed by the task that accumulates into it.
  std::unique_ptr<A[]> pdw(need_dw ? new A[blocks * N] : nullptr), pdb(need_db ? new A[blocks * N] : nullptr);
  const A scale = A(drop_scale);
  // dx and dres together decide streaming, as in the forward.
  const bool stream = stream_output(M * N * int64_t(sizeof(T) + (drp != nullptr ? sizeof(S) : 0)));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> sbuf(N), dybuf(N), out(N);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const auto [r0, r1] = block_range(M, blocks, blk);
      A* dwr = need_dw ? pdw.get() + blk * N : nullptr;
      A* dbr = need_db ? pdb.get() + blk * N : nullptr;
      if (dwr != nullptr) std::fill(dwr, dwr + N, A(0));
      if (dbr != nullptr) std::fill(dbr, dbr + N, A(0));
      for (int64_t r = r0; r < r1; ++r) {
        // s and dy are read (several times, from cache) and converted in registers; only a dy whose acc type
        // differs from s's (fp32 x with an fp64 residual stream) is converted into a buffer first.
        const S* as = sp + r * N;
        const A mu = is_rms ? A(0) : meanp[r];
        auto row = [&](const auto* ady) {
          if (wp != nullptr) {
            layer_norm_bwd_row<true>(as, ady, wp, mu, rstdp[r], is_rms, N, dwr, dbr, out.data(), false);
          } else {
            layer_norm_bwd_row<false>(as, ady, wp, mu, rstdp[r], is_rms, N, dwr, dbr, out.data(), false);
          }
        };
        if constexpr (std::is_same_v<acc_type<T>, A>) {
          row(dyp + r * lddy);
        } else {
          row(acc_view(dyp + r * lddy, dybuf.data(), N));
        }
        if (dsp != nullptr) {
          const A* ads = acc_view(dsp + r * ldds, sbuf.data(), N);  // s is no longer needed
          for (int64_t j = 0; j < N; ++j) out[j] += ads[j];
        }
        if (drp != nullptr) {
          if constexpr (std::is_same_v<S, A>) {
            from_acc_stream(out.data(), drp + r * N, N, stream);
          } else {
            from_acc(out.data(), drp + r * N, N);
          }
        }
        if (has_dropout) apply_dropout(out.data(), r, N, seed, threshold, scale);
        if constexpr (std::is_same_v<T, A>) {
          from_acc_stream(out.data(), dxp + r * N, N, stream);
        } else if constexpr (std::is_same_v<T, float> && std::is_same_v<A, double>) {
          for (int64_t j = 0; j < N; ++j) dxp[r * N + j] = static_cast<T>(out[j]);
        } else {
          from_acc(out.data(), dxp + r * N, N);
        }
      }
    }
    stream_fence(stream);
  });
  if (need_dw) sum_block_partials(pdw.get(), blocks, N, dw_acc.data_ptr<A>());
  if (need_db) sum_block_partials(pdb.get(), blocks, N, db_acc.data_ptr<A>());
}

// ---- dtype dispatch ------------------------------------------------------------------------------------

// Calls fn.template operator()<T>() for the storage type T of `t` (float, double, bf16, half).
template <typename F>
void dispatch_float(at::ScalarType t, F&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    case at::kHalf: fn(at::Half{}); break;
    default: TORCH_CHECK(false, "fusednorm_C: unsupported dtype ", t);
  }
}

// x's dtype T and s's dtype S must be (T, T) or (16-bit/float T, float S); any other pair is brought to
// (S, S) by converting x (and converting y / dx back), a copy only in that unusual case.
inline bool supported_pair(at::ScalarType t, at::ScalarType s) {
  return t == s || (s == at::kFloat && t != at::kDouble);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_fwd(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool is_rms, bool has_dropout, double drop_scale, int64_t seed,
    int64_t threshold, at::ScalarType s_dtype) {
  TORCH_CHECK(x_in.dim() == 2, "fusednorm_C::add_norm_fwd: x must be 2-D (M, N)");
  const auto x_dtype = x_in.scalar_type();
  at::Tensor x = x_in.size(1) <= 1 || x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  if (!supported_pair(x_dtype, s_dtype)) x = x.to(s_dtype);
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    res = residual->to(s_dtype);
    if (res.size(1) > 1 && res.stride(1) != 1) res = res.contiguous();
  }
  const auto acc = acc_scalar_type(s_dtype);
  const at::Tensor w = param_acc(weight, acc), b = param_acc(bias, acc);
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor s = at::empty({M, N}, x.options().dtype(s_dtype));
  at::Tensor mean = at::empty({is_rms ? 0 : M}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({M}, x.options().dtype(acc));
  if (M > 0 && N > 0) {
    dispatch_float(x.scalar_type(), [&](auto tv) {
      using T = decltype(tv);
      dispatch_float(s_dtype, [&](auto sv) {
        using S = decltype(sv);
        if constexpr (std::is_same_v<T, S> || (std::is_same_v<S, float> && !std::is_same_v<T, double>)) {
          add_norm_fwd_kernel<T, S>(x, res, w, b, eps, is_rms, has_dropout, drop_scale, uint32_t(seed),
                                    uint32_t(threshold), y, s, mean, rstd);
        }
      });
    });
  }
  if (y.scalar_type() != x_dtype) y = y.to(x_dtype);
  return {y, s, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_norm_bwd(
    const at::Tensor& dy_in, const c10::optional<at::Tensor>& ds_in, const at::Tensor& s_in,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, bool is_rms, bool has_dropout, double drop_scale, int64_t seed, int64_t threshold,
    at::ScalarType x_dtype, bool has_residual, at::ScalarType residual_dtype) {
  TORCH_CHECK(s_in.dim() == 2 && dy_in.sizes() == s_in.sizes(), "fusednorm_C::add_norm_bwd: dy and s must be (M, N)");
  const auto s_dtype = s_in.scalar_type();
  const auto t_dtype = supported_pair(x_dtype, s_dtype) ? x_dtype : s_dtype;
  const at::Tensor s = s_in.contiguous();
  at::Tensor dy = dy_in.to(t_dtype);
  if (dy.size(1) > 1 && dy.stride(1) != 1) dy = dy.contiguous();
  at::Tensor ds;
  if (ds_in.has_value() && ds_in->defined()) {
    ds = ds_in->to(s_dtype);
    if (ds.size(1) > 1 && ds.stride(1) != 1) ds = ds.contiguous();
  }
  const auto acc = acc_scalar_type(s_dtype);
  const at::Tensor w = param_acc(weight, acc);
  const bool has_w = w.defined(), has_b = bias.has_value() && bias->defined();
  const at::Tensor meanc = mean.to(acc).contiguous(), rstdc = rstd.to(acc).contiguous();
  const int64_t M = s.size(0), N = s.size(1);
  at::Tensor dx = at::empty({M, N}, s.options().dtype(t_dtype));
  at::Tensor dres = has_residual ? at::empty({M, N}, s.options()) : at::Tensor();
  at::Tensor dw_acc = has_w ? at::zeros({N}, s.options().dtype(acc)) : at::Tensor();
  at::Tensor db_acc = has_b ? at::zeros({N}, s.options().dtype(acc)) : at::Tensor();
  if (M > 0 && N > 0) {
    dispatch_float(t_dtype, [&](auto tv) {
      using T = decltype(tv);
      dispatch_float(s_dtype, [&](auto sv) {
        using S = decltype(sv);
        if constexpr (std::is_same_v<T, S> || (std::is_same_v<S, float> && !std::is_same_v<T, double>)) {
          add_norm_bwd_kernel<T, S>(dy, ds, s, w, has_b, meanc, rstdc, is_rms, has_dropout, drop_scale,
                                    uint32_t(seed), uint32_t(threshold), dx, dres, dw_acc, db_acc);
        }
      });
    });
  }
  if (dx.scalar_type() != x_dtype) dx = dx.to(x_dtype);
  if (has_residual && dres.scalar_type() != residual_dtype) dres = dres.to(residual_dtype);
  at::Tensor empty = at::empty({0}, s.options().dtype(x_dtype));
  return {dx, has_residual ? dres : empty, has_w ? dw_acc.to(weight->scalar_type()) : empty,
          has_b ? db_acc.to(bias->scalar_type()) : empty};
}


// ==== per-plane passes (SwitchableNorm): x viewed as (R, P), last dim contiguous ===========================

constexpr const char* kPlaneStats = "plane_stats(Tensor x) -> (Tensor, Tensor)";
constexpr const char* kPlaneAffine = "plane_affine(Tensor x, Tensor center, Tensor a, Tensor b) -> Tensor";
constexpr const char* kPlaneBwdReduce = "plane_bwd_reduce(Tensor dy, Tensor x, Tensor center) -> (Tensor, Tensor)";
constexpr const char* kPlaneBwdDx =
    "plane_bwd_dx(Tensor dy, Tensor x, Tensor center, Tensor k, Tensor p, Tensor q) -> Tensor";

// Rows of a (R, P) tensor whose last dim is contiguous (copy only when it is not).
inline at::Tensor rows_of(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

std::tuple<at::Tensor, at::Tensor> plane_stats(const at::Tensor& x_in) {
  const at::Tensor x = rows_of(x_in);
  const auto acc = acc_scalar_type(x.scalar_type());
  const int64_t R = x.size(0), P = x.size(1), ld = x.stride(0);
  at::Tensor mean = at::empty({R}, x.options().dtype(acc)), m2 = at::empty({R}, x.options().dtype(acc));
  dispatch_float(x.scalar_type(), [&](auto tv) {
    using T = decltype(tv);
    using A = acc_type<T>;
    const T* xp = x.data_ptr<T>();
    A* mp = mean.data_ptr<A>();
    A* m2p = m2.data_ptr<A>();
    at::parallel_for(0, R, row_grain(P), [&](int64_t r0, int64_t r1) {
      std::vector<A> buf(P);
      for (int64_t r = r0; r < r1; ++r) {
        const A* a = acc_view(xp + r * ld, buf.data(), P);
        const auto st = stats_acc(a, P);
        mp[r] = st.mean();
        m2p[r] = st.w.m2;
      }
    });
  });
  return {mean, m2};
}

// Shared loop of plane_affine / plane_bwd_dx: out[r, j] = (dy[r, j] * k[r]) + (x[r, j] - c[r]) * p[r] + q[r].
template <typename T, bool HAS_DY>
void plane_map(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& c, const at::Tensor& k,
               const at::Tensor& p, const at::Tensor& q, at::Tensor& out) {
  using A = acc_type<T>;
  const int64_t R = x.size(0), P = x.size(1), ldx = x.stride(0), lddy = HAS_DY ? dy.stride(0) : 0;
  const T* xp = x.data_ptr<T>();
  const T* dyp = HAS_DY ? dy.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const A *cp = c.data_ptr<A>(), *kp = HAS_DY ? k.data_ptr<A>() : nullptr, *pp = p.data_ptr<A>(),
          *qp = q.data_ptr<A>();
  at::parallel_for(0, R, row_grain(P), [&](int64_t r0, int64_t r1) {
    std::vector<A> xb(P), db(HAS_DY ? P : 0);
    for (int64_t r = r0; r < r1; ++r) {
      to_acc(xp + r * ldx, xb.data(), P);
      if constexpr (HAS_DY) to_acc(dyp + r * lddy, db.data(), P);
      const A cr = cp[r], pr = pp[r], qr = qp[r], kr = HAS_DY ? kp[r] : A(0);
      for (int64_t j = 0; j < P; ++j) {
        A v = (xb[j] - cr) * pr + qr;
        if constexpr (HAS_DY) v += db[j] * kr;
        xb[j] = v;
      }
      from_acc(xb.data(), op + r * P, P);
    }
  });
}

at::Tensor plane_affine(const at::Tensor& x_in, const at::Tensor& center, const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = rows_of(x_in);
  const auto acc = acc_scalar_type(x.scalar_type());
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  const at::Tensor c = center.to(acc).contiguous(), ac = a.to(acc).contiguous(), bc = b.to(acc).contiguous();
  dispatch_float(x.scalar_type(), [&](auto tv) {
    plane_map<decltype(tv), false>(at::Tensor(), x, c, at::Tensor(), ac, bc, out);
  });
  return out;
}

at::Tensor plane_bwd_dx(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& center,
                        const at::Tensor& k, const at::Tensor& p, const at::Tensor& q) {
  const at::Tensor x = rows_of(x_in), dy = rows_of(dy_in.to(x_in.scalar_type()));
  const auto acc = acc_scalar_type(x.scalar_type());
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  const at::Tensor c = center.to(acc).contiguous(), kc = k.to(acc).contiguous(), pc = p.to(acc).contiguous(),
                   qc = q.to(acc).contiguous();
  dispatch_float(x.scalar_type(), [&](auto tv) { plane_map<decltype(tv), true>(dy, x, c, kc, pc, qc, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> plane_bwd_reduce(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                    const at::Tensor& center) {
  const at::Tensor x = rows_of(x_in), dy = rows_of(dy_in.to(x_in.scalar_type()));
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor c = center.to(acc).contiguous();
  const int64_t R = x.size(0), P = x.size(1);
  at::Tensor s1 = at::empty({R}, x.options().dtype(acc)), s2 = at::empty({R}, x.options().dtype(acc));
  dispatch_float(x.scalar_type(), [&](auto tv) {
    using T = decltype(tv);
    using A = acc_type<T>;
    const T* xp = x.data_ptr<T>();
    const T* dyp = dy.data_ptr<T>();
    const A* cp = c.data_ptr<A>();
    A* s1p = s1.data_ptr<A>();
    A* s2p = s2.data_ptr<A>();
    const int64_t ldx = x.stride(0), lddy = dy.stride(0);
    at::parallel_for(0, R, row_grain(P), [&](int64_t r0, int64_t r1) {
      std::vector<A> xb(P), db(P);
      for (int64_t r = r0; r < r1; ++r) {
        to_acc(xp + r * ldx, xb.data(), P);
        to_acc(dyp + r * lddy, db.data(), P);
        const A cr = cp[r];
        A a1 = 0, a2 = 0;
        for (int64_t j = 0; j < P; ++j) {
          a1 += db[j];
          a2 += db[j] * (xb[j] - cr);  // centred: no cancellation when |mean| >> std
        }
        s1p[r] = a1;
        s2p[r] = a2;
      }
    });
  });
  return {s1, s2};
}

// ==== weight norm: rows of v (O, K) ======================================================================

constexpr const char* kWeightNormFwd = "weight_norm_fwd(Tensor v, Tensor g) -> (Tensor, Tensor)";
constexpr const char* kWeightNormBwd = "weight_norm_bwd(Tensor dw, Tensor v, Tensor g, Tensor norm) -> (Tensor, Tensor)";

std::tuple<at::Tensor, at::Tensor> weight_norm_fwd(const at::Tensor& v_in, const at::Tensor& g) {
  const at::Tensor v = v_in.contiguous();
  const auto acc = acc_scalar_type(v.scalar_type());
  const at::Tensor gc = g.to(acc).contiguous();
  const int64_t O = v.size(0), K = v.size(1);
  at::Tensor w = at::empty({O, K}, v.options()), norm = at::empty({O}, v.options().dtype(acc));
  dispatch_float(v.scalar_type(), [&](auto tv) {
    using T = decltype(tv);
    using A = acc_type<T>;
    const T* vp = v.data_ptr<T>();
    T* wp = w.data_ptr<T>();
    const A* gp = gc.data_ptr<A>();
    A* np = norm.data_ptr<A>();
    using V = Vectorized<A>;
    const bool stream = stream_output(O * K * int64_t(sizeof(T)));
    at::parallel_for(0, O, row_grain(K), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* a = vp + r * K;
        const A nrm = std::sqrt(vsum_sqdev(a, K, A(0)));
        np[r] = nrm;
        const V f(gp[r] / nrm);
        write_row<T, A>(wp + r * K, K, stream, [&](int64_t j, int64_t cnt) { return load_acc(a + j, cnt) * f; });
      }
      stream_fence(stream);
    });
  });
  return {w, norm};
}

std::tuple<at::Tensor, at::Tensor> weight_norm_bwd(const at::Tensor& dw_in, const at::Tensor& v_in,
                                                   const at::Tensor& g, const at::Tensor& norm) {
  const at::Tensor v = v_in.contiguous(), dw = dw_in.to(v_in.scalar_type()).contiguous();
  const auto acc = acc_scalar_type(v.scalar_type());
  const at::Tensor gc = g.to(acc).contiguous(), nc = norm.to(acc).contiguous();
  const int64_t O = v.size(0), K = v.size(1);
  at::Tensor dv = at::empty({O, K}, v.options()), dg = at::empty({O}, v.options().dtype(acc));
  dispatch_float(v.scalar_type(), [&](auto tv) {
    using T = decltype(tv);
    using A = acc_type<T>;
    const T* vp = v.data_ptr<T>();
    const T* dwp = dw.data_ptr<T>();
    T* dvp = dv.data_ptr<T>();
    const A* gp = gc.data_ptr<A>();
    const A* np = nc.data_ptr<A>();
    A* dgp = dg.data_ptr<A>();
    using V = Vectorized<A>;
    const bool stream = stream_output(O * K * int64_t(sizeof(T)));
    at::parallel_for(0, O, row_grain(K), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* av = vp + r * K;
        const T* ad = dwp + r * K;
        const A dot = vdot(ad, av, K);
        const A nrm = np[r], a = gp[r] / nrm, bcoef = a * dot / (nrm * nrm);
        dgp[r] = dot / nrm;
        const V va(a), vbc(bcoef);
        // dv = a * dw - bcoef * v
        write_row<T, A>(dvp + r * K, K, stream, [&](int64_t j, int64_t cnt) {
          return va * load_acc(ad + j, cnt) - vbc * load_acc(av + j, cnt);
        });
      }
      stream_fence(stream);
    });
  });
  return {dv, dg.to(g.scalar_type())};
}

// ==== channels-first LayerNorm: x (N, C, P), any strides ==================================================

constexpr const char* kLayerNormCfFwd =
    "layer_norm_cf_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)";
constexpr const char* kLayerNormCfBwd =
    "layer_norm_cf_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd) "
    "-> (Tensor, Tensor, Tensor)";

// Two layouts reach the kernels without a copy:
// - channels contiguous (the (N, C, P) view of a channels_last tensor): each pixel's C values are one row of
//   an (N * P, C) matrix, so this is LayerNorm over rows and the row kernels of layer_norm.cpp run it;
// - pixels contiguous (NCHW): a block of kPix pixels of one sample is read as C short vectors, one per
//   channel, and the vectors run along the pixels, so every reduction over C is a vector add (no horizontal
//   sums, no gathers). The block's (C, kPix) values are kept in an acc-type slab (L1 / L2) for the exact
//   second pass over centred values and for the output pass.
// Any other strides are first copied to the pixels-contiguous layout (rare: a 3-D input with odd strides).
constexpr int64_t kPix = 32;

// (N, C, P) x whose pixels, channel-innermost, form one row-major (N * P, C) matrix.
inline bool channels_are_rows(const at::Tensor& x) { return x.transpose(1, 2).is_contiguous(); }

// x itself if its pixels are contiguous (stride 1 along P), else a contiguous copy.
inline at::Tensor pixels_contiguous(const at::Tensor& x) {
  return x.size(2) <= 1 || x.stride(2) == 1 ? x : x.contiguous();
}

// The (N * P, C) row matrix of a channels_are_rows tensor, and back (same memory, x's strides).
inline at::Tensor as_rows(const at::Tensor& x) { return x.transpose(1, 2).reshape({x.size(0) * x.size(2), x.size(1)}); }
inline at::Tensor rows_as(const at::Tensor& rows, const at::Tensor& like) {
  return rows.as_strided(like.sizes(), like.strides());
}

// Lane counts of a block of np (<= kPix) pixels: vector v holds pixels [v * W, v * W + cnt[v]); lanes past np
// are loaded as zeros, which keeps every lane's arithmetic finite, and are never stored.
template <typename A>
struct PixelLanes {
  static constexpr int64_t W = Vectorized<A>::size();
  static constexpr int64_t kVecs = kPix / W;
  int64_t cnt[kVecs];
  explicit PixelLanes(int64_t np) {
    for (int64_t v = 0; v < kVecs; ++v) cnt[v] = std::clamp<int64_t>(np - v * W, 0, W);
  }
};

// One block of np pixels of one sample: x and y point at the block's channel-0 values, sx / sy are the channel
// strides. Writes y, and the block's mean / rstd (acc type, contiguous). slab: C * kPix acc values.
template <typename T, typename A>
void cf_fwd_block(const T* x, int64_t sx, T* y, int64_t sy, int64_t C, int64_t np, const A* w, const A* b, A eps,
                  A* slab, A* mean, A* rstd) {
  using V = Vectorized<A>;
  using L = PixelLanes<A>;
  constexpr int64_t W = L::W, kVecs = L::kVecs;
  const L lanes(np);
  const V vc(static_cast<A>(C));
  // The sum is taken relative to channel 0, so a constant pixel's mean is exactly its value.
  V k[kVecs], s[kVecs];
#pragma GCC unroll 8
  for (int64_t v = 0; v < kVecs; ++v) {
    k[v] = load_acc<T, A>(x + v * W, lanes.cnt[v]);
    s[v] = V(A(0));
  }
  for (int64_t c = 0; c < C; ++c) {
#pragma GCC unroll 8
    for (int64_t v = 0; v < kVecs; ++v) {
      const V xv = load_acc<T, A>(x + c * sx + v * W, lanes.cnt[v]);
      xv.store(slab + c * kPix + v * W);
      s[v] = s[v] + (xv - k[v]);
    }
  }
  V mu[kVecs], q[kVecs];
#pragma GCC unroll 8
  for (int64_t v = 0; v < kVecs; ++v) {
    mu[v] = k[v] + s[v] / vc;
    q[v] = V(A(0));
  }
  for (int64_t c = 0; c < C; ++c) {
#pragma GCC unroll 8
    for (int64_t v = 0; v < kVecs; ++v) {
      const V d = V::loadu(slab + c * kPix + v * W) - mu[v];
      q[v] = at::vec::fmadd(d, d, q[v]);
    }
  }
  V rs[kVecs];
#pragma GCC unroll 8
  for (int64_t v = 0; v < kVecs; ++v) {
    rs[v] = (q[v] / vc + V(eps)).rsqrt();
    if (lanes.cnt[v] > 0) {
      mu[v].store(mean + v * W, lanes.cnt[v]);
      rs[v].store(rstd + v * W, lanes.cnt[v]);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const V wc(w != nullptr ? w[c] : A(1)), bc(b != nullptr ? b[c] : A(0));
#pragma GCC unroll 8
    for (int64_t v = 0; v < kVecs; ++v) {
      const V xh = (V::loadu(slab + c * kPix + v * W) - mu[v]) * rs[v];
      store_acc<T, A>(y + c * sy + v * W, at::vec::fmadd(xh, wc, bc), lanes.cnt[v]);
    }
  }
}

// Backward of one block (pointers at channel 0 of the block, channel strides sx / sd / so). dw_lanes / db_lanes
// (C * W each, or null) accumulate per-lane sums of dy * xhat and dy over the pixels.
template <typename T, typename A>
void cf_bwd_block(const T* x, int64_t sx, const T* dy, int64_t sd, T* dx, int64_t so, int64_t C, int64_t np,
                  const A* w, const A* mean, const A* rstd, A* dw_lanes, A* db_lanes) {
  using V = Vectorized<A>;
  using L = PixelLanes<A>;
  constexpr int64_t W = L::W, kVecs = L::kVecs;
  const L lanes(np);
  const V vc(static_cast<A>(C));
  V mu[kVecs], rs[kVecs], e[kVecs];
#pragma GCC unroll 8
  for (int64_t v = 0; v < kVecs; ++v) {
    mu[v] = V::loadu(mean + v * W, lanes.cnt[v]);
    rs[v] = V::loadu(rstd + v * W, lanes.cnt[v]);
    e[v] = V(A(0));
  }
  // e = mean over channels of (x - mean): the saved mean's rounding, removed from xhat as in the LayerNorm
  // backward (dx cancels when |mean| >> std).
  for (int64_t c = 0; c < C; ++c) {
#pragma GCC unroll 8
    for (int64_t v = 0; v < kVecs; ++v) e[v] = e[v] + (load_acc<T, A>(x + c * sx + v * W, lanes.cnt[v]) - mu[v]);
  }
  V c1[kVecs], c2[kVecs];
#pragma GCC unroll 8
  for (int64_t v = 0; v < kVecs; ++v) {
    e[v] = e[v] / vc;
    c1[v] = c2[v] = V(A(0));
  }
  auto xhat = [&](int64_t c, int64_t v) {
    return ((load_acc<T, A>(x + c * sx + v * W, lanes.cnt[v]) - mu[v]) - e[v]) * rs[v];
  };
  for (int64_t c = 0; c < C; ++c) {
    const V wc(w != nullptr ? w[c] : A(1));
    V sw(A(0)), sb(A(0));
#pragma GCC unroll 8
    for (int64_t v = 0; v < kVecs; ++v) {
      const V xh = xhat(c, v);
      const V d = load_acc<T, A>(dy + c * sd + v * W, lanes.cnt[v]);
      const V g = d * wc;
      c1[v] = at::vec::fmadd(g, xh, c1[v]);
      c2[v] = c2[v] + g;
      sw = at::vec::fmadd(d, xh, sw);
      sb = sb + d;
    }
    if (dw_lanes != nullptr) (V::loadu(dw_lanes + c * W) + sw).store(dw_lanes + c * W);
    if (db_lanes != nullptr) (V::loadu(db_lanes + c * W) + sb).store(db_lanes + c * W);
  }
#pragma GCC unroll 8
  for (int64_t v = 0; v < kVecs; ++v) {
    c1[v] = c1[v] / vc;
    c2[v] = c2[v] / vc;
  }
  for (int64_t c = 0; c < C; ++c) {
    const V wc(w != nullptr ? w[c] : A(1));
#pragma GCC unroll 8
    for (int64_t v = 0; v < kVecs; ++v) {
      const V g = load_acc<T, A>(dy + c * sd + v * W, lanes.cnt[v]) * wc;
      const V out = ((g - xhat(c, v) * c1[v]) - c2[v]) * rs[v];
      store_acc<T, A>(dx + c * so + v * W, out, lanes.cnt[v]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cf_fwd(const at::Tensor& x_in,
                                                                 const c10::optional<at::Tensor>& weight,
                                                                 const c10::optional<at::Tensor>& bias,
                                                                 double eps) {
  TORCH_CHECK(x_in.dim() == 3, "fusednorm_C::layer_norm_cf_fwd: x must be (N, C, P)");
  const int64_t N = x_in.size(0), C = x_in.size(1), P = x_in.size(2);
  if (x_in.numel() > 0 && channels_are_rows(x_in)) {
    auto [y, mean, rstd] = FUSEDNORM_ISA::layer_norm_fwd(as_rows(x_in), weight, bias, eps, /*is_rms=*/false);
    return {rows_as(y, x_in), mean.view({N, P}), rstd.view({N, P})};
  }
  const auto acc = acc_scalar_type(x_in.scalar_type());
  const at::Tensor w = param_acc(weight, acc), b = param_acc(bias, acc);
  at::Tensor y = at::empty_like(x_in);
  at::Tensor mean = at::empty({N, P}, x_in.options().dtype(acc)), rstd = at::empty({N, P}, x_in.options().dtype(acc));
  if (x_in.numel() == 0) return {y, mean, rstd};
  const at::Tensor x = pixels_contiguous(x_in);
  at::Tensor yw = pixels_contiguous(y);  // y itself unless empty_like kept odd strides
  dispatch_float(x.scalar_type(), [&](auto tv) {
    using T = decltype(tv);
    using A = acc_type<T>;
    const T* xp = x.data_ptr<T>();
    T* yp = yw.data_ptr<T>();
    const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
    const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
    A* mp = mean.data_ptr<A>();
    A* rp = rstd.data_ptr<A>();
    const int64_t sxn = x.stride(0), sxc = x.stride(1), syn = yw.stride(0), syc = yw.stride(1);
    const int64_t pblocks = (P + kPix - 1) / kPix;
    at::parallel_for(0, N * pblocks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<A> slab(C * kPix);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / pblocks, p0 = (t % pblocks) * kPix;
        cf_fwd_block<T, A>(xp + n * sxn + p0, sxc, yp + n * syn + p0, syc, C, std::min(kPix, P - p0), wp, bp,
                           static_cast<A>(eps), slab.data(), mp + n * P + p0, rp + n * P + p0);
      }
    });
  });
  if (!yw.is_same(y)) y.copy_(yw);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_cf_bwd(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                                 const c10::optional<at::Tensor>& weight,
                                                                 const c10::optional<at::Tensor>& bias,
                                                                 const at::Tensor& mean, const at::Tensor& rstd) {
  const int64_t N = x_in.size(0), C = x_in.size(1), P = x_in.size(2);
  if (x_in.numel() > 0 && channels_are_rows(x_in)) {
    auto [dx, dw, db] = FUSEDNORM_ISA::layer_norm_bwd(as_rows(dy_in), as_rows(x_in), weight, bias,
                                                      mean.reshape({N * P}), rstd.reshape({N * P}), false);
    return {rows_as(dx, x_in), dw, db};
  }
  const auto acc = acc_scalar_type(x_in.scalar_type());
  const at::Tensor w = param_acc(weight, acc);
  const bool has_b = bias.has_value() && bias->defined();
  at::Tensor dx = at::empty_like(x_in);
  at::Tensor dw_acc = w.defined() ? at::zeros({C}, x_in.options().dtype(acc)) : at::Tensor();
  at::Tensor db_acc = has_b ? at::zeros({C}, x_in.options().dtype(acc)) : at::Tensor();
  if (x_in.numel() > 0) {
    const at::Tensor x = pixels_contiguous(x_in), dy = pixels_contiguous(dy_in.to(x_in.scalar_type()));
    const at::Tensor mc = mean.to(acc).contiguous(), rc = rstd.to(acc).contiguous();
    at::Tensor dxw = pixels_contiguous(dx);
    dispatch_float(x.scalar_type(), [&](auto tv) {
      using T = decltype(tv);
      using A = acc_type<T>;
      constexpr int64_t W = Vectorized<A>::size();
      const T* xp = x.data_ptr<T>();
      const T* dyp = dy.data_ptr<T>();
      T* dxp = dxw.data_ptr<T>();
      const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
      const A* mp = mc.data_ptr<A>();
      const A* rp = rc.data_ptr<A>();
      const int64_t sxn = x.stride(0), sxc = x.stride(1), sdn = dy.stride(0), sdc = dy.stride(1);
      const int64_t son = dxw.stride(0), soc = dxw.stride(1);
      const int64_t pblocks = (P + kPix - 1) / kPix, tiles = N * pblocks;
      const int64_t blocks = num_blocks(tiles);
      // Partial dW / dB per block of tiles (a fixed split, reduced in block order: deterministic).
      std::vector<A> pdw(wp ? blocks * C : 0), pdb(has_b ? blocks * C : 0);
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<A> dw_lanes(wp ? C * W : 0), db_lanes(has_b ? C * W : 0);
        for (int64_t blk = b0; blk < b1; ++blk) {
          std::fill(dw_lanes.begin(), dw_lanes.end(), A(0));
          std::fill(db_lanes.begin(), db_lanes.end(), A(0));
          const auto [t0, t1] = block_range(tiles, blocks, blk);
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t n = t / pblocks, p0 = (t % pblocks) * kPix;
            cf_bwd_block<T, A>(xp + n * sxn + p0, sxc, dyp + n * sdn + p0, sdc, dxp + n * son + p0, soc, C,
                               std::min(kPix, P - p0), wp, mp + n * P + p0, rp + n * P + p0,
                               wp ? dw_lanes.data() : nullptr, has_b ? db_lanes.data() : nullptr);
          }
          for (int64_t c = 0; c < C; ++c) {
            A sw = 0, sb = 0;
            for (int64_t l = 0; l < W; ++l) {
              if (wp) sw += dw_lanes[c * W + l];
              if (has_b) sb += db_lanes[c * W + l];
            }
            if (wp) pdw[blk * C + c] = sw;
            if (has_b) pdb[blk * C + c] = sb;
          }
        }
      });
      if (wp) sum_block_partials(pdw.data(), blocks, C, dw_acc.data_ptr<A>());
      if (has_b) sum_block_partials(pdb.data(), blocks, C, db_acc.data_ptr<A>());
    });
    if (!dxw.is_same(dx)) dx.copy_(dxw);
  }
  at::Tensor empty = at::empty({0}, x_in.options());
  return {dx, w.defined() ? dw_acc.to(weight->scalar_type()) : empty,
          has_b ? db_acc.to(bias->scalar_type()) : empty};
}


// ==== adaptive LayerNorm / RMSNorm: x (B, L, D), y = norm(x) * (1 + scale[b]) + shift[b] ==================

constexpr const char* kAdaNormFwd =
    "ada_norm_fwd(Tensor x, Tensor scale, Tensor shift, Tensor? weight, Tensor? bias, float eps, bool is_rms) "
    "-> (Tensor, Tensor, Tensor)";
constexpr const char* kAdaNormBwd =
    "ada_norm_bwd(Tensor dy, Tensor x, Tensor scale, Tensor shift, Tensor? weight, Tensor? bias, Tensor mean, "
    "Tensor rstd, bool is_rms) -> (Tensor, Tensor, Tensor, Tensor, Tensor)";

// Last dim contiguous (a copy only otherwise); any stride for the leading dims.
inline at::Tensor last_contig(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> ada_norm_fwd(const at::Tensor& x_in, const at::Tensor& scale_in,
                                                            const at::Tensor& shift_in,
                                                            const c10::optional<at::Tensor>& weight,
                                                            const c10::optional<at::Tensor>& bias, double eps,
                                                            bool is_rms) {
  TORCH_CHECK(x_in.dim() == 3, "fusednorm_C::ada_norm_fwd: x must be (B, L, D)");
  const at::Tensor x = last_contig(x_in);
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor w = param_acc(weight, acc), b = param_acc(bias, acc);
  const at::Tensor sc = scale_in.to(acc).contiguous(), sh = shift_in.to(acc).contiguous();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  at::Tensor y = at::empty({B, L, D}, x.options());
  at::Tensor mean = at::empty(is_rms ? at::IntArrayRef{0} : at::IntArrayRef{B, L}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({B, L}, x.options().dtype(acc));
  if (x.numel() == 0) return {y, mean, rstd};
  dispatch_float(x.scalar_type(), [&](auto tv) {
    using T = decltype(tv);
    using A = acc_type<T>;
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const A *wp = w.defined() ? w.data_ptr<A>() : nullptr, *bp = b.defined() ? b.data_ptr<A>() : nullptr;
    const A *scp = sc.data_ptr<A>(), *shp = sh.data_ptr<A>();
    A* mp = is_rms ? nullptr : mean.data_ptr<A>();
    A* rp = rstd.data_ptr<A>();
    const int64_t sb = x.stride(0), sl = x.stride(1);
    using V = Vectorized<A>;
    const bool stream = stream_output(B * L * D * int64_t(sizeof(T)));
    // x is read in its storage type and converted in registers (statistics, then the normalize pass from
    // cache), as in the LayerNorm forward: no fp32 copy of the row, and the output loop is vectorized.
    at::parallel_for(0, B * L, row_grain(D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t bi = r / L, li = r % L;
        const T* xr = xp + bi * sb + li * sl;
        A shift = 0, mu = 0, rs;  // xhat = ((x - shift) - mu) * rs
        if (is_rms) {
          rs = A(1) / std::sqrt(vsum_sqdev(xr, D, A(0)) / A(D) + A(eps));
        } else {
          const auto st = stats_contig(xr, D);
          shift = st.shift;
          mu = st.w.mean;
          rs = A(1) / std::sqrt(st.w.m2 / A(D) + A(eps));
          mp[r] = st.mean();
        }
        rp[r] = rs;
        const A* s1 = scp + bi * D;
        const A* s2 = shp + bi * D;
        const V vs(shift), vm(mu), vr(rs), one(A(1));
        write_row<T, A>(yp + r * D, D, stream, [&](int64_t j, int64_t cnt) {
          V v = ((load_acc<T, A>(xr + j, cnt) - vs) - vm) * vr;
          if (wp != nullptr) v = v * V::loadu(wp + j, cnt);
          if (bp != nullptr) v = v + V::loadu(bp + j, cnt);
          return at::vec::fmadd(v, one + V::loadu(s1 + j, cnt), V::loadu(s2 + j, cnt));
        });
      }
      stream_fence(stream);
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ada_norm_bwd(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, bool is_rms) {
  const at::Tensor x = last_contig(x_in), dy = last_contig(dy_in.to(x_in.scalar_type()));
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor w = param_acc(weight, acc), bb = param_acc(bias, acc);
  const at::Tensor sc = scale_in.to(acc).contiguous();
  const at::Tensor mc = is_rms ? mean : mean.to(acc).contiguous(), rc = rstd.to(acc).contiguous();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  at::Tensor dx = at::empty({B, L, D}, x.options());
  // Tasks: (batch, L-chunk) pairs, J chunks per batch; each writes its own partial rows, reduced in order.
  const int64_t J = std::max<int64_t>(1, std::min<int64_t>(L, kReductionSplits / std::max<int64_t>(B, 1)));
  const int64_t tasks = B * J;
  at::Tensor pscale = at::zeros({tasks, D}, x.options().dtype(acc)), pshift = at::zeros({tasks, D}, pscale.options());
  at::Tensor pw = at::zeros({w.defined() ? tasks : 0, D}, pscale.options());
  at::Tensor pb = at::zeros({bb.defined() ? tasks : 0, D}, pscale.options());
  if (x.numel() > 0) {
    dispatch_float(x.scalar_type(), [&](auto tv) {
      using T = decltype(tv);
      using A = acc_type<T>;
      const T* xp = x.data_ptr<T>();
      const T* dyp = dy.data_ptr<T>();
      T* dxp = dx.data_ptr<T>();
      const A *wp = w.defined() ? w.data_ptr<A>() : nullptr, *bp = bb.defined() ? bb.data_ptr<A>() : nullptr;
      const A* scp = sc.data_ptr<A>();
      const A* mp = is_rms ? nullptr : mc.data_ptr<A>();
      const A* rp = rc.data_ptr<A>();
      A *psc = pscale.data_ptr<A>(), *psh = pshift.data_ptr<A>();
      A* ppw = w.defined() ? pw.data_ptr<A>() : nullptr;
      A* ppb = bb.defined() ? pb.data_ptr<A>() : nullptr;
      const int64_t sxb = x.stride(0), sxl = x.stride(1), sdb = dy.stride(0), sdl = dy.stride(1);
      using V = Vectorized<A>;
      constexpr int64_t W = V::size();
      at::parallel_for(0, tasks, 1, [&](int64_t k0, int64_t k1) {
        std::vector<A> xh(D), g(D);
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t bi = k / J;
          const auto [l0, l1] = block_range(L, J, k % J);
          const A* s1 = scp + bi * D;
          A *dsc = psc + k * D, *dsh = psh + k * D;
          A* dwr = ppw ? ppw + k * D : nullptr;
          A* dbr = ppb ? ppb + k * D : nullptr;
          for (int64_t li = l0; li < l1; ++li) {
            const int64_t r = bi * L + li;
            to_acc(xp + bi * sxb + li * sxl, xh.data(), D);
            to_acc(dyp + bi * sdb + li * sdl, g.data(), D);
            const A mu = is_rms ? A(0) : mp[r], rs = rp[r];
            // e = mean(x - mean), the saved mean's rounding, removed from xhat as in the LayerNorm backward.
            const A e = is_rms ? A(0) : vsum_shifted(xh.data(), D, mu) / A(D);
            // One vectorized pass: the column partials, and c1 = sum(g * xhat), c2 = sum(g) in vector lanes
            // (a scalar loop here cannot be vectorized by the compiler: its sums are ordered reductions).
            // Lanes past the row's end load as zero, so their g is zero and they add nothing to c1 / c2.
            const V vmu(mu), ve(e), vrs(rs), one(A(1));
            V c1v(A(0)), c2v(A(0));
            for (int64_t j = 0; j < D; j += W) {
              const int64_t cnt = std::min<int64_t>(W, D - j);
              const V xv = ((V::loadu(xh.data() + j, cnt) - vmu) - ve) * vrs;
              const V d = V::loadu(g.data() + j, cnt);
              V nrm = wp ? xv * V::loadu(wp + j, cnt) : xv;
              if (bp) nrm = nrm + V::loadu(bp + j, cnt);
              at::vec::fmadd(d, nrm, V::loadu(dsc + j, cnt)).store(dsc + j, cnt);
              (V::loadu(dsh + j, cnt) + d).store(dsh + j, cnt);
              const V dn = d * (one + V::loadu(s1 + j, cnt));
              if (dwr) at::vec::fmadd(dn, xv, V::loadu(dwr + j, cnt)).store(dwr + j, cnt);
              if (dbr) (V::loadu(dbr + j, cnt) + dn).store(dbr + j, cnt);
              const V gg = wp ? dn * V::loadu(wp + j, cnt) : dn;
              c1v = at::vec::fmadd(gg, xv, c1v);
              c2v = c2v + gg;
              xv.store(xh.data() + j, cnt);
              gg.store(g.data() + j, cnt);
            }
            A c1 = horizontal_sum(c1v), c2 = horizontal_sum(c2v);
            c1 /= A(D);
            c2 = is_rms ? A(0) : c2 / A(D);
            for (int64_t j = 0; j < D; ++j) g[j] = (g[j] - xh[j] * c1 - c2) * rs;
            from_acc(g.data(), dxp + r * D, D);
          }
        }
      });
    });
  }
  // deterministic reductions of the task partials, in task order
  at::Tensor dscale = pscale.view({B, J, D}).sum(1).to(scale_in.scalar_type());
  at::Tensor dshift = pshift.view({B, J, D}).sum(1).to(shift_in.scalar_type());
  at::Tensor empty = at::empty({0}, x.options());
  at::Tensor dw = w.defined() ? pw.sum(0).to(weight->scalar_type()) : empty;
  at::Tensor db = bb.defined() ? pb.sum(0).to(bias->scalar_type()) : empty;
  return {dx, dscale, dshift, dw, db};
}

// Registers this copy's implementations (called by the baseline copy's TORCH_LIBRARY_IMPL below).
void register_cpu_impls(torch::Library& m) {
  m.impl("add_norm_fwd", &add_norm_fwd);
  m.impl("add_norm_bwd", &add_norm_bwd);
  m.impl("plane_stats", &plane_stats);
  m.impl("plane_affine", &plane_affine);
  m.impl("plane_bwd_reduce", &plane_bwd_reduce);
  m.impl("plane_bwd_dx", &plane_bwd_dx);
  m.impl("weight_norm_fwd", &weight_norm_fwd);
  m.impl("weight_norm_bwd", &weight_norm_bwd);
  m.impl("layer_norm_cf_fwd", &layer_norm_cf_fwd);
  m.impl("layer_norm_cf_bwd", &layer_norm_cf_bwd);
  m.impl("ada_norm_fwd", &ada_norm_fwd);
  m.impl("ada_norm_bwd", &ada_norm_bwd);
}

}  // namespace variants
}  // namespace FUSEDNORM_ISA
}  // namespace cpu
}  // namespace fusednorm

#if !defined(FUSEDNORM_ISA_COPY)
// ---- registration (baseline copy only) ------------------------------------------------------------
#if defined(FUSEDNORM_HAVE_AVX2)
namespace fusednorm::cpu::avx2::variants {
void register_cpu_impls(torch::Library& m);
}
#endif
#if defined(FUSEDNORM_HAVE_AVX512BF16)
namespace fusednorm::cpu::avx512bf16::variants {
void register_cpu_impls(torch::Library& m);
}
#endif

TORCH_LIBRARY_FRAGMENT(fusednorm_C, m) {
  m.def(fusednorm::cpu::base::variants::kAddNormFwd);
  m.def(fusednorm::cpu::base::variants::kAddNormBwd);
  m.def(fusednorm::cpu::base::variants::kPlaneStats);
  m.def(fusednorm::cpu::base::variants::kPlaneAffine);
  m.def(fusednorm::cpu::base::variants::kPlaneBwdReduce);
  m.def(fusednorm::cpu::base::variants::kPlaneBwdDx);
  m.def(fusednorm::cpu::base::variants::kWeightNormFwd);
  m.def(fusednorm::cpu::base::variants::kWeightNormBwd);
  m.def(fusednorm::cpu::base::variants::kLayerNormCfFwd);
  m.def(fusednorm::cpu::base::variants::kLayerNormCfBwd);
  m.def(fusednorm::cpu::base::variants::kAdaNormFwd);
  m.def(fusednorm::cpu::base::variants::kAdaNormBwd);
}

TORCH_LIBRARY_IMPL(fusednorm_C, CPU, m) {
#if defined(FUSEDNORM_HAVE_AVX512BF16)
  if (fusednorm::cpu_isa_level() >= fusednorm::CpuIsa::kAvx512Bf16) {
    fusednorm::cpu::avx512bf16::variants::register_cpu_impls(m);
    return;
  }
#endif
#if defined(FUSEDNORM_HAVE_AVX2)
  if (fusednorm::cpu_isa_level() >= fusednorm::CpuIsa::kAvx2) {
    fusednorm::cpu::avx2::variants::register_cpu_impls(m);
    return;
  }
#endif
  fusednorm::cpu::base::variants::register_cpu_impls(m);
}
#endif
