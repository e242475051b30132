// Whole-call eager entries for fusednorm.functional on CPU tensors, and the Python module's other functions.
//
// Why: on the CPU, the Python in front of a kernel (torch's argument checks, the backend choice, the plain-eager
// checks, the op layer) costs 80-100 us per call once the caches are cold, which is the normal state of a norm
// layer that follows a memory-bound kernel. That is a third of a 2048x1024 LayerNorm's time. The entries here
// (fusednorm._C.layer_norm, rms_norm, layer_norm_2d, group_norm, instance_norm, batch_norm, add_norm; the
// arguments of the functions of fusednorm.functional, all positional) do that work for the common case in one
// call: they check that the call is one the native backend would run the same way (plain eager mode, the native
// backend in force, plain CPU tensors, valid arguments) and then run the extension's C++ autograd op
// (csrc/autograd.cpp), exactly as the Python op layer would. Outputs, gradients and running statistics are
// bit-identical (tests/test_fast_path.py).
//
// An entry never raises for bad arguments. For any call it does not take it returns None, and the Python
// function goes on down its own path, which validates with torch's messages and handles everything else:
// zero-size tensors, layouts the kernels cannot address, other backends and devices, tensor subclasses,
// torch.compile, forward AD. Error messages and unusual cases thus have one implementation, in Python.
//
// Built only with Python (setup.py); the CMake build for libtorch users defines FUSEDNORM_NO_PYTHON.
#if !defined(FUSEDNORM_NO_PYTHON)
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/TensorUtils.h>
#include <Python.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/SmallVector.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/profiler/orchestration/observer.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "ops.h"

namespace fusednorm {
namespace eager {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
using Shape = c10::SmallVector<int64_t, 6>;

// ---- is this a plain eager call the native backend runs? ------------------------------------------------

// functorch includes its front-mode dispatch key in the thread's TLS exactly while its layer stack is not empty
// (ATen/functorch/DynamicLayer.cpp); its own header needs nlohmann/json, which torch's wheels do not ship.
bool functorch_layer_active() {
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// Nothing intercepts ops on this thread: no TorchDispatchMode, no torch-function mode, no functorch transform
// (vmap, grad, ...), no torch.jit.trace, no profiler (a profile should show the fusednorm ops). These are the
// op layer's plain-eager questions (fusednorm/ops/__init__.py, _plain_mode), all but torch.compile's,
// which the Python callers ask before they come here.
bool unintercepted() {
  return c10::impl::TorchDispatchModeTLS::stack_len() == 0 && !at::impl::torch_function_mode_enabled() &&
         !functorch_layer_active() && !torch::jit::tracer::isTracing() && !torch::profiler::impl::profilerEnabled();
}

// The Python state the entries read, bound once by fusednorm/backends/native.py (bind_eager_state).
struct PythonState {
  PyObject* backends = nullptr;        // the fusednorm.backends module (its _global_backend)
  PyObject* scoped_backend = nullptr;  // fusednorm.backends._scoped_backend, the use_backend ContextVar
  PyObject* forward_ad = nullptr;      // torch.autograd.forward_ad (its _current_level)
  PyObject* global_backend_attr = nullptr;
  PyObject* loaded_attr = nullptr;
  PyObject* native_key = nullptr;
  PyObject* current_level_attr = nullptr;
};
PythonState state;

bool runs_native(PyObject* name) {
  return PyUnicode_Check(name) &&
         (PyUnicode_CompareWithASCIIString(name, "auto") == 0 || PyUnicode_CompareWithASCIIString(name, "native") == 0);
}

// fusednorm.backends.select gives CPU tensors the native backend: the backend in force (a use_backend scope,
// else set_backend / FUSEDNORM_BACKEND) is auto or native, and the backend registry holds the loaded native
// module (not the exception of a failed load, which tests simulate).
bool native_backend_in_force() {
  PyObject* loaded = PyObject_GetAttr(state.backends, state.loaded_attr);
  if (loaded == nullptr) {
    PyErr_Clear();
    return false;
  }
  PyObject* native_module = PyDict_Check(loaded) ? PyDict_GetItemWithError(loaded, state.native_key) : nullptr;
  const bool healthy = native_module != nullptr && PyModule_Check(native_module);
  Py_DECREF(loaded);
  if (!healthy) {
    PyErr_Clear();
    return false;
  }
  PyObject* scoped = nullptr;
  if (PyContextVar_Get(state.scoped_backend, nullptr, &scoped) < 0) {
    PyErr_Clear();
    return false;
  }
  PyObject* name = scoped;
  if (name == nullptr || name == Py_None) {
    Py_XDECREF(scoped);
    name = PyObject_GetAttr(state.backends, state.global_backend_attr);
    if (name == nullptr) {
      PyErr_Clear();
      return false;
    }
  }
  const bool native = runs_native(name);
  Py_DECREF(name);
  return native;
}

// A forward-AD level is open: the C++ autograd nodes have no forward derivatives; the Python path handles it.
bool forward_ad_level_open() {
  PyObject* level = PyObject_GetAttr(state.forward_ad, state.current_level_attr);
  if (level == nullptr) {
    PyErr_Clear();
    return true;
  }
  const long value = PyLong_AsLong(level);
  Py_DECREF(level);
  if (value == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return true;
  }
  return value >= 0;
}

bool gate_open() {
  return state.backends != nullptr && unintercepted() && native_backend_in_force() && !forward_ad_level_open();
}

// ---- arguments ----------------------------------------------------------------------------------------

bool is_compute_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// The tensor behind `obj` when it is a plain tensor (torch.Tensor or Parameter, not a subclass: a subclass may
// override dispatch), strided, on the CPU (so not meta), of a dtype fusednorm computes in; else nullptr.
const Tensor* plain_cpu_tensor(PyObject* obj) {
  if (!THPVariable_CheckTypeExact(Py_TYPE(obj))) return nullptr;
  const Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !t.is_cpu() || t.layout() != at::kStrided || !is_compute_dtype(t.scalar_type())) return nullptr;
  return &t;
}

// None, or a plain CPU tensor as plain_cpu_tensor takes it; false for anything else.
bool optional_tensor(PyObject* obj, OptTensor& out) {
  if (obj == Py_None) return true;
  const Tensor* t = plain_cpu_tensor(obj);
  if (t == nullptr) return false;
  out = *t;
  return true;
}

// A Python float or int (not bool: Python's float() would take it, torch's checks may not).
bool as_double(PyObject* obj, double& out) {
  if (PyFloat_CheckExact(obj)) {
    out = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  if (PyLong_CheckExact(obj)) {
    out = PyLong_AsDouble(obj);
    if (out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

bool as_int(PyObject* obj, int64_t& out) {
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  out = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || (out == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// normalized_shape: an int, or a tuple (torch.Size included) or list of ints.
bool as_shape(PyObject* obj, Shape& out) {
  int64_t v = 0;
  if (PyLong_CheckExact(obj)) {
    if (!as_int(obj, v)) return false;
    out.push_back(v);
    return true;
  }
  if (!PyTuple_Check(obj) && !PyList_CheckExact(obj)) return false;
  const Py_ssize_t k = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  for (Py_ssize_t i = 0; i < k; ++i) {
    if (!as_int(items[i], v)) return false;
    out.push_back(v);
  }
  return true;
}

// A per-channel parameter the op layer passes on as it is: None, or a plain CPU tensor (C,).
bool channel_vector(PyObject* obj, int64_t c, OptTensor& out) {
  return optional_tensor(obj, out) && (!out || (out->dim() == 1 && out->size(0) == c));
}

// The layouts every backend addresses in place (fusednorm/ops/group_norm.py, _addressable).
bool addressable(const Tensor& x) {
  return x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

// torch.finfo(dtype).eps: rms_norm's default eps.
double machine_eps(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return static_cast<float>(std::numeric_limits<c10::Half>::epsilon());
    case at::kBFloat16:
      return static_cast<float>(std::numeric_limits<c10::BFloat16>::epsilon());
    case at::kDouble:
      return std::numeric_limits<double>::epsilon();
    default:
      return std::numeric_limits<float>::epsilon();
  }
}

// x as (m, n) rows with a unit-stride last dim: a view when one exists, else one copy (fusednorm/ops/layer_norm.py,
// as_rows).
Tensor as_rows(const Tensor& x, int64_t n) {
  const int64_t m = x.numel() / n;
  const std::vector<int64_t> rows_shape{m, n};
  Tensor rows = at::detail::computeStride(x.sizes(), x.strides(), rows_shape).has_value()
                    ? x.view(rows_shape)
                    : x.contiguous().view(rows_shape);
  if (n > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  return rows;
}

PyObject* wrap(Tensor&& y) { return THPVariable_Wrap(std::move(y)); }

// Runs `compute` (which returns the output tensor) with the GIL released, as torch's own bindings do, and wraps the
// result for Python.
template <class F>
PyObject* compute_without_gil(const F& compute) {
  Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = compute();
  }
  return wrap(std::move(y));
}

// ---- the entries ----------------------------------------------------------------------------------------
// Each returns None for a call it does not take (see the top of the file).

// layer_norm(input, normalized_shape, weight, bias, eps) and rms_norm(input, normalized_shape, weight, eps)
PyObject* row_norm(PyObject* const* args, Py_ssize_t nargs, bool is_rms) {
  if (nargs != (is_rms ? 4 : 5) || !gate_open()) Py_RETURN_NONE;
  const Tensor* x = plain_cpu_tensor(args[0]);
  Shape shape;
  OptTensor weight, bias;
  if (x == nullptr || !as_shape(args[1], shape) || shape.empty() || !optional_tensor(args[2], weight) ||
      (!is_rms && !optional_tensor(args[3], bias))) {
    Py_RETURN_NONE;
  }
  PyObject* eps_arg = args[is_rms ? 3 : 4];
  double eps = 0.0;
  if (is_rms && eps_arg == Py_None) {
    eps = machine_eps(x->scalar_type());
  } else if (!as_double(eps_arg, eps)) {
    Py_RETURN_NONE;
  }
  const int64_t k = static_cast<int64_t>(shape.size());
  const at::IntArrayRef normalized(shape.data(), shape.size());
  if ((weight && weight->sizes() != normalized) || (bias && bias->sizes() != normalized) || x->dim() < k ||
      x->sizes().slice(x->dim() - k) != normalized || x->numel() == 0) {
    Py_RETURN_NONE;
  }
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    const bool is_rows = x->dim() == 2 && x->size(1) == n && x->is_contiguous();
    const Tensor rows = is_rows ? *x : as_rows(*x, n);
    if (weight && weight->dim() != 1) weight = weight->reshape({n});
    if (bias && bias->dim() != 1) bias = bias->reshape({n});
    y = autograd_ops::layer_norm(rows, weight, bias, eps, is_rms);
    if (!is_rows) y = y.view(x->sizes());
  }
  return wrap(std::move(y));
}

PyObject* layer_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  return row_norm(args, nargs, false);
  END_HANDLE_TH_ERRORS
}

PyObject* rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  return row_norm(args, nargs, true);
  END_HANDLE_TH_ERRORS
}

// group_norm(input, num_groups, weight, bias, eps, activation)
PyObject* group_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6 || !gate_open()) Py_RETURN_NONE;
  const Tensor* x = plain_cpu_tensor(args[0]);
  if (x == nullptr || x->dim() < 2 || x->numel() == 0 || !addressable(*x)) Py_RETURN_NONE;
  const int64_t c = x->size(1);
  int64_t groups = 0;
  double eps = 0.0;
  OptTensor weight, bias;
  // numel / groups == 1 is torch's "more than 1 value per channel" error
  if (!as_int(args[1], groups) || groups <= 0 || c % groups != 0 || x->numel() / groups == 1 ||
      !channel_vector(args[2], c, weight) || !channel_vector(args[3], c, bias) || !as_double(args[4], eps)) {
    Py_RETURN_NONE;
  }
  const char* activation = nullptr;
  if (args[5] == Py_None) {
    activation = "none";
  } else if (PyUnicode_Check(args[5]) && PyUnicode_CompareWithASCIIString(args[5], "none") == 0) {
    activation = "none";
  } else if (PyUnicode_Check(args[5]) && PyUnicode_CompareWithASCIIString(args[5], "silu") == 0) {
    activation = "silu";
  } else {
    Py_RETURN_NONE;
  }
  return compute_without_gil([&] { return autograd_ops::group_norm(*x, weight, bias, groups, eps, activation); });
  END_HANDLE_TH_ERRORS
}

// layer_norm_2d(input, weight, bias, eps): input (N, C, *spatial) whose spatial dims view as one (the op layer's
// (N, C, P); NCHW, channels_last and every 3-D input do); other inputs are copied by the Python path.
PyObject* layer_norm_2d(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4 || !gate_open()) Py_RETURN_NONE;
  const Tensor* x = plain_cpu_tensor(args[0]);
  if (x == nullptr || x->dim() < 2 || x->numel() == 0) Py_RETURN_NONE;
  const int64_t c = x->size(1);
  OptTensor weight, bias;
  double eps = 0.0;
  if (!channel_vector(args[1], c, weight) || !channel_vector(args[2], c, bias) || !as_double(args[3], eps)) {
    Py_RETURN_NONE;
  }
  const std::vector<int64_t> ncp{x->size(0), c, x->numel() / (x->size(0) * c)};
  const bool is_ncp = x->dim() == 3;
  if (!is_ncp && !at::detail::computeStride(x->sizes(), x->strides(), ncp).has_value()) Py_RETURN_NONE;
  return compute_without_gil([&] {
    Tensor y = autograd_ops::layer_norm_cf(is_ncp ? *x : x->view(ncp), weight, bias, eps);
    return is_ncp ? y : y.reshape(x->sizes());
  });
  END_HANDLE_TH_ERRORS
}

// instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps), taken without
// running statistics only (with them the op layer also updates the buffers; eps == 0 has its own path there).
PyObject* instance_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8 || !gate_open()) Py_RETURN_NONE;
  const Tensor* x = plain_cpu_tensor(args[0]);
  if (x == nullptr || x->dim() < 3 || x->numel() == 0 || !addressable(*x) || args[1] != Py_None ||
      args[2] != Py_None || args[5] != Py_True) {
    Py_RETURN_NONE;
  }
  const int64_t c = x->size(1);
  OptTensor weight, bias;
  double eps = 0.0;
  // one value per instance is torch's "more than 1 spatial element" error
  if (x->numel() / (x->size(0) * c) == 1 || !channel_vector(args[3], c, weight) ||
      !channel_vector(args[4], c, bias) || !as_double(args[7], eps) || eps == 0.0) {
    Py_RETURN_NONE;
  }
  return compute_without_gil([&] { return autograd_ops::group_norm(*x, weight, bias, c, eps, "none"); });
  END_HANDLE_TH_ERRORS
}

// batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps); a float momentum only
// (the modules' cumulative average passes a 0-dim tensor, which the op layer handles).
PyObject* batch_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 8 || !gate_open()) Py_RETURN_NONE;
  const Tensor* x = plain_cpu_tensor(args[0]);
  if (x == nullptr || x->dim() < 2 || x->numel() == 0 || (args[5] != Py_True && args[5] != Py_False) ||
      !PyFloat_CheckExact(args[6])) {
    Py_RETURN_NONE;
  }
  const bool training = args[5] == Py_True;
  const double momentum = PyFloat_AS_DOUBLE(args[6]);
  const int64_t c = x->size(1);
  OptTensor running_mean, running_var, weight, bias;
  double eps = 0.0;
  if (!channel_vector(args[1], c, running_mean) || !channel_vector(args[2], c, running_var) ||
      !channel_vector(args[3], c, weight) || !channel_vector(args[4], c, bias) || !as_double(args[7], eps)) {
    Py_RETURN_NONE;
  }
  // torch's checks: one value per channel, eps, the running statistics each mode needs
  const bool valid = training ? (x->numel() / c != 1 && eps > 0.0 && running_mean.has_value() == running_var.has_value())
                              : (eps >= 0.0 && running_mean.has_value() && running_var.has_value());
  if (!valid) Py_RETURN_NONE;
  return compute_without_gil([&] {
    return autograd_ops::batch_norm(*x, weight, bias, running_mean, running_var, training, momentum, eps);
  });
  END_HANDLE_TH_ERRORS
}

// add_norm(x, residual, weight, bias, eps, dropout_p, prenorm, residual_in_fp32, is_rms): add_layer_norm
// (is_rms False) and add_rms_norm (bias None, eps None for the dtype's machine eps). The dropout seed is drawn
// from torch's default generator exactly as fusednorm.functional.dropout_seed does, after the checks.
PyObject* add_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9 || !gate_open() || (args[8] != Py_True && args[8] != Py_False)) Py_RETURN_NONE;
  const bool is_rms = args[8] == Py_True;
  const Tensor* x = plain_cpu_tensor(args[0]);
  OptTensor residual, weight, bias;
  double eps = 0.0, p = 0.0;
  if (x == nullptr || x->dim() < 1 || x->numel() == 0 || !optional_tensor(args[1], residual) ||
      !optional_tensor(args[2], weight) || !optional_tensor(args[3], bias) || !as_double(args[5], p) ||
      !(p >= 0.0 && p <= 1.0) || (args[6] != Py_True && args[6] != Py_False) ||
      (args[7] != Py_True && args[7] != Py_False)) {
    Py_RETURN_NONE;
  }
  if (is_rms && args[4] == Py_None) {
    eps = machine_eps(x->scalar_type());
  } else if (!as_double(args[4], eps)) {
    Py_RETURN_NONE;
  }
  const int64_t n = x->size(-1);
  const auto vector_of_n = [n](const OptTensor& t) { return !t || (t->dim() == 1 && t->size(0) == n); };
  if (!vector_of_n(weight) || !vector_of_n(bias) || (residual && residual->sizes() != x->sizes())) Py_RETURN_NONE;
  const bool prenorm = args[6] == Py_True, residual_in_fp32 = args[7] == Py_True;
  // s's dtype: the residual's (x's without one), fp32 instead of 16-bit with residual_in_fp32
  at::ScalarType s_dtype = residual ? residual->scalar_type() : x->scalar_type();
  if (residual_in_fp32 && (s_dtype == at::kHalf || s_dtype == at::kBFloat16)) s_dtype = at::kFloat;
  // The kernels' dropout parameters (fusednorm/backends/reference_variants.py: dropout_threshold, dropout_scale):
  // keep an element iff its 24-bit hash >= threshold. nearbyint rounds half to even, as Python's round().
  const int64_t threshold =
      std::min<int64_t>(int64_t(1) << 24, std::max<int64_t>(0, static_cast<int64_t>(std::nearbyint(p * (1 << 24)))));
  const double drop_scale = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
  Tensor y, s;
  {
    pybind11::gil_scoped_release no_gil;
    const int64_t seed = p > 0.0 ? at::randint(0, (int64_t(1) << 31) - 1, {1}).item<int64_t>() : 0;
    const bool is_rows = x->dim() == 2 && x->is_contiguous();
    const Tensor rows = is_rows ? *x : as_rows(*x, n);
    if (residual && !(residual->dim() == 2 && residual->is_contiguous())) residual = as_rows(*residual, n);
    auto out = autograd_ops::add_norm(rows, residual, weight, bias, eps, is_rms, p > 0.0, drop_scale, seed, threshold,
                                      s_dtype);
    y = std::move(out[0]);
    s = std::move(out[1]);
    if (!is_rows) {
      y = y.view(x->sizes());
      s = s.view(x->sizes());
    }
  }
  if (!prenorm) return wrap(std::move(y));
  PyObject* py_y = wrap(std::move(y));
  if (py_y == nullptr) return nullptr;
  PyObject* py_s = wrap(std::move(s));
  if (py_s == nullptr) {
    Py_DECREF(py_y);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, py_y, py_s);  // new references to both (or nullptr with the error set)
  Py_DECREF(py_y);
  Py_DECREF(py_s);
  return pair;
  END_HANDLE_TH_ERRORS
}

// ---- module functions -----------------------------------------------------------------------------------

PyObject* eager_unintercepted(PyObject*, PyObject*) {
  if (unintercepted()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

// bind_eager_state(backends_module, forward_ad_module): what the entries read of Python state. Until it is
// called, every entry returns None.
PyObject* bind_eager_state(PyObject*, PyObject* args) {
  PyObject* backends = nullptr;
  PyObject* forward_ad = nullptr;
  if (!PyArg_ParseTuple(args, "OO:bind_eager_state", &backends, &forward_ad)) return nullptr;
  PyObject* scoped = PyObject_GetAttrString(backends, "_scoped_backend");
  if (scoped == nullptr) return nullptr;
  if (!PyContextVar_CheckExact(scoped)) {
    Py_DECREF(scoped);
    PyErr_SetString(PyExc_TypeError, "bind_eager_state: backends._scoped_backend is not a ContextVar");
    return nullptr;
  }
  if (state.global_backend_attr == nullptr) {
    state.global_backend_attr = PyUnicode_InternFromString("_global_backend");
    state.loaded_attr = PyUnicode_InternFromString("_loaded");
    state.native_key = PyUnicode_InternFromString("native");
    state.current_level_attr = PyUnicode_InternFromString("_current_level");
    if (state.global_backend_attr == nullptr || state.loaded_attr == nullptr || state.native_key == nullptr ||
        state.current_level_attr == nullptr) {
      return nullptr;
    }
  }
  Py_INCREF(backends);
  Py_INCREF(forward_ad);
  Py_XSETREF(state.backends, backends);
  Py_XSETREF(state.forward_ad, forward_ad);
  Py_XSETREF(state.scoped_backend, scoped);
  Py_RETURN_NONE;
}

template <PyObject* (*F)(PyObject*, PyObject* const*, Py_ssize_t)>
PyCFunction fastcall() {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(F));
}

}  // namespace

PyMethodDef python_methods[] = {
    {"eager_unintercepted", eager_unintercepted, METH_NOARGS,
     "True when no dispatch mode, torch-function mode, functorch transform, JIT trace or profiler is active."},
    {"bind_eager_state", bind_eager_state, METH_VARARGS,
     "bind_eager_state(backends_module, forward_ad_module): the Python state the eager entries read."},
    {"layer_norm", fastcall<layer_norm>(), METH_FASTCALL,
     "layer_norm(input, normalized_shape, weight, bias, eps): fusednorm.functional.layer_norm on plain CPU "
     "tensors, or None for a call the Python path must take."},
    {"rms_norm", fastcall<rms_norm>(), METH_FASTCALL,
     "rms_norm(input, normalized_shape, weight, eps): as layer_norm."},
    {"layer_norm_2d", fastcall<layer_norm_2d>(), METH_FASTCALL,
     "layer_norm_2d(input, weight, bias, eps): as layer_norm."},
    {"group_norm", fastcall<group_norm>(), METH_FASTCALL,
     "group_norm(input, num_groups, weight, bias, eps, activation): as layer_norm."},
    {"instance_norm", fastcall<instance_norm>(), METH_FASTCALL,
     "instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps): as "
     "layer_norm; calls without running statistics only."},
    {"batch_norm", fastcall<batch_norm>(), METH_FASTCALL,
     "batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps): as layer_norm; a "
     "float momentum only."},
    {"add_norm", fastcall<add_norm>(), METH_FASTCALL,
     "add_norm(x, residual, weight, bias, eps, dropout_p, prenorm, residual_in_fp32, is_rms): "
     "add_layer_norm / add_rms_norm as layer_norm."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace eager
}  // namespace fusednorm
#endif  // !FUSEDNORM_NO_PYTHON
