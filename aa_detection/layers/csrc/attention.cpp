// Torch bindings of the fused relative attention kernel (aa_detection._C).
//
// The kernel itself (attention_impl.h) works on raw fp32 slices and is compiled once per
// instruction set; the best one the CPU supports is picked at run time.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "attention_kernel.h"

namespace aa_detection {
namespace {

using ForwardRows = void (*)(const AttentionSlice&, int64_t, int64_t, float*, float*, float*);
using BackwardRows = void (*)(const AttentionSlice&, const AttentionGrads&, int64_t, int64_t, float*);

using ExpInplace = void (*)(float*, int64_t);

struct Isa {
  const char* name;
  ForwardRows forward;
  BackwardRows backward;
  ExpInplace exp;
};

Isa pick_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma"))
    return {"avx512", isa_avx512::attention_forward_rows, isa_avx512::attention_backward_rows,
            isa_avx512::exp_inplace};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {"avx2", isa_avx2::attention_forward_rows, isa_avx2::attention_backward_rows, isa_avx2::exp_inplace};
#endif
  return {"default", isa_default::attention_forward_rows, isa_default::attention_backward_rows,
          isa_default::exp_inplace};
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

// Queries per parallel task.
constexpr int64_t kQueriesPerTask = 64;

void check_input(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
}

struct Shapes {
  int64_t B, Nh, HW, dk, dv;
  int H, W, Wp;
};

// (B, Nh, C, HW) -> (B, Nh, C, H, Wp): key rows padded with zeros to a multiple of kLanes.
torch::Tensor pad_rows(const torch::Tensor& t, const Shapes& s) {
  return torch::constant_pad_nd(t.view({s.B, s.Nh, t.size(2), s.H, s.W}), {0, s.Wp - s.W}).contiguous();
}

// Inverse of pad_rows for (..., C, H, Wp) gradients.
torch::Tensor unpad_rows(const torch::Tensor& t, const Shapes& s) {
  return t.narrow(-1, 0, s.W).reshape({s.B, s.Nh, t.size(-3), s.HW});
}

Shapes check_inputs(const torch::Tensor& q, const torch::Tensor& kT, const torch::Tensor& vT,
                    const torch::Tensor& rh, const torch::Tensor& rw, int64_t H, int64_t W) {
  check_input(q, "q", 4);
  check_input(kT, "kT", 4);
  check_input(vT, "vT", 4);
  check_input(rh, "rh", 4);
  check_input(rw, "rw", 4);
  const int Wp = static_cast<int>((W + kLanes - 1) / kLanes * kLanes);
  Shapes s{q.size(0), q.size(1), q.size(2), q.size(3), vT.size(2), static_cast<int>(H), static_cast<int>(W), Wp};
  TORCH_CHECK(H * W == s.HW, "q has ", s.HW, " queries, expected H * W = ", H * W);
  TORCH_CHECK(s.dk >= 1 && s.dk <= kMaxWidth && s.dv >= 1 && s.dv <= kMaxWidth,
              "head widths must lie in [1, ", kMaxWidth, "], got dkh=", s.dk, " dvh=", s.dv);
  TORCH_CHECK(kT.sizes() == torch::IntArrayRef({s.B, s.Nh, s.dk, s.HW}), "kT must be (B, Nh, dkh, HW)");
  TORCH_CHECK(vT.size(0) == s.B && vT.size(1) == s.Nh && vT.size(3) == s.HW, "vT must be (B, Nh, dvh, HW)");
  TORCH_CHECK(rh.sizes() == torch::IntArrayRef({s.B, s.Nh, s.HW, H}), "rh must be (B, Nh, HW, H)");
  TORCH_CHECK(rw.sizes() == torch::IntArrayRef({s.B, s.Nh, s.HW, W}), "rw must be (B, Nh, HW, W)");
  return s;
}

// kT, vT: padded by pad_rows.
AttentionSlice slice(const Shapes& s, int64_t bh, const torch::Tensor& q, const torch::Tensor& kT,
                     const torch::Tensor& vT, const torch::Tensor& rh, const torch::Tensor& rw, double scale) {
  const int64_t padded = static_cast<int64_t>(s.H) * s.Wp;
  return {q.data_ptr<float>() + bh * s.HW * s.dk,
          kT.data_ptr<float>() + bh * padded * s.dk,
          vT.data_ptr<float>() + bh * padded * s.dv,
          rh.data_ptr<float>() + bh * s.HW * s.H,
          rw.data_ptr<float>() + bh * s.HW * s.W,
          s.H,
          s.W,
          s.Wp,
          static_cast<int>(s.dk),
          static_cast<int>(s.dv),
          static_cast<float>(scale)};
}

// Returns out (B, Nh, HW, dvh) and the log-sum-exp of each query's logits (B, Nh, HW).
std::vector<torch::Tensor> attention_forward(const torch::Tensor& q, const torch::Tensor& kT,
                                             const torch::Tensor& vT, const torch::Tensor& rh,
                                             const torch::Tensor& rw, int64_t H, int64_t W, double scale) {
  const Shapes s = check_inputs(q, kT, vT, rh, rw, H, W);
  const auto kTp = pad_rows(kT, s), vTp = pad_rows(vT, s);
  auto out = torch::empty({s.B, s.Nh, s.HW, s.dv}, q.options());
  auto lse = torch::empty({s.B, s.Nh, s.HW}, q.options());
  const int64_t blocks = (s.HW + kQueriesPerTask - 1) / kQueriesPerTask;
  const ForwardRows forward = isa().forward;
  at::parallel_for(0, s.B * s.Nh * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> work(kScratchRows * s.Wp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, i0 = (task % blocks) * kQueriesPerTask;
      const int64_t i1 = std::min(i0 + kQueriesPerTask, s.HW);
      forward(slice(s, bh, q, kTp, vTp, rh, rw, scale), i0, i1, out.data_ptr<float>() + bh * s.HW * s.dv,
              lse.data_ptr<float>() + bh * s.HW, work.data());
    }
  });
  return {out, lse};
}

// Flash-attention style backward: recomputes the probabilities from the saved log-sum-exp.
// Returns dq (B, Nh, HW, dkh), dkT (B, Nh, dkh, HW), dvT (B, Nh, dvh, HW), drh, drw.
std::vector<torch::Tensor> attention_backward(const torch::Tensor& dout, const torch::Tensor& q,
                                              const torch::Tensor& kT, const torch::Tensor& vT,
                                              const torch::Tensor& rh, const torch::Tensor& rw,
                                              const torch::Tensor& out, const torch::Tensor& lse, int64_t H,
                                              int64_t W, double scale) {
  const Shapes s = check_inputs(q, kT, vT, rh, rw, H, W);
  check_input(dout, "dout", 4);
  check_input(out, "out", 4);
  check_input(lse, "lse", 3);
  TORCH_CHECK(dout.sizes() == out.sizes() && out.sizes() == torch::IntArrayRef({s.B, s.Nh, s.HW, s.dv}),
              "dout and out must be (B, Nh, HW, dvh)");
  const auto delta = (dout * out).sum(-1).contiguous();
  const auto kTp = pad_rows(kT, s), vTp = pad_rows(vT, s);
  // Keys are shared by all queries: each group of query rows accumulates its own dk, dv copy, summed
  // afterwards. One group per (batch, head) when there are enough of them to keep the threads busy.
  const int64_t BH = s.B * s.Nh;
  const int64_t threads = at::get_num_threads();
  const int64_t groups = std::min<int64_t>(std::max<int64_t>(1, (2 * threads + BH - 1) / BH),
                                           (s.HW + kQueriesPerTask - 1) / kQueriesPerTask);
  const int64_t rows_per_group = (s.HW + groups - 1) / groups;
  auto dq = torch::empty_like(q);
  auto dkT = torch::zeros({groups, s.B, s.Nh, s.dk, s.H, s.Wp}, q.options());
  auto dvT = torch::zeros({groups, s.B, s.Nh, s.dv, s.H, s.Wp}, q.options());
  auto drh = torch::empty_like(rh);
  auto drw = torch::empty_like(rw);
  const BackwardRows backward = isa().backward;
  at::parallel_for(0, BH * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> work(kScratchRows * s.Wp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / groups, group = task % groups;
      const int64_t i0 = group * rows_per_group, i1 = std::min(i0 + rows_per_group, s.HW);
      if (i0 >= i1) continue;
      const int64_t key_offset = (group * BH + bh) * s.H * s.Wp;
      const AttentionGrads g{dout.data_ptr<float>() + bh * s.HW * s.dv,
                             lse.data_ptr<float>() + bh * s.HW,
                             delta.data_ptr<float>() + bh * s.HW,
                             dq.data_ptr<float>() + bh * s.HW * s.dk,
                             dkT.data_ptr<float>() + key_offset * s.dk,
                             dvT.data_ptr<float>() + key_offset * s.dv,
                             drh.data_ptr<float>() + bh * s.HW * s.H,
                             drw.data_ptr<float>() + bh * s.HW * s.W};
      backward(slice(s, bh, q, kTp, vTp, rh, rw, scale), g, i0, i1, work.data());
    }
  });
  return {dq, unpad_rows(groups == 1 ? dkT[0] : dkT.sum(0), s), unpad_rows(groups == 1 ? dvT[0] : dvT.sum(0), s),
          drh, drw};
}

// The kernel's exp in place (|rel err| < 2e-7 for x <= 88; 0 below -87), over the intra-op threads:
// the benchmark measures the machine's exp rate with it as well as with torch.exp.
void fast_exp_(torch::Tensor x) {
  check_input(x, "x", x.dim());
  float* data = x.data_ptr<float>();
  const ExpInplace exp = isa().exp;
  at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t begin, int64_t end) { exp(data + begin, end - begin); });
}

}  // namespace
}  // namespace aa_detection

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU kernel of 2D relative multi-head attention (never stores the HW x HW logits)";
  m.def("attention_forward", &aa_detection::attention_forward, "relative attention forward (out, lse)");
  m.def("attention_backward", &aa_detection::attention_backward,
        "relative attention backward (dq, dkT, dvT, drh, drw)");
  m.def("fast_exp_", &aa_detection::fast_exp_, "the kernel's exp, in place (x <= 88)");
  m.def("kernel_isa", [] { return std::string(aa_detection::isa().name); },
        "instruction set of the kernel picked for this CPU");
}
