// BatchNorm CPU kernels: per-channel statistics, the normalize/affine apply, and the two backward pieces
// (per-channel reductions, then the elementwise input gradient), for NCHW and channels-last inputs.
//
// Reductions are split into fixed pieces (NCHW: one per (n, c) plane; NHWC: one per (sample, block)
// task), each producing a partial that is merged in a fixed order: Chan merges for statistics, plain
// ordered sums for the backward. Results are bit-identical run to run, whatever the thread count.
#include "cpu/isa_prelude.h"
// (isa_prelude.h must come first: it selects the instruction set of this translation unit.)
#include "cpu/nc_utils.h"
#include "ops.h"

namespace fusednorm {
namespace cpu {
namespace FUSEDNORM_ISA {

namespace {

template <typename T>
void bn_stats_kernel(const at::Tensor& x, Layout layout, at::Tensor& mean, at::Tensor& m2) {
  using A = acc_type<T>;
  const NCShape shp = nc_shape(x);
  const int64_t N = shp.N, C = shp.C, HW = shp.HW;
  const T* xp = x.data_ptr<T>();
  A* meanp = mean.data_ptr<A>();
  A* m2p = m2.data_ptr<A>();
  if (layout == Layout::kNCHW) {
    std::vector<A> pm(N * C), pm2(N * C);  // [c][n]
    const int64_t grain = std::max<int64_t>(1, 4 * kChunk / std::max<int64_t>(HW, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / C, c = p % C;
        const auto st = stats_contig(xp + p * HW, HW);
        pm[c * N + n] = st.mean();
        pm2[c * N + n] = st.w.m2;
      }
    });
    at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const auto s = welford_merge_all<A, int64_t>(N, [&](int64_t n) {
          return welford_from_chunk<A, int64_t>(HW, pm[c * N + n], pm2[c * N + n]);
        });
        meanp[c] = s.n > 0 ? s.mean : A(NAN);
        m2p[c] = s.m2;
      }
    });
  } else {
    const int64_t nblk = nhwc_blocks_per_sample(N, HW, C);
    const int64_t tasks = N * nblk;
    std::vector<A> pm(tasks * C), pm2(tasks * C);
    std::vector<int64_t> pc(tasks);
    nhwc_channel_stats<T, A>(xp, N, HW, C, nblk, pm.data(), pm2.data(), pc.data());
    at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
      const int64_t cnt = merge_channel_partials<A>(pm.data() + c0, pm2.data() + c0, pc.data(), tasks, C, c1 - c0,
                                                    meanp + c0, m2p + c0);
      if (cnt == 0) std::fill(meanp + c0, meanp + c1, A(NAN));
    });
  }
}

template <typename T>
void bn_apply_kernel(const at::Tensor& x, Layout layout, const at::Tensor& mean, const at::Tensor& rstd,
                     const at::Tensor& w, const at::Tensor& b, at::Tensor& y) {
  using A = acc_type<T>;
  const NCShape shp = nc_shape(x);
  const int64_t N = shp.N, C = shp.C, HW = shp.HW;
  // Per-channel coefficients: y = (x - mu) * scale + shift.
  std::vector<A> mu(C), sc(C), sh(C);
  const A* meanp = mean.data_ptr<A>();
  const A* rstdp = rstd.data_ptr<A>();
  const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
  const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
  // Channels where mean_foldable take the mean into the shift: when all do, the channels-last pass loads two
  // coefficient vectors per vector of x instead of three.
  bool all_folded = true;
  for (int64_t c = 0; c < C; ++c) {
    const A s = wp ? rstdp[c] * wp[c] : rstdp[c], t = bp ? bp[c] : A(0);
    const bool fold = mean_foldable(meanp[c], rstdp[c]);
    all_folded = all_folded && fold;
    mu[c] = fold ? A(0) : meanp[c];
    sc[c] = s;
    sh[c] = fold ? t - meanp[c] * s : t;
  }
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  using V = Vectorized<A>;
  if (layout == Layout::kNCHW) {
    nchw_map<T, A>(xp, nullptr, yp, N * C, HW, [&](int64_t p) {
      const int64_t c = p % C;
      const V vmu(mu[c]), vsc(sc[c]), vsh(sh[c]);
      return [=](int64_t, int64_t, const V& a, const V&) { return at::vec::fmadd(a - vmu, vsc, vsh); };
    });
  } else {
    const A *mup = mu.data(), *scp = sc.data(), *shp = sh.data();
    auto apply = [&](auto folded) {
      nhwc_map<T, A>(xp, nullptr, yp, N, HW, C, [&](int64_t) {
        return [=](int64_t j, int64_t k, const V& a, const V&) {
          const V xc = decltype(folded)::value ? a : a - V::loadu(mup + j, k);
          return at::vec::fmadd(xc, V::loadu(scp + j, k), V::loadu(shp + j, k));
        };
      });
    };
    all_folded ? apply(std::true_type()) : apply(std::false_type());
  }
}

template <typename T>
void bn_bwd_reduce_kernel(const at::Tensor& dy, const at::Tensor& x, Layout layout, const at::Tensor& mean,
                          const at::Tensor& rstd, at::Tensor& sum_dy, at::Tensor& sum_dy_xhat) {
  using A = acc_type<T>;
  using V = Vectorized<A>;
  const NCShape shp = nc_shape(x);
  const int64_t N = shp.N, C = shp.C, HW = shp.HW;
  const T* xp = x.data_ptr<T>();
  const T* dyp = dy.data_ptr<T>();
  const A* meanp = mean.data_ptr<A>();
  const A* rstdp = rstd.data_ptr<A>();
  A* s1o = sum_dy.data_ptr<A>();
  A* s2o = sum_dy_xhat.data_ptr<A>();
  if (layout == Layout::kNCHW) {
    std::vector<A> p1(N * C), p2(N * C);  // [c][n]
    const int64_t grain = std::max<int64_t>(1, 4 * kChunk / std::max<int64_t>(HW, 1));
    at::parallel_for(0, N * C, grain, [&](int64_t q0, int64_t q1) {
      for (int64_t p = q0; p < q1; ++p) {
        const int64_t n = p / C, c = p % C;
        const V vmu(meanp[c]), vrs(rstdp[c]);
        V a1[2] = {V(A(0)), V(A(0))}, a2[2] = {V(A(0)), V(A(0))};  // see for_vectors_2way
        const T* px = xp + p * HW;
        const T* pdy = dyp + p * HW;
        for_vectors_2way<A>(HW, [&](int64_t j, int64_t k, int u) {
          const V d = load_acc(pdy + j, k);  // zero past k: the tail adds nothing
          a1[u] = a1[u] + d;
          a2[u] = at::vec::fmadd(d, (load_acc(px + j, k) - vmu) * vrs, a2[u]);
        });
        p1[c * N + n] = horizontal_sum(a1[0] + a1[1]);
        p2[c * N + n] = horizontal_sum(a2[0] + a2[1]);
      }
    });
    at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        A t1 = 0, t2 = 0;
        for (int64_t n = 0; n < N; ++n) {
          t1 += p1[c * N + n];
          t2 += p2[c * N + n];
        }
        s1o[c] = t1;
        s2o[c] = t2;
      }
    });
  } else {
    const int64_t nblk = nhwc_blocks_per_sample(N, HW, C);
    const int64_t tasks = N * nblk;
    std::vector<A> p1(tasks * C), p2(tasks * C);
    nhwc_channel_sums<T, A>(xp, dyp, N, HW, C, nblk, p1.data(), p2.data(), nullptr,
                            [&](int64_t, int64_t j, int64_t k, const V& xv, const V& d, V& a1, V& a2, V&) {
                              const V xh = (xv - V::loadu(meanp + j, k)) * V::loadu(rstdp + j, k);
                              a1 = a1 + d;
                              a2 = at::vec::fmadd(d, xh, a2);
                            });
    for (int64_t c = 0; c < C; ++c) {
      s1o[c] = 0;
      s2o[c] = 0;
    }
    for (int64_t t = 0; t < tasks; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        s1o[c] += p1[t * C + c];
        s2o[c] += p2[t * C + c];
      }
    }
  }
}

template <typename T>
void bn_bwd_dx_kernel(const at::Tensor& dy, const at::Tensor& x, Layout layout, const at::Tensor& mean,
                      const at::Tensor& rstd, const at::Tensor& w, const at::Tensor& sum_dy,
                      const at::Tensor& sum_dy_xhat, int64_t count, bool training, at::Tensor& dx) {
  using A = acc_type<T>;
  using V = Vectorized<A>;
  const NCShape shp = nc_shape(x);
  const int64_t N = shp.N, C = shp.C, HW = shp.HW;
  // dx = (dy - a - (x - mu) * bb) * k  with k = rstd * w, a = sum_dy / count, bb = sum_dy_xhat / count * rstd.
  std::vector<A> mu(C, A(0)), k(C), a(C, A(0)), bb(C, A(0));
  const A* rstdp = rstd.data_ptr<A>();
  const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
  for (int64_t c = 0; c < C; ++c) k[c] = wp ? rstdp[c] * wp[c] : rstdp[c];
  if (training) {
    const A* meanp = mean.data_ptr<A>();
    const A* s1 = sum_dy.data_ptr<A>();
    const A* s2 = sum_dy_xhat.data_ptr<A>();
    for (int64_t c = 0; c < C; ++c) {
      mu[c] = meanp[c];
      a[c] = s1[c] / A(count);
      bb[c] = s2[c] / A(count) * rstdp[c];
    }
  }
  const T* xp = x.data_ptr<T>();
  const T* dyp = dy.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
  // dy is the mapped input and x the second one.
  if (layout == Layout::kNCHW) {
    nchw_map<T, A>(dyp, training ? xp : nullptr, dxp, N * C, HW, [&](int64_t p) {
      const int64_t c = p % C;
      const V vk(k[c]), vmu(mu[c]), va(a[c]), vbb(bb[c]);
      return [=](int64_t, int64_t, const V& d, const V& xv) {
        return training ? (d - va - (xv - vmu) * vbb) * vk : d * vk;
      };
    });
  } else {
    const A *kp = k.data(), *mup = mu.data(), *ap = a.data(), *bbp = bb.data();
    // Training, with every channel mean_foldable: the mean folded in, dx = dy * k + x * kb + kc, three
    // coefficient vectors per vector instead of four.
    bool fold = training;
    for (int64_t c = 0; c < C && fold; ++c) fold = mean_foldable(mu[c], rstdp[c]);
    if (fold) {
      std::vector<A> kb(C), kc(C);
      for (int64_t c = 0; c < C; ++c) {
        kb[c] = -k[c] * bb[c];
        kc[c] = k[c] * (bb[c] * mu[c] - a[c]);
      }
      const A *kbp = kb.data(), *kcp = kc.data();
      nhwc_map<T, A>(dyp, xp, dxp, N, HW, C, [&](int64_t) {
        return [=](int64_t j, int64_t n, const V& d, const V& xv) {
          return at::vec::fmadd(d, V::loadu(kp + j, n), at::vec::fmadd(xv, V::loadu(kbp + j, n), V::loadu(kcp + j, n)));
        };
      });
      return;
    }
    nhwc_map<T, A>(dyp, training ? xp : nullptr, dxp, N, HW, C, [&](int64_t) {
      return [=](int64_t j, int64_t n, const V& d, const V& xv) {
        const V r = training ? d - V::loadu(ap + j, n) - (xv - V::loadu(mup + j, n)) * V::loadu(bbp + j, n) : d;
        return r * V::loadu(kp + j, n);
      };
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() >= 2, "fusednorm_C::batch_norm_stats: x must be (N, C, *spatial)");
  const auto lx = activation_layout(x_in);
  const Layout layout = lx.first;
  const at::Tensor& x = lx.second;
  const auto acc = acc_scalar_type(x.scalar_type());
  at::Tensor mean = at::empty({x.size(1)}, x.options().dtype(acc));
  at::Tensor m2 = at::empty({x.size(1)}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_stats", [&] {
    bn_stats_kernel<scalar_t>(x, layout, mean, m2);
  });
  return {mean, m2};
}

at::Tensor batch_norm_apply(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& rstd,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() >= 2, "fusednorm_C::batch_norm_apply: x must be (N, C, *spatial)");
  const auto lx = activation_layout(x_in);
  const Layout layout = lx.first;
  const at::Tensor& x = lx.second;
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor w = param_acc(weight, acc), b = param_acc(bias, acc);
  const at::Tensor mu = mean.to(acc).contiguous(), rs = rstd.to(acc).contiguous();
  at::Tensor y = at::empty_like(x, memory_format_of(layout, x.dim()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_apply", [&] {
    bn_apply_kernel<scalar_t>(x, layout, mu, rs, w, b, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce(const at::Tensor& dy, const at::Tensor& x_in,
                                                         const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(x_in.dim() >= 2 && dy.sizes() == x_in.sizes(),
              "fusednorm_C::batch_norm_bwd_reduce: dy and x must be (N, C, *spatial) of the same shape");
  const auto lx = activation_layout(x_in);
  const Layout layout = lx.first;
  const at::Tensor& x = lx.second;
  const at::Tensor dyc = in_layout(dy.to(x.scalar_type()), layout);
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor mu = mean.to(acc).contiguous(), rs = rstd.to(acc).contiguous();
  at::Tensor s1 = at::empty({x.size(1)}, x.options().dtype(acc));
  at::Tensor s2 = at::empty({x.size(1)}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_bwd_reduce", [&] {
    bn_bwd_reduce_kernel<scalar_t>(dyc, x, layout, mu, rs, s1, s2);
  });
  return {s1, s2};
}

at::Tensor batch_norm_bwd_dx(const at::Tensor& dy, const at::Tensor& x_in, const at::Tensor& mean,
                             const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                             const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat, int64_t count,
                             bool training) {
  TORCH_CHECK(x_in.dim() >= 2 && dy.sizes() == x_in.sizes(),
              "fusednorm_C::batch_norm_bwd_dx: dy and x must be (N, C, *spatial) of the same shape");
  const auto lx = activation_layout(x_in);
  const Layout layout = lx.first;
  const at::Tensor& x = lx.second;
  const at::Tensor dyc = in_layout(dy.to(x.scalar_type()), layout);
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor w = param_acc(weight, acc);
  const at::Tensor rs = rstd.to(acc).contiguous();
  at::Tensor mu, s1, s2;
  if (training) {
    mu = mean.to(acc).contiguous();
    s1 = sum_dy.to(acc).contiguous();
    s2 = sum_dy_xhat.to(acc).contiguous();
  }
  at::Tensor dx = at::empty_like(x, memory_format_of(layout, x.dim()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_bwd_dx", [&] {
    bn_bwd_dx_kernel<scalar_t>(dyc, x, layout, mu, rs, w, s1, s2, count, training, dx);
  });
  return dx;
}

}  // namespace FUSEDNORM_ISA
}  // namespace cpu
}  // namespace fusednorm

#if !defined(FUSEDNORM_ISA_COPY)
// ---- registration (baseline copy only) ------------------------------------------------------------
#include <torch/library.h>

#include "cpu/dispatch.h"

namespace fusednorm {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& x) {
  FUSEDNORM_CPU_CALL(batch_norm_stats, x);
}

at::Tensor batch_norm_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
  FUSEDNORM_CPU_CALL(batch_norm_apply, x, mean, rstd, weight, bias);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                             const at::Tensor& mean, const at::Tensor& rstd) {
  FUSEDNORM_CPU_CALL(batch_norm_bwd_reduce, dy, x, mean, rstd);
}

at::Tensor batch_norm_bwd_dx_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                 const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat, int64_t count,
                                 bool training) {
  FUSEDNORM_CPU_CALL(batch_norm_bwd_dx, dy, x, mean, rstd, weight, sum_dy, sum_dy_xhat, count, training);
}

}  // namespace
}  // namespace cpu
}  // namespace fusednorm

TORCH_LIBRARY_FRAGMENT(fusednorm_C, m) {
  m.def(fusednorm::schema::kBatchNormStats);
  m.def(fusednorm::schema::kBatchNormApply);
  m.def(fusednorm::schema::kBatchNormBwdReduce);
  m.def(fusednorm::schema::kBatchNormBwdDx);
}

TORCH_LIBRARY_IMPL(fusednorm_C, CPU, m) {
  m.impl("batch_norm_stats", &fusednorm::cpu::batch_norm_stats_cpu);
  m.impl("batch_norm_apply", &fusednorm::cpu::batch_norm_apply_cpu);
  m.impl("batch_norm_bwd_reduce", &fusednorm::cpu::batch_norm_bwd_reduce_cpu);
  m.impl("batch_norm_bwd_dx", &fusednorm::cpu::batch_norm_bwd_dx_cpu);
}
#endif
