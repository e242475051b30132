// AVX2 + AVX-512 BF16 copy of the layer_norm CPU kernels (registration stays in the baseline copy).
#define FUSEDNORM_ISA_AVX512BF16 1
#include "../layer_norm.cpp"
