// Drivers shared by the GroupNorm and BatchNorm CPU kernels, for activations (N, C, *spatial) stored
// either NCHW (each (n, c) plane of HW elements contiguous) or NHWC (each spatial position's C channels
// contiguous). HW is the product of the spatial sizes.
#pragma once

#include "cpu/cpu_utils.h"

namespace fusednorm {
namespace cpu {
namespace FUSEDNORM_ISA {

// NHWC rows per chunk: about 16K elements, so a chunk (and its fp32 copy) stays in L2 between passes.
inline int64_t nhwc_rows_per_chunk(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// Blocks per sample for NHWC reductions: about kReductionSplits tasks over the batch, at most one per
// chunk. It depends only on the shape (not the thread count), so the reduction order is fixed.
inline int64_t nhwc_blocks_per_sample(int64_t N, int64_t HW, int64_t C) {
  const int64_t chunks = (HW + nhwc_rows_per_chunk(C) - 1) / nhwc_rows_per_chunk(C);
  const int64_t want = (kReductionSplits + N - 1) / std::max<int64_t>(N, 1);
  return std::max<int64_t>(1, std::min(chunks, want));
}

// Elementwise map over NCHW planes: op(plane, const A* x, const A* dy, A* out, len) on consecutive pieces
// (at most kChunk elements) of plane `plane` = n * C + c. dy may be null. out may alias x's buffer.
template <typename T, typename A, typename Op>
void nchw_map(const T* x, const T* dy, T* out, int64_t planes, int64_t HW, const Op& op) {
  const int64_t grain = std::max<int64_t>(1, 4 * kChunk / std::max<int64_t>(HW, 1));
  const bool stream = stream_output(planes * HW * int64_t(sizeof(T)));
  at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
    std::vector<A> bx(out_scratch<T, A>(kChunk, stream)), bdy(std::is_same_v<T, A> || !dy ? 0 : kChunk);
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t off = 0; off < HW; off += kChunk) {
        const int64_t len = std::min(kChunk, HW - off);
        const int64_t base = p * HW + off;
        const A* ax = acc_view(x + base, bx.data(), len);
        const A* ady = dy ? acc_view(dy + base, bdy.data(), len) : nullptr;
        A* o = out_span(out + base, bx.data(), stream);  // may alias ax's buffer: op reads before it writes
        op(p, ax, ady, o, len);
        write_out(o, out + base, len, stream);
      }
    }
    stream_fence(stream);
  });
}

// Elementwise map over NHWC rows: op(row, const A* x, const A* dy, A* out) on each row of C elements
// (row = n * HW + spatial index). dy may be null; out may alias x's buffer.
template <typename T, typename A, typename Op>
void nhwc_map(const T* x, const T* dy, T* out, int64_t rows, int64_t C, const Op& op) {
  const int64_t R = nhwc_rows_per_chunk(C);
  const bool stream = stream_output(rows * C * int64_t(sizeof(T)));
  at::parallel_for(0, rows, R, [&](int64_t r0, int64_t r1) {
    std::vector<A> bx(out_scratch<T, A>(R * C, stream)), bdy(std::is_same_v<T, A> || !dy ? 0 : R * C);
    for (int64_t c0 = r0; c0 < r1; c0 += R) {
      const int64_t c1 = std::min(r1, c0 + R);
      const int64_t len = (c1 - c0) * C;
      const A* ax = acc_view(x + c0 * C, bx.data(), len);
      const A* ady = dy ? acc_view(dy + c0 * C, bdy.data(), len) : nullptr;
      A* o = out_span(out + c0 * C, bx.data(), stream);  // may alias ax's buffer: op reads a row first
      for (int64_t r = c0; r < c1; ++r) {
        const int64_t k = (r - c0) * C;
        op(r, ax + k, ady ? ady + k : nullptr, o + k);
      }
      write_out(o, out + c0 * C, len, stream);
    }
    stream_fence(stream);
  });
}

// Per-channel Welford partials of an NHWC tensor (N, HW, C), one per (sample, block) task:
// pmean/pm2 [N * nblk][C], pcount [N * nblk]. Inside a task, chunks of rows get exact two-step
// per-channel statistics (the chunk is re-read from cache) and are Chan-merged in order.
template <typename T, typename A>
void nhwc_channel_stats(const T* x, int64_t N, int64_t HW, int64_t C, int64_t nblk, A* pmean, A* pm2,
                        int64_t* pcount) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const int64_t R = nhwc_rows_per_chunk(C);
  at::parallel_for(0, N * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> buf(std::is_same_v<T, A> ? 0 : R * C), cmean(C), csq(C), ks(C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nblk, blk = t % nblk;
      const auto [h0, h1] = block_range(HW, nblk, blk);
      A* mean = pmean + t * C;  // relative to ks until the end of the task
      A* m2 = pm2 + t * C;
      std::fill(mean, mean + C, A(0));
      std::fill(m2, m2 + C, A(0));
      std::fill(ks.begin(), ks.end(), A(0));
      int64_t cnt = 0;
      for (int64_t c0 = h0; c0 < h1; c0 += R) {
        const int64_t rows = std::min(h1, c0 + R) - c0;
        const A* a = acc_view(x + (n * HW + c0) * C, buf.data(), rows * C);
        // Shift each channel by its first value in this task (see ShiftedStats) to keep the sums small.
        if (c0 == h0) std::copy(a, a + C, ks.begin());
        std::fill(cmean.begin(), cmean.end(), A(0));
        std::fill(csq.begin(), csq.end(), A(0));
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < C; j += W) {
            const int64_t k = std::min<int64_t>(W, C - j);
            (V::loadu(cmean.data() + j, k) + (V::loadu(a + r * C + j, k) - V::loadu(ks.data() + j, k)))
                .store(cmean.data() + j, k);
          }
        }
        const V inv(A(1) / A(rows));
        for (int64_t j = 0; j < C; j += W) {
          const int64_t k = std::min<int64_t>(W, C - j);
          (V::loadu(cmean.data() + j, k) * inv).store(cmean.data() + j, k);
        }
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < C; j += W) {
            const int64_t k = std::min<int64_t>(W, C - j);
            const V d = (V::loadu(a + r * C + j, k) - V::loadu(ks.data() + j, k)) - V::loadu(cmean.data() + j, k);
            at::vec::fmadd(d, d, V::loadu(csq.data() + j, k)).store(csq.data() + j, k);
          }
        }
        // Chan merge of this chunk into the task's running partial, channel by channel.
        const A fb = A(rows) / A(cnt + rows);
        const A na = A(cnt);
        for (int64_t c = 0; c < C; ++c) {
          const A delta = cmean[c] - mean[c];
          mean[c] += delta * fb;
          m2[c] += csq[c] + delta * delta * na * fb;
        }
        cnt += rows;
      }
      for (int64_t c = 0; c < C; ++c) mean[c] += ks[c];
      pcount[t] = cnt;
    }
  });
}

// Per-channel sums over the rows of an NHWC tensor, one partial per (sample, block) task:
// acc(row, const A* x, const A* dy, A* s1, A* s2, A* s3) adds one row's contributions into s1/s2/s3 (length
// C; s3 is null when p3 is). Partials p1/p2/p3 are [N * nblk][C].
template <typename T, typename A, typename Acc>
void nhwc_channel_sums(const T* x, const T* dy, int64_t N, int64_t HW, int64_t C, int64_t nblk, A* p1,
                       A* p2, A* p3, const Acc& acc) {
  const int64_t R = nhwc_rows_per_chunk(C);
  at::parallel_for(0, N * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> bx(std::is_same_v<T, A> ? 0 : R * C), bdy(std::is_same_v<T, A> ? 0 : R * C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nblk, blk = t % nblk;
      const auto [h0, h1] = block_range(HW, nblk, blk);
      A* s1 = p1 + t * C;
      A* s2 = p2 + t * C;
      A* s3 = p3 != nullptr ? p3 + t * C : nullptr;
      std::fill(s1, s1 + C, A(0));
      std::fill(s2, s2 + C, A(0));
      if (s3 != nullptr) std::fill(s3, s3 + C, A(0));
      for (int64_t c0 = h0; c0 < h1; c0 += R) {
        const int64_t rows = std::min(h1, c0 + R) - c0;
        const int64_t base = (n * HW + c0) * C;
        const A* ax = acc_view(x + base, bx.data(), rows * C);
        const A* ady = acc_view(dy + base, bdy.data(), rows * C);
        for (int64_t r = 0; r < rows; ++r) acc(n * HW + c0 + r, ax + r * C, ady + r * C, s1, s2, s3);
      }
    }
  });
}

// o = act(((a - k) - mu) * scale + shift) over a span that shares one channel's coefficients
// (k: the statistics' shift, see ShiftedStats; 0 when the mean is given in absolute terms).
template <typename A>
inline void affine_span(const A* a, A* o, int64_t len, A k, A mu, A scale, A shift, bool silu) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V vk(k), vmu(mu), vsc(scale), vsh(shift);
  if (silu) {
    for (int64_t j = 0; j < len; j += W) {
      const int64_t n = std::min<int64_t>(W, len - j);
      vsilu(at::vec::fmadd((V::loadu(a + j, n) - vk) - vmu, vsc, vsh)).store(o + j, n);
    }
  } else {
    for (int64_t j = 0; j < len; j += W) {
      const int64_t n = std::min<int64_t>(W, len - j);
      at::vec::fmadd((V::loadu(a + j, n) - vk) - vmu, vsc, vsh).store(o + j, n);
    }
  }
}

// The same over one NHWC row of C channels with per-channel coefficient arrays.
template <typename A>
inline void affine_row(const A* a, A* o, int64_t C, const A* mu, const A* sc, const A* sh, bool silu) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  if (silu) {
    for (int64_t j = 0; j < C; j += W) {
      const int64_t k = std::min<int64_t>(W, C - j);
      const V v = at::vec::fmadd(V::loadu(a + j, k) - V::loadu(mu + j, k), V::loadu(sc + j, k), V::loadu(sh + j, k));
      vsilu(v).store(o + j, k);
    }
  } else {
    for (int64_t j = 0; j < C; j += W) {
      const int64_t k = std::min<int64_t>(W, C - j);
      at::vec::fmadd(V::loadu(a + j, k) - V::loadu(mu + j, k), V::loadu(sc + j, k), V::loadu(sh + j, k))
          .store(o + j, k);
    }
  }
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
