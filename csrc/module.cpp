// Entry point of the fusednorm._C extension: the Python module (importing it runs the static operator
// registrations of every linked source; its functions are in eager.cpp), has_cuda(), and the CPU instruction-set
// choice.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ops.h"

#if !defined(FUSEDNORM_NO_PYTHON)
#include <Python.h>
#endif

namespace fusednorm {

CpuIsa cpu_isa_level() {
  static const CpuIsa level = [] {
    CpuIsa best = CpuIsa::kBase;
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_cpu_init();
#if defined(FUSEDNORM_HAVE_AVX2)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("bmi2")) {
      best = CpuIsa::kAvx2;
#if defined(FUSEDNORM_HAVE_AVX512BF16)
      // (GCC's checks include the OS saving the AVX-512 register state.)
      if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
          __builtin_cpu_supports("avx512bf16")) {
        best = CpuIsa::kAvx512Bf16;
      }
#endif
    }
#endif
#endif
    const char* env = std::getenv("FUSEDNORM_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "base") == 0) return CpuIsa::kBase;
    if (env != nullptr && std::strcmp(env, "avx2") == 0) return std::min(best, CpuIsa::kAvx2);
    return best;
  }();
  return level;
}

namespace {
bool has_cuda() {
#if defined(FUSEDNORM_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

std::string cpu_isa() {
  switch (cpu_isa_level()) {
    case CpuIsa::kAvx512Bf16:
      return "avx512bf16";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "base";
  }
}

// The copies of the CPU kernels this build holds (the CPU decides which of them can run).
std::vector<std::string> cpu_isas_built() {
  std::vector<std::string> isas{"base"};
#if defined(FUSEDNORM_HAVE_AVX2)
  isas.emplace_back("avx2");
#endif
#if defined(FUSEDNORM_HAVE_AVX512BF16)
  isas.emplace_back("avx512bf16");
#endif
  return isas;
}

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
  m.def("cpu_isas_built() -> str[]", &fusednorm::cpu_isas_built);
  m.def("parallel_threads(int tasks) -> int", &fusednorm::parallel_threads);
}

#if !defined(FUSEDNORM_NO_PYTHON)
// The module's functions: eager_unintercepted and the whole-call eager entries (csrc/eager.cpp).
namespace fusednorm {
namespace eager {
extern PyMethodDef python_methods[];
}
}  // namespace fusednorm

static struct PyModuleDef fusednorm_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "fusednorm native kernels; the operators live under torch.ops.fusednorm_C", -1, fusednorm::eager::python_methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fusednorm_c_module); }
#endif
