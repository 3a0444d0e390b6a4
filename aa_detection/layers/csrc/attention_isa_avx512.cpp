// Relative attention kernel for AVX-512 CPUs, selected at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#include <cstdint>
#include <cstring>
#pragma GCC target("avx2,fma,bmi2,avx512f,avx512dq,avx512bw,avx512vl,prefer-vector-width=512")
#define AA_ISA isa_avx512
#define AA_VEC_BYTES 64
#include "attention_impl.h"
#endif
