// Torch bindings of the fused relative attention kernel (aa_detection._C).
//
// The kernel itself (attention_impl.h) works on raw fp32 slices and is compiled once per
// instruction set; the best one the CPU supports is picked at run time.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <tuple>
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

// The instruction sets this CPU runs, best first.
std::vector<Isa> supported_isas() {
  std::vector<Isa> isas;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma"))
    isas.push_back({"avx512", isa_avx512::attention_forward_rows, isa_avx512::attention_backward_rows,
                    isa_avx512::exp_inplace});
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    isas.push_back({"avx2", isa_avx2::attention_forward_rows, isa_avx2::attention_backward_rows,
                    isa_avx2::exp_inplace});
#endif
  isas.push_back({"default", isa_default::attention_forward_rows, isa_default::attention_backward_rows,
                  isa_default::exp_inplace});
  return isas;
}

// The one in use: the best, unless set_kernel_isa chose another (between calls, not during one).
Isa& current_isa() {
  static Isa chosen = supported_isas().front();
  return chosen;
}

const Isa& isa() { return current_isa(); }

std::vector<std::string> kernel_isas() {
  std::vector<std::string> names;
  for (const Isa& candidate : supported_isas()) names.emplace_back(candidate.name);
  return names;
}

void set_kernel_isa(const std::string& name) {
  for (const Isa& candidate : supported_isas()) {
    if (name == candidate.name) {
      current_isa() = candidate;
      return;
    }
  }
  std::string names;
  for (const std::string& supported : kernel_isas()) names += (names.empty() ? "" : ", ") + supported;
  TORCH_CHECK_VALUE(false, "kernel instruction set '", name, "' does not run on this CPU; it runs ", names);
}

// A slice of HW queries is split into at most ceil(HW / kQueriesPerTask) parallel tasks (query_splits).
constexpr int64_t kQueriesPerTask = 64;

// Runs fn(task, work) for task in [0, tasks) on the intra-op threads, each thread taking the next
// task when it is done with one (not a fixed share: on a CPU shared with other processes a thread
// that loses its core for a while then delays nobody), with its own scratch of `scratch` floats.
template <typename Fn>
void parallel_tasks(int64_t tasks, int64_t scratch, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> work(scratch);
    for (int64_t task = next.fetch_add(1); task < tasks; task = next.fetch_add(1)) fn(task, work.data());
  });
}

void check_input(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
}

// Shapes of one call. qkv is (B, 2 dk + dv, H, W), as the qkv 1x1 convolution writes it: channel
// n * dkh + d of the first dk channels is query dimension d of head n, then the keys, then the values.
struct Shapes {
  int64_t B, Nh, C, HW, dk, dv, dkh, dvh;
  int H, W, Wp, Lh, Lw;
  bool relative;
};

Shapes check_inputs(const torch::Tensor& qkv, const torch::Tensor& rel_h, const torch::Tensor& rel_w,
                    int64_t num_heads, int64_t dk, int64_t dv) {
  check_input(qkv, "qkv", 4);
  TORCH_CHECK(num_heads >= 1 && dk % num_heads == 0 && dv % num_heads == 0 && dk > 0 && dv > 0,
              "dk=", dk, " and dv=", dv, " must be positive multiples of num_heads=", num_heads);
  TORCH_CHECK(qkv.size(1) == 2 * dk + dv, "qkv has ", qkv.size(1), " channels, expected 2 dk + dv = ", 2 * dk + dv);
  Shapes s;
  s.B = qkv.size(0);
  s.Nh = num_heads;
  s.C = qkv.size(1);
  s.H = static_cast<int>(qkv.size(2));
  s.W = static_cast<int>(qkv.size(3));
  s.HW = static_cast<int64_t>(s.H) * s.W;
  s.dk = dk;
  s.dv = dv;
  s.dkh = dk / num_heads;
  s.dvh = dv / num_heads;
  s.Wp = static_cast<int>((s.W + kLanes - 1) / kLanes * kLanes);
  TORCH_CHECK(s.dkh <= kMaxWidth && s.dvh <= kMaxWidth, "head widths must lie in [1, ", kMaxWidth,
              "], got dkh=", s.dkh, " dvh=", s.dvh);
  s.relative = rel_h.numel() > 0;
  TORCH_CHECK(s.relative == (rel_w.numel() > 0), "rel_h and rel_w must be given together");
  s.Lh = s.Lw = 1;
  if (s.relative) {
    check_input(rel_h, "rel_h", 2);
    check_input(rel_w, "rel_w", 2);
    TORCH_CHECK(rel_h.size(1) == s.dkh && rel_w.size(1) == s.dkh, "rel_h and rel_w must have width dkh=", s.dkh);
    TORCH_CHECK(rel_h.size(0) % 2 == 1 && rel_w.size(0) % 2 == 1, "relative tables must have 2L-1 rows");
    s.Lh = static_cast<int>((rel_h.size(0) + 1) / 2);
    s.Lw = static_cast<int>((rel_w.size(0) + 1) / 2);
  }
  return s;
}

// Copies the keys and values of slice bh of qkv into dst, (dkh + dvh, H, Wp), their rows zero-padded to Wp.
// Each task copies the slice it works on (a small share of its work: the task's queries each visit
// all of these keys), so the call needs no separate padding pass over the whole tensor.
void copy_padded_slice(const Shapes& s, const torch::Tensor& qkv, int64_t bh, float* dst) {
  const int64_t b = bh / s.Nh, n = bh % s.Nh;
  const float* base = qkv.data_ptr<float>() + b * s.C * s.HW;
  const int64_t rows = (s.dkh + s.dvh) * s.H;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t channel = r / s.H, y = r % s.H;
    const int64_t source = channel < s.dkh ? s.dk + n * s.dkh + channel : 2 * s.dk + n * s.dvh + (channel - s.dkh);
    std::memcpy(dst + r * s.Wp, base + source * s.HW + y * s.W, s.W * sizeof(float));
    std::memset(dst + r * s.Wp + s.W, 0, (s.Wp - s.W) * sizeof(float));
  }
}

// Splits of each (batch, head) slice's queries into tasks: about kTasksPerThread tasks per thread, so
// that the threads share the work evenly even when one of them is slowed down.
constexpr int64_t kTasksPerThread = 16;
int64_t query_splits(const Shapes& s) {
  const int64_t BH = s.B * s.Nh, threads = at::get_num_threads();
  return std::min<int64_t>(std::max<int64_t>(1, (kTasksPerThread * threads + BH - 1) / BH),
                           (s.HW + kQueriesPerTask - 1) / kQueriesPerTask);
}

// kv: the slice's keys and values as copy_padded_slice writes them.
AttentionSlice slice(const Shapes& s, int64_t bh, const torch::Tensor& qkv, const float* kv,
                     const torch::Tensor& rel_h, const torch::Tensor& rel_w, double scale) {
  const int64_t b = bh / s.Nh, n = bh % s.Nh;
  const int64_t plane = static_cast<int64_t>(s.H) * s.Wp;
  return {qkv.data_ptr<float>() + (b * s.C + n * s.dkh) * s.HW,
          kv,
          kv + s.dkh * plane,
          s.relative ? rel_h.data_ptr<float>() : nullptr,
          s.relative ? rel_w.data_ptr<float>() : nullptr,
          s.HW,
          s.H,
          s.W,
          s.Wp,
          static_cast<int>(s.dkh),
          static_cast<int>(s.dvh),
          s.Lh,
          s.Lw,
          static_cast<float>(scale)};
}

// out (B, dv, H, W), channel n * dvh + c for value dimension c of head n (the layout of the attention
// branch's output projection input), and the log-sum-exp of each query's logits (B, Nh, HW).
std::tuple<torch::Tensor, torch::Tensor> attention_forward(const torch::Tensor& qkv, const torch::Tensor& rel_h,
                                                           const torch::Tensor& rel_w, int64_t num_heads,
                                                           int64_t dk, int64_t dv, double scale) {
  const Shapes s = check_inputs(qkv, rel_h, rel_w, num_heads, dk, dv);
  auto out = torch::empty({s.B, s.dv, s.H, s.W}, qkv.options());
  auto lse = torch::empty({s.B, s.Nh, s.HW}, qkv.options());
  const int64_t splits = query_splits(s), rows_per_split = (s.HW + splits - 1) / splits;
  const int64_t kv_floats = (s.dkh + s.dvh) * s.H * s.Wp;
  const ForwardRows forward = isa().forward;
  parallel_tasks(s.B * s.Nh * splits, kv_floats + kScratchRows * (s.Wp + s.H), [&](int64_t task, float* work) {
    const int64_t bh = task / splits, i0 = (task % splits) * rows_per_split;
    const int64_t i1 = std::min(i0 + rows_per_split, s.HW);
    if (i0 >= i1) return;
    copy_padded_slice(s, qkv, bh, work);
    forward(slice(s, bh, qkv, work, rel_h, rel_w, scale), i0, i1, out.data_ptr<float>() + bh * s.dvh * s.HW,
            lse.data_ptr<float>() + bh * s.HW, work + kv_floats);
  });
  return {out, lse};
}

// Flash-attention style backward: recomputes the probabilities from the saved log-sum-exp.
// Returns dqkv (B, 2 dk + dv, H, W), drel_h, drel_w (0-element tensors for content-only attention).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> attention_backward(
    const torch::Tensor& dout, const torch::Tensor& qkv, const torch::Tensor& rel_h, const torch::Tensor& rel_w,
    const torch::Tensor& out, const torch::Tensor& lse, int64_t num_heads, int64_t dk, int64_t dv, double scale) {
  const Shapes s = check_inputs(qkv, rel_h, rel_w, num_heads, dk, dv);
  check_input(dout, "dout", 4);
  check_input(out, "out", 4);
  check_input(lse, "lse", 3);
  TORCH_CHECK(dout.sizes() == out.sizes() && out.sizes() == torch::IntArrayRef({s.B, s.dv, s.H, s.W}),
              "dout and out must be (B, dv, H, W)");
  TORCH_CHECK(lse.sizes() == torch::IntArrayRef({s.B, s.Nh, s.HW}), "lse must be (B, Nh, HW)");
  // Keys are shared by all queries: each group of query rows accumulates its own dk, dv copy, summed
  // afterwards.
  const int64_t BH = s.B * s.Nh;
  const int64_t groups = query_splits(s);
  const int64_t kv_floats = (s.dkh + s.dvh) * s.H * s.Wp;
  const int64_t rows_per_group = (s.HW + groups - 1) / groups;
  const int64_t plane = static_cast<int64_t>(s.H) * s.Wp;
  auto dqkv = torch::empty_like(qkv);
  auto dkv = torch::zeros({groups, s.B, s.dk + s.dv, s.H, s.Wp}, qkv.options());
  // Table gradients: one copy per task, summed afterwards.
  const int64_t tasks = BH * groups;
  auto drel_h = s.relative ? torch::zeros({tasks, rel_h.size(0), s.dkh}, qkv.options()) : torch::Tensor();
  auto drel_w = s.relative ? torch::zeros({tasks, rel_w.size(0), s.dkh}, qkv.options()) : torch::Tensor();
  const BackwardRows backward = isa().backward;
  parallel_tasks(tasks, kv_floats + kScratchRows * (s.Wp + s.H), [&](int64_t task, float* work) {
      const int64_t bh = task / groups, group = task % groups;
      const int64_t b = bh / s.Nh, n = bh % s.Nh;
      const int64_t i0 = group * rows_per_group, i1 = std::min(i0 + rows_per_group, s.HW);
      if (i0 >= i1) return;
      float* dkv_b = dkv.data_ptr<float>() + (group * s.B + b) * (s.dk + s.dv) * plane;
      const AttentionGrads g{dout.data_ptr<float>() + bh * s.dvh * s.HW,
                             out.data_ptr<float>() + bh * s.dvh * s.HW,
                             lse.data_ptr<float>() + bh * s.HW,
                             dqkv.data_ptr<float>() + (b * s.C + n * s.dkh) * s.HW,
                             dkv_b + n * s.dkh * plane,
                             dkv_b + (s.dk + n * s.dvh) * plane,
                             s.relative ? drel_h.data_ptr<float>() + task * drel_h.size(1) * s.dkh : nullptr,
                             s.relative ? drel_w.data_ptr<float>() + task * drel_w.size(1) * s.dkh : nullptr};
      copy_padded_slice(s, qkv, bh, work);
      backward(slice(s, bh, qkv, work, rel_h, rel_w, scale), g, i0, i1, work + kv_floats);
  });
  const auto dkv_sum = groups == 1 ? dkv[0] : dkv.sum(0);
  dqkv.narrow(1, s.dk, s.dk + s.dv).copy_(dkv_sum.narrow(-1, 0, s.W));
  if (!s.relative) return {dqkv, torch::empty({0}, qkv.options()), torch::empty({0}, qkv.options())};
  return {dqkv, drel_h.sum(0), drel_w.sum(0)};
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

// Operators torch.ops.aa_detection.*, so TorchScript, torch.export and torch.compile see the kernel (their
// fake implementations and autograd are registered in Python, aa_detection/layers/kernel.py).
TORCH_LIBRARY(aa_detection, m) {
  // relative attention forward from the qkv convolution's output: (out (B, dv, H, W), lse (B, Nh, HW))
  m.def("attention_forward(Tensor qkv, Tensor rel_h, Tensor rel_w, int num_heads, int dk, int dv, float scale)"
        " -> (Tensor, Tensor)");
  // relative attention backward: (dqkv, drel_h, drel_w)
  m.def("attention_backward(Tensor dout, Tensor qkv, Tensor rel_h, Tensor rel_w, Tensor out, Tensor lse, "
        "int num_heads, int dk, int dv, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(aa_detection, CPU, m) {
  m.impl("attention_forward", &aa_detection::attention_forward);
  m.impl("attention_backward", &aa_detection::attention_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU kernel of 2D relative multi-head attention (never stores the HW x HW logits)";
  m.attr("max_head_width") = aa_detection::kMaxWidth;
  m.def("fast_exp_", &aa_detection::fast_exp_, "the kernel's exp, in place (x <= 88)");
  m.def("kernel_isa", [] { return std::string(aa_detection::isa().name); },
        "instruction set of the kernel in use (the best this CPU runs, unless set_kernel_isa chose another)");
  m.def("kernel_isas", &aa_detection::kernel_isas, "instruction sets of the kernel this CPU runs, best first");
  m.def("set_kernel_isa", &aa_detection::set_kernel_isa, "use the kernel compiled for this instruction set");
}
