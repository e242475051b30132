// Must be the first include of every CPU kernel source (csrc/cpu/<family>.cpp).
//
// Each CPU kernel source is compiled up to three times: for the baseline x86-64 / host ISA (namespace
// fusednorm::cpu::base) and, on x86-64 with GCC, from csrc/cpu/isa/<family>_<isa>.cpp for
//   avx2        AVX2+FMA+F16C (fusednorm::cpu::avx2), and
//   avx512bf16  the same 256-bit kernels, also allowed AVX-512 F/VL/BW/DQ and AVX512-BF16
//               (fusednorm::cpu::avx512bf16): fp32 -> bf16 stores become one vcvtne2ps2bf16 per 16 values
//               instead of an emulated round-to-nearest-even (measured: bf16 LayerNorm forward 1.3-1.5x).
// The registration code (only in the baseline copy) picks the best copy the CPU runs at load time
// (fusednorm::cpu_isa_level, FUSEDNORM_CPU_ISA caps it), so the extension loads and runs on any x86-64
// CPU. This mirrors how ATen builds its CPU kernels per capability.
#pragma once

#if defined(FUSEDNORM_ISA_AVX2) || defined(FUSEDNORM_ISA_AVX512BF16)
#define FUSEDNORM_ISA_COPY 1
#if !defined(__GNUC__) || defined(__clang__)
#error "the ISA copies of the CPU kernels are built with GCC only (setup.py / CMakeLists.txt skip them otherwise)"
#endif
// Everything from here on, the ATen headers included, is AVX2 code. The AVX-512 copy enables AVX-512 only
// for its own kernels (cpu_utils.h, after the includes): ATen's and c10's inline functions then compile
// to the same AVX2 code in both copies, so whichever definition the linker keeps runs on AVX2-only CPUs.
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
#if defined(FUSEDNORM_ISA_AVX512BF16)
#define FUSEDNORM_ISA avx512bf16
#else
#define FUSEDNORM_ISA avx2
#endif
#else
#define FUSEDNORM_ISA base
#endif
