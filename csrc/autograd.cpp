// C++ autograd for the native backend's eager fast path: one dispatcher call per norm.
//
// fusednorm's op layer (fusednorm/ops/) wraps the backend ops in Python autograd.Functions. Building a Python
// autograd node and running a Python backward costs ~100 us per call when the caches are cold, which is the
// normal state after a memory-bound kernel: as much as a small norm's kernel. These ops do the same work in
// C++: `fusednorm_C::layer_norm`, `layer_norm_cf`, `group_norm`, `batch_norm` and `add_norm` run the forward
// op, record a torch::autograd::Function node when an input requires grad, and run the backward ops from it.
// The kernels are the backend's own ops (called through the dispatcher, so CPU and CUDA tensors both work);
// the Python path and this one give bit-identical outputs and gradients (tests/test_fast_path.py).
//
// The Python op layer calls these only in plain eager mode on non-empty tensors; torch.compile, tracing,
// dispatch modes, vmap and forward AD keep going through the Python custom ops, which are what they see.
// Double backward is not supported, as on the Python path: after a backward run with create_graph=True, a second
// backward through these gradients raises (guard_double_backward) instead of giving wrong higher-order gradients.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "ops.h"

namespace fusednorm {
namespace autograd_ops {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;

template <class Sig>
c10::TypedOperatorHandle<Sig> backend_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

OptTensor as_optional(const Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// True when a call must record an autograd node: grad mode on and some tensor input requires grad. Otherwise the
// entry points run the Function's forward alone (ctx == nullptr: nothing saved), as the Python op layer does.
bool needs_node(const Tensor& x, std::initializer_list<const OptTensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  if (x.requires_grad()) return true;
  for (const OptTensor* t : inputs) {
    if (t->has_value() && (*t)->defined() && (*t)->requires_grad()) return true;
  }
  return false;
}

// The backward ops have no autograd formula of their own. In a backward run with create_graph=True on tensors
// that require grad, the gradients get a node that raises when a second backward reaches it, as the Python
// custom ops do; higher-order gradients are never silently wrong, and first-order ones still work.
void guard_double_backward(const char* name, variable_list& grads, const Tensor& dy, const Tensor& x,
                           const Tensor& weight, const Tensor& bias) {
  if (!at::GradMode::is_enabled()) return;
  auto next = torch::autograd::collect_next_edges(dy, x, weight, bias);
  bool any = false;
  for (const auto& e : next) any = any || e.is_valid();
  if (!any) return;
  auto node = c10::make_intrusive<torch::autograd::Error>(
      std::string("fusednorm_C::") + name + ": no autograd formula for its backward (double backward is not supported)",
      std::move(next));
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    // add_norm hands one tensor to x and residual: give it its history once
    const bool repeated = std::any_of(grads.begin(), grads.begin() + i, [&](const Tensor& h) { return h.is_same(g); });
    if (g.defined() && !repeated) torch::autograd::set_history(g, node);
  }
}

// LayerNorm, LayerNorm2d and GroupNorm save the same five tensors: x, weight and bias (undefined when absent),
// and the forward's mean and rstd.
void save_norm(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
               const Tensor& mean, const Tensor& rstd) {
  ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, rstd});
}

// Their backward: bwd(dy, x, weight, bias, mean, rstd) runs the backend op below autograd and returns (dx, dw, db);
// the gradients come back as {dx, dw, db} (dw / db undefined for absent parameters) followed by `non_tensor_args`
// undefined ones, guarded against double backward.
template <class Bwd>
variable_list norm_backward(AutogradContext* ctx, const variable_list& grads, const char* name,
                            size_t non_tensor_args, const Bwd& bwd) {
  const auto saved = ctx->get_saved_variables();
  const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
  variable_list out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dw, db] = bwd(grads[0], x, as_optional(weight), as_optional(bias), saved[3], saved[4]);
    out = {dx, weight.defined() ? dw : Tensor(), bias.defined() ? db : Tensor()};
  }
  out.resize(3 + non_tensor_args);
  guard_double_backward(name, out, grads[0], x, weight, bias);
  return out;
}

}  // namespace

// The Function types are outside the anonymous namespace: their names are the autograd nodes' names
// (torch::autograd::CppNode<fusednorm::autograd_ops::LayerNormFunction>).

// ---- LayerNorm / RMSNorm over rows (M, N) -------------------------------------------------------------

using LayerNormFwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                           double, bool);
using LayerNormBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                           const OptTensor&, const Tensor&, const Tensor&, bool);

struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                        double eps, bool is_rms) {
    static auto fwd = backend_op<LayerNormFwdSig>("fusednorm_C::layer_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] = fwd.call(x, weight, bias, eps, is_rms);
    if (ctx == nullptr) return y;
    save_norm(ctx, x, weight, bias, mean, rstd);
    ctx->saved_data["is_rms"] = is_rms;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = backend_op<LayerNormBwdSig>("fusednorm_C::layer_norm_bwd");
    const bool is_rms = ctx->saved_data["is_rms"].toBool();
    return norm_backward(ctx, grads, "layer_norm", 2, [&](const Tensor& dy, auto&&... saved) {
      // autograd may hand over an expanded gradient
      return bwd.call(dy.stride(-1) != 1 ? dy.contiguous() : dy, saved..., is_rms);
    });
  }
};

Tensor layer_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps, bool is_rms) {
  if (!needs_node(x, {&weight, &bias})) {
    at::NoGradGuard no_grad;
    return LayerNormFunction::forward(nullptr, x, weight, bias, eps, is_rms);
  }
  return LayerNormFunction::apply(x, weight, bias, eps, is_rms);
}

// ---- channels-first LayerNorm (LayerNorm2d) over (N, C, P) ---------------------------------------------

using LayerNormCfFwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                             double);
using LayerNormCfBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                             const OptTensor&, const Tensor&, const Tensor&);

struct LayerNormCFFunction : public torch::autograd::Function<LayerNormCFFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                        double eps) {
    static auto fwd = backend_op<LayerNormCfFwdSig>("fusednorm_C::layer_norm_cf_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] = fwd.call(x, weight, bias, eps);
    if (ctx == nullptr) return y;
    save_norm(ctx, x, weight, bias, mean, rstd);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = backend_op<LayerNormCfBwdSig>("fusednorm_C::layer_norm_cf_bwd");
    return norm_backward(ctx, grads, "layer_norm_cf", 1, [&](auto&&... args) { return bwd.call(args...); });
  }
};

Tensor layer_norm_cf(const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps) {
  if (!needs_node(x, {&weight, &bias})) {
    at::NoGradGuard no_grad;
    return LayerNormCFFunction::forward(nullptr, x, weight, bias, eps);
  }
  return LayerNormCFFunction::apply(x, weight, bias, eps);
}

// ---- GroupNorm (+ SiLU) over (N, C, *spatial) ---------------------------------------------------------

using GroupNormFwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                           int64_t, double, c10::string_view);
using GroupNormBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                           const OptTensor&, const Tensor&, const Tensor&,
                                                           int64_t, c10::string_view);

struct GroupNormFunction : public torch::autograd::Function<GroupNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                        int64_t num_groups, double eps, c10::string_view activation) {
    static auto fwd = backend_op<GroupNormFwdSig>("fusednorm_C::group_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] = fwd.call(x, weight, bias, num_groups, eps, activation);
    if (ctx == nullptr) return y;
    save_norm(ctx, x, weight, bias, mean, rstd);
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["activation"] = std::string(activation);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = backend_op<GroupNormBwdSig>("fusednorm_C::group_norm_bwd");
    const int64_t num_groups = ctx->saved_data["num_groups"].toInt();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    return norm_backward(ctx, grads, "group_norm", 3,
                         [&](auto&&... args) { return bwd.call(args..., num_groups, activation); });
  }
};

Tensor group_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias, int64_t num_groups,
                  double eps, c10::string_view activation) {
  if (!needs_node(x, {&weight, &bias})) {
    at::NoGradGuard no_grad;
    return GroupNormFunction::forward(nullptr, x, weight, bias, num_groups, eps, activation);
  }
  return GroupNormFunction::apply(x, weight, bias, num_groups, eps, activation);
}

// ---- BatchNorm over (N, C, *spatial) --------------------------------------------------------------------

using BatchNormStatsSig = std::tuple<Tensor, Tensor>(const Tensor&);
using BatchNormApplySig = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                 const OptTensor&);
using BatchNormBwdReduceSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                         const Tensor&);
using BatchNormBwdDxSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                 const Tensor&, const Tensor&, int64_t, bool);

namespace {

// Equal strides on every dim of size > 1 (size-1 dims carry no layout).
bool same_layout(const Tensor& a, const Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// `out` with the strides of at::empty_like(x), as the op layer's fake impls promise (fusednorm/ops/batch_norm.py
// `_like_x`): a copy only when a backend returned another layout.
Tensor like_x(const Tensor& out, const Tensor& x) {
  if (out.strides() == x.strides() || same_layout(out, x)) return out;
  Tensor fixed = at::empty_like(x);
  if (same_layout(out, fixed)) return out;
  fixed.copy_(out);
  return fixed;
}

Tensor to_acc(const Tensor& t, int64_t c, at::ScalarType acc) {
  const Tensor v = t.dim() == 1 ? t : t.reshape({c});
  return v.scalar_type() == acc ? v : v.to(acc);
}

// BatchNorm's per-channel arithmetic (rstd from M2, the running-statistics update, rstd from the running variance)
// as one loop over the C channels on the CPU, instead of up to ten small tensor ops, each of which costs 10-20 us
// when the caches are cold. Used when every (C,) vector involved is a contiguous CPU tensor of the accumulation
// dtype; the general path below (tensor ops) handles the rest. The loops do the same IEEE operations in the same
// order and precision as those tensor ops (a tensor-scalar op rounds the scalar to the tensor's dtype; the build
// has -ffp-contract=off, so nothing is fused into an FMA), so both paths, and the Python op layer, give
// bit-identical results (tests/test_fast_path.py).
bool channel_loops_apply(const Tensor& x, int64_t c, at::ScalarType acc, std::initializer_list<const Tensor*> stats,
                         std::initializer_list<const OptTensor*> buffers) {
  if (!x.is_cpu()) return false;
  for (const Tensor* t : stats) {
    if (t->scalar_type() != acc || !t->is_contiguous() || t->numel() != c || !t->is_cpu()) return false;
  }
  for (const OptTensor* b : buffers) {
    if (!b->has_value()) continue;
    const Tensor& t = **b;
    if (t.scalar_type() != acc || !t.is_contiguous() || t.numel() != c || !t.is_cpu()) return false;
  }
  return true;
}

// rstd = 1 / sqrt(m2 / count + eps); running = running * (1 - momentum) + statistic * momentum with the batch
// mean and the unbiased variance m2 / (count - 1). Returns rstd (C,).
Tensor train_channel_math(const Tensor& mean, const Tensor& m2, const OptTensor& running_mean,
                          const OptTensor& running_var, int64_t count, double momentum, double eps) {
  Tensor rstd = at::empty_like(m2);
  AT_DISPATCH_FLOATING_TYPES(m2.scalar_type(), "batch_norm_channel_math", [&] {
    using A = scalar_t;
    const int64_t c = m2.numel();
    const A* mu = mean.data_ptr<A>();
    const A* q = m2.data_ptr<A>();
    A* rs = rstd.data_ptr<A>();
    const A n = A(count), unbiased_n = A(count - 1), e = A(eps), keep = A(1 - momentum), take = A(momentum);
    for (int64_t i = 0; i < c; ++i) rs[i] = A(1) / std::sqrt(q[i] / n + e);
    // Version bumps first: on an inference tensor outside inference mode they raise torch's error before any
    // buffer is written, as the in-place tensor ops would.
    if (running_mean.has_value()) torch::autograd::impl::bump_version(*running_mean);
    if (running_var.has_value()) torch::autograd::impl::bump_version(*running_var);
    if (running_mean.has_value()) {
      A* r = running_mean->data_ptr<A>();
      for (int64_t i = 0; i < c; ++i) {
        const A kept = r[i] * keep, taken = mu[i] * take;
        r[i] = kept + taken;
      }
    }
    if (running_var.has_value()) {
      A* r = running_var->data_ptr<A>();
      for (int64_t i = 0; i < c; ++i) {
        const A kept = r[i] * keep, taken = (q[i] / unbiased_n) * take;
        r[i] = kept + taken;
      }
    }
  });
  return rstd;
}

// rstd = 1 / sqrt(running_var + eps), running_var (C,) contiguous.
Tensor eval_rstd(const Tensor& running_var, double eps) {
  Tensor rstd = at::empty_like(running_var);
  AT_DISPATCH_FLOATING_TYPES(running_var.scalar_type(), "batch_norm_eval_rstd", [&] {
    using A = scalar_t;
    const A* v = running_var.data_ptr<A>();
    A* rs = rstd.data_ptr<A>();
    const A e = A(eps);
    for (int64_t i = 0; i < running_var.numel(); ++i) rs[i] = A(1) / std::sqrt(v[i] + e);
  });
  return rstd;
}

}  // namespace

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                        const OptTensor& running_mean, const OptTensor& running_var, bool training,
                        double momentum, double eps) {
    static auto stats = backend_op<BatchNormStatsSig>("fusednorm_C::batch_norm_stats");
    static auto apply_op = backend_op<BatchNormApplySig>("fusednorm_C::batch_norm_apply");
    const int64_t c = x.size(1);
    const int64_t count = c ? x.numel() / c : 0;
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor mean, rstd;
    if (training) {
      Tensor m2;
      {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        std::tie(mean, m2) = stats.call(x);
      }
      if (count > 0 && channel_loops_apply(x, c, acc, {&mean, &m2}, {&running_mean, &running_var})) {
        rstd = train_channel_math(mean, m2, running_mean, running_var, count, momentum, eps);
      } else if (count > 0) {
        rstd = (m2 / count).add_(eps).rsqrt_();
        // In place (bumping the buffers' version counters, as torch's own update does): running =
        // (1 - momentum) * running + momentum * statistic, with the unbiased variance.
        const std::pair<const OptTensor*, Tensor> updates[] = {{&running_mean, mean},
                                                               {&running_var, m2 / (count - 1)}};
        for (const auto& [buf, stat] : updates) {
          if (!buf->has_value()) continue;
          Tensor s = stat.to(buf->value().scalar_type());
          if (s.sizes() != buf->value().sizes()) s = s.view(buf->value().sizes());
          buf->value().mul_(1 - momentum).add_(s * momentum);
        }
      } else {  // empty batch: nothing to normalize, buffers untouched (torch)
        rstd = at::zeros_like(m2);
      }
    } else {
      TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
                  "fusednorm_C::batch_norm: evaluation needs running_mean and running_var");
      mean = to_acc(*running_mean, c, acc);
      if (channel_loops_apply(x, c, acc, {}, {&running_var})) {
        rstd = eval_rstd(running_var->reshape({c}), eps);
      } else {
        rstd = (to_acc(*running_var, c, acc) + eps).rsqrt_();
      }
    }
    Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      y = like_x(apply_op.call(x, mean, rstd, weight, bias), x);
    }
    if (ctx == nullptr) return y;
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, rstd});
    ctx->saved_data["count"] = count;
    ctx->saved_data["training"] = training;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto reduce = backend_op<BatchNormBwdReduceSig>("fusednorm_C::batch_norm_bwd_reduce");
    static auto bwd_dx = backend_op<BatchNormBwdDxSig>("fusednorm_C::batch_norm_bwd_dx");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &rstd = saved[4];
    const Tensor& dy = grads[0];
    const bool training = ctx->saved_data["training"].toBool();
    // needs_input_grad counts only the tensor inputs that were given: an absent weight takes no index
    size_t edge = 0;
    const bool need_x = ctx->needs_input_grad(edge++);
    const bool need_w = weight.defined() && ctx->needs_input_grad(edge++);
    const bool need_b = bias.defined() && ctx->needs_input_grad(edge++);
    Tensor sum_dy, sum_dy_xhat, dx, dw, db;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if ((need_x && training) || need_w || need_b) {
      std::tie(sum_dy, sum_dy_xhat) = reduce.call(dy, x, mean, rstd);
    } else {
      sum_dy = sum_dy_xhat = mean.new_empty({0});
    }
    if (need_x) {
      dx = like_x(bwd_dx.call(dy, x, mean, rstd, as_optional(weight), sum_dy, sum_dy_xhat,
                              ctx->saved_data["count"].toInt(), training),
                  x);
    }
    if (need_w) dw = sum_dy_xhat.to(weight.scalar_type());
    if (need_b) db = sum_dy.to(bias.scalar_type());
    variable_list out = {dx, dw, db, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    guard_double_backward("batch_norm", out, dy, x, weight, bias);
    return out;
  }
};

Tensor batch_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                  const OptTensor& running_var, bool training, double momentum, double eps) {
  if (!needs_node(x, {&weight, &bias, &running_mean, &running_var})) {
    at::NoGradGuard no_grad;
    return BatchNormFunction::forward(nullptr, x, weight, bias, running_mean, running_var, training, momentum, eps);
  }
  return BatchNormFunction::apply(x, weight, bias, running_mean, running_var, training, momentum, eps);
}


// ---- residual add (+ dropout) + LayerNorm / RMSNorm over rows (M, N) -----------------------------------

using AddNormFwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                                 const OptTensor&, double, bool, bool, double,
                                                                 int64_t, int64_t, at::ScalarType);
using AddNormBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                                 const OptTensor&, const OptTensor&, const Tensor&,
                                                                 const Tensor&, bool, bool, double, int64_t,
                                                                 int64_t, at::ScalarType, bool, at::ScalarType);

// Returns (y, s): s = dropout(x) + residual, y = norm(s). Saves s, never the dropout mask (the backward
// regenerates it from the seed).
struct AddNormFunction : public torch::autograd::Function<AddNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& residual,
                               const OptTensor& weight, const OptTensor& bias, double eps, bool is_rms,
                               bool has_dropout, double drop_scale, int64_t seed, int64_t threshold,
                               at::ScalarType s_dtype) {
    static auto fwd = backend_op<AddNormFwdSig>("fusednorm_C::add_norm_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, s, mean, rstd] =
        fwd.call(x, residual, weight, bias, eps, is_rms, has_dropout, drop_scale, seed, threshold, s_dtype);
    if (ctx == nullptr) return {y, s};
    ctx->save_for_backward({s, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, rstd});
    ctx->saved_data["is_rms"] = is_rms;
    ctx->saved_data["has_dropout"] = has_dropout;
    ctx->saved_data["drop_scale"] = drop_scale;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["threshold"] = threshold;
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["has_residual"] = residual.has_value();
    ctx->saved_data["residual_dtype"] = residual.has_value() ? residual->scalar_type() : x.scalar_type();
    ctx->set_materialize_grads(false);  // an unused s (no prenorm output) gets no gradient tensor
    return {y, s};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = backend_op<AddNormBwdSig>("fusednorm_C::add_norm_bwd");
    const auto saved = ctx->get_saved_variables();
    const Tensor &s = saved[0], &weight = saved[1], &bias = saved[2];
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const auto x_dtype = ctx->saved_data["x_dtype"].toScalarType();
    const auto residual_dtype = ctx->saved_data["residual_dtype"].toScalarType();
    const bool has_dropout = ctx->saved_data["has_dropout"].toBool();
    // Without dropout, s = x + residual passes the same gradient to both: when their dtypes match s's, compute it
    // once and hand the one tensor to both (as torch's add does) instead of writing a second (M, N) copy.
    const bool shared = has_residual && !has_dropout && x_dtype == residual_dtype && x_dtype == s.scalar_type();
    variable_list out(11);
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(s);
      if (dy.stride(-1) != 1) dy = dy.contiguous();
      OptTensor ds;
      if (grads[1].defined()) ds = grads[1].stride(-1) != 1 ? grads[1].contiguous() : grads[1];
      auto [dx, dres, dw, db] =
          bwd.call(dy, ds, s, as_optional(weight), as_optional(bias), saved[3], saved[4],
                   ctx->saved_data["is_rms"].toBool(), has_dropout, ctx->saved_data["drop_scale"].toDouble(),
                   ctx->saved_data["seed"].toInt(), ctx->saved_data["threshold"].toInt(), x_dtype,
                   has_residual && !shared, residual_dtype);
      out[0] = dx;
      if (has_residual) out[1] = shared ? dx : dres;
      if (weight.defined()) out[2] = dw;
      if (bias.defined()) out[3] = db;
    }
    const Tensor& dy_in = grads[0].defined() ? grads[0] : grads[1];
    guard_double_backward("add_norm", out, dy_in, s, weight, bias);
    return out;
  }
};

std::vector<Tensor> add_norm(const Tensor& x, const OptTensor& residual, const OptTensor& weight,
                             const OptTensor& bias, double eps, bool is_rms, bool has_dropout, double drop_scale,
                             int64_t seed, int64_t threshold, at::ScalarType s_dtype) {
  if (!needs_node(x, {&residual, &weight, &bias})) {
    at::NoGradGuard no_grad;
    return AddNormFunction::forward(nullptr, x, residual, weight, bias, eps, is_rms, has_dropout, drop_scale, seed,
                                    threshold, s_dtype);
  }
  return AddNormFunction::apply(x, residual, weight, bias, eps, is_rms, has_dropout, drop_scale, seed, threshold,
                                s_dtype);
}

}  // namespace autograd_ops
}  // namespace fusednorm

TORCH_LIBRARY_FRAGMENT(fusednorm_C, m) {
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, bool is_rms) -> Tensor");
  m.def("layer_norm_cf(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def("group_norm(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, str activation) -> Tensor");
  m.def(
      "batch_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps) -> Tensor");
  m.def(
      "add_norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool is_rms, "
      "bool has_dropout, float drop_scale, int seed, int threshold, ScalarType s_dtype) -> Tensor[]");
}

// CompositeImplicitAutograd: the kernels run above autograd and build their own node.
TORCH_LIBRARY_IMPL(fusednorm_C, CompositeImplicitAutograd, m) {
  m.impl("layer_norm", &fusednorm::autograd_ops::layer_norm);
  m.impl("layer_norm_cf", &fusednorm::autograd_ops::layer_norm_cf);
  m.impl("group_norm", &fusednorm::autograd_ops::group_norm);
  m.impl("batch_norm", &fusednorm::autograd_ops::batch_norm);
  m.impl("add_norm", &fusednorm::autograd_ops::add_norm);
}
