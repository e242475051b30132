// AVX2 + AVX-512 BF16 copy of the variants CPU kernels (registration stays in the baseline copy).
#define FUSEDNORM_ISA_AVX512BF16 1
#include "../variants.cpp"
