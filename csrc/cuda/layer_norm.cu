// LayerNorm / RMSNorm CUDA kernels.
//
// Forward: one block per row (grid-stride over rows); each thread keeps a Welford partial of its
// elements (16-byte vector loads when the row base, row stride and N allow it), the block merges the
// partials with Chan's formula through warp shuffles and shared memory, then the row is normalized on a
// second read (from L1/L2). Backward: a persistent grid; each block walks a set of rows, reduces the two
// row sums, writes dx, and accumulates dW/dB into its own row of an fp32 (programs, N) partial buffer;
// a second kernel sums that buffer column by column in block order. No float atomics: deterministic.
#include "cuda/cuda_utils.cuh"
#include "ops.h"

FUSEDNORM_DECLARE_OPS(fusednorm::cuda)

namespace fusednorm {
namespace cuda {
namespace {

template <typename T, typename A, int VEC>
__global__ void ln_fwd_kernel(const T* __restrict__ x, int64_t ldx, const A* __restrict__ w,
                              const A* __restrict__ b, T* __restrict__ y, A* __restrict__ mean,
                              A* __restrict__ rstd, int64_t M, int64_t N, A eps, bool is_rms) {
  __shared__ A smem[3 * kWarp];
  const int64_t step = int64_t(blockDim.x) * VEC;
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * ldx;
    T* yr = y + r * N;
    A mu = 0, rs;
    if (is_rms) {
      A ss = 0;
      for (int64_t j = int64_t(threadIdx.x) * VEC; j < N; j += step) {
        const Pack<T, VEC> v = load_pack<T, VEC>(xr + j);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A a = static_cast<A>(v.v[k]);
          ss += a * a;
        }
      }
      ss = block_sum(ss, smem);
      rs = A(1) / sqrt(ss / A(N) + eps);
    } else {
      WelfordD<A> st = welford_empty<A, A>();
      for (int64_t j = int64_t(threadIdx.x) * VEC; j < N; j += step) {
        const Pack<T, VEC> v = load_pack<T, VEC>(xr + j);
#pragma unroll
        for (int k = 0; k < VEC; ++k) welford_push(st, static_cast<A>(v.v[k]));
      }
      st = block_welford(st, smem);
      mu = st.mean;
      rs = A(1) / sqrt(st.m2 / A(N) + eps);
    }
    if (threadIdx.x == 0) {
      if (!is_rms) mean[r] = N > 0 ? mu : A(NAN);
      rstd[r] = rs;
    }
    for (int64_t j = int64_t(threadIdx.x) * VEC; j < N; j += step) {
      const Pack<T, VEC> v = load_pack<T, VEC>(xr + j);
      Pack<T, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        A a = (static_cast<A>(v.v[k]) - mu) * rs;
        if (w) a *= w[j + k];
        if (b) a += b[j + k];
        o.v[k] = static_cast<T>(a);
      }
      store_pack<T, VEC>(yr + j, o);
    }
  }
}

template <typename T, typename A, int VEC>
__global__ void ln_bwd_kernel(const T* __restrict__ dy, int64_t lddy, const T* __restrict__ x, int64_t ldx,
                              const A* __restrict__ w, const A* __restrict__ mean, const A* __restrict__ rstd,
                              T* __restrict__ dx, A* __restrict__ pdw, A* __restrict__ pdb, int64_t M, int64_t N,
                              bool is_rms) {
  __shared__ A smem[kWarp];
  const int64_t step = int64_t(blockDim.x) * VEC;
  A* dwr = pdw ? pdw + blockIdx.x * N : nullptr;  // this block's partial rows
  A* dbr = pdb ? pdb + blockIdx.x * N : nullptr;
  const A inv_n = A(1) / A(N);
  for (int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * ldx;
    const T* dyr = dy + r * lddy;
    const A mu = is_rms ? A(0) : mean[r];
    const A rs = rstd[r];
    A s1 = 0, s2 = 0;
    for (int64_t j = int64_t(threadIdx.x) * VEC; j < N; j += step) {
      const Pack<T, VEC> xv = load_pack<T, VEC>(xr + j);
      const Pack<T, VEC> dv = load_pack<T, VEC>(dyr + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A xh = (static_cast<A>(xv.v[k]) - mu) * rs;
        const A d = static_cast<A>(dv.v[k]);
        const A g = w ? d * w[j + k] : d;
        s1 += g * xh;
        s2 += g;
        // Each column j + k belongs to this thread for every row: plain read-modify-write, no race.
        if (dwr) dwr[j + k] += d * xh;
        if (dbr) dbr[j + k] += d;
      }
    }
    s1 = block_sum(s1, smem);
    s2 = block_sum(s2, smem);
    const A c1 = s1 * inv_n, c2 = is_rms ? A(0) : s2 * inv_n;
    for (int64_t j = int64_t(threadIdx.x) * VEC; j < N; j += step) {
      const Pack<T, VEC> xv = load_pack<T, VEC>(xr + j);
      const Pack<T, VEC> dv = load_pack<T, VEC>(dyr + j);
      Pack<T, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A xh = (static_cast<A>(xv.v[k]) - mu) * rs;
        const A d = static_cast<A>(dv.v[k]);
        const A g = w ? d * w[j + k] : d;
        o.v[k] = static_cast<T>((g - xh * c1 - c2) * rs);
      }
      store_pack<T, VEC>(dx + r * N + j, o);
    }
  }
}

// out[j] = sum over p of part[p][j], p in order (deterministic second reduction).
template <typename A>
__global__ void column_sum_kernel(const A* __restrict__ part, int64_t P, int64_t N, A* __restrict__ out) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= N) return;
  A s = 0;
  for (int64_t p = 0; p < P; ++p) s += part[p * N + j];
  out[j] = s;
}

at::Tensor param_acc(const c10::optional<at::Tensor>& p, at::ScalarType acc) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  return p->to(acc).contiguous();
}

template <typename A>
const A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

template <typename A>
A* mutable_ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              double eps, bool is_rms) {
  TORCH_CHECK(x.dim() == 2, "fusednorm_C::layer_norm_fwd: x must be 2-D (M, N)");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "fusednorm_C::layer_norm_fwd: last dim must be contiguous");
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = param_acc(weight, acc), b = param_acc(bias, acc);
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor mean = at::empty({is_rms ? 0 : M}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({M}, x.options().dtype(acc));
  if (M == 0) return {y, mean, rstd};
  const cudaStream_t stream = current_stream();
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(M, 65535 * 8));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_fwd_cuda", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int vec = vec_width<scalar_t>({xp, yp}, {N, x.stride(0)});
    A* meanp = is_rms ? nullptr : mean.data_ptr<A>();
    if (vec > 1) {
      ln_fwd_kernel<scalar_t, A, 16 / sizeof(scalar_t)><<<grid, kThreads, 0, stream>>>(
          xp, x.stride(0), ptr_or_null<A>(w), ptr_or_null<A>(b), yp, meanp, rstd.data_ptr<A>(), M, N, A(eps),
          is_rms);
    } else {
      ln_fwd_kernel<scalar_t, A, 1><<<grid, kThreads, 0, stream>>>(xp, x.stride(0), ptr_or_null<A>(w),
                                                                   ptr_or_null<A>(b), yp, meanp,
                                                                   rstd.data_ptr<A>(), M, N, A(eps), is_rms);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy_in, const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              bool is_rms) {
  TORCH_CHECK(x.dim() == 2 && dy_in.sizes() == x.sizes(), "fusednorm_C::layer_norm_bwd: dy and x must be (M, N)");
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = param_acc(weight, acc);
  const bool has_w = w.defined(), has_b = bias.has_value() && bias->defined();
  at::Tensor dy = dy_in.to(x.scalar_type());
  if (dy.size(1) > 1 && dy.stride(1) != 1) dy = dy.contiguous();
  const at::Tensor mu = mean.to(acc).contiguous(), rs = rstd.to(acc).contiguous();
  const int64_t M = x.size(0), N = x.size(1);
  at::Tensor dx = at::empty({M, N}, x.options());
  const int sms = sm_count();
  const int64_t P = std::max<int64_t>(1, std::min<int64_t>(M, int64_t(sms) * 2));
  at::Tensor pdw = has_w ? at::zeros({P, N}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor pdb = has_b ? at::zeros({P, N}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor dw_acc = has_w ? at::empty({N}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor db_acc = has_b ? at::empty({N}, x.options().dtype(acc)) : at::Tensor();
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_bwd_cuda", [&] {
    using A = acc_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const A* meanp = is_rms ? nullptr : mu.data_ptr<A>();
    if (M > 0) {
      const int vec = vec_width<scalar_t>({xp, dyp, dxp}, {N, x.stride(0), dy.stride(0)});
      if (vec > 1) {
        ln_bwd_kernel<scalar_t, A, 16 / sizeof(scalar_t)><<<static_cast<unsigned>(P), kThreads, 0, stream>>>(
            dyp, dy.stride(0), xp, x.stride(0), ptr_or_null<A>(w), meanp, rs.data_ptr<A>(), dxp,
            mutable_ptr_or_null<A>(pdw), mutable_ptr_or_null<A>(pdb), M, N, is_rms);
      } else {
        ln_bwd_kernel<scalar_t, A, 1><<<static_cast<unsigned>(P), kThreads, 0, stream>>>(
            dyp, dy.stride(0), xp, x.stride(0), ptr_or_null<A>(w), meanp, rs.data_ptr<A>(), dxp,
            mutable_ptr_or_null<A>(pdw), mutable_ptr_or_null<A>(pdb), M, N, is_rms);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const unsigned cblocks = static_cast<unsigned>(std::max<int64_t>(1, (N + kThreads - 1) / kThreads));
    if (has_w && N > 0) {
      column_sum_kernel<A><<<cblocks, kThreads, 0, stream>>>(pdw.data_ptr<A>(), P, N, dw_acc.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (has_b && N > 0) {
      column_sum_kernel<A><<<cblocks, kThreads, 0, stream>>>(pdb.data_ptr<A>(), P, N, db_acc.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  at::Tensor dwo = has_w ? dw_acc.to(weight->scalar_type()) : at::empty({0}, x.options());
  at::Tensor dbo = has_b ? db_acc.to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dwo, dbo};
}

}  // namespace cuda
}  // namespace fusednorm

#include <torch/library.h>

TORCH_LIBRARY_IMPL(fusednorm_C, CUDA, m) {
  m.impl("layer_norm_fwd", &fusednorm::cuda::layer_norm_fwd);
  m.impl("layer_norm_bwd", &fusednorm::cuda::layer_norm_bwd);
}
