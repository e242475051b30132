// AVX2 + AVX-512 BF16 copy of the group_norm CPU kernels (registration stays in the baseline copy).
#define FUSEDNORM_ISA_AVX512BF16 1
#include "../group_norm.cpp"
