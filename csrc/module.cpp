// Entry point of the fusednorm._C extension: the Python module stub (importing it runs the static
// operator registrations of every linked source), has_cuda(), and the CPU instruction-set choice.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "ops.h"

#if !defined(FUSEDNORM_NO_PYTHON)
#include <Python.h>
#endif

namespace fusednorm {

bool cpu_use_avx2() {
  static const bool use = [] {
    const char* env = std::getenv("FUSEDNORM_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "base") == 0) return false;
#if defined(FUSEDNORM_HAVE_AVX2) && (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
#else
    return false;
#endif
  }();
  return use;
}

namespace {
bool has_cuda() {
#if defined(FUSEDNORM_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

std::string cpu_isa() { return cpu_use_avx2() ? "avx2" : "base"; }

// Number of threads that at::parallel_for actually runs in this library for a job of `tasks` tasks of
// grain 1. at::parallel_for is a header template over `#pragma omp parallel`: if the library were built
// without OpenMP it would silently run on one thread; the tests check this returns
// min(tasks, torch.get_num_threads()).
int64_t parallel_threads(int64_t tasks) {
  std::atomic<int64_t> seen{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    const int64_t id = at::get_thread_num() + 1;
    int64_t cur = seen.load();
    while (cur < id && !seen.compare_exchange_weak(cur, id)) {
    }
  });
  return seen.load();
}
}  // namespace

}  // namespace fusednorm

TORCH_LIBRARY_FRAGMENT(fusednorm_C, m) {
  m.def("has_cuda() -> bool", &fusednorm::has_cuda);
  m.def("cpu_isa() -> str", &fusednorm::cpu_isa);
  m.def("parallel_threads(int tasks) -> int", &fusednorm::parallel_threads);
}

#if !defined(FUSEDNORM_NO_PYTHON)
static struct PyModuleDef fusednorm_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "fusednorm native kernels; the operators live under torch.ops.fusednorm_C", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fusednorm_c_module); }
#endif
