// Relative attention kernel for AVX2 + FMA CPUs, selected at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#include <cstdint>
#pragma GCC target("avx2,fma,bmi2")
#define AA_ISA isa_avx2
#include "attention_impl.h"
#endif
