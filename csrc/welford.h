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

// Biased variance m2 / n (0 for an empty partial).
template <typename T, typename N>
FUSEDNORM_HD T welford_var(const Welford<T, N>& s) {
  return s.n > N(0) ? s.m2 / T(s.n) : T(0);
}

}  // namespace fusednorm
