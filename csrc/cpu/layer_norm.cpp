// LayerNorm / RMSNorm CPU kernels (forward and backward) and their operator registration.
//
// x is (M, N) with an arbitrary row stride and a contiguous last dimension; rows are independent, so the
// forward runs rows in parallel. Each row's statistics are computed exactly in L1-sized chunks merged with
// Chan's formula, and it is normalized while still in cache; bf16/fp16 are converted in registers. The backward keeps dW/dB partial sums per block of rows (a fixed number of
// blocks, see num_blocks) and reduces them in block order, so the result depends on neither scheduling nor
// the thread count.
#include "cpu/isa_prelude.h"
// (isa_prelude.h must come first: it selects the instruction set of this translation unit.)
#include "cpu/cpu_utils.h"
#include "ops.h"

namespace fusednorm {
namespace cpu {
namespace FUSEDNORM_ISA {

namespace {

template <typename T>
void layer_norm_fwd_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps,
                           bool is_rms, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  using A = acc_type<T>;
  const int64_t M = x.size(0), N = x.size(1), ldx = x.stride(0);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
  const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
  A* meanp = is_rms ? nullptr : mean.data_ptr<A>();
  A* rstdp = rstd.data_ptr<A>();
  // Enough rows per task to amortize the task overhead on short rows.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
  const bool stream = stream_output(M * N * int64_t(sizeof(T)));
  // The statistics read a row from memory; normalizing it works from L1, and meanwhile nothing fetches the next
  // row unless asked: normalize_row prefetches it when x comes from memory, with the backward's thresholds
  // (layer_norm_bwd_kernel). Kernel alone, cold inputs, interleaved in one process (ms, without / with, two
  // runs): bf16 4096x4096 3.03-3.10 / 2.62-2.66 and 4.46-4.52 / 3.70-3.78, fp32 8192x2048 5.22-5.62 /
  // 4.27-4.55, fp16 2048x4096 1.93-2.45 / 1.72-2.32; fp32 4096x4096 and 1024x8192, bf16 2048x8192 and
  // 8192x2048 within the noise (-5 % to +15 %).
  const bool prefetch_next =
      N * int64_t(sizeof(T)) >= 2048 && M * N * int64_t(sizeof(T)) >= (int64_t(16) << 20);
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* a = xp + r * ldx;
      A shift = 0, mu = 0, rs;  // y = ((x - shift) - mu) * rs
      if (is_rms) {
        // Sum of squares directly: there is no mean to cancel against.
        A ss = 0;
        for (int64_t off = 0; off < N; off += kChunk) {
          const int64_t len = std::min(kChunk, N - off);
          ss += vsum_sqdev(a + off, len, A(0));
        }
        rs = A(1) / std::sqrt(ss / A(N) + A(eps));
      } else {
        const auto st = stats_contig(a, N);
        shift = st.shift;
        mu = st.w.mean;
        rs = A(1) / std::sqrt(st.w.m2 / A(N) + A(eps));
        meanp[r] = N > 0 ? st.mean() : A(NAN);
      }
      rstdp[r] = rs;
      LinePrefetcher next(N * int64_t(sizeof(T)));
      if (prefetch_next && r + 1 < r1) next.add(a + ldx);
      normalize_row(a, yp + r * N, N, shift, mu, rs, wp, bp, stream, &next);
    }
    stream_fence(stream);
  });
}

template <typename T>
void layer_norm_bwd_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, bool has_b,
                           const at::Tensor& mean, const at::Tensor& rstd, bool is_rms, at::Tensor& dx,
                           at::Tensor& dw_acc, at::Tensor& db_acc) {
  using A = acc_type<T>;
  const int64_t M = x.size(0), N = x.size(1), ldx = x.stride(0), lddy = dy.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* dyp = dy.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
  const A* wp = w.defined() ? w.data_ptr<A>() : nullptr;
  const A* meanp = is_rms ? nullptr : mean.data_ptr<A>();
  const A* rstdp = rstd.data_ptr<A>();
  const bool need_dw = dw_acc.defined(), need_db = db_acc.defined();
  const int64_t blocks = num_blocks(M);
  // Per-block partial sums of dy * xhat and dy, reduced in block order below. Each block zeroes its own
  // partial rows, in the thread that then accumulates into them.
  std::unique_ptr<A[]> pdw(need_dw ? new A[blocks * N] : nullptr), pdb(need_db ? new A[blocks * N] : nullptr);
  const bool stream = stream_output(M * N * int64_t(sizeof(T)));
  // Prefetching the next rows during pass 2 pays when x and dy come from memory (16 MiB and more together) in
  // rows of 2 KiB or more; otherwise its per-vector bookkeeping costs more than it saves. Measured (fp32, warm
  // inputs, the kernel called back to back, one process per setting): 1568x384 150 -> 113 us, 25088x96 820-870
  // -> 550-570 us, 2048x512 285-325 -> 205-215 us without it; with it, 4096x640 910-990 vs 1085-1210 us and
  // 1024x4096 1560-1630 vs 1775 us.
  const bool prefetch_next = N * int64_t(sizeof(T)) >= 2048 && 2 * M * N * int64_t(sizeof(T)) >= (int64_t(16) << 20);
  // Rows two at a time halve the dW/dB partials' loads and stores, which pays for long rows (and with the
  // prefetch); on shorter rows one at a time is faster. Kernel vs ATen, cold inputs (bench/kernel_ab.py, two runs,
  // ours / ATen ms, pairs -> single): 1568x384 0.43-0.46 -> 0.18, 2048x512 0.55-0.66 -> 0.35-0.58, 2048x768
  // 0.85-0.92 -> 0.57-0.96 (ATen 0.56-0.98); pairs stay ahead at 4096x768 (prefetched), 2048x1024, 1024x2048-8192.
  // bf16 / fp16 rows of 1024 are faster one at a time, prefetched or not (kernel alone, 4 input copies, ms, pairs
  // / single: 2048x1024 1.15-1.39 / 0.89-1.10, 4096x1024 1.88 / 1.73); from 2048 columns pairs are as fast or
  // faster (2048x2048 2.03 / 2.10, 4096x4096 6.0-6.4 / 6.3-6.7).
  const bool two_rows = sizeof(T) == 2 ? N >= 2048 : (N >= 1024 || prefetch_next);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const auto [r0, r1] = block_range(M, blocks, blk);
      A* dwr = need_dw ? pdw.get() + blk * N : nullptr;
      A* dbr = need_db ? pdb.get() + blk * N : nullptr;
      if (dwr != nullptr) std::fill(dwr, dwr + N, A(0));
      if (dbr != nullptr) std::fill(dbr, dbr + N, A(0));
      // Rows two at a time when two_rows (then a last single one): see layer_norm_bwd_rows.
      auto rows = [&](auto R, int64_t r) {
        constexpr int kR = decltype(R)::value;
        const T* ax[kR];
        const T* ady[kR];
        T* adx[kR];
        A mu[kR], rs[kR];
        for (int i = 0; i < kR; ++i) {
          ax[i] = xp + (r + i) * ldx;
          ady[i] = dyp + (r + i) * lddy;
          adx[i] = dxp + (r + i) * N;
          mu[i] = is_rms ? A(0) : meanp[r + i];
          rs[i] = rstdp[r + i];
        }
        // Pass 1 streams its rows from memory and pass 2 works from cache: pass 2 may prefetch the next pair.
        LinePrefetcher next(N * int64_t(sizeof(T)));
        for (int64_t i = r + kR; prefetch_next && i < std::min(M, r + kR + 2); ++i) {
          next.add(xp + i * ldx);
          next.add(dyp + i * lddy);
        }
        LinePrefetcher* pf = prefetch_next ? &next : nullptr;
        if (wp != nullptr) {
          layer_norm_bwd_rows<kR, true>(ax, ady, wp, mu, rs, is_rms, N, dwr, dbr, adx, stream, pf);
        } else {
          layer_norm_bwd_rows<kR, false>(ax, ady, wp, mu, rs, is_rms, N, dwr, dbr, adx, stream, pf);
        }
      };
      int64_t r = r0;
      if (two_rows) {
        for (; r + 2 <= r1; r += 2) rows(std::integral_constant<int, 2>(), r);
      }
      for (; r < r1; ++r) rows(std::integral_constant<int, 1>(), r);
    }
    stream_fence(stream);
  });
  // Deterministic second reduction: each column sums the block partials in block order.
  if (need_dw) sum_block_partials(pdw.get(), blocks, N, dw_acc.data_ptr<A>());
  if (need_db) sum_block_partials(pdb.get(), blocks, N, db_acc.data_ptr<A>());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              double eps, bool is_rms) {
  TORCH_CHECK(x.dim() == 2, "fusednorm_C::layer_norm_fwd: x must be 2-D (M, N), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "fusednorm_C::layer_norm_fwd: last dim must be contiguous");
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor w = param_acc(weight, acc), b = param_acc(bias, acc);
  const int64_t M = x.size(0), N = x.size(1);
  auto opts = x.options().dtype(acc);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor mean = at::empty({is_rms ? 0 : M}, opts);
  at::Tensor rstd = at::empty({M}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_fwd", [&] {
    layer_norm_fwd_kernel<scalar_t>(x, w, b, eps, is_rms, y, mean, rstd);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              bool is_rms) {
  TORCH_CHECK(x.dim() == 2 && dy.sizes() == x.sizes(), "fusednorm_C::layer_norm_bwd: dy and x must be (M, N)");
  const auto acc = acc_scalar_type(x.scalar_type());
  const at::Tensor w = param_acc(weight, acc);
  const bool has_w = w.defined(), has_b = bias.has_value() && bias->defined();
  // A last dim that is not contiguous cannot be read row-wise; such dy (rare) is copied.
  const at::Tensor dyc = (dy.size(1) <= 1 || dy.stride(1) == 1) ? dy.to(x.scalar_type()) : dy.to(x.scalar_type()).contiguous();
  const at::Tensor meanc = mean.to(acc).contiguous(), rstdc = rstd.to(acc).contiguous();
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor dx = at::empty({M, N}, x.options());
  at::Tensor dw_acc = has_w ? at::empty({N}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor db_acc = has_b ? at::empty({N}, x.options().dtype(acc)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_bwd", [&] {
    layer_norm_bwd_kernel<scalar_t>(dyc, x, w, has_b, meanc, rstdc, is_rms, dx, dw_acc, db_acc);
  });
  at::Tensor dw = has_w ? dw_acc.to(weight->scalar_type()) : at::empty({0}, x.options());
  at::Tensor db = has_b ? db_acc.to(bias->scalar_type()) : at::empty({0}, x.options());
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x,
                                                                  const c10::optional<at::Tensor>& weight,
                                                                  const c10::optional<at::Tensor>& bias,
                                                                  double eps, bool is_rms) {
  FUSEDNORM_CPU_CALL(layer_norm_fwd, x, weight, bias, eps, is_rms);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd, bool is_rms) {
  FUSEDNORM_CPU_CALL(layer_norm_bwd, dy, x, weight, bias, mean, rstd, is_rms);
}

}  // namespace
}  // namespace cpu
}  // namespace fusednorm

TORCH_LIBRARY_FRAGMENT(fusednorm_C, m) {
  m.def(fusednorm::schema::kLayerNormFwd);
  m.def(fusednorm::schema::kLayerNormBwd);
}

TORCH_LIBRARY_IMPL(fusednorm_C, CPU, m) {
  m.impl("layer_norm_fwd", &fusednorm::cpu::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &fusednorm::cpu::layer_norm_bwd_cpu);
}
#endif
