// Relative 2D attention on one (batch, head) slice, fp32, never storing the (HW, HW) logits.
//
// This header is compiled once per instruction set (see attention_isa_*.cpp); it must define
// everything inside the namespace AA_ISA and include no torch headers.
//
// Layouts of one (batch, head) slice, HW = H * W, key j = (y, x) at j = y * W + x:
//   q   (HW, DK)   queries, row-major            kT (DK, HW)  keys, transposed
//   vT  (DV, HW)   values, transposed            rh (HW, H)   q_i . r^H[y - y_i]   (unscaled)
//   rw  (HW, W)    q_i . r^W[x - x_i] (unscaled)
// logit_ij = scale * (q_i . k_j + rh[i, y_j] + rw[i, x_j]).
// Keys are visited one key row (fixed y) at a time, so the y term is one scalar per row and the
// x term is a contiguous vector over the row.

#include "attention_kernel.h"

namespace aa_detection {
namespace AA_ISA {

namespace {

// exp(x) for x <= 0 (inputs are logits minus a running max): 2^n * p(r), |rel err| < 2e-7.
// Plain arithmetic so that gcc vectorises the loops that call it.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693145751953125f;  // ln 2 split in a high and a low part
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int bits = (static_cast<int>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// s[x] = base + rw[x] + sum_d q[d] * k[d * stride + x] for x < W; returns max_x s[x].
template <int DK>
inline float row_logits(const float* __restrict q, const float* __restrict k, int64_t stride,
                        const float* __restrict rw, float base, int W, int dk, float* __restrict s) {
  float mx = -3.0e38f;
  const int d_count = DK > 0 ? DK : dk;
#pragma omp simd reduction(max : mx)
  for (int x = 0; x < W; ++x) {
    float acc = base + rw[x];
    for (int d = 0; d < d_count; ++d) acc += q[d] * k[d * stride + x];
    s[x] = acc;
    mx = acc > mx ? acc : mx;
  }
  return mx;
}

template <int DK>
void forward_rows(const AttentionSlice& a, int64_t i0, int64_t i1, float* __restrict out,
                  float* __restrict lse, float* __restrict work) {
  const int H = a.H, W = a.W, dk = a.dk, dv = a.dv;
  const int64_t HW = static_cast<int64_t>(H) * W;
  float* s = work;           // W
  float* rws = work + W;     // W
  float* acc = rws + W;      // dv
  float qs[kMaxWidth];
  for (int64_t i = i0; i < i1; ++i) {
    for (int d = 0; d < dk; ++d) qs[d] = a.q[i * dk + d] * a.scale;
    const float* rw_i = a.rw + i * W;
    for (int x = 0; x < W; ++x) rws[x] = rw_i[x] * a.scale;
    const float* rh_i = a.rh + i * H;
    float m = -3.0e38f, l = 0.0f;
    for (int c = 0; c < dv; ++c) acc[c] = 0.0f;
    for (int y = 0; y < H; ++y) {
      const int64_t j0 = static_cast<int64_t>(y) * W;
      const float row_max = row_logits<DK>(qs, a.kT + j0, HW, rws, rh_i[y] * a.scale, W, dk, s);
      if (row_max > m) {
        const float shrink = __builtin_expf(m - row_max);
        l *= shrink;
        for (int c = 0; c < dv; ++c) acc[c] *= shrink;
        m = row_max;
      }
      float row_sum = 0.0f;
#pragma omp simd reduction(+ : row_sum)
      for (int x = 0; x < W; ++x) {
        const float p = fast_exp(s[x] - m);
        s[x] = p;
        row_sum += p;
      }
      l += row_sum;
      for (int c = 0; c < dv; ++c) {
        const float* v_row = a.vT + c * HW + j0;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int x = 0; x < W; ++x) dot += s[x] * v_row[x];
        acc[c] += dot;
      }
    }
    const float inv = 1.0f / l;
    for (int c = 0; c < dv; ++c) out[i * dv + c] = acc[c] * inv;
    lse[i] = m + __builtin_logf(l);
  }
}

template <int DK>
void backward_rows(const AttentionSlice& a, const AttentionGrads& g, int64_t i0, int64_t i1,
                   float* __restrict work) {
  const int H = a.H, W = a.W, dk = a.dk, dv = a.dv;
  const int64_t HW = static_cast<int64_t>(H) * W;
  const int d_count = DK > 0 ? DK : dk;
  float* s = work;        // W: logits, then probabilities, then ds
  float* rws = work + W;  // W
  float qs[kMaxWidth], qd_raw[kMaxWidth], dq[kMaxWidth], go[kMaxWidth];
  for (int64_t i = i0; i < i1; ++i) {
    for (int d = 0; d < dk; ++d) {
      qs[d] = a.q[i * dk + d] * a.scale;
      qd_raw[d] = a.q[i * dk + d];
      dq[d] = 0.0f;
    }
    for (int c = 0; c < dv; ++c) go[c] = g.dout[i * dv + c];
    const float* rw_i = a.rw + i * W;
    for (int x = 0; x < W; ++x) rws[x] = rw_i[x] * a.scale;
    const float* rh_i = a.rh + i * H;
    const float lse_i = g.lse[i], D_i = g.delta[i];
    float* drw_i = g.drw + i * W;
    for (int x = 0; x < W; ++x) drw_i[x] = 0.0f;
    for (int y = 0; y < H; ++y) {
      const int64_t j0 = static_cast<int64_t>(y) * W;
      row_logits<DK>(qs, a.kT + j0, HW, rws, rh_i[y] * a.scale - lse_i, W, dk, s);
      // s <- p, dv_j += p go, then s <- ds = p (dp - D) with dp = go . v_j
#pragma omp simd
      for (int x = 0; x < W; ++x) {
        const float p = fast_exp(s[x]);
        float dp = 0.0f;
        for (int c = 0; c < dv; ++c) {
          dp += go[c] * a.vT[c * HW + j0 + x];
          g.dvT[c * HW + j0 + x] += p * go[c];
        }
        s[x] = p * (dp - D_i) * a.scale;
      }
      float row_sum = 0.0f;
#pragma omp simd reduction(+ : row_sum)
      for (int x = 0; x < W; ++x) {
        row_sum += s[x];
        drw_i[x] += s[x];
      }
      g.drh[i * H + y] = row_sum;
      for (int d = 0; d < d_count; ++d) {
        const float* k_row = a.kT + d * HW + j0;
        float* dk_row = g.dkT + d * HW + j0;
        const float qd = qd_raw[d];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int x = 0; x < W; ++x) {
          dot += s[x] * k_row[x];
          dk_row[x] += s[x] * qd;
        }
        dq[d] += dot;
      }
    }
    for (int d = 0; d < dk; ++d) g.dq[i * dk + d] = dq[d];
  }
}

}  // namespace

void attention_forward_rows(const AttentionSlice& a, int64_t i0, int64_t i1, float* out, float* lse,
                            float* work) {
  switch (a.dk) {
#define AA_CASE(N) \
  case N:          \
    return forward_rows<N>(a, i0, i1, out, lse, work);
    AA_CASE(1) AA_CASE(2) AA_CASE(3) AA_CASE(4) AA_CASE(5) AA_CASE(6) AA_CASE(7) AA_CASE(8)
    AA_CASE(9) AA_CASE(10) AA_CASE(11) AA_CASE(12) AA_CASE(13) AA_CASE(14) AA_CASE(15) AA_CASE(16)
#undef AA_CASE
    default:
      return forward_rows<0>(a, i0, i1, out, lse, work);
  }
}

void attention_backward_rows(const AttentionSlice& a, const AttentionGrads& g, int64_t i0, int64_t i1,
                             float* work) {
  switch (a.dk) {
#define AA_CASE(N) \
  case N:          \
    return backward_rows<N>(a, g, i0, i1, work);
    AA_CASE(1) AA_CASE(2) AA_CASE(3) AA_CASE(4) AA_CASE(5) AA_CASE(6) AA_CASE(7) AA_CASE(8)
    AA_CASE(9) AA_CASE(10) AA_CASE(11) AA_CASE(12) AA_CASE(13) AA_CASE(14) AA_CASE(15) AA_CASE(16)
#undef AA_CASE
    default:
      return backward_rows<0>(a, g, i0, i1, work);
  }
}

}  // namespace AA_ISA
}  // namespace aa_detection
