// Must be the first include of every CPU kernel source (csrc/cpu/<family>.cpp).
//
// Each CPU kernel source is compiled twice: once for the baseline x86-64 / host ISA (namespace
// fusednorm::cpu::base) and, on x86-64, once more from csrc/cpu/isa/<family>_avx2.cpp with AVX2+FMA+F16C
// enabled (namespace fusednorm::cpu::avx2). The registration code (only in the baseline copy) picks the
// AVX2 copy at run time when the CPU has it, so the extension still loads and runs on CPUs without
// AVX2. This mirrors how ATen builds its CPU kernels per capability.
#pragma once

#if defined(FUSEDNORM_ISA_AVX2)
#if !defined(__GNUC__) || defined(__clang__)
#error "the AVX2 copy of the CPU kernels is built with GCC only (setup.py / CMakeLists.txt skip it otherwise)"
#endif
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
// GCC's target pragma enables code generation but does not define the feature macros that the ATen and
// Sleef headers test, so define them here (this is what -mavx2 -mfma -mf16c would have defined).
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY_AVX2 1
#define CPU_CAPABILITY AVX2
#define FUSEDNORM_ISA avx2
#else
#define FUSEDNORM_ISA base
#endif
