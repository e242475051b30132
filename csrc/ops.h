// Signatures of the fusednorm_C operators' implementations (one per function of
// fusednorm/backends/reference.py, same argument order). Each device / ISA namespace that implements
// them declares them through FUSEDNORM_DECLARE_OPS so all copies stay in sync.
//
// Optional gradient outputs (dweight, dbias) are returned as empty (0,) placeholders in x's dtype when
// the parameter is absent; fusednorm/backends/native.py turns them into None.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#define FUSEDNORM_DECLARE_OPS(NS)                                                                      \
  namespace NS {                                                                                       \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(                                       \
      const at::Tensor& x, const c10::optional<at::Tensor>& weight,                                    \
      const c10::optional<at::Tensor>& bias, double eps, bool is_rms);                                 \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(                                       \
      const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,              \
      const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,           \
      bool is_rms);                                                                                    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd(                                       \
      const at::Tensor& x, const c10::optional<at::Tensor>& weight,                                    \
      const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,                           \
      c10::string_view activation);                                                                    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_bwd(                                       \
      const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,              \
      const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,           \
      int64_t num_groups, c10::string_view activation);                                                \
  std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& x);                            \
  at::Tensor batch_norm_apply(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,     \
                              const c10::optional<at::Tensor>& weight,                                 \
                              const c10::optional<at::Tensor>& bias);                                  \
  std::tuple<at::Tensor, at::Tensor> batch_norm_bwd_reduce(const at::Tensor& dy, const at::Tensor& x,  \
                                                           const at::Tensor& mean,                     \
                                                           const at::Tensor& rstd);                    \
  at::Tensor batch_norm_bwd_dx(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,      \
                               const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,        \
                               const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat, int64_t count, \
                               bool training);                                                         \
  }

namespace fusednorm {

// Operator schemas, shared by the CPU registration (which defines the ops) and CMake/tests.
namespace schema {
constexpr const char* kLayerNormFwd =
    "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, bool is_rms) -> (Tensor, Tensor, Tensor)";
constexpr const char* kLayerNormBwd =
    "layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, bool is_rms)"
    " -> (Tensor, Tensor, Tensor)";
constexpr const char* kGroupNormFwd =
    "group_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, str activation)"
    " -> (Tensor, Tensor, Tensor)";
constexpr const char* kGroupNormBwd =
    "group_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
    "int num_groups, str activation) -> (Tensor, Tensor, Tensor)";
constexpr const char* kBatchNormStats = "batch_norm_stats(Tensor x) -> (Tensor, Tensor)";
constexpr const char* kBatchNormApply =
    "batch_norm_apply(Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias) -> Tensor";
constexpr const char* kBatchNormBwdReduce =
    "batch_norm_bwd_reduce(Tensor dy, Tensor x, Tensor mean, Tensor rstd) -> (Tensor, Tensor)";
constexpr const char* kBatchNormBwdDx =
    "batch_norm_bwd_dx(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor sum_dy, "
    "Tensor sum_dy_xhat, int count, bool training) -> Tensor";
}  // namespace schema

// Memory layout of an (N, C, *spatial) activation as the kernels see it.
enum class Layout { kNCHW, kNHWC };

// The layout to compute in, and the tensor to compute on (x itself unless it is neither contiguous
// nor channels-last, in which case a contiguous copy is made: that is the only copy, and it matches
// the memory format torch gives such inputs' results).
inline std::pair<Layout, at::Tensor> activation_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return {Layout::kNCHW, x};
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {Layout::kNHWC, x};
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return {Layout::kNHWC, x};
  return {Layout::kNCHW, x.contiguous()};
}

inline at::MemoryFormat memory_format_of(Layout layout, int64_t dim) {
  if (layout == Layout::kNCHW) return at::MemoryFormat::Contiguous;
  return dim == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// Bring `t` (dy) into the layout chosen for x: a no-op when it already is.
inline at::Tensor in_layout(const at::Tensor& t, Layout layout) {
  return t.contiguous(memory_format_of(layout, t.dim()));
}

// The C++ autograd ops of csrc/autograd.cpp (registered as fusednorm_C::layer_norm, ...): each runs the backend
// ops through the dispatcher and records a C++ autograd node when an input requires grad. csrc/eager.cpp calls
// them directly.
namespace autograd_ops {
at::Tensor layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps, bool is_rms);
at::Tensor layer_norm_cf(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, double eps);
at::Tensor group_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps,
                      c10::string_view activation);
at::Tensor batch_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                      const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps);
std::vector<at::Tensor> add_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                 const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                 double eps, bool is_rms, bool has_dropout, double drop_scale, int64_t seed,
                                 int64_t threshold, at::ScalarType s_dtype);
}  // namespace autograd_ops

// Which copy of the CPU kernels runs (see cpu/isa_prelude.h): the best one built that the CPU supports,
// capped by FUSEDNORM_CPU_ISA=base|avx2|avx512bf16. Decided once per process.
enum class CpuIsa { kBase = 0, kAvx2 = 1, kAvx512Bf16 = 2 };
CpuIsa cpu_isa_level();

}  // namespace fusednorm
