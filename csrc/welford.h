// Welford / Chan statistics shared by the CPU (C++) and CUDA kernels of fusednorm.
//
// A partial statistic is the triple (n, mean, m2) with m2 = sum((x - mean)^2) over its n elements.
// Partials from disjoint pieces of the data merge exactly (up to rounding) with Chan's formula, so a
// reduction can be split over chunks, threads, warps or blocks and merged in any fixed order. We never
// use E[x^2] - E[x]^2: it cancels catastrophically when |mean| >> std.
//
// The count type N is a template parameter: CUDA kernels use the accumulation type (cheap in registers,
// exact up to 2^24 per partial in fp32), host code uses int64_t.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDNORM_HD __host__ __device__ __forceinline__
#else
#define FUSEDNORM_HD inline
#endif

namespace fusednorm {

template <typename T, typename N = T>
struct Welford {
  N n;
  T mean;
  T m2;
};

template <typename T, typename N = T>
FUSEDNORM_HD Welford<T, N> welford_empty() {
  return Welford<T, N>{N(0), T(0), T(0)};
}

// Add one observation (Welford's update). Used where elements arrive one at a time (CUDA threads).
template <typename T, typename N>
FUSEDNORM_HD void welford_push(Welford<T, N>& s, T x) {
  s.n = s.n + N(1);
  const T delta = x - s.mean;
  s.mean += delta / T(s.n);
  s.m2 += delta * (x - s.mean);
}

// Chan's parallel merge of two partials. Either side may be empty.
template <typename T, typename N>
FUSEDNORM_HD Welford<T, N> welford_merge(const Welford<T, N>& a, const Welford<T, N>& b) {
  const N n = a.n + b.n;
  if (b.n == N(0)) return a;
  if (a.n == N(0)) return b;
  const T fb = T(b.n) / T(n);  // weight of b in the merged mean
  const T delta = b.mean - a.mean;
  Welford<T, N> r;
  r.n = n;
  r.mean = a.mean + delta * fb;
  r.m2 = a.m2 + b.m2 + delta * delta * T(a.n) * fb;
  return r;
}

// Partial of a block of n values whose sum and centred sum of squares are already known (the exact
// two-step result for a chunk that sits in registers or L1).
template <typename T, typename N>
FUSEDNORM_HD Welford<T, N> welford_from_chunk(N n, T mean, T m2) {
  return Welford<T, N>{n, mean, m2};
}

// Chan's merge of k partials at once, part(i) giving partial i: with m0 the first non-empty partial's mean
// (a shift that keeps the sum small), mean = m0 + sum(n_i (mean_i - m0)) / n and
// M2 = sum(M2_i + n_i (mean_i - mean)^2). One division instead of k dependent ones (a chain of pairwise
// merges is latency-bound when the partials are many and small); the order is fixed.
template <typename T, typename N, typename Part>
FUSEDNORM_HD Welford<T, N> welford_merge_all(int64_t k, const Part& part) {
  N n = N(0);
  T m0 = T(0), s = T(0);
  for (int64_t i = 0; i < k; ++i) {
    const Welford<T, N> p = part(i);
    if (p.n == N(0)) continue;
    if (n == N(0)) m0 = p.mean;
    n = n + p.n;
    s += T(p.n) * (p.mean - m0);
  }
  if (n == N(0)) return welford_empty<T, N>();
  const T mean = m0 + s / T(n);
  T m2 = T(0);
  for (int64_t i = 0; i < k; ++i) {
    const Welford<T, N> p = part(i);
    if (p.n == N(0)) continue;
    const T d = p.mean - mean;
    m2 += p.m2 + T(p.n) * d * d;
  }
  return Welford<T, N>{n, mean, m2};
}

// Biased variance m2 / n (0 for an empty partial).
template <typename T, typename N>
FUSEDNORM_HD T welford_var(const Welford<T, N>& s) {
  return s.n > N(0) ? s.m2 / T(s.n) : T(0);
}

}  // namespace fusednorm
