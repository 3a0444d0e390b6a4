// Relative attention kernel for the baseline instruction set of the build.
#include <cstdint>
#include <cstring>
#define AA_ISA isa_default
#define AA_VEC_BYTES 16
#include "attention_impl.h"
