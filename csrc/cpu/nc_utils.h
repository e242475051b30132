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
// chunk and at least 128 rows per block (every block leaves C partials to merge: on small maps, more
// blocks cost more in merging than they gain in parallelism). It depends only on the shape (not the
// thread count), so the reduction order is fixed.
inline int64_t nhwc_blocks_per_sample(int64_t N, int64_t HW, int64_t C) {
  const int64_t chunks = (HW + nhwc_rows_per_chunk(C) - 1) / nhwc_rows_per_chunk(C);
  const int64_t want = (kReductionSplits + N - 1) / std::max<int64_t>(N, 1);
  return std::max<int64_t>(1, std::min({chunks, want, HW / 128}));
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

// Elementwise map over NHWC rows of C elements (row = n * HW + spatial index): op(row) returns the row's
// functor f(j, cnt, x, dy) -> out, j being the channel offset. dy may be null (zeros).
template <typename T, typename A, typename Op>
void nhwc_map(const T* x, const T* dy, T* out, int64_t rows, int64_t C, const Op& op) {
  const int64_t R = nhwc_rows_per_chunk(C);
  const bool stream = stream_output(rows * C * int64_t(sizeof(T)));
  at::parallel_for(0, rows, R, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * C;
      map_span<T, A>(x + base, dy ? dy + base : nullptr, out + base, C, stream, op(r));
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
    std::vector<A> cmean(C), csq(C), ks(C);
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
        const T* a = x + (n * HW + c0) * C;
        // Shift each channel by its first value in this task (see ShiftedStats) to keep the sums small.
        if (c0 == h0) {
          for (int64_t c = 0; c < C; ++c) ks[c] = static_cast<A>(a[c]);
        }
        // Exact two-step statistics of the chunk. Pass 1 (the sums) runs in address order, so the chunk
        // streams in from memory; rows go four at a time through each channel vector's running sum (the
        // same additions in the same order as row by row, a quarter of the partial-sum loads and stores).
        // Pass 2 (the centred squares) re-reads the chunk from L2 per block of channel vectors, with the
        // accumulators in registers.
        std::fill(cmean.begin(), cmean.end(), A(0));
        A* cm = cmean.data();
        const A* kp = ks.data();
        int64_t r = 0;
        for (; r + 4 <= rows; r += 4) {
          const T* x0 = a + r * C;
          const T *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
          for (int64_t j = 0; j < C; j += W) {
            const int64_t k = std::min<int64_t>(W, C - j);
            const V kv = V::loadu(kp + j, k);
            V acc = V::loadu(cm + j, k) + (load_acc(x0 + j, k) - kv);
            acc = acc + (load_acc(x1 + j, k) - kv);
            acc = acc + (load_acc(x2 + j, k) - kv);
            acc = acc + (load_acc(x3 + j, k) - kv);
            acc.store(cm + j, k);
          }
        }
        for (; r < rows; ++r) {
          for (int64_t j = 0; j < C; j += W) {
            const int64_t k = std::min<int64_t>(W, C - j);
            (V::loadu(cm + j, k) + (load_acc(a + r * C + j, k) - V::loadu(kp + j, k))).store(cm + j, k);
          }
        }
        const V inv(A(1) / A(rows));
        // Pass 2 hardly touches memory, so it prefetches the task's next chunk (two lines per row step)
        // to overlap pass 1's memory stream with this compute.
        const char* pf = reinterpret_cast<const char*>(a + rows * C);
        const char* pf_end = reinterpret_cast<const char*>(x + (n * HW + std::min(h1, c0 + rows + R)) * C);
        int64_t j0 = 0;
        for (; j0 + 4 * W <= C; j0 += 4 * W) {  // four full vectors
          const A* kb = kp + j0;
          A* mp = cm + j0;
          const V k0 = V::loadu(kb), k1 = V::loadu(kb + W), k2 = V::loadu(kb + 2 * W), k3 = V::loadu(kb + 3 * W);
          const V s0 = V::loadu(mp) * inv, s1 = V::loadu(mp + W) * inv;
          const V s2 = V::loadu(mp + 2 * W) * inv, s3 = V::loadu(mp + 3 * W) * inv;
          V q0(A(0)), q1(A(0)), q2(A(0)), q3(A(0));
          for (int64_t r = 0; r < rows; ++r) {
            if (pf < pf_end) {
              __builtin_prefetch(pf);
              __builtin_prefetch(pf + 64);
              pf += 128;
            }
            const T* row = a + r * C + j0;
            const V d0 = (load_acc(row, W) - k0) - s0, d1 = (load_acc(row + W, W) - k1) - s1;
            const V d2 = (load_acc(row + 2 * W, W) - k2) - s2, d3 = (load_acc(row + 3 * W, W) - k3) - s3;
            q0 = at::vec::fmadd(d0, d0, q0);
            q1 = at::vec::fmadd(d1, d1, q1);
            q2 = at::vec::fmadd(d2, d2, q2);
            q3 = at::vec::fmadd(d3, d3, q3);
          }
          A* qp = csq.data() + j0;
          s0.store(mp), s1.store(mp + W), s2.store(mp + 2 * W), s3.store(mp + 3 * W);
          q0.store(qp), q1.store(qp + W), q2.store(qp + 2 * W), q3.store(qp + 3 * W);
        }
        for (; j0 < C; j0 += W) {  // the remaining channels, one vector (or a tail) at a time
          const int64_t k = std::min<int64_t>(W, C - j0);
          const V k0 = V::loadu(ks.data() + j0, k);
          const V s0 = V::loadu(cmean.data() + j0, k) * inv;
          V q0(A(0));
          for (int64_t r = 0; r < rows; ++r) {
            const V d0 = (load_acc(a + r * C + j0, k) - k0) - s0;
            q0 = at::vec::fmadd(d0, d0, q0);
          }
          s0.store(cmean.data() + j0, k);
          q0.store(csq.data() + j0, k);
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
// acc(n, j, k, x, dy, s1, s2, s3) adds one row's contributions for channels [j, j + k) of sample n, given as
// vectors x and dy (zero past k), into the running sums s1/s2/s3 (Vectorized<A>&; s3 is dropped when p3 is
// null). Partials p1/p2/p3 are [N * nblk][C]. Within a chunk of rows, each channel vector's sums stay in
// registers over the rows (the chunk is re-read from L2) while the next chunk is prefetched; the rows are
// added in order, so the sums are those of a plain row-by-row loop.
template <typename T, typename A, typename Acc>
void nhwc_channel_sums(const T* x, const T* dy, int64_t N, int64_t HW, int64_t C, int64_t nblk, A* p1,
                       A* p2, A* p3, const Acc& acc) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const int64_t R = nhwc_rows_per_chunk(C);
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
      for (int64_t c0 = h0; c0 < h1; c0 += R) {
        const int64_t rows = std::min(h1, c0 + R) - c0;
        const int64_t base = (n * HW + c0) * C;
        const T* xb = x + base;
        const T* db = dy + base;
        // The next chunk of both inputs, one line of each per row step.
        const int64_t next = rows * C, next_end = (std::min(h1, c0 + rows + R) - c0) * C;
        const char* pfx = reinterpret_cast<const char*>(xb + next);
        const char* pfd = reinterpret_cast<const char*>(db + next);
        const char* pfx_end = reinterpret_cast<const char*>(xb + next_end);
        for (int64_t j = 0; j < C; j += W) {
          const int64_t k = std::min<int64_t>(W, C - j);
          V a1 = V::loadu(s1 + j, k), a2 = V::loadu(s2 + j, k);
          V a3 = s3 != nullptr ? V::loadu(s3 + j, k) : V(A(0));
          for (int64_t r = 0; r < rows; ++r) {
            if (pfx < pfx_end) {
              __builtin_prefetch(pfx);
              __builtin_prefetch(pfd);
              pfx += 64;
              pfd += 64;
            }
            acc(n, j, k, load_acc(xb + r * C + j, k), load_acc(db + r * C + j, k), a1, a2, a3);
          }
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
