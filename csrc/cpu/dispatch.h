// Run-time choice between the baseline and AVX2 copies of the CPU kernels (see isa_prelude.h).
#pragma once

#include "ops.h"

FUSEDNORM_DECLARE_OPS(fusednorm::cpu::base)

#if defined(FUSEDNORM_HAVE_AVX2)
FUSEDNORM_DECLARE_OPS(fusednorm::cpu::avx2)
#define FUSEDNORM_CPU_CALL(op, ...)                                           \
  if (::fusednorm::cpu_use_avx2()) return ::fusednorm::cpu::avx2::op(__VA_ARGS__); \
  return ::fusednorm::cpu::base::op(__VA_ARGS__)
#else
#define FUSEDNORM_CPU_CALL(op, ...) return ::fusednorm::cpu::base::op(__VA_ARGS__)
#endif
