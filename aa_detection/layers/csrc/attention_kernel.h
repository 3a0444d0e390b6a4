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
  const float* q;      // (DK, HW) channel-major, as the qkv 1x1 convolution writes it
  const float* kT;     // (DK, H, Wp) key rows zero-padded to Wp
  const float* vT;     // (DV, H, Wp)
  const float* rel_h;  // (2 Lh - 1, DK) or nullptr (content-only attention)
  const float* rel_w;  // (2 Lw - 1, DK) or nullptr
  int64_t HW;
  int H, W, Wp, dk, dv;  // Wp: W rounded up to kLanes
  int Lh, Lw;            // rows per side of the relative tables
  float scale;
};

// Gradient buffers of one slice. dq columns of the processed queries are written; dkT, dvT, drel_h and
// drel_w are accumulated into (zero them first).
struct AttentionGrads {
  const float* dout;  // (DV, HW)
  const float* out;   // (DV, HW)
  const float* lse;   // (HW)
  float* dq;          // (DK, HW)
  float* dkT;         // (DK, H, Wp)
  float* dvT;         // (DV, H, Wp)
  float* drel_h;      // (2 Lh - 1, DK)
  float* drel_w;      // (2 Lw - 1, DK)
};

// Scratch floats per thread: kScratchRows * (Wp + H).
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
