// Relative attention kernel for AVX2 + FMA CPUs, selected at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#include <cstdint>
#include <cstring>
#pragma GCC target("avx2,fma,bmi2")
#define AA_ISA isa_avx2
#define AA_VEC_BYTES 32
#include "attention_impl.h"
#endif
