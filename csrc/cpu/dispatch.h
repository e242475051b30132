// Run-time choice between the copies of the CPU kernels (see isa_prelude.h).
#pragma once

#include "ops.h"

FUSEDNORM_DECLARE_OPS(fusednorm::cpu::base)

#if defined(FUSEDNORM_HAVE_AVX2)
FUSEDNORM_DECLARE_OPS(fusednorm::cpu::avx2)
#define FUSEDNORM_CALL_AVX2(op, ...) \
  if (::fusednorm::cpu_isa_level() >= ::fusednorm::CpuIsa::kAvx2) return ::fusednorm::cpu::avx2::op(__VA_ARGS__);
#else
#define FUSEDNORM_CALL_AVX2(op, ...)
#endif

#if defined(FUSEDNORM_HAVE_AVX512BF16)
FUSEDNORM_DECLARE_OPS(fusednorm::cpu::avx512bf16)
#define FUSEDNORM_CALL_AVX512BF16(op, ...)                                  \
  if (::fusednorm::cpu_isa_level() >= ::fusednorm::CpuIsa::kAvx512Bf16) \
    return ::fusednorm::cpu::avx512bf16::op(__VA_ARGS__);
#else
#define FUSEDNORM_CALL_AVX512BF16(op, ...)
#endif

// The body of a function that forwards its arguments to `op` of the best copy.
#define FUSEDNORM_CPU_CALL(op, ...)             \
  FUSEDNORM_CALL_AVX512BF16(op, __VA_ARGS__)    \
  FUSEDNORM_CALL_AVX2(op, __VA_ARGS__)          \
  return ::fusednorm::cpu::base::op(__VA_ARGS__)
