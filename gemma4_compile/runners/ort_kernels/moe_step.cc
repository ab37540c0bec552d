// gemma4_ort::MoEStep: the routed experts of gemma4::MoE for a few tokens, read in place from the stacked weights.
//
// Semantics are ops/moe/body.py BODY_GATHER's (the one-token branch of the export's body): softmax over all E
// router logits, top-k (ties: the lower expert id first, as onnxruntime's TopK), renormalized, times
// per_expert_scale; each picked expert's GELU-tanh(gate) * up, then down; the K weighted rows summed in routing
// order, in fp32. The body gathers the K experts' weights into a scratch copy before one batched matmul; this
// reads each picked expert's rows where they are, so a decode step streams its experts' bytes once.
//
// Inputs: x [T, H], router_logits [T, E], per_expert_scale [E] (fp32), gate_up [E, 2I, H], down [E, H, I].
// Attribute: top_k. Output: y [T, H]. Rows are split over onnxruntime's intra-op threads.

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace gemma4_ort {
namespace {

constexpr int64_t kRowsPerTask = 32;

// For each picked expert k: out[k][r] = w_k[r, :] . v_k for the rows of a row-major [rows, cols] matrix per expert.
// One ParallelFor covers all K experts' rows, so a layer synchronizes the threads twice, not 2K times.
struct Gemv {
  std::vector<const float*> w, v;  // per picked expert: its matrix, its input vector
  std::vector<float*> out;
  int64_t rows, cols, blocks_per_expert;
};

void GemvTask(void* data, size_t task) {
  auto* g = static_cast<Gemv*>(data);
  const int64_t k = static_cast<int64_t>(task) / g->blocks_per_expert;
  const int64_t begin = (static_cast<int64_t>(task) % g->blocks_per_expert) * kRowsPerTask;
  const int64_t end = std::min(begin + kRowsPerTask, g->rows);
  const float* w = g->w[k];
  for (int64_t r = begin; r < end; ++r) g->out[k][r] = Dot(w + r * g->cols, g->v[k], g->cols);
}

void RunGemv(Ort::KernelContext& ctx, Gemv& g) {
  g.blocks_per_expert = (g.rows + kRowsPerTask - 1) / kRowsPerTask;
  ctx.ParallelFor(GemvTask, static_cast<size_t>(g.blocks_per_expert * g.w.size()), 0, &g);
}

}  // namespace

MoEStep::MoEStep(const OrtApi*, const OrtKernelInfo* info) {
  top_k_ = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("top_k");
}

Ort::Status MoEStep::Compute(OrtKernelContext* context, const Floats& x, const Floats& router_logits,
                             const Floats& per_expert_scale, const Floats& gate_up, const Floats& down, Floats& y) {
  const auto& xs = x.Shape();
  const auto& gs = gate_up.Shape();
  const auto& ds = down.Shape();
  if (xs.size() != 2 || gs.size() != 3 || ds.size() != 3) {
    return Ort::Status("MoEStep: x must be [T, H], gate_up [E, 2I, H], down [E, H, I]", ORT_INVALID_ARGUMENT);
  }
  const int64_t T = xs[0], H = xs[1], E = gs[0], I2 = gs[1], I = I2 / 2;
  if (gs[2] != H || ds[0] != E || ds[1] != H || ds[2] != I || I2 != 2 * I ||
      router_logits.Shape() != std::vector<int64_t>{T, E} || per_expert_scale.NumberOfElement() != E ||
      top_k_ < 1 || top_k_ > E) {
    return Ort::Status("MoEStep: inconsistent shapes or top_k", ORT_INVALID_ARGUMENT);
  }
  Ort::KernelContext ctx(context);
  const float* xd = x.Data();
  const float* gu = gate_up.Data();
  const float* dn = down.Data();
  float* out = y.Allocate({T, H});

  const int64_t K = top_k_;
  Router router(E);
  std::vector<float> h(K * I2), act(K * I), rows(K * H), weight(K);
  std::vector<int64_t> experts(K);
  Gemv up{std::vector<const float*>(K), std::vector<const float*>(K), std::vector<float*>(K), I2, H, 0};
  Gemv back{std::vector<const float*>(K), std::vector<const float*>(K), std::vector<float*>(K), H, I, 0};
  for (int64_t t = 0; t < T; ++t) {
    router.Route(router_logits.Data() + t * E, per_expert_scale.Data(), K, experts.data(), weight.data());
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = experts[k];
      up.w[k] = gu + e * I2 * H, up.v[k] = xd + t * H, up.out[k] = h.data() + k * I2;
      back.w[k] = dn + e * H * I, back.v[k] = act.data() + k * I, back.out[k] = rows.data() + k * H;
    }
    RunGemv(ctx, up);
    for (int64_t k = 0; k < K; ++k) {
      Glu(h.data() + k * I2, h.data() + k * I2 + I, act.data() + k * I, I);
    }
    RunGemv(ctx, back);
    float* yt = out + t * H;
    std::fill(yt, yt + H, 0.f);
    for (int64_t k = 0; k < K; ++k) {  // routing order, as the body's sum over K
      for (int64_t j = 0; j < H; ++j) yt[j] += rows[k * H + j] * weight[k];
    }
  }
  return Ort::Status{nullptr};
}

}  // namespace gemma4_ort
