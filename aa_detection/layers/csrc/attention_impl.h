// Relative 2D attention on one (batch, head) slice, fp32, never storing the (HW, HW) logits.
//
// This header is compiled once per instruction set (attention_isa_*.cpp define AA_ISA and the vector
// width AA_VEC_BYTES first); it defines everything inside the namespace AA_ISA and includes no torch
// headers. The loops use GCC vector extensions, which lower to the instruction set of the file.
//
// Layouts of one (batch, head) slice, query/key j = (y, x) at column j = y * W + x, rows of keys
// padded to Wp (a multiple of kLanes) floats:
//   q   (DK, HW)       queries, channel-major (the qkv convolution's output)
//   kT  (DK, H, Wp)    keys                        vT (DV, H, Wp)  values
//   rel_h (2Lh-1, DK), rel_w (2Lw-1, DK): the relative tables, row o + L - 1 for offset o = key - query
// logit_ij = scale * (q_i . k_j + q_i . rel_h[y_j - y_i] + q_i . rel_w[x_j - x_i]).
// Each query computes its H + W relative logits first; keys are then visited one key row (fixed y) at a
// time: the y term is one scalar per row and the x term a contiguous vector over the row. Padded key
// columns get a logit of -1e30, hence probability 0. Outputs are channel-major too: out (DV, HW).

#include <cstring>

#include "attention_kernel.h"

namespace aa_detection {
namespace AA_ISA {

namespace {

constexpr int L = AA_VEC_BYTES / 4;  // floats per vector
typedef float vf __attribute__((vector_size(AA_VEC_BYTES)));
typedef int vi __attribute__((vector_size(AA_VEC_BYTES)));
typedef float vf_u __attribute__((vector_size(AA_VEC_BYTES), aligned(4)));

// Queries processed together by the backward pass.
constexpr int kQueryBlock = 4;

static_assert(kLanes % L == 0, "row padding must be a multiple of the vector width");

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline vf splat(float x) { return vf{} + x; }

inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < L; ++i) s += v[i];
  return s;
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < L; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) for x <= 88 (used on logits minus their max): 2^n p(r) with |rel err| < 2e-7; 0 below -87.
inline vf fast_exp(vf x) {
  const vf big = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf xc = x < splat(-87.0f) ? splat(-87.0f) : x;
  const vf t = xc * splat(1.44269504088896341f) + big;
  const vf n = t - big;
  vf r = xc - n * splat(0.693145751953125f);  // ln 2 split in a high and a low part
  r = r - n * splat(1.428606765330187045e-06f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  vi ti, bi;
  std::memcpy(&ti, &t, sizeof(ti));
  std::memcpy(&bi, &big, sizeof(bi));
  const vi bits = (ti - bi + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const vf e = p * scale;
  return x < splat(-87.0f) ? vf{} : e;
}

// logits of one query against key columns [c * L, c * L + L) of one key row.
template <int DK>
inline vf chunk_logits(const float* qs, const float* k, int64_t plane, int64_t c, vf base, int dk) {
  const int d_count = DK > 0 ? DK : dk;
  vf acc = base;
  for (int d = 0; d < d_count; ++d) acc += splat(qs[d]) * load(k + d * plane + c);
  return acc;
}

// Row of a (2L-1)-row relative table holding offset key - query, clipped to +-(L-1).
inline int table_row(int offset, int L) {
  const int o = offset < -(L - 1) ? -(L - 1) : (offset > L - 1 ? L - 1 : offset);
  return o + L - 1;
}

// Per-query setup shared by forward and backward: the query (qu unscaled, qs scaled), its scaled
// relative logits q_i . r^H[y - y_i] (rhs, H values) and q_i . r^W[x - x_i] (rws, padded to Wp with
// -1e30 so that padded key columns get probability 0).
inline void query_setup(const AttentionSlice& a, int64_t i, float* qu, float* qs, float* rhs, float* rws) {
  for (int d = 0; d < a.dk; ++d) {
    qu[d] = a.q[d * a.HW + i];
    qs[d] = qu[d] * a.scale;
  }
  if (a.rel_h != nullptr) {
    const int yi = static_cast<int>(i / a.W), xi = static_cast<int>(i % a.W);
    for (int y = 0; y < a.H; ++y) {
      const float* r = a.rel_h + static_cast<int64_t>(table_row(y - yi, a.Lh)) * a.dk;
      float s = 0.0f;
      for (int d = 0; d < a.dk; ++d) s += qs[d] * r[d];
      rhs[y] = s;
    }
    for (int x = 0; x < a.W; ++x) {
      const float* r = a.rel_w + static_cast<int64_t>(table_row(x - xi, a.Lw)) * a.dk;
      float s = 0.0f;
      for (int d = 0; d < a.dk; ++d) s += qs[d] * r[d];
      rws[x] = s;
    }
  } else {
    for (int y = 0; y < a.H; ++y) rhs[y] = 0.0f;
    for (int x = 0; x < a.W; ++x) rws[x] = 0.0f;
  }
  for (int x = a.W; x < a.Wp; ++x) rws[x] = -1.0e30f;
}

template <int DK>
void forward_rows(const AttentionSlice& a, int64_t i0, int64_t i1, float* __restrict out,
                  float* __restrict lse, float* __restrict work) {
  const int H = a.H, Wp = a.Wp, dk = a.dk, dv = a.dv;
  const int64_t plane = static_cast<int64_t>(H) * Wp;
  float* s = work;               // Wp
  float* rws = work + Wp;        // Wp
  float* rhs = work + 2 * Wp;    // H
  float qu[kMaxWidth], qs[kMaxWidth];
  vf acc[kMaxWidth];
  for (int64_t i = i0; i < i1; ++i) {
    query_setup(a, i, qu, qs, rhs, rws);
    float m = -3.0e38f;
    vf l = vf{};
    for (int c = 0; c < dv; ++c) acc[c] = vf{};
    for (int y = 0; y < H; ++y) {
      const int64_t row = static_cast<int64_t>(y) * Wp;
      const vf base = splat(rhs[y]);
      vf mx = splat(-3.0e38f);
      for (int c = 0; c < Wp; c += L) {
        const vf sc = chunk_logits<DK>(qs, a.kT + row, plane, c, base + load(rws + c), dk);
        store(s + c, sc);
        mx = sc > mx ? sc : mx;
      }
      const float row_max = hmax(mx);
      if (row_max > m) {
        const vf shrink = splat(__builtin_expf(m - row_max));
        l *= shrink;
        for (int ch = 0; ch < dv; ++ch) acc[ch] *= shrink;
        m = row_max;
      }
      const vf mv = splat(m);
      for (int c = 0; c < Wp; c += L) {
        const vf p = fast_exp(load(s + c) - mv);
        l += p;
        for (int ch = 0; ch < dv; ++ch) acc[ch] += p * load(a.vT + ch * plane + row + c);
      }
    }
    const float total = hsum(l);
    for (int ch = 0; ch < dv; ++ch) out[ch * a.HW + i] = hsum(acc[ch]) / total;
    lse[i] = m + __builtin_logf(total);
  }
}

// Backward of QB consecutive queries [i, i + QB): each key chunk (k, v and their gradients) is
// loaded once for the block, and dk, dv are accumulated in registers over the block. The gradients
// of the relative logits of each query (drh: H values, drw: W values) then reach q and the tables.
template <int DK, int DV, int QB>
void backward_block(const AttentionSlice& a, const AttentionGrads& g, int64_t i, float* __restrict work) {
  const int H = a.H, W = a.W, Wp = a.Wp, dk = a.dk, dv = DV > 0 ? DV : a.dv;
  const int d_count = DK > 0 ? DK : dk;
  const int64_t plane = static_cast<int64_t>(H) * Wp, HW = a.HW;
  float* drw_acc = work;                 // QB * Wp
  float* rws = work + QB * Wp;           // QB * Wp
  float* rhs = work + 2 * QB * Wp;       // QB * H
  float* drh = rhs + QB * H;             // QB * H
  float qu[QB][kMaxWidth], qs[QB][kMaxWidth], go[QB][kMaxWidth];
  vf dq[QB][kMaxWidth];
  vf kc[kMaxWidth], dkc[kMaxWidth], vc[kMaxWidth], dvc[kMaxWidth];
  const vf scale = splat(a.scale);
  vf delta[QB];
  for (int b = 0; b < QB; ++b) {
    query_setup(a, i + b, qu[b], qs[b], rhs + b * H, rws + b * Wp);
    for (int d = 0; d < dk; ++d) dq[b][d] = vf{};
    float dl = 0.0f;
    for (int ch = 0; ch < dv; ++ch) {
      go[b][ch] = g.dout[ch * HW + i + b];
      dl += go[b][ch] * g.out[ch * HW + i + b];
    }
    delta[b] = splat(dl);
  }
  for (int x = 0; x < QB * Wp; ++x) drw_acc[x] = 0.0f;
  for (int y = 0; y < H; ++y) {
    const int64_t row = static_cast<int64_t>(y) * Wp;
    vf base[QB], row_sum[QB];
    for (int b = 0; b < QB; ++b) {
      base[b] = splat(rhs[b * H + y] - g.lse[i + b]);
      row_sum[b] = vf{};
    }
    for (int c = 0; c < Wp; c += L) {
      for (int d = 0; d < d_count; ++d) {
        kc[d] = load(a.kT + d * plane + row + c);
        dkc[d] = vf{};
      }
      for (int ch = 0; ch < dv; ++ch) {
        vc[ch] = load(a.vT + ch * plane + row + c);
        dvc[ch] = vf{};
      }
      for (int b = 0; b < QB; ++b) {
        vf logit = base[b] + load(rws + b * Wp + c);
        for (int d = 0; d < d_count; ++d) logit += splat(qs[b][d]) * kc[d];
        const vf p = fast_exp(logit);
        vf dp = vf{};
        for (int ch = 0; ch < dv; ++ch) {
          dp += splat(go[b][ch]) * vc[ch];
          dvc[ch] += p * splat(go[b][ch]);
        }
        const vf ds = p * (dp - delta[b]) * scale;
        row_sum[b] += ds;
        store(drw_acc + b * Wp + c, load(drw_acc + b * Wp + c) + ds);
        for (int d = 0; d < d_count; ++d) {
          dq[b][d] += ds * kc[d];
          dkc[d] += ds * splat(qu[b][d]);
        }
      }
      for (int d = 0; d < d_count; ++d) {
        float* at = g.dkT + d * plane + row + c;
        store(at, load(at) + dkc[d]);
      }
      for (int ch = 0; ch < dv; ++ch) {
        float* at = g.dvT + ch * plane + row + c;
        store(at, load(at) + dvc[ch]);
      }
    }
    for (int b = 0; b < QB; ++b) drh[b * H + y] = hsum(row_sum[b]);
  }
  for (int b = 0; b < QB; ++b) {
    float dqs[kMaxWidth];
    for (int d = 0; d < dk; ++d) dqs[d] = hsum(dq[b][d]);
    if (a.rel_h != nullptr) {
      const int yi = static_cast<int>((i + b) / W), xi = static_cast<int>((i + b) % W);
      for (int y = 0; y < H; ++y) {
        const float gy = drh[b * H + y];
        const int64_t r = static_cast<int64_t>(table_row(y - yi, a.Lh)) * dk;
        for (int d = 0; d < dk; ++d) {
          dqs[d] += gy * a.rel_h[r + d];
          g.drel_h[r + d] += gy * qu[b][d];
        }
      }
      for (int x = 0; x < W; ++x) {
        const float gx = drw_acc[b * Wp + x];
        const int64_t r = static_cast<int64_t>(table_row(x - xi, a.Lw)) * dk;
        for (int d = 0; d < dk; ++d) {
          dqs[d] += gx * a.rel_w[r + d];
          g.drel_w[r + d] += gx * qu[b][d];
        }
      }
    }
    for (int d = 0; d < dk; ++d) g.dq[d * HW + i + b] = dqs[d];
  }
}

template <int DK, int DV>
void backward_rows_dv(const AttentionSlice& a, const AttentionGrads& g, int64_t i0, int64_t i1,
                      float* __restrict work) {
  int64_t i = i0;
  for (; i + kQueryBlock <= i1; i += kQueryBlock) backward_block<DK, DV, kQueryBlock>(a, g, i, work);
  for (; i < i1; ++i) backward_block<DK, DV, 1>(a, g, i, work);
}

// Value widths with their own unrolled code; others take the generic loop.
template <int DK>
void backward_rows(const AttentionSlice& a, const AttentionGrads& g, int64_t i0, int64_t i1,
                   float* __restrict work) {
  switch (a.dv) {
    case 2:
      return backward_rows_dv<DK, 2>(a, g, i0, i1, work);
    case 3:
      return backward_rows_dv<DK, 3>(a, g, i0, i1, work);
    case 6:
      return backward_rows_dv<DK, 6>(a, g, i0, i1, work);
    default:
      return backward_rows_dv<DK, 0>(a, g, i0, i1, work);
  }
}

}  // namespace

void exp_inplace(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + L <= n; i += L) store(x + i, fast_exp(load(x + i)));
  for (; i < n; ++i) x[i] = __builtin_expf(x[i]);
}

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
