// The instruction-set level of a build: fixed at compile time by its -m flags (cpu_kernels.py builds one
// module per level); every kernel file includes this first and guards its vector paths with these macros, so
// every level compiles.
#pragma once
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TM_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#define TM_AVX512 1
#endif
#endif
