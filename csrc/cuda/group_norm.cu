// GroupNorm CUDA kernels (InstanceNorm: num_groups == C), NCHW and channels-last, optional fused SiLU.
//
// Forward: (sample, group) statistics with the split segmented Welford reduction (several blocks per
// group so small N * G still fills the GPU; Chan merges of the per-block partials in a fixed order), then
// one elementwise normalize + affine + SiLU pass. Backward: per-(n, c) sums of the effective gradient and
// of its product with xhat (xhat recomputed from the saved mean/rstd), the tiny per-group terms and dW/dB
// from those sums (ATen reductions over a few thousand values, deterministic), then the elementwise dx.
#include "cuda/cuda_utils.cuh"
#include "ops.h"

FUSEDNORM_DECLARE_OPS(fusednorm::cuda)

namespace fusednorm {
namespace cuda {
namespace {

bool parse_activation(c10::string_view activation) {
  TORCH_CHECK(activation == "none" || activation == "silu",
              "fusednorm_C::group_norm: activation must be 'none' or 'silu', got '", std::string(activation), "'");
  return activation == "silu";
}

struct Dims {
  int64_t N, C, HW;
};

Dims dims_of(const at::Tensor& x) {
  Dims d{x.size(0), x.size(1), 1};
  for (int64_t i = 2; i < x.dim(); ++i) d.HW *= x.size(i);
  return d;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd(const at::Tensor& x_in,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              int64_t num_groups, double eps,
                                                              c10::string_view activation) {
  TORCH_CHECK(x_in.dim() >= 2, "fusednorm_C::group_norm_fwd: x must be (N, C, *spatial)");
  TORCH_CHECK(num_groups > 0 && x_in.size(1) % num_groups == 0,
              "fusednorm_C::group_norm_fwd: num_groups must divide the number of channels");
  c10::cuda::CUDAGuard guard(x_in.device());
  const bool silu = parse_activation(activation);
  const auto lx = activation_layout(x_in);
  const bool nhwc = lx.first == Layout::kNHWC;
  const at::Tensor& x = lx.second;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopts = x.options().dtype(acc);
  const Dims d = dims_of(x);
  const int64_t G = num_groups, D = d.C / G;
  at::Tensor y = at::empty_like(x, memory_format_of(lx.first, x.dim()));
  at::Tensor mean = at::empty({d.N, G}, aopts);
  at::Tensor m2 = at::empty({d.N, G}, aopts);
  Segments seg{G, d.C * d.HW, nhwc ? D : D * d.HW, D * d.HW, nhwc ? D : D * d.HW, nhwc ? d.C : 0, 1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_fwd_cuda", [&] {
    using A = acc_type<scalar_t>;
    segment_reduce<scalar_t, A>(x.data_ptr<scalar_t>(), nullptr, seg, d.N * G, ReduceMode::kWelford, false,
                                nullptr, mean.data_ptr<A>(), m2.data_ptr<A>(), aopts);
  });
  at::Tensor rstd = at::rsqrt(m2 / static_cast<double>(D * d.HW) + eps);
  if (x.numel() > 0) {
    // Per-(n, c) coefficients of y = act((x - p0) * p1 + p2).
    at::Tensor coef = at::zeros({d.N, d.C, kCoefs}, aopts);
    at::Tensor rs_c = rstd.repeat_interleave(D, 1);
    coef.select(2, 0).copy_(mean.repeat_interleave(D, 1));
    coef.select(2, 1).copy_(weight.has_value() && weight->defined() ? rs_c * weight->to(acc).view({1, d.C}) : rs_c);
    if (bias.has_value() && bias->defined()) coef.select(2, 2).copy_(bias->to(acc).view({1, d.C}).expand({d.N, d.C}));
    NCIndex ix{d.C, d.HW, d.C, nhwc};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_fwd_cuda_apply", [&] {
      using A = acc_type<scalar_t>;
      nc_elementwise<scalar_t, A>(x, at::Tensor(), y, ix, EwMode::kAffine, silu, coef);
    });
  }
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              int64_t num_groups, c10::string_view activation) {
  TORCH_CHECK(x_in.dim() >= 2 && dy_in.sizes() == x_in.sizes(),
              "fusednorm_C::group_norm_bwd: dy and x must be (N, C, *spatial) of the same shape");
  TORCH_CHECK(num_groups > 0 && x_in.size(1) % num_groups == 0,
              "fusednorm_C::group_norm_bwd: num_groups must divide the number of channels");
  c10::cuda::CUDAGuard guard(x_in.device());
  const bool silu = parse_activation(activation);
  const auto lx = activation_layout(x_in);
  const bool nhwc = lx.first == Layout::kNHWC;
  const at::Tensor& x = lx.second;
  const at::Tensor dy = in_layout(dy_in.to(x.scalar_type()), lx.first);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopts = x.options().dtype(acc);
  const Dims d = dims_of(x);
  const int64_t G = num_groups, D = d.C / G;
  const bool has_w = weight.has_value() && weight->defined(), has_b = bias.has_value() && bias->defined();
  const at::Tensor wv = has_w ? weight->to(acc).contiguous() : at::ones({d.C}, aopts);
  const at::Tensor bv = has_b ? bias->to(acc).contiguous() : at::zeros({d.C}, aopts);
  const at::Tensor mu_c = mean.to(acc).reshape({d.N, G}).repeat_interleave(D, 1);  // (N, C)
  const at::Tensor rs_c = rstd.to(acc).reshape({d.N, G}).repeat_interleave(D, 1);
  // Per-(n, c) segment coefficients (mu, rs, w, b) of the gradient sums.
  at::Tensor scoef = at::stack({mu_c, rs_c, wv.view({1, d.C}).expand({d.N, d.C}), bv.view({1, d.C}).expand({d.N, d.C})}, 2)
                         .contiguous();
  at::Tensor sdy = at::empty({d.N, d.C}, aopts), sdyxh = at::empty({d.N, d.C}, aopts);
  Segments seg{d.C, d.C * d.HW, nhwc ? 1 : d.HW, d.HW, d.HW, 0, nhwc ? d.C : 1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_bwd_cuda_sums", [&] {
    using A = acc_type<scalar_t>;
    segment_reduce<scalar_t, A>(x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), seg, d.N * d.C,
                                ReduceMode::kGradSums, silu, scoef.data_ptr<A>(), sdy.data_ptr<A>(),
                                sdyxh.data_ptr<A>(), aopts);
  });
  const double m = static_cast<double>(D * d.HW);
  const at::Tensor c1 = (sdyxh * wv).view({d.N, G, D}).sum(2).div(m).repeat_interleave(D, 1);
  const at::Tensor c2 = (sdy * wv).view({d.N, G, D}).sum(2).div(m).repeat_interleave(D, 1);
  at::Tensor dx = at::empty_like(x, memory_format_of(lx.first, x.dim()));
  if (x.numel() > 0) {
    at::Tensor coef = at::stack({mu_c, rs_c, wv.view({1, d.C}).expand({d.N, d.C}),
                                 bv.view({1, d.C}).expand({d.N, d.C}), c1, c2},
                                2)
                          .contiguous();
    NCIndex ix{d.C, d.HW, d.C, nhwc};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "group_norm_bwd_cuda_dx", [&] {
      using A = acc_type<scalar_t>;
      nc_elementwise<scalar_t, A>(x, dy, dx, ix, EwMode::kGnDx, silu, coef);
    });
  }
  at::Tensor dw = has_w ? sdyxh.sum(0).to(weight->scalar_type()) : at::empty({0}, x.options());
  at::Tensor db = has_b ? sdy.sum(0).to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dw, db};
}

}  // namespace cuda
}  // namespace fusednorm

#include <torch/library.h>

TORCH_LIBRARY_IMPL(fusednorm_C, CUDA, m) {
  m.impl("group_norm_fwd", &fusednorm::cuda::group_norm_fwd);
  m.impl("group_norm_bwd", &fusednorm::cuda::group_norm_bwd);
}
