// GroupNorm CPU kernels (InstanceNorm is GroupNorm with num_groups == C), with an optional fused SiLU,
// for NCHW and channels-last (4-D and 5-D) inputs.
//
// NCHW: a (sample, group) slice is one contiguous span, so each task computes the slice's statistics
// (exact per chunk, Chan-merged) and normalizes it right away while it is still in L2.
// NHWC: per-channel Welford partials per (sample, block) task are Chan-merged over the blocks (vectorized
// over channels), then over the group's channels, and a second pass normalizes. The backward recomputes
// xhat from the saved mean/rstd (no E[xy] - E[x]E[y] cancellation); dW/dB are sums of per-(n, c) partials
// taken in a fixed order.
#include "cpu/isa_prelude.h"
// (isa_prelude.h must come first: it selects the instruction set of this translation unit.)
#include "cpu/nc_utils.h"
#include "ops.h"

namespace fusednorm {
namespace cpu {
namespace FUSEDNORM_ISA {

namespace {

bool parse_activation(c10::string_view activation) {
  TORCH_CHECK(activation == "none" || activation == "silu",
              "fusednorm_C::group_norm: activation must be 'none' or 'silu', got '", std::string(activation), "'");
  return activation == "silu";
}

template <typename T>
void gn_fwd_kernel(const at::Tensor& x, Layout layout, const at::Tensor& w, const at::Tensor& b, int64_t G,
                   double eps, bool silu, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  using A = acc_type<T>;
  using V = Vectorized<A>;
  const NCShape shp = nc_shape(x);
  const int64_t N = shp.N, C = shp.C, HW = shp.HW, D = C / G;
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
  const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
  A* meanp = mean.data_ptr<A>();
  A* rstdp = rstd.data_ptr<A>();
  const int64_t m = D * HW;  // elements per group
  if (layout == Layout::kNCHW) {
    const bool stream = stream_output(x.numel() * int64_t(sizeof(T)));
    at::parallel_for(0, N * G, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / G, g = i % G;
        const int64_t base = (n * C + g * D) * HW;
        const auto st = stats_contig(xp + base, m);
        const A rs = A(1) / std::sqrt(st.w.m2 / A(m) + A(eps));
        meanp[i] = m > 0 ? st.mean() : A(NAN);
        rstdp[i] = rs;
        // Second pass (the group is still in L2): y = act(((x - k) - mu) * scale + shift).
        const V vk(st.shift), vmu(st.w.mean);
        for (int64_t cc = 0; cc < D; ++cc) {
          const int64_t c = g * D + cc;
          const V vsc(wp ? rs * wp[c] : rs), vsh(bp ? bp[c] : A(0));
          const int64_t pos = base + cc * HW;
          map_span<T, A>(xp + pos, nullptr, yp + pos, HW, stream, [&](int64_t, int64_t, const V& a, const V&) {
            const V v = at::vec::fmadd((a - vk) - vmu, vsc, vsh);
            return silu ? vsilu(v) : v;
          });
        }
      }
      stream_fence(stream);
    });
    return;
  }
  // NHWC: channel partials per (sample, block), merged over blocks and then over the channels of a group; a
  // second pass normalizes. Samples go in steps of about 8 MiB so that a step's x is still in the last-level
  // cache when the normalize pass reads it again: x then comes from memory once, as in the NCHW path.
  const int64_t sample_bytes = std::max<int64_t>(1, HW * C * int64_t(sizeof(T)));
  const int64_t step = std::max<int64_t>(1, (int64_t(8) << 20) / sample_bytes);
  // Per (n, c) coefficients of the normalize pass: y = act((x - mu) * scale + shift).
  std::vector<A> cmu(N * C), csc(N * C), csh(N * C);
  std::vector<A> chm(C), chm2(C);  // one sample's per-channel statistics, merged over its blocks
  for (int64_t n0 = 0; n0 < N; n0 += step) {
    const int64_t ns = std::min(step, N - n0);
    const int64_t nblk = nhwc_blocks_per_sample(ns, HW, C);
    std::vector<A> pm(ns * nblk * C), pm2(ns * nblk * C);
    std::vector<int64_t> pc(ns * nblk);
    nhwc_channel_stats<T, A>(xp + n0 * HW * C, ns, HW, C, nblk, pm.data(), pm2.data(), pc.data());
    // Groups where mean_foldable take the mean into the shift, so the pass loads two coefficient vectors
    // instead of three: statistics + normalize of 8 MiB fp32 (NHWC, C = 512, two threads, a standalone
    // microbenchmark) 710-820 -> 600-680 us.
    bool all_folded = true;
    for (int64_t nl = 0; nl < ns; ++nl) {
      const int64_t n = n0 + nl;
      const int64_t cnt = merge_channel_partials<A>(pm.data() + nl * nblk * C, pm2.data() + nl * nblk * C,
                                                    pc.data() + nl * nblk, nblk, C, C, chm.data(), chm2.data());
      for (int64_t g = 0; g < G; ++g) {
        const auto st = welford_merge_all<A, int64_t>(D, [&](int64_t q) {
          return welford_from_chunk<A, int64_t>(cnt, chm[g * D + q], chm2[g * D + q]);
        });
        const A mu = m > 0 ? st.mean : A(NAN);
        const A rs = A(1) / std::sqrt(st.m2 / A(m) + A(eps));
        meanp[n * G + g] = mu;
        rstdp[n * G + g] = rs;
        const bool fold = mean_foldable(mu, rs);
        all_folded = all_folded && fold;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          const A sc = wp ? rs * wp[c] : rs, sh = bp ? bp[c] : A(0);
          cmu[n * C + c] = fold ? A(0) : mu;
          csc[n * C + c] = sc;
          csh[n * C + c] = fold ? sh - mu * sc : sh;
        }
      }
    }
    // SiLU and the fold as compile-time flags: the per-vector loop then holds only what it computes.
    auto normalize = [&](auto act, auto folded) {
      constexpr bool kSilu = decltype(act)::value, kFolded = decltype(folded)::value;
      nhwc_map<T, A>(xp + n0 * HW * C, nullptr, yp + n0 * HW * C, ns, HW, C, [&](int64_t nl) {
        const int64_t k = (n0 + nl) * C;
        const A *mup = cmu.data() + k, *scp = csc.data() + k, *shp = csh.data() + k;
        return [=](int64_t j, int64_t cnt, const V& a, const V&) {
          const V xc = kFolded ? a : a - V::loadu(mup + j, cnt);
          const V v = at::vec::fmadd(xc, V::loadu(scp + j, cnt), V::loadu(shp + j, cnt));
          if constexpr (kSilu) {
            return vsilu(v);
          } else {
            return v;
          }
        };
      }, x.numel() * int64_t(sizeof(T)));
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (silu) {
      all_folded ? normalize(Yes(), Yes()) : normalize(Yes(), No());
    } else {
      all_folded ? normalize(No(), Yes()) : normalize(No(), No());
    }
  }
}

template <typename T>
void gn_bwd_kernel(const at::Tensor& dy, const at::Tensor& x, Layout layout, const at::Tensor& w,
                   const at::Tensor& b, const at::Tensor& mean, const at::Tensor& rstd, int64_t G, bool silu,
                   at::Tensor& dx, at::Tensor& dw_acc, at::Tensor& db_acc) {
  using A = acc_type<T>;
  using V = Vectorized<A>;
  const NCShape shp = nc_shape(x);
  const int64_t N = shp.N, C = shp.C, HW = shp.HW, D = C / G;
  const int64_t m = D * HW;
  const T* xp = x.data_ptr<T>();
  const T* dyp = dy.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
  const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
  const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
  const A* meanp = mean.data_ptr<A>();
  const A* rstdp = rstd.data_ptr<A>();
  // Per (n, c): sum of the effective output gradient (after SiLU's backward) and of its product with xhat.
  std::vector<A> sdy(N * C), sdyxh(N * C);
  // Per (n, c) coefficients: mean, rstd, weight, bias broadcast to channels, and the group terms c1, c2.
  std::vector<A> c1v(N * C), c2v(N * C);
  auto wc = [&](int64_t c) { return wp ? wp[c] : A(1); };
  auto bc = [&](int64_t c) { return bp ? bp[c] : A(0); };

  if (layout == Layout::kNCHW) {
    const bool stream = stream_output(x.numel() * int64_t(sizeof(T)));
    // With SiLU, pass 1's effective gradients de are kept for pass 2 when the group fits in L2 as floats,
    // instead of evaluating the SiLU derivative (an exp and two divisions) a second time.
    constexpr int64_t kDeCacheElems = 64 * 1024;
    const bool cache_de = silu && m <= kDeCacheElems;
    at::parallel_for(0, N * G, 1, [&](int64_t i0, int64_t i1) {
      std::vector<A> debuf(cache_de ? m : 0);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / G, g = i % G;
        const A mu = meanp[i], rs = rstdp[i];
        const V vmu(mu), vrs(rs);
        // Pass 1: per-channel sums of de and de * xhat, and the group's sum of x - mean.
        A s3 = 0;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          const V vw(wc(c)), vb(bc(c));
          // Two sets of accumulators (see for_vectors_2way): the group is in L2, so the loop is latency-bound.
          V a1[2] = {V(A(0)), V(A(0))}, a2[2] = {V(A(0)), V(A(0))}, a3[2] = {V(A(0)), V(A(0))};
          const T* px = xp + (n * C + c) * HW;
          const T* pdy = dyp + (n * C + c) * HW;
          A* dec = cache_de ? debuf.data() + (c - g * D) * HW : nullptr;
          for_vectors_2way<A>(HW, [&](int64_t j, int64_t k, int u) {
            const V xc = V::set(V(A(0)), load_acc(px + j, k) - vmu, k);  // zero past k
            const V xh = xc * vrs;
            V de = load_acc(pdy + j, k);  // zero past k: the tail adds nothing
            if (silu) de = de * vsilu_grad(at::vec::fmadd(xh, vw, vb));
            if (cache_de) de.store(dec + j, k);
            a1[u] = a1[u] + de;
            a2[u] = at::vec::fmadd(de, xh, a2[u]);
            a3[u] = a3[u] + xc;
          });
          sdy[n * C + c] = horizontal_sum(a1[0] + a1[1]);
          sdyxh[n * C + c] = horizontal_sum(a2[0] + a2[1]);
          s3 += horizontal_sum(a3[0] + a3[1]);
        }
        // The saved mean is rounded: e = mean(x - mean) is its error, measured on the data. Using
        // xhat = ((x - mean) - e) * rstd keeps dx from cancelling when |mean| >> spread; the sums above
        // are corrected algebraically: sum(de * xhat') = sum(de * xhat) - e * rstd * sum(de).
        const A e = m > 0 ? s3 / A(m) : A(0);
        A t1 = 0, t2 = 0;
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          sdyxh[n * C + c] -= e * rs * sdy[n * C + c];
          t1 += wc(c) * sdyxh[n * C + c];
          t2 += wc(c) * sdy[n * C + c];
        }
        const V vc1(t1 / A(m)), vc2(t2 / A(m)), ve(e);
        // Pass 2 (the group is still in L2): dx = (de * w - xhat * c1 - c2) * rstd.
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          const V vw(wc(c)), vb(bc(c));
          const int64_t pos = (n * C + c) * HW;
          const A* dec = cache_de ? debuf.data() + (c - g * D) * HW : nullptr;
          map_span<T, A>(xp + pos, cache_de ? nullptr : dyp + pos, dxp + pos, HW, stream,
                         [&](int64_t j, int64_t cnt, const V& xv, const V& d) {
                           const V xh = ((xv - vmu) - ve) * vrs;
                           V de = d;
                           if (cache_de) {
                             de = V::loadu(dec + j, cnt);
                           } else if (silu) {
                             de = de * vsilu_grad(at::vec::fmadd(xh, vw, vb));
                           }
                           return (de * vw - at::vec::fmadd(xh, vc1, vc2)) * vrs;
                         });
        }
      }
      stream_fence(stream);
    });
  } else {
    std::vector<A> cmu(N * C), crs(N * C);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        cmu[n * C + c] = meanp[n * G + c / D];
        crs[n * C + c] = rstdp[n * G + c / D];
      }
    }
    std::vector<A> wv(C), bv(C);
    for (int64_t c = 0; c < C; ++c) {
      wv[c] = wc(c);
      bv[c] = bc(c);
    }
    // Samples go in steps of about 8 MiB of x and dy, as in the forward: pass 2 then reads them again from
    // the last-level cache, not from memory. The blocks of a sample (and so every sum) do not depend on
    // the step. Measured (C op alone, cold inputs, both cores, one step per batch vs these steps):
    // 8x256x56x56 fp32 3.83-3.91 -> 3.04-3.10 ms (torch 3.9-4.1), bf16 3.05-3.13 -> 2.77-2.80 ms,
    // 16x512x28x28 fp32 3.79-3.86 -> 3.09 ms; 2x320x64x64 and 32x64x56x56 unchanged.
    const int64_t nblk = nhwc_blocks_per_sample(N, HW, C);
    const int64_t sample_bytes = std::max<int64_t>(1, 2 * HW * C * int64_t(sizeof(T)));
    const int64_t step = std::max<int64_t>(1, (int64_t(8) << 20) / sample_bytes);
    std::vector<A> p1(step * nblk * C), p2(step * nblk * C), p3(step * nblk * C);
    std::vector<A> ce(N * C), t3(C), ka(N * C), kb(N * C), kc(N * C);
    for (int64_t n0 = 0; n0 < N; n0 += step) {
      const int64_t ns = std::min(step, N - n0);
      // The mean-rounding correction e (ce below) is under the rounding of xhat itself where mean_foldable
      // (see layer_norm_bwd_rows). When that holds for every group of the step, the sums of x - mean are
      // skipped (e = 0), and without SiLU the dx pass folds to dx = dy * ka + x * kb + kc: three coefficient
      // vectors per vector instead of six.
      bool skip_e = true;
      for (int64_t i = n0 * G; i < (n0 + ns) * G && skip_e; ++i) skip_e = mean_foldable(meanp[i], rstdp[i]);
      const bool fold = skip_e && !silu;
      // Values the per-vector code reads, as plain pointers captured by value (see nhwc_channel_stats).
      const A *cmup = cmu.data(), *crsp = crs.data(), *wvp = wv.data(), *bvp = bv.data();
      nhwc_channel_sums<T, A>(xp + n0 * HW * C, dyp + n0 * HW * C, ns, HW, C, nblk, p1.data(), p2.data(),
                              skip_e ? nullptr : p3.data(),
                              [=](int64_t nl, int64_t j, int64_t k, const V& xv, const V& d, V& a1, V& a2, V& a3) {
                                const int64_t q = (n0 + nl) * C + j;
                                const V xc = xv - V::loadu(cmup + q, k);
                                a3 = a3 + xc;
                                const V xh = xc * V::loadu(crsp + q, k);
                                V de = d;
                                if (silu) {
                                  de = de * vsilu_grad(at::vec::fmadd(xh, V::loadu(wvp + j, k), V::loadu(bvp + j, k)));
                                }
                                a1 = a1 + de;
                                a2 = at::vec::fmadd(de, xh, a2);
                              });
      // Mean-rounding correction per (n, group) (see ce below), applied to the sums algebraically:
      // sum(de * xhat_corrected) = sum(de * xhat) - e * rstd * sum(de).
      for (int64_t nl = 0; nl < ns; ++nl) {
        const int64_t n = n0 + nl;
        // Block partials summed per channel in block order, blocks outer so that the loop runs along rows.
        A* const s1 = sdy.data() + n * C;
        A* const s2 = sdyxh.data() + n * C;
        std::fill(s1, s1 + C, A(0));
        std::fill(s2, s2 + C, A(0));
        std::fill(t3.begin(), t3.end(), A(0));
        for (int64_t blk = 0; blk < nblk; ++blk) {
          const int64_t o = (nl * nblk + blk) * C;
          for (int64_t c = 0; c < C; ++c) {
            s1[c] += p1[o + c];
            s2[c] += p2[o + c];
          }
          if (!skip_e) {
            for (int64_t c = 0; c < C; ++c) t3[c] += p3[o + c];
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          A e = 0;
          for (int64_t c = g * D; c < (g + 1) * D; ++c) e += t3[c];
          e = m > 0 ? e / A(m) : A(0);
          for (int64_t c = g * D; c < (g + 1) * D; ++c) {
            ce[n * C + c] = e;
            sdyxh[n * C + c] -= e * crs[n * C + c] * sdy[n * C + c];
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          A t1 = 0, t2 = 0;
          for (int64_t c = g * D; c < (g + 1) * D; ++c) {
            t1 += wv[c] * sdyxh[n * C + c];
            t2 += wv[c] * sdy[n * C + c];
          }
          for (int64_t c = g * D; c < (g + 1) * D; ++c) {
            c1v[n * C + c] = t1 / A(m);
            c2v[n * C + c] = t2 / A(m);
          }
        }
      }
      const A *cep = ce.data(), *c1p = c1v.data(), *c2p = c2v.data();
      if (fold) {
        // dx = (dy * w - xhat * c1 - c2) * rstd with xhat = (x - mean) * rstd, expanded per (n, c).
        for (int64_t i = n0 * C; i < (n0 + ns) * C; ++i) {
          const A rs = crs[i];
          const int64_t c = i % C;
          ka[i] = rs * wv[c];
          kb[i] = -rs * rs * c1v[i];
          kc[i] = rs * (rs * c1v[i] * cmu[i] - c2v[i]);
        }
        const A *kap = ka.data(), *kbp = kb.data(), *kcp = kc.data();
        nhwc_map<T, A>(xp + n0 * HW * C, dyp + n0 * HW * C, dxp + n0 * HW * C, ns, HW, C, [&](int64_t nl) {
          const int64_t q = (n0 + nl) * C;
          return [=](int64_t j, int64_t k, const V& xv, const V& d) {
            return at::vec::fmadd(d, V::loadu(kap + q + j, k),
                                  at::vec::fmadd(xv, V::loadu(kbp + q + j, k), V::loadu(kcp + q + j, k)));
          };
        }, x.numel() * int64_t(sizeof(T)));
        continue;
      }
      nhwc_map<T, A>(xp + n0 * HW * C, dyp + n0 * HW * C, dxp + n0 * HW * C, ns, HW, C, [&](int64_t nl) {
        const int64_t q = (n0 + nl) * C;
        return [=](int64_t j, int64_t k, const V& xv, const V& d) {
          const V vrs = V::loadu(crsp + q + j, k);
          const V xh = ((xv - V::loadu(cmup + q + j, k)) - V::loadu(cep + q + j, k)) * vrs;
          const V vw = V::loadu(wvp + j, k);
          V de = d;
          if (silu) de = de * vsilu_grad(at::vec::fmadd(xh, vw, V::loadu(bvp + j, k)));
          return (de * vw - at::vec::fmadd(xh, V::loadu(c1p + q + j, k), V::loadu(c2p + q + j, k))) * vrs;
        };
      }, x.numel() * int64_t(sizeof(T)));
    }
  }
  // dW / dB: sums over samples in sample order.
  if (dw_acc.defined() || db_acc.defined()) {
    A* dwo = dw_acc.defined() ? dw_acc.data_ptr<A>() : nullptr;
    A* dbo = db_acc.defined() ? db_acc.data_ptr<A>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      A t1 = 0, t2 = 0;
      for (int64_t n = 0; n < N; ++n) {
        t1 += sdy[n * C + c];
        t2 += sdyxh[n * C + c];
      }
      if (dwo) dwo[c] = t2;
      if (dbo) dbo[c] = t1;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd(const at::Tensor& x_in,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              int64_t num_groups, double eps,
                                                              c10::string_view activation) {
  TORCH_CHECK(x_in.dim() >= 2, "fusednorm_C::group_norm_fwd: x must be (N, C, *spatial)");
  TORCH_CHECK(num_groups > 0 && x_in.size(1) % num_groups == 0,
              "fusednorm_C::group_norm_fwd: num_groups must divide the number of channels");
  const bool silu = parse_activation(activation);
  const auto lx = activation_layout(x_in);
  const Layout layout = lx.first;
  const at::Tensor& x = lx.second;
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor w = param_acc(weight, acc), b = param_acc(bias, acc);
  at::Tensor y = at::empty_like(x, memory_format_of(layout, x.dim()));
  at::Tensor mean = at::empty({x.size(0), num_groups}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({x.size(0), num_groups}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_fwd", [&] {
    gn_fwd_kernel<scalar_t>(x, layout, w, b, num_groups, eps, silu, y, mean, rstd);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd(const at::Tensor& dy, const at::Tensor& x_in,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              int64_t num_groups, c10::string_view activation) {
  TORCH_CHECK(x_in.dim() >= 2 && dy.sizes() == x_in.sizes(),
              "fusednorm_C::group_norm_bwd: dy and x must be (N, C, *spatial) of the same shape");
  TORCH_CHECK(num_groups > 0 && x_in.size(1) % num_groups == 0,
              "fusednorm_C::group_norm_bwd: num_groups must divide the number of channels");
  const bool silu = parse_activation(activation);
  const auto lx = activation_layout(x_in);
  const Layout layout = lx.first;
  const at::Tensor& x = lx.second;
  const at::Tensor dyc = in_layout(dy.to(x.scalar_type()), layout);
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor w = param_acc(weight, acc), b = param_acc(bias, acc);
  const at::Tensor mu = mean.to(acc).contiguous(), rs = rstd.to(acc).contiguous();
  at::Tensor dx = at::empty_like(x, memory_format_of(layout, x.dim()));
  const int64_t C = x.size(1);
  at::Tensor dw_acc = w.defined() ? at::empty({C}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor db_acc = b.defined() ? at::empty({C}, x.options().dtype(acc)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_bwd", [&] {
    gn_bwd_kernel<scalar_t>(dyc, x, layout, w, b, mu, rs, num_groups, silu, dx, dw_acc, db_acc);
  });
  at::Tensor dw = w.defined() ? dw_acc.to(weight->scalar_type()) : at::empty({0}, x.options());
  at::Tensor db = b.defined() ? db_acc.to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dw, db};
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd_cpu(const at::Tensor& x,
                                                                  const c10::optional<at::Tensor>& weight,
                                                                  const c10::optional<at::Tensor>& bias,
                                                                  int64_t num_groups, double eps,
                                                                  c10::string_view activation) {
  FUSEDNORM_CPU_CALL(group_norm_fwd, x, weight, bias, num_groups, eps, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    c10::string_view activation) {
  FUSEDNORM_CPU_CALL(group_norm_bwd, dy, x, weight, bias, mean, rstd, num_groups, activation);
}

}  // namespace
}  // namespace cpu
}  // namespace fusednorm

TORCH_LIBRARY_FRAGMENT(fusednorm_C, m) {
  m.def(fusednorm::schema::kGroupNormFwd);
  m.def(fusednorm::schema::kGroupNormBwd);
}

TORCH_LIBRARY_IMPL(fusednorm_C, CPU, m) {
  m.impl("group_norm_fwd", &fusednorm::cpu::group_norm_fwd_cpu);
  m.impl("group_norm_bwd", &fusednorm::cpu::group_norm_bwd_cpu);
}
#endif
