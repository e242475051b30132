// Shared helpers for the CPU kernels: dtype plumbing, vectorized reductions over accumulation-type
// arrays, chunked Welford statistics and deterministic partition helpers.
//
// Every kernel computes in the accumulation type A (float, or double for double inputs), written once per
// op, not once per dtype. Streaming kernels load bf16 / fp16 straight into float vectors and store them back
// converted in registers (load_acc / store_acc / map_span, and the reductions below, which take the storage
// type); kernels that need a materialized acc-type row (the fused variants) convert it into a small per-task
// buffer (to_acc / acc_view).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "welford.h"

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#if defined(FUSEDNORM_ISA_AVX512BF16)
// From here on (our kernels, not the headers above: see isa_prelude.h) AVX-512 instructions are allowed.
// The vectors stay 256-bit, so no frequency licence changes on Intel and the kernels match the AVX2 copy.
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,prefer-vector-width=256")
#endif

namespace fusednorm {
namespace cpu {
namespace FUSEDNORM_ISA {

using at::vec::Vectorized;

// Elements per chunk of the statistics (chunk_stats): a chunk (and an fp32 copy of it) stays in L1, so
// the exact second pass that a cancelling chunk falls back to does not read memory again.
constexpr int64_t kChunk = 2048;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccOf<T>::type;


// ---- float -> bf16 / fp16 in registers -----------------------------------------------------------------
//
// Round to nearest even, as torch does. The AVX-512 copy converts bf16 with vcvtne2ps2bf16 (one instruction
// per 16 values, against about ten for the AVX2 emulation: bf16 LayerNorm forward 1.3-1.5x faster). That
// instruction flushes denormals to zero and keeps NaN payloads, so a vector holding a denormal or a NaN
// (one vfpclassps test) takes the emulated path: every copy writes the same bits.

#if defined(FUSEDNORM_ISA_AVX512BF16)
constexpr int kDenormalOrNan = 0x01 | 0x20 | 0x80;  // vfpclassps classes: quiet NaN, denormal, signaling NaN
#endif

// lo (elements 0-7) and hi (8-15) as one vector of 16 T.
template <typename T>
inline Vectorized<T> pack_from_float(const Vectorized<float>& lo, const Vectorized<float>& hi) {
#if defined(FUSEDNORM_ISA_AVX512BF16)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if ((_mm256_fpclass_ps_mask(lo, kDenormalOrNan) | _mm256_fpclass_ps_mask(hi, kDenormalOrNan)) == 0) {
      return Vectorized<T>((__m256i)_mm256_cvtne2ps_pbh(hi, lo));
    }
  }
#endif
  return at::vec::convert_from_float<T>(lo, hi);
}

#if defined(CPU_CAPABILITY_AVX2)
// 8 floats as 8 bf16.
inline __m128i bf16x8_from_float(__m256 v) {
#if defined(FUSEDNORM_ISA_AVX512BF16)
  if (_mm256_fpclass_ps_mask(v, kDenormalOrNan) == 0) return (__m128i)_mm256_cvtneps_pbh(v);
#endif
  return at::vec::cvtfp32_bf16(v);
}
#endif

// ---- dtype conversion between storage type T and accumulation type A ------------------------------

template <typename T, typename A>
inline void to_acc(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(dst, src, sizeof(T) * n);
  } else {
    static_assert(std::is_same_v<A, float>, "reduced-precision inputs accumulate in float");
    using bV = Vectorized<T>;
    using fV = Vectorized<float>;
    int64_t i = 0;
    for (; i + bV::size() <= n; i += bV::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(bV::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + fV::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename T, typename A>
inline void from_acc(const A* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    if (src != dst) std::memcpy(dst, src, sizeof(T) * n);
  } else {
    using bV = Vectorized<T>;
    using fV = Vectorized<float>;
    int64_t i = 0;
    for (; i + bV::size() <= n; i += bV::size()) {
      auto lo = fV::loadu(src + i);
      auto hi = fV::loadu(src + i + fV::size());
      pack_from_float<T>(lo, hi).store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// ---- non-temporal (streaming) stores for outputs much larger than the caches ---------------------------
//
// An ordinary store first reads the destination line into the cache (read-for-ownership), so writing an
// output that will not be read again soon costs a read and a write of memory; a streaming store writes
// the line directly. That is a clear win when the output cannot stay in the last-level cache, and a loss
// when it can: the allocator hands the same block back on the next call (or the next op reads it), and
// its lines are still cached. The threshold is on the output alone, at half the L3 of one CCD (32 MiB on
// Zen 2-4): from there input + output together no longer fit, and the ordinary stores' extra read costs
// more than the cache hits they keep. Measured with fusednorm-bench on the 2-core EPYC VM (2 threads,
// inputs rotated out of cache, two runs per setting, threshold 32 MiB -> 16 MiB, ours / torch):
// BatchNorm eval 32x64x56x56 fp32 (24.5 MiB out) 0.93-0.99x -> 1.08-1.21x, GroupNorm fwd 8x256x56x56 fp32
// 0.91x -> 1.04-1.20x, BatchNorm train channels_last fwd 1.02-1.04x -> 1.25-1.27x; and 40 -> 32 MiB:
// LayerNorm fwd 1024x8192 fp32 (32 MiB out) 2.8-3.2 -> 1.6-2.0 ms. (An older one-thread measurement had
// found 25.7 MiB outputs slower when streamed; with both cores busy it is the other way round.) Below it, streaming
// makes an op alone faster but the op plus a consumer slower: measured in one process, the op then y.sum(), each
// setting alternating (us, ordinary / streamed stores; op alone, then op + sum): LayerNorm fwd 2048x1024 fp32
// 376 / 437, 520 / 755; LayerNorm bwd 2048x1024 1044 / 958, 1150 / 1240; GroupNorm fwd NCHW 2x320x64x64 673 /
// 658, 1032 / 1041; channels_last 1213 / 1049, 1487 / 1442. A benchmark of the op alone would favour a lower
// threshold; a network, whose next op reads the output, does not. It is a
// constant because sysconf(_SC_LEVEL3_CACHE_SIZE) reports the whole host's L3 (320 MiB) inside a VM. Only
// the AVX2 copy streams.

// Output bytes from which an op streams its output (FUSEDNORM_CPU_STREAM_BYTES overrides; 0 disables).
inline int64_t stream_threshold_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("FUSEDNORM_CPU_STREAM_BYTES");
    if (env != nullptr && *env != '\0') {
      const long long v = std::atoll(env);
      return v <= 0 ? INT64_MAX : static_cast<int64_t>(v);
    }
    return int64_t(16) << 20;
  }();
  return bytes;
}

inline bool stream_output(int64_t out_bytes) { return out_bytes >= stream_threshold_bytes(); }

// Orders this thread's streaming stores before what follows (call at the end of each task that streamed).
inline void stream_fence(bool streamed) {
#if defined(CPU_CAPABILITY_AVX2)
  if (streamed) _mm_sfence();
#else
  (void)streamed;
#endif
}

// v.store(dst, cnt), streaming when asked and possible (a full, 32-byte aligned vector).
template <typename A>
inline void store_vec(const Vectorized<A>& v, A* dst, int64_t cnt, bool stream) {
#if defined(CPU_CAPABILITY_AVX2)
  if (stream && cnt == Vectorized<A>::size() && (reinterpret_cast<std::uintptr_t>(dst) & 31) == 0) {
    if constexpr (std::is_same_v<A, float>) {
      _mm256_stream_ps(dst, v);
      return;
    } else if constexpr (std::is_same_v<A, double>) {
      _mm256_stream_pd(dst, v);
      return;
    }
  }
#else
  (void)stream;
#endif
  v.store(dst, cnt);
}

// from_acc, streaming the converted output when asked (see above).
template <typename T, typename A>
inline void from_acc_stream(const A* src, T* dst, int64_t n, bool stream) {
  if constexpr (std::is_same_v<T, A>) {
    using V = Vectorized<A>;
    for (int64_t i = 0; i < n; i += V::size()) {
      const int64_t cnt = std::min<int64_t>(V::size(), n - i);
      store_vec(V::loadu(src + i, cnt), dst + i, cnt, stream);
    }
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    if (stream) {
      using bV = Vectorized<T>;
      using fV = Vectorized<float>;
      int64_t i = 0;
      // Ordinary stores up to the first 32-byte boundary, then streaming whole vectors.
      const auto mis = static_cast<int64_t>((reinterpret_cast<std::uintptr_t>(dst) & 31) / sizeof(T));
      const int64_t head = std::min<int64_t>(n, mis == 0 ? 0 : (32 / int64_t(sizeof(T))) - mis);
      for (; i < head; ++i) dst[i] = static_cast<T>(src[i]);
      for (; i + bV::size() <= n; i += bV::size()) {
        const bV v = pack_from_float<T>(fV::loadu(src + i), fV::loadu(src + i + fV::size()));
        _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), v);
      }
      for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
      return;
    }
#endif
    from_acc(src, dst, n);
  }
}

// A read-only accumulation-type view of src[0:n]: src itself when T == A, else a converted copy in buf.
template <typename T, typename A>
inline const A* acc_view(const T* src, A* buf, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    to_acc(src, buf, n);
    return buf;
  }
}

// ---- writing acc-type vectors as the storage type ---------------------------------------------------

// Stores 2 * Vectorized<A>::size() results as T (T != A: bf16 / fp16 from float), converting in registers;
// streams when asked and dst is 32-byte aligned.
template <typename T>
inline void store_pair(T* dst, const Vectorized<float>& lo, const Vectorized<float>& hi, bool stream) {
  const Vectorized<T> v = pack_from_float<T>(lo, hi);
#if defined(CPU_CAPABILITY_AVX2)
  if (stream && (reinterpret_cast<std::uintptr_t>(dst) & 31) == 0) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), v);
    return;
  }
#else
  (void)stream;
#endif
  v.store(dst);
}

// ---- storage-type vectors converted in registers -------------------------------------------------------
//
// Streaming kernels (elementwise maps, one-read reductions) load and store T directly and convert in
// registers: a detour through an fp32 buffer splits the loop into convert / compute / convert phases, and
// the memory stream stalls at every phase change (measured: bf16 BatchNorm apply 1.5x slower that way).

// cnt (<= Vectorized<A>::size()) elements of T at p as one Vectorized<A>, zero past cnt.
template <typename T, typename A = acc_type<T>>
inline Vectorized<A> load_acc(const T* p, int64_t cnt) {
  using V = Vectorized<A>;
  if constexpr (std::is_same_v<T, A>) {
    return V::loadu(p, cnt);
  } else {
    static_assert(std::is_same_v<A, float>, "reduced-precision inputs accumulate in float");
    if (cnt == V::size()) {
      V v;
      at::vec::load_to_float<T>(p, v);
      return v;
    }
    __at_align__ A tmp[V::size()] = {};
    for (int64_t k = 0; k < cnt; ++k) tmp[k] = static_cast<A>(p[k]);
    return V::loadu(tmp);
  }
}

// Stores the first cnt (<= Vectorized<A>::size()) lanes of v at p as T.
template <typename T, typename A>
inline void store_acc(T* p, const Vectorized<A>& v, int64_t cnt) {
  if constexpr (std::is_same_v<T, A>) {
    v.store(p, cnt);
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    if (cnt == Vectorized<A>::size()) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16x8_from_float(__m256(v)));
        return;
      } else if constexpr (std::is_same_v<T, c10::Half>) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_fp16(__m256(v)));
        return;
      }
    }
#endif
    __at_align__ A tmp[Vectorized<A>::size()];
    v.store(tmp);
    for (int64_t k = 0; k < cnt; ++k) p[k] = static_cast<T>(tmp[k]);
  }
}

// Elementwise over [0, n): dst[j] = f(j, cnt, x[j], y[j]) for vectors of cnt lanes starting at j, with x,
// y (y may be null: zeros are passed) and dst of storage type T, converted in registers; dst streamed
// when asked. Reduced-precision data goes two vectors (one 32-byte load / store) at a time.
template <typename T, typename A, typename F>
inline void map_span(const T* x, const T* y, T* dst, int64_t n, bool stream, const F& f) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  int64_t j = 0;
  if constexpr (std::is_same_v<T, A>) {
    if (y != nullptr) {
      for (; j + W <= n; j += W) store_vec(f(j, W, V::loadu(x + j), V::loadu(y + j)), dst + j, W, stream);
    } else {
      const V zero(A(0));
      for (; j + W <= n; j += W) store_vec(f(j, W, V::loadu(x + j), zero), dst + j, W, stream);
    }
  } else {
    static_assert(std::is_same_v<A, float>, "reduced-precision data is computed in float");
    using bV = Vectorized<T>;
    if (y != nullptr) {
      for (; j + 2 * W <= n; j += 2 * W) {
        auto [xl, xh] = at::vec::convert_to_float<T>(bV::loadu(x + j));
        auto [yl, yh] = at::vec::convert_to_float<T>(bV::loadu(y + j));
        store_pair(dst + j, f(j, W, xl, yl), f(j + W, W, xh, yh), stream);
      }
    } else {
      const V zero(A(0));
      for (; j + 2 * W <= n; j += 2 * W) {
        auto [xl, xh] = at::vec::convert_to_float<T>(bV::loadu(x + j));
        store_pair(dst + j, f(j, W, xl, zero), f(j + W, W, xh, zero), stream);
      }
    }
  }
  for (; j < n; j += W) {
    const int64_t cnt = std::min<int64_t>(W, n - j);
    const V vy = y != nullptr ? load_acc<T, A>(y + j, cnt) : V(A(0));
    store_acc<T, A>(dst + j, f(j, cnt, load_acc<T, A>(x + j, cnt), vy), cnt);
  }
}

// Applies f(j, cnt) -> Vectorized<A> (the results for elements [j, j + cnt)) over [0, n) and writes them to
// dst as T: in place when T == A, else converted two vectors at a time; streamed when asked. Loops are
// split into full vectors and one tail so the hot loop has no per-vector bounds logic.
template <typename T, typename A, typename F>
inline void write_row(T* dst, int64_t n, bool stream, const F& f) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  int64_t j = 0;
  if constexpr (std::is_same_v<T, A>) {
    for (; j + W <= n; j += W) store_vec(f(j, W), dst + j, W, stream);
    if (j < n) f(j, n - j).store(dst + j, n - j);
  } else {
    static_assert(std::is_same_v<A, float>, "reduced-precision outputs are computed in float");
    for (; j + 2 * W <= n; j += 2 * W) store_pair(dst + j, f(j, W), f(j + W, W), stream);
    for (; j < n; j += W) {
      const int64_t cnt = std::min<int64_t>(W, n - j);
      A tmp[W];
      f(j, cnt).store(tmp, cnt);
      for (int64_t k = 0; k < cnt; ++k) dst[j + k] = static_cast<T>(tmp[k]);
    }
  }
}

// Prefetches a few equally long byte ranges (the next rows of a row loop), one cache line per step(),
// round-robin over the ranges. A pass that works from cache calls step() once per vector, so that memory,
// idle during that pass, fetches the next rows meanwhile; a burst of prefetches instead would stall on the
// core's few outstanding-miss slots.
struct LinePrefetcher {
  static constexpr int kMaxRanges = 4;
  const char* base[kMaxRanges] = {};
  int ranges = 0, cur = 0;
  int64_t bytes = 0, off = 0;

  explicit LinePrefetcher(int64_t range_bytes) : bytes(range_bytes) {}
  void add(const void* p) {
    if (p != nullptr && ranges < kMaxRanges) base[ranges++] = static_cast<const char*>(p);
  }
  inline void step() {
    if (off >= bytes || ranges == 0) return;
    __builtin_prefetch(base[cur] + off);
    if (++cur == ranges) {
      cur = 0;
      off += 64;
    }
  }
};

// dst[j] = (((a[j] - shift) - mu) * rs) * w[j] + b[j] as T, with w and / or b optional (null); a is of
// storage type S (T, or an acc-type copy). `a` may alias dst only when T == S. on_vector() runs once per
// vector (normalize_row: a prefetch step, or nothing).
template <typename T, typename A, typename S, typename OnVector>
inline void normalize_row_with(const S* a, T* dst, int64_t n, A shift, A mu, A rs, const A* w, const A* b,
                               bool stream, OnVector on_vector) {
  using V = Vectorized<A>;
  const V vs(shift), vm(mu), vr(rs);
  auto xhat = [&](int64_t j, int64_t cnt) {
    on_vector();
    return ((load_acc<S, A>(a + j, cnt) - vs) - vm) * vr;
  };
  if (w != nullptr && b != nullptr) {
    write_row<T, A>(dst, n, stream, [&](int64_t j, int64_t cnt) {
      return at::vec::fmadd(xhat(j, cnt), V::loadu(w + j, cnt), V::loadu(b + j, cnt));
    });
  } else if (w != nullptr) {
    write_row<T, A>(dst, n, stream, [&](int64_t j, int64_t cnt) { return xhat(j, cnt) * V::loadu(w + j, cnt); });
  } else if (b != nullptr) {
    write_row<T, A>(dst, n, stream, [&](int64_t j, int64_t cnt) { return xhat(j, cnt) + V::loadu(b + j, cnt); });
  } else {
    write_row<T, A>(dst, n, stream, xhat);
  }
}

// normalize_row_with, prefetching the ranges of next_rows (when given and not empty) meanwhile, one line per
// vector. Without them the loop has no prefetch bookkeeping at all.
template <typename T, typename A, typename S>
inline void normalize_row(const S* a, T* dst, int64_t n, A shift, A mu, A rs, const A* w, const A* b,
                          bool stream, const LinePrefetcher* next_rows = nullptr) {
  if (next_rows != nullptr && next_rows->ranges > 0) {
    LinePrefetcher pf = *next_rows;  // a local copy, which the loop's stores cannot alias
    normalize_row_with(a, dst, n, shift, mu, rs, w, b, stream, [&] { pf.step(); });
  } else {
    normalize_row_with(a, dst, n, shift, mu, rs, w, b, stream, [] {});
  }
}

// ---- vectorized reductions (fixed order: bit-identical for the same input) --------------------------

// Calls step(j, cnt, u) for the vectors [j, j + cnt) covering [0, n), u alternating 0 / 1 over the full
// vectors and 0 for the tail: a loop that keeps two sets of accumulators (indexed by u) is not bound by the
// latency of its add / FMA chains when its data is in cache.
template <typename A, typename Step>
inline void for_vectors_2way(int64_t n, const Step& step) {
  constexpr int64_t W = Vectorized<A>::size();
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    step(j, W, 0);
    step(j + W, W, 1);
  }
  for (; j < n; j += W) step(j, std::min<int64_t>(W, n - j), 0);
}


template <typename A>
inline A horizontal_sum(const Vectorized<A>& v) {
  A tmp[Vectorized<A>::size()];
  v.store(tmp);
  A s = 0;
  for (int64_t k = 0; k < Vectorized<A>::size(); ++k) s += tmp[k];
  return s;
}

// sum(p * q); p, q of storage type T, converted in registers.
template <typename T, typename A = acc_type<T>>
inline A vdot(const T* p, const T* q, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  V a0(A(0)), a1(A(0)), a2(A(0)), a3(A(0));
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = at::vec::fmadd(load_acc(p + i, W), load_acc(q + i, W), a0);
    a1 = at::vec::fmadd(load_acc(p + i + W, W), load_acc(q + i + W, W), a1);
    a2 = at::vec::fmadd(load_acc(p + i + 2 * W, W), load_acc(q + i + 2 * W, W), a2);
    a3 = at::vec::fmadd(load_acc(p + i + 3 * W, W), load_acc(q + i + 3 * W, W), a3);
  }
  for (; i + W <= n; i += W) a0 = at::vec::fmadd(load_acc(p + i, W), load_acc(q + i, W), a0);
  A s = horizontal_sum((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += static_cast<A>(p[i]) * static_cast<A>(q[i]);
  return s;
}

// sum(f(x)^2) over p[0:n] (storage type T, converted in registers), f applied to each vector and to each
// element of the tail (f takes a Vectorized<A> or an A). Four independent accumulators: on data in cache the
// loop would otherwise be bound by the FMA latency chain.
template <typename T, typename A, typename F>
inline A vsum_squares(const T* p, int64_t n, const F& f) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  V a0(A(0)), a1(A(0)), a2(A(0)), a3(A(0));
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    const V d0 = f(load_acc(p + i, W)), d1 = f(load_acc(p + i + W, W));
    const V d2 = f(load_acc(p + i + 2 * W, W)), d3 = f(load_acc(p + i + 3 * W, W));
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
    a2 = at::vec::fmadd(d2, d2, a2);
    a3 = at::vec::fmadd(d3, d3, a3);
  }
  for (; i + W <= n; i += W) {
    const V d = f(load_acc(p + i, W));
    a0 = at::vec::fmadd(d, d, a0);
  }
  A s = horizontal_sum((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) {
    const A v = f(static_cast<A>(p[i]));
    s += v * v;
  }
  return s;
}

// sum((p - c)^2).
template <typename T, typename A>
inline A vsum_sqdev(const T* p, int64_t n, A c) {
  const Vectorized<A> vc(c);
  return vsum_squares<T, A>(p, n, [&](const auto& x) {
    if constexpr (std::is_same_v<std::decay_t<decltype(x)>, A>) {
      return x - c;
    } else {
      return x - vc;
    }
  });
}

// Statistics of a span relative to a shift: `w.mean` is the mean of (x - shift), `w.m2` the centred sum of
// squares. The shift is taken from the span's data (stats_contig: the mean of its first elements), so when
// |mean| >> std the partial sums stay small and the mean keeps bits that rounding mean itself to the
// input's magnitude would lose; the normalize pass then computes (x - shift) - w.mean, which is exact-ish
// for such data (Sterbenz).
template <typename A>
struct ShiftedStats {
  A shift;
  Welford<A, int64_t> w;
  A mean() const { return shift + w.mean; }
};

// sum(p - k); p of storage type T, converted in registers.
template <typename T, typename A>
inline A vsum_shifted(const T* p, int64_t n, A k) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V vk(k);
  V a0(A(0)), a1(A(0)), a2(A(0)), a3(A(0));
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 += load_acc(p + i, W) - vk;
    a1 += load_acc(p + i + W, W) - vk;
    a2 += load_acc(p + i + 2 * W, W) - vk;
    a3 += load_acc(p + i + 3 * W, W) - vk;
  }
  for (; i + W <= n; i += W) a0 += load_acc(p + i, W) - vk;
  A s = horizontal_sum((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += static_cast<A>(p[i]) - k;
  return s;
}

// sum(((p - k) - d)^2): the exact second pass of a chunk's statistics, from L1.
template <typename T, typename A>
inline A vsum_sqdev2(const T* p, int64_t n, A k, A d) {
  const Vectorized<A> vk(k), vd(d);
  return vsum_squares<T, A>(p, n, [&](const auto& x) {
    if constexpr (std::is_same_v<std::decay_t<decltype(x)>, A>) {
      return (x - k) - d;
    } else {
      return (x - vk) - vd;
    }
  });
}

// Statistics of one L1-sized chunk relative to the shift k, from one read: the sums of d = x - k and d^2
// give mean = S1 / n and M2 = S2 - S1 * mean. That difference cancels when the chunk's mean is far from k
// against its spread; M2 < S2 / 8 (|mean| beyond about 2.6 standard deviations of the chunk, which
// amplifies the sums' rounding at most 8x) falls back to the exact second pass over the chunk, still in L1.
// stats_contig's k is the mean of the span's first elements, so for data like mean + noise the fallback is
// rare: an outlier among the first elements, or a span whose chunks sit at different levels (e.g. a
// GroupNorm group of channels with different means).
template <typename T, typename A>
inline Welford<A, int64_t> chunk_stats(const T* q, int64_t len, A k) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V vk(k);
  V s1a(A(0)), s1b(A(0)), s2a(A(0)), s2b(A(0));
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    const V d0 = load_acc(q + i, W) - vk, d1 = load_acc(q + i + W, W) - vk;
    s1a = s1a + d0;
    s1b = s1b + d1;
    s2a = at::vec::fmadd(d0, d0, s2a);
    s2b = at::vec::fmadd(d1, d1, s2b);
  }
  A s1 = horizontal_sum(s1a + s1b), s2 = horizontal_sum(s2a + s2b);
  for (; i < len; ++i) {
    const A d = static_cast<A>(q[i]) - k;
    s1 += d;
    s2 += d * d;
  }
  const A mean = s1 / A(len);
  A m2 = s2 - s1 * mean;
  if (m2 * A(8) < s2) m2 = vsum_sqdev2(q, len, k, mean);
  return welford_from_chunk<A, int64_t>(len, mean, m2);
}

// Statistics of p[0:n] (storage type T, acc type A): L1-sized chunks of one read each (chunk_stats),
// Chan-merged in order. One read per chunk instead of an exact two-step per chunk (sum, then the centred
// squares from L1) measured faster in fusednorm-bench on the 2-core VM (two runs each, ours / torch):
// LayerNorm fwd 2048x1024 fp32 1.03-1.09x -> 1.09-1.32x, bf16 1.14x -> 1.32-1.35x, GroupNorm fwd
// 2x320x64x64 fp32 0.81-0.89x -> 0.92-0.93x, bf16 0.95-0.96x -> 1.04-1.05x; and, in one process,
// interleaved, the GroupNorm kernel alone 2x320x64x64 fp32 485-550 -> 433-500 us (torch 460-570).
template <typename T, typename A = acc_type<T>>
inline ShiftedStats<A> stats_contig(const T* p, int64_t n) {
  // The shift: the mean of the first (up to) 8 elements, usually well within one standard deviation of the
  // span's mean, so chunk_stats's one-read sums rarely need their fallback.
  const int64_t nk = std::min<int64_t>(n, 8);
  A k = A(0);
  for (int64_t i = 0; i < nk; ++i) k += static_cast<A>(p[i]);
  ShiftedStats<A> s{nk > 0 ? k / A(nk) : A(0), welford_empty<A, int64_t>()};
  for (int64_t off = 0; off < n; off += kChunk) {
    s.w = welford_merge(s.w, chunk_stats(p + off, std::min(kChunk, n - off), s.shift));
  }
  return s;
}

// The same for an acc-type array.
template <typename A>
inline ShiftedStats<A> stats_acc(const A* p, int64_t n) {
  return stats_contig<A, A>(p, n);
}

// R rows (1 or 2) of the LayerNorm / RMSNorm backward (shared by the plain and the residual-add kernels):
// accumulates dW/dB partials into dwr / dbr (either may be null) and writes dx[r] as T. ax / ady are
// storage-type rows (or acc-type copies), read several times from cache and converted in registers. Two rows
// at a time halve the load / store traffic of the dW/dB partials; each column still adds row r before row
// r + 1, so the partials are bit-identical to one row at a time.
// g = dy * w; dx = (g - xhat * mean(g * xhat) - mean(g)) * rstd (the mean(g) term is absent for RMS).
template <int R, bool HAS_W, typename SX, typename SD, typename T, typename A>
inline void layer_norm_bwd_rows(const SX* const* ax, const SD* const* ady, const A* w, const A* mu,
                                const A* rs, bool is_rms, int64_t N, A* dwr, A* dbr, T* const* dx, bool stream,
                                LinePrefetcher* next_rows = nullptr) {
  static_assert(R == 1 || R == 2, "one or two rows at a time");
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  // What the loops read and update lives in locals (a Row per row, a copy of the prefetcher), not behind the
  // caller's pointer arrays or in arrays indexed by row: a vector store may alias any memory that has
  // escaped, so such state was reloaded (and the sums spilled) around every store of the dW/dB partials.
  // On the bf16 4096x4096 backward that overhead, not memory, bound the loops: the op back to back 7.8 ->
  // 5.0-5.2 ms; against ATen, cold inputs (bench/kernel_ab.py, two runs) 1.46-1.52x -> 1.71-1.74x. fp32 is
  // memory-bound and unchanged.
  struct Row {
    const SX* x;
    const SD* dy;
    V mu, e, rs, s1, s2;
  };
  // The saved mean is rounded to A: when |mean| >> spread its rounding error is not small against x - mean,
  // and dx = rstd * (g - xhat * c1 - c2) cancels. e = mean(x - mean) is that error, measured on the data
  // (the row is in cache); xhat = ((x - mean) - e) * rstd removes it (never mean + e, which rounds again).
  // |e| <= ulp(mean) / 2, so e * rstd <= 2^-24 |mean| rstd: when |mean| * rstd <= 1 the correction is below
  // the rounding of xhat itself and the extra pass over the row is skipped.
  auto make_row = [&](int r) {
    const bool need_e = !is_rms && std::abs(mu[r]) * rs[r] > A(1);
    const A e = need_e ? vsum_shifted(ax[r], N, mu[r]) / A(N) : A(0);
    return Row{ax[r], ady[r], V(mu[r]), V(e), V(rs[r]), V(A(0)), V(A(0))};
  };
  Row row0 = make_row(0), row1 = row0;  // row1 is used only when R == 2
  if constexpr (R == 2) row1 = make_row(1);
  auto xhat = [](const Row& row, int64_t j, int64_t cnt) {
    return ((load_acc<SX, A>(row.x + j, cnt) - row.mu) - row.e) * row.rs;
  };
  auto times_w = [w](const V& d, int64_t j, int64_t cnt) {
    if constexpr (HAS_W) {
      return d * V::loadu(w + j, cnt);
    } else {
      (void)w;
      return d;
    }
  };
  // Pass 1: the two sums of each row, and the dW/dB partials (loops split so the hot one has no bounds
  // logic). dy is zero-filled past cnt, so a tail adds nothing to the sums.
  auto accumulate = [&](Row& row, int64_t j, int64_t cnt, V& dw_acc, V& db_acc) {
    const V xh = xhat(row, j, cnt), d = load_acc<SD, A>(row.dy + j, cnt);
    const V g = times_w(d, j, cnt);
    row.s1 = at::vec::fmadd(g, xh, row.s1);
    row.s2 = row.s2 + g;
    dw_acc = at::vec::fmadd(d, xh, dw_acc);
    db_acc = db_acc + d;
  };
  auto pass1 = [&](int64_t j, int64_t cnt) {
    V dw_acc = dwr != nullptr ? V::loadu(dwr + j, cnt) : V(A(0));
    V db_acc = dbr != nullptr ? V::loadu(dbr + j, cnt) : V(A(0));
    accumulate(row0, j, cnt, dw_acc, db_acc);
    if constexpr (R == 2) accumulate(row1, j, cnt, dw_acc, db_acc);
    if (dwr != nullptr) dw_acc.store(dwr + j, cnt);
    if (dbr != nullptr) db_acc.store(dbr + j, cnt);
  };
  int64_t j = 0;
  for (; j + W <= N; j += W) pass1(j, W);
  if (j < N) pass1(j, N - j);
  const A inv_n = A(1) / A(N);
  // Pass 2 (the rows are still in cache), prefetching the caller's next rows. One loop over the rows, on a
  // copy of each: write_row and its lambda are then inlined once, on locals (the row, the prefetcher).
  LinePrefetcher pf = next_rows != nullptr ? *next_rows : LinePrefetcher(0);
  for (int r = 0; r < R; ++r) {
    const Row row = r == 0 ? row0 : row1;
    const V vc1(horizontal_sum(row.s1) * inv_n), vc2(is_rms ? A(0) : horizontal_sum(row.s2) * inv_n);
    write_row<T, A>(dx[r], N, stream, [&](int64_t k, int64_t cnt) {
      pf.step();
      const V g = times_w(load_acc<SD, A>(row.dy + k, cnt), k, cnt);
      return (g - at::vec::fmadd(xhat(row, k, cnt), vc1, vc2)) * row.rs;
    });
  }
}

// One row of the LayerNorm / RMSNorm backward: layer_norm_bwd_rows for R = 1.
template <bool HAS_W, typename SX, typename SD, typename T, typename A>
inline void layer_norm_bwd_row(const SX* ax, const SD* ady, const A* w, A mu, A rs, bool is_rms, int64_t N, A* dwr,
                               A* dbr, T* dx, bool stream) {
  layer_norm_bwd_rows<1, HAS_W>(&ax, &ady, w, &mu, &rs, is_rms, N, dwr, dbr, &dx, stream);
}

// sigmoid-weighted linear unit on a vector, v * sigmoid(v). exp_u20 (ATen's polynomial exp, at most 20 ulp)
// instead of Sleef's exp: the latter made the fused SiLU cost more than the GroupNorm
// (2x320x64x64 fp32, one thread: +2.5 ms on a 1.7 ms GroupNorm; +1.3 ms now). Measured max relative error
// of the fused SiLU over outputs in [-30, 30]: 2.1e-7 (torch's SiLU: 1.4e-7).
template <typename A>
inline Vectorized<A> vsilu(const Vectorized<A>& v) {
  const Vectorized<A> one(A(1));
  return v / (one + v.neg().exp_u20());
}

template <typename A>
inline A ssilu(A v) {
  return v / (A(1) + std::exp(-v));
}

// d silu(p) / dp = s * (1 + p * (1 - s)) with s = sigmoid(p).
template <typename A>
inline Vectorized<A> vsilu_grad(const Vectorized<A>& p) {
  const Vectorized<A> one(A(1));
  const Vectorized<A> s = one / (one + p.neg().exp_u20());
  return s * (one + p * (one - s));
}

template <typename A>
inline A ssilu_grad(A p) {
  const A s = A(1) / (A(1) + std::exp(-p));
  return s * (A(1) + p * (A(1) - s));
}

// Row range [begin, end) of block b when `rows` rows are split into `blocks` nearly equal blocks.
inline std::pair<int64_t, int64_t> block_range(int64_t rows, int64_t blocks, int64_t b) {
  const int64_t base = rows / blocks, extra = rows % blocks;
  const int64_t begin = b * base + std::min(b, extra);
  return {begin, begin + base + (b < extra ? 1 : 0)};
}

// Split count of the partial-sum reductions (dW/dB and the like). It is a constant, not the thread count,
// so the summation order and hence every bit of the result are the same whatever torch.get_num_threads()
// is and however the tasks are scheduled; 64 keeps machines with up to 64 threads busy.
constexpr int64_t kReductionSplits = 64;

// Number of partial-sum blocks for a reduction over `rows` rows (at most one per row).
inline int64_t num_blocks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(rows, kReductionSplits));
}

// out[j] = sum over b of partial[b * n + j], added in block order (deterministic), for j in [0, n). Vectorized
// over j and parallel over column ranges: a column-at-a-time loop strides through the partials and cost 17%
// of a 1024x8192 LayerNorm backward.
template <typename A>
inline void sum_block_partials(const A* partial, int64_t blocks, int64_t n, A* out) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  at::parallel_for(0, (n + W - 1) / W, 256, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      const int64_t j = v * W, cnt = std::min(W, n - j);
      V acc(A(0));
      for (int64_t b = 0; b < blocks; ++b) acc = acc + V::loadu(partial + b * n + j, cnt);
      acc.store(out + j, cnt);
    }
  });
}

// Parameter (C,) or (N,) tensor as a contiguous acc-type tensor, or an undefined tensor.
inline at::Tensor param_acc(const c10::optional<at::Tensor>& p, at::ScalarType acc) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  return p->to(acc).contiguous();
}

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace FUSEDNORM_ISA
}  // namespace cpu
}  // namespace fusednorm
