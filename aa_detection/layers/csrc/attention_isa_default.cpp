// Relative attention kernel for the baseline instruction set of the build.
#define AA_ISA isa_default
#include "attention_impl.h"
