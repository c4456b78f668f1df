// Per-token coefficients of the U-Net blocks' condition cross-attention for inference on CPU (paper §4.3; the
// closed form is derived in dawn/models/unet3d.py, CrossAttentionTerms). For each of the 3 attentions a (audio,
// pose, eye) and H heads h of a token:
//   s_ah = sigmoid(logit_ah / max(|q_ah|, 1e-12)),  c_a = (1, s_a1, ..., s_aH),
//   coef_a = c_a / sqrt(max(c_a' G_a c_a, 0) + eps)
// where q_ah is the token's query of head h, logit_ah = <q_ah, w_ah>, and G_a the frame's Gram matrix.
//
// Why a kernel: in PyTorch these are ten small elementwise and reduction passes over (tokens, 24) tensors (a norm
// over 8 features, division, sigmoid, padding, a 9x9 quadratic form, rsqrt, scaling) that together cost about as
// much as the block's 3x3 convolution. Here 16 tokens are taken at a time, one per vector lane, and each token's
// inputs are read once.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vector_math.h"

namespace {

using namespace dawn_kernels;

inline vf sqrt(vf x) {  // one vector square root (built with -fno-math-errno)
  for (int l = 0; l < kLanes; ++l) x[l] = __builtin_sqrtf(x[l]);
  return x;
}

inline vf sigmoid(vf x) {  // with z = exp(-|x|) <= 1: 1 / (1 + z) for x >= 0, z / (1 + z) below
  const vi negative = x < splat(0.0f);
  const vf z = exp_nonpositive(negative ? x : -x);
  const vf inverse = splat(1.0f) / (splat(1.0f) + z);
  return negative ? z * inverse : inverse;
}

// H heads of 8 features: a token's 3 * H queries are 3H/2 vectors, each holding two heads
template <int H>
void coefficients(const float* q, const float* logits, const float* gram, int64_t frames, int64_t tokens, float eps,
                  float* coef) {
  constexpr int heads = 3 * H, C = H + 1, dh = 8;
  static_assert(heads * dh % kLanes == 0, "whole vectors of queries");
  for (int64_t f = 0; f < frames; ++f) {
    const float* g = gram + f * 3 * C * C;
    for (int64_t t0 = 0; t0 < tokens; t0 += kLanes) {
      const int count = static_cast<int>(std::min<int64_t>(kLanes, tokens - t0));
      // the block's tokens across vector lanes: squared query norms and logits
      alignas(64) float norm2[heads][kLanes];
      alignas(64) float logit[heads][kLanes];
      for (int l = 0; l < kLanes; ++l) {
        if (l >= count) {  // lanes past the last token: any finite values
          for (int k = 0; k < heads; ++k) norm2[k][l] = 1.0f, logit[k][l] = 0.0f;
          continue;
        }
        const int64_t token = f * tokens + t0 + l;
        const float* qt = q + token * heads * dh;
        for (int v = 0; v < heads * dh / kLanes; ++v) {  // two heads per vector: sums of 8 lanes
          vf x = load(qt + v * kLanes);
          x *= x;
          x += swap_lanes_4(x);
          x += swap_lanes_2(x);
          x += swap_lanes_1(x);
          norm2[2 * v][l] = x[0];
          norm2[2 * v + 1][l] = x[8];
        }
        const float* lt = logits + token * heads;
        for (int k = 0; k < heads; ++k) logit[k][l] = lt[k];
      }
      alignas(64) float out[3 * C][kLanes];
      for (int a = 0; a < 3; ++a) {
        vf c[C];
        c[0] = splat(1.0f);
        for (int h = 0; h < H; ++h) {
          const vf norm = sqrt(load(norm2[a * H + h]));
          c[h + 1] = sigmoid(load(logit[a * H + h]) / max(norm, splat(1e-12f)));
        }
        const float* ga = g + a * C * C;
        vf variance = splat(0.0f);
        for (int i = 0; i < C; ++i) {
          vf row = splat(0.0f);
          for (int j = 0; j < C; ++j) row += splat(ga[i * C + j]) * c[j];
          variance += c[i] * row;
        }
        const vf scale = splat(1.0f) / sqrt(max(variance, splat(0.0f)) + splat(eps));
        for (int i = 0; i < C; ++i) store(out[a * C + i], c[i] * scale);
      }
      for (int l = 0; l < count; ++l) {
        float* ct = coef + (f * tokens + t0 + l) * 3 * C;
        for (int k = 0; k < 3 * C; ++k) ct[k] = out[k][l];
      }
    }
  }
}

}  // namespace

extern "C" {

// q (frames, tokens, 3 * heads * 8), logits (frames, tokens, 3 * heads), gram (frames, 3, heads + 1, heads + 1),
// coef (frames, tokens, 3 * (heads + 1)), all contiguous float32. Returns 0 on success, 1 when the shape is not
// supported (head dim not 8, or heads not 8): the caller then uses the PyTorch formulation.
int dawn_cross_attention_coefficients(const float* q, const float* logits, const float* gram, int64_t frames,
                                      int64_t tokens, int64_t heads, int64_t dh, float eps, float* coef,
                                      int threads) {
  if (dh != 8 || heads != 8) return 1;
  // frames are independent: split them over the threads
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t f = 0; f < frames; ++f)
    coefficients<8>(q + f * tokens * 3 * heads * dh, logits + f * tokens * 3 * heads,
                    gram + f * 3 * (heads + 1) * (heads + 1), 1, tokens, eps, coef + f * tokens * 3 * (heads + 1));
  return 0;
}

}  // extern "C"
