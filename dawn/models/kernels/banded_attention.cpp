// Local temporal attention of the A2V-FDM U-Net for inference on CPU (paper §3.6 and §4.5): for every
// (spatial position, head), RoPE on q and k, scores q.k / sqrt(dh) + relative bias for keys |j - i| <= window,
// softmax, and the weighted sum of the values, in one pass over a tile kept in the core's cache.
//
// Why a kernel: the head dimension is 32, so PyTorch's CPU flash attention spends its time in many tiny matrix
// products (a 32-query block against ~100 keys) and runs at a quarter of the core's multiply rate. Here queries
// are taken four at a time against the 16-key vectors of their shared window, so every loaded key or value
// vector feeds four multiply-adds and the score accumulators stay in registers.
//
// Built by dawn/models/native.py with the machine's own compiler (g++ -O3 -march=native); plain C ABI, called
// through ctypes. Vector helpers: vector_math.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vector_math.h"

namespace {

using namespace dawn_kernels;
constexpr int kQueries = 4;  // queries per tile

struct Problem {
  const float* qkv;  // (T, N, 3, H, dh) with strides (stride_t, stride_n, H*dh, dh, 1)
  int64_t frames, positions, heads, dh, stride_t, stride_n;
  const float* cos;  // (T, dh/2): RoPE of frame t, pair p
  const float* sin;
  const float* bias;  // (H, 2T - 1): relative bias of offset j - i at index j - i + T - 1
  int64_t window;
  float scale;
  float* out;  // (T, N, H*dh) with strides (out_stride_t, out_stride_n, 1)
  int64_t out_stride_t, out_stride_n;
};

// One thread's copies of a (position, head): q (rotated, scaled) row-major, k transposed, v row-major;
// keys are padded by `pad` zero frames on both sides so that every tile reads whole vectors.
struct Tile {
  int64_t pad, keys;  // keys = frames + 2 * pad
  std::vector<float> q, kt, v, p;
  Tile(int64_t frames, int64_t dh, int64_t pad_, int nk)
      : pad(pad_), keys(frames + 2 * pad_), q((frames + kQueries) * dh, 0.0f), kt(dh * keys, 0.0f),
        v(keys * dh, 0.0f), p(kQueries * nk, 0.0f) {}
};

template <int DV, int NKB>
void attend(const Problem& pr, const float* cos2, const float* sin2, const float* bias_tile, const float* valid, int64_t n,
            int64_t h, Tile& tile) {
  constexpr int dh = DV * kLanes, nk = NKB * kLanes;
  const int64_t T = pr.frames, P = tile.pad, K = tile.keys, hd = pr.heads * dh;
  float* q = tile.q.data();
  float* kt = tile.kt.data();
  float* v = tile.v.data();
  float* p = tile.p.data();

  // gather this (position, head) with RoPE (vectors: x * cos + swap_pairs(x) * (-sin, sin))
  float k_row[dh];
  for (int64_t t = 0; t < T; ++t) {
    const float* row = pr.qkv + t * pr.stride_t + n * pr.stride_n + h * dh;
    for (int dv = 0; dv < DV; ++dv) {
      const vf c = load(cos2 + t * dh + dv * kLanes), s = load(sin2 + t * dh + dv * kLanes);
      const vf qv = load(row + dv * kLanes), kv = load(row + hd + dv * kLanes);
      store(q + t * dh + dv * kLanes, (qv * c + swap_pairs(qv) * s) * splat(pr.scale));
      store(k_row + dv * kLanes, kv * c + swap_pairs(kv) * s);
      store(v + (P + t) * dh + dv * kLanes, load(row + 2 * hd + dv * kLanes));
    }
    for (int d = 0; d < dh; ++d) kt[d * K + P + t] = k_row[d];
  }

  float* out_head = pr.out + n * pr.out_stride_n + h * dh;
  for (int64_t i0 = 0; i0 < T; i0 += kQueries) {
    const int64_t first_key = P + i0 - pr.window;  // padded index of the tile's first key
    // scores: bias (relative offsets are the same for every tile) + frame validity + q.k
    vf acc[kQueries][NKB];
    for (int qi = 0; qi < kQueries; ++qi)
      for (int kb = 0; kb < NKB; ++kb)
        acc[qi][kb] = load(bias_tile + qi * nk + kb * kLanes) + load(valid + first_key + kb * kLanes);
    for (int d = 0; d < dh; ++d) {
      const float* krow = kt + d * K + first_key;
      vf kv[NKB];
      for (int kb = 0; kb < NKB; ++kb) kv[kb] = load(krow + kb * kLanes);
      for (int qi = 0; qi < kQueries; ++qi) {
        const vf qd = splat(q[(i0 + qi) * dh + d]);
        for (int kb = 0; kb < NKB; ++kb) acc[qi][kb] += qd * kv[kb];
      }
    }
    // softmax numerators into p, and each query's 1 / denominator
    float inv[kQueries];
    for (int qi = 0; qi < kQueries; ++qi) {
      vf high = acc[qi][0];
      for (int kb = 1; kb < NKB; ++kb) high = max(high, acc[qi][kb]);
      const float m = max_lane(high);
      vf total = splat(0.0f);
      for (int kb = 0; kb < NKB; ++kb) {
        const vf e = exp_nonpositive(acc[qi][kb] - splat(m));
        store(p + qi * nk + kb * kLanes, e);
        total += e;
      }
      inv[qi] = 1.0f / sum_lanes(total);
    }
    // weighted sum of the values
    vf o[kQueries][DV];
    for (int qi = 0; qi < kQueries; ++qi)
      for (int dv = 0; dv < DV; ++dv) o[qi][dv] = splat(0.0f);
    for (int j = 0; j < nk; ++j) {
      const float* vrow = v + (first_key + j) * dh;
      vf vv[DV];
      for (int dv = 0; dv < DV; ++dv) vv[dv] = load(vrow + dv * kLanes);
      for (int qi = 0; qi < kQueries; ++qi) {
        const vf w = splat(p[qi * nk + j]);
        for (int dv = 0; dv < DV; ++dv) o[qi][dv] += w * vv[dv];
      }
    }
    const int64_t count = std::min<int64_t>(kQueries, T - i0);
    for (int qi = 0; qi < count; ++qi)
      for (int dv = 0; dv < DV; ++dv)
        store(out_head + (i0 + qi) * pr.out_stride_t + dv * kLanes, o[qi][dv] * splat(inv[qi]));
  }
}

template <int DV, int NKB>
void run(const Problem& pr, int threads) {
  constexpr int dh = DV * kLanes, nk = NKB * kLanes;
  const int64_t T = pr.frames, W = pr.window, pad = W + nk;
  const float inf = std::numeric_limits<float>::infinity();
  // per head, the bias of query qi of a tile against its key k: offset k - qi - W (masked beyond the window)
  std::vector<float> bias_tiles(pr.heads * kQueries * nk);
  for (int64_t h = 0; h < pr.heads; ++h)
    for (int qi = 0; qi < kQueries; ++qi)
      for (int k = 0; k < nk; ++k) {
        const int64_t rel = k - qi - W;
        const bool seen = std::abs(rel) <= W && std::abs(rel) < T;
        bias_tiles[(h * kQueries + qi) * nk + k] = seen ? pr.bias[h * (2 * T - 1) + rel + T - 1] : -inf;
      }
  // RoPE per feature: cos of its pair, and -sin / +sin for the pair's first / second feature
  std::vector<float> cos2(T * dh), sin2(T * dh);
  for (int64_t t = 0; t < T; ++t)
    for (int d = 0; d < dh; ++d) {
      cos2[t * dh + d] = pr.cos[t * (dh / 2) + d / 2];
      sin2[t * dh + d] = (d % 2 ? 1.0f : -1.0f) * pr.sin[t * (dh / 2) + d / 2];
    }
  std::vector<float> valid(T + 2 * pad, -inf);  // 0 for real frames, -inf for padding
  std::fill(valid.begin() + pad, valid.begin() + pad + T, 0.0f);

  const int64_t problems = pr.positions * pr.heads;
#pragma omp parallel num_threads(threads)
  {
    Tile tile(T, dh, pad, nk);
#pragma omp for schedule(static)
    for (int64_t index = 0; index < problems; ++index) {
      const int64_t n = index / pr.heads, h = index % pr.heads;
      attend<DV, NKB>(pr, cos2.data(), sin2.data(), bias_tiles.data() + h * kQueries * nk, valid.data(), n, h, tile);
    }
  }
}

template <int DV>
bool dispatch_keys(const Problem& pr, int threads) {
  // key vectors a tile of kQueries queries needs for its window: (kQueries - 1 + 2W + 1) keys
  const int64_t vectors = (kQueries + 2 * pr.window + kLanes - 1) / kLanes;
  switch (vectors) {
    case 1: run<DV, 1>(pr, threads); return true;
    case 2: run<DV, 2>(pr, threads); return true;
    case 3: run<DV, 3>(pr, threads); return true;
    case 4: run<DV, 4>(pr, threads); return true;
    case 5: run<DV, 5>(pr, threads); return true;
    case 6: run<DV, 6>(pr, threads); return true;
    case 7: run<DV, 7>(pr, threads); return true;
    default: return false;
  }
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 when the shape is not supported (head dim not 16, 32 or 64, or window over 54):
// the caller then uses the PyTorch formulation.
int dawn_banded_attention(const float* qkv, int64_t frames, int64_t positions, int64_t heads, int64_t dh,
                          int64_t stride_t, int64_t stride_n, const float* cos, const float* sin,
                          const float* bias, int64_t window, float scale, float* out, int64_t out_stride_t,
                          int64_t out_stride_n, int threads) {
  if (frames < 1 || window < 0) return 1;
  const Problem pr{qkv, frames, positions, heads, dh, stride_t, stride_n, cos, sin, bias, window, scale,
                   out, out_stride_t, out_stride_n};
  switch (dh) {
    case 16: return dispatch_keys<1>(pr, threads) ? 0 : 1;
    case 32: return dispatch_keys<2>(pr, threads) ? 0 : 1;
    case 64: return dispatch_keys<4>(pr, threads) ? 0 : 1;
    default: return 1;
  }
}

int dawn_banded_attention_version() { return 1; }

}  // extern "C"
