// AVX2+FMA+F16C copy of the variant CPU kernels (registration stays in the baseline copy).
#define FUSEDNORM_ISA_AVX2 1
#include "../variants.cpp"
