// Shared CUDA pieces of the fusednorm native kernels: accumulation types, 16-byte vector access, warp and
// block reductions (sums and Welford/Chan merges), and two generic kernels used by GroupNorm and BatchNorm:
//
// - segment_reduce_kernel: per-"segment" partials (a segment is one reduction: a (sample, group) for
//   GroupNorm statistics, a channel for BatchNorm, ...), each segment split over several blocks so small
//   segment counts still fill the GPU. Partials are written per (segment, split) and merged in split order
//   by segment_finalize_kernel: no float atomics, so results are deterministic.
// - nc_elementwise_kernel: the normalize / input-gradient pass with per-(n, c) coefficients.
//
// Indices are int64 throughout (tensors beyond 2^31 elements are fine).
#pragma once

// Only the light CUDA headers: ATen/cuda/CUDAContext.h would pull in cuBLAS / cuSPARSE / cuSOLVER headers,
// which a runtime-only CUDA toolkit (or the pip NVIDIA wheels) may not ship, and slows the build.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <limits>

#include "welford.h"

namespace fusednorm {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

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

template <typename A>
using WelfordD = Welford<A, A>;

// Streaming multiprocessors of the current device (queried once per device, on first use).
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= kMaxDevices) dev = kMaxDevices - 1;
  if (cache[dev] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cache[dev] = n > 0 ? n : 1;
  }
  return cache[dev];
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }  // device partials keep the count in the accumulation type

// VEC elements of T in one (up to) 16-byte transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

// Elements per 16-byte vector for T, or 1 when the pointers / sizes do not allow it.
template <typename T>
inline int vec_width(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> multiples) {
  constexpr int kMax = 16 / sizeof(T);
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  for (int64_t m : multiples) {
    if (m % kMax != 0) return 1;
  }
  return kMax;
}

// ---- reductions ----------------------------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename A>
__device__ __forceinline__ WelfordD<A> warp_welford(WelfordD<A> w) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    WelfordD<A> other{__shfl_xor_sync(0xffffffffu, w.n, o), __shfl_xor_sync(0xffffffffu, w.mean, o),
                      __shfl_xor_sync(0xffffffffu, w.m2, o)};
    w = welford_merge(w, other);
  }
  return w;
}

// Sum over the block, returned to every thread. smem: kThreads / kWarp entries.
template <typename A>
__device__ A block_sum(A v, A* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  A t = lane < nwarps ? smem[lane] : A(0);
  return warp_sum(t);
}

// Chan merge over the block, returned to every thread. smem: 3 * kThreads / kWarp entries.
template <typename A>
__device__ WelfordD<A> block_welford(WelfordD<A> w, A* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  w = warp_welford(w);
  __syncthreads();
  if (lane == 0) {
    smem[warp] = w.n;
    smem[kWarp + warp] = w.mean;
    smem[2 * kWarp + warp] = w.m2;
  }
  __syncthreads();
  WelfordD<A> t = lane < nwarps ? WelfordD<A>{smem[lane], smem[kWarp + lane], smem[2 * kWarp + lane]}
                                : welford_empty<A, A>();
  return warp_welford(t);
}

template <typename A>
__device__ __forceinline__ A silu_grad(A p) {
  const A s = A(1) / (A(1) + exp(-p));
  return s * (A(1) + p * (A(1) - s));
}

template <typename A>
__device__ __forceinline__ A silu_fn(A v) {
  return v / (A(1) + exp(-v));
}

// ---- segmented reductions (GroupNorm / BatchNorm) ------------------------------------------------------

// Where element k of segment s lives:
//   base(s)   = (s / segs_inner) * seg_outer_stride + (s % segs_inner) * seg_inner_stride
//   offset(k) = (k / inner) * outer_stride + (k % inner) * inner_stride
struct Segments {
  int64_t segs_inner, seg_outer_stride, seg_inner_stride;
  int64_t length, inner, outer_stride, inner_stride;
};

__device__ __forceinline__ int64_t seg_base(const Segments& g, int64_t s) {
  return (s / g.segs_inner) * g.seg_outer_stride + (s % g.segs_inner) * g.seg_inner_stride;
}

__device__ __forceinline__ int64_t seg_offset(const Segments& g, int64_t k) {
  return (k / g.inner) * g.outer_stride + (k % g.inner) * g.inner_stride;
}

enum class ReduceMode : int {
  kWelford = 0,  // (count, mean, M2) of x
  kGradSums = 1  // (sum de, sum de * xhat) with xhat = (x - mu) * rs, de = dy (or dy * silu'(xhat * w + b))
};

// grid: (segments, splits). Each block reduces a contiguous k-range of one segment into partial
// [segment][split][3]. coef: per segment (mu, rs, w, b) for kGradSums.
template <typename T, typename A>
__global__ void segment_reduce_kernel(const T* __restrict__ x, const T* __restrict__ dy, Segments g,
                                      int64_t splits, ReduceMode mode, bool silu, const A* __restrict__ coef,
                                      A* __restrict__ partial) {
  __shared__ A smem[3 * kWarp];
  const int64_t s = blockIdx.x, sp = blockIdx.y;
  const int64_t base = seg_base(g, s);
  const int64_t k0 = g.length * sp / splits, k1 = g.length * (sp + 1) / splits;
  A* out = partial + (s * splits + sp) * 3;
  if (mode == ReduceMode::kWelford) {
    WelfordD<A> w = welford_empty<A, A>();
    for (int64_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) {
      welford_push(w, static_cast<A>(x[base + seg_offset(g, k)]));
    }
    w = block_welford(w, smem);
    if (threadIdx.x == 0) {
      out[0] = w.n;
      out[1] = w.mean;
      out[2] = w.m2;
    }
  } else {
    const A mu = coef[s * 4 + 0], rs = coef[s * 4 + 1], wc = coef[s * 4 + 2], bc = coef[s * 4 + 3];
    A s1 = 0, s2 = 0;
    for (int64_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) {
      const int64_t off = base + seg_offset(g, k);
      const A xh = (static_cast<A>(x[off]) - mu) * rs;
      A de = static_cast<A>(dy[off]);
      if (silu) de *= silu_grad(xh * wc + bc);
      s1 += de;
      s2 += de * xh;
    }
    s1 = block_sum(s1, smem);
    s2 = block_sum(s2, smem);
    if (threadIdx.x == 0) {
      out[0] = 0;
      out[1] = s1;
      out[2] = s2;
    }
  }
}

// One thread per segment merges its splits in order: kWelford -> out0 = mean, out1 = M2;
// kGradSums -> out0 = sum de, out1 = sum de * xhat.
template <typename A>
__global__ void segment_finalize_kernel(const A* __restrict__ partial, int64_t segments, int64_t splits,
                                        ReduceMode mode, A* __restrict__ out0, A* __restrict__ out1) {
  const int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (s >= segments) return;
  const A* p = partial + s * splits * 3;
  if (mode == ReduceMode::kWelford) {
    WelfordD<A> w = welford_empty<A, A>();
    for (int64_t i = 0; i < splits; ++i) w = welford_merge(w, WelfordD<A>{p[i * 3], p[i * 3 + 1], p[i * 3 + 2]});
    out0[s] = w.n > A(0) ? w.mean : A(NAN);
    out1[s] = w.m2;
  } else {
    A s1 = 0, s2 = 0;
    for (int64_t i = 0; i < splits; ++i) {
      s1 += p[i * 3 + 1];
      s2 += p[i * 3 + 2];
    }
    out0[s] = s1;
    out1[s] = s2;
  }
}

// Splits per segment so that segments * splits is a few waves of blocks, each block still doing a few
// thousand elements.
inline int64_t choose_splits(int64_t segments, int64_t length) {
  const int sms = sm_count();
  const int64_t want_blocks = int64_t(sms) * 4;
  int64_t splits = (want_blocks + segments - 1) / std::max<int64_t>(segments, 1);
  splits = std::min<int64_t>(splits, (length + 4095) / 4096);
  return std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
}

// Runs the segmented reduction; out0/out1 are (segments,) acc-type tensors.
template <typename T, typename A>
void segment_reduce(const T* x, const T* dy, const Segments& g, int64_t segments, ReduceMode mode, bool silu,
                    const A* coef, A* out0, A* out1, const at::TensorOptions& acc_opts) {
  if (segments == 0) return;
  const cudaStream_t stream = current_stream();
  const int64_t splits = choose_splits(segments, g.length);
  at::Tensor partial = at::empty({segments * splits * 3}, acc_opts);
  TORCH_CHECK(segments < (int64_t(1) << 31), "fusednorm: too many segments");
  dim3 grid(static_cast<unsigned>(segments), static_cast<unsigned>(splits));
  segment_reduce_kernel<T, A><<<grid, kThreads, 0, stream>>>(x, dy, g, splits, mode, silu, coef,
                                                              partial.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t blocks = (segments + kThreads - 1) / kThreads;
  segment_finalize_kernel<A><<<blocks, kThreads, 0, stream>>>(partial.data_ptr<A>(), segments, splits, mode,
                                                               out0, out1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- elementwise pass over (N, C, *spatial) with per-(n, c) coefficients ---------------------------------

enum class EwMode : int {
  kAffine = 0,  // y = act((x - p0) * p1 + p2)
  kBnDx = 1,    // dx = (dy - p1 - (x - p0) * p2) * p3   (p1 = p2 = 0 in eval mode)
  kGnDx = 2     // xh = (x - p0) * p1; de = dy (* silu'(xh * p2 + p3)); dx = (de * p2 - xh * p4 - p5) * p1
};
constexpr int kCoefs = 6;

struct NCIndex {
  int64_t C, HW, coef_n_stride;  // coefficient row = n * coef_n_stride + c
  bool nhwc;
};

__device__ __forceinline__ int64_t coef_row(const NCIndex& ix, int64_t i) {
  int64_t n, c;
  if (ix.nhwc) {
    c = i % ix.C;
    n = i / (ix.C * ix.HW);
  } else {
    c = (i / ix.HW) % ix.C;
    n = i / (ix.C * ix.HW);
  }
  return n * ix.coef_n_stride + c;
}

template <typename T, typename A, int VEC>
__global__ void nc_elementwise_kernel(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ out,
                                      int64_t numel, NCIndex ix, EwMode mode, bool silu,
                                      const A* __restrict__ coef) {
  const int64_t nvec = numel / VEC;
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < nvec; v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i0 = v * VEC;
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + i0);
    Pack<T, VEC> dv;
    if (mode != EwMode::kAffine) dv = load_pack<T, VEC>(dy + i0);
    Pack<T, VEC> ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A* p = coef + coef_row(ix, i0 + j) * kCoefs;
      const A xa = static_cast<A>(xv.v[j]);
      A r;
      if (mode == EwMode::kAffine) {
        r = (xa - p[0]) * p[1] + p[2];
        if (silu) r = silu_fn(r);
      } else if (mode == EwMode::kBnDx) {
        r = (static_cast<A>(dv.v[j]) - p[1] - (xa - p[0]) * p[2]) * p[3];
      } else {
        const A xh = (xa - p[0]) * p[1];
        A de = static_cast<A>(dv.v[j]);
        if (silu) de *= silu_grad(xh * p[2] + p[3]);
        r = (de * p[2] - xh * p[4] - p[5]) * p[1];
      }
      ov.v[j] = static_cast<T>(r);
    }
    store_pack<T, VEC>(out + i0, ov);
  }
  // Tail (numel not a multiple of VEC): handled element by element by the first threads.
  const int64_t tail0 = nvec * VEC;
  const int64_t t = tail0 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t < numel) {
    const A* p = coef + coef_row(ix, t) * kCoefs;
    const A xa = static_cast<A>(x[t]);
    A r;
    if (mode == EwMode::kAffine) {
      r = (xa - p[0]) * p[1] + p[2];
      if (silu) r = silu_fn(r);
    } else if (mode == EwMode::kBnDx) {
      r = (static_cast<A>(dy[t]) - p[1] - (xa - p[0]) * p[2]) * p[3];
    } else {
      const A xh = (xa - p[0]) * p[1];
      A de = static_cast<A>(dy[t]);
      if (silu) de *= silu_grad(xh * p[2] + p[3]);
      r = (de * p[2] - xh * p[4] - p[5]) * p[1];
    }
    out[t] = static_cast<T>(r);
  }
}

template <typename T, typename A>
void nc_elementwise(const at::Tensor& x, const at::Tensor& dy, at::Tensor& out, const NCIndex& ix, EwMode mode,
                    bool silu, const at::Tensor& coef) {
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const cudaStream_t stream = current_stream();
  const T* xp = x.data_ptr<T>();
  const T* dyp = dy.defined() ? dy.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const int vec = vec_width<T>({xp, dyp ? static_cast<const void*>(dyp) : static_cast<const void*>(xp), op}, {});
  const int sms = sm_count();
  const int64_t work = (numel / vec + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(work, int64_t(sms) * 8)));
  if (vec == 16 / static_cast<int>(sizeof(T))) {
    nc_elementwise_kernel<T, A, 16 / sizeof(T)><<<blocks, kThreads, 0, stream>>>(xp, dyp, op, numel, ix, mode, silu,
                                                                                coef.data_ptr<A>());
  } else {
    nc_elementwise_kernel<T, A, 1><<<blocks, kThreads, 0, stream>>>(xp, dyp, op, numel, ix, mode, silu,
                                                                   coef.data_ptr<A>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fusednorm
