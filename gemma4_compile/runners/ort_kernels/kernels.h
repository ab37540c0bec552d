// What the library's kernels share: the MoE routing of ops/moe/body.py, the experts' GLU, exp and dot products, and
// the ops' declarations
// (register.cc registers them; one .cc file per op holds its Compute).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <vector>

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && !defined(GEMMA4_PORTABLE)
#include <immintrin.h>
#define GEMMA4_AVX512 1
#endif

namespace gemma4_ort {

#ifdef GEMMA4_AVX512
// exp(x) in 16 lanes: Cephes' expf (range reduction by ln 2, degree-5 polynomial; ~1 ulp), scaled by 2^n with
// scalef, so it is inf where it overflows and 0 where it underflows.
inline __m512 Exp(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), ln2_hi = _mm512_set1_ps(0.693359375f),
               ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  const float poly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                        4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(k, ln2_lo, _mm512_fnmadd_ps(k, ln2_hi, x));
  __m512 y = _mm512_set1_ps(poly[0]);
  for (int j = 1; j < 6; ++j) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(poly[j]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, k);
}
#endif

// GELU-tanh(gate) * up over n elements. GELU-tanh(g) = 0.5 g (1 + tanh(u)) = g / (1 + exp(-2u)), u =
// sqrt(2/pi) (g + 0.044715 g^3): the second form has no cancellation for negative u (exp's inf there makes the
// quotient -0 or 0).
inline void Glu(const float* gate, const float* up, float* out, int64_t n) {
  constexpr float c = 0.7978845608028654f, a = 0.044715f;  // sqrt(2 / pi), the cubic term's weight
  int64_t i = 0;
#ifdef GEMMA4_AVX512
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(c), _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(a), g), _mm512_mul_ps(g, g), g));
    const __m512 e = Exp(_mm512_mul_ps(u, _mm512_set1_ps(-2.f)));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) {
    const float g = gate[i], u = c * (g + a * g * g * g);
    out[i] = g / (1.f + std::exp(-2.f * u)) * up[i];
  }
}

// Dot product with 16 independent partial sums: vectorizes without reassociating one sum.
inline float Dot(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 16;
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * b[i + j];
  }
  float sum = 0.f;
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// One token's routing, as the body's: softmax over all E logits, top-k (ties: the lower expert id first, as
// onnxruntime's TopK), renormalized over the k picked, times per_expert_scale. experts/weights: [K], routing order.
struct Router {
  std::vector<float> probs;
  std::vector<int64_t> order;

  explicit Router(int64_t E) : probs(E), order(E) {}

  void Route(const float* logits, const float* per_expert_scale, int64_t K, int64_t* experts, float* weights) {
    const int64_t E = static_cast<int64_t>(probs.size());
    const float peak = *std::max_element(logits, logits + E);
    float total = 0.f;
    for (int64_t e = 0; e < E; ++e) total += probs[e] = std::exp(logits[e] - peak);
    for (int64_t e = 0; e < E; ++e) probs[e] /= total;
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return probs[a] > probs[b]; });
    float picked = 0.f;
    for (int64_t k = 0; k < K; ++k) picked += probs[order[k]];
    for (int64_t k = 0; k < K; ++k) {
      experts[k] = order[k];
      weights[k] = probs[order[k]] / picked * per_expert_scale[order[k]];
    }
  }
};

using Floats = Ort::Custom::Tensor<float>;
using Bytes = Ort::Custom::Tensor<uint8_t>;
using Ints = Ort::Custom::Tensor<int64_t>;

// gemma4_ort::MoEStep (moe_step.cc): fp32 experts [E, 2I, H] and [E, H, I], calls of a few tokens.
struct MoEStep {
  MoEStep(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* context, const Floats& x, const Floats& router_logits,
                      const Floats& per_expert_scale, const Floats& gate_up, const Floats& down, Floats& y);
  int64_t top_k_ = 1;
};

// gemma4_ort::MoENBits (moe_nbits.cc): 4-bit experts in MatMulNBits' layout, any number of tokens.
struct MoENBits {
  MoENBits(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* context, const Floats& x, const Floats& router_logits,
                      const Floats& per_expert_scale, const Bytes& gate_up, const Floats& gate_up_scales,
                      const Bytes& down, const Floats& down_scales, Floats& y);
  int64_t top_k_ = 1, block_size_ = 32, accuracy_level_ = 0;
};

// gemma4_ort::SlidingWindowAttention (attention.cc): gemma4::SlidingWindowAttention in fp32, one node per layer.
// present_k / present_v are left out by layers that read another layer's cache (KV sharing).
struct SlidingWindowAttention {
  SlidingWindowAttention(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* context, const Floats& q, const Floats& k, const Floats& v,
                      const Floats& past_k, const Floats& past_v, const Ints& past_len, const Ints& seq_len,
                      std::optional<const Ints*> block_ids, Floats& out, std::optional<Floats*> present_k,
                      std::optional<Floats*> present_v);
  int64_t window_ = 0;
  float scale_ = 1.f;
};

// gemma4_ort::NormRopeAttention (attention.cc): the same attention reading projections as heads [B, S, H, D], each
// RMS-normed and rotated (q, and k / v where kv_raw) as the graph's norm / rotary nodes do; out [B, S, Hq, D].
struct NormRopeAttention {
  NormRopeAttention(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* context, const Floats& q, const Floats& k, const Floats& v,
                      const Floats& past_k, const Floats& past_v, const Ints& past_len, const Ints& seq_len,
                      const Floats& q_weight, const Floats& k_weight, const Floats& v_weight,
                      const Ints& position_ids, const Floats& cos, const Floats& sin,
                      std::optional<const Ints*> block_ids, Floats& out, std::optional<Floats*> present_k,
                      std::optional<Floats*> present_v);
  int64_t window_ = 0, kv_raw_ = 1;
  float scale_ = 1.f, epsilon_ = 1e-6f;
};

}  // namespace gemma4_ort
