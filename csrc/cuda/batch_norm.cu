// BatchNorm CUDA kernels, NCHW and channels-last: per-channel statistics with the split segmented Welford
// reduction (each channel over several blocks, partials Chan-merged in a fixed order), the per-channel
// gradient sums the same way, and the apply / input-gradient passes as one elementwise kernel with
// per-channel coefficients. No float atomics anywhere: deterministic.
#include "cuda/cuda_utils.cuh"
#include "ops.h"

FUSEDNORM_DECLARE_OPS(fusednorm::cuda)

namespace fusednorm {
namespace cuda {
namespace {

struct Dims {
  int64_t N, C, HW;
};

Dims dims_of(const at::Tensor& x) {
  Dims d{x.size(0), x.size(1), 1};
  for (int64_t i = 2; i < x.dim(); ++i) d.HW *= x.size(i);
  return d;
}

// A channel is one segment: NCHW elements (n, hw) at n * C * HW + hw from base c * HW;
// NHWC elements k = n * HW + hw at k * C from base c.
Segments channel_segments(const Dims& d, bool nhwc) {
  const int64_t len = d.N * d.HW;
  if (nhwc) return Segments{d.C, 0, 1, len, std::max<int64_t>(len, 1), 0, d.C};
  return Segments{d.C, 0, d.HW, len, std::max<int64_t>(d.HW, 1), d.C * d.HW, 1};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() >= 2, "fusednorm_C::batch_norm_stats: x must be (N, C, *spatial)");
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto lx = activation_layout(x_in);
  const at::Tensor& x = lx.second;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopts = x.options().dtype(acc);
  const Dims d = dims_of(x);
  at::Tensor mean = at::empty({d.C}, aopts), m2 = at::empty({d.C}, aopts);
  if (d.N * d.HW == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    m2.zero_();
    return {mean, m2};
  }
  const Segments seg = channel_segments(d, lx.first == Layout::kNHWC);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_stats_cuda", [&] {
    using A = acc_type<scalar_t>;
    segment_reduce<scalar_t, A>(x.data_ptr<scalar_t>(), nullptr, seg, d.C, ReduceMode::kWelford, false, nullptr,
                                mean.data_ptr<A>(), m2.data_ptr<A>(), aopts);
  });
  return {mean, m2};
}

at::Tensor batch_norm_apply(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& rstd,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() >= 2, "fusednorm_C::batch_norm_apply: x must be (N, C, *spatial)");
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto lx = activation_layout(x_in);
  const at::Tensor& x = lx.second;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Dims d = dims_of(x);
  at::Tensor y = at::empty_like(x, memory_format_of(lx.first, x.dim()));
  if (x.numel() == 0) return y;
  at::Tensor coef = at::zeros({d.C, kCoefs}, x.options().dtype(acc));
  const at::Tensor rs = rstd.to(acc);
  coef.select(1, 0).copy_(mean.to(acc));
  coef.select(1, 1).copy_(weight.has_value() && weight->defined() ? rs * weight->to(acc) : rs);
  if (bias.has_value() && bias->defined()) coef.select(1, 2).copy_(bias->to(acc));
  NCIndex ix{d.C, d.HW, 0, lx.first == Layout::kNHWC};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_apply_cuda", [&] {
    nc_elementwise<scalar_t, acc_type<scalar_t>>(x, at::Tensor(), y, ix, EwMode::kAffine, false, coef);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                         const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK(x_in.dim() >= 2 && dy_in.sizes() == x_in.sizes(),
              "fusednorm_C::batch_norm_bwd_reduce: dy and x must be (N, C, *spatial) of the same shape");
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto lx = activation_layout(x_in);
  const at::Tensor& x = lx.second;
  const at::Tensor dy = in_layout(dy_in.to(x.scalar_type()), lx.first);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopts = x.options().dtype(acc);
  const Dims d = dims_of(x);
  at::Tensor s1 = at::zeros({d.C}, aopts), s2 = at::zeros({d.C}, aopts);
  if (d.N * d.HW == 0) return {s1, s2};
  at::Tensor coef = at::stack({mean.to(acc), rstd.to(acc), at::ones({d.C}, aopts), at::zeros({d.C}, aopts)}, 1)
                        .contiguous();
  const Segments seg = channel_segments(d, lx.first == Layout::kNHWC);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_bwd_reduce_cuda", [&] {
    using A = acc_type<scalar_t>;
    segment_reduce<scalar_t, A>(x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), seg, d.C, ReduceMode::kGradSums,
                                false, coef.data_ptr<A>(), s1.data_ptr<A>(), s2.data_ptr<A>(), aopts);
  });
  return {s1, s2};
}

at::Tensor batch_norm_bwd_dx(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& mean,
                             const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                             const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat, int64_t count,
                             bool training) {
  TORCH_CHECK(x_in.dim() >= 2 && dy_in.sizes() == x_in.sizes(),
              "fusednorm_C::batch_norm_bwd_dx: dy and x must be (N, C, *spatial) of the same shape");
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto lx = activation_layout(x_in);
  const at::Tensor& x = lx.second;
  const at::Tensor dy = in_layout(dy_in.to(x.scalar_type()), lx.first);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Dims d = dims_of(x);
  at::Tensor dx = at::empty_like(x, memory_format_of(lx.first, x.dim()));
  if (x.numel() == 0) return dx;
  // dx = (dy - p1 - (x - p0) * p2) * p3 with p3 = rstd * w, p1 = sum_dy / count, p2 = sum_dy_xhat / count * rstd.
  at::Tensor coef = at::zeros({d.C, kCoefs}, x.options().dtype(acc));
  const at::Tensor rs = rstd.to(acc);
  coef.select(1, 3).copy_(weight.has_value() && weight->defined() ? rs * weight->to(acc) : rs);
  if (training) {
    coef.select(1, 0).copy_(mean.to(acc));
    coef.select(1, 1).copy_(sum_dy.to(acc) / static_cast<double>(count));
    coef.select(1, 2).copy_(sum_dy_xhat.to(acc) / static_cast<double>(count) * rs);
  }
  NCIndex ix{d.C, d.HW, 0, lx.first == Layout::kNHWC};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "batch_norm_bwd_dx_cuda", [&] {
    nc_elementwise<scalar_t, acc_type<scalar_t>>(x, dy, dx, ix, EwMode::kBnDx, false, coef);
  });
  return dx;
}

}  // namespace cuda
}  // namespace fusednorm

#include <torch/library.h>

TORCH_LIBRARY_IMPL(fusednorm_C, CUDA, m) {
  m.impl("batch_norm_stats", &fusednorm::cuda::batch_norm_stats);
  m.impl("batch_norm_apply", &fusednorm::cuda::batch_norm_apply);
  m.impl("batch_norm_bwd_reduce", &fusednorm::cuda::batch_norm_bwd_reduce);
  m.impl("batch_norm_bwd_dx", &fusednorm::cuda::batch_norm_bwd_dx);
}
