// gemma4_ort::SlidingWindowAttention: gemma4::SlidingWindowAttention in fp32, as one node (and
// gemma4_ort::NormRopeAttention: the same with its heads' norms and rotary embeddings).
//
// Semantics are ops/attention/body.py's (the export's function body): the keys are the C ring slots, each holding
// the latest position == slot (mod C) before this call, then the S new tokens; query s (position past_len + s)
// sees a key that is valid (a filled slot, or a new token below seq_len), not after it (or, with block_ids, a new
// key of its own image block on a sliding layer) and, where window > 0, less than `window` positions back.
// softmax(q . key * scale) over the visible keys weighs the values; a query that sees no key gets the mean of all
// C + S values, as the body's softmax over equal -FLT_MAX scores does. The ring then takes the valid new tokens.
//
// The body runs as ~20 onnxruntime nodes per layer (masks, concatenations, two batched matmuls, a softmax over
// every slot, an If around the ring write), each a kernel launch and most of them split over the intra-op threads
// for a few microseconds of work: at one token per call that was a third of an int4 decode step (issue #18;
// benchmarks/RESULTS.md, ninth session). This walks only the visible keys, reads each key row once for the G query
// heads that share it, and splits over the threads only when a call has enough work to pay for it.
//
// Inputs: q [B, Hq, S, D], k / v [B, Hkv, S, D], past_k / past_v [B, Hkv, C, D] (fp32), past_len / seq_len [B],
// optional block_ids [B, S] (int64). Attributes: window (0: global), scale. Outputs: out [B, Hq, S, D], and
// present_k / present_v [B, Hkv, C, D] unless the node leaves them out.
//
// gemma4_ort::NormRopeAttention is the same attention with the nodes around it in the graph folded in
// (passes/ort_attention.py): q [B, S, Hq, D] and, where kv_raw, k / v [B, S, Hkv, D] come before their per-head
// RMSNorm (q_weight, k_weight, v_weight; epsilon) and before the rotary embedding of q and k (cos / sin rows
// [P, D / 2] at position_ids [B, S]); without kv_raw, k / v come ready, [B, Hkv, S, D]. out is [B, S, Hq, D].

#include <cfloat>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace gemma4_ort {
namespace {

constexpr int64_t kSerialWork = 1 << 18;  // multiply-adds below which one thread does the whole call
constexpr int64_t kQueriesPerTask = 4;

int64_t FloorMod(int64_t a, int64_t m) { return ((a % m) + m) % m; }  // ONNX Mod on integers: sign of m

struct Problem {
  const float *q, *k, *v, *past_k, *past_v;  // k, v: [B, Hkv, S, D]
  const int64_t *past_len, *seq_len, *block_ids;  // block_ids may be null
  float* out;
  int64_t B, Hq, Hkv, G, S, C, D, window, chunks;
  int64_t batch_stride, head_stride, step_stride;  // of q and out: [B, Hq, S, D] or [B, S, Hq, D]
  float scale;
};

// softmax-weighted values for the G query heads of one kv head at one query position.
struct Scratch {
  std::vector<const float*> keys, values;
  std::vector<float> scores;  // [G, n]
};

// Row pointers of the keys (and values) query s of batch row b sees, in the body's order (slots, then new).
int64_t VisibleKeys(const Problem& p, int64_t b, int64_t h, int64_t s, Scratch& w) {
  const int64_t past = p.past_len[b], q_pos = past + s, last = past - 1;
  const int64_t ring = (b * p.Hkv + h) * p.C * p.D, fresh = (b * p.Hkv + h) * p.S * p.D;
  auto in_window = [&](int64_t pos) { return p.window == 0 || pos > q_pos - p.window; };
  int64_t n = 0;
  // slot j holds last - ((last - j) mod C): last - r + j up to slot r = last mod C, C less after it
  const int64_t r = FloorMod(last, p.C);
  for (int64_t j = 0; j < p.C; ++j) {
    const int64_t pos = last - r + j - (j > r ? p.C : 0);  // <= last < q_pos: never after the query
    if (pos >= 0 && in_window(pos)) {
      w.keys[n] = p.past_k + ring + j * p.D, w.values[n++] = p.past_v + ring + j * p.D;
    }
  }
  const int64_t* blocks = p.block_ids ? p.block_ids + b * p.S : nullptr;
  const bool own_block = blocks && p.window > 0 && blocks[s] >= 0;  // image blocks see themselves on sliding layers
  for (int64_t t = 0; t < std::min<int64_t>(p.seq_len[b], p.S); ++t) {
    const bool seen = t <= s || (own_block && blocks[t] == blocks[s]);
    if (seen && in_window(past + t)) {
      w.keys[n] = p.k + fresh + t * p.D, w.values[n++] = p.v + fresh + t * p.D;
    }
  }
  return n;
}

constexpr int64_t kHeads = 8, kBlocks = 8;  // query heads per key pass, 16-float blocks of a row in registers

// scores[g * n + j] = q_g . key_j * scale for the G heads (q_g = q + g * head), each key row read once per pass.
void Scores(const float* q, int64_t head, int64_t G, const float* const* keys, int64_t n, int64_t D, float scale,
            float* scores) {
#ifdef GEMMA4_AVX512
  if (D % 16 == 0) {
    for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
      const int64_t heads = std::min(kHeads, G - g0);
      for (int64_t j = 0; j < n; ++j) {
        __m512 acc[kHeads];
        for (int64_t g = 0; g < heads; ++g) acc[g] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          const __m512 key = _mm512_loadu_ps(keys[j] + d);
          for (int64_t g = 0; g < heads; ++g) {
            acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (g0 + g) * head + d), key, acc[g]);
          }
        }
        for (int64_t g = 0; g < heads; ++g) scores[(g0 + g) * n + j] = _mm512_reduce_add_ps(acc[g]) * scale;
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t g = 0; g < G; ++g) scores[g * n + j] = Dot(q + g * head, keys[j], D) * scale;
  }
}

// out = sum_j weights[j] * value_j, up to kBlocks blocks of the row accumulated in registers per pass.
void WeightedSum(const float* weights, const float* const* values, int64_t n, int64_t D, float* out) {
#ifdef GEMMA4_AVX512
  if (D % 16 == 0) {
    for (int64_t d0 = 0; d0 < D; d0 += 16 * kBlocks) {
      const int64_t blocks = std::min(kBlocks, (D - d0) / 16);
      __m512 acc[kBlocks];
      for (int64_t c = 0; c < blocks; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        const __m512 weight = _mm512_set1_ps(weights[j]);
        for (int64_t c = 0; c < blocks; ++c) {
          acc[c] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(values[j] + d0 + 16 * c), acc[c]);
        }
      }
      for (int64_t c = 0; c < blocks; ++c) _mm512_storeu_ps(out + d0 + 16 * c, acc[c]);
    }
    return;
  }
#endif
  std::fill(out, out + D, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t d = 0; d < D; ++d) out[d] += weights[j] * values[j][d];
  }
}

// exp(x - peak) in place over n scores; returns their sum.
float ExpShifted(float* x, int64_t n, float peak) {
  int64_t i = 0;
  float total = 0.f;
#ifdef GEMMA4_AVX512
  const __m512 shift = _mm512_set1_ps(peak);
  __m512 sum = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = Exp(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift));
    _mm512_storeu_ps(x + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  total = _mm512_reduce_add_ps(sum);
#endif
  for (; i < n; ++i) total += x[i] = std::exp(x[i] - peak);
  return total;
}

void Attend(const Problem& p, int64_t b, int64_t h, int64_t s, Scratch& w) {
  const int64_t n = VisibleKeys(p, b, h, s, w), D = p.D;
  const int64_t at = b * p.batch_stride + h * p.G * p.head_stride + s * p.step_stride, head = p.head_stride;
  const float* q = p.q + at;  // head h * G + g is q + g * head
  float* out = p.out + at;
  if (n == 0) {  // nothing visible: the mean of every value the body's softmax would spread evenly over
    const int64_t ring = (b * p.Hkv + h) * p.C * D, fresh = (b * p.Hkv + h) * p.S * D;
    std::vector<float> mean(D, 0.f);
    for (int64_t j = 0; j < p.C; ++j)
      for (int64_t d = 0; d < D; ++d) mean[d] += p.past_v[ring + j * D + d];
    for (int64_t t = 0; t < p.S; ++t)
      for (int64_t d = 0; d < D; ++d) mean[d] += p.v[fresh + t * D + d];
    for (int64_t g = 0; g < p.G; ++g)
      for (int64_t d = 0; d < D; ++d) out[g * head + d] = mean[d] / static_cast<float>(p.C + p.S);
    return;
  }
  float* scores = w.scores.data();
  Scores(q, head, p.G, w.keys.data(), n, D, p.scale, scores);
  for (int64_t g = 0; g < p.G; ++g) {
    float* row = scores + g * n;
    const float total = ExpShifted(row, n, *std::max_element(row, row + n));
    for (int64_t j = 0; j < n; ++j) row[j] /= total;
    WeightedSum(row, w.values.data(), n, D, out + g * head);
  }
}

// Task t: batch row b, kv head h, and up to kQueriesPerTask query positions.
void AttendTask(void* data, size_t task) {
  const auto& p = *static_cast<const Problem*>(data);
  thread_local Scratch w;
  const int64_t keys = p.C + p.S;
  if (static_cast<int64_t>(w.keys.size()) < keys) w.keys.resize(keys), w.values.resize(keys);
  if (static_cast<int64_t>(w.scores.size()) < p.G * keys) w.scores.resize(p.G * keys);
  const int64_t t = static_cast<int64_t>(task), chunk = t % p.chunks, bh = t / p.chunks;
  const int64_t b = bh / p.Hkv, h = bh % p.Hkv;
  const int64_t end = std::min(p.S, (chunk + 1) * kQueriesPerTask);
  for (int64_t s = chunk * kQueriesPerTask; s < end; ++s) Attend(p, b, h, s, w);
}

// present = past with the valid new tokens written: slot j takes the latest position == j (mod C), if it is new,
// so the last min(seq_len, C) new tokens land at their position mod C. The runner may bind present to past's own
// buffer for one-token calls (runners/ort_binding.py): the attention above has read it by then.
void RingUpdate(const Problem& p, const float* past, const float* fresh, float* present) {
  if (present != past) std::memcpy(present, past, sizeof(float) * p.B * p.Hkv * p.C * p.D);  // else bound in place
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t valid = std::min<int64_t>(p.seq_len[b], p.S);
    for (int64_t t = std::max<int64_t>(0, valid - p.C); t < valid; ++t) {
      const int64_t j = FloorMod(p.past_len[b] + t, p.C);
      for (int64_t h = 0; h < p.Hkv; ++h) {
        std::memcpy(present + ((b * p.Hkv + h) * p.C + j) * p.D, fresh + ((b * p.Hkv + h) * p.S + t) * p.D,
                    sizeof(float) * p.D);
      }
    }
  }
}

// The attention of every query, on the intra-op threads when the call has enough work, then the caches.
void Run(OrtKernelContext* context, Problem& p, std::optional<Floats*> present_k, std::optional<Floats*> present_v,
         const std::vector<int64_t>& cache_shape) {
  p.G = p.Hq / p.Hkv;
  p.chunks = (p.S + kQueriesPerTask - 1) / kQueriesPerTask;
  const int64_t tasks = p.B * p.Hkv * p.chunks;
  const int64_t visible = p.window > 0 ? std::min(p.window, p.C + p.S) : p.C + p.S;
  if (p.B * p.Hq * p.S * visible * p.D * 2 < kSerialWork) {
    for (int64_t t = 0; t < tasks; ++t) AttendTask(&p, static_cast<size_t>(t));
  } else {
    Ort::KernelContext(context).ParallelFor(AttendTask, static_cast<size_t>(tasks), 0, &p);
  }
  if (present_k.has_value() && *present_k != nullptr) RingUpdate(p, p.past_k, p.k, (*present_k)->Allocate(cache_shape));
  if (present_v.has_value() && *present_v != nullptr) RingUpdate(p, p.past_v, p.v, (*present_v)->Allocate(cache_shape));
}

// out = RMSNorm(x) * weight (onnxruntime's SimplifiedLayerNormalization: fp32 statistics), then, with cos / sin,
// the rotary embedding of com.microsoft.RotaryEmbedding (non-interleaved: the two halves of the head rotate).
void NormRope(const float* x, const float* weight, float epsilon, const float* cos, const float* sin, int64_t D,
              float* out) {
  float mean_square = 0.f;
  for (int64_t d = 0; d < D; ++d) mean_square += x[d] * x[d];
  const float inverse = 1.f / std::sqrt(mean_square / static_cast<float>(D) + epsilon);
  if (cos == nullptr) {
    for (int64_t d = 0; d < D; ++d) out[d] = x[d] * inverse * weight[d];
    return;
  }
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = x[d] * inverse * weight[d], b = x[d + half] * inverse * weight[d + half];
    out[d] = a * cos[d] - b * sin[d];
    out[d + half] = b * cos[d] + a * sin[d];
  }
}

// Heads of raw projections x [B, S, H * D] normed (and rotated where cos is given) into out, laid out
// [B, S, H, D] (`heads_first` false) or [B, H, S, D].
void Prepare(const float* x, int64_t B, int64_t S, int64_t H, int64_t D, const float* weight, float epsilon,
             const int64_t* ids, const float* cos, const float* sin, bool heads_first, float* out) {
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t row = cos ? ids[b * S + s] : 0;
      for (int64_t h = 0; h < H; ++h) {
        float* to = out + (heads_first ? ((b * H + h) * S + s) * D : ((b * S + s) * H + h) * D);
        NormRope(x + ((b * S + s) * H + h) * D, weight, epsilon, cos ? cos + row * half : nullptr,
                 cos ? sin + row * half : nullptr, D, to);
      }
    }
  }
}

}  // namespace

SlidingWindowAttention::SlidingWindowAttention(const OrtApi*, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kernel(info);
  window_ = kernel.GetAttribute<int64_t>("window");
  scale_ = kernel.GetAttribute<float>("scale");
}

Ort::Status SlidingWindowAttention::Compute(OrtKernelContext* context, const Floats& q, const Floats& k,
                                            const Floats& v, const Floats& past_k, const Floats& past_v,
                                            const Ints& past_len, const Ints& seq_len,
                                            std::optional<const Ints*> block_ids, Floats& out,
                                            std::optional<Floats*> present_k, std::optional<Floats*> present_v) {
  const auto &qs = q.Shape(), &ks = k.Shape(), &ps = past_k.Shape();
  if (qs.size() != 4 || ks.size() != 4 || ps.size() != 4) {
    return Ort::Status("SlidingWindowAttention: q, k, v, past_k, past_v must be 4-D", ORT_INVALID_ARGUMENT);
  }
  const int64_t B = qs[0], Hq = qs[1], S = qs[2], D = qs[3], Hkv = ks[1], C = ps[2];
  const bool blocks = block_ids.has_value() && *block_ids != nullptr;
  if (Hkv < 1 || C < 1 || Hq % Hkv != 0 || ks != std::vector<int64_t>{B, Hkv, S, D} || v.Shape() != ks ||
      ps != std::vector<int64_t>{B, Hkv, C, D} || past_v.Shape() != ps || past_len.NumberOfElement() != B ||
      seq_len.NumberOfElement() != B || (blocks && (*block_ids)->NumberOfElement() != B * S) || window_ < 0) {
    return Ort::Status("SlidingWindowAttention: inconsistent shapes or window", ORT_INVALID_ARGUMENT);
  }
  Problem p{};
  p.q = q.Data(), p.k = k.Data(), p.v = v.Data(), p.past_k = past_k.Data(), p.past_v = past_v.Data();
  p.past_len = past_len.Data(), p.seq_len = seq_len.Data(), p.block_ids = blocks ? (*block_ids)->Data() : nullptr;
  p.out = out.Allocate(qs);
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.S = S, p.C = C, p.D = D, p.window = window_, p.scale = scale_;
  p.batch_stride = Hq * S * D, p.head_stride = S * D, p.step_stride = D;
  Run(context, p, present_k, present_v, ps);
  return Ort::Status{nullptr};
}

NormRopeAttention::NormRopeAttention(const OrtApi*, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo kernel(info);
  window_ = kernel.GetAttribute<int64_t>("window");
  scale_ = kernel.GetAttribute<float>("scale");
  epsilon_ = kernel.GetAttribute<float>("epsilon");
  kv_raw_ = kernel.GetAttribute<int64_t>("kv_raw");
}

Ort::Status NormRopeAttention::Compute(OrtKernelContext* context, const Floats& q, const Floats& k, const Floats& v,
                                       const Floats& past_k, const Floats& past_v, const Ints& past_len,
                                       const Ints& seq_len, const Floats& q_weight, const Floats& k_weight,
                                       const Floats& v_weight, const Ints& position_ids, const Floats& cos,
                                       const Floats& sin, std::optional<const Ints*> block_ids, Floats& out,
                                       std::optional<Floats*> present_k, std::optional<Floats*> present_v) {
  const auto &qs = q.Shape(), &ps = past_k.Shape(), &cs = cos.Shape();
  if (qs.size() != 4 || ps.size() != 4 || cs.size() != 2) {
    return Ort::Status("NormRopeAttention: q must be [B, S, Hq, D], past_k [B, Hkv, C, D], cos [P, D / 2]",
                       ORT_INVALID_ARGUMENT);
  }
  const int64_t B = qs[0], S = qs[1], Hq = qs[2], D = qs[3], Hkv = ps[1], C = ps[2], P = cs[0];
  const std::vector<int64_t> raw{B, S, Hkv, D}, ready{B, Hkv, S, D};
  const bool blocks = block_ids.has_value() && *block_ids != nullptr;
  const int64_t* ids = position_ids.Data();
  bool ids_ok = position_ids.NumberOfElement() == B * S;
  for (int64_t i = 0; ids_ok && i < B * S; ++i) ids_ok = ids[i] >= 0 && ids[i] < P;
  if (Hkv < 1 || C < 1 || Hq % Hkv != 0 || k.Shape() != (kv_raw_ ? raw : ready) || v.Shape() != k.Shape() ||
      ps != std::vector<int64_t>{B, Hkv, C, D} || past_v.Shape() != ps || past_len.NumberOfElement() != B ||
      seq_len.NumberOfElement() != B || (blocks && (*block_ids)->NumberOfElement() != B * S) || window_ < 0 ||
      q_weight.NumberOfElement() != D || k_weight.NumberOfElement() != D || v_weight.NumberOfElement() != D ||
      D % 2 || cs[1] * 2 != D || sin.Shape() != cs || !ids_ok) {
    return Ort::Status("NormRopeAttention: inconsistent shapes, window or position ids", ORT_INVALID_ARGUMENT);
  }
  std::vector<float> q_ready(B * S * Hq * D), k_ready(kv_raw_ ? B * S * Hkv * D : 0), v_ready(k_ready.size());
  Prepare(q.Data(), B, S, Hq, D, q_weight.Data(), epsilon_, ids, cos.Data(), sin.Data(), false, q_ready.data());
  Problem p{};
  p.q = q_ready.data(), p.k = k.Data(), p.v = v.Data(), p.past_k = past_k.Data(), p.past_v = past_v.Data();
  if (kv_raw_) {
    Prepare(k.Data(), B, S, Hkv, D, k_weight.Data(), epsilon_, ids, cos.Data(), sin.Data(), true, k_ready.data());
    Prepare(v.Data(), B, S, Hkv, D, v_weight.Data(), epsilon_, ids, nullptr, nullptr, true, v_ready.data());
    p.k = k_ready.data(), p.v = v_ready.data();
  }
  p.past_len = past_len.Data(), p.seq_len = seq_len.Data(), p.block_ids = blocks ? (*block_ids)->Data() : nullptr;
  p.out = out.Allocate(qs);
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.S = S, p.C = C, p.D = D, p.window = window_, p.scale = scale_;
  p.batch_stride = S * Hq * D, p.head_stride = D, p.step_stride = Hq * D;
  Run(context, p, present_k, present_v, ps);
  return Ort::Status{nullptr};
}

}  // namespace gemma4_ort
