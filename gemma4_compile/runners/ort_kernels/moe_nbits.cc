// gemma4_ort::MoENBits: gemma4::MoE whose experts are 4-bit codes in MatMulNBits' layout: in one kernel what
// passes/moe_nbits.py's chain of per-expert Ifs of MatMulNBits computes.
//
// Inputs: x [T, H], router_logits [T, E], per_expert_scale [E] (fp32); gate_up codes [E, 2I, H/B, B/2] (uint8,
// two codes a byte, the lower element in the low nibble, zero point 8) and scales [E, 2I, H/B]; down codes
// [E, H, I/B, B/2] and scales [E, H, I/B], blocks rounded up (the last block's padding meets zero activations).
// Attributes: top_k, block_size B (a power of two from 32), accuracy_level as
// MatMulNBits': 0 multiplies fp32 activations by the codes' values (code - 8) * scale; 4 first rounds each
// block of B activations to int8 (scale absmax / 127) and takes integer dot products (AVX-512 VNNI where
// compiled in). Output: y [T, H].
//
// Routing is the body's (kernels.h Router). Each expert some token picked runs on all its tokens at once, so
// its rows are read once per call (a tile of up to kTile tokens shares each unpacked block); a token's rows
// are weighted and added in ascending expert id, as the chain adds them. Rows are split over onnxruntime's
// intra-op threads; calls of many tokens go in chunks of kChunk, which bounds the scratch.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels.h"

namespace gemma4_ort {
namespace {

constexpr int64_t kSub = 32;          // elements a 16-byte run of codes holds
constexpr int64_t kRowsPerTask = 32;  // rows of one expert a task computes
constexpr int kTile = 4;              // vectors that share one unpacked block
constexpr int kRowBlock = 4;          // rows that share one loaded vector (one token; tiles of more: 2)
constexpr int64_t kChunkCols = 16 * kSub; // elements of a row one token's 4-row tiles read per pass
#ifdef GEMMA4_NO_ROW_STREAMING              // benchmarks/moe_nbits_kernel.py's comparison: 4-row tiles throughout
constexpr bool kStreamRows = false;
#else
constexpr bool kStreamRows = true;
#endif
constexpr int64_t kChunk = 256;       // tokens per pass over the experts
constexpr int64_t kSerialGlu = 16384; // GLU elements below which one thread does them

// Activation vectors in the order the codes unpack. Level 0 keeps them fp32, per run of 32 elements (a
// sub-block) its 16 even elements, then its 16 odd ones (low nibbles, then high nibbles). Level 4 holds int8
// values rounded per block of B (scale absmax / 127), per pair of sub-blocks (64 elements) the evens of the
// first, the evens of the second, the odds of the first, the odds of the second: what 32 bytes of codes give
// as (low nibbles, high nibbles); a lone last sub-block leaves its partner's places zero. Per sub-block also
// its block's scale and -8 * (the sum of its values): the codes' zero point, folded in where the scales
// multiply the integer sums. `cols`: the length rounded up to whole blocks, the padding zero.
struct Activations {
  int64_t length = 0, cols = 0, block = 0, subs = 0, qcols = 0;
  bool int8 = false;
  std::vector<float> f;        // [n, cols]
  std::vector<int8_t> q;       // [n, qcols]
  std::vector<float> scale;    // [n, subs]
  std::vector<float> zero_sum; // [n, subs]

  void Resize(int64_t n, int64_t len, int64_t b, bool quantized) {
    length = len, cols = (len + b - 1) / b * b, block = b, subs = cols / kSub, int8 = quantized;
    qcols = (subs + 1) / 2 * 2 * kSub;
    if (int8) {
      q.assign(n * qcols, 0), scale.resize(n * subs), zero_sum.resize(n * subs);
    } else {
      f.resize(n * cols);
    }
  }

  // where element i (0..31) of sub-block s of vector v goes in q
  int64_t At(int64_t v, int64_t s, int64_t i) const {
    return v * qcols + s / 2 * 2 * kSub + (i & 1) * kSub + (s & 1) * (kSub / 2) + i / 2;
  }

  void Set(int64_t v, const float* src) {
    thread_local std::vector<float> padded;
    if (length != cols) {
      padded.assign(cols, 0.f);
      std::copy(src, src + length, padded.begin());
      src = padded.data();
    }
    for (int64_t b = 0; b < cols; b += block) {
      float amax = 0.f;
      for (int64_t i = b; i < b + block; ++i) amax = std::max(amax, std::fabs(src[i]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t sub = b; sub < b + block; sub += kSub) {
        const int64_t s = sub / kSub;
        if (!int8) {
          float* out = f.data() + v * cols + sub;
          for (int64_t j = 0; j < kSub / 2; ++j) out[j] = src[sub + 2 * j], out[kSub / 2 + j] = src[sub + 2 * j + 1];
          continue;
        }
        int32_t total = 0;
        for (int64_t i = 0; i < kSub; ++i) {
          const int8_t code = static_cast<int8_t>(std::nearbyint(src[sub + i] * inv));
          q[At(v, s, i)] = code, total += code;
        }
        scale[v * subs + s] = amax / 127.f, zero_sum[v * subs + s] = -8.f * static_cast<float>(total);
      }
    }
  }
};

#ifdef GEMMA4_AVX512
// out[r * N + n] = the sum of acc[r][n]'s lanes; four rows at a time share one transposing reduction.
template <int R, int N>
inline void Sums(const __m512 (&acc)[R][N], float* out) {
  int r = 0;
  for (; r + 4 <= R; r += 4) {
    for (int n = 0; n < N; ++n) {
      const __m512 a = acc[r][n], b = acc[r + 1][n], c = acc[r + 2][n], d = acc[r + 3][n];
      const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
      const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
      // per 128-bit lane: partial sums of a, b, c, d
      __m512 x = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
      x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0x4E));
      x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0xB1));
      alignas(16) float four[4];
      _mm_store_ps(four, _mm512_castps512_ps128(x));
      for (int i = 0; i < 4; ++i) out[(r + i) * N + n] = four[i];
    }
  }
  for (; r < R; ++r)
    for (int n = 0; n < N; ++n) out[r * N + n] = _mm512_reduce_add_ps(acc[r][n]);
}
#endif

// out[r * N + n] = row r . activation vector vs[n] for R rows of `a.cols` codes (cols / B scales each) and N
// vectors: each unpacked block serves N vectors, each loaded vector R rows.
template <int R, int N>
void DotRows(const uint8_t* const* codes, const float* const* scales, const Activations& a, const int64_t* vs,
             float* out) {
  const int64_t cols = a.cols, B = a.block, per_block = B / kSub;
#ifdef GEMMA4_AVX512
  if (a.int8) {  // two sub-blocks a 512-bit register; int32 lanes 0-3 and 8-11 the first's, 4-7 and 12-15 the second's
    const int64_t subs = a.subs;
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[R][N], d[R][N];
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < N; ++n) acc[r][n] = _mm512_setzero_ps();
    for (int64_t s0 = 0; s0 < subs; s0 += 16) {  // per sub-block: its scale product, 16 at a time
      const int64_t m = std::min<int64_t>(16, subs - s0);
      const __mmask16 valid = static_cast<__mmask16>((1u << m) - 1);
      __m512 xs[N], zs[N];
      for (int n = 0; n < N; ++n) {
        xs[n] = _mm512_maskz_loadu_ps(valid, a.scale.data() + vs[n] * subs + s0);
        zs[n] = _mm512_maskz_loadu_ps(valid, a.zero_sum.data() + vs[n] * subs + s0);
      }
      // lane j: the scale of sub-block s0 + j, whose block is (s0 + j) / per_block (per_block divides 16)
      const __mmask16 blocks_valid = static_cast<__mmask16>((1u << ((m + per_block - 1) / per_block)) - 1);
      const __m512i spread = _mm512_srlv_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(__builtin_ctzll(per_block)));
      for (int r = 0; r < R; ++r) {
        const __m512 ws = _mm512_maskz_mov_ps(
            valid, _mm512_permutexvar_ps(spread, _mm512_maskz_loadu_ps(blocks_valid, scales[r] + s0 / per_block)));
        for (int n = 0; n < N; ++n) {
          d[r][n] = _mm512_mul_ps(ws, xs[n]);
          acc[r][n] = _mm512_fmadd_ps(d[r][n], zs[n], acc[r][n]);  // the zero point's share
        }
      }
      for (int64_t j = 0; j < m; j += 2) {
        const int64_t sub = s0 + j;
        const __m512i lane = _mm512_add_epi32(halves, _mm512_set1_epi32(static_cast<int>(j)));
        __m512i x[N];
        for (int n = 0; n < N; ++n) x[n] = _mm512_loadu_si512(a.q.data() + vs[n] * a.qcols + sub * kSub);
        for (int r = 0; r < R; ++r) {
          const uint8_t* c = codes[r] + sub * 16;
          const __m256i raw = j + 1 < m ? _mm256_loadu_si256((const __m256i*)c)
                                        : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)c));
          const __m512i w = _mm512_and_si512(
              _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1), low);
          for (int n = 0; n < N; ++n) {
            const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x[n]);
            acc[r][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(lane, d[r][n]), acc[r][n]);
          }
        }
      }
    }
    Sums<R, N>(acc, out);
    return;
  }
  const int64_t blocks = cols / B;
  // code -> code - 8 as a float: vpermps reads the low 4 bits of each index, so no mask is needed
  const __m512 values = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
  __m512 acc[R][N];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < N; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 sum[R][N];
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < N; ++n) sum[r][n] = _mm512_setzero_ps();
    for (int64_t sub = b * B; sub < (b + 1) * B; sub += kSub) {
      __m512 x0[N], x1[N];
      for (int n = 0; n < N; ++n) {
        const float* x = a.f.data() + vs[n] * cols + sub;
        x0[n] = _mm512_loadu_ps(x), x1[n] = _mm512_loadu_ps(x + 16);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i raw = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(codes[r] + sub / 2)));
        const __m512 even = _mm512_permutexvar_ps(raw, values);
        const __m512 odd = _mm512_permutexvar_ps(_mm512_srli_epi32(raw, 4), values);
        for (int n = 0; n < N; ++n) sum[r][n] = _mm512_fmadd_ps(odd, x1[n], _mm512_fmadd_ps(even, x0[n], sum[r][n]));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < N; ++n) acc[r][n] = _mm512_fmadd_ps(sum[r][n], _mm512_set1_ps(scales[r][b]), acc[r][n]);
  }
  Sums<R, N>(acc, out);
#else
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < N; ++n) {
      float acc = 0.f;
      for (int64_t sub = 0; sub < cols; sub += kSub) {
        const int64_t s = sub / kSub, v = vs[n];
        const float w = scales[r][sub / B];
        if (a.int8) {
          int32_t isum = 0;
          for (int64_t j = 0; j < kSub / 2; ++j) {
            const uint8_t c = codes[r][sub / 2 + j];
            isum += (c & 0x0F) * a.q[a.At(v, s, 2 * j)] + (c >> 4) * a.q[a.At(v, s, 2 * j + 1)];
          }
          const float d = w * a.scale[v * a.subs + s];
          acc += d * a.zero_sum[v * a.subs + s] + d * static_cast<float>(isum);
        } else {
          float fsum = 0.f;
          for (int64_t j = 0; j < kSub / 2; ++j) {
            const int32_t even = codes[r][sub / 2 + j] & 0x0F, odd = codes[r][sub / 2 + j] >> 4;
            fsum += (even - 8) * a.f[v * cols + sub + j] + (odd - 8) * a.f[v * cols + sub + j + kSub / 2];
          }
          acc += fsum * w;
        }
      }
      out[r * N + n] = acc;
    }
  }
#endif
}

// DotRows of R rows for n (1..kTile) vectors.
template <int R>
void DotTile(int n, const uint8_t* const* codes, const float* const* scales, const Activations& a,
             const int64_t* vs, float* out) {
  switch (n) {
    case 4: DotRows<R, 4>(codes, scales, a, vs, out); break;
    case 3: DotRows<R, 3>(codes, scales, a, vs, out); break;
    case 2: DotRows<R, 2>(codes, scales, a, vs, out); break;
    default: DotRows<R, 1>(codes, scales, a, vs, out);
  }
}

// One matrix of every expert some token picked, times its tokens' vectors: out[p][r] for each pair p.
struct Stage {
  const uint8_t* codes;
  const float* scales;
  int64_t rows, cols, blocks;  // cols: whole blocks
  const Activations* in;
  const std::vector<std::vector<int64_t>>* pairs;  // per expert: its (token, slot) pairs
  const std::vector<int64_t>* vector_of;           // per pair: its vector in `in`
  float* out;                                      // [pairs, rows]
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (expert, first row)
};

void StageTask(void* data, size_t task) {
  const auto* s = static_cast<const Stage*>(data);
  const auto [e, begin] = s->tasks[task];
  const std::vector<int64_t>& pairs = (*s->pairs)[e];
  const int64_t end = std::min(begin + kRowsPerTask, s->rows);
  int64_t vs[kTile];
  float results[kRowBlock * kTile];
  const uint8_t* codes[kRowBlock];
  const float* scales[kRowBlock];
  // tiles of more tokens: 2 rows (measured: more spill registers). One token: kRowBlock rows share each loaded
  // vector, reading their codes a chunk (16 sub-blocks, DotRows) at a time; rows longer than one chunk stream
  // one at a time, since rows alternating chunk by chunk defeat the prefetcher on cold experts (1.26-1.35x at
  // H 1024-2816, one thread: benchmarks/moe_nbits_kernel.py, RESULTS.md)
  const int64_t block = pairs.size() > 1 ? 2 : kStreamRows && s->cols > kChunkCols ? 1 : kRowBlock;
  for (int64_t r0 = begin; r0 < end; r0 += block) {
    const int R = static_cast<int>(std::min<int64_t>(block, end - r0));
    for (int r = 0; r < R; ++r) {
      const int64_t row = e * s->rows + r0 + r;
      codes[r] = s->codes + row * (s->cols / 2), scales[r] = s->scales + row * s->blocks;
    }
    for (size_t i = 0; i < pairs.size(); i += kTile) {
      const int n = static_cast<int>(std::min<size_t>(kTile, pairs.size() - i));
      for (int j = 0; j < n; ++j) vs[j] = (*s->vector_of)[pairs[i + j]];
      if (R == kRowBlock) {  // one token (block is kRowBlock only then)
        DotRows<kRowBlock, 1>(codes, scales, *s->in, vs, results);
      } else if (R == 2) {
        DotTile<2>(n, codes, scales, *s->in, vs, results);
      } else {
        for (int r = 0; r < R; ++r) DotTile<1>(n, codes + r, scales + r, *s->in, vs, results + r * n);
      }
      for (int r = 0; r < R; ++r) {
        for (int j = 0; j < n; ++j) s->out[pairs[i + j] * s->rows + r0 + r] = results[r * n + j];
      }
    }
  }
}

void Run(Ort::KernelContext& ctx, Stage& s, const std::vector<int64_t>& hit) {
  s.tasks.clear();
  for (int64_t e : hit) {
    for (int64_t r = 0; r < s.rows; r += kRowsPerTask) s.tasks.emplace_back(e, r);
  }
  ctx.ParallelFor(StageTask, s.tasks.size(), 0, &s);
}

// GELU-tanh(gate) * up of each pair's gate_up row, set as the down stage's input vector.
struct GluStage {
  const float* h;
  int64_t inter;
  Activations* act;
  std::vector<float>* scratch;  // one row per pair
};

void GluTask(void* data, size_t p) {
  const auto* g = static_cast<const GluStage*>(data);
  const float* hp = g->h + p * 2 * g->inter;
  float* a = g->scratch->data() + p * g->inter;
  Glu(hp, hp + g->inter, a, g->inter);
  g->act->Set(static_cast<int64_t>(p), a);
}

// What a call needs besides its inputs: routing, per-expert pair lists, activations and the stages' outputs.
struct Scratch {
  std::unique_ptr<Router> router;
  std::vector<int64_t> expert, token_of, identity, hit;
  std::vector<float> weight, h, act, rows;
  std::vector<std::vector<int64_t>> pairs;
  Activations xin, ain;

  void Reserve(int64_t E, int64_t P) {
    if (!router || static_cast<int64_t>(router->probs.size()) != E) router = std::make_unique<Router>(E);
    pairs.resize(E);
    if (static_cast<int64_t>(identity.size()) < P) {
      expert.resize(P), token_of.resize(P), weight.resize(P), identity.resize(P);
      std::iota(identity.begin(), identity.end(), 0);
    }
  }
};

}  // namespace

MoENBits::MoENBits(const OrtApi*, const OrtKernelInfo* info) {
  Ort::ConstKernelInfo k(info);
  top_k_ = k.GetAttribute<int64_t>("top_k");
  block_size_ = k.GetAttribute<int64_t>("block_size");
  accuracy_level_ = k.GetAttribute<int64_t>("accuracy_level");
}

Ort::Status MoENBits::Compute(OrtKernelContext* context, const Floats& x, const Floats& router_logits,
                              const Floats& per_expert_scale, const Bytes& gate_up, const Floats& gate_up_scales,
                              const Bytes& down, const Floats& down_scales, Floats& y) {
  const auto& xs = x.Shape();
  const auto& gs = gate_up.Shape();
  const int64_t B = block_size_;
  if (xs.size() != 2 || gs.size() != 4 || down.Shape().size() != 4 || B < kSub || (B & (B - 1))) {
    return Ort::Status("MoENBits: x must be [T, H], codes [E, N, blocks, B/2], B a power of two from 32",
                       ORT_INVALID_ARGUMENT);
  }
  const int64_t T = xs[0], H = xs[1], E = gs[0], I2 = gs[1], I = I2 / 2, K = top_k_;
  const int64_t hb = (H + B - 1) / B, ib = (I + B - 1) / B;  // blocks per row
  using Shape = std::vector<int64_t>;
  if (I2 != 2 * I || gs != Shape{E, I2, hb, B / 2} || down.Shape() != Shape{E, H, ib, B / 2} ||
      gate_up_scales.Shape() != Shape{E, I2, hb} || down_scales.Shape() != Shape{E, H, ib} ||
      router_logits.Shape() != Shape{T, E} || per_expert_scale.NumberOfElement() != E || K < 1 || K > E) {
    return Ort::Status("MoENBits: inconsistent shapes, block_size or top_k", ORT_INVALID_ARGUMENT);
  }
  Ort::KernelContext ctx(context);
  float* out = y.Allocate({T, H});
  std::fill(out, out + T * H, 0.f);
  const bool int8 = accuracy_level_ >= 4;

  // scratch kept between calls (sizes repeat from step to step); Compute runs on one thread at a time per thread
  thread_local Scratch s;
  s.Reserve(E, kChunk * K);
  Router& router = *s.router;
  Stage up{gate_up.Data(), gate_up_scales.Data(), I2, hb * B, hb, &s.xin, &s.pairs, &s.token_of, nullptr, {}};
  Stage back{down.Data(), down_scales.Data(), H, ib * B, ib, &s.ain, &s.pairs, &s.identity, nullptr, {}};

  for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
    const int64_t n = std::min(kChunk, T - t0), P = n * K;
    for (auto& list : s.pairs) list.clear();
    for (int64_t t = 0; t < n; ++t) {
      int64_t* picked = &s.expert[t * K];
      router.Route(router_logits.Data() + (t0 + t) * E, per_expert_scale.Data(), K, picked, &s.weight[t * K]);
      for (int64_t k = 0; k < K; ++k) s.pairs[picked[k]].push_back(t * K + k), s.token_of[t * K + k] = t;
    }
    s.hit.clear();
    for (int64_t e = 0; e < E; ++e) {
      if (!s.pairs[e].empty()) s.hit.push_back(e);
    }
    s.xin.Resize(n, H, B, int8);
    for (int64_t t = 0; t < n; ++t) s.xin.Set(t, x.Data() + (t0 + t) * H);
    s.h.resize(P * I2), s.rows.resize(P * H), s.act.resize(P * I);
    up.out = s.h.data();
    Run(ctx, up, s.hit);
    s.ain.Resize(P, I, B, int8);
    GluStage glu{s.h.data(), I, &s.ain, &s.act};
    if (P * I < kSerialGlu) {  // a decode step's few rows: not worth waking the pool
      for (int64_t p = 0; p < P; ++p) GluTask(&glu, static_cast<size_t>(p));
    } else {
      ctx.ParallelFor(GluTask, static_cast<size_t>(P), 0, &glu);
    }
    back.out = s.rows.data();
    Run(ctx, back, s.hit);
    for (int64_t e : s.hit) {  // ascending expert id, as the chain of Ifs adds
      for (int64_t p : s.pairs[e]) {
        float* yt = out + (t0 + s.token_of[p]) * H;
        const float* rp = s.rows.data() + p * H;
        for (int64_t j = 0; j < H; ++j) yt[j] += rp[j] * s.weight[p];
      }
    }
  }
  return Ort::Status{nullptr};
}

}  // namespace gemma4_ort
