// Drivers shared by the GroupNorm and BatchNorm CPU kernels, for activations (N, C, *spatial) stored
// either NCHW (each (n, c) plane of HW elements contiguous) or NHWC (each spatial position's C channels
// contiguous). HW is the product of the spatial sizes.
#pragma once

#include "cpu/cpu_utils.h"

namespace fusednorm {
namespace cpu {
namespace FUSEDNORM_ISA {

// NHWC rows per chunk: about 16K elements (64 KiB of fp32), the grain of the NHWC maps and the smallest
// block of the NHWC reductions.
inline int64_t nhwc_rows_per_chunk(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// Blocks per sample for NHWC reductions: about kReductionSplits tasks over the batch, at most one per
// chunk and at least 128 rows per block (every block leaves C partials to merge: on small maps, more
// blocks cost more in merging than they gain in parallelism). It depends only on the shape (not the
// thread count), so the reduction order is fixed.
inline int64_t nhwc_blocks_per_sample(int64_t N, int64_t HW, int64_t C) {
  const int64_t chunks = (HW + nhwc_rows_per_chunk(C) - 1) / nhwc_rows_per_chunk(C);
  const int64_t want = (kReductionSplits + N - 1) / std::max<int64_t>(N, 1);
  return std::max<int64_t>(1, std::min({chunks, want, HW / 128}));
}

// Whether a normalize pass over (N, C, *spatial) activations may fold the mean into the affine shift,
// y = x * scale + (shift - mean * scale), and the backward skip its mean-rounding correction: true when
// |mean| * rstd <= 1 (false for a NaN mean). |x * scale| is then at most a few times the output's scale, so
// the fold and the rounding of the stored mean each cost no more than a few roundings of the result; the fold
// saves one coefficient load per vector of x, which the channels-last passes are bound by.
template <typename A>
inline bool mean_foldable(A mean, A rstd) {
  return std::abs(mean) * rstd <= A(1);
}

// Elementwise map over NCHW planes: op(plane) (plane = n * C + c) returns the plane's functor
// f(j, cnt, x, dy) -> out for vectors of cnt lanes at offset j (see map_span); dy may be null (zeros).
template <typename T, typename A, typename Op>
void nchw_map(const T* x, const T* dy, T* out, int64_t planes, int64_t HW, const Op& op) {
  const int64_t grain = std::max<int64_t>(1, 4 * kChunk / std::max<int64_t>(HW, 1));
  const bool stream = stream_output(planes * HW * int64_t(sizeof(T)));
  at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t base = p * HW;
      map_span<T, A>(x + base, dy ? dy + base : nullptr, out + base, HW, stream, op(p));
    }
    stream_fence(stream);
  });
}

// Elementwise map over NHWC rows of C elements, `samples` samples of HW rows each: op(n) returns sample n's
// functor f(j, cnt, x, dy) -> out, j being the channel offset (made once per sample and task, not per row).
// dy may be null (zeros). out_bytes: the size of the whole output when this call writes part of it (it
// decides streaming; 0: this call's part).
template <typename T, typename A, typename Op>
void nhwc_map(const T* x, const T* dy, T* out, int64_t samples, int64_t HW, int64_t C, const Op& op,
              int64_t out_bytes = 0) {
  const int64_t R = nhwc_rows_per_chunk(C);
  const int64_t rows = samples * HW;
  const bool stream = stream_output(out_bytes > 0 ? out_bytes : rows * C * int64_t(sizeof(T)));
  at::parallel_for(0, rows, R, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1;) {
      const int64_t n = r / HW, end = std::min(r1, (n + 1) * HW);
      const auto f = op(n);
      for (; r < end; ++r) {
        const int64_t base = r * C;
        map_span<T, A>(x + base, dy ? dy + base : nullptr, out + base, C, stream, f);
      }
    }
    stream_fence(stream);
  });
}

// Both NHWC reductions below walk a task's rows strictly in memory order, one row (C channels) after the
// other, and keep the per-channel running values in a C-long buffer that stays in L1. Walking several rows
// at once (channel vector by channel vector, rows 1 KiB apart), or a chunk of rows column by column with the
// sums in registers, reads the same bytes but in an order the hardware prefetcher follows poorly. Measured
// on the 2-core EPYC VM (cold inputs, two threads, scratch A/B of both versions in one binary): BatchNorm
// channels_last statistics 32x64x56x56 fp32 1.05-1.10 -> 0.91-0.98 ms, 8x256x56x56 1.49-1.52 -> 1.04-1.10
// ms (a plain x.sum() of the same tensor: 0.96 ms); the BatchNorm backward reduction 32x64x56x56
// 2.0 -> 1.2-1.5 ms, 2x320x64x64 1.05 -> 0.64 ms; GroupNorm backward 32x64x56x56 4.0 -> 3.4-3.6 ms,
// 2x320x64x64 1.75 -> 1.5 ms (one shape got slower: GroupNorm backward 32x512x14x14, 2.24 -> 2.45 ms).

// Software prefetch distance of the row walks, in bytes (at least one row): measured 1-16 KiB ahead; about
// 2 KiB was as good as any, and prefetching helps most for rows of 512 B - 1 KiB.
constexpr int64_t kRowPrefetchBytes = 2048;

inline int64_t rows_ahead(int64_t row_bytes) { return std::max<int64_t>(1, kRowPrefetchBytes / row_bytes); }

// Per-channel Welford partials of an NHWC tensor (N, HW, C), one per (sample, block) task:
// pmean/pm2 [N * nblk][C], pcount [N * nblk]. One read of the data: each channel lane runs Welford's
// update over the task's rows (m += (x - m) / n; m2 += (x - m_old) (x - m_new)), with 1 / n shared by all
// lanes of a row. The data is shifted by the task's first row (see ShiftedStats): with |mean| >> std an
// unshifted fp32 m rounds at the mean's magnitude every update.
template <typename T, typename A>
void nhwc_channel_stats(const T* x, int64_t N, int64_t HW, int64_t C, int64_t nblk, A* pmean, A* pm2,
                        int64_t* pcount) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const int64_t ahead = rows_ahead(C * int64_t(sizeof(T)));
  at::parallel_for(0, N * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> ks(C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nblk, blk = t % nblk;
      const auto [h0, h1] = block_range(HW, nblk, blk);
      A* mean = pmean + t * C;
      A* m2 = pm2 + t * C;
      std::fill(mean, mean + C, A(0));
      std::fill(m2, m2 + C, A(0));
      pcount[t] = std::max<int64_t>(0, h1 - h0);
      if (h1 <= h0) continue;
      const T* first = x + (n * HW + h0) * C;
      for (int64_t c = 0; c < C; ++c) ks[c] = static_cast<A>(first[c]);
      // Loop values in plain locals captured by value: a vector store may alias anything (the intrinsics use
      // may_alias types), so values reached through a by-reference capture were reloaded after every store
      // (seen in perf annotate; the pass's time did not measurably change).
      const A* const kp = ks.data();
      const int64_t nc = C, pf_off = ahead * C;
      for (int64_t r = h0; r < h1; ++r) {
        const T* const xr = x + (n * HW + r) * nc;
        const V inv(A(1) / A(r - h0 + 1));
        const bool pf = r + ahead < h1;
        auto update = [=](int64_t j, int64_t k_lanes) {
          if (pf && (j * int64_t(sizeof(T))) % 64 == 0) __builtin_prefetch(xr + pf_off + j);
          const V xv = load_acc(xr + j, k_lanes) - V::loadu(kp + j, k_lanes);
          const V m = V::loadu(mean + j, k_lanes);
          const V d = xv - m;
          const V m_new = at::vec::fmadd(d, inv, m);
          m_new.store(mean + j, k_lanes);
          at::vec::fmadd(d, xv - m_new, V::loadu(m2 + j, k_lanes)).store(m2 + j, k_lanes);
        };
        int64_t j = 0;
        for (; j + W <= nc; j += W) update(j, W);
        if (j < nc) update(j, nc - j);
      }
      for (int64_t c = 0; c < C; ++c) mean[c] += ks[c];
    }
  });
}

// Chan's merge over tasks of per-channel partials (the same arithmetic as welford_merge_all over the tasks in
// order), vectorized over channels. pmean / pm2: task t's partials of the nch channels at t * ld; pcount:
// each task's count (shared by its channels), as nhwc_channel_stats leaves them. Writes each channel's
// merged mean and M2 (zeros when every task is empty) and returns the merged count. In the channels-last
// GroupNorm forward it replaced one merge per group over (block, channel) partials, strided and with index
// arithmetic per partial: the merge phase of 2x320x64x64 went from 85-95 us to 13-28 us.
template <typename A>
int64_t merge_channel_partials(const A* pmean, const A* pm2, const int64_t* pcount, int64_t tasks, int64_t ld,
                               int64_t nch, A* mean, A* m2) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  int64_t count = 0, first = -1;
  for (int64_t t = 0; t < tasks; ++t) {
    if (pcount[t] == 0) continue;
    if (first < 0) first = t;
    count += pcount[t];
  }
  if (count == 0) {
    std::fill(mean, mean + nch, A(0));
    std::fill(m2, m2 + nch, A(0));
    return 0;
  }
  const V vn(static_cast<A>(count));
  for (int64_t j = 0; j < nch; j += W) {
    const int64_t k = std::min<int64_t>(W, nch - j);
    const V m0 = V::loadu(pmean + first * ld + j, k);
    V s(A(0));
    for (int64_t t = first; t < tasks; ++t) {
      if (pcount[t] == 0) continue;
      s = s + V(static_cast<A>(pcount[t])) * (V::loadu(pmean + t * ld + j, k) - m0);
    }
    const V mu = m0 + s / vn;
    V q(A(0));
    for (int64_t t = first; t < tasks; ++t) {
      if (pcount[t] == 0) continue;
      const V d = V::loadu(pmean + t * ld + j, k) - mu;
      q = q + (V::loadu(pm2 + t * ld + j, k) + V(static_cast<A>(pcount[t])) * d * d);
    }
    mu.store(mean + j, k);
    q.store(m2 + j, k);
  }
  return count;
}

// Per-channel sums over the rows of an NHWC tensor, one partial per (sample, block) task:
// acc(n, j, k, x, dy, s1, s2, s3) adds one row's contributions for channels [j, j + k) of sample n, given as
// vectors x and dy (zero past k), into the running sums s1/s2/s3 (Vectorized<A>&; s3 is dropped when p3 is
// null). Partials p1/p2/p3 are [N * nblk][C]. Rows are added in order, one after the other.
template <typename T, typename A, typename Acc>
void nhwc_channel_sums(const T* x, const T* dy, int64_t N, int64_t HW, int64_t C, int64_t nblk, A* p1,
                       A* p2, A* p3, const Acc& acc) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const int64_t ahead = rows_ahead(C * int64_t(sizeof(T)));
  at::parallel_for(0, N * nblk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nblk, blk = t % nblk;
      const auto [h0, h1] = block_range(HW, nblk, blk);
      A* s1 = p1 + t * C;
      A* s2 = p2 + t * C;
      A* s3 = p3 != nullptr ? p3 + t * C : nullptr;
      std::fill(s1, s1 + C, A(0));
      std::fill(s2, s2 + C, A(0));
      if (s3 != nullptr) std::fill(s3, s3 + C, A(0));
      for (int64_t r = h0; r < h1; ++r) {
        const T* xr = x + (n * HW + r) * C;
        const T* dr = dy + (n * HW + r) * C;
        const bool pf = r + ahead < h1;
        for (int64_t j = 0; j < C; j += W) {
          const int64_t k = std::min<int64_t>(W, C - j);
          if (pf && (j * int64_t(sizeof(T))) % 64 == 0) {
            __builtin_prefetch(xr + ahead * C + j);
            __builtin_prefetch(dr + ahead * C + j);
          }
          V a1 = V::loadu(s1 + j, k), a2 = V::loadu(s2 + j, k);
          V a3 = s3 != nullptr ? V::loadu(s3 + j, k) : V(A(0));
          acc(n, j, k, load_acc(xr + j, k), load_acc(dr + j, k), a1, a2, a3);
          a1.store(s1 + j, k);
          a2.store(s2 + j, k);
          if (s3 != nullptr) a3.store(s3 + j, k);
        }
      }
    }
  });
}

// Shape summary of an (N, C, *spatial) activation.
struct NCShape {
  int64_t N, C, HW;
};

inline NCShape nc_shape(const at::Tensor& x) {
  NCShape s{x.size(0), x.size(1), 1};
  for (int64_t d = 2; d < x.dim(); ++d) s.HW *= x.size(d);
  return s;
}

}  // namespace FUSEDNORM_ISA
}  // namespace cpu
}  // namespace fusednorm
