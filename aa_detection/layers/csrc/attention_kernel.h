// Declarations shared by the per-instruction-set builds of the relative attention kernel.
#pragma once
#include <cstdint>

namespace aa_detection {

// Widest dkh and dvh the kernel accepts (per-query registers live on the stack).
constexpr int kMaxWidth = 64;
// Key rows are padded to a multiple of this many floats (the widest vector, AVX-512).
constexpr int kLanes = 16;

// One (batch, head) slice; see attention_impl.h for the layouts.
struct AttentionSlice {
  const float* q;
  const float* kT;
  const float* vT;
  const float* rh;
  const float* rw;
  int H, W, Wp, dk, dv;  // Wp: W rounded up to kLanes
  float scale;
};

// Gradient buffers of one slice. dq, drh, drw rows of the processed queries are written;
// dkT and dvT are accumulated into (zero them first).
struct AttentionGrads {
  const float* dout;   // (HW, DV)
  const float* lse;    // (HW)
  const float* delta;  // (HW): dout_i . out_i
  float* dq;           // (HW, DK)
  float* dkT;          // (DK, H, Wp)
  float* dvT;          // (DV, H, Wp)
  float* drh;          // (HW, H)
  float* drw;          // (HW, W)
};

// Scratch floats per thread: kScratchRows * Wp.
constexpr int kScratchRows = 8;
#define AA_DECLARE_ISA(ns)                                                                          \
  namespace ns {                                                                                    \
  void attention_forward_rows(const AttentionSlice& a, int64_t i0, int64_t i1, float* out,          \
                              float* lse, float* work);                                             \
  void attention_backward_rows(const AttentionSlice& a, const AttentionGrads& g, int64_t i0,        \
                               int64_t i1, float* work);                                            \
  void exp_inplace(float* x, int64_t n);                                                            \
  }

AA_DECLARE_ISA(isa_default)
#if defined(__x86_64__) && defined(__GNUC__)
AA_DECLARE_ISA(isa_avx2)
AA_DECLARE_ISA(isa_avx512)
#endif
#undef AA_DECLARE_ISA

}  // namespace aa_detection
